"""Checkpoint evaluation on held-out prompts: avg@n accuracy and unbiased pass@k.

1. Sample n responses per test prompt with the rollout engine (same code path as training rollouts).
2. Verify each with its domain's verifier (math-verify, sandboxed code execution).
3. avg@n = mean reward over all samples; pass@k = mean over prompts of 1 - C(n-c, k) / C(n, k).
"""

from __future__ import annotations

import logging
from math import comb

from gopd_core.rollout import SamplingParams
from gopd_core.tasks import verify_batch

log = logging.getLogger(__name__)


def pass_at_k(n: int, correct: int, k: int) -> float:
    """Unbiased pass@k for one prompt with `correct` of `n` samples right (Chen et al. 2021)."""
    if k > n:
        raise ValueError(f"pass@{k} needs at least {k} samples per prompt, got {n}")
    if n - correct < k:
        return 1.0
    return 1.0 - comb(n - correct, k) / comb(n, k)


def score_samples(rollouts: list[dict], prompts_by_id: dict[str, dict]) -> list[float]:
    """Verifier reward (1.0 / 0.0) of each rollout row against its prompt's ground truth."""
    return verify_batch(
        [r["domain"] for r in rollouts],
        [r["response_text"] for r in rollouts],
        [prompts_by_id[r["prompt_id"]]["ground_truth"] for r in rollouts],
    )


def summarize(rollouts: list[dict], rewards: list[float], n_samples: int, k: int) -> dict[str, float]:
    by_prompt: dict[str, list[float]] = {}
    for row, reward in zip(rollouts, rewards):
        by_prompt.setdefault(row["prompt_id"], []).append(reward)
    k = min(k, n_samples)
    return {
        f"avg@{n_samples}": sum(rewards) / max(1, len(rewards)),
        f"pass@{k}": sum(pass_at_k(len(v), int(sum(v)), k) for v in by_prompt.values()) / max(1, len(by_prompt)),
    }


def evaluate_checkpoint(
    engine, benchmarks: dict[str, list[dict]], *, run_id: str, iteration: int | None, checkpoint_id: str,
    n_samples: int = 4, k: int = 4, temperature: float = 0.7, max_new_tokens: int = 48, seed: int = 0,
) -> list[dict]:
    """Rows of the `evals` schema: avg@n and pass@k of the checkpoint `engine` samples from (its caller
    opens and closes it) on each benchmark (name -> prompt rows)."""
    sampling = SamplingParams(temperature=temperature, max_new_tokens=max_new_tokens, n=n_samples, seed=seed)
    rows = []
    for benchmark, prompts in benchmarks.items():
        rollouts = engine.generate(prompts, sampling, run_id=run_id, iteration=iteration or 0)
        rewards = score_samples(rollouts, {p["prompt_id"]: p for p in prompts})
        for metric, value in summarize(rollouts, rewards, n_samples, k).items():
            rows.append({"run_id": run_id, "iteration": iteration, "checkpoint_id": checkpoint_id,
                         "benchmark": benchmark, "metric": metric, "value": value, "n_samples": n_samples})
            log.info("eval %s %s %s = %.3f", checkpoint_id, benchmark, metric, value)
    return rows
