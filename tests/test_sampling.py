"""The token sampler: the two-level inverse CDF draws the right distribution, never a zero-weight token,
and records raw log-probs; a decode step reuses one workspace."""

from __future__ import annotations

import pytest
import torch

from gopd_core.rollout import native
from gopd_core.rollout.sampling import TokenSampler, block_sums, draw_tokens, top_p_filter

needs_native = pytest.mark.skipif(not native.available(), reason=f"native kernels: {native.unavailable_reason()}")


def _within_4_sigma(draws: torch.Tensor, probs_V: torch.Tensor) -> None:
    """Each frequent token's count, and the pooled count of the rare ones (expected < 50), within 4 binomial sigmas."""
    n = draws.numel()
    counts = torch.bincount(draws, minlength=probs_V.numel()).double()
    probs_V = probs_V.double()
    rare = probs_V * n < 50
    counts = torch.cat([counts[~rare], counts[rare].sum()[None]])
    probs_V = torch.cat([probs_V[~rare], probs_V[rare].sum()[None]])
    expected, spread = probs_V * n, (probs_V * (1 - probs_V) * n).sqrt()
    assert ((counts - expected).abs() <= 4 * spread + 1e-9).all(), (counts, expected)


def test_top_p_filter_by_hand():
    # sorted probs 0.5, 0.3, 0.2: mass before each is 0, 0.5, 0.8; top_p 0.7 keeps the first two
    probs_BV = torch.tensor([[0.2, 0.5, 0.3]])
    torch.testing.assert_close(top_p_filter(probs_BV, 0.7), torch.tensor([[0.0, 0.5, 0.3]]))


def test_block_sums_by_hand():
    # blocks of 2 over 5 entries: [1+2, 3+4, 5]
    sums = block_sums(torch.tensor([[1.0, 2.0, 3.0, 4.0, 5.0]]), block=2)
    assert sums.dtype == torch.float64 and sums.tolist() == [[3.0, 7.0, 5.0]]


@pytest.mark.parametrize("block", [2, 3, 1024])  # several blocks with a short last one, and a single block
def test_draw_tokens_follows_the_distribution_and_never_draws_a_zero_weight_token(block):
    # the zero-weight entries fill whole blocks of 2 (0-1 is [0, 0.5]; 5-6 is [0.05, 0]; 6 is the last)
    probs_V = torch.tensor([0.0, 0.5, 0.0, 0.3, 0.15, 0.05, 0.0])
    generator = torch.Generator().manual_seed(0)
    draws = torch.cat([draw_tokens(probs_V.expand(500, -1), generator, block=block) for _ in range(40)])
    assert draws[probs_V[draws] == 0].numel() == 0
    _within_4_sigma(draws, probs_V)  # 20,000 draws
    unnormalised = draw_tokens(torch.tensor([[0.0, 2.0, 0.0, 6.0]]).expand(4000, -1), generator, block=block)
    assert set(unnormalised.tolist()) == {1, 3} and 0.72 < (unnormalised == 3).double().mean() < 0.78
    again = torch.Generator().manual_seed(0)
    assert torch.equal(draw_tokens(probs_V.expand(500, -1), again, block=block), draws[:500])  # same seed


def test_rounding_never_steps_onto_a_zero_weight_token():
    # block sums that overstate a block (float32 rounding, exaggerated): a target past the block's own
    # content stays on its last positive token, and the row's total never lands on the empty tail
    weights = torch.tensor([[1.0, 0.0, 0.0, 0.0, 1.0, 0.0]]).expand(2000, -1)
    overstated = torch.tensor([[2.0, 1.0]], dtype=torch.float64).expand(2000, -1)
    draws = draw_tokens(weights, torch.Generator().manual_seed(3), sums_BN=overstated, block=3)
    assert set(draws.tolist()) == {0, 4}


