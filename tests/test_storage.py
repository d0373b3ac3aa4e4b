"""Parquet store, DuckDB catalog, `gopd sql`, and prompt dataset loading."""

import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from typer.testing import CliRunner

from gopd_core.cli import app
from gopd_core.objectives import gopd_advantages
from storage.catalog import ReadOnlyQueryError, check_read_only, open_catalog, run_query
from storage.datasets import DatasetError, load_prompts
from storage.layout import RunLayout
from storage.parquet import SchemaMismatchError, list_shards, read_shards, write_shard
from storage.schemas import ROLLOUTS, SCORES


def _rollout_row(run_id, iteration, index, domain, length):
    return {
        "run_id": run_id, "iteration": iteration, "rollout_id": f"{run_id}/{iteration}/p{index}/0",
        "prompt_id": f"p{index}", "domain": domain, "sample_index": 0, "checkpoint_id": "init",
        "engine": "hf", "prompt_token_ids": [1, 2, 3], "response_token_ids": list(range(4, 4 + length)),
        "rollout_logprobs": [-0.5] * length, "prompt_text": "q", "response_text": "a" * length,
        "finish_reason": "stop", "reward": 1.0,
    }


def write_fake_run(layout: RunLayout, seed: int = 0, rows: int = 6) -> dict:
    """Rollouts + student/teacher/reference/teacher-base scores with random log-probs; returns them by role."""
    rng = np.random.default_rng(seed)
    lengths = [int(n) for n in rng.integers(2, 9, size=rows)]
    domains = ["math" if i % 2 == 0 else "code" for i in range(rows)]
    rollouts = [_rollout_row(layout.run_id, 0, i, domains[i], n) for i, n in enumerate(lengths)]
    write_shard(rollouts, layout.rollouts_dir(0) / "part-00000.parquet", ROLLOUTS)
    logprobs = {}
    for role, domain in [("student", None), ("teacher", "math"), ("teacher", "code"), ("reference", None),
                         ("teacher-base", None)]:
        values = [(-rng.random(n) * 4).astype(np.float32) for n in lengths]
        logprobs[(role, domain)] = values
        keep = [i for i in range(rows) if domain is None or domains[i] == domain]
        score_rows = [{
            "run_id": layout.run_id, "iteration": 0, "rollout_id": rollouts[i]["rollout_id"], "role": role,
            "domain": domain, "model_id": f"/models/{role}-{domain}", "model_hash": f"h-{role}-{domain}",
            "logprobs": values[i].tolist(),
        } for i in keep]
        write_shard(score_rows, layout.scores_dir(0, role, f"h-{role}-{domain}") / "part-00000.parquet", SCORES)
    return {"rollouts": rollouts, "logprobs": logprobs, "domains": domains, "lengths": lengths}


@pytest.fixture
def fake_run(tmp_path):
    layout = RunLayout.under(tmp_path / "runs", "run-a")
    return layout, write_fake_run(layout)


def test_write_is_atomic_and_idempotent(tmp_path):
    path = tmp_path / "t" / "part-00000.parquet"
    rows = [_rollout_row("r", 0, i, "math", 3) for i in range(5)]
    write_shard(rows, path, ROLLOUTS)
    write_shard(rows, path, ROLLOUTS)  # rewrite replaces, never duplicates
    assert read_shards(list_shards(tmp_path / "t"), ROLLOUTS).num_rows == 5
    assert [p.name for p in path.parent.iterdir()] == ["part-00000.parquet"]  # no temporaries left


def test_schema_violation_names_column_and_row(tmp_path):
    rows = [_rollout_row("r", 0, 0, "math", 3), _rollout_row("r", 0, 1, "math", 3)]
    rows[1]["domain"] = None
    with pytest.raises(SchemaMismatchError, match=r"column 'domain' is null at row 1"):
        write_shard(rows, tmp_path / "x.parquet", ROLLOUTS)
    assert not (tmp_path / "x.parquet").exists()


def test_token_advantages_view_matches_gopd_advantages(fake_run):
    layout, data = fake_run
    lp = data["logprobs"]
    for reward_scale in (1.0, 1.5):
        for reference_role in ("reference", "teacher-base"):
            result = run_query(
                layout.run_dir,
                f"SELECT rollout_id, token_index, advantage FROM token_advantages WHERE reference_role = "
                f"'{reference_role}' ORDER BY rollout_id, token_index",
                reward_scale=reward_scale,
            ).fetchall()
            got = {}
            for rollout_id, _token_index, advantage in result:
                got.setdefault(rollout_id, []).append(advantage)
            assert len(got) == len(data["rollouts"])
            for i, rollout in enumerate(data["rollouts"]):
                domain = data["domains"][i]
                expected = gopd_advantages(
                    torch.tensor(lp[("student", None)][i])[None],
                    torch.tensor(lp[("teacher", domain)][i])[None],
                    torch.tensor(lp[(reference_role, None)][i])[None],
                    reward_scale=reward_scale,
                )[0]
                np.testing.assert_allclose(got[rollout["rollout_id"]], expected.numpy(), atol=1e-6, rtol=0)


