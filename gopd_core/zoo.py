"""The model zoo: small real transformers models and prompt datasets, built from scratch, seeded.

No model hub is reachable, so the project makes its own. `build_zoo(DIR)` writes:

    DIR/manifest.json                 models, datasets, preset, seed (written last: marks completion)
    DIR/tokenizer/                    the shared char-level tokenizer
    DIR/data/<domain>/{train,test}.parquet
    DIR/<model>/                      HF directory (config, safetensors, tokenizer) + gopd_card.json

Models of the `default` preset (Llama architecture, tied embeddings, head_dim 32 for vLLM):
1. `student-base`: SFT on demonstrations of both domains, stopped early (modest accuracy).
2. `teacher-math`, `teacher-code`: RL with verifiable rewards from `student-base` on one domain.
3. `strong-base`: a >= 4x larger model, SFT on both domains (reference for strong-to-weak).
4. `strong-teacher`: RL of `strong-base` on both domains.

Every step is seeded; each model directory is written atomically and skipped when its card
exists, so an interrupted build resumes and a complete one (manifest present) is a no-op.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
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
    def __str__(self) -> str:
        return str(self.args[0])


@dataclass(frozen=True)
class ModelShape:
    """Llama dimensions; heads = hidden // HEAD_DIM."""

    hidden: int
    layers: int
    intermediate: int
    max_positions: int = 256


@dataclass(frozen=True)
class Recipe:
    """How one zoo model is made: from scratch (`shape`) or from `parent`, by `kind` on `domains`."""

    name: str
    kind: str  # "init" | "sft" | "rl", see BUILDERS
    domains: tuple[str, ...]
    steps: int = 0
    lr: float = 0.0
    parent: str | None = None
    shape: ModelShape | None = None


@dataclass(frozen=True)
class Preset:
    """Sizes, budgets and the ordered list of models of one zoo flavour."""

    name: str
    recipes: tuple[Recipe, ...]
    n_train: int
    n_test: int
    sft_batch: int = 32
    rl_prompts: int = 8
    rl_group: int = 8
    max_new_tokens: int = 40
    evaluate: bool = True
    extra: dict = field(default_factory=dict)


