"""Benchmarks run end to end: paper claims on the tiny zoo (slow: about 4 minutes on 2 cores), GPU stages smoke."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from tiny import build_world

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_paper_claims_quick_run_writes_every_output(tmp_path):
    work = tmp_path / "claims"
    command = [sys.executable, str(ROOT / "benchmarks" / "paper_claims.py"), "--quick", "--work", str(work)]
    subprocess.run(command, check=True, cwd=ROOT, timeout=1200)
    payload = json.loads((work / "paper_claims.json").read_text())
    methods = {(row["setting"], row["method"]) for row in payload["results"]}
    # every setting ran its methods (reward correction only in strong-to-weak) and the zoo models were evaluated
    assert ("strong-to-weak", "ExOPD+RC lam=1.25") in methods and ("same-size", "SFT on teacher samples") in methods
    assert not any(m.startswith("ExOPD+RC") for s, m in methods if s != "strong-to-weak")
    assert ("models", "teacher-code") in methods
    assert [claim["claim"] for claim in payload["claims"]] == [1, 2, 3]
    assert all(row["cost"]["job_wall_s"] > 0 for row in payload["results"])
    assert "## Verdicts" in (work / "paper_claims.md").read_text()
    assert (work / "paper_claims.png").stat().st_size > 10_000
    # a rerun resumes: every job is already done, nothing runs again
    rerun = subprocess.run(command, check=True, cwd=ROOT, timeout=600, capture_output=True, text=True)
    assert "0 to run" in rerun.stdout


def test_gpu_stages_benchmark_smoke_runs_every_stage_on_the_cpu(tmp_path):
    # the script the GPU machines run (benchmarks/perf_gpu_stages.py), checked here on the CPU in seconds
    out = tmp_path / "stages.json"
    subprocess.run([sys.executable, str(ROOT / "benchmarks" / "perf_gpu_stages.py"), "--smoke", "--zoo",
                    str(tmp_path / "zoo"), "--json", str(out), "--md", str(tmp_path / "stages.md")],
                   check=True, cwd=ROOT, timeout=600, capture_output=True)
    payload = json.loads(out.read_text())
    assert [run["precision"] for run in payload["stages"]] == ["auto", "float32"]
    for run in payload["stages"]:
        (iteration,) = run["iterations"]
        assert iteration["sequences"] == 2 and iteration["evals_written"] and iteration["update_processed_tok_s"] > 0
    assert set(payload["rollout"]) == {"student-base", "teacher-math"}
    assert "| float32 | 0 |" in (tmp_path / "stages.md").read_text()


def test_field_step_profile_splits_scoring_and_update_into_matmuls_and_the_rest(tmp_path):
    # gopd's side of benchmarks/field_gkd.py on tiny models: its extra profiled step reports, per stage, the
    # matmuls' seconds and every other op's, all within the stage's wall. With field_gkd's matched
    # `checkpoint_every` (no checkpoint in the measured steps, as TRL) only the last update, the profiled one, writes
    from benchmarks.field_gkd import MATCHED_CHECKPOINT_EVERY

    world = build_world(tmp_path / "world")
    settings = {"student": str(world.models["student"]), "teacher": str(world.models["teacher_math"]),
                "prompts": str(world.data["train"][0]), "batch": 2, "max_new_tokens": 4, "steps": 1, "lr": 1e-4,
                "threads": 2, "seed": 0, "scratch": str(tmp_path), "profile_step": True,
                "checkpoint_every": MATCHED_CHECKPOINT_EVERY}
    (tmp_path / "settings.json").write_text(json.dumps(settings))
    done = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "field_gkd_gopd.py"), str(tmp_path / "settings.json")],
                          check=True, cwd=ROOT, timeout=600, capture_output=True, text=True)
    result = json.loads(next(line for line in done.stdout.splitlines() if line.startswith("RESULT "))[len("RESULT "):])
    assert len(result["step_s"]) == 1  # the profiled step is not among the measured ones
    assert result["checkpoints_written"] == [2]  # warm-up 0 and measured 1 kept theirs in memory
    assert set(result["profile"]) == {"score", "update"}
    for stage in result["profile"].values():
        assert stage["matmul_s"] > 0 and stage["other_ops_s"] > 0
        assert stage["matmul_s"] + stage["other_ops_s"] <= stage["wall_s"]
        seconds = [s for _, s in stage["top_other_ops"]]
        assert seconds == sorted(seconds, reverse=True) and "aten::mm" not in dict(stage["top_other_ops"])


def test_field_profile_text_bounds_a_step_with_nothing_but_matmuls():
    # two rounds: score walls 0.5 / 0.3 s (mean 0.4), matmuls 0.3 / 0.1 (0.2), other ops 0.1 each -> 0.1 s outside
    # any op; update 0.6 = 0.3 + 0.2 + 0.1. With a 0.3 s rollout a matmul-only step takes 0.3 + 0.2 + 0.3 = 0.8 s,
    # and TRL's faster step (1.8 s on gopd's malloc) is 1.8 / 0.8 = 2.25x that
    from benchmarks.perf_report import _field_profile

    def stage(wall, matmul, other, top):
        return {"wall_s": wall, "matmul_s": matmul, "other_ops_s": other, "top_other_ops": top}

    profiles = [{"score": stage(0.5, 0.3, 0.1, [["aten::mul", 0.06]]), "update": stage(0.6, 0.3, 0.2, [["aten::copy_", 0.1]])},
                {"score": stage(0.3, 0.1, 0.1, [["aten::mul", 0.02]]), "update": stage(0.6, 0.3, 0.2, [["aten::copy_", 0.1]])}]
    result = {"gopd": {"profiles": profiles}, "trl": {"median_step_s": 2.0}, "trl_gopd_allocator": {"median_step_s": 1.8}}
    text = _field_profile(result, rollout_s=0.3)
    assert "score 0.40 s = matmuls 0.20 s + other ops 0.10 s (largest: `aten::mul` 40 ms) + outside any op 0.10 s" in text
    assert "update 0.60 s = matmuls 0.30 s + other ops 0.20 s (largest: `aten::copy_` 100 ms)" in text
    assert "would take 0.80 s a step" in text and "2.25x TRL's faster step" in text
    assert _field_profile({"gopd": {}, "trl": {"median_step_s": 2.0}}, rollout_s=0.3) == ""


def test_field_rows_give_gopd_writing_a_checkpoint_every_step_beside_the_matched_step():
    from benchmarks.perf_report import _every_step_cell, _every_step_text

    result = {"speedup_checkpoint_every_step": 2.2, "speedup_same_allocator_checkpoint_every_step": 1.95,
              "gopd_checkpoint_every_step": {"median_step_s": 1.234}}
    assert _every_step_cell(result) == "1.23 (1.95x)"  # the smaller of the two speedups
    assert "1.23 s, 1.95x vs TRL's faster step" in _every_step_text(result)
    assert _every_step_cell({}) == "n/a" and "not measured" in _every_step_text({})


def test_tokenizer_reads_benchmark_counts_a_runs_calls_and_reads(tmp_path):
    subprocess.run([sys.executable, str(ROOT / "benchmarks" / "tokenizer_reads.py"), "--vocab", "2000", "--iterations",
                    "1", "--out", str(tmp_path)], check=True, cwd=ROOT, timeout=600, capture_output=True)
    result = json.loads((tmp_path / "tokenizer_reads.json").read_text())
    run = result["run"]
    # the run reads each tokenizer it touches (student, teachers, checkpoints) at most once per content, while
    # its stages ask for one far more often
    assert 0 < run["reads_from_disk"] <= run["distinct_directories"] < run["load_tokenizer_calls"]
    assert len(result["read_s"]) == 3 and result["read_s_median"] > 0
    assert "reads from disk" in (tmp_path / "tokenizer_reads.md").read_text()
