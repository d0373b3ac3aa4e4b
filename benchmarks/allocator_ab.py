"""glibc's malloc vs jemalloc for the same gopd work, alternating fresh processes: `results/allocator.{json,md}`.

    python3 benchmarks/allocator_ab.py [--rounds 2] [--vocab 151936]   # ~12 min on 2 CPU cores

What runs, in a fresh process per (round, allocator), the allocators alternating so that load from
other jobs falls on both:
1. The TRL-comparison step on gopd's side (`field_gkd_gopd.main`: rollout, teacher scoring, update,
   checkpoint; 64 new tokens, batch 8) with both models widened to `--vocab` tokens, with the minor
   page faults and kernel CPU seconds (`getrusage`: zeroing and mapping fresh pages is kernel time) of
   each step, its process CPU seconds, and the process's peak RSS after it.
2. Scoring at the zoo's 259-token vocabulary and at 32000: `perf_scoring.compare_scorers` (ours vs
   the naive pad-to-longest fp32 log_softmax scorer) on the perf zoo's ~100M teacher, perf.py's rows.
"system" is the process without any preload; "jemalloc" is what the `gopd` command re-executes on
(`gopd_core.allocator.preload_environment`: LD_PRELOAD=libjemalloc.so.2 and its MALLOC_CONF).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from gopd_core.allocator import child_environment, find_jemalloc, loaded_allocator  # noqa: E402

RESULTS = REPO / "benchmarks" / "results"
ALLOCATORS = ("system", "jemalloc")  # GOPD_ALLOCATOR values, also the names loaded_allocator reports


def child(vocab: int) -> dict:
    """One process's measurements (runs under whichever allocator its parent preloaded)."""
    import torch

    from benchmarks import field_gkd_gopd
    from benchmarks import perf_common as common
    from benchmarks.field_gkd import ensure_zoo, widen_vocabulary
    from benchmarks.perf_scoring import compare_scorers
    from gopd_core.models import load_model, load_tokenizer, render_prompt

    torch.set_num_threads(2)
    zoo = common.ZOO_DIR.resolve()
    ensure_zoo(zoo)
    tokenizer = load_tokenizer(zoo / common.STUDENT)
    prompt_ids = [render_prompt(tokenizer, row["messages"]) for row in common.zoo_prompts(zoo, 64)]
    out = {"allocator": loaded_allocator(), "malloc_conf": os.environ.get("MALLOC_CONF"), "scoring": {}}
    # the step first: its peak RSS is then the process's peak so far (the naive scorer's comes after)
    widened = widen_vocabulary(zoo, vocab)
    faults = []
    one_step = field_gkd_gopd.one_step

    def counted_step(*args, **kwargs):
        before = resource.getrusage(resource.RUSAGE_SELF)
        try:
            return one_step(*args, **kwargs)
        finally:
            after = resource.getrusage(resource.RUSAGE_SELF)
            faults.append((after.ru_minflt - before.ru_minflt, round(after.ru_stime - before.ru_stime, 2)))

    field_gkd_gopd.one_step = counted_step
    with tempfile.TemporaryDirectory(prefix="allocator-ab-") as scratch:
        step = field_gkd_gopd.main({
            "student": str(widened / "student-base"), "teacher": str(widened / "teacher-math"),
            "prompts": str(zoo / "data" / "math" / "train.parquet"), "batch": 8, "max_new_tokens": 64, "steps": 3,
            "lr": 1e-4, "threads": 2, "seed": 0, "scratch": scratch})
    out["step"] = {"vocab": vocab, "step_s": step["step_s"], "median_step_s": statistics.median(step["step_s"]),
                   "stages_s": [{k: round(v, 2) for k, v in s.items() if k in ("rollout_s", "score_s", "update_s")}
                                for s in step["stages_s"]],
                   "step_cpu_s": [round(x, 2) for x in step["step_cpu_s"]],
                   "page_faults_per_step": [f for f, _ in faults[1:]], "kernel_cpu_s_per_step": [k for _, k in faults[1:]],
                   "peak_rss_mb": step["peak_rss_mb"]}
    for scoring_vocab in (259, 32000):
        model_dir = zoo if scoring_vocab == 259 else widen_vocabulary(zoo, scoring_vocab)
        model = load_model(model_dir / common.TEACHER)
        sequences = common.spread_sequences(prompt_ids, 12, 32, 512, int(model.config.max_position_embeddings) - 1, 259)
        result = compare_scorers(model, sequences, {"fp32_peak": 1.0, "bf16_peak": 1.0}, 8192, 2, 1)
        out["scoring"][str(scoring_vocab)] = {"seconds_per_run": result["seconds_per_run"],
                                              "speedup_vs_naive": result["speedup_vs_naive"]}
        del model
    return out


