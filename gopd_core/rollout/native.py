"""Native kernels for the decode step (`small_gemm.c`): its small-batch linears and its attention over the
KV cache, where this CPU can run them.

A decode step multiplies a few rows (the live batch) by every weight, so it is bound by reading the
weights from memory. oneDNN's prepacked kernel streams them at 12-19 GB/s at 1-8 rows on the perf
machine (2-core EPYC, 26-28 GB/s for a plain read); `small_gemm.c` reads each weight once, in order,
with 4 rows sharing each load: 25-27 GB/s at 1-4 rows, 16-19 at 8, faster than oneDNN up to 24 rows and
within ~12% of it either way at 32-64 (`benchmarks/perf.py`'s rollout section measures the whole step).

1. On first use the C file is compiled with the system C compiler (`CC`, else `cc`/`gcc`; -O3 -mavx2
   -mfma -fopenmp, well under a second) into `GOPD_NATIVE_CACHE` (default ~/.cache/gopd/native),
   named by the source's hash, written to a temporary name and renamed into place.
2. `BlockedLinear` stores a weight once as (ceil(N/16), K, 16) blocks and calls the kernel through
   ctypes on contiguous float32 buffers; `decode_attention` is one query per row attending over a KV
   cache (grouped-query too; float32, or bf16 read as the floats it holds), softmax in float32. Both use
   `torch.get_num_threads()` OpenMP threads of the runtime torch has already loaded (same soname).
   On a CPU with AVX512-BF16, `BlockedLinear(..., bf16=True)` keeps the weight in bf16 pairs and runs
   `small_gemm_bf16` (vdpbf16ps, fp32 accumulation; compiled into the same library through target
   attributes): half the bytes per step. On an AVX512-BF16 EPYC, 8 layers of the 25.8M student at
   1/8/32/128 rows took 2.7/3.5/7.5/19.9 ms against 4.6/6.6/14.1/44.1 ms in float32.
   `DecodeLayer` runs a whole Llama-family layer of a decode step in one call (`decode_layer`: norms,
   the fused projections, RoPE, the cache write, attention, SwiGLU, residuals) over those linears. With
   bf16 linears the rollout keeps its KV cache in bf16 (`LeanDecoder.cache_dtype`): the linears read the
   weights at the memory's rate (~25 GB/s at 8 rows on the perf machine), and the attention reads the
   cache at that rate too, so half its bytes is half its time: 8 layers of the 25.8M student at 8 rows,
   steps at positions 34-94: 0.73 ms of attention per step in float32, ~0.4 ms less in bf16; at positions
   34-284 a step took 3.8-4.4 ms instead of 4.8-5.3 ms.
3. Nothing here is required: `available()` is False off x86-64 Linux, without AVX2/FMA, without a C
   compiler, when the build fails (a warning gives the compiler's message), or with
   GOPD_NATIVE_KERNELS=0; callers then use oneDNN's prepacked kernel and SDPA as before.
4. The kernels read raw pointers, so every call checks the shapes, dtypes, device and strides they
   assume and raises ValueError otherwise.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
import warnings
from pathlib import Path

import torch
import torch.nn.functional as F

from gopd_core.hardware import cpu_flags

SOURCES = tuple(Path(__file__).with_name(name)
                for name in ("small_gemm.c", "causal_attention.c", "training_attention.c", "fused_ops.c"))
HEADERS = (Path(__file__).with_name("exp16.h"),)  # included by the sources: part of the build's hash
BLOCK = 16  # output columns per weight block, as in small_gemm.c
CACHE_DTYPES = (torch.float32, torch.bfloat16)  # what the decode kernels read a KV cache in
SWITCH = "GOPD_NATIVE_KERNELS"
CACHE = "GOPD_NATIVE_CACHE"
FLAGS = ["-O3", "-mavx2", "-mfma", "-fopenmp", "-shared", "-fPIC"]


def _compiler() -> str | None:
    return os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")


def unavailable_reason() -> str | None:
    """Why this machine cannot use the native kernel, or None if it can (before building it)."""
    if os.environ.get(SWITCH, "1") == "0":
        return f"{SWITCH}=0"
    if platform.system() != "Linux" or platform.machine() not in ("x86_64", "AMD64"):
        return f"not x86-64 Linux ({platform.system()} {platform.machine()})"
    missing = {"avx2", "fma"} - cpu_flags()
    if missing:
        return f"the CPU lacks {', '.join(sorted(missing))}"
    if _compiler() is None:
        return "no C compiler (set CC, or install gcc)"
    return None


def _build(target: Path) -> None:
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.NamedTemporaryFile(dir=target.parent, suffix=".so", delete=False) as handle:
        partial = Path(handle.name)
    try:
        subprocess.run([_compiler(), *FLAGS, *map(str, SOURCES), "-o", str(partial)], check=True, capture_output=True,
                       text=True, timeout=120)
        os.replace(partial, target)  # a concurrent build renames an identical file
    finally:
        partial.unlink(missing_ok=True)


@functools.cache
def _library() -> ctypes.CDLL | None:
    if unavailable_reason() is not None:
        return None
    code = b"".join(source.read_bytes() for source in (*SOURCES, *HEADERS))
    digest = hashlib.sha256(code + " ".join(FLAGS).encode()).hexdigest()[:16]
    root = Path(os.environ.get(CACHE) or Path.home() / ".cache" / "gopd" / "native")
    target = root / f"small_gemm-{digest}.so"
    try:
        if not target.exists():
            _build(target)
        library = ctypes.CDLL(str(target))
    except (OSError, subprocess.SubprocessError) as error:
        detail = getattr(error, "stderr", None) or error
        warnings.warn(f"native kernels unavailable, using oneDNN and SDPA instead: building {', '.join(map(str, SOURCES))} failed: {detail}",
                      RuntimeWarning, stacklevel=2)
        return None
    pointer, size = ctypes.c_void_p, ctypes.c_int64
    library.small_gemm.argtypes = [pointer, size, size, pointer, size, pointer, pointer, ctypes.c_int]
    library.small_gemm.restype = None
    library.small_gemm_bf16.argtypes = library.small_gemm.argtypes
    library.small_gemm_bf16.restype = None
    library.decode_attention.argtypes = [pointer, size, size, size, size, size, pointer, size, size, pointer, size,
                                         size, size, pointer, size, ctypes.c_float, pointer, ctypes.c_int, ctypes.c_int]
    library.decode_attention.restype = None
    library.causal_attention_bf16.argtypes = [pointer, pointer, pointer, pointer, pointer, size, size, size, size, size,
                                              ctypes.c_float, pointer, ctypes.c_int]
    library.causal_attention_bf16.restype = ctypes.c_int
    library.pack_blocks.argtypes = [pointer, size, size, ctypes.c_int, pointer, ctypes.c_int]
    library.logsumexp_bf16.argtypes = [pointer, size, size, size, pointer, ctypes.c_int]
    library.logprob_grad_bf16.argtypes = [pointer, size, size, size, pointer, pointer, pointer, pointer, ctypes.c_int]
    library.logprob_grad_bf16.restype = None
    library.sample_rows.argtypes = [pointer, size, size, pointer, size, pointer, pointer, pointer, ctypes.c_int]
    library.sample_rows.restype = ctypes.c_int
    library.rms_norm_bf16.argtypes = [pointer, size, size, pointer, ctypes.c_float, pointer, ctypes.c_int]
    library.swiglu_bf16.argtypes = [pointer, pointer, size, pointer, ctypes.c_int]
    library.rms_norm_bf16.restype = library.swiglu_bf16.restype = None
    library.pack_blocks.restype = None
    library.decode_layer.argtypes = [ctypes.POINTER(_LayerConstants), pointer, size, pointer, pointer, pointer, pointer,
                                     size, size, size, pointer, size, ctypes.c_int, ctypes.c_int]
    library.decode_layer.restype = ctypes.c_int
    strided = [pointer, size, size] * 3  # q, k, v with their head and position strides
    library.training_attention_forward.argtypes = [*strided, pointer, size, size, size, size, ctypes.c_float, pointer,
                                                   pointer, ctypes.c_int]
    library.training_attention_forward.restype = ctypes.c_int
    library.training_attention_backward.argtypes = [*strided, pointer, pointer, pointer, pointer, size, size, size, size,
                                                    ctypes.c_float, pointer, pointer, pointer, ctypes.c_int]
    library.training_attention_backward.restype = ctypes.c_int
    return library


def available() -> bool:
    """Whether `BlockedLinear` runs here (builds the kernel on first call)."""
    return _library() is not None


def bf16_available() -> bool:
    """Whether `BlockedLinear(..., bf16=True)` runs here: the kernel builds and the CPU has AVX512-BF16."""
    return "avx512_bf16" in cpu_flags() and available()


class BlockedLinear:
    """inputs @ weight.T + bias through `small_gemm.c` (no backward); the weight is copied once into blocks.

    bf16: the copy is bf16 and each call rounds its inputs to bf16 (`small_gemm_bf16`: fp32 accumulation,
    AVX512-BF16), half the bytes a decode step reads; the output is float32 either way.
    """

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None = None, bf16: bool = False) -> None:
        if not (bf16_available() if bf16 else available()):
            raise RuntimeError(f"the native {'bf16 ' if bf16 else ''}decode kernel is unavailable here: "
                               f"{unavailable_reason() or ('no AVX512-BF16' if bf16 else 'its build failed')}")
        if weight.dtype != torch.float32 or weight.device.type != "cpu" or weight.dim() != 2:
            raise ValueError(f"BlockedLinear takes a 2-D float32 CPU weight, got {weight.dtype} {tuple(weight.shape)} "
                             f"on {weight.device}")
        self.out_features, self.in_features = weight.shape
        self.bf16, self.pairs = bf16, (self.in_features + 1) // 2
        pad, blocks = -self.out_features % BLOCK, -(-self.out_features // BLOCK)
        # bf16: (N/16, K2, 16, 2), vdpbf16ps's operand, a pair of k per column; float32: (N/16, K, 16), each k's
        # 16 weights of a block side by side (pack_blocks in small_gemm.c, one pass over the weight)
        shape = (blocks, self.pairs, BLOCK, 2) if bf16 else (blocks, self.in_features, BLOCK)
        self.blocks = torch.empty(shape, dtype=torch.bfloat16 if bf16 else torch.float32)
        weight_NK = weight.detach().contiguous()
        _library().pack_blocks(weight_NK.data_ptr(), self.out_features, self.in_features, int(bf16),
                               self.blocks.data_ptr(), torch.get_num_threads())
        self.bias = None if bias is None else F.pad(bias.detach().float(), (0, pad)).contiguous()

    def __call__(self, inputs: torch.Tensor) -> torch.Tensor:
        if inputs.shape[-1] != self.in_features or inputs.dtype != torch.float32 or inputs.device.type != "cpu":
            raise ValueError(f"expected float32 CPU inputs (..., {self.in_features}), got {inputs.dtype} "
                             f"{tuple(inputs.shape)} on {inputs.device}")
        rows_MK = inputs.reshape(-1, self.in_features).contiguous()
        out_MN = rows_MK.new_empty((rows_MK.shape[0], self.out_features))
        if rows_MK.shape[0]:
            kernel, depth = _library().small_gemm, self.in_features
            if self.bf16:
                kernel, depth = _library().small_gemm_bf16, self.pairs
                rows_MK = F.pad(rows_MK, (0, 2 * self.pairs - self.in_features)).to(torch.bfloat16)
            kernel(rows_MK.data_ptr(), rows_MK.shape[0], depth, self.blocks.data_ptr(), self.out_features,
                   None if self.bias is None else self.bias.data_ptr(), out_MN.data_ptr(), torch.get_num_threads())
        return out_MN.view(*inputs.shape[:-1], self.out_features)


def attention_supported(head_dim: int) -> bool:
    """Whether `decode_attention` covers heads of `head_dim` (a multiple of 8) here."""
    return available() and head_dim % 8 == 0


def decode_attention(queries_BQD: torch.Tensor, keys_BKLD: torch.Tensor, values_BKLD: torch.Tensor,
                     attend_BL: torch.Tensor | None, scale: float) -> torch.Tensor:
    """Each row's one new query per head attending over its cache: (B, H * D), heads side by side.

    queries_BQD: (B, H, D) float32, each row's heads contiguous (a row may be strided, as a slice of the qkv output).
    keys_BKLD / values_BKLD: (B, Hkv, L, D), both float32 or both bf16 (read as the floats they are), with
    contiguous (L, D) per head, e.g. views of a reserved cache buffer; H must be a multiple of Hkv (grouped-query
    attention). attend_BL: bool, True where a row may attend; None for everywhere. Softmax in float32, as SDPA's;
    a row with nothing to attend gives zeros.
    """
    batch, heads, dim = queries_BQD.shape
    kv_heads, length = keys_BKLD.shape[1], keys_BKLD.shape[2]
    tensors = (queries_BQD, keys_BKLD, values_BKLD)
    if (queries_BQD.dtype != torch.float32 or keys_BKLD.dtype not in CACHE_DTYPES or values_BKLD.dtype != keys_BKLD.dtype
            or any(t.device.type != "cpu" for t in tensors) or dim % 8):
        raise ValueError(f"decode_attention takes float32 CPU queries and float32 or bf16 CPU keys and values (one "
                         f"dtype) with head size a multiple of 8, got {[(t.dtype, str(t.device)) for t in tensors]}, "
                         f"head size {dim}")
    if keys_BKLD.shape[0] != batch or keys_BKLD.shape[3] != dim:
        raise ValueError(f"queries {tuple(queries_BQD.shape)} and keys {tuple(keys_BKLD.shape)} disagree on "
                         f"rows or head size")
    if attend_BL is not None and tuple(attend_BL.shape) != (batch, length):
        raise ValueError(f"attend_BL {tuple(attend_BL.shape)} must be (rows, cached positions) = {(batch, length)}")
    if queries_BQD.stride(2) != 1 or queries_BQD.stride(1) != dim or heads % kv_heads:
        raise ValueError(f"queries {tuple(queries_BQD.shape)} with strides {queries_BQD.stride()}: each row's "
                         f"heads must be contiguous and their count a multiple of {kv_heads} kv heads")
    if keys_BKLD.stride()[2:] != (dim, 1) or values_BKLD.stride()[2:] != (dim, 1) or values_BKLD.shape != keys_BKLD.shape:
        raise ValueError(f"keys/values {tuple(keys_BKLD.shape)} / {tuple(values_BKLD.shape)} with strides "
                         f"{keys_BKLD.stride()} / {values_BKLD.stride()}: each head's (L, D) block must be contiguous")
    mask = None if attend_BL is None else attend_BL.to(torch.bool).contiguous()
    out_BX = queries_BQD.new_empty((batch, heads * dim))
    _library().decode_attention(queries_BQD.data_ptr(), queries_BQD.stride(0), batch, heads, kv_heads, dim,
                                keys_BKLD.data_ptr(), keys_BKLD.stride(0), keys_BKLD.stride(1), values_BKLD.data_ptr(),
                                values_BKLD.stride(0), values_BKLD.stride(1), length,
                                None if mask is None else mask.data_ptr(),
                                0 if mask is None else mask.stride(0), scale, out_BX.data_ptr(),
                                int(keys_BKLD.dtype == torch.bfloat16), torch.get_num_threads())
    return out_BX


def causal_attention_supported(head_dim: int) -> bool:
    """Whether `causal_attention` covers heads of `head_dim` here: AVX512-BF16, head size 16 to 128 in steps of 16."""
    return head_dim % 16 == 0 and 16 <= head_dim <= 128 and bf16_available()


def causal_attention(queries_BHLD: torch.Tensor, keys_BKLD: torch.Tensor, values_BKLD: torch.Tensor,
                     scale: float, out: torch.Tensor | None = None) -> torch.Tensor:
    """Causal self-attention of whole bf16 sequences (`causal_attention.c`): (B, L, H, D) bf16.

    queries_BHLD: (B, H, L, D); keys_BKLD / values_BKLD: (B, Hkv, L, D) with the same strides, H a multiple of
    Hkv (grouped-query attention). Any strides with the head dim contiguous, e.g. transformers' transposed
    projections. Position i attends to positions <= i; softmax in float32, weights and values in bf16.
    out: a contiguous (B, L, H, D) bf16 tensor to write into (e.g. one row's slice of a packed output).
    """
    batch, heads, length, dim = queries_BHLD.shape
    kv_heads = keys_BKLD.shape[1]
    tensors = (queries_BHLD, keys_BKLD, values_BKLD)
    if any(t.dtype != torch.bfloat16 or t.device.type != "cpu" or t.dim() != 4 for t in tensors):
        raise ValueError(f"causal_attention takes 4-D bf16 CPU tensors, got "
                         f"{[(t.dtype, str(t.device), tuple(t.shape)) for t in tensors]}")
    if not causal_attention_supported(dim):
        raise ValueError(f"causal_attention needs AVX512-BF16 and a head size of 16 to 128 in steps of 16, "
                         f"got head size {dim} ({unavailable_reason() or 'CPU flags ok'})")
    if (keys_BKLD.shape != values_BKLD.shape or keys_BKLD.stride() != values_BKLD.stride()
            or (keys_BKLD.shape[0], keys_BKLD.shape[2], keys_BKLD.shape[3]) != (batch, length, dim) or heads % kv_heads):
        raise ValueError(f"queries {tuple(queries_BHLD.shape)}, keys {tuple(keys_BKLD.shape)} and values "
                         f"{tuple(values_BKLD.shape)}: keys and values must match each other (strides too) and the "
                         f"queries' rows, positions and head size, with heads a multiple of the kv heads")
    if any(t.stride(3) != 1 or any(stride % 2 for stride in t.stride()[:3]) or t.data_ptr() % 4 for t in tensors):
        raise ValueError(f"strides {[t.stride() for t in tensors]}: the head dim must be contiguous and every other "
                         f"stride even (pairs of bf16 are read as 32-bit words)")
    if out is None:
        out_BLHD = queries_BHLD.new_empty((batch, length, heads, dim))
    elif (tuple(out.shape) != (batch, length, heads, dim) or out.dtype != torch.bfloat16 or out.device.type != "cpu"
          or not out.is_contiguous()):
        raise ValueError(f"out {tuple(out.shape)} {out.dtype} (contiguous: {out.is_contiguous()}) must be a contiguous "
                         f"bf16 CPU tensor of shape {(batch, length, heads, dim)}")
    else:
        out_BLHD = out
    if out_BLHD.numel():
        q_strides = torch.tensor(queries_BHLD.stride()[:3], dtype=torch.int64)
        kv_strides = torch.tensor(keys_BKLD.stride()[:3], dtype=torch.int64)
        with torch.profiler.record_function("gopd::causal_attention_bf16"):  # visible in torch.profiler tables
            status = _library().causal_attention_bf16(queries_BHLD.data_ptr(), q_strides.data_ptr(), keys_BKLD.data_ptr(),
                                             values_BKLD.data_ptr(), kv_strides.data_ptr(), batch, heads, kv_heads,
                                             length, dim, scale, out_BLHD.data_ptr(), torch.get_num_threads())
        if status:
            raise MemoryError(f"causal_attention could not allocate its scratch for {batch} rows x {length} positions "
                              f"x {kv_heads} kv heads x head size {dim} (about twice the keys' and values' bytes)")
    return out_BLHD


def training_attention_supported(head_dim: int) -> bool:
    """Whether `training_attention_forward`/`_backward` cover heads of `head_dim` here: AVX-512F, head size 16 to
    128 in steps of 16."""
    return head_dim % 16 == 0 and 16 <= head_dim <= 128 and "avx512f" in cpu_flags() and available()


def _training_attention_inputs(query_HTD: torch.Tensor, key_KTD: torch.Tensor, value_KTD: torch.Tensor,
                               bounds_R: torch.Tensor) -> list:
    """Checks the kernels' assumptions; returns the (pointer, head stride, position stride) of q, k and v."""
    tensors = (query_HTD, key_KTD, value_KTD)
    heads, total, dim = query_HTD.shape
    if any(t.dtype != torch.float32 or t.device.type != "cpu" or t.dim() != 3 or t.stride(2) != 1 for t in tensors):
        raise ValueError(f"training attention takes 3-D float32 CPU (heads, positions, head size) tensors with the "
                         f"head size contiguous, got {[(t.dtype, str(t.device), tuple(t.shape), t.stride()) for t in tensors]}")
    if (key_KTD.shape != value_KTD.shape or key_KTD.shape[1:] != (total, dim) or heads % key_KTD.shape[0]
            or not training_attention_supported(dim)):
        raise ValueError(f"queries {tuple(query_HTD.shape)}, keys {tuple(key_KTD.shape)}, values {tuple(value_KTD.shape)}: "
                         f"keys and values must match, share the queries' positions and head size (16 to 128 in steps "
                         f"of 16, on an AVX-512F CPU), with heads a multiple of the kv heads")
    if (bounds_R.dtype != torch.int64 or bounds_R.dim() != 1 or len(bounds_R) < 2 or int(bounds_R[0]) != 0
            or int(bounds_R[-1]) != total or bool((bounds_R[1:] < bounds_R[:-1]).any()) or not bounds_R.is_contiguous()):
        raise ValueError(f"bounds must be int64 row starts from 0 to {total}, ascending, got {bounds_R.tolist()}")
    return [value for t in tensors for value in (t.data_ptr(), t.stride(0), t.stride(1))]


def training_attention_forward(query_HTD: torch.Tensor, key_KTD: torch.Tensor, value_KTD: torch.Tensor,
                               bounds_R: torch.Tensor, scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Causal float32 attention within each packed row (`training_attention.c`): (out (T, H, D), log-sum-exp (H, T)).

    query_HTD: (H, T, D); key_KTD / value_KTD: (Hkv, T, D), H a multiple of Hkv; any strides with the head size
    contiguous. bounds_R: int64 (rows + 1,) starts of the rows laid end to end, 0 first and T last.
    """
    strided = _training_attention_inputs(query_HTD, key_KTD, value_KTD, bounds_R)
    heads, total, dim = query_HTD.shape
    out_THD = query_HTD.new_empty((total, heads, dim))
    lse_HT = query_HTD.new_empty((heads, total))
    with torch.profiler.record_function("gopd::training_attention_forward"):
        status = _library().training_attention_forward(
            *strided, bounds_R.data_ptr(), len(bounds_R) - 1, heads, key_KTD.shape[0], dim, scale, out_THD.data_ptr(),
            lse_HT.data_ptr(), torch.get_num_threads())
    if status:
        raise MemoryError(f"training attention could not allocate its scratch for rows of up to "
                          f"{int((bounds_R[1:] - bounds_R[:-1]).max())} positions")
    return out_THD, lse_HT


def training_attention_backward(query_HTD: torch.Tensor, key_KTD: torch.Tensor, value_KTD: torch.Tensor,
                                out_THD: torch.Tensor, grad_THD: torch.Tensor, lse_HT: torch.Tensor,
                                bounds_R: torch.Tensor, scale: float) -> tuple[torch.Tensor, ...]:
    """Gradients (dq (H, T, D), dk, dv (Hkv, T, D)) of `training_attention_forward`'s output for its output's
    gradient grad_THD, given that forward's inputs, output and log-sum-exp."""
    strided = _training_attention_inputs(query_HTD, key_KTD, value_KTD, bounds_R)
    heads, total, dim = query_HTD.shape
    for name, tensor, shape in (("out", out_THD, (total, heads, dim)), ("grad", grad_THD, (total, heads, dim)),
                                ("lse", lse_HT, (heads, total))):
        if tuple(tensor.shape) != shape or tensor.dtype != torch.float32 or not tensor.is_contiguous():
            raise ValueError(f"{name} must be a contiguous float32 tensor of shape {shape}, got "
                             f"{tensor.dtype} {tuple(tensor.shape)}")
    grad_q, grad_k, grad_v = (torch.empty(t.shape, dtype=torch.float32) for t in (query_HTD, key_KTD, value_KTD))
    with torch.profiler.record_function("gopd::training_attention_backward"):
        status = _library().training_attention_backward(
            *strided, out_THD.data_ptr(), grad_THD.data_ptr(), lse_HT.data_ptr(), bounds_R.data_ptr(),
            len(bounds_R) - 1, heads, key_KTD.shape[0], dim, scale, grad_q.data_ptr(), grad_k.data_ptr(),
            grad_v.data_ptr(), torch.get_num_threads())
    if status:
        raise MemoryError(f"training attention's backward could not allocate its scratch for rows of up to "
                          f"{int((bounds_R[1:] - bounds_R[:-1]).max())} positions")
    return grad_q, grad_k, grad_v


def _bf16_logits(logits_NV: torch.Tensor, name: str) -> torch.Tensor:
    """(N, V) bf16 CPU logits with contiguous entries for kernel `name`, else a ValueError naming what is wrong."""
    if logits_NV.dtype != torch.bfloat16 or logits_NV.device.type != "cpu" or logits_NV.dim() != 2:
        raise ValueError(f"{name} takes (N, V) bf16 CPU logits, got {tuple(logits_NV.shape)} "
                         f"{logits_NV.dtype} on {logits_NV.device}")
    if not bf16_available():
        raise ValueError(f"{name} needs AVX512-BF16 ({unavailable_reason() or 'not reported by this CPU'})")
    if logits_NV.shape[1] and logits_NV.stride(1) != 1:
        logits_NV = logits_NV.contiguous()
    return logits_NV


def logsumexp_bf16(logits_NV: torch.Tensor) -> torch.Tensor:
    """log sum exp over the last dim of (N, V) bf16 CPU logits, in float32 (N,), without a float32 copy of them
    (`causal_attention.c`; AVX512-BF16 CPUs, see `bf16_available`). Rows may be strided, entries contiguous."""
    logits_NV = _bf16_logits(logits_NV, "logsumexp_bf16")
    out_N = torch.empty(logits_NV.shape[0], dtype=torch.float32)
    if logits_NV.shape[1] == 0:
        return out_N.fill_(float("-inf"))
    if out_N.numel():
        _library().logsumexp_bf16(logits_NV.data_ptr(), logits_NV.shape[0], logits_NV.shape[1], logits_NV.stride(0),
                                  out_N.data_ptr(), torch.get_num_threads())
    return out_N


def rms_norm_bf16(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """transformers' Llama RMSNorm of contiguous bf16 CPU `x` over its last dim with a bf16 weight, no gradient
    (`fused_ops.c`; AVX512-BF16 CPUs)."""
    n = x.shape[-1]
    rows = x.numel() // max(1, n)
    y = torch.empty_like(x)
    if rows:
        _library().rms_norm_bf16(x.data_ptr(), rows, n, weight.data_ptr(), eps, y.data_ptr(), torch.get_num_threads())
    return y


def swiglu_bf16(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """bf16(bf16(silu(gate)) * up) of contiguous same-shaped bf16 CPU tensors, no gradient (`fused_ops.c`)."""
    y = torch.empty_like(gate)
    if gate.numel():
        _library().swiglu_bf16(gate.data_ptr(), up.data_ptr(), gate.numel(), y.data_ptr(), torch.get_num_threads())
    return y


def sample_rows(logits_BV: torch.Tensor, uniforms_B: torch.Tensor, block: int) -> tuple[torch.Tensor, torch.Tensor] | None:
    """One token per row from softmax(logits) (temperature 1, no top-p) by `sampling`'s two-level inverse CDF at
    the given float64 uniforms, and the tokens' raw log-probs: (tokens_B int64, logprobs_B float32), or None
    where a row's logits are not all finite (NaN, +inf, all -inf). (B, V) contiguous float32 CPU logits."""
    if logits_BV.dtype != torch.float32 or logits_BV.device.type != "cpu" or not logits_BV.is_contiguous():
        raise ValueError(f"sample_rows takes contiguous float32 CPU logits, got {logits_BV.dtype} on {logits_BV.device}")
    if not 1 <= block <= 1024:
        raise ValueError(f"sample_rows takes blocks of 1 to 1024 entries, got {block}")
    rows, vocab = logits_BV.shape
    uniforms_B = uniforms_B.to(torch.float64).contiguous()
    tokens_B, logprobs_B = torch.empty(rows, dtype=torch.int64), torch.empty(rows, dtype=torch.float32)
    sums = torch.empty(rows * -(-vocab // block), dtype=torch.float64)
    if vocab == 0 or _library().sample_rows(logits_BV.data_ptr(), rows, vocab, uniforms_B.data_ptr(), block,
                                            sums.data_ptr(), tokens_B.data_ptr(), logprobs_B.data_ptr(),
                                            torch.get_num_threads()):
        return None
    return tokens_B, logprobs_B


def logprob_grad_bf16(logits_NV: torch.Tensor, lse_N: torch.Tensor, grad_N: torch.Tensor,
                      targets_N: torch.Tensor) -> torch.Tensor:
    """d (sum_n grad_n log softmax(logits_n)[target_n]) / d logits, (N, V) bf16 from (N, V) bf16 CPU logits and
    their float32 log-sum-exp (`logsumexp_bf16`): grad_n * (onehot - softmax), in one native pass
    (`causal_attention.c`; AVX512-BF16 CPUs)."""
    logits_NV = _bf16_logits(logits_NV, "logprob_grad_bf16")
    lse_N, grad_N = (t.detach().to(torch.float32).contiguous() for t in (lse_N, grad_N))
    targets_N = targets_N.to(torch.int64).contiguous()
    out_NV = torch.empty(logits_NV.shape, dtype=torch.bfloat16)
    if out_NV.numel():
        _library().logprob_grad_bf16(logits_NV.data_ptr(), logits_NV.shape[0], logits_NV.shape[1], logits_NV.stride(0),
                                     lse_N.data_ptr(), grad_N.data_ptr(), targets_N.data_ptr(), out_NV.data_ptr(),
                                     torch.get_num_threads())
    return out_NV


class _LayerConstants(ctypes.Structure):
    """`DecodeLayer` in small_gemm.c: one layer's sizes and the addresses of its packed weights."""

    _fields_ = [*((name, ctypes.c_int64) for name in ("hidden", "heads", "kv_heads", "head_dim", "intermediate")),
                *((name, ctypes.c_float) for name in ("input_eps", "post_eps", "head_eps", "scale")),
                *((name, ctypes.c_void_p) for name in ("input_norm", "post_norm", "q_norm", "k_norm", "qkv", "out",
                                                       "gate_up", "down", "qkv_bias", "out_bias", "gate_up_bias",
                                                       "down_bias")),
                ("bf16", ctypes.c_int64)]


class DecodeLayer:
    """One Llama-family decoder layer's decode step in one native call (`decode_layer` in small_gemm.c).

    The arithmetic of `lean_decode._Layer`: RMSNorm, the fused q/k/v projection (+ bias), per-head q/k
    RMSNorms where given (Qwen3), rotate-half RoPE, the new key and value written into the reserved cache,
    attention over it (`decode_attention`), the output projection and residual, RMSNorm, SwiGLU MLP and
    residual. The linears are `BlockedLinear`s of one kind (all float32 or all bf16); norms are
    (weight, eps) pairs of the Llama RMSNorm form, weight * (x / sqrt(mean(x^2) + eps)).
    """

    def __init__(self, *, input_norm: tuple[torch.Tensor, float], post_norm: tuple[torch.Tensor, float],
                 head_norms: tuple[torch.Tensor, torch.Tensor, float] | None, qkv: BlockedLinear, out: BlockedLinear,
                 gate_up: BlockedLinear, down: BlockedLinear, heads: int, kv_heads: int, head_dim: int,
                 scale: float) -> None:
        linears = (qkv, out, gate_up, down)
        hidden, intermediate = qkv.in_features, down.in_features
        if len({linear.bf16 for linear in linears}) != 1:
            raise ValueError("DecodeLayer takes linears of one kind: all float32 or all bf16")
        expected = ((hidden, (heads + 2 * kv_heads) * head_dim), (heads * head_dim, hidden), (hidden, 2 * intermediate),
                    (intermediate, hidden))
        shapes = tuple((linear.in_features, linear.out_features) for linear in linears)
        if shapes != expected or heads % kv_heads or head_dim % 8:
            raise ValueError(f"DecodeLayer: linears (in, out) {shapes} do not fit {heads} heads / {kv_heads} kv heads "
                             f"of size {head_dim} (a multiple of 8) over hidden {hidden}; expected {expected}")
        norms = [input_norm[0], post_norm[0], *(head_norms[:2] if head_norms else ())]
        sizes = [hidden, hidden, head_dim, head_dim][:len(norms)]
        if any(n.dtype != torch.float32 or n.shape != (size,) for n, size in zip(norms, sizes)):
            raise ValueError(f"DecodeLayer: norm weights must be float32 of sizes {sizes}, got "
                             f"{[(n.dtype, tuple(n.shape)) for n in norms]}")
        self._keep = [n.detach().contiguous() for n in norms] + list(linears)  # alive as long as the addresses are used
        pointers = [n.data_ptr() for n in self._keep[:len(norms)]] + [None] * (4 - len(norms))
        self.hidden, self.head_dim, self.kv_heads = hidden, head_dim, kv_heads
        self._constants = _LayerConstants(
            hidden, heads, kv_heads, head_dim, intermediate, input_norm[1], post_norm[1],
            head_norms[2] if head_norms else 0.0, scale, *pointers,
            *(linear.blocks.data_ptr() for linear in linears),
            *(None if linear.bias is None else linear.bias.data_ptr() for linear in linears), int(qkv.bf16))

    def __call__(self, hidden_BH: torch.Tensor, cos_BD: torch.Tensor, sin_BD: torch.Tensor, keys_BKCD: torch.Tensor,
                 values_BKCD: torch.Tensor, position: int, attend_BL: torch.Tensor | None) -> None:
        """Run the layer on hidden_BH in place (contiguous float32 (B, hidden)).

        cos_BD / sin_BD: contiguous float32 (B, head_dim) rotary angles of each row's new position.
        keys_BKCD / values_BKCD: the layer's reserved cache (B, kv heads, capacity, head_dim), float32 or bf16 (both
        alike: the new key and value are rounded to bf16 there, as torch rounds), each head's (capacity, head_dim)
        contiguous, same strides; this token goes at `position` < capacity, and each row attends over positions
        0..position. attend_BL: bool (B, position + 1), True where a row may attend; None for everywhere.
        """
        batch = hidden_BH.shape[0]
        caches = (keys_BKCD, values_BKCD)
        if (hidden_BH.dtype != torch.float32 or not hidden_BH.is_contiguous()
                or tuple(hidden_BH.shape) != (batch, self.hidden)):
            raise ValueError(f"hidden must be contiguous float32 (rows, {self.hidden}), got {hidden_BH.dtype} "
                             f"{tuple(hidden_BH.shape)}")
        if any(t.dtype != torch.float32 or not t.is_contiguous() or tuple(t.shape) != (batch, self.head_dim)
               for t in (cos_BD, sin_BD)):
            raise ValueError(f"cos/sin must be contiguous float32 ({batch}, {self.head_dim}), got "
                             f"{[(t.dtype, tuple(t.shape)) for t in (cos_BD, sin_BD)]}")
        if (keys_BKCD.dtype not in CACHE_DTYPES or values_BKCD.dtype != keys_BKCD.dtype
                or any(t.dim() != 4 for t in caches) or keys_BKCD.shape != values_BKCD.shape
                or keys_BKCD.stride() != values_BKCD.stride() or keys_BKCD.shape[0] != batch
                or keys_BKCD.shape[1] != self.kv_heads or keys_BKCD.shape[3] != self.head_dim
                or keys_BKCD.stride()[2:] != (self.head_dim, 1) or not 0 <= position < keys_BKCD.shape[2]):
            raise ValueError(f"cache keys {tuple(keys_BKCD.shape)} {keys_BKCD.dtype} / values {tuple(values_BKCD.shape)} "
                             f"{values_BKCD.dtype} (strides {keys_BKCD.stride()}) must be both float32 or both bf16 "
                             f"({batch}, {self.kv_heads}, capacity > {position}, "
                             f"{self.head_dim}) with the same strides and each head's block contiguous")
        mask = None
        if attend_BL is not None:
            if tuple(attend_BL.shape) != (batch, position + 1):
                raise ValueError(f"attend_BL {tuple(attend_BL.shape)} must be (rows, position + 1) = {(batch, position + 1)}")
            mask = attend_BL.to(torch.bool).contiguous()
        status = _library().decode_layer(
            ctypes.byref(self._constants), hidden_BH.data_ptr(), batch, cos_BD.data_ptr(), sin_BD.data_ptr(),
            keys_BKCD.data_ptr(), values_BKCD.data_ptr(), keys_BKCD.stride(0), keys_BKCD.stride(1), position,
            None if mask is None else mask.data_ptr(), 0 if mask is None else mask.stride(0),
            int(keys_BKCD.dtype == torch.bfloat16), torch.get_num_threads())
        if status:
            raise MemoryError(f"decode_layer could not allocate its scratch for {batch} rows")
