"""Tiny real models and task data for tests: random Qwen2 weights + the zoo's char tokenizer, in seconds."""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import Qwen2Config, Qwen2ForCausalLM

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
