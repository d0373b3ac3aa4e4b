"""Benchmarks run end to end: paper claims on the tiny zoo (slow: about 4 minutes on 2 cores), GPU stages smoke."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

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
