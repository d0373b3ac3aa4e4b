"""The `distill` flow: per iteration rollout -> score -> update -> evaluate, resumable by run id."""

from __future__ import annotations

import functools
import json
from pathlib import Path

from prefect import flow, task
from prefect.cache_policies import NO_CACHE

from flows.artifacts import publish_iteration_artifacts
from gopd_core import pipeline
from gopd_core.config import RunConfig, load_config, parse_config
from gopd_core.report import write_report
from gopd_core.rollout import SamplingParams
from storage.layout import RunLayout

TASK_POLICY = {"retries": 1, "retry_delay_seconds": 2, "cache_policy": NO_CACHE}


@task(**TASK_POLICY)
def prepare(config: RunConfig) -> RunLayout:
    return pipeline.prepare_run(config)


@task(**TASK_POLICY)
def rollout(layout: RunLayout, iteration: int, checkpoint: Path, config: RunConfig) -> str:
    sampling = SamplingParams(config.sampling.temperature, config.sampling.top_p, config.sampling.max_new_tokens,
                              config.sampling.n, config.seed)
    return pipeline.run_once(layout, iteration, "rollout", lambda: pipeline.rollout_stage(
        layout, iteration, checkpoint, prompts_per_iteration=config.data.prompts_per_iteration,
        sampling=sampling, backend=config.backend, seed=config.seed, device=config.device,
        sampler_by_domain=pipeline.rollout_samplers(config, layout),
        verify_rewards=config.sampling.verify_rewards, keep_engine=config.keep_engine))


@task(**TASK_POLICY)
def score(layout: RunLayout, iteration: int, checkpoint: Path, config: RunConfig) -> dict[str, str]:
    scorers = pipeline.plan_scorers(config, checkpoint, pipeline.train_domains(layout))
    return pipeline.run_once(layout, iteration, "score", lambda: pipeline.score_stage(
        layout, iteration, scorers, student_tokenizer=Path(config.models.student),
        token_budget=config.score_token_budget, chunk_rows=config.score_chunk_rows, device=config.device),
        encode=json.dumps, decode=json.loads)


@task(**TASK_POLICY)
def update(layout: RunLayout, iteration: int, checkpoint: Path, written: dict[str, str], config: RunConfig) -> Path:
    return pipeline.run_once(layout, iteration, "update", lambda: pipeline.update_stage(
        layout, iteration, checkpoint, written, config), decode=Path, complete=pipeline.update_complete(layout, iteration),
        redo=functools.partial(pipeline.forget_stages_built_on, layout, iteration))


@task(**TASK_POLICY)
def evaluate(layout: RunLayout, checkpoint: Path, updates_done: int, config: RunConfig) -> str:
    return pipeline.run_once(layout, updates_done, "evaluate", lambda: pipeline.evaluate_stage(
        layout, checkpoint, updates_done, **pipeline.eval_settings(config)))


@task(**TASK_POLICY)
def report(layout: RunLayout, iteration: int, plot: bool) -> str:
    summary = write_report(layout, plot=plot)  # plotting costs seconds: only after the last iteration
    publish_iteration_artifacts(layout, iteration)
    return str(summary)


@flow(name="distill", log_prints=True)
def distill(config_path: str | None = None, config: dict | None = None, overrides: dict | None = None) -> str:
    """Distil the student from its teachers for `iterations` iterations; returns the run directory.

    Re-running with the same run id resumes after the last completed stage.
    """
    run_config = load_config(config_path, overrides) if config_path else parse_config(config or {}, "config")
    layout = RunLayout.under(run_config.storage_root, run_config.run_id)
    with layout.lock(), pipeline.keep_models_loaded(run_config.resident_models):
        layout = prepare(run_config)
        checkpoint = Path(run_config.models.student)
        if pipeline.should_evaluate(run_config, 0):
            evaluate(layout, checkpoint, 0, run_config)
        for iteration in range(run_config.iterations):
            rollout(layout, iteration, checkpoint, run_config)
            written = score(layout, iteration, checkpoint, run_config)
            checkpoint = update(layout, iteration, checkpoint, written, run_config)
            if pipeline.should_evaluate(run_config, iteration + 1):
                evaluate(layout, checkpoint, iteration + 1, run_config)
            report(layout, iteration, plot=iteration == run_config.iterations - 1)
    return str(layout.run_dir)
