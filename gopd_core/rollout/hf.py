"""Rollouts with plain Hugging Face transformers: our own batched sampling loop over the KV cache.

For each batch of prompts (sorted by length to limit padding):
1. Render every prompt with the model's chat template and left-pad the batch; position ids count
   real tokens only, so a padded row sees the same positions as it would alone.
2. Prefill the prompts once, then repeat the cache `n` times (one copy per sample).
3. Decode token by token (`lean_decode.LeanDecoder` where it covers the model, else the transformers
   forward pass on prepacked weights) and draw with `sampling.TokenSampler`: the raw distribution
   gives the recorded log-prob; temperature and top-p only shape the sampling distribution
   (temperature 0 is greedy). Draws use one `torch.Generator` seeded from `SamplingParams.seed`, so
   the same seed gives the same rollouts.
4. A row stops at EOS (kept in the response, finish_reason "stop") or after `max_new_tokens`
   ("length"); finished rows leave the batch and the cache.
"""

from __future__ import annotations

import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
from tqdm.auto import tqdm
from transformers.cache_utils import DynamicLayer

from gopd_core.attention import attention_kernels
from gopd_core.models import load_tokenizer, prepacked_linears, render_prompt, resident_models
from gopd_core.rollout import (
    EngineBase,
    PromptTooLongError,
    SamplingParams,
    check_prompt_lengths,
    rollout_row,
)
from gopd_core.rollout.lean_decode import LeanDecoder
from gopd_core.rollout.sampling import TokenSampler

__all__ = ["HFEngine", "PromptTooLongError"]


