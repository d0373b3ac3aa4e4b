"""Which attention kernels gopd's passes run. On a CUDA GPU, `attention_kernels(device)` keeps SDPA off
cuDNN (its docstring says why). On CPUs, where torch's SDPA kernels are slow for the shapes gopd runs, a
registered transformers attention implementation that a `with cpu_attention(model):` block switches to:

1. Inference in bf16 (the scorer, on CPUs with AVX512-BF16): the native kernel (`rollout/causal_attention.c`,
   its docstring gives the algorithm). torch's CPU flash SDPA ran ~40-60 GFLOP/s on the zoo teacher's heads
   (D = 32) in bf16 and was a quarter of bf16 scoring time; the native kernel runs ~100-200 GFLOP/s.
2. Training (the update), packed rows on CPUs with AVX-512F: forward and backward in float32 in native code
   (`rollout/training_attention.c`, one call for all rows and heads of a layer), rows of up to
   NATIVE_TRAINING_LENGTH positions, with or without bf16 autocast (the output then in bf16, as autocast would
   give it). Forward + backward of one layer of the zoo student (16 heads x 32, 8 rows): 88-110 positions
   3.7 ms against 13.3 ms for per-row float32 SDPA (19.4 in bf16), 190-290 positions 27 ms against 48 (60),
   400-512 positions 33 against 65 (65), 1000-1024 78 against 97 (85).
   Elsewhere under bf16 autocast: CPU autocast runs SDPA in bf16, whose flash backward is slow at short
   lengths: forward + backward of 8 rows x 110 positions x 16 heads took 23 ms in bf16 and 10.4 ms in float32
   (equal at 512 positions, bf16 ahead at 1024). Up to FLOAT32_TRAINING_LENGTH positions the attention runs in
   float32 (outside autocast), which is also the more precise choice.
3. Anything else (a padding mask, decoding with a cache, float32 inference, right-padded training batches,
   soft-capping, sinks, a narrower sliding window, head sizes the kernels lack, CPUs without AVX-512) goes to
   transformers' SDPA function unchanged (packed rows: row by row).
The implementation's mask function is SDPA's, so models build exactly the masks they would for SDPA.

Packed rows (the scorer and the update): inside `packed_rows(lengths)`, a forward pass over one sequence of
rows laid end to end, position ids restarting at each row, attends within each row only: the native kernel
run row by row into one output, else each row by the rules above, joined; no (T, T) mask is built. No
padding and one forward pass per micro-batch: on the perf zoo's spread rows the padded plan ran 6% more
tokens in six forward passes. `packs_rows(model)` says where this is exact: Llama-family models whose every
layer is full causal attention.
"""

from __future__ import annotations

import contextlib
import itertools
from collections.abc import Iterator, Sequence
from contextvars import ContextVar

import torch
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface

from gopd_core.rollout import native

ATTENTION = "gopd_cpu"
FLOAT32_TRAINING_LENGTH = 256
NATIVE_TRAINING_LENGTH = 1024  # longest packed row for the native training kernel: 2 x 4 MB of scores per thread
PACKED_ARCHITECTURES = ("llama", "mistral", "qwen2", "qwen3")  # rotary positions from position ids, causal layers
_UNSUPPORTED_KWARGS = ("softcap", "s_aux", "position_bias", "cache")
_ROW_LENGTHS: ContextVar[tuple[int, ...] | None] = ContextVar("gopd_packed_row_lengths", default=None)


def _native_applies(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, attention_mask: torch.Tensor | None,
                    dropout: float, is_causal: bool | None, module: torch.nn.Module, kwargs: dict) -> bool:
    length = query.shape[2]
    window = kwargs.get("sliding_window")
    return (not torch.is_grad_enabled() and attention_mask is None and dropout == 0.0 and length > 1
            and key.shape[2] == length
            and (is_causal if is_causal is not None else getattr(module, "is_causal", True))
            and (window is None or window >= length)
            and all(kwargs.get(name) is None for name in _UNSUPPORTED_KWARGS)
            and all(t.dtype == torch.bfloat16 and t.device.type == "cpu" for t in (query, key, value))
            and native.causal_attention_supported(query.shape[-1]))


def _bf16_context(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor) -> bool:
    """Whether SDPA would run in bf16 here: bf16 inputs, or CPU autocast to bf16 (which casts SDPA's inputs;
    transformers' Llama hands it float32 projections even under autocast)."""
    return torch.bfloat16 in (query.dtype, key.dtype, value.dtype) or (
        torch.is_autocast_enabled("cpu") and torch.get_autocast_dtype("cpu") == torch.bfloat16)


def _float32_training_applies(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor) -> bool:
    """Gradients on, on the CPU, short, and SDPA would run in bf16 (`_bf16_context`)."""
    return (_bf16_context(query, key, value) and torch.is_grad_enabled() and query.device.type == "cpu"
            and query.shape[2] <= FLOAT32_TRAINING_LENGTH)