@pytest.mark.parametrize("temperature", [1.0, 0.6])
def test_sampler_records_raw_logprobs_and_samples_the_tempered_distribution(temperature):
    vocab = 2500  # three blocks, the last one short
    logits_V = torch.randn(vocab, generator=torch.Generator().manual_seed(1)) * 4
    sampler = TokenSampler(temperature, 1.0, torch.Generator().manual_seed(2))
    draws, logprobs = zip(*(sampler(logits_V.expand(400, -1)) for _ in range(50)))
    draws, logprobs = torch.cat(draws), torch.cat(logprobs)
    raw_V = torch.log_softmax(logits_V.double(), dim=-1)
    assert logprobs.dtype == torch.float32
    torch.testing.assert_close(logprobs.double(), raw_V[draws], atol=1e-6, rtol=0)  # raw, not tempered
    _within_4_sigma(draws, torch.softmax(logits_V.double() / temperature, dim=-1))  # 20,000 draws


def test_greedy_and_nucleus_sampling():
    logits_BV = torch.tensor([[0.0, 3.0, 1.0, 2.0], [5.0, 0.0, 0.0, 0.0]])
    tokens, logprobs = TokenSampler(0.0, 1.0, torch.Generator().manual_seed(0))(logits_BV)
    assert tokens.tolist() == [1, 0]
    torch.testing.assert_close(logprobs, torch.log_softmax(logits_BV, -1)[[0, 1], [1, 0]])
    # probs of row 0: 0.64, 0.09, 0.24, 0.03 for tokens 1, 2, 3, 0 -> top_p 0.8 keeps tokens 1 and 3
    nucleus = TokenSampler(1.0, 0.8, torch.Generator().manual_seed(0))
    drawn = torch.cat([nucleus(logits_BV[:1].expand(500, -1))[0] for _ in range(4)])
    assert set(drawn.tolist()) == {1, 3}


def _torch_way(monkeypatch) -> None:
    monkeypatch.setattr(native, "available", lambda: False)


@needs_native
@pytest.mark.parametrize("vocab, rows", [(7, 300), (259, 64), (2500, 64), (32000, 8), (151936, 4)])
def test_the_native_draw_is_the_torch_draw(monkeypatch, vocab, rows):
    # same generator, same uniforms: the same tokens but where a uniform falls within rounding of a token's edge
    # (the native block sums are float64, torch's float32), and the same raw log-probs to float32 rounding
    logits = torch.randn(20, rows, vocab, generator=torch.Generator().manual_seed(vocab)) * 3
    logits[:, :, : vocab // 3] = float("-inf")  # never drawn: exactly zero weight
    fast = TokenSampler(1.0, 1.0, torch.Generator().manual_seed(5))
    drawn, logprobs = map(torch.cat, zip(*(fast(step) for step in logits)))
    assert fast._workspace is None  # the native way: no workspace, no torch draw
    _torch_way(monkeypatch)
    slow = TokenSampler(1.0, 1.0, torch.Generator().manual_seed(5))
    expected, expected_logprobs = map(torch.cat, zip(*(slow(step) for step in logits)))
    assert (drawn != expected).sum() <= 1 and (drawn >= vocab // 3).all()
    same = drawn == expected
    torch.testing.assert_close(logprobs[same], expected_logprobs[same], atol=2e-6, rtol=1e-6)


@needs_native
def test_rows_with_non_finite_logits_take_the_torch_way_from_the_same_generator_state(monkeypatch):
    logits = torch.randn(3, 4, 50, generator=torch.Generator().manual_seed(0))
    logits[1, 2, 7] = float("nan")  # the second step has a NaN row
    fast = TokenSampler(1.0, 1.0, torch.Generator().manual_seed(1))
    got = [fast(step) for step in logits]
    _torch_way(monkeypatch)
    slow = TokenSampler(1.0, 1.0, torch.Generator().manual_seed(1))
    for (tokens, logprobs), (expected, expected_logprobs) in zip(got, (slow(step) for step in logits)):
        assert torch.equal(tokens, expected)
        torch.testing.assert_close(logprobs, expected_logprobs, atol=2e-6, rtol=1e-6, equal_nan=True)


def test_a_decode_step_reuses_the_workspace_as_rows_leave(monkeypatch):
    _torch_way(monkeypatch)  # the native draw keeps no workspace
    sampler = TokenSampler(1.0, 1.0, torch.Generator().manual_seed(0))
    sampler(torch.randn(8, 3000))
    workspace = sampler._workspace
    for rows in (8, 5, 1):
        sampler(torch.randn(rows, 3000))
        assert sampler._workspace is workspace
