"""Tiny real models and task data for tests: random Qwen2 weights + the zoo's char tokenizer, in seconds."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import Qwen2Config, Qwen2ForCausalLM

from gopd_core.config import set_dotted
from gopd_core.tasks import make_split
from gopd_core.tokenizer import save_tokenizer
from storage.parquet import write_shard
from storage.schemas import PROMPTS


def build_random_model(directory: Path, hidden: int = 32, layers: int = 2, seed: int = 0) -> Path:
    """A randomly initialised Qwen2 causal LM saved as a normal HF directory with the zoo tokenizer."""
    tokenizer = save_tokenizer(directory)
    torch.manual_seed(seed)
    config = Qwen2Config(
        vocab_size=len(tokenizer), hidden_size=hidden, intermediate_size=hidden * 2, num_hidden_layers=layers,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512, tie_word_embeddings=True,
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
    )
    Qwen2ForCausalLM(config).save_pretrained(str(directory), safe_serialization=True)
    return directory


def write_task_data(directory: Path, n_train: int = 16, n_test: int = 6, seed: int = 0) -> dict[str, list[Path]]:
    """math + code train/test prompt datasets as Parquet; returns {"train": [...], "test": [...]}."""
    paths: dict[str, list[Path]] = {"train": [], "test": []}
    for domain in ("math", "code"):
        for split, n in (("train", n_train), ("test", n_test)):
            path = directory / domain / f"{split}.parquet"
            write_shard(make_split(domain, split, n, seed), path, PROMPTS)
            paths[split].append(path)
    return paths


@dataclass(frozen=True)
class World:
    """Tiny real models (shared byte-level vocabulary) and math + code prompt datasets."""

    base: Path
    models: dict[str, Path]
    data: dict[str, list[Path]]


def build_world(base: Path) -> World:
    """A student (hidden 32) and math/code teachers (hidden 64) of random Qwen2 weights, plus task data."""
    models = {
        "student": build_random_model(base / "student", hidden=32, seed=1),
        "teacher_math": build_random_model(base / "teacher-math", hidden=64, seed=2),
        "teacher_code": build_random_model(base / "teacher-code", hidden=64, seed=3),
    }
    return World(base, models, write_task_data(base / "data", n_train=12, n_test=4))


def tiny_distill_config(base: Path, models: dict[str, Path], data: dict[str, list[Path]], run_id: str,
                        root: Path | None = None, **changes) -> dict:
    """The 2-iteration tiny distill config the flow and reliability tests share; `changes` set dotted keys."""
    config = {
        "run_id": run_id, "storage_root": str(root or base / "runs"), "iterations": 2, "seed": 0,
        "score_chunk_rows": 4,
        "models": {"student": str(models["student"]),
                   "teachers": {"math": str(models["teacher_math"]), "code": str(models["teacher_code"])}},
        "sampling": {"temperature": 1.0, "max_new_tokens": 10, "n": 2},
        "update": {"reward_scale": 1.0, "lr": 1e-3, "minibatches": 2, "micro_token_budget": 256},
        "data": {"train": [str(p) for p in data["train"]], "test": [str(p) for p in data["test"]],
                 "prompts_per_iteration": 6, "eval_prompts": 2},
        "eval": {"every": 2, "n_samples": 2, "k": 2, "temperature": 1.0},
    }
    for key, value in changes.items():
        set_dotted(config, key, value)
    return config
