"""The model zoo: small real transformers models and prompt datasets, built from scratch, seeded.

No model hub is reachable, so the project makes its own. `build_zoo(DIR)` writes:

    DIR/manifest.json                 models, datasets, preset, seed (written last: marks completion)
    DIR/tokenizer/                    the shared byte-level tokenizer (`gopd_core.tokenizer`)
    DIR/data/<domain>/{train,test}.parquet
    DIR/<model>/                      HF directory (config, safetensors, tokenizer) + gopd_card.json

Models of the `default` preset (Llama architecture, tied embeddings, head_dim 32 for vLLM):
1. `student-base`: SFT on demonstrations of both domains, stopped early (modest accuracy).
2. `teacher-math`, `teacher-code`: from `student-base`, specialised on one domain: continued SFT on
   that domain's demonstrations, then RL with verifiable rewards (GRPO advantages + the clipped
   policy loss of `objectives`, sampling with the HF engine). On a 2-core CPU budget the margin over
   the student comes mostly from the domain SFT; the short RL stage is kept conservative (low lr)
   because tiny models degrade under noisy policy gradients (see each card's `stages`).
3. `strong-base`: a >= 4x larger model, SFT on both domains (the reference for strong-to-weak).
   At this scale accuracy tracks optimizer steps more than size, and the CPU budget buys the larger
   model fewer steps, so it is not necessarily more accurate than the student.
4. `strong-teacher`: `strong-base` with more SFT and RL on both domains.
Sizes (default): student 0.36M parameters (hidden 96, 3 layers), strong 1.53M (hidden 192, 2 layers).

Every step is seeded; each model directory is written atomically and skipped when its card
exists, so an interrupted build resumes and a complete one (manifest present) is a no-op.
"""

from __future__ import annotations

import functools
import json
import logging
import os
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from gopd_core import zoo_training
from gopd_core.models import load_model
from gopd_core.tasks import DOMAINS, make_split, write_prompt_datasets
from gopd_core.tokenizer import build_tokenizer, save_tokenizer
from storage.layout import atomic_directory, write_json_atomic

LOGGER = logging.getLogger(__name__)
HEAD_DIM = 32  # a head size every vLLM attention backend supports
CARD_NAME = "gopd_card.json"
MANIFEST_NAME = "manifest.json"


class UnknownPresetError(KeyError):
    """A zoo preset name that is not in PRESETS."""

    def __str__(self) -> str:
        return str(self.args[0])


class ZooMismatchError(ValueError):
    """The directory already holds a complete zoo built with another preset or seed."""


@dataclass(frozen=True)
class ModelShape:
    """Llama dimensions; heads = hidden // HEAD_DIM."""

    hidden: int
    layers: int
    intermediate: int
    max_positions: int = 256


@dataclass(frozen=True)
class Stage:
    """One training stage: `kind` ("sft" or "rl", see STAGES) on `domains` for `steps` at peak `lr`."""

    kind: str
    domains: tuple[str, ...]
    steps: int
    lr: float


@dataclass(frozen=True)
class Recipe:
    """How one zoo model is made: from scratch (`shape`) or from `parent`, then its stages in order."""

    name: str
    stages: tuple[Stage, ...] = ()
    parent: str | None = None
    shape: ModelShape | None = None
    domains: tuple[str, ...] = ("math", "code")  # what the model is for (its teacher domain, if any)


@dataclass(frozen=True)
class Preset:
    """Sizes, budgets and the ordered list of models of one zoo flavour."""

    name: str
    recipes: tuple[Recipe, ...]
    n_train: int
    n_test: int
    sft_batch: int = 16
    rl_prompts: int = 8
    rl_group: int = 8
    max_new_tokens: int = 40
    evaluate: bool = True


BOTH = ("math", "code")


