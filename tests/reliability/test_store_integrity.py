"""Store integrity: damaged files are named by every reader, listed by `gopd doctor`, quarantined
without touching good ones, and rebuilt by rerunning the flow.

One finished run gets three kinds of damage: a rollouts shard cut in half, eight flipped bytes
inside a scores shard's data page, and a checkpoint whose model.safetensors was deleted.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from harness import checkpoint_steps, make_config, table_counts, visible_damage, visible_parquet
from typer.testing import CliRunner

from gopd_core.cli import app
from gopd_core.models import ModelPathError, load_model
from gopd_core.pipeline import score_sets_from
from gopd_core.training import build_update_rows
from storage.catalog import run_query
from storage.layout import RunLayout
from storage.parquet import CorruptShardError, SchemaMismatchError, list_shards, read_shards, write_shard
from storage.readers import read_rollouts, read_score_map
from storage.schemas import SCORES


def _fingerprints(paths) -> dict[Path, tuple[str, int]]:
    return {p: (hashlib.sha256(p.read_bytes()).hexdigest(), p.stat().st_mtime_ns) for p in paths}


def _flip_bytes_in_data_page(path: Path, column: str, count: int = 8) -> None:
    """XOR `count` bytes in the middle of `column`'s first data page (not its header)."""
    metadata = pq.ParquetFile(path).metadata
    names = [metadata.row_group(0).column(i).path_in_schema for i in range(metadata.num_columns)]
    chunk = metadata.row_group(0).column(next(i for i, n in enumerate(names) if n.startswith(column)))
    start = chunk.data_page_offset + chunk.total_compressed_size // 2
    data = bytearray(path.read_bytes())
    for position in range(start, start + count):
        data[position] ^= 0xA5
    path.write_bytes(bytes(data))


