"""The `evaluate` flow: evaluate checkpoints on test prompts (avg@n, pass@k) into a run's evals table."""

from __future__ import annotations

from pathlib import Path

from prefect import flow, task

from flows.distill import TASK_POLICY
from gopd_core import pipeline
from storage.layout import RunLayout


@task(**TASK_POLICY)
def evaluate_checkpoint(layout: RunLayout, checkpoint: Path, settings: dict) -> str:
    return str(pipeline.evaluate_stage(layout, checkpoint, None, **settings))


@flow(name="evaluate", log_prints=True)
def evaluate(checkpoints: list[str], run_dir: str, test_data: list[str] | None = None, n_samples: int = 4,
             k: int = 4, temperature: float = 0.7, max_new_tokens: int = 48, eval_prompts: int = 64,
             backend: str = "hf", seed: int = 0, device: str = "cpu") -> list[str]:
    """Evaluate each checkpoint (HF dir) on `run_dir`'s test prompts, or on `test_data` files (which then
    become the test split of `run_dir`, an evaluation-only run); returns the evals shards written."""
    layout = RunLayout(Path(run_dir))
    settings = {"n_samples": n_samples, "k": k, "temperature": temperature, "max_new_tokens": max_new_tokens,
                "eval_prompts": eval_prompts, "backend": backend, "seed": seed, "device": device}
    with layout.lock(), pipeline.keep_models_loaded(1):  # one vLLM engine reloads each checkpoint in turn
        if test_data:
            pipeline.store_test_prompts(layout, [Path(p) for p in test_data])
        return [evaluate_checkpoint(layout, Path(c), settings) for c in checkpoints]