def _zoo_recipes(student: ModelShape, strong: ModelShape, base_steps: int, teacher_steps: int,
                 strong_steps: int, strong_teacher_steps: int, rl_steps: int) -> tuple[Recipe, ...]:
    """The five zoo models: SFT bases, domain teachers (domain SFT + RL), strong base and teacher."""
    def teacher(domains: tuple[str, ...], sft_steps: int, sft_lr: float, rl_lr: float) -> tuple[Stage, ...]:
        return Stage("sft", domains, sft_steps, sft_lr), Stage("rl", domains, rl_steps, rl_lr)

    return (
        Recipe("student-base", (Stage("sft", BOTH, base_steps, 5e-3),), shape=student),
        Recipe("teacher-math", teacher(("math",), teacher_steps, 2e-3, 1e-4), "student-base", domains=("math",)),
        Recipe("teacher-code", teacher(("code",), teacher_steps, 2e-3, 1e-4), "student-base", domains=("code",)),
        Recipe("strong-base", (Stage("sft", BOTH, strong_steps, 4e-3),), shape=strong),
        Recipe("strong-teacher", teacher(BOTH, strong_teacher_steps, 2e-3, 5e-5), "strong-base"),
    )


PRESETS: dict[str, Preset] = {
    "default": Preset("default", n_train=4000, n_test=100, recipes=_zoo_recipes(
        ModelShape(hidden=96, layers=3, intermediate=256), ModelShape(hidden=192, layers=2, intermediate=1024),
        base_steps=600, teacher_steps=200, strong_steps=400, strong_teacher_steps=250, rl_steps=5)),
    # The paper-claims benchmark (benchmarks/paper_claims.py): the default student and domain teachers,
    # and a deeper strong pair trained long enough that the strong teacher clearly beats the student.
    "claims": Preset("claims", n_train=4000, n_test=100, recipes=_zoo_recipes(
        ModelShape(hidden=96, layers=3, intermediate=256), ModelShape(hidden=128, layers=6, intermediate=512),
        base_steps=600, teacher_steps=200, strong_steps=400, strong_teacher_steps=600, rl_steps=5)),
    "tiny": Preset("tiny", n_train=48, n_test=8, sft_batch=8, rl_prompts=2, rl_group=4, max_new_tokens=16,
                   recipes=_zoo_recipes(ModelShape(64, 2, 128, 128), ModelShape(128, 2, 320, 128), base_steps=4,
                                        teacher_steps=2, strong_steps=4, strong_teacher_steps=2, rl_steps=1)),
    "perf": Preset("perf", n_train=256, n_test=64, evaluate=False, recipes=(
        Recipe("student-base", shape=ModelShape(512, 8, 1408, 512)),
        Recipe("teacher-math", shape=ModelShape(768, 14, 2048, 512), domains=("math",)),
        Recipe("teacher-code", shape=ModelShape(768, 14, 2048, 512), domains=("code",)),
    )),
}


def new_model(shape: ModelShape, tokenizer, seed: int) -> LlamaForCausalLM:
    """A freshly initialised (seeded) Llama causal LM over the zoo tokenizer."""
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=shape.hidden, intermediate_size=shape.intermediate,
        num_hidden_layers=shape.layers, num_attention_heads=shape.hidden // HEAD_DIM,
        num_key_value_heads=shape.hidden // HEAD_DIM, head_dim=HEAD_DIM, max_position_embeddings=shape.max_positions,
        tie_word_embeddings=True, bos_token_id=None, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id, rms_norm_eps=1e-5, dtype="float32",
    )
    torch.manual_seed(seed)
    return LlamaForCausalLM(config).eval()


