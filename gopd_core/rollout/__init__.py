"""Rollout engines: sample responses from the student and record per-token log-probs.

One interface, several backends (`ENGINES`): each engine takes prompt rows (the `prompts` schema)
and returns rows of the `rollouts` schema, including the log-prob of every sampled token under the
raw model distribution (before temperature / top-p), which the update uses for importance weights.

    with open_engine("hf", model_path) as engine:
        rows = engine.generate(prompt_rows, SamplingParams(n=4, max_new_tokens=64), run_id, iteration)
        engine.load_weights(next_checkpoint)
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol


@dataclass(frozen=True)
class SamplingParams:
    """How to sample: temperature, nucleus top_p, response budget, samples per prompt, seed."""

    temperature: float = 1.0
    top_p: float = 1.0
    max_new_tokens: int = 64
    n: int = 1
    seed: int = 0

    def __post_init__(self) -> None:
        if self.temperature < 0 or not 0 < self.top_p <= 1 or self.n < 1 or self.max_new_tokens < 1:
            raise ValueError(f"invalid sampling parameters: {self} (need temperature >= 0, 0 < top_p <= 1, "
                             "n >= 1, max_new_tokens >= 1)")


class PromptTooLongError(ValueError):
    """A prompt plus its response budget does not fit the model's context window."""


def check_prompt_lengths(prompts: list[dict], prompt_ids: list[list[int]], max_context: int, max_new_tokens: int,
                         hint: str = "shorten the prompt or lower max_new_tokens") -> None:
    """Refuse, naming the prompt, any prompt that leaves too little room for `max_new_tokens`."""
    budget = max_context - max_new_tokens
    for row, ids in zip(prompts, prompt_ids):
        if len(ids) > budget:
            raise PromptTooLongError(
                f"prompt {row['prompt_id']!r} has {len(ids)} tokens, but the model's context of {max_context} "
                f"leaves only {budget} after max_new_tokens={max_new_tokens}; {hint}")


def rollout_row(engine: str, tokenizer, prompt: dict, prompt_ids: list[int], sample_index: int, tokens: list[int],
                logprobs: list[float], finish_reason: str, run_id: str, iteration: int, checkpoint_id: str) -> dict:
    """One row of the rollouts schema (reward left None for the verifier)."""
    return {
        "run_id": run_id, "iteration": iteration,
        "rollout_id": rollout_id(run_id, iteration, prompt["prompt_id"], sample_index),
        "prompt_id": prompt["prompt_id"], "domain": prompt["domain"], "sample_index": sample_index,
        "checkpoint_id": checkpoint_id, "engine": engine, "prompt_token_ids": prompt_ids,
        "response_token_ids": tokens, "rollout_logprobs": logprobs,
        "prompt_text": tokenizer.decode(prompt_ids, skip_special_tokens=False),
        "response_text": tokenizer.decode(tokens, skip_special_tokens=True),
        "finish_reason": finish_reason, "reward": None,
    }


class RolloutEngine(Protocol):
    name: str

    def generate(self, prompts: list[dict], sampling: SamplingParams, run_id: str, iteration: int) -> list[dict]:
        """Rows of the rollouts schema, `n` per prompt, ordered by (prompt, sample_index); reward left None."""

    def load_weights(self, model_path: str | Path) -> None:
        """Switch to a new checkpoint (same architecture and tokenizer)."""

    def close(self) -> None:
        """Release the engine (processes, memory)."""


class EngineBase:
    """Context-manager plumbing shared by engines: `with open_engine(...) as engine:` closes it."""

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:  # engines with resources override
        pass


# backend name -> "module:class"; modules are imported only when used (vLLM is optional).
ENGINES: dict[str, str] = {
    "hf": "gopd_core.rollout.hf:HFEngine",
    "vllm": "gopd_core.rollout.vllm_engine:VLLMEngine",
}


def rollout_id(run_id: str, iteration: int, prompt_id: str, sample_index: int) -> str:
    return f"{run_id}/{iteration}/{prompt_id}/{sample_index}"


def open_engine(backend: str, model_path: str | Path, **options) -> RolloutEngine:
    """Construct the engine for `backend` (usable as a context manager)."""
    if backend not in ENGINES:
        raise ValueError(f"unknown rollout backend {backend!r}; choose one of {sorted(ENGINES)}")
    module_name, class_name = ENGINES[backend].split(":")
    engine_class = getattr(importlib.import_module(module_name), class_name)
    return engine_class(model_path, **options)
