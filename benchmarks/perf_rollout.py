"""Rollout and update throughput for `benchmarks/perf.py`.

1. `engine_rollouts` times `engine.generate` (the rollout stage's call) at several batch sizes:
   `batch` prompts, one sample each, a fixed response budget; generated tokens / wall seconds.
2. `update_throughput` builds a run store with synthetic rollouts and score sets, runs the real
   `update_policy` on them, and reports tokens/s and FLOP utilisation 6 x params x tokens / s / peak
   (tokens: the non-padding input tokens each micro-batch runs forward and backward).
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path

import numpy as np

from benchmarks.perf_common import load_average, rollout_rows, timed_with_peak
from gopd_core.rollout import SamplingParams
from gopd_core.training import ScoreSets, update_policy
from storage.layout import RunLayout
from storage.parquet import write_shard
from storage.schemas import ROLLOUTS, SCORES


def engine_rollouts(engine, prompts: list[dict], batch_sizes: list[int], max_new_tokens: int) -> list[dict]:
    """Generated tokens/s of `engine` per batch size (warm engine, one timed call per size)."""
    engine.generate(prompts[:1], SamplingParams(max_new_tokens=4), "perf", 0)  # warm-up
    results = []
    for batch in batch_sizes:
        sampling = SamplingParams(temperature=1.0, max_new_tokens=max_new_tokens, n=1, seed=batch)
        before = load_average()
        started = time.perf_counter()
        rows = engine.generate(prompts[:batch], sampling, "perf", 0)
        seconds = time.perf_counter() - started
        tokens = sum(len(row["response_token_ids"]) for row in rows)
        results.append({"batch": batch, "generated_tokens": tokens, "seconds": round(seconds, 3),
                        "tokens_per_s": round(tokens / seconds, 1), "load_before": before, "load_after": load_average()})
    return results


def _synthetic_run(root: Path, sequences: list[tuple[list[int], list[int]]]) -> tuple[RunLayout, ScoreSets]:
    """A run store with one rollouts shard and student/teacher score sets (values made up, shapes real)."""
    layout = RunLayout.under(root, "perf-update")
    rng = np.random.default_rng(0)
    rows = rollout_rows("perf-update", sequences, [(-rng.random(len(r)) * 5).tolist() for _, r in sequences])
    write_shard(rows, layout.rollouts_dir(0) / "part-00000.parquet", ROLLOUTS)
    for role in ("student", "teacher"):
        scores = [{"run_id": "perf-update", "iteration": 0, "rollout_id": row["rollout_id"], "role": role,
                   "domain": None, "model_id": "perf", "model_hash": role,
                   "logprobs": (np.asarray(row["rollout_logprobs"]) - (role == "teacher") * rng.random()).tolist()}
                  for row in rows]
        write_shard(scores, layout.scores_dir(0, role, role) / "part-00000.parquet", SCORES)
    return layout, ScoreSets(student=("student", "student"), teachers={"default": ("teacher", "teacher")})


def update_throughput(model_path: Path, sequences: list[tuple[list[int], list[int]]], parameters: int,
                      peaks: dict[str, float], minibatches: int, micro_token_budget: int) -> dict:
    """Run `update_policy` on `sequences` (one iteration) and report its per-step throughput."""
    processed = sum(len(prompt) + len(response) for prompt, response in sequences)
    with tempfile.TemporaryDirectory() as tmp:
        layout, score_sets = _synthetic_run(Path(tmp), sequences)
        before = load_average()
        stage_seconds, adjacent, (_, steps) = timed_with_peak(lambda: update_policy(
            layout, 0, model_path, score_sets, reward_scale=1.0, minibatches=minibatches,
            micro_token_budget=micro_token_budget, progress=False))
    step_seconds = sum(step["wall_s"] for step in steps)
    flops = 6 * parameters * processed / step_seconds / 1e9
    return {
        "parameters": parameters, "rows": len(sequences), "processed_tokens": processed,
        "response_tokens": sum(step["tokens"] for step in steps), "optimizer_steps": len(steps),
        "micro_token_budget": micro_token_budget, "step_seconds": round(step_seconds, 2),
        "stage_seconds_with_load_and_save": round(stage_seconds, 2),
        "processed_tokens_per_s": round(processed / step_seconds, 1),
        "response_tokens_per_s": round(sum(step["tokens"] for step in steps) / step_seconds, 1),
        "model_gflops": round(flops, 2), **{f"mfu_vs_{name}": round(flops / peak, 4) for name, peak in peaks.items()},
        "adjacent_fp32_peak": adjacent, "mfu_vs_adjacent_fp32_peak": round(flops / adjacent, 4),
        "load_before": before, "load_after": load_average(),
    }
