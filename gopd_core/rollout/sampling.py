"""Drawing the next token of every row from a batch of logits, without vocabulary-sized allocations.

`TokenSampler` per decode step, for (B, V) logits:
1. weights = exp(logits - row max), written into one (B, V) float32 workspace kept for the whole
   rollout; per-block sums of 1,024 entries give the row's total, so the recorded log-prob of the
   drawn token, logits[token] - max - log(total), is under the raw distribution;
2. temperature rewrites the workspace as exp((logits - max) / T); top-p zeroes tokens outside the
   nucleus; temperature 0 takes the argmax;
3. one uniform per row picks a block by the float64 cumulative sum of the block sums, then a token
   by the cumulative sum inside that block (inverse CDF in two levels).

On CPUs with the native kernels, temperature 1 without top-p (on-policy sampling) runs steps 1 and 3 in one
native call (`native.sample_rows`): the same two-level draw at the same uniform, the block sums in float64.

Why: at 8 rows x 151,936 tokens, log_softmax, softmax and a float64 cumulative sum over the whole
vocabulary allocated five fresh 5-10 MB buffers per step. Memory that large comes from a fresh
mmap each time, and first touches of its pages were 380,000 page faults per 64-token rollout on
the VMs we measure on (`benchmarks/field_gkd.py`), on top of the passes themselves.
"""

from __future__ import annotations

import torch

from gopd_core.rollout import native

__all__ = ["TokenSampler", "draw_tokens", "top_p_filter"]

BLOCK = 1024  # vocabulary entries per block of the two-level inverse CDF


