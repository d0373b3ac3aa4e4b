"""Scoring's native causal attention (`rollout/causal_attention.c`, `gopd_core/attention.py`) against SDPA."""

from __future__ import annotations

import contextlib

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from transformers import LlamaConfig, LlamaForCausalLM

from gopd_core import attention, hardware, head_logprobs, scoring
from gopd_core.head_logprobs import sampled_token_logprobs
from gopd_core.rollout import native
from gopd_core.scoring import plan_microbatches, response_logprobs

NO_BF16 = "this CPU has no AVX512-BF16: the native bf16 attention cannot run here (scoring keeps SDPA, tested elsewhere)"
needs_bf16 = pytest.mark.skipif("avx512_bf16" not in hardware.cpu_flags(), reason=NO_BF16)


def projections(batch: int, length: int, heads: int, kv_heads: int, dim: int, seed: int):
    """bf16 q (B, H, L, D) and k, v (B, Hkv, L, D), strided as transformers makes them: (B, L, H, D) transposed."""
    generator = torch.Generator().manual_seed(seed)
    queries = torch.randn(batch, length, heads, dim, generator=generator).to(torch.bfloat16).transpose(1, 2)
    kv = torch.randn(batch, length, 2 * kv_heads, dim, generator=generator).to(torch.bfloat16).transpose(1, 2)
    return queries, kv[:, :kv_heads], kv[:, kv_heads:]


def sdpa_float32(queries, keys, values) -> torch.Tensor:
    group = queries.shape[1] // keys.shape[1]
    expand = lambda t: t.float().repeat_interleave(group, dim=1)  # noqa: E731
    return F.scaled_dot_product_attention(queries.float(), expand(keys), expand(values), is_causal=True).transpose(1, 2)


@needs_bf16
@pytest.mark.parametrize(("batch", "length", "heads", "kv_heads", "dim"), [
    (1, 1, 2, 2, 32), (2, 15, 4, 4, 16), (1, 16, 2, 1, 32), (3, 37, 4, 2, 64), (2, 100, 6, 3, 32),
    (1, 33, 2, 1, 128), (1, 300, 8, 8, 32), (2, 70, 2, 2, 48), (1, 50, 4, 4, 80),
])
def test_matches_float32_sdpa_within_bf16_rounding(batch, length, heads, kv_heads, dim):
    # the kernel rounds the weights and its output to bf16 (8 significant bits): values of size ~1 are off by
    # up to ~2^-8; everything else is float32, as SDPA's flash kernel does it
    queries, keys, values = projections(batch, length, heads, kv_heads, dim, seed=length)
    got = native.causal_attention(queries, keys, values, dim ** -0.5)
    assert got.shape == (batch, length, heads, dim) and got.dtype == torch.bfloat16
    want = sdpa_float32(queries, keys, values)
    torch.testing.assert_close(got.float(), want, atol=1.5e-2, rtol=1e-2)
    # position 0 sees only itself: its output is its own value, exactly (weight 1, rounded once)
    group = heads // kv_heads
    torch.testing.assert_close(got[:, 0].float(), values[:, :, 0].repeat_interleave(group, dim=1).float(),
                               atol=0, rtol=0)


@needs_bf16
def test_causal_attention_rejects_what_it_cannot_compute():
    queries, keys, values = projections(1, 8, 2, 2, 32, seed=0)
    with pytest.raises(ValueError, match="bf16"):
        native.causal_attention(queries.float(), keys, values, 0.1)
    with pytest.raises(ValueError, match="head size"):
        native.causal_attention(*(t[..., :24] for t in (queries, keys, values)), 0.1)
    with pytest.raises(ValueError, match="kv heads"):
        native.causal_attention(torch.cat([queries, queries[:, :1]], dim=1), keys, values, 0.1)
    with pytest.raises(ValueError, match="strides"):
        native.causal_attention(queries.transpose(2, 3).contiguous().transpose(2, 3), keys, values, 0.1)
    assert not native.causal_attention_supported(24) and not native.causal_attention_supported(256)


def bf16_llama(heads: int, kv_heads: int, seed: int) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=97, hidden_size=heads * 32, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=heads, num_key_value_heads=kv_heads, max_position_embeddings=256,
                         attn_implementation="sdpa")
    return LlamaForCausalLM(config).to(torch.bfloat16).eval()