@pytest.fixture(scope="module")
def damaged(tiny_world, prefect_api_url, tmp_path_factory):
    from flows.distill import distill

    config = make_config(tiny_world, "damaged", root=tmp_path_factory.mktemp("integrity"), iterations=1,
                         **{"data.test": []})
    layout = RunLayout(Path(distill(config=config)))
    before = {"counts": table_counts(layout.run_dir), "steps": checkpoint_steps(layout.run_dir),
              "rollouts": read_rollouts(layout, 0), "scores": _sorted_scores(layout)}
    rollouts_shard = list_shards(layout.rollouts_dir(0))[0]
    rollouts_shard.write_bytes(rollouts_shard.read_bytes()[: rollouts_shard.stat().st_size // 2])
    written = layout.done_info(0, "score")["result"]
    student_hash = json.loads(written)["student"]
    scores_shard = list_shards(layout.scores_dir(0, "student", student_hash))[1]
    _flip_bytes_in_data_page(scores_shard, "logprobs")
    weights = layout.checkpoint_dir(0) / "model.safetensors"
    weights.unlink()
    damaged_paths = {rollouts_shard, scores_shard}
    good = _fingerprints(p for p in visible_parquet(layout.run_dir) if p not in damaged_paths)
    return {"config": config, "layout": layout, "before": before, "rollouts_shard": rollouts_shard,
            "scores_shard": scores_shard, "student_hash": student_hash, "weights": weights, "good": good}


def _sorted_scores(layout: RunLayout):
    return read_shards(list_shards(layout.table_dir("scores")), SCORES).sort_by(
        [("rollout_id", "ascending"), ("role", "ascending"), ("model_hash", "ascending")])


def test_readers_name_the_damaged_file(damaged):
    layout = damaged["layout"]
    with pytest.raises(CorruptShardError, match=str(damaged["rollouts_shard"])):
        read_rollouts(layout, 0)
    with pytest.raises((CorruptShardError, SchemaMismatchError), match=str(damaged["scores_shard"])):
        read_score_map(layout, 0, "student", damaged["student_hash"])
    with pytest.raises((CorruptShardError, SchemaMismatchError), match=str(damaged["scores_shard"])):
        read_shards([damaged["scores_shard"]], SCORES)
    written = json.loads(layout.done_info(0, "score")["result"])
    with pytest.raises(CorruptShardError, match=str(damaged["rollouts_shard"])):  # training reads rollouts first
        build_update_rows(layout, 0, score_sets_from(written), reward_scale=1.0)
    with pytest.raises(ModelPathError, match=f"{layout.checkpoint_dir(0)} has no weights"):
        load_model(layout.checkpoint_dir(0))


def test_doctor_lists_every_problem_and_exits_non_zero(damaged):
    layout = damaged["layout"]
    result = CliRunner().invoke(app, ["doctor", str(layout.run_dir)])
    assert result.exit_code == 1, result.output
    lines = result.output.strip().splitlines()
    assert lines[0] == f"3 problem(s) in {layout.run_dir}:"
    assert any(line.startswith(f"corrupt-shard {damaged['rollouts_shard']}: ") for line in lines)
    assert any(line.startswith(f"corrupt-shard {damaged['scores_shard']}: ") for line in lines)
    assert any(line.startswith(f"bad-checkpoint {layout.checkpoint_dir(0)}: missing its weights") for line in lines)


def test_quarantine_moves_only_the_broken_and_a_rerun_rebuilds_them(damaged):
    from flows.distill import distill

    layout, before = damaged["layout"], damaged["before"]
    result = CliRunner().invoke(app, ["doctor", str(layout.run_dir), "--quarantine"])
    assert result.exit_code == 0, result.output
    assert "quarantined 3 item(s)" in result.output
    quarantine = layout.quarantine_dir()
    for moved in (damaged["rollouts_shard"], damaged["scores_shard"], layout.checkpoint_dir(0)):
        assert not moved.exists() and (quarantine / moved.relative_to(layout.run_dir)).exists()
    assert _fingerprints(damaged["good"]) == damaged["good"]  # same bytes, same mtimes
    print(f"\nquarantined 3 damaged items; {len(damaged['good'])} good shards kept byte- and mtime-identical")
    assert visible_damage(layout.run_dir) == []
    assert CliRunner().invoke(app, ["doctor", str(layout.run_dir)]).exit_code == 0

    distill(config=damaged["config"])
    assert table_counts(layout.run_dir) == before["counts"]
    assert checkpoint_steps(layout.run_dir) == before["steps"]
    assert read_rollouts(layout, 0).equals(before["rollouts"])  # seeded sampling: the very same rows
    rebuilt = _sorted_scores(layout)
    assert rebuilt.column("rollout_id").equals(before["scores"].column("rollout_id"))
    assert rebuilt.column("logprobs").equals(before["scores"].column("logprobs"))  # same model, same inputs
    assert damaged["weights"].exists() and visible_damage(layout.run_dir) == []
    duplicates = run_query(layout.run_dir, "SELECT count(*) - count(DISTINCT (rollout_id, role, model_hash)) "
                           "FROM scores").fetchall()[0][0]
    assert duplicates == 0


def test_no_flipped_byte_goes_unnoticed(tmp_path):
    """Every third byte of a scores shard flipped in turn: the read names the file or returns the very
    same rows, never different numbers (data pages carry checksums that the reader verifies)."""
    rows = [{"run_id": "r", "iteration": 0, "rollout_id": f"r/{i}", "role": "teacher", "domain": "math",
             "model_id": "/m", "model_hash": "h", "logprobs": [-0.125 * (i + j) for j in range(16)]} for i in range(8)]
    path = write_shard(rows, tmp_path / "part-00000.parquet", SCORES)
    original, expected = path.read_bytes(), read_shards([path], SCORES)
    outcomes = {"error naming the file": 0, "same rows": 0, "silently different rows": 0}
    for position in range(0, len(original), 3):
        flipped = bytearray(original)
        flipped[position] ^= 0x5A
        path.write_bytes(bytes(flipped))
        try:
            same = read_shards([path], SCORES).equals(expected)
        except (CorruptShardError, SchemaMismatchError) as err:
            assert str(path) in str(err)
            outcomes["error naming the file"] += 1
            continue
        outcomes["same rows" if same else "silently different rows"] += 1
    print(f"\n{len(original)}-byte shard, every third byte flipped: {outcomes}")
    assert outcomes["silently different rows"] == 0 and outcomes["error naming the file"] > 0
