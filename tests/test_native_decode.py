"""The native small-batch kernel of the decode step (`gopd_core/rollout/native.py`, `small_gemm.c`)."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from gopd_core import hardware
from gopd_core.rollout import native


def test_the_kernel_builds_wherever_the_machine_allows_it():
    reason = native.unavailable_reason()
    # on x86-64 Linux with AVX2/FMA and a C compiler a failed build is a bug, not a fallback
    assert native.available() == (reason is None), reason


def _linear_case(rows: int, in_features: int, out_features: int, with_bias: bool):
    """A seeded weight (N, K), bias (N) or None, and `rows` inputs (rows, 1, K)."""
    generator = torch.Generator().manual_seed(rows * 1000 + out_features)
    weight = torch.randn(out_features, in_features, generator=generator)
    bias = torch.randn(out_features, generator=generator) if with_bias else None
    return weight, bias, torch.randn(rows, 1, in_features, generator=generator)


@pytest.mark.parametrize("rows", [1, 2, 3, 4, 5, 8, 9])
@pytest.mark.parametrize("in_features, out_features", [(32, 48), (61, 13), (100, 259)])
@pytest.mark.parametrize("with_bias", [True, False])
def test_blocked_linear_matches_torch(rows, in_features, out_features, with_bias):
    assert native.available(), native.unavailable_reason()
    weight, bias, inputs = _linear_case(rows, in_features, out_features, with_bias)
    out = native.BlockedLinear(weight, bias)(inputs)
    expected = torch.nn.functional.linear(inputs, weight, bias)
    assert out.shape == (rows, 1, out_features)
    # columns past the last full block of 16 are computed from zero padding and must not leak
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-4)


NO_BF16 = "this CPU has no AVX512-BF16: the bf16 kernel cannot run here (its float32 twin is tested above)"


def torch_blocks(weight_NK: torch.Tensor, bf16: bool) -> torch.Tensor:
    """The kernels' weight layouts built from torch ops: (N/16, K, 16) float32 or (N/16, K/2, 16, 2) bf16."""
    depth, pad = weight_NK.shape[1], -weight_NK.shape[0] % 16
    if bf16:
        padded = F.pad(weight_NK, (0, depth % 2, 0, pad)).to(torch.bfloat16)
        return padded.view(-1, 16, (depth + 1) // 2, 2).transpose(1, 2).contiguous()
    return F.pad(weight_NK, (0, 0, 0, pad)).view(-1, 16, depth).transpose(1, 2).contiguous()


@pytest.mark.parametrize("bf16", [False, pytest.param(True, marks=pytest.mark.skipif(
    "avx512_bf16" not in hardware.cpu_flags(), reason=NO_BF16))])
@pytest.mark.parametrize("in_features, out_features", [(8, 16), (13, 37), (7, 100), (64, 3)])
def test_weights_are_packed_bit_for_bit_as_torch_would_lay_them_out(bf16, in_features, out_features):
    # pack_blocks (C, one pass) replaced pad + cast + transposed copy; bf16 rounds to nearest even as torch does
    weight = (torch.randn(in_features, out_features) * 3).T  # a transposed view: packed from its values
    weight[0, 0] = 1 + 2 ** -8  # halfway between two bf16 numbers: ties go to the even one
    packed = native.BlockedLinear(weight, bf16=bf16).blocks
    expected = torch_blocks(weight, bf16)
    assert packed.shape == expected.shape and packed.dtype == expected.dtype
    assert torch.equal(packed.view(torch.int16), expected.view(torch.int16)) if bf16 else torch.equal(packed, expected)


@pytest.mark.skipif("avx512_bf16" not in hardware.cpu_flags(), reason=NO_BF16)
@pytest.mark.parametrize("rows", [1, 3, 8, 9, 17])
@pytest.mark.parametrize("in_features, out_features", [(32, 48), (61, 13), (100, 259), (7, 17)])
@pytest.mark.parametrize("with_bias", [True, False])
def test_bf16_blocked_linear_is_the_product_of_the_bf16_rounded_operands(rows, in_features, out_features, with_bias):
    assert native.bf16_available(), native.unavailable_reason()
    weight, bias, inputs = _linear_case(rows, in_features, out_features, with_bias)
    out = native.BlockedLinear(weight, bias, bf16=True)(inputs)
    rounded = torch.nn.functional.linear(inputs.bfloat16().float(), weight.bfloat16().float(), bias)
    assert out.shape == (rows, 1, out_features) and out.dtype == torch.float32
    # fp32 accumulation of exact bf16 products: only the summation order differs (odd K: a zero pads the pair)
    torch.testing.assert_close(out, rounded, rtol=1e-5, atol=1e-4)
    assert not torch.allclose(out, torch.nn.functional.linear(inputs, weight, bias), rtol=1e-5, atol=1e-5)


def test_the_bf16_kernel_is_refused_where_the_cpu_lacks_it(monkeypatch):
    monkeypatch.setattr(native, "cpu_flags", lambda: frozenset({"avx2", "fma"}))
    assert not native.bf16_available()
    with pytest.raises(RuntimeError, match="no AVX512-BF16"):
        native.BlockedLinear(torch.randn(16, 8), bf16=True)


def test_blocked_linear_rejects_what_it_cannot_compute():
    assert native.available(), native.unavailable_reason()
    linear = native.BlockedLinear(torch.randn(16, 8))
    with pytest.raises(ValueError, match=r"expected float32 CPU inputs \(\.\.\., 8\)"):
        linear(torch.randn(2, 7))
    with pytest.raises(ValueError, match="float32 CPU weight"):
        native.BlockedLinear(torch.randn(16, 8, dtype=torch.float64))
    assert linear(torch.randn(0, 8)).shape == (0, 16)


def test_the_switch_turns_it_off_in_a_fresh_process():
    code = "from gopd_core.rollout import native; print(native.available(), native.unavailable_reason())"
    out = subprocess.run([sys.executable, "-c", code], env={"GOPD_NATIVE_KERNELS": "0", "PATH": ""},
                         capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False GOPD_NATIVE_KERNELS=0"


def test_a_failed_build_warns_and_falls_back(tmp_path, monkeypatch):
    broken = tmp_path / "small_gemm.c"
    broken.write_text("this is not C\n")
    monkeypatch.setattr(native, "SOURCES", (broken, native.SOURCES[1]))
    monkeypatch.setenv(native.CACHE, str(tmp_path / "cache"))
    native._library.cache_clear()
    try:
        with pytest.warns(RuntimeWarning, match="building .*small_gemm.c.* failed"):
            assert not native.available()
        assert not list((tmp_path / "cache").glob("*"))  # no half-written library left behind
    finally:
        native._library.cache_clear()


@pytest.mark.parametrize("cache_dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("heads, kv_heads, head_dim, length", [(4, 2, 16, 13), (16, 16, 32, 250), (8, 8, 64, 7),
                                                               (6, 3, 8, 1), (2, 1, 128, 9)])
def test_decode_attention_matches_sdpa_over_a_reserved_cache(heads, kv_heads, head_dim, length, cache_dtype):
    assert native.available(), native.unavailable_reason()
    generator = torch.Generator().manual_seed(length)
    batch, capacity = 3, length + 5  # keys/values are views of a longer buffer, as in ReservedLayer
    qkv_B1X = torch.randn(batch, 1, (heads + 2 * kv_heads) * head_dim, generator=generator) * 3
    queries_BQD = qkv_B1X.view(batch, heads + 2 * kv_heads, head_dim)[:, :heads]  # strided rows
    # a bf16 cache is read as the floats it holds: SDPA over its float32 copy is the reference
    keys_BKLD = (torch.randn(batch, kv_heads, capacity, head_dim, generator=generator) * 2).to(cache_dtype)[:, :, :length]
    values_BKLD = torch.randn(batch, kv_heads, capacity, head_dim, generator=generator).to(cache_dtype)[:, :, :length]
    attend_BL = torch.ones(batch, length, dtype=torch.bool)
    attend_BL[0, : length // 2] = False  # left padding
    attend_BL[1, -1] = length == 1  # a row with nothing to attend when length is 1
    for mask in (None, attend_BL):
        out_BX = native.decode_attention(queries_BQD, keys_BKLD, values_BKLD, mask, 0.3)
        expected_BH1D = torch.nn.functional.scaled_dot_product_attention(
            queries_BQD[:, :, None], keys_BKLD.float(), values_BKLD.float(),
            attn_mask=None if mask is None else mask[:, None, None],
            scale=0.3, enable_gqa=heads != kv_heads)
        expected_BX = expected_BH1D.reshape(batch, heads * head_dim)
        live = mask is None or bool(mask[1].any())
        torch.testing.assert_close(out_BX[[0, 2]], expected_BX[[0, 2]], rtol=1e-5, atol=1e-5)
        if live:
            torch.testing.assert_close(out_BX[1], expected_BX[1], rtol=1e-5, atol=1e-5)
        else:  # SDPA gives NaN there; we give zeros
            assert torch.equal(out_BX[1], torch.zeros_like(out_BX[1]))
    every_other_BKLD = torch.randn(batch, kv_heads, 2 * length, head_dim).to(cache_dtype)[:, :, ::2]  # 2 apart
    with pytest.raises(ValueError, match="must be contiguous"):
        native.decode_attention(queries_BQD, every_other_BKLD, values_BKLD, None, 0.3)
    with pytest.raises(ValueError, match=r"attend_BL .* must be \(rows, cached positions\)"):
        native.decode_attention(queries_BQD, keys_BKLD, values_BKLD, attend_BL[:, :-1], 0.3)
    with pytest.raises(ValueError, match="disagree on rows"):
        native.decode_attention(queries_BQD[:2], keys_BKLD, values_BKLD, None, 0.3)
    with pytest.raises(ValueError, match="float32 CPU queries"):
        native.decode_attention(queries_BQD.double(), keys_BKLD, values_BKLD, None, 0.3)
    with pytest.raises(ValueError, match=r"\(one dtype\)"):  # keys and values of different dtypes
        native.decode_attention(queries_BQD, keys_BKLD, values_BKLD.double(), None, 0.3)