def test_lam_one_is_identical_across_references(fake_run):
    layout, _ = fake_run
    diff = run_query(layout.run_dir, """
        SELECT max(abs(a.advantage - b.advantage)) FROM token_advantages a JOIN token_advantages b
        USING (rollout_id, token_index)
        WHERE a.reference_role = 'reference' AND b.reference_role = 'teacher-base'""", reward_scale=1.0).fetchall()[0][0]
    assert diff == 0.0
    diff = run_query(layout.run_dir, """
        SELECT max(abs(a.advantage - b.advantage)) FROM token_advantages a JOIN token_advantages b
        USING (rollout_id, token_index)
        WHERE a.reference_role = 'reference' AND b.reference_role = 'teacher-base'""", reward_scale=1.5).fetchall()[0][0]
    assert diff > 1e-3


@pytest.mark.parametrize("query", [
    "CREATE TABLE t AS SELECT 1",
    "INSERT INTO rollouts SELECT * FROM rollouts",
    "COPY (SELECT 1) TO '/tmp/out.csv'",
    "ATTACH '/tmp/x.duckdb'",
    "INSTALL httpfs",
    "LOAD httpfs",
    "SELECT 1; DROP VIEW rollouts",
])
def test_sql_refuses_writes(query):
    with pytest.raises(ReadOnlyQueryError, match="read-only"):
        check_read_only(query)


def test_sql_cannot_read_outside_the_run(fake_run, tmp_path):
    layout, _ = fake_run
    outside = tmp_path / "secret.csv"
    outside.write_text("a\n1\n")
    con = open_catalog(layout.run_dir)
    with pytest.raises(Exception, match="Permission"):
        con.sql(f"SELECT * FROM read_csv('{outside}')").fetchall()
    assert con.sql("SELECT count(*) FROM rollouts").fetchall()[0][0] == 6


def test_empty_run_has_typed_empty_views(tmp_path):
    (tmp_path / "empty").mkdir()
    con = open_catalog(tmp_path / "empty")
    assert con.sql("SELECT count(*) FROM scores").fetchall()[0][0] == 0
    assert con.sql("SELECT count(*) FROM token_advantages").fetchall()[0][0] == 0


def test_gopd_sql_cli(fake_run, tmp_path):
    layout, _ = fake_run
    runner = CliRunner()
    result = runner.invoke(app, ["sql", "SELECT domain, count(*) AS n FROM rollouts GROUP BY domain ORDER BY domain",
                                 "--run", str(layout.run_dir)])
    assert result.exit_code == 0, result.output
    assert "code" in result.output and "math" in result.output
    out = tmp_path / "adv.parquet"
    result = runner.invoke(app, ["sql", "SELECT * FROM token_advantages", "--run", str(layout.run_dir),
                                 "--lam", "1.25", "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert pq.read_table(out).column("reward_scale").to_pylist()[0] == 1.25
    result = runner.invoke(app, ["sql", "DELETE FROM rollouts", "--run", str(layout.run_dir)])
    assert result.exit_code != 0
    assert "read-only" in str(result.exception)


def test_load_verl_parquet(tmp_path):
    path = tmp_path / "verl.parquet"
    table = pa.table({
        "prompt": [[{"role": "user", "content": "1+1?"}], [{"role": "user", "content": "def f"}]],
        "data_source": ["gsm", "mbpp"],
        "reward_model": [{"ground_truth": "2", "style": "rule"}, {"ground_truth": "x", "style": "rule"}],
        "extra_info": [{"opd_teacher": "math", "index": 0}, {"opd_teacher": "code", "index": 1}],
    })
    pq.write_table(table, path)
    prompts = load_prompts(path)
    assert prompts.column("domain").to_pylist() == ["math", "code"]
    assert prompts.column("ground_truth").to_pylist() == ["2", "x"]
    assert json.loads(prompts.column("extra").to_pylist()[0])["opd_teacher"] == "math"


def test_load_jsonl_and_errors(tmp_path):
    path = tmp_path / "p.jsonl"
    path.write_text('{"prompt": "2+2?", "answer": "4", "domain": "math"}\n{"prompt": "3+3?", "answer": 6}\n')
    prompts = load_prompts(path)
    assert prompts.column("domain").to_pylist() == ["math", "default"]
    assert prompts.column("ground_truth").to_pylist() == ["4", "6"]
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "2+2?"}\n')
    with pytest.raises(DatasetError, match=r"bad.jsonl is missing required column 'answer'"):
        load_prompts(bad)
    empty = tmp_path / "empty.jsonl"
    empty.write_text('{"prompt": "  ", "answer": "1"}\n')
    with pytest.raises(DatasetError, match="row 0 has an empty prompt"):
        load_prompts(empty)
    no_column = tmp_path / "nocol.parquet"
    pq.write_table(pa.table({"prompt": ["x"]}), no_column)
    with pytest.raises(DatasetError, match=r"nocol.parquet is missing required column 'reward_model'"):
        load_prompts(no_column)