def _native_training_applies(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, lengths: Sequence[int],
                             arguments: dict) -> bool:
    """Rule 2 of the module docstring for packed rows: gradients on, CPU float32 or bf16, plain causal attention
    the native kernel covers (`native.training_attention_supported`), no row longer than NATIVE_TRAINING_LENGTH."""
    window = arguments.get("sliding_window")
    longest = max(lengths, default=0)
    return (torch.is_grad_enabled() and arguments["dropout"] == 0.0
            and all(t.device.type == "cpu" and t.dtype in (torch.float32, torch.bfloat16) for t in (query, key, value))
            and (window is None or window >= longest) and 0 < longest <= NATIVE_TRAINING_LENGTH
            and all(arguments.get(name) is None for name in _UNSUPPORTED_KWARGS)
            and native.training_attention_supported(query.shape[-1]))


class _PackedTrainingAttention(torch.autograd.Function):
    """Causal float32 attention within packed rows, forward and backward in native code: (H, T, D) queries and
    (Hkv, T, D) keys/values -> (T, H, D) (`native.training_attention_forward` and `_backward`)."""

    @staticmethod
    def forward(ctx, query_HTD: torch.Tensor, key_KTD: torch.Tensor, value_KTD: torch.Tensor, bounds_R: torch.Tensor,
                scale: float) -> torch.Tensor:
        out_THD, lse_HT = native.training_attention_forward(query_HTD, key_KTD, value_KTD, bounds_R, scale)
        ctx.save_for_backward(query_HTD, key_KTD, value_KTD, out_THD, lse_HT, bounds_R)
        ctx.scale = scale
        return out_THD

    @staticmethod
    def backward(ctx, grad_THD: torch.Tensor):
        query_HTD, key_KTD, value_KTD, out_THD, lse_HT, bounds_R = ctx.saved_tensors
        grads = native.training_attention_backward(query_HTD, key_KTD, value_KTD, out_THD, grad_THD.float().contiguous(),
                                                   lse_HT, bounds_R, ctx.scale)
        return (*grads, None, None)


def cpu_attention_forward(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                          attention_mask: torch.Tensor | None, dropout: float = 0.0, scaling: float | None = None,
                          is_causal: bool | None = None, **kwargs) -> tuple[torch.Tensor, None]:
    """transformers' attention-function signature: query (B, H, L, D), key/value (B, Hkv, L, D) -> (B, L, H, D)."""
    arguments = {"dropout": dropout, "scaling": scaling, "is_causal": is_causal, **kwargs}
    lengths = _ROW_LENGTHS.get()
    if lengths is not None:
        return _attention_by_row(module, query, key, value, lengths, arguments), None
    return _attend(module, query, key, value, attention_mask, arguments)


def _attend(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
            attention_mask: torch.Tensor | None, arguments: dict) -> tuple[torch.Tensor, torch.Tensor | None]:
    """One sequence batch's attention by the rules of the module docstring (1 to 3)."""
    dropout, scaling, is_causal = arguments["dropout"], arguments["scaling"], arguments["is_causal"]
    kwargs = {name: value for name, value in arguments.items() if name not in ("dropout", "scaling", "is_causal")}
    if _native_applies(query, key, value, attention_mask, dropout, is_causal, module, kwargs):
        if key.stride() != value.stride():
            key, value = key.contiguous(), value.contiguous()
        scale = query.shape[-1] ** -0.5 if scaling is None else scaling
        return native.causal_attention(query, key, value, scale), None
    if _float32_training_applies(query, key, value):
        if attention_mask is not None and attention_mask.is_floating_point():
            attention_mask = attention_mask.float()  # an additive mask in the scores' dtype
        with torch.autocast("cpu", enabled=False):
            out, weights = sdpa_attention_forward(module, query.float(), key.float(), value.float(), attention_mask,
                                                  **arguments)
        return out.to(torch.bfloat16), weights
    return sdpa_attention_forward(module, query, key, value, attention_mask, **arguments)