def parameter_count(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


@dataclass
class BuildContext:
    """What every builder needs: the zoo root, preset, seed, tokenizer, prompts and reward cache."""

    root: Path
    preset: Preset
    seed: int
    tokenizer: object
    train_rows: dict[str, list[dict]]
    test_rows: dict[str, list[dict]]
    rewards: zoo_training.RewardCache
    log: Callable[[str], None]


def _start_model(recipe: Recipe, context: BuildContext, salt: int) -> torch.nn.Module:
    if recipe.parent is not None:
        return load_model(context.root / recipe.parent, dtype=torch.float32)
    return new_model(recipe.shape, context.tokenizer, context.seed * 1000 + salt)


def run_sft(model: torch.nn.Module, stage: Stage, context: BuildContext, seed: int, log: Callable) -> dict:
    rows = [row for domain in stage.domains for row in context.train_rows[domain]]
    pairs = zoo_training.sft_pairs(context.tokenizer, rows)
    metrics = zoo_training.train_sft(model, pairs, context.tokenizer.pad_token_id, stage.steps,
                                     context.preset.sft_batch, stage.lr, seed=seed, log=log)
    return {"batch_size": context.preset.sft_batch, **metrics}


def run_rl(model: torch.nn.Module, stage: Stage, context: BuildContext, seed: int, log: Callable) -> dict:
    rows = [row for domain in stage.domains for row in context.train_rows[domain]]
    metrics = zoo_training.train_rl(
        model, context.tokenizer, rows, context.rewards, stage.steps, context.preset.rl_prompts,
        context.preset.rl_group, stage.lr, seed=seed, max_new_tokens=context.preset.max_new_tokens, log=log,
    )
    return {"prompts_per_step": context.preset.rl_prompts, "group_size": context.preset.rl_group,
            "temperature": 1.0, **metrics}


STAGES: dict[str, Callable[[torch.nn.Module, Stage, BuildContext, int, Callable], dict]] = {
    "sft": run_sft,
    "rl": run_rl,
}


def _prefixed(log: Callable[[str], None], prefix: str, message: str) -> None:
    log(prefix + message)


def train_recipe(recipe: Recipe, context: BuildContext, salt: int) -> tuple[torch.nn.Module, list[dict]]:
    """Start the model (fresh or from its parent) and run its stages; returns it with per-stage records."""
    for stage in recipe.stages:
        if stage.kind not in STAGES:
            raise ValueError(f"recipe {recipe.name!r} has a stage of unknown kind {stage.kind!r}; "
                             f"choose one of {sorted(STAGES)}")
    model = _start_model(recipe, context, salt)
    records = []
    for index, stage in enumerate(recipe.stages):
        start = time.perf_counter()
        prefix = f"{recipe.name} [{stage.kind}]: "
        metrics = STAGES[stage.kind](model, stage, context, context.seed * 1000 + salt * 10 + index,
                                     functools.partial(_prefixed, context.log, prefix))
        records.append({**asdict(stage), "metrics": metrics, "wall_time_s": round(time.perf_counter() - start, 2)})
    return model, records


def make_card(recipe: Recipe, context: BuildContext, model: torch.nn.Module, stages: list[dict],
              accuracy: dict | None, wall_s: float) -> dict:
    """The JSON card saved beside a model: how it was made and how good it is."""
    return {
        "name": recipe.name,
        "kind": "+".join(stage.kind for stage in recipe.stages) or "init",
        "parent": recipe.parent,
        "domains": list(recipe.domains),
        "stages": stages,
        "steps": sum(stage.steps for stage in recipe.stages),
        "lr": {stage.kind: stage.lr for stage in recipe.stages},
        "preset": context.preset.name,
        "seed": context.seed,
        "architecture": "LlamaForCausalLM",
        "shape": {"hidden": model.config.hidden_size, "layers": model.config.num_hidden_layers,
                  "heads": model.config.num_attention_heads, "intermediate": model.config.intermediate_size,
                  "max_position_embeddings": model.config.max_position_embeddings},
        "parameters": parameter_count(model),
        "accuracy": accuracy,
        "accuracy_method": (f"greedy (temperature 0), max_new_tokens={context.preset.max_new_tokens}, "
                            f"{context.preset.n_test} test prompts per domain") if accuracy is not None
                           else "not evaluated (benchmark-only preset)",
        "wall_time_s": round(wall_s, 2),
    }


def build_model(recipe: Recipe, context: BuildContext, salt: int) -> dict:
    """Build, evaluate and atomically save one model; returns its card (read back if already built)."""
    final = context.root / recipe.name
    if (final / CARD_NAME).exists():
        context.log(f"{recipe.name}: already built, skipping")
        return json.loads((final / CARD_NAME).read_text())
    start = time.perf_counter()
    context.log(f"{recipe.name}: building (parent={recipe.parent}, stages={[s.kind for s in recipe.stages]})")
    model, stages = train_recipe(recipe, context, salt)
    accuracy = None
    if context.preset.evaluate:
        accuracy = zoo_training.evaluate(model, context.tokenizer, context.test_rows, context.rewards,
                                         context.preset.max_new_tokens)
    card = make_card(recipe, context, model, stages, accuracy, time.perf_counter() - start)
    with atomic_directory(final) as staging:
        model.save_pretrained(str(staging))
        save_tokenizer(staging)
        (staging / CARD_NAME).write_text(json.dumps(card, indent=2, sort_keys=True))
    context.log(f"{recipe.name}: done in {card['wall_time_s']:.0f}s, {card['parameters']:,} parameters, "
                f"accuracy {accuracy}")
    return card


def read_manifest(directory: str | Path) -> dict | None:
    """The manifest of a complete zoo, or None if `directory` holds no finished zoo."""
    path = Path(directory) / MANIFEST_NAME
    return json.loads(path.read_text()) if path.exists() else None


def build_zoo(directory: str | Path, preset: str = "default", seed: int = 0, progress: bool = True,
              num_threads: int | None = 2) -> dict:
    """Build (or resume) the zoo under `directory`; returns the manifest. No-op if already complete.

    num_threads: torch CPU threads for the build (None leaves torch's setting alone).
    """
    root = Path(directory)
    existing = read_manifest(root)
    if existing is not None:
        if (existing.get("preset"), existing.get("seed")) != (preset, seed):
            raise ZooMismatchError(
                f"{root} already holds a complete zoo with preset {existing.get('preset')!r} and seed "
                f"{existing.get('seed')}, not preset {preset!r} seed {seed}; use another directory or delete it"
            )
        LOGGER.info("zoo %s is already complete (preset %s); nothing to do", root, preset)
        return existing
    if preset not in PRESETS:
        raise UnknownPresetError(f"unknown zoo preset {preset!r}; choose one of {sorted(PRESETS)}")
    if num_threads is not None:
        torch.set_num_threads(num_threads)
        if num_threads > 1 and os.environ.get("OMP_WAIT_POLICY", "").upper() == "ACTIVE":
            LOGGER.warning("OMP_WAIT_POLICY is ACTIVE: with %d torch threads on a busy machine, spinning "
                           "OpenMP threads can slow the build 10-30x; set OMP_WAIT_POLICY=PASSIVE before "
                           "python starts, or pass num_threads=1", num_threads)
    spec = PRESETS[preset]
    start = time.perf_counter()
    log = LOGGER.info if progress else LOGGER.debug
    datasets = write_prompt_datasets(root / "data", spec.n_train, spec.n_test, seed)
    save_tokenizer(root / "tokenizer")
    context = BuildContext(
        root=root, preset=spec, seed=seed, tokenizer=build_tokenizer(),
        train_rows={d: make_split(d, "train", spec.n_train, seed) for d in DOMAINS},
        test_rows={d: make_split(d, "test", spec.n_test, seed) for d in DOMAINS},
        rewards=zoo_training.RewardCache(), log=log,
    )
    cards = {recipe.name: build_model(recipe, context, salt) for salt, recipe in enumerate(spec.recipes)}
    manifest = {
        "preset": preset,
        "seed": seed,
        "tokenizer": "tokenizer",
        "datasets": {key: str(Path(path).relative_to(root)) for key, path in datasets.items()},
        "models": {name: {"path": name, "kind": card["kind"], "parent": card["parent"], "domains": card["domains"],
                          "parameters": card["parameters"], "accuracy": card["accuracy"]}
                   for name, card in cards.items()},
        "build_wall_time_s": round(time.perf_counter() - start, 2),
        "preset_spec": asdict(spec),
    }
    write_json_atomic(root / MANIFEST_NAME, manifest)
    log(f"zoo {root} complete in {manifest['build_wall_time_s']:.0f}s")
    return manifest
