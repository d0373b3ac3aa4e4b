"""The stages of one G-OPD iteration as plain functions (no Prefect): each writes to the store and
returns where. The Prefect flows in `flows/` wrap these one-to-one.

    prepare_run -> rollout_stage -> score_stage -> update_stage -> evaluate_stage
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
from transformers import AutoConfig

from gopd_core.config import ConfigError, RunConfig, save_config
from gopd_core.evaluation import evaluate_checkpoint, score_samples
from gopd_core.models import (
    check_same_vocab,
    has_dropout,
    keep_models_loaded,  # noqa: F401  (re-exported: the flows enter pipeline.keep_models_loaded)
    load_tokenizer,
    model_hash,
    pending_weights_hash,
    render_prompt,
    resident_models,
)
from gopd_core.rollout import SamplingParams, check_prompt_lengths, open_engine
from gopd_core.training import (
    LossSettings,
    OptimizerSettings,
    ScoreSets,
    checkpoint_complete,
    checkpoint_not_kept,
    update_policy,
)
from storage.datasets import load_prompts
from storage.layout import RunLayout
from storage.parquet import write_shard
from storage.readers import read_prompts, rollout_shards
from storage.schemas import EVALS, PROMPTS, ROLLOUTS, UPDATES

log = logging.getLogger(__name__)

# config keys a resumed run may change: they do not change what is computed
RESUMABLE_CHANGES = frozenset({"iterations", "resident_models", "keep_engine", "checkpoint_every"})


@dataclass(frozen=True)
class Scorer:
    """One scoring pass: `model` scores the rollouts of `domain` (None = all) in `role`."""

    role: str
    model: Path
    domain: str | None = None
    context: str | None = None


def check_run(config: RunConfig) -> dict[str, pa.Table]:
    """Everything about a run that can be refused before a byte is written; returns prompts by split.

    Model and dataset paths exist, every dataset loads, every prompt domain has a teacher, every
    scorer shares the student's vocabulary, and every prompt plus `max_new_tokens` fits the
    student's context window. A bad input found mid-run would leave rows behind.
    """
    config.check_paths()
    prompts = {split: pa.concat_tables([load_prompts(p) for p in paths])
               for split, paths in (("train", config.data.train), ("test", config.data.test)) if paths}
    domains = sorted(set(prompts["train"].column("domain").to_pylist()))  # test-only domains need no teacher
    scorers = {Path(config.models.teacher_for(d)): f"teacher of domain {d!r}" for d in domains}  # raises if none
    scorers.setdefault(Path(config.models.reference_path()), "reference")
    student = load_tokenizer(config.models.student)
    for path, role in scorers.items():
        check_same_vocab(student, load_tokenizer(path), f"{role} model {path}")
    _check_prompt_lengths(student, config, prompts)
    return prompts


def _check_prompt_lengths(tokenizer, config: RunConfig, prompts: dict[str, pa.Table]) -> None:
    context = getattr(AutoConfig.from_pretrained(str(config.models.student)), "max_position_embeddings", None)
    if context is None:
        return
    for split, table in prompts.items():
        rows = table.select(["prompt_id", "messages"]).to_pylist()
        check_prompt_lengths(rows, [render_prompt(tokenizer, r["messages"]) for r in rows], int(context),
                             config.sampling.max_new_tokens,
                             hint=f"shorten the {split} prompt or lower sampling.max_new_tokens")


def prepare_run(config: RunConfig) -> RunLayout:
    """Create the run directory: validated config as JSON, prompt datasets copied into the store."""
    prompts = check_run(config)
    layout = RunLayout.under(config.storage_root, config.run_id)
    layout.run_dir.mkdir(parents=True, exist_ok=True)
    if layout.config_path.exists():
        _check_same_run(json.loads(layout.config_path.read_text()), json.loads(config.model_dump_json()), layout)
    save_config(config, layout.config_path)
    for split, table in prompts.items():
        if not layout.prompts_path(split).exists():  # a resumed run keeps its stored prompts
            write_shard(table, layout.prompts_path(split), PROMPTS)
    return layout


def _check_same_run(stored: dict, current: dict, layout: RunLayout) -> None:
    """A rerun of a run id must use the same config (`iterations` may grow), or resuming would mix data."""
    changed = sorted(k for k in set(stored) | set(current)
                     if k not in RESUMABLE_CHANGES and stored.get(k) != current.get(k))
    if changed:
        raise ConfigError(f"run {layout.run_dir} already exists with a different config ({', '.join(changed)} "
                          "changed); use a new run_id, or the same config to resume")


def _engine_options(backend: str, device: str) -> dict:
    return {"device": device} if backend == "hf" else {}


@contextmanager
def rollout_engine(backend: str, model_path: Path, device: str = "cpu", keep_engine: bool = True) -> Iterator:
    """An engine sampling from `model_path`, for one stage.

    With `keep_engine`, inside a run that keeps models resident, a vLLM engine is opened once per
    model architecture and stays up across stages and iterations: a new checkpoint of the same
    architecture is reloaded in place (`load_weights`, 0.2 s for the perf zoo's student) instead of
    starting vLLM again (20 s there, minutes for large models). The run's scope closes it. The hf
    engine is always opened per stage: it samples from the run's resident model, so it costs nothing.
    """
    cache = resident_models()

    def opened():
        return open_engine(backend, model_path, **_engine_options(backend, device))

    if backend == "hf" or not keep_engine or cache.capacity <= 0:
        with opened() as engine:
            yield engine
        return
    architecture = {k: v for k, v in json.loads((Path(model_path) / "config.json").read_text()).items()
                    if k not in ("_name_or_path", "transformers_version")}
    engine = cache.keep_open(("engine", backend, device, json.dumps(architecture, sort_keys=True)), opened)
    if Path(engine.model_path).resolve() != Path(model_path).resolve():
        engine.load_weights(model_path)
    yield engine


def select_prompts(prompts: list[dict], iteration: int, count: int, seed: int) -> list[dict]:
    """Deterministic epoch-wise shuffled slice of prompts for `iteration` (cycles through the set)."""
    chosen = []
    position = iteration * count
    while len(chosen) < count:
        epoch, offset = divmod(position, len(prompts))
        order = np.random.default_rng(seed + epoch).permutation(len(prompts))
        take = min(count - len(chosen), len(prompts) - offset)
        chosen.extend(prompts[i] for i in order[offset: offset + take])
        position += take
    return chosen


def rollout_stage(layout: RunLayout, iteration: int, checkpoint: Path, *, prompts_per_iteration: int,
                  sampling: SamplingParams, backend: str = "hf", seed: int = 0, device: str = "cpu",
                  sampler_by_domain: dict[str, Path] | None = None, verify_rewards: bool = True,
                  keep_engine: bool = True) -> Path:
    """Sample the iteration's rollouts, verify rewards, write one shard; returns its directory.

    The sampler is `checkpoint` (on-policy), or, given `sampler_by_domain`, each prompt's domain's
    model (the teachers, for the off-policy SFT baseline). Without `verify_rewards` the reward
    column stays null (the update does not need it).
    """
    prompts = read_prompts(layout, "train").to_pylist()
    chosen = select_prompts(prompts, iteration, prompts_per_iteration, seed)
    sampling = SamplingParams(**{**sampling.__dict__, "seed": seed * 100003 + iteration})
    by_sampler: dict[Path, list[dict]] = {}
    for prompt in chosen:
        sampler = Path(checkpoint) if sampler_by_domain is None else Path(sampler_by_domain[prompt["domain"]])
        by_sampler.setdefault(sampler, []).append(prompt)
    rows = []
    for sampler, sampler_prompts in by_sampler.items():
        with rollout_engine(backend, sampler, device, keep_engine) as engine:
            sampled = engine.generate(sampler_prompts, sampling, run_id=layout.run_id, iteration=iteration)
        sampler_id = checkpoint_id(sampler)  # after sampling: by then the update's background write has hashed it
        rows.extend({**row, "checkpoint_id": sampler_id} for row in sampled)
    if verify_rewards:
        rewards = score_samples(rows, {p["prompt_id"]: p for p in chosen})
        for row, reward in zip(rows, rewards):
            row["reward"] = reward
    path = write_shard(rows, layout.rollouts_dir(iteration) / "part-00000.parquet", ROLLOUTS)
    log.info("rollout it%d: %d responses from %s -> %s", iteration, len(rows),
             ", ".join(str(s) for s in by_sampler), path)
    return path.parent


def rollout_samplers(config: RunConfig, layout: RunLayout) -> dict[str, Path] | None:
    """`rollout_stage`'s `sampler_by_domain`: None when the student samples, else each train domain's teacher."""
    if config.sampling.source == "student":
        return None
    return {domain: Path(config.models.teacher_for(domain)) for domain in train_domains(layout)}


def train_domains(layout: RunLayout) -> list[str]:
    """The domains of the run's stored training prompts, sorted."""
    return sorted(set(read_prompts(layout, "train").column("domain").to_pylist()))


def checkpoint_id(checkpoint: Path) -> str:
    """A short readable id: the checkpoint directory name plus its content hash prefix."""
    return f"{Path(checkpoint).name}@{model_hash(checkpoint)[:8]}"


def student_scored_in_update(config: RunConfig) -> bool:
    """True when the update's own forward pass gives the student's log-probs, so no scoring pass runs.

    With one optimizer step over all rollouts (`update.minibatches` 1, the G-OPD objective), the
    update's forward pass runs exactly the weights that sampled, before any step: its log-probs are
    the scoring pass's, one forward pass of the student fewer per iteration. Not for a student with
    dropout, whose training-mode forward pass would add noise a scoring pass does not.
    """
    return (config.update.minibatches == 1 and config.update.objective == "gopd"
            and not has_dropout(config.models.student))


def plan_scorers(config: RunConfig, checkpoint: Path, domains: list[str]) -> list[Scorer]:
    """Student (current weights; unless `student_scored_in_update`), each domain's teacher, the reference."""
    models = config.models
    context = None if models.teacher_context == "none" else models.teacher_context
    teacher_role = "teacher" if context is None else "context-teacher"
    scorers = [] if student_scored_in_update(config) else [Scorer("student", Path(checkpoint))]
    teacher_of = {d: Path(models.teacher_for(d)) for d in sorted(domains)}
    if len(set(teacher_of.values())) == 1 and context is None:
        scorers.append(Scorer(teacher_role, next(iter(teacher_of.values())), None, None))
    else:
        scorers.extend(Scorer(teacher_role, path, d, context) for d, path in teacher_of.items())
    scorers.append(Scorer(models.reference_role(), Path(models.reference_path())))
    return scorers


def score_stage(layout: RunLayout, iteration: int, scorers: list[Scorer], *, student_tokenizer: Path,
                token_budget: int = 8192, chunk_rows: int = 256, device: str = "cpu") -> dict[str, str]:
    """Score the iteration's rollouts with every scorer; returns {"role[:domain]": "model_hash"}."""
    from gopd_core.scoring import score_rollouts

    shards = rollout_shards(layout, iteration)
    prompts = {p["prompt_id"]: p for p in read_prompts(layout, "train").to_pylist()}
    written = {}
    for scorer in scorers:
        result = score_rollouts(layout, iteration, shards, scorer.model, scorer.role, domain=scorer.domain,
                                context=scorer.context, prompts=prompts, student_tokenizer_path=student_tokenizer,
                                chunk_rows=chunk_rows, token_budget=token_budget, device=device)
        key = scorer.role if scorer.domain is None else f"{scorer.role}:{scorer.domain}"
        written[key] = result.model_hash
    return written


def score_sets_from(written: dict[str, str], student_in_update: bool = False) -> ScoreSets:
    """Turn `score_stage`'s {"role[:domain]": hash} into the update's `ScoreSets` (student None if it scores itself)."""
    teachers, student, reference = {}, None, None
    for key, digest in written.items():
        role, _, domain = key.partition(":")
        if role == "student":
            student = (role, digest)
        elif role in ("teacher", "context-teacher"):
            teachers[domain or "default"] = (role, digest)
        elif role in ("reference", "teacher-base"):
            reference = (role, digest)
    if (student is None and not student_in_update) or not teachers:
        raise ValueError(f"scores are missing the student or a teacher: {sorted(written)}")
    return ScoreSets(student=student, teachers=teachers, reference=reference)


def update_stage(layout: RunLayout, iteration: int, checkpoint: Path, written: dict[str, str],
                 config: RunConfig) -> Path:
    """The lam-weighted policy update; writes the checkpoint and the updates table, returns the checkpoint."""
    update = config.update
    new_checkpoint, step_rows = update_policy(
        layout, iteration, checkpoint, score_sets_from(written, student_scored_in_update(config)),
        reward_scale=update.reward_scale,
        reference_role=config.models.reference_role(),
        loss_settings=LossSettings(update.clip_low, update.clip_high, update.is_threshold, update.aggregation,
                                   update.objective),
        optimizer_settings=OptimizerSettings(update.lr, update.weight_decay, update.warmup_steps,
                                             update.max_grad_norm),
        minibatches=update.minibatches, micro_token_budget=update.micro_token_budget, seed=config.seed,
        device=config.device, score_chunk_rows=config.score_chunk_rows, precision=update.precision,
        keep_checkpoint=keeps_checkpoint(config, iteration))
    write_shard(step_rows, layout.updates_path(iteration), UPDATES)
    return new_checkpoint


def should_evaluate(config: RunConfig, updates_done: int) -> bool:
    """Whether the distill flow evaluates the checkpoint after `updates_done` updates (0: the student)."""
    if not config.data.test:
        return False
    every = config.eval.every
    return updates_done in (0, config.iterations) or (every > 0 and updates_done % every == 0)


def keeps_checkpoint(config: RunConfig, iteration: int) -> bool:
    """Whether update `iteration` writes its checkpoint to disk: every `checkpoint_every`-th, the run's last,
    and any the flow evaluates; the others stay in memory (`training.save_checkpoint(keep=False)`) where the
    run keeps its models resident."""
    done = iteration + 1
    return (config.resident_models == 0 or done % config.checkpoint_every == 0 or done >= config.iterations
            or should_evaluate(config, done))


def update_complete(layout: RunLayout, iteration: int) -> Callable[[Path], bool]:
    """`run_once`'s `complete` for update `iteration`: its checkpoint is whole, or was kept in memory only
    (`keeps_checkpoint`) and a later update's whole checkpoint is recorded, which the run goes on from, so
    redoing this one (from stored rollouts and scores) would serve nothing."""
    def complete(checkpoint: Path) -> bool:
        if checkpoint_complete(checkpoint):
            return True
        if not checkpoint_not_kept(checkpoint):
            return False
        later = iteration + 1
        while (recorded := layout.done_info(later, "update")) is not None:
            if checkpoint_complete(Path(recorded["result"])):
                return True
            later += 1
        return False

    return complete


def evaluate_stage(layout: RunLayout, checkpoint: Path, iteration: int | None, *, n_samples: int = 4, k: int = 4,
                   temperature: float = 0.7, max_new_tokens: int = 48, eval_prompts: int = 64, backend: str = "hf",
                   seed: int = 0, device: str = "cpu", keep_engine: bool = True) -> Path:
    """Evaluate `checkpoint` on the run's test prompts, one benchmark per domain; returns the evals shard."""
    tests = read_prompts(layout, "test").to_pylist()
    if not tests:
        raise ValueError(f"run {layout.run_dir} has no test prompts (data.test is empty)")
    benchmarks: dict[str, list[dict]] = {}
    for prompt in tests:
        benchmarks.setdefault(f"{prompt['domain']}/test", []).append(prompt)
    benchmarks = {name: rows[:eval_prompts] for name, rows in sorted(benchmarks.items())}
    cid = checkpoint_id(checkpoint)
    with rollout_engine(backend, checkpoint, device, keep_engine) as engine:
        rows = evaluate_checkpoint(
            engine, benchmarks, run_id=layout.run_id, iteration=iteration, checkpoint_id=cid,
            n_samples=n_samples, k=k, temperature=temperature, max_new_tokens=max_new_tokens, seed=seed)
    return write_shard(rows, layout.evals_path(cid), EVALS)


def eval_settings(config: RunConfig) -> dict:
    """`evaluate_stage` keyword arguments from a run config."""
    return {"n_samples": config.eval.n_samples, "k": config.eval.k, "temperature": config.eval.temperature,
            "max_new_tokens": config.sampling.max_new_tokens, "eval_prompts": config.data.eval_prompts,
            "backend": config.backend, "seed": config.seed, "device": config.device, "keep_engine": config.keep_engine}


def store_test_prompts(layout: RunLayout, paths: list[Path]) -> None:
    """Write prompt datasets as the run's test split (for evaluation-only runs)."""
    write_shard(pa.concat_tables([load_prompts(p) for p in paths]), layout.prompts_path("test"), PROMPTS)


def read_run_config(layout: RunLayout) -> RunConfig:
    from gopd_core.config import parse_config

    return parse_config(json.loads(layout.config_path.read_text()), source=str(layout.config_path))


def run_once(layout: RunLayout, iteration: int, stage: str, work, encode=str, decode=str, complete=None,
             redo=None):
    """Resume point: return what a completed `stage` recorded, else run `work()` and record its result.

    The marker is written only after `work` finished writing, so a killed stage simply runs again
    (its writers replace or skip complete shards, never duplicate rows). `complete(result)`, if
    given, vouches for outputs that finish after `work` returns (the update's deferred optimizer
    state): a recorded result it rejects is run again. Then `redo(recorded result)`, if given, runs
    first and returns what is called with the new result before it is recorded (the update:
    `forget_stages_built_on`).
    """
    done, after = layout.done_info(iteration, stage), None
    if done is not None:
        result = decode(done["result"])
        if complete is None or complete(result):
            log.info("%s of iteration %d already complete, skipping (%s)", stage, iteration, done["result"])
            return result
        log.warning("%s of iteration %d was recorded but its output is incomplete (%s): running it again",
                    stage, iteration, done["result"])
        after = redo(result) if redo is not None else None
    started = time.perf_counter()
    result = work()
    if after is not None:
        after(result)
    layout.mark_done(iteration, stage, {"result": encode(result), "wall_s": time.perf_counter() - started})
    return result


def forget_stages_built_on(layout: RunLayout, iteration: int, checkpoint: Path) -> Callable[[Path], None]:
    """`run_once`'s `redo` for update `iteration`, whose `checkpoint`'s deferred part never landed.

    Later stages may already be recorded on that checkpoint's weights: the next rollout and scoring run
    while the AdamW state is written. The update runs again and rewrites the checkpoint; where the weights
    come out otherwise (a GPU's kernels need not repeat bit for bit; CPU runs do) or the old ones are gone,
    every later stage's record is dropped (by the returned function, given the new checkpoint), so that they
    run again on the new weights instead of keeping rollouts sampled, and evaluations taken, by weights no
    checkpoint holds any more.

    The hash of the weights the later stages used is kept in the update's marker before the checkpoint is
    rewritten: a resume interrupted after the rewrite compares with it, not with the rewritten weights.
    """
    recorded = layout.done_info(iteration, "update")
    old = recorded.get("built_on")  # "" when those weights were already gone
    if old is None:
        try:  # weights whose deferred write never landed are placeholders: their hash was kept beside them
            old = pending_weights_hash(checkpoint) or model_hash(checkpoint)
        except OSError:  # the weights are gone too (ModelPathError): nothing vouches for what was built on them
            old = ""
        layout.mark_done(iteration, "update", {**recorded, "built_on": old})

    def after(new_checkpoint: Path) -> None:
        if old and model_hash(new_checkpoint) == old:
            return
        dropped = layout.forget_stages_after(iteration)
        if dropped:
            log.warning("update of iteration %d gave other weights than the checkpoint later stages used: "
                        "running them again (%s)", iteration, ", ".join(f"{s} of {i}" for i, s in dropped))

    return after
