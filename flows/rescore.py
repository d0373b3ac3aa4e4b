"""The `rescore` flow: score a run's stored rollouts with another reference or teacher, sampling nothing.

New score sets sit beside the old ones (keyed by role and model content hash), so the
`token_advantages` view can compare references and lam values over the same rollouts.
"""

from __future__ import annotations

from pathlib import Path

from prefect import flow, task

from flows.distill import TASK_POLICY
from gopd_core import pipeline
from storage.layout import RunLayout
from storage.parquet import list_shards


@task(**TASK_POLICY)
def rescore_iteration(layout: RunLayout, iteration: int, scorer: pipeline.Scorer, student: Path,
                      token_budget: int, chunk_rows: int, device: str) -> dict[str, str]:
    return pipeline.score_stage(layout, iteration, [scorer], student_tokenizer=student, token_budget=token_budget,
                                chunk_rows=chunk_rows, device=device)


def stored_iterations(layout: RunLayout) -> list[int]:
    iterations = sorted({int(p.parent.name.split("=")[1]) for p in list_shards(layout.table_dir("rollouts"))})
    if not iterations:
        raise FileNotFoundError(f"run {layout.run_dir} has no stored rollouts to rescore")
    return iterations


@flow(name="rescore", log_prints=True)
def rescore(run_dir: str, model: str, role: str = "reference", domain: str | None = None,
            iterations: list[int] | None = None) -> dict[int, dict[str, str]]:
    """Score every (or the given) iteration's rollouts of `run_dir` with `model` in `role`.

    role: 'reference' or 'teacher-base' (a new reference), or 'teacher' (with `domain` for one domain).
    """
    if role not in ("reference", "teacher-base", "teacher", "context-teacher"):
        raise ValueError(f"role {role!r}: use reference, teacher-base, teacher or context-teacher")
    layout = RunLayout(Path(run_dir))
    config = pipeline.read_run_config(layout)
    scorer = pipeline.Scorer(role, Path(model), domain, "ground_truth" if role == "context-teacher" else None)
    written = {}
    with layout.lock(), pipeline.keep_models_loaded(config.resident_models):  # one load for all iterations
        for iteration in iterations if iterations is not None else stored_iterations(layout):
            written[iteration] = rescore_iteration(layout, iteration, scorer, Path(config.models.student),
                                                   config.score_token_budget, config.score_chunk_rows, config.device)
    return written