class TokenSampler:
    """Samples one token per row; returns (tokens_B, raw log-probs of those tokens_B, float32).

    Rows may only shrink between calls (finished rows leave the batch): the workspace is sized by the
    first call. Draws use `generator` (CPU) wherever the logits are: same seed, same tokens.
    """

    def __init__(self, temperature: float, top_p: float, generator: torch.Generator) -> None:
        self.temperature, self.top_p, self.generator = temperature, top_p, generator
        self._workspace: torch.Tensor | None = None

    def __call__(self, logits_BV: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        logits_BV = logits_BV.float()
        rows, vocab = logits_BV.shape
        if self.temperature == 1 and self.top_p >= 1.0 and logits_BV.device.type == "cpu" and native.available():
            # the same draw in one native pass per row (no workspace, no ~15 torch ops a step), at the uniform
            # `draw_tokens` would take; rows with non-finite logits go the torch way, from the same generator state
            state = self.generator.get_state()
            uniform_B = torch.rand((rows, 1), generator=self.generator, dtype=torch.float64)[:, 0]
            drawn = native.sample_rows(logits_BV.contiguous(), uniform_B, BLOCK)
            if drawn is not None:
                return drawn
            self.generator.set_state(state)
        max_B1 = logits_BV.amax(dim=-1, keepdim=True)
        weights_BV = torch.sub(logits_BV, max_B1, out=self._rows(rows, vocab, logits_BV.device)).exp_()
        sums_BN = block_sums(weights_BV)
        log_total_B1 = sums_BN.sum(dim=-1, keepdim=True).log()
        if self.temperature == 0:
            tokens_B = logits_BV.argmax(dim=-1)
        else:
            if self.temperature != 1:
                torch.sub(logits_BV, max_B1, out=weights_BV).div_(self.temperature).exp_()
            if self.top_p < 1.0:
                weights_BV = top_p_filter(weights_BV / weights_BV.sum(dim=-1, keepdim=True), self.top_p)
            unchanged = self.temperature == 1 and self.top_p >= 1.0  # the raw weights: their sums are known
            tokens_B = draw_tokens(weights_BV, self.generator, sums_BN if unchanged else None)
        chosen_B1 = logits_BV.gather(-1, tokens_B[:, None]) - max_B1
        return tokens_B, (chosen_B1.double() - log_total_B1).float().squeeze(-1)

    def _rows(self, rows: int, vocab: int, device: torch.device) -> torch.Tensor:
        workspace = self._workspace
        if workspace is None or workspace.shape[0] < rows or workspace.shape[1] != vocab or workspace.device != device:
            workspace = self._workspace = torch.empty((rows, vocab), dtype=torch.float32, device=device)
        return workspace[:rows]


def block_sums(weights_BV: torch.Tensor, block: int = BLOCK) -> torch.Tensor:
    """(B, ceil(V / block)) float64 sums of consecutive blocks of `block` entries (the last may be short).

    Each block is summed in float32 (torch's cascaded sum keeps it accurate to float32 rounding of the
    block's own mass), then the blocks are added up in float64: a small block's mass is never lost
    next to a large one's.
    """
    rows, vocab = weights_BV.shape
    if vocab <= block:
        return weights_BV.sum(dim=-1, keepdim=True).double()
    full = vocab // block
    parts = [weights_BV[:, :full * block].reshape(rows, full, block).sum(dim=-1)]
    if full * block < vocab:
        parts.append(weights_BV[:, full * block:].sum(dim=-1, keepdim=True))
    return torch.cat(parts, dim=-1).double()


def draw_tokens(weights_BV: torch.Tensor, generator: torch.Generator, sums_BN: torch.Tensor | None = None,
                block: int = BLOCK) -> torch.Tensor:
    """One token per row with probability proportional to `weights_BV` (>= 0, unnormalised): inverse CDF.

    One uniform per row (CPU generator). The cumulative sums run in float64; zero-weight tokens have
    empty intervals and are never drawn, and where rounding would step past the last token of
    positive weight (of the row, then of the chosen block) the draw stays on it. `sums_BN` are
    `block_sums(weights_BV, block)` when the caller has them already.
    """
    rows, vocab = weights_BV.shape
    uniform_B1 = torch.rand((rows, 1), generator=generator, dtype=torch.float64).to(weights_BV.device)
    if vocab <= block:  # one block: a single cumulative sum is all it takes
        cdf_BV = weights_BV.double().cumsum(dim=-1)
        tokens_B1 = torch.searchsorted(cdf_BV, uniform_B1 * cdf_BV[:, -1:], right=True)
        return torch.minimum(tokens_B1, last_positive(cdf_BV)).squeeze(-1)
    cdf_BN = (block_sums(weights_BV, block) if sums_BN is None else sums_BN).cumsum(dim=-1)
    target_B1 = uniform_B1 * cdf_BN[:, -1:]
    block_B1 = torch.minimum(torch.searchsorted(cdf_BN, target_B1, right=True), last_positive(cdf_BN))
    mass_before_B1 = torch.where(block_B1 > 0, cdf_BN.gather(-1, (block_B1 - 1).clamp(min=0)), 0.0)
    index_BK = block_B1 * block + torch.arange(block, device=weights_BV.device)
    inside_BK = weights_BV.gather(-1, index_BK.clamp(max=vocab - 1)).double().masked_fill_(index_BK >= vocab, 0.0)
    inner_cdf_BK = inside_BK.cumsum(dim=-1)
    offset_B1 = torch.searchsorted(inner_cdf_BK, target_B1 - mass_before_B1, right=True)
    return (block_B1 * block + torch.minimum(offset_B1, last_positive(inner_cdf_BK))).squeeze(-1)


def last_positive(cdf_BN: torch.Tensor) -> torch.Tensor:
    """(B, 1) index of the last entry with positive mass: the first where the cumulative sum reaches its total."""
    return (cdf_BN < cdf_BN[:, -1:]).sum(dim=-1, keepdim=True)


def top_p_filter(probs_BV: torch.Tensor, top_p: float) -> torch.Tensor:
    """Zero all tokens outside the smallest set whose probability reaches `top_p` (top-1 always kept)."""
    sorted_BV, order_BV = probs_BV.sort(dim=-1, descending=True)
    mass_before_BV = sorted_BV.cumsum(dim=-1) - sorted_BV
    sorted_BV = sorted_BV.masked_fill(mass_before_BV >= top_p, 0.0)
    return torch.zeros_like(probs_BV).scatter(-1, order_BV, sorted_BV)
