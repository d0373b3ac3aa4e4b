"""Concurrency: SQL readers never see a partial shard and never hold up a writer; a second flow on a
run id is refused while the first holds it, and a killed flow leaves no stale lock.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import time

import pyarrow as pa
import pytest
from harness import ROOT, kill_group, make_config, start_flow

from storage.layout import RunLayout, RunLockedError
from storage.parquet import write_shard
from storage.schemas import ROLLOUTS

SHARD_ROWS = 256
SHARDS = 100

READER_SCRIPT = textwrap.dedent("""
    import json, os, sys, time
    from storage.catalog import run_query
    run_dir, results, stop = sys.argv[1], sys.argv[2], sys.argv[3]
    query = "SELECT split_part(rollout_id, '/', 2) AS shard, count(*) AS n FROM rollouts GROUP BY ALL"
    with open(results, "w") as out:
        while not os.path.exists(stop):
            started = time.perf_counter()
            try:
                counts = sorted(n for _, n in run_query(run_dir, query).fetchall())
                out.write(json.dumps({"counts": counts, "s": time.perf_counter() - started}) + "\\n")
            except Exception as err:
                out.write(json.dumps({"error": f"{type(err).__name__}: {err}"}) + "\\n")
            out.flush()
""")


def _shard(run_id: str, shard: int) -> pa.Table:
    rows = [{
        "run_id": run_id, "iteration": 0, "rollout_id": f"{run_id}/{shard}/{i}", "prompt_id": f"p{i}",
        "domain": "math", "sample_index": 0, "checkpoint_id": "init", "engine": "hf",
        "prompt_token_ids": list(range(64)), "response_token_ids": list(range(i % 97, i % 97 + 48)),
        "rollout_logprobs": [-0.25 - 0.001 * j for j in range(48)], "prompt_text": "q" * 64,
        "response_text": "a" * 48, "finish_reason": "length", "reward": float(i % 2),
    } for i in range(SHARD_ROWS)]
    return pa.Table.from_pylist(rows, schema=ROLLOUTS)


def _write_all(layout: RunLayout, tables: list[pa.Table]) -> float:
    started = time.perf_counter()
    for k, table in enumerate(tables):
        write_shard(table, layout.rollouts_dir(0) / f"part-{k:05d}.parquet", ROLLOUTS)
    return time.perf_counter() - started


def test_sql_readers_see_only_whole_shards_and_do_not_slow_the_writer(tmp_path):
    tables = [_shard("r", k) for k in range(SHARDS)]
    alone = [_write_all(RunLayout(tmp_path / "alone-1"), tables)]

    watched = RunLayout(tmp_path / "watched")
    watched.run_dir.mkdir()
    results, stop = tmp_path / "reader.jsonl", tmp_path / "stop"
    reader = subprocess.Popen([sys.executable, "-c", READER_SCRIPT, str(watched.run_dir), str(results), str(stop)],
                              cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)}, start_new_session=True)
    try:
        deadline = time.time() + 120
        while time.time() < deadline and not (results.exists() and results.read_text().count("\n") >= 3):
            time.sleep(0.05)  # the reader is warm and querying before the writer starts
        with_readers = _write_all(watched, tables)
        time.sleep(0.5)  # a few queries of the finished run too
        stop.touch()
        reader.wait(timeout=60)
    finally:
        kill_group(reader)
    alone.append(_write_all(RunLayout(tmp_path / "alone-2"), tables))

    queries = [json.loads(line) for line in results.read_text().splitlines()]
    errors = [q["error"] for q in queries if "error" in q]
    assert errors == []
    assert all(q["counts"] == [SHARD_ROWS] * len(q["counts"]) for q in queries), "a query saw part of a shard"
    seen = [len(q["counts"]) for q in queries]
    assert seen == sorted(seen), "a query saw fewer shards than an earlier one"
    assert any(0 < n < SHARDS for n in seen), f"no query ran while the writer was appending: {seen}"
    assert seen[-1] == SHARDS
    slowdown = with_readers / (sum(alone) / len(alone))
    print(f"\nwriter: {SHARDS} shards x {SHARD_ROWS} rows alone {alone[0]:.2f}/{alone[1]:.2f} s, with a reader "
          f"{with_readers:.2f} s (x{slowdown:.2f}); reader: {len(queries)} queries, "
          f"{sum(0 < n < SHARDS for n in seen)} during the writes, 0 partial, 0 errors")
    assert slowdown < 3.0


def test_a_second_flow_on_the_same_run_is_refused(tiny_world, prefect_api_url, tmp_path):
    from flows.distill import distill

    # iterations enough that the first flow still holds the run when the second one asks (it is killed after):
    # the 2-iteration tiny run could end in the moment between the two
    config = make_config(tiny_world, "shared", root=tmp_path / "runs", iterations=40)
    layout = RunLayout.under(config["storage_root"], "shared")
    first = start_flow(config, prefect_api_url, tmp_path / "first.log")
    try:
        lock = layout.run_dir / ".lock"
        deadline = time.time() + 300
        while time.time() < deadline and first.poll() is None and not (
                lock.exists() and lock.read_text() == str(first.pid)):
            time.sleep(0.05)
        assert first.poll() is None, (tmp_path / "first.log").read_text()[-3000:]
        with pytest.raises(RunLockedError, match=f"run {layout.run_dir} is in use by another process"):
            distill(config=config)
        assert first.poll() is None  # the first flow is still running, undisturbed
    finally:
        kill_group(first)
    with layout.lock():  # the killed holder's lock died with it: the run id is free again
        pass
    with layout.lock(), pytest.raises(RunLockedError):  # ... and the lock still excludes
        with RunLayout(layout.run_dir).lock():
            pass