def count_native_calls(monkeypatch) -> list[int]:
    calls, kernel = [], native.causal_attention
    monkeypatch.setattr(native, "causal_attention", lambda *args, **kwargs: calls.append(1) or kernel(*args, **kwargs))
    return calls


def random_rows(count: int, seed: int) -> list[tuple[list[int], list[int]]]:
    generator = np.random.default_rng(seed)
    return [(generator.integers(1, 97, 5 + i).tolist(), generator.integers(1, 97, 3 + 7 * i).tolist())
            for i in range(count)]


@needs_bf16
@pytest.mark.parametrize("packed", [True, False])
def test_the_scorer_attends_natively_in_bf16_and_agrees_with_sdpa(monkeypatch, packed):
    model, sequences = bf16_llama(heads=4, kv_heads=2, seed=0), random_rows(6, seed=0)
    lengths = [len(p) + len(r) - 1 for p, r in sequences]
    with monkeypatch.context() as sdpa_only:
        sdpa_only.setattr(scoring, "cpu_attention", lambda model: contextlib.nullcontext(False))
        sdpa_only.setattr(scoring, "packs_rows", lambda model: False)
        sdpa = response_logprobs(model, sequences, token_budget=64)
    assert attention.packs_rows(model)
    if not packed:  # the padded micro-batches, as for models the packing does not cover
        monkeypatch.setattr(scoring, "packs_rows", lambda model: False)
    calls = count_native_calls(monkeypatch)
    ours = response_logprobs(model, sequences, token_budget=64)
    # 2 layers: once per layer per micro-batch, or per layer per row when the rows are packed
    assert len(calls) == 2 * (len(sequences) if packed else len(plan_microbatches(lengths, 64)))
    assert model.config._attn_implementation == "sdpa"  # the model is as it was
    differences = np.concatenate([np.abs(a - b) for a, b in zip(ours, sdpa, strict=True)])
    assert 0 < differences.max() < 0.05 and differences.mean() < 0.01  # another kernel, within bf16 rounding


def test_packs_hold_whole_rows_longest_first_within_the_budget():
    # lengths 30, 10, 25, 40, 5 sorted: 40, 30, 25, 10, 5; a budget of 64 takes 40 (+30 would be 70), then 30 + 25
    # (+10 would be 65), then 10 + 5; a row over the budget is a pack of its own
    assert scoring.plan_packs([30, 10, 25, 40, 5], 64) == [[3], [0, 2], [1, 4]]
    assert scoring.plan_packs([100, 3, 4], 64) == [[0], [2, 1]]
    with pytest.raises(ValueError, match="token_budget"):
        scoring.plan_packs([3], 0)


@pytest.mark.parametrize("dtype", [torch.float32, pytest.param(torch.bfloat16, marks=needs_bf16)])
def test_packed_rows_attend_within_each_row_only(dtype):
    # float32: SDPA row by row (the native kernel is bf16 only); bf16: the native kernel row by row
    model, lengths = bf16_llama(heads=4, kv_heads=2, seed=2).to(dtype), [7, 1, 12, 30]
    input_ids = torch.randint(1, 97, (1, sum(lengths)))
    positions = torch.cat([torch.arange(length) for length in lengths])[None]
    with torch.inference_mode(), attention.cpu_attention(model):
        with attention.packed_rows(lengths):
            packed = model(input_ids, position_ids=positions).logits[0]
        starts = np.cumsum([0, *lengths])
        alone = torch.cat([model(input_ids[:, start:start + length]).logits[0]
                           for start, length in zip(starts, lengths)])
    tolerance = 1e-5 if dtype == torch.float32 else 0.05
    torch.testing.assert_close(packed, alone, atol=tolerance, rtol=tolerance)
    with torch.inference_mode(), attention.cpu_attention(model):  # outside the block: one causal sequence again
        whole = model(input_ids).logits[0]
    assert (whole[starts[1]:] - alone[starts[1]:]).abs().max() > 10 * tolerance