BOTH = ("math", "code")
STUDENT = ModelShape(hidden=128, layers=4, intermediate=384)
STRONG = ModelShape(hidden=256, layers=6, intermediate=768)
PRESETS: dict[str, Preset] = {
    "default": Preset("default", n_train=4000, n_test=100, recipes=(
        Recipe("student-base", "sft", BOTH, steps=300, lr=3e-3, shape=STUDENT),
        Recipe("teacher-math", "rl", ("math",), steps=30, lr=1e-3, parent="student-base"),
        Recipe("teacher-code", "rl", ("code",), steps=30, lr=1e-3, parent="student-base"),
        Recipe("strong-base", "sft", BOTH, steps=300, lr=2e-3, shape=STRONG),
        Recipe("strong-teacher", "rl", BOTH, steps=30, lr=5e-4, parent="strong-base"),
    )),
    "tiny": Preset("tiny", n_train=64, n_test=16, sft_batch=16, rl_prompts=4, rl_group=4, max_new_tokens=24,
                   recipes=(
        Recipe("student-base", "sft", BOTH, steps=8, lr=3e-3, shape=ModelShape(64, 2, 128, 128)),
        Recipe("teacher-math", "rl", ("math",), steps=2, lr=1e-3, parent="student-base"),
        Recipe("teacher-code", "rl", ("code",), steps=2, lr=1e-3, parent="student-base"),
        Recipe("strong-base", "sft", BOTH, steps=8, lr=3e-3, shape=ModelShape(128, 2, 256, 128)),
        Recipe("strong-teacher", "rl", BOTH, steps=2, lr=1e-3, parent="strong-base"),
    )),
    "perf": Preset("perf", n_train=256, n_test=64, evaluate=False, recipes=(
        Recipe("student-base", "init", BOTH, shape=ModelShape(512, 8, 1408, 512)),
        Recipe("teacher-math", "init", ("math",), shape=ModelShape(768, 14, 2048, 512)),
        Recipe("teacher-code", "init", ("code",), shape=ModelShape(768, 14, 2048, 512)),
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


def build_init(recipe: Recipe, context: BuildContext, salt: int) -> tuple[torch.nn.Module, dict]:
    return _start_model(recipe, context, salt), {}


def build_sft(recipe: Recipe, context: BuildContext, salt: int) -> tuple[torch.nn.Module, dict]:
    model = _start_model(recipe, context, salt)
    rows = [row for domain in recipe.domains for row in context.train_rows[domain]]
    pairs = zoo_training.sft_pairs(context.tokenizer, rows)
    metrics = zoo_training.train_sft(model, pairs, context.tokenizer.pad_token_id, recipe.steps,
                                     context.preset.sft_batch, recipe.lr, seed=context.seed * 1000 + salt,
                                     log=lambda message: context.log(f"{recipe.name}: {message}"))
    return model, {"batch_size": context.preset.sft_batch, **metrics}


def build_rl(recipe: Recipe, context: BuildContext, salt: int) -> tuple[torch.nn.Module, dict]:
    model = _start_model(recipe, context, salt)
    rows = [row for domain in recipe.domains for row in context.train_rows[domain]]
    metrics = zoo_training.train_rl(
        model, context.tokenizer, rows, context.rewards, recipe.steps, context.preset.rl_prompts,
        context.preset.rl_group, recipe.lr, seed=context.seed * 1000 + salt,
        max_new_tokens=context.preset.max_new_tokens, log=lambda message: context.log(f"{recipe.name}: {message}"),
    )
    return model, {"prompts_per_step": context.preset.rl_prompts, "group_size": context.preset.rl_group,
                   "temperature": 1.0, **metrics}


BUILDERS: dict[str, Callable[[Recipe, BuildContext, int], tuple[torch.nn.Module, dict]]] = {
    "init": build_init,
    "sft": build_sft,
    "rl": build_rl,
}


def make_card(recipe: Recipe, context: BuildContext, model: torch.nn.Module, training: dict,
              accuracy: dict | None, wall_s: float) -> dict:
    """The JSON card saved beside a model: how it was made and how good it is."""
    return {
        "name": recipe.name,
        "kind": recipe.kind,
        "parent": recipe.parent,
        "domains": list(recipe.domains),
        "steps": recipe.steps,
        "lr": recipe.lr,
        "preset": context.preset.name,
        "seed": context.seed,
        "architecture": model.config.architectures[0] if model.config.architectures else "LlamaForCausalLM",
        "shape": {"hidden": model.config.hidden_size, "layers": model.config.num_hidden_layers,
                  "heads": model.config.num_attention_heads, "intermediate": model.config.intermediate_size,
                  "max_position_embeddings": model.config.max_position_embeddings},
        "parameters": parameter_count(model),
        "training": training,
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
    if recipe.kind not in BUILDERS:
        raise ValueError(f"recipe {recipe.name!r} has unknown kind {recipe.kind!r}; choose one of {sorted(BUILDERS)}")
    start = time.perf_counter()
    context.log(f"{recipe.name}: building ({recipe.kind}, parent={recipe.parent})")
    model, training = BUILDERS[recipe.kind](recipe, context, salt)
    accuracy = None
    if context.preset.evaluate:
        accuracy = zoo_training.evaluate(model, context.tokenizer, context.test_rows, context.rewards,
                                         context.preset.max_new_tokens)
    card = make_card(recipe, context, model, training, accuracy, time.perf_counter() - start)
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
        LOGGER.info("zoo %s is already complete (preset %s); nothing to do", root, existing.get("preset"))
        return existing
    if preset not in PRESETS:
        raise UnknownPresetError(f"unknown zoo preset {preset!r}; choose one of {sorted(PRESETS)}")
    if num_threads is not None:
        torch.set_num_threads(num_threads)
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
