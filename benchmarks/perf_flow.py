"""Orchestration overhead of the `distill` flow: wall time outside rollout/score/update/evaluate.

1. In a fresh process (Prefect's ephemeral server starts as it would for `gopd run`), run the flow
   on the perf zoo (student ~25M, math/code teachers ~100M) and time the whole call.
2. Every stage records its own `wall_s` in `_stages/iteration=N/<stage>.json`, written when it ends,
   so each stage's start is the marker's mtime minus wall_s.
3. Iteration k's window runs from the start of its rollout to the start of the next rollout (the
   last one: to the end of the flow); its overhead share is (window - stage time inside) / window.
   Flow start-up (Prefect server, `prepare`) and the evaluation before training are reported apart.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.perf_common import REPO, load_average  # noqa: E402

STAGES = ("rollout", "score", "update", "evaluate")


def flow_config(zoo: Path, root: Path, iterations: int, prompts: int, n: int, max_new_tokens: int) -> dict:
    data = zoo / "data"
    return {
        "run_id": "perf-flow", "storage_root": str(root), "iterations": iterations,
        "models": {"student": str(zoo / "student-base"),
                   "teachers": {"math": str(zoo / "teacher-math"), "code": str(zoo / "teacher-code")}},
        "sampling": {"temperature": 1.0, "max_new_tokens": max_new_tokens, "n": n},
        "update": {"reward_scale": 1.0, "lr": 1e-4},  # one minibatch, the default
        "data": {"train": [str(data / "math" / "train.parquet"), str(data / "code" / "train.parquet")],
                 "test": [str(data / "math" / "test.parquet"), str(data / "code" / "test.parquet")],
                 "prompts_per_iteration": prompts, "eval_prompts": 4},
        "eval": {"every": 1, "n_samples": 2, "k": 2, "temperature": 0.7},
    }


def stage_intervals(run_dir: Path) -> list[dict]:
    """(iteration, stage, start, end, wall_s) of every completed stage, from the markers."""
    intervals = []
    for marker in sorted((run_dir / "_stages").glob("iteration=*/*.json")):
        wall = float(json.loads(marker.read_text())["wall_s"])
        end = marker.stat().st_mtime
        intervals.append({"iteration": int(marker.parent.name.split("=")[1]), "stage": marker.stem,
                          "start": end - wall, "end": end, "wall_s": wall})
    return sorted(intervals, key=lambda s: s["start"])


def overhead_shares(intervals: list[dict], flow_start: float, flow_end: float) -> dict:
    """Per-iteration windows (rollout start to next rollout start) and the share outside stages."""
    rollouts = [s for s in intervals if s["stage"] == "rollout"]
    windows = []
    for k, rollout in enumerate(rollouts):
        end = rollouts[k + 1]["start"] if k + 1 < len(rollouts) else flow_end
        inside = [s for s in intervals if rollout["start"] <= s["start"] < end]
        staged = sum(s["wall_s"] for s in inside)
        windows.append({"iteration": rollout["iteration"], "wall_s": round(end - rollout["start"], 2),
                        "stage_s": {s["stage"]: round(s["wall_s"], 2) for s in inside},
                        "outside_stages_s": round(end - rollout["start"] - staged, 2),
                        "outside_share": round((end - rollout["start"] - staged) / (end - rollout["start"]), 4)})
    total_staged = sum(s["wall_s"] for s in intervals)
    first = intervals[0]["start"] if intervals else flow_end
    return {"iterations": windows, "flow_wall_s": round(flow_end - flow_start, 2),
            "startup_s": round(first - flow_start, 2),
            "flow_outside_share": round((flow_end - flow_start - total_staged) / (flow_end - flow_start), 4),
            "steady_outside_share_max": max((w["outside_share"] for w in windows), default=None)}


def _child(zoo: Path, iterations: int, prompts: int, n: int, max_new_tokens: int, overrides: dict) -> dict:
    from flows.distill import distill
    from gopd_core.config import set_dotted
    from gopd_core.report import write_report
    from storage.layout import RunLayout

    with tempfile.TemporaryDirectory() as tmp:
        config = flow_config(zoo, Path(tmp), iterations, prompts, n, max_new_tokens)
        for key, value in overrides.items():
            set_dotted(config, key, value)
        before = load_average()
        started = time.time()
        run_dir = Path(distill(config=config))
        ended = time.time()
        shares = overhead_shares(stage_intervals(run_dir), started, ended)
        report_started = time.perf_counter()
        write_report(RunLayout.under(tmp, "perf-flow"))
        shares["write_report_warm_s"] = round(time.perf_counter() - report_started, 3)
    return {"config": {k: config[k] for k in ("iterations", "sampling", "update")} | {
        "prompts_per_iteration": prompts, "eval": config["eval"], "eval_prompts": 4} | overrides,
        **shares, "load_before": before, "load_after": load_average()}


def flow_overhead(zoo: Path, iterations: int, prompts: int, n: int, max_new_tokens: int,
                  overrides: dict | None = None) -> dict:
    """Run the flow (config keys changed by `overrides`, dotted) in a fresh process; return its overhead report."""
    command = [sys.executable, str(Path(__file__).resolve()), str(zoo), str(iterations), str(prompts), str(n),
               str(max_new_tokens), "--overrides", json.dumps(overrides or {})]
    done = subprocess.run(command, capture_output=True, text=True, cwd=REPO)
    if done.returncode != 0:
        raise RuntimeError(f"distill flow benchmark failed:\n{done.stderr[-4000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def vllm_engine_reuse(zoo: Path, iterations: int, prompts: int, max_new_tokens: int) -> dict:
    """The flow with `backend: vllm` and no evaluation, once with `keep_engine` false (an engine per
    rollout stage) and once true (one engine per run, `load_weights` per checkpoint): rollout stage seconds."""
    out = {}
    for keep in (False, True):
        run = flow_overhead(zoo, iterations, prompts, 1, max_new_tokens,
                            {"backend": "vllm", "keep_engine": keep, "data.test": []})
        out[f"keep_engine={str(keep).lower()}"] = {
            "rollout_s": [w["stage_s"]["rollout"] for w in run["iterations"]],
            "iteration_s": [w["wall_s"] for w in run["iterations"]], "flow_wall_s": run["flow_wall_s"],
            "load_before": run["load_before"], "load_after": run["load_after"]}
    out["config"] = {"iterations": iterations, "prompts_per_iteration": prompts, "n": 1,
                     "max_new_tokens": max_new_tokens, "backend": "vllm", "evaluation": "none"}
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description="time the distill flow and its overhead (used by perf.py)")
    parser.add_argument("zoo", type=Path)
    for name in ("iterations", "prompts", "n", "max_new_tokens"):
        parser.add_argument(name, type=int)
    parser.add_argument("--overrides", type=json.loads, default={}, help="dotted config keys to change (JSON)")
    args = parser.parse_args()
    print(json.dumps(_child(args.zoo, args.iterations, args.prompts, args.n, args.max_new_tokens, args.overrides)))


if __name__ == "__main__":
    main()