def test_rows_are_packed_only_where_that_is_exact():
    from transformers import GPT2Config, GPT2LMHeadModel, Qwen2Config, Qwen2ForCausalLM

    model = bf16_llama(heads=2, kv_heads=2, seed=0)
    assert attention.packs_rows(model) and attention.packs_rows(model.float())  # any dtype: SDPA row by row
    with attention.cpu_attention(model):  # the update asks inside its block
        assert attention.packs_rows(model)
    sliding = Qwen2ForCausalLM(Qwen2Config(vocab_size=97, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                           num_attention_heads=2, num_key_value_heads=2, use_sliding_window=True,
                                           sliding_window=8, attn_implementation="sdpa"))
    assert not attention.packs_rows(sliding)  # a window would reach across rows' starts differently
    gpt2 = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=40, attn_implementation="sdpa"))
    assert not attention.packs_rows(gpt2)  # not a family whose positions are known to come from position ids
    model.config._attn_implementation = "eager"
    assert not attention.packs_rows(model)  # not switched by cpu_attention


@needs_bf16
def test_the_switch_is_undone_and_masks_and_gradients_keep_the_kernel_out(monkeypatch):
    model = bf16_llama(heads=2, kv_heads=2, seed=1)
    input_ids = torch.randint(1, 97, (2, 20))
    padding = torch.ones_like(input_ids)
    padding[1, 12:] = 0
    calls = count_native_calls(monkeypatch)
    with attention.cpu_attention(model) as switched:
        assert switched and model.config._attn_implementation == attention.ATTENTION
        model(input_ids).logits.sum().backward()  # gradients on: the kernel has no backward, SDPA runs
        assert not calls
        with torch.inference_mode():
            got = model(input_ids, attention_mask=padding).logits  # a padding mask: SDPA, unchanged
            assert not calls
            model(input_ids)  # plain causal inference: the kernel, once per layer
            assert len(calls) == 2
    assert model.config._attn_implementation == "sdpa"
    with torch.inference_mode():
        torch.testing.assert_close(got, model(input_ids, attention_mask=padding).logits, atol=0, rtol=0)
    with torch.inference_mode(), attention.cpu_attention(model.float()):
        model(input_ids)  # float32: SDPA
    assert len(calls) == 2


@pytest.mark.parametrize(("length", "float32"), [(40, True), (attention.FLOAT32_TRAINING_LENGTH, True),
                                                 (attention.FLOAT32_TRAINING_LENGTH + 1, False)])
def test_short_bf16_training_attention_runs_in_float32(length, float32):
    # CPU autocast would run SDPA in bf16, whose flash backward is slow at short lengths: float32 instead
    # (bf16 projections, or float32 ones as transformers' Llama passes them under autocast)
    module = torch.nn.Module()
    for dtype in (torch.bfloat16, torch.float32):
        queries, keys, values = (t.to(dtype).detach().requires_grad_()
                                 for t in projections(2, length, 4, 4, 32, seed=3))
        with torch.autocast("cpu", dtype=torch.bfloat16):
            got, _ = attention.cpu_attention_forward(module, queries, keys, values, None)
        got.float().sum().backward()
        assert got.dtype == torch.bfloat16 and queries.grad.dtype == dtype
        if float32:
            want = F.scaled_dot_product_attention(queries.float(), keys.float(), values.float(), is_causal=True)
        else:
            bf16 = [t.to(torch.bfloat16) for t in (queries, keys, values)]
            want = F.scaled_dot_product_attention(*bf16, is_causal=True)
        torch.testing.assert_close(got, want.transpose(1, 2).to(torch.bfloat16), atol=0, rtol=0)
    if float32:  # an additive bf16 mask (as transformers builds one for padding) is taken in float32 too
        mask = torch.zeros(1, 1, length, length, dtype=torch.bfloat16).masked_fill(
            torch.ones(length, length, dtype=torch.bool).triu(1), float("-inf"))
        with torch.autocast("cpu", dtype=torch.bfloat16):
            masked, _ = attention.cpu_attention_forward(module, queries, keys, values, mask)
        torch.testing.assert_close(masked, got, atol=1e-2, rtol=1e-2)


