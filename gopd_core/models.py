"""Loading models and tokenizers by local path, their content hashes, and the shared-vocabulary check."""

from __future__ import annotations

import hashlib
import json
from functools import lru_cache
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedTokenizerBase
from transformers.utils import logging as hf_logging

# Our own stages show one progress bar each; per-file "Loading weights" bars would drown them.
hf_logging.disable_progress_bar()


class ModelPathError(FileNotFoundError):
    """A configured model path does not exist or is not a Hugging Face model directory."""


class VocabularyMismatchError(ValueError):
    """Two models meant to score the same token ids do not share a vocabulary."""


def check_model_dir(path: str | Path, what: str = "model") -> Path:
    """Return `path` if it is a loadable HF directory, else raise naming what is missing."""
    path = Path(path)
    if not path.is_dir():
        raise ModelPathError(f"{what} path {path} does not exist (or is not a directory)")
    if not (path / "config.json").exists():
        raise ModelPathError(f"{what} path {path} has no config.json: not a Hugging Face model directory")
    if not any(path.glob("*.safetensors")) and not any(path.glob("*.bin")):
        raise ModelPathError(f"{what} path {path} has no weights (*.safetensors): checkpoint missing its weights")
    return path


def load_tokenizer(path: str | Path) -> PreTrainedTokenizerBase:
    tokenizer = AutoTokenizer.from_pretrained(str(check_model_dir(path, "tokenizer")))
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def best_dtype(device: str | torch.device = "cpu") -> torch.dtype:
    """bf16 where the hardware runs it natively, else fp32."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.float32


def load_model(path: str | Path, dtype: torch.dtype | None = None, device: str = "cpu") -> torch.nn.Module:
    """Load a causal LM from a local directory, in eval mode."""
    path = check_model_dir(path)
    model = AutoModelForCausalLM.from_pretrained(str(path), dtype=dtype or best_dtype(device))
    return model.to(device).eval()


def model_hash(path: str | Path) -> str:
    """Content hash (sha256, 16 hex) of a model's weights and config: same bytes, same hash."""
    path = check_model_dir(path)
    files = sorted([*path.glob("*.safetensors"), *path.glob("*.bin"), path / "config.json"])
    stamp = tuple((str(f), f.stat().st_size, f.stat().st_mtime_ns) for f in files)
    return _hash_files(stamp)


@lru_cache(maxsize=64)
def _hash_files(stamp: tuple) -> str:
    digest = hashlib.sha256()
    for name, _, _ in stamp:
        digest.update(Path(name).name.encode())
        with open(name, "rb") as handle:
            for block in iter(lambda: handle.read(1 << 22), b""):
                digest.update(block)
    return digest.hexdigest()[:16]


def check_same_vocab(reference: PreTrainedTokenizerBase, other: PreTrainedTokenizerBase, other_name: str) -> None:
    """Refuse a scorer whose token ids mean something else than the student's."""
    if reference.get_vocab() != other.get_vocab():
        ref_vocab, other_vocab = reference.get_vocab(), other.get_vocab()
        differing = sorted(set(ref_vocab.items()) ^ set(other_vocab.items()))[:3]
        raise VocabularyMismatchError(
            f"{other_name} has a different tokenizer vocabulary than the student "
            f"({len(other_vocab)} vs {len(ref_vocab)} tokens; e.g. {differing}); "
            "G-OPD scores the student's token ids, so teacher and student must share a tokenizer"
        )


def render_prompt(tokenizer: PreTrainedTokenizerBase, messages: list[dict]) -> list[int]:
    """Token ids of chat `messages` rendered with the model's own chat template, ready for the answer."""
    ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=False)
    if isinstance(ids, dict) or hasattr(ids, "input_ids"):
        ids = ids["input_ids"]
    return [int(i) for i in ids]


def read_card(path: str | Path) -> dict:
    """The zoo's JSON card beside a model (empty if the model is not from the zoo)."""
    card = Path(path) / "gopd_card.json"
    return json.loads(card.read_text()) if card.exists() else {}
