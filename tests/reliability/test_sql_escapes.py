"""`gopd sql` stays read-only and inside its run directory (beyond tests/test_storage.py's basics).

Two sibling runs under one root; every query goes through the `gopd sql` command against run-a.
Reads of host files, of run-b (directly, via `..`, via symlinks planted in run-a, via file:// or
http://), configuration changes and statements that write are all refused, and no file appears.
Positive controls prove each probe function works on run-a's own files.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from typer.testing import CliRunner

from gopd_core.cli import app
from storage.layout import RunLayout, write_json_atomic
from storage.parquet import write_shard
from storage.schemas import ROLLOUTS

SECRET = "gopd-secret-7f3a"


def _rollout(run_id: str, index: int) -> dict:
    return {"run_id": run_id, "iteration": 0, "rollout_id": f"{run_id}/{index}", "prompt_id": f"p{index}",
            "domain": "math", "sample_index": 0, "checkpoint_id": "init", "engine": "hf", "prompt_token_ids": [1, 2],
            "response_token_ids": [3, 4], "rollout_logprobs": [-0.5, -0.5], "prompt_text": SECRET,
            "response_text": "4", "finish_reason": "stop", "reward": 1.0}


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("sql-root")
    paths = {}
    for run_id in ("run-a", "run-b"):
        layout = RunLayout.under(root, run_id)
        write_shard([_rollout(run_id, i) for i in range(3)], layout.rollouts_dir(0) / "part-00000.parquet", ROLLOUTS)
        write_json_atomic(layout.config_path, {"run_id": run_id, "secret": SECRET})
        paths[run_id] = layout.run_dir
    os.symlink("/etc", paths["run-a"] / "etc-link")
    os.symlink(paths["run-b"], paths["run-a"] / "sibling-link")
    (root / "outside.csv").write_text(f"secret\n{SECRET}\n")
    return {"root": root, **paths}


def _sql(runs, query: str):
    return CliRunner().invoke(app, ["sql", query, "--run", str(runs["run-a"])])


def _files(root: Path) -> set[Path]:
    return set(root.rglob("*"))


OUTSIDE_READS = [
    "SELECT * FROM read_csv('/etc/passwd')",
    "SELECT * FROM read_text('/etc/passwd')",
    "SELECT * FROM read_blob('/etc/passwd')",
    "SELECT * FROM read_json('/etc/passwd')",
    "SELECT * FROM glob('/etc/*')",
    "SELECT * FROM read_parquet('/etc/passwd')",
    "SELECT * FROM read_csv('{root}/outside.csv')",
    "SELECT * FROM read_parquet('{b}/rollouts/*/*.parquet')",
    "SELECT * FROM read_text('{b}/run_config.json')",
    "SELECT * FROM glob('{b}/**')",
    "SELECT * FROM read_text('{a}/../run-b/run_config.json')",
    "SELECT * FROM read_parquet('{a}/../run-b/rollouts/*/*.parquet')",
    "SELECT * FROM read_text('{a}/../../../../../../etc/passwd')",
    "SELECT * FROM read_text('{a}/etc-link/passwd')",
    "SELECT * FROM read_text('{a}/sibling-link/run_config.json')",
    "SELECT * FROM read_parquet('{a}/sibling-link/rollouts/*/*.parquet')",
    "SELECT * FROM read_text('file:///etc/passwd')",
    "SELECT * FROM read_text('file://{b}/run_config.json')",
    "SELECT * FROM read_parquet('http://127.0.0.1:9/x.parquet')",
    "SELECT * FROM duckdb_secrets()",
    "SELECT getenv('HOME')",
    "SELECT count(*) FROM rollouts UNION ALL SELECT count(*) FROM read_parquet('{b}/rollouts/*/*.parquet')",
]


@pytest.mark.parametrize("template", OUTSIDE_READS)
def test_reads_outside_the_run_are_refused(runs, template):
    query = template.format(root=runs["root"], a=runs["run-a"], b=runs["run-b"])
    result = _sql(runs, query)
    assert result.exit_code != 0, result.output
    assert "root:" not in result.output and "run-b" not in result.output.replace(query, "")
    message = str(result.exception)
    assert any(word in message for word in ("Permission", "does not exist", "refused")), message


@pytest.mark.parametrize("query", [
    "SELECT content FROM read_text('{a}/run_config.json')",
    "SELECT count(*) FROM read_parquet('{a}/rollouts/*/*.parquet')",
    "SELECT count(*) FROM glob('{a}/**')",
    "SELECT size FROM read_blob('{a}/run_config.json')",
])
def test_the_same_functions_work_inside_the_run(runs, query):
    """Positive controls: the refusals above are about the path, not about the function."""
    result = _sql(runs, query.format(a=runs["run-a"]))
    assert result.exit_code == 0, result.output


WRITES_AND_SETTINGS = [
    "SET enable_external_access = true",
    "SET allowed_directories = ['/']",
    "RESET allowed_directories",
    "SET lock_configuration = false",
    "SET VARIABLE reward_scale = 99",
    "PRAGMA enable_profiling",
    "CALL pragma_version()",
    "SELECT 1; SET enable_external_access = true",
    "EXPLAIN ANALYZE COPY (SELECT * FROM rollouts) TO '{a}/rollouts/iteration=000000/part-99999.parquet'",
    "EXPLAIN (ANALYZE, FORMAT json) COPY (SELECT 1) TO '{a}/pwned.csv'",
    "EXPLAIN ANALYZE /* hidden */ COPY (SELECT 1) TO '{a}/pwned.csv'",
    "EXPLAIN ANALYZE CREATE TABLE t AS SELECT 1",
    "COPY (SELECT 1) TO '{a}/pwned.csv'",
    "COPY rollouts TO '{a}/pwned.parquet'",
    "EXPORT DATABASE '{a}/export'",
    "ATTACH '{a}/pwned.duckdb' AS pwned",
    "INSTALL httpfs",
    "LOAD httpfs",
    "CREATE SECRET s (TYPE s3, KEY_ID 'k', SECRET 's')",
    "CREATE MACRO leak() AS 1",
    "DETACH memory",
    "CHECKPOINT",
]


@pytest.mark.parametrize("template", WRITES_AND_SETTINGS)
def test_writes_and_setting_changes_are_refused_and_write_nothing(runs, template):
    before = _files(runs["root"])
    result = _sql(runs, template.format(a=runs["run-a"]))
    assert result.exit_code != 0, result.output
    assert "read-only" in str(result.exception) or "locked" in str(result.exception), str(result.exception)
    assert _files(runs["root"]) == before


def test_explain_analyze_of_a_select_still_works(runs):
    """Positive control: EXPLAIN (ANALYZE) of a SELECT is allowed; only what it explains is judged."""
    for query in ("EXPLAIN ANALYZE SELECT count(*) FROM rollouts", "EXPLAIN SELECT * FROM token_advantages",
                  "SUMMARIZE rollouts"):
        assert _sql(runs, query).exit_code == 0, query
