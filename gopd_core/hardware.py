"""What this machine runs natively: CPU feature flags, and whether bf16 matmuls are native.

bf16 halves the bytes every matmul reads and, where the hardware has bf16 dot products (CUDA GPUs,
CPUs with AVX512-BF16 or AMX), runs about 2x the fp32 rate; elsewhere torch emulates it many times
slower. `GOPD_PRECISION` (auto, float32, bfloat16) overrides the choice for scoring and the update.
"""

from __future__ import annotations

import functools
import os
from pathlib import Path

import torch

PRECISION_ENV = "GOPD_PRECISION"
PRECISIONS = ("auto", "float32", "bfloat16")
NATIVE_BF16_CPU_FLAGS = frozenset({"avx512_bf16", "amx_bf16"})


@functools.lru_cache(maxsize=1)
def cpu_flags() -> frozenset[str]:
    """This CPU's feature flags from /proc/cpuinfo (empty where there is none)."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return frozenset()
    return frozenset(flag for line in text.splitlines() if line.startswith("flags")
                     for flag in line.split(":", 1)[1].split())


def native_bf16(device: str | torch.device = "cpu") -> bool:
    """Whether `device` runs bf16 matmuls in hardware: a CUDA GPU with bf16, or a CPU with AVX512-BF16/AMX."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    return device.type == "cpu" and bool(NATIVE_BF16_CPU_FLAGS & cpu_flags()) and torch.backends.mkldnn.is_available()


def precision_setting(precision: str | None = None) -> str:
    """`precision`, else `GOPD_PRECISION`, else "auto"; raises ValueError naming a bad value."""
    value = precision if precision is not None else os.environ.get(PRECISION_ENV, "auto")
    if value not in PRECISIONS:
        source = "precision" if precision is not None else PRECISION_ENV
        raise ValueError(f"{source} must be one of {', '.join(PRECISIONS)}, got {value!r}")
    return value


def compute_dtype(device: str | torch.device = "cpu", precision: str | None = None) -> torch.dtype:
    """bf16 where `device` runs it natively ("auto"), or as `precision`/`GOPD_PRECISION` says; else fp32."""
    value = precision_setting(precision)
    if value == "auto":
        return torch.bfloat16 if native_bf16(device) else torch.float32
    return torch.bfloat16 if value == "bfloat16" else torch.float32


def computes_in_bf16(device: str | torch.device = "cpu") -> bool:
    """True where `compute_dtype` picks bf16 on `device` (as the scorer and the update's autocast do)."""
    return compute_dtype(device) == torch.bfloat16