def run_child(name: str, vocab: int) -> dict:
    env = child_environment(name, {**os.environ, "OMP_NUM_THREADS": "2", "MKL_NUM_THREADS": "2",
                                   "TOKENIZERS_PARALLELISM": "false"})
    load = [round(x, 2) for x in os.getloadavg()]
    done = subprocess.run([sys.executable, str(Path(__file__).resolve()), "--child", "--vocab", str(vocab)],
                          env=env, cwd=REPO, capture_output=True, text=True)
    lines = [line for line in done.stdout.splitlines() if line.startswith("RESULT ")]
    if done.returncode != 0 or not lines:
        raise RuntimeError(f"the {name} process failed (exit {done.returncode}):\n{done.stderr[-3000:]}")
    result = json.loads(lines[-1][len("RESULT "):])
    if result["allocator"] != name:
        raise RuntimeError(f"asked for {name}, the process ran on {result['allocator']}")
    return {**result, "load_before": load}


def markdown(report: dict) -> str:
    lines = ["# glibc malloc vs jemalloc, same gopd work", "",
             f"Command: `{report['command']}` ({report['seconds']} s, started {report['started_utc']}). "
             "Fresh process per row, allocators alternating. Scoring: seconds per run of the naive scorer and "
             "ours on perf.py's 12 teacher rows (~100M teacher). Step: gopd's side of the TRL comparison "
             f"(64 new tokens, batch 8, vocabulary {report['vocab']}), 3 measured steps.", "",
             "| round | malloc | naive / ours s (259) | ours vs naive (259) | naive / ours s (32000) | "
             "ours vs naive (32000) | step s (median) | step CPU s | stages s | page faults per step | "
             "kernel CPU s per step | peak RSS MB |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for row in report["runs"]:
        s259, s32k, step = row["scoring"]["259"], row["scoring"]["32000"], row["step"]
        lines.append(
            f"| {row['round']} | {row['allocator']} | {s259['seconds_per_run']['naive']} / "
            f"{s259['seconds_per_run']['ours']} | {s259['speedup_vs_naive']}x | {s32k['seconds_per_run']['naive']} / "
            f"{s32k['seconds_per_run']['ours']} | {s32k['speedup_vs_naive']}x | {step['median_step_s']:.2f} "
            f"({', '.join(f'{x:.2f}' for x in step['step_s'])}) | {step['step_cpu_s']} | {step['stages_s']} | "
            f"{', '.join(str(f) for f in step['page_faults_per_step'])} | {step['kernel_cpu_s_per_step']} | "
            f"{step['peak_rss_mb']:.0f} |")
    lines += ["", "Medians over rounds:", ""]
    for name, summary in report["summary"].items():
        lines.append(f"- {name}: " + ", ".join(f"{k} {v}" for k, v in summary.items()))
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--vocab", type=int, default=151936, help="vocabulary of the step's models")
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print("RESULT " + json.dumps(child(args.vocab)), flush=True)
        return
    if find_jemalloc() is None:
        raise SystemExit("no libjemalloc.so.2 here: apt-get install libjemalloc2")
    started, runs = time.perf_counter(), []
    started_utc = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    for round_index in range(args.rounds):
        for name in ALLOCATORS if round_index % 2 == 0 else reversed(ALLOCATORS):
            runs.append({"round": round_index, **run_child(name, args.vocab)})
            print(f"[allocator] round {round_index} {name}: step {runs[-1]['step']['median_step_s']:.2f} s, "
                  f"scoring {runs[-1]['scoring']}", flush=True)
    summary = {name: {
        "ours_vs_naive_259": statistics.median(r["scoring"]["259"]["speedup_vs_naive"] for r in mine),
        "ours_vs_naive_32000": statistics.median(r["scoring"]["32000"]["speedup_vs_naive"] for r in mine),
        "step_s": round(statistics.median(r["step"]["median_step_s"] for r in mine), 2),
        "step_cpu_s": round(statistics.median(x for r in mine for x in r["step"]["step_cpu_s"]), 2),
        "kernel_cpu_s_per_step": round(statistics.median(x for r in mine for x in r["step"]["kernel_cpu_s_per_step"]), 2)}
        for name in ALLOCATORS for mine in [[r for r in runs if r["allocator"] == name]]}
    from benchmarks import perf_common as common  # torch loads only in the children until here

    report = {"benchmark": "allocator_ab", "command": common.invocation("benchmarks/allocator_ab.py"),
              "started_utc": started_utc, "seconds": round(time.perf_counter() - started), "vocab": args.vocab,
              "runs": runs, "summary": summary}
    common.write_results(args.out, "allocator", report, markdown(report))


if __name__ == "__main__":
    main()