@needs_bf16
@pytest.mark.parametrize("rows, vocab", [(3, 1), (5, 17), (7, 259), (4, 32000), (9, 151936)])
def test_bf16_logsumexp_matches_torch(rows, vocab):
    logits = (torch.randn(rows, vocab, generator=torch.Generator().manual_seed(vocab)) * 4).bfloat16()
    got = native.logsumexp_bf16(logits)
    torch.testing.assert_close(got, torch.logsumexp(logits.float(), dim=-1), atol=3e-5, rtol=1e-6)
    strided = torch.cat([logits, logits], dim=1)[:, vocab // 2: vocab // 2 + vocab]  # rows with a stride
    torch.testing.assert_close(native.logsumexp_bf16(strided), torch.logsumexp(strided.float(), dim=-1),
                               atol=3e-5, rtol=1e-6)


@needs_bf16
def test_bf16_logsumexp_keeps_torchs_special_values_and_refuses_other_inputs():
    logits = torch.randn(5, 40).bfloat16()
    logits[0, 3], logits[1], logits[2, 7], logits[3, :30] = float("nan"), float("-inf"), float("inf"), float("-inf")
    torch.testing.assert_close(native.logsumexp_bf16(logits), torch.logsumexp(logits.float(), dim=-1), equal_nan=True)
    with pytest.raises(ValueError, match="bf16 CPU logits"):
        native.logsumexp_bf16(logits.float())


@needs_bf16
@pytest.mark.parametrize("rows, vocab", [(3, 1), (5, 17), (7, 259), (4, 32000), (2, 151936)])
def test_bf16_logprob_gradient_matches_the_float32_way(rows, vocab):
    # grad_n * (onehot(target_n) - softmax(logits_n)), as the head's float32 backward computes it before its
    # bf16 cast: equal up to one bf16 rounding step (the exponentials differ in their last float32 bits)
    generator = torch.Generator().manual_seed(vocab)
    logits = (torch.randn(rows, 2 * vocab, generator=generator) * 4).bfloat16()[:, vocab // 2: vocab // 2 + vocab]
    targets, upstream = torch.randint(0, vocab, (rows,), generator=generator), torch.randn(rows, generator=generator)
    got = native.logprob_grad_bf16(logits, native.logsumexp_bf16(logits), upstream, targets)
    probs = logits.float().softmax(-1)
    expected = (probs * -upstream[:, None]).scatter_add_(1, targets[:, None], upstream[:, None]).bfloat16()
    assert got.dtype == torch.bfloat16 and got.shape == (rows, vocab) and got.is_contiguous()
    torch.testing.assert_close(got.float(), expected.float(), atol=1e-30, rtol=2 ** -7)
    masked = logits.clone()
    masked[:, : vocab // 2] = float("-inf")  # e.g. a masked vocabulary: exactly zero gradient there
    grad = native.logprob_grad_bf16(masked, native.logsumexp_bf16(masked), upstream, targets.clamp(min=vocab // 2))
    assert torch.equal(grad[:, : vocab // 2].float(), torch.zeros(rows, vocab // 2))
    with pytest.raises(ValueError, match="bf16 CPU logits"):
        native.logprob_grad_bf16(logits.float(), native.logsumexp_bf16(logits), upstream, targets)


@needs_bf16
def test_the_bf16_head_backward_takes_the_native_gradient(monkeypatch):
    # the update's head under bf16 autocast keeps bf16 logits and recomputes p in the native pass; the float32
    # way (monkeypatched off) gives the same gradients up to bf16 rounding
    head, hidden = _Head(64, 3000), torch.randn(11, 64)
    targets, upstream = torch.randint(0, 3000, (11,)), torch.randn(11)

    def gradients():
        hidden_NH = hidden.clone().requires_grad_(True)
        head.zero_grad()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            got_N = sampled_token_logprobs(head, hidden_NH, targets)
        (got_N * upstream).sum().backward()
        return got_N.detach(), hidden_NH.grad, head.lm_head.weight.grad.clone()

    calls, kernel = [], native.logprob_grad_bf16
    monkeypatch.setattr(native, "logprob_grad_bf16", lambda *args: calls.append(1) or kernel(*args))
    fused = gradients()
    assert calls
    monkeypatch.setattr(head_logprobs, "_native_logsumexp", lambda logits: False)
    plain = gradients()
    torch.testing.assert_close(fused[0], plain[0], atol=1e-4, rtol=1e-5)
    for one, other in zip(fused[1:], plain[1:]):
        torch.testing.assert_close(one, other, atol=2e-3, rtol=2e-2)


@needs_bf16
def test_bf16_scoring_takes_the_fused_logsumexp(monkeypatch):
    model, sequences = bf16_llama(heads=2, kv_heads=2, seed=3), random_rows(4, seed=3)
    calls, kernel = [], native.logsumexp_bf16
    monkeypatch.setattr(native, "logsumexp_bf16", lambda logits: calls.append(logits.shape) or kernel(logits))
    fused = response_logprobs(model, sequences)
    assert calls  # the scorer's bf16 logits went through the kernel
    monkeypatch.setattr(native, "logsumexp_bf16", kernel)
    monkeypatch.setattr(head_logprobs, "_native_logsumexp", lambda logits: False)
    plain = response_logprobs(model, sequences)
    assert max(np.abs(a - b).max() for a, b in zip(fused, plain, strict=True)) < 1e-4


def test_the_head_backward_runs_in_the_autocast_dtype_on_cpu():
    # CPU autocast is off inside backward passes; the hand-written head backward casts to the forward's dtype
    torch.manual_seed(0)
    head = _Head(32, 50)
    hidden_NH = torch.randn(7, 32, requires_grad=True)
    targets_N, upstream_N = torch.randint(0, 50, (7,)), torch.randn(7)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got_N = sampled_token_logprobs(head, hidden_NH, targets_N)
    (got_N * upstream_N).sum().backward()
    assert got_N.dtype == hidden_NH.grad.dtype == head.lm_head.weight.grad.dtype == torch.float32
    # the same gradient from bf16-rounded operands, in float64: d logprob / d logits = onehot - softmax
    weight_VH, rounded_hidden = head.lm_head.weight.detach(), hidden_NH.detach().bfloat16()
    logits_NV = (rounded_hidden.double() @ weight_VH.bfloat16().double().T).bfloat16().double()
    grad_NV = (F.one_hot(targets_N, 50) - logits_NV.softmax(-1)) * upstream_N.double()[:, None]
    grad_NV = grad_NV.bfloat16().double()
    torch.testing.assert_close(hidden_NH.grad.double(), grad_NV @ weight_VH.bfloat16().double(), atol=2e-2, rtol=2e-2)
    torch.testing.assert_close(head.lm_head.weight.grad.double(), grad_NV.T @ rounded_hidden.double(),
                               atol=2e-2, rtol=2e-2)
    # bf16 matmuls give bf16 results: every gradient entry is a bf16 number (float32 ones would not be)
    for grad in (hidden_NH.grad, head.lm_head.weight.grad):
        assert torch.equal(grad, grad.bfloat16().float())


def test_the_head_casts_its_weight_once_per_update_step():
    # the backward reuses the forward's bf16 copy of the weight (a (V, H) cast, 37 ms at 151,936 x 512)
    head = _Head(32, 50)
    hidden_NH = torch.randn(7, 32, requires_grad=True)
    with torch.profiler.profile(record_shapes=True) as profile:
        with torch.autocast("cpu", dtype=torch.bfloat16):
            got_N = sampled_token_logprobs(head, hidden_NH, torch.randint(0, 50, (7,)))
        got_N.sum().backward()
    weight_sized_casts = [event.cpu_parent.cpu_parent.name for event in profile.events() if event.name == "aten::_to_copy"
                          and event.input_shapes and list(event.input_shapes[0]) == [50, 32]]
    # the weight to bf16 in the forward, its bf16 gradient to float32 in the backward; no second weight cast
    assert weight_sized_casts == ["_SampledTokenLogprob", "_SampledTokenLogprobBackward"], weight_sized_casts
    assert head.lm_head.weight.grad.dtype == torch.float32


class _Head(torch.nn.Module):
    def __init__(self, hidden: int, vocab: int) -> None:
        super().__init__()
        self.lm_head = torch.nn.Linear(hidden, vocab, bias=False)
        self.config = type("Config", (), {})()

    def get_output_embeddings(self) -> torch.nn.Module:
        return self.lm_head


needs_avx512 = pytest.mark.skipif(not native.training_attention_supported(32),
                                  reason="this CPU has no AVX-512F: the update keeps SDPA (tested above)")


def packed_projections(heads: int, kv_heads: int, dim: int, lengths: list[int], seed: int):
    """q (H, T, D), k, v (Hkv, T, D) as views of one (T, (H + 2 Hkv) D) projection, and the rows' bounds."""
    total = sum(lengths)
    qkv = torch.randn(total, (heads + 2 * kv_heads) * dim, generator=torch.Generator().manual_seed(seed)) * 2
    queries = qkv[:, :heads * dim].view(total, heads, dim).transpose(0, 1)
    keys = qkv[:, heads * dim:(heads + kv_heads) * dim].view(total, kv_heads, dim).transpose(0, 1)
    values = qkv[:, (heads + kv_heads) * dim:].view(total, kv_heads, dim).transpose(0, 1)
    bounds = torch.tensor([0, *np.cumsum(lengths).tolist()], dtype=torch.int64)
    return queries, keys, values, bounds


def rows_in_float64(queries, keys, values, bounds, scale):
    """Each row's causal SDPA in float64, joined: (T, H, D)."""
    group = queries.shape[0] // keys.shape[0]
    rows = []
    for start, end in zip(bounds[:-1].tolist(), bounds[1:].tolist()):
        q, k, v = (t[:, start:end].double() for t in (queries, keys, values))
        rows.append(F.scaled_dot_product_attention(q, k.repeat_interleave(group, 0), v.repeat_interleave(group, 0),
                                                   is_causal=True, scale=scale).transpose(0, 1))
    return torch.cat(rows)


@needs_avx512
@pytest.mark.parametrize(("heads", "kv_heads", "dim", "lengths"), [
    (4, 2, 16, [13, 1, 40]), (16, 16, 32, [88, 97, 110]), (8, 8, 64, [7, 33]), (2, 1, 128, [9, 20]),
    (6, 3, 48, [17, 5]), (2, 2, 32, [300]),
])
def test_training_attention_and_its_gradients_match_float64_sdpa(heads, kv_heads, dim, lengths):
    queries, keys, values, bounds = packed_projections(heads, kv_heads, dim, lengths, seed=sum(lengths))
    scale = dim ** -0.5
    out, lse = native.training_attention_forward(queries, keys, values, bounds, scale)
    wide = [t.detach().double().requires_grad_() for t in (queries, keys, values)]
    want = rows_in_float64(*wide, bounds, scale)
    torch.testing.assert_close(out.double(), want, atol=2e-5, rtol=1e-5)
    grad = torch.randn(want.shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    want.backward(grad)
    got = native.training_attention_backward(queries, keys, values, out, grad.float().contiguous(), lse, bounds, scale)
    for name, mine, theirs in zip(("queries", "keys", "values"), got, wide):
        torch.testing.assert_close(mine.double(), theirs.grad, atol=1e-4, rtol=1e-5, msg=f"gradient of the {name}")


@needs_avx512
def test_training_attention_refuses_what_it_cannot_compute():
    queries, keys, values, bounds = packed_projections(2, 2, 32, [5, 6], seed=0)
    with pytest.raises(ValueError, match="float32 CPU"):
        native.training_attention_forward(queries.double(), keys, values, bounds, 0.2)
    with pytest.raises(ValueError, match="16 to 128 in steps of 16"):
        native.training_attention_forward(queries[..., :8], keys[..., :8], values[..., :8], bounds, 0.2)
    with pytest.raises(ValueError, match="bounds must be"):
        native.training_attention_forward(queries, keys, values, torch.tensor([0, 5, 10]), 0.2)
    out, lse = native.training_attention_forward(queries, keys, values, bounds, 0.2)
    with pytest.raises(ValueError, match="grad must be a contiguous float32"):
        native.training_attention_backward(queries, keys, values, out, out[:3], lse, bounds, 0.2)


def llama_with_heads_of(dim: int, seed: int) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=61, hidden_size=4 * dim, intermediate_size=96, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512)
    return LlamaForCausalLM(config)


def packed_backward(model, lengths: list[int], autocast: bool):
    """Logits and parameter gradients of one packed forward and backward through `cpu_attention`."""
    model.zero_grad()
    generator = torch.Generator().manual_seed(len(lengths))
    input_ids = torch.randint(0, 61, (1, sum(lengths)), generator=generator)
    positions = torch.cat([torch.arange(n) for n in lengths])[None]
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        with attention.cpu_attention(model), attention.packed_rows(lengths):
            logits = model(input_ids=input_ids, position_ids=positions).logits
        logits.float().pow(2).mean().backward()
    return logits.detach().float(), {name: p.grad.clone() for name, p in model.named_parameters()}


@needs_avx512
@pytest.mark.parametrize("autocast", [False, True])
def test_the_packed_update_runs_the_native_training_attention(autocast, monkeypatch):
    model, lengths = llama_with_heads_of(16, seed=7), [5, 17, 30]
    calls, kernel = [], native.training_attention_forward
    monkeypatch.setattr(native, "training_attention_forward", lambda *a: calls.append(a[3].tolist()) or kernel(*a))
    logits, grads = packed_backward(model, lengths, autocast)
    assert calls == [[0, 5, 22, 52]] * 2  # one call per layer for all rows
    monkeypatch.setattr(native, "training_attention_supported", lambda dim: False)  # SDPA row by row, as before
    sdpa_logits, sdpa_grads = packed_backward(model, lengths, autocast)
    assert len(calls) == 2
    # autocast: the same bf16 output; gradients then pass bf16 matmuls, where a last-bit difference can round an
    # entry to the neighbouring bf16 value (~0.4%)
    tolerance = 1e-2 if autocast else 1e-5
    torch.testing.assert_close(logits, sdpa_logits, atol=1e-5, rtol=1e-5)
    for name, grad in grads.items():
        torch.testing.assert_close(grad, sdpa_grads[name], atol=tolerance * float(sdpa_grads[name].abs().max()),
                                   rtol=tolerance, msg=name)


@needs_avx512
def test_rows_longer_than_the_native_training_limit_keep_sdpa(monkeypatch):
    calls, kernel = [], native.training_attention_forward
    monkeypatch.setattr(native, "training_attention_forward", lambda *a: calls.append(a[3].tolist()) or kernel(*a))
    monkeypatch.setattr(attention, "NATIVE_TRAINING_LENGTH", 20)
    packed_backward(llama_with_heads_of(16, seed=8), [5, 17, 30], autocast=False)
    assert not calls
    packed_backward(llama_with_heads_of(16, seed=8), [5, 17, 20], autocast=False)
    assert len(calls) == 2


@needs_bf16
@pytest.mark.parametrize("shape", [(1, 7, 40), (2, 33, 768), (1, 5, 3, 32)])  # a short last block; q_norm-like heads
def test_the_fused_bf16_norm_is_transformers_bit_for_bit(shape):
    from transformers.models.llama.modeling_llama import LlamaRMSNorm

    norm = LlamaRMSNorm(shape[-1], eps=1e-6).bfloat16()
    norm.weight.data = (torch.randn(shape[-1], generator=torch.Generator().manual_seed(1)) * 0.3 + 1).bfloat16()
    x = (torch.randn(shape, generator=torch.Generator().manual_seed(2)) * 3).bfloat16()
    with torch.no_grad():
        assert torch.equal(native.rms_norm_bf16(x, norm.weight, norm.variance_epsilon), norm(x))


@needs_bf16
@pytest.mark.parametrize("count", [5, 16, 761 * 1408 + 3])
def test_the_fused_bf16_swiglu_is_torchs_bit_for_bit(count):
    gate, up = (torch.randn(count, generator=torch.Generator().manual_seed(seed)) * 4 for seed in (3, 4))
    gate, up = gate.bfloat16(), up.bfloat16()
    assert torch.equal(native.swiglu_bf16(gate, up), F.silu(gate) * up)


@needs_bf16
def test_bf16_scoring_takes_the_fused_norms_and_mlps_only_inside_its_block(monkeypatch):
    from gopd_core import fused_layers

    model, sequences = bf16_llama(heads=2, kv_heads=2, seed=5), random_rows(4, seed=5)
    calls = {"norm": 0, "mlp": 0}
    norm_kernel, mlp_kernel = native.rms_norm_bf16, native.swiglu_bf16
    monkeypatch.setattr(native, "rms_norm_bf16", lambda *a: calls.__setitem__("norm", calls["norm"] + 1) or norm_kernel(*a))
    monkeypatch.setattr(native, "swiglu_bf16", lambda *a: calls.__setitem__("mlp", calls["mlp"] + 1) or mlp_kernel(*a))
    fused = response_logprobs(model, sequences)
    assert calls == {"norm": 2 * 2 + 1, "mlp": 2}  # one pass: 2 layers x 2 norms + the final norm, 2 MLPs
    assert not any("forward" in module.__dict__ for module in model.modules())  # nothing outlives the block
    monkeypatch.setattr(fused_layers, "applies", lambda model: False)
    plain = response_logprobs(model, sequences)
    assert calls == {"norm": 5, "mlp": 2}
    # the same roundings layer by layer; the variance's float32 sum may round differently and move later bf16 steps
    assert max(np.abs(a - b).max() for a, b in zip(fused, plain, strict=True)) < 0.05
    with torch.enable_grad(), fused_layers.fused_layers(model):  # training: the modules as they are
        model.train()
        model(torch.tensor([[5, 6, 7]])).logits.float().sum().backward()
    assert calls == {"norm": 5, "mlp": 2}