def _attention_by_row(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                      lengths: Sequence[int], arguments: dict) -> torch.Tensor:
    """Causal attention within each packed row: query (1, H, T, D), key/value (1, Hkv, T, D) -> (1, T, H, D)."""
    _, heads, total, dim = query.shape
    if query.shape[0] != 1 or key.shape[2] != total or sum(lengths) != total:
        raise ValueError(f"packed rows of lengths summing to {sum(lengths)} need one sequence of that many queries "
                         f"and keys, got queries {tuple(query.shape)} and keys {tuple(key.shape)}")
    bounds = list(itertools.accumulate(lengths, initial=0))
    rows = [slice(start, end) for start, end in zip(bounds, bounds[1:])]
    if _native_applies(query, key, value, None, arguments["dropout"], arguments["is_causal"], module, arguments):
        if key.stride() != value.stride():
            key, value = key.contiguous(), value.contiguous()
        scale = dim ** -0.5 if arguments["scaling"] is None else arguments["scaling"]
        out_1THD = query.new_empty((1, total, heads, dim))
        for row in rows:  # the kernel writes each row's slice of one output
            native.causal_attention(query[:, :, row], key[:, :, row], value[:, :, row], scale, out=out_1THD[:, row])
        return out_1THD
    if _native_training_applies(query, key, value, lengths, arguments):  # the update: all rows in one call
        scale = dim ** -0.5 if arguments["scaling"] is None else arguments["scaling"]
        out_THD = _PackedTrainingAttention.apply(query[0].float(), key[0].float(), value[0].float(),
                                                 torch.tensor(bounds, dtype=torch.int64), scale)
        return out_THD[None].to(torch.bfloat16 if _bf16_context(query, key, value) else query.dtype)
    # gradients elsewhere, float32 inference, other heads: each row as its own causal sequence, joined by autograd
    causal = {**arguments, "is_causal": True}
    return torch.cat([_attend(module, query[:, :, row], key[:, :, row], value[:, :, row], None, causal)[0]
                      for row in rows], dim=1)


def _mask(*args, **kwargs) -> torch.Tensor | None:
    """SDPA's mask function, except inside `packed_rows`: no (T, T) mask there, the attention keeps to each row."""
    return None if _ROW_LENGTHS.get() is not None else ALL_MASK_ATTENTION_FUNCTIONS["sdpa"](*args, **kwargs)


AttentionInterface.register(ATTENTION, cpu_attention_forward)
AttentionMaskInterface.register(ATTENTION, _mask)


def _switches(model: torch.nn.Module, implementations: tuple[str, ...] = ("sdpa",)) -> bool:
    """Whether `cpu_attention` switches `model`: a text-only SDPA transformers model on the CPU (with
    `implementations` ("sdpa", ATTENTION): or has switched it already)."""
    config = getattr(model, "config", None)
    parameter = next(model.parameters(), None)
    return (config is not None and not config.sub_configs
            and getattr(config, "_attn_implementation", None) in implementations
            and parameter is not None and parameter.device.type == "cpu")


def packs_rows(model: torch.nn.Module) -> bool:
    """Whether `packed_rows` is exact for `model`: switched by `cpu_attention`, a Llama-family model (positions
    from position ids, plain causal layers) without sliding windows."""
    if not _switches(model, ("sdpa", ATTENTION)):  # also inside its `cpu_attention` block
        return False
    config = model.config
    sliding = getattr(config, "use_sliding_window", getattr(config, "sliding_window", None) is not None)
    layer_types = set(getattr(config, "layer_types", None) or ["full_attention"])
    return config.model_type in PACKED_ARCHITECTURES and not sliding and layer_types == {"full_attention"}


@contextlib.contextmanager
def packed_rows(lengths: Sequence[int]) -> Iterator[None]:
    """Inside, a `cpu_attention` model's forward pass over one sequence (batch 1) made of rows of `lengths`
    positions laid end to end attends within each row only; the caller restarts the position ids at each row."""
    token = _ROW_LENGTHS.set(tuple(int(length) for length in lengths))
    try:
        yield
    finally:
        _ROW_LENGTHS.reset(token)


@contextlib.contextmanager
def cpu_attention(model: torch.nn.Module) -> Iterator[bool]:
    """Inside, `model` (a text-only SDPA transformers model on the CPU) attends through `cpu_attention_forward`;
    yields whether it switched. The model's own setting is back on leaving the block."""
    if not _switches(model):
        yield False
        return
    config = model.config
    config._attn_implementation = ATTENTION
    try:
        yield True
    finally:
        config._attn_implementation = "sdpa"


@contextlib.contextmanager
def attention_kernels(device: str | torch.device) -> Iterator[None]:
    """Inside, SDPA on a CUDA GPU uses flash/memory-efficient/math attention, not cuDNN's.

    torch picks cuDNN attention for bf16 on Hopper, and cuDNN builds an execution plan for every new
    shape: decoding (a new key length each step) and variable-length micro-batches then spend most of
    their time building plans. On an H200 (torch 2.11) a 32-row rollout took 8.8 s the first time and
    0.8 s when repeated with the same shapes, and a bf16 update 5.3 s, then 0.9 s
    (benchmarks/results/perf_gpu_stages.md). A no-op off CUDA.
    """
    if torch.device(device).type != "cuda":
        yield
        return
    from torch.nn.attention import SDPBackend, sdpa_kernel

    with sdpa_kernel([SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]):
        yield