def left_pad(sequences: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Left-pad token lists. Returns (input_ids_BL, attention_mask_BL, position_ids_BL)."""
    width = max(len(s) for s in sequences)
    input_ids_BL = torch.full((len(sequences), width), pad_id, dtype=torch.long)
    attention_mask_BL = torch.zeros((len(sequences), width), dtype=torch.long)
    for row, sequence in enumerate(sequences):
        input_ids_BL[row, width - len(sequence):] = torch.tensor(sequence, dtype=torch.long)
        attention_mask_BL[row, width - len(sequence):] = 1
    position_ids_BL = (attention_mask_BL.cumsum(-1) - 1).clamp(min=0)
    return input_ids_BL, attention_mask_BL, position_ids_BL


class ReservedLayer(DynamicLayer):
    """A KV-cache layer whose keys/values sit in a buffer reserved for the whole response.

    transformers' `DynamicLayer` appends each new token with `torch.cat`, copying the whole cache
    every step (17% of a batch-8 decode on CPU, more as responses grow); here a token is written in
    place and `keys`/`values` are views of the filled part. The buffer doubles if it ever runs out.
    """

    def __init__(self, keys_BHLD: torch.Tensor, values_BHLD: torch.Tensor, capacity: int,
                 dtype: torch.dtype | None = None) -> None:
        """dtype: the buffer's (None: the keys'), e.g. float32 after a prefill under bf16 autocast."""
        super().__init__()
        self.dtype, self.device, self.is_initialized = dtype or keys_BHLD.dtype, keys_BHLD.device, True
        self.length = keys_BHLD.shape[-2]
        self._keys, self._values = self._reserve(keys_BHLD, capacity), self._reserve(values_BHLD, capacity)
        self._expose()

    def _reserve(self, states_BHLD: torch.Tensor, capacity: int) -> torch.Tensor:
        batch, heads, _, dim = states_BHLD.shape
        buffer = states_BHLD.new_empty((batch, heads, max(capacity, self.length), dim), dtype=self.dtype)
        buffer[:, :, : self.length] = states_BHLD[:, :, : self.length]
        return buffer

    def _expose(self) -> None:
        self.keys, self.values = self._keys[:, :, : self.length], self._values[:, :, : self.length]

    def _make_room(self, new: int) -> None:
        if self.length + new > self._keys.shape[-2]:
            self._expose()
            capacity = 2 * (self.length + new)
            self._keys, self._values = self._reserve(self.keys, capacity), self._reserve(self.values, capacity)

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        new = key_states.shape[-2]
        self._make_room(new)
        self._keys[:, :, self.length: self.length + new] = key_states
        self._values[:, :, self.length: self.length + new] = value_states
        self.length += new
        self._expose()
        return self.keys, self.values

    def append_slot(self) -> tuple[torch.Tensor, torch.Tensor, int]:
        """Room for one more token per row, counted as filled: (keys buffer, values buffer, its position), the
        buffers (B, heads, capacity, D) whole; the caller writes the token's key and value there
        (`native.DecodeLayer`)."""
        self._make_room(1)
        position, self.length = self.length, self.length + 1
        self._expose()
        return self._keys, self._values, position

    def get_seq_length(self) -> int:
        return self.length

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        """Keep the batch rows `indices`. Finished rows leave during decoding with `indices` ascending: then
        the kept rows move up in place and only their filled part is copied (indexing the whole reserved
        buffer copied every row's unused room too: 7% of a 256-token batch-8 rollout)."""
        kept = indices.tolist()
        if kept != sorted(set(kept)):
            self._keys, self._values = self._keys[indices], self._values[indices]
        else:
            moved = next((slot for slot, row in enumerate(kept) if slot != row), len(kept))
            for buffer in (self._keys, self._values):  # the gather on the right copies before the write
                buffer[moved:len(kept), :, : self.length] = buffer[kept[moved:], :, : self.length]
            self._keys, self._values = self._keys[: len(kept)], self._values[: len(kept)]
        self._expose()

    def batch_repeat_interleave(self, repeats: int) -> None:
        self._keys = self._keys.repeat_interleave(repeats, dim=0)
        self._values = self._values.repeat_interleave(repeats, dim=0)
        self._expose()


def reserve_cache(cache, new_tokens: int, dtype: torch.dtype | None = None) -> None:
    """Swap the plain growing layers of a prefilled cache for `ReservedLayer`s with room for `new_tokens` more
    (in `dtype`, None: the prefill's)."""
    for index, layer in enumerate(cache.layers):
        if type(layer) is DynamicLayer and layer.is_initialized:  # sliding-window and other layers keep their own
            cache.layers[index] = ReservedLayer(layer.keys, layer.values, layer.get_seq_length() + new_tokens, dtype)


@contextmanager
def decoding(model: torch.nn.Module) -> Iterator[LeanDecoder | None]:
    """The decode path for `model` during one `generate`: a `LeanDecoder` where it covers the model,
    else None, and the transformers forward pass runs on `prepacked_linears` (CPU float32) or as it is."""
    if LeanDecoder.supports(model):
        yield LeanDecoder(model)
        return
    with prepacked_linears(model):
        yield None


class HFEngine(EngineBase):
    """Batched KV-cache sampling with a local transformers causal LM (CPU or one GPU)."""

    name = "hf"

    def __init__(
        self,
        model_path: str | Path,
        device: str = "cpu",
        batch_size: int = 128,
        dtype: torch.dtype | None = None,
        progress: bool | None = None,
    ) -> None:
        """batch_size counts sequences (prompts x samples); progress None shows tqdm only on a tty.

        dtype None: float32 weights on a CPU, so the update hands its float32 model to the next rollout
        without a reload; decode steps run on the native kernel (`lean_decode`), whose linears read a bf16
        copy of the weights where the CPU has AVX512-BF16 and the precision is bf16. `models.best_dtype`
        on a GPU.
        """
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.device = device
        self.batch_size = batch_size
        if dtype is None and torch.device(device).type == "cpu":
            dtype = torch.float32
        self.dtype = dtype
        self.progress = progress
        self.tokenizer = load_tokenizer(model_path)
        self.load_weights(model_path)

    @classmethod
    def from_model(cls, model: torch.nn.Module, tokenizer, checkpoint_id: str, batch_size: int = 32,
                   progress: bool | None = False) -> HFEngine:
        """An engine around an in-memory model (shared, not copied), e.g. the policy during RL."""
        engine = cls.__new__(cls)
        engine.device = str(next(model.parameters()).device)
        engine.batch_size, engine.dtype, engine.progress = batch_size, None, progress
        engine.tokenizer, engine.model, engine.checkpoint_id = tokenizer, model, checkpoint_id
        return engine

    def load_weights(self, model_path: str | Path) -> None:
        """Load a checkpoint (same tokenizer); its directory name becomes the default checkpoint id.

        The model comes from the run's `models.resident_models()` (shared with its other stages, never
        changed here).
        """
        self.model = resident_models().get(model_path, dtype=self.dtype, device=self.device)
        self.checkpoint_id = Path(model_path).name

    def close(self) -> None:
        self.model = None

    @property
    def max_context(self) -> int:
        return int(self.model.config.max_position_embeddings)

    def generate(
        self,
        prompts: list[dict],
        sampling: SamplingParams,
        run_id: str,
        iteration: int,
        checkpoint_id: str | None = None,
    ) -> list[dict]:
        """Rows of the ROLLOUTS schema, `sampling.n` per prompt, ordered by (prompt, sample_index)."""
        prompt_ids = [render_prompt(self.tokenizer, row["messages"]) for row in prompts]
        self._check_lengths(prompts, prompt_ids, sampling.max_new_tokens)
        sampler = TokenSampler(sampling.temperature, sampling.top_p,
                               torch.Generator(device="cpu").manual_seed(sampling.seed))
        order = sorted(range(len(prompts)), key=lambda i: (len(prompt_ids[i]), i))
        per_batch = max(1, self.batch_size // sampling.n)
        batches = [order[start:start + per_batch] for start in range(0, len(order), per_batch)]
        show = self.progress if self.progress is not None else sys.stderr.isatty()
        samples: dict[int, list[tuple[list[int], list[float]]]] = {}
        with torch.inference_mode(), attention_kernels(self.device), decoding(self.model) as decoder:
            for batch in tqdm(batches, desc=f"rollout {self.checkpoint_id}", disable=not show, unit="batch"):
                outputs = self._generate_batch([prompt_ids[i] for i in batch], sampling, sampler, decoder)
                for k, i in enumerate(batch):
                    samples[i] = outputs[k * sampling.n:(k + 1) * sampling.n]
        checkpoint = checkpoint_id or self.checkpoint_id
        return [
            self._row(prompts[i], prompt_ids[i], j, tokens, logprobs, sampling, run_id, iteration, checkpoint)
            for i in range(len(prompts)) for j, (tokens, logprobs) in enumerate(samples[i])
        ]

    def _check_lengths(self, prompts: list[dict], prompt_ids: list[list[int]], max_new_tokens: int) -> None:
        check_prompt_lengths(prompts, prompt_ids, self.max_context, max_new_tokens)

    def _generate_batch(
        self, prompt_ids: list[list[int]], sampling: SamplingParams, sampler: TokenSampler,
        decoder: LeanDecoder | None = None,
    ) -> list[tuple[list[int], list[float]]]:
        """Sample `n` responses per prompt; returns (token ids, raw log-probs) per row, prompt-major.

        The prompts are prefilled by the transformers model (its body under bf16 autocast and the head packed,
        `LeanDecoder.prefill`, when `decoder` is given); decode steps run on `decoder` when given.
        """
        eos_id = self.tokenizer.eos_token_id
        input_ids_BL, mask_BL, positions_BL = (t.to(self.device) for t in left_pad(prompt_ids, self.tokenizer.pad_token_id))
        if decoder is not None:
            cache, logits_BV = decoder.prefill(self.model, input_ids_BL, mask_BL, positions_BL)
        else:
            out = self.model(input_ids=input_ids_BL, attention_mask=mask_BL, position_ids=positions_BL,
                             use_cache=True, logits_to_keep=1)
            cache, logits_BV = out.past_key_values, out.logits[:, -1]
        reserve_cache(cache, sampling.max_new_tokens, decoder.cache_dtype if decoder is not None else self.model.dtype)
        if decoder is not None and not all(isinstance(layer, ReservedLayer) for layer in cache.layers):
            decoder = None
        if sampling.n > 1:  # one cache copy per sample, prompt-major
            cache.batch_repeat_interleave(sampling.n)
            logits_BV = logits_BV.repeat_interleave(sampling.n, dim=0)
            mask_BL = mask_BL.repeat_interleave(sampling.n, dim=0)
            positions_BL = positions_BL.repeat_interleave(sampling.n, dim=0)
        rows = mask_BL.shape[0]
        tokens: list[list[int]] = [[] for _ in range(rows)]
        logprobs: list[list[float]] = [[] for _ in range(rows)]
        live_B = torch.arange(rows)  # original row index of each live batch row
        next_position_B = positions_BL[:, -1] + 1
        for step in range(sampling.max_new_tokens):
            new_B, new_logprob_B = sampler(logits_BV)
            for row, token, logprob in zip(live_B.tolist(), new_B.tolist(), new_logprob_B.tolist()):
                tokens[row].append(token)
                logprobs[row].append(logprob)
            keep_B = new_B != eos_id
            if step == sampling.max_new_tokens - 1 or not bool(keep_B.any()):
                break
            if not bool(keep_B.all()):  # drop finished rows from the batch and the cache
                keep_idx = keep_B.nonzero().squeeze(-1)
                live_B = live_B[keep_idx.cpu()]
                new_B, next_position_B, mask_BL = new_B[keep_idx], next_position_B[keep_idx], mask_BL[keep_idx]
                cache.batch_select_indices(keep_idx)
            mask_BL = torch.cat([mask_BL, mask_BL.new_ones((mask_BL.shape[0], 1))], dim=-1)
            if decoder is not None:
                logits_BV = decoder.step(new_B, next_position_B, None if bool(mask_BL.all()) else mask_BL.bool(), cache)
            else:
                out = self.model(input_ids=new_B[:, None], attention_mask=mask_BL,
                                 position_ids=next_position_B[:, None], past_key_values=cache, use_cache=True)
                cache, logits_BV = out.past_key_values, out.logits[:, -1]
            next_position_B = next_position_B + 1
        return list(zip(tokens, logprobs))

    def _row(self, prompt: dict, prompt_ids: list[int], sample_index: int, tokens: list[int], logprobs: list[float],
             sampling: SamplingParams, run_id: str, iteration: int, checkpoint_id: str) -> dict:
        stopped = bool(tokens) and tokens[-1] == self.tokenizer.eos_token_id
        return rollout_row(self.name, self.tokenizer, prompt, prompt_ids, sample_index, tokens, logprobs,
                           "stop" if stopped else "length", run_id, iteration, checkpoint_id)
