"""Shared pieces of `benchmarks/perf.py`: the machine, the measured peak, timing, workloads.

1. `machine()` says where the numbers come from (CPU model, cores, RAM, torch, threads).
2. `matmul_peak(dtype)` is the limit: best dense square matmul throughput in GFLOP/s.
3. `best_time(fn, repeats)` runs a measurement several times and keeps the fastest wall time; on a
   CPU shared with other jobs the fastest run is the one least disturbed by them.
   `timed_with_peak(fn)` also measures the fp32 matmul rate right before and after the run, so a
   run can be compared with the limit under the same load ("adjacent peak").
4. `spread_sequences` builds (prompt ids, response ids) rows with real zoo prompts and response
   lengths spread evenly over [shortest, longest], the workload of the scoring section.
"""

from __future__ import annotations

import json
import os
import platform
import resource
import shlex
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import torch

from gopd_core.allocator import loaded_allocator
from gopd_core.hardware import native_bf16
from gopd_core.rollout import native

REPO = Path(__file__).resolve().parent.parent
ZOO_DIR = REPO / "benchmarks" / ".cache" / "zoo-perf"
STUDENT, TEACHER = "student-base", "teacher-math"


def load_average() -> list[float]:
    """1, 5 and 15 minute load averages (other jobs share this machine's cores)."""
    return [round(x, 2) for x in os.getloadavg()]


def machine() -> dict:
    cpu = platform.processor() or "unknown"
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.exists():
        names = [line.split(":", 1)[1].strip() for line in cpuinfo.read_text().splitlines()
                 if line.startswith("model name")]
        cpu = names[0] if names else cpu
    memory_gib = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    return {
        "cpu": cpu, "cores": len(os.sched_getaffinity(0)), "ram_gib": round(memory_gib, 1),
        "torch": torch.__version__, "torch_threads": torch.get_num_threads(),
        "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "native_bf16": native_bf16("cpu"),
        "python": platform.python_version(), "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY"),
        "gomp_spincount": os.environ.get("GOMP_SPINCOUNT"),
        "allocator": loaded_allocator(), "malloc_conf": os.environ.get("MALLOC_CONF"),
        "native_decode_kernel": "yes" if native.available() else f"no ({native.unavailable_reason() or 'build failed'})",
    }


def best_time(fn: Callable[[], object], repeats: int) -> tuple[float, object]:
    """(fastest wall seconds over `repeats` runs, result of the last run)."""
    best, result = float("inf"), None
    for _ in range(repeats):
        started = time.perf_counter()
        result = fn()
        best = min(best, time.perf_counter() - started)
    return best, result


def matmul_peak(dtype: torch.dtype, sizes: tuple[int, ...], repeats: int = 5) -> dict:
    """Best GFLOP/s of an (n, n) @ (n, n) matmul over `sizes`, fastest of `repeats` runs each."""
    per_size = {}
    for n in sizes:
        a, b = torch.randn(n, n).to(dtype), torch.randn(n, n).to(dtype)
        a @ b  # warm-up: packing buffers, thread pool
        seconds, _ = best_time(lambda a=a, b=b: a @ b, repeats)
        per_size[n] = round(2 * n**3 / seconds / 1e9, 2)
    return {"gflops": max(per_size.values()), "per_size": per_size, "repeats": repeats}


def adjacent_peak() -> float:
    """fp32 GFLOP/s of a short (1024, 1024) matmul burst: the limit right now, under the current load."""
    return matmul_peak(torch.float32, (1024,), repeats=3)["gflops"]


def timed_with_peak(fn: Callable[[], object]) -> tuple[float, float, object]:
    """(wall seconds of fn, best fp32 GFLOP/s measured just before or just after it, fn's result).

    Load from other jobs changes by the second; a peak taken next to the run is the fair limit.
    """
    before = adjacent_peak()
    started = time.perf_counter()
    result = fn()
    seconds = time.perf_counter() - started
    return seconds, max(before, adjacent_peak()), result


def parameter_count(model: torch.nn.Module) -> int:
    """Distinct parameters (a tied lm_head counts once)."""
    return sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())


def peak_rss_mib() -> float:
    """This process's peak resident memory (Linux ru_maxrss is in KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def zoo_prompts(zoo_dir: Path, count: int, seed: int = 0) -> list[dict]:
    """`count` prompt rows (prompts schema) drawn from the zoo's math and code train sets."""
    rows = []
    for domain in ("math", "code"):
        rows += pq.read_table(zoo_dir / "data" / domain / "train.parquet").to_pylist()
    order = np.random.default_rng(seed).permutation(len(rows))
    return [rows[i] for i in order[:count]]


def spread_sequences(prompt_ids: list[list[int]], rows: int, shortest: int, longest: int, max_context: int,
                     vocab: int, seed: int = 0) -> list[tuple[list[int], list[int]]]:
    """Rows of real prompt ids + random response ids, response lengths evenly spread, shuffled.

    A response is cut so that prompt + response fits `max_context` (the perf zoo's 512 positions).
    """
    rng = np.random.default_rng(seed)
    lengths = np.linspace(shortest, longest, rows).round().astype(int)
    rng.shuffle(lengths)
    sequences = []
    for i, length in enumerate(lengths):
        prompt = prompt_ids[i % len(prompt_ids)]
        length = int(min(length, max_context - len(prompt)))
        sequences.append((list(prompt), rng.integers(3, vocab, length).tolist()))
    return sequences


def rollout_rows(run_id: str, sequences: list[tuple[list[int], list[int]]], logprobs: list[list[float]] | None = None,
                 domain: str = "math") -> list[dict]:
    """Rows of the rollouts schema for (prompt ids, response ids) pairs (texts empty, log-probs 0 unless given)."""
    return [{"run_id": run_id, "iteration": 0, "rollout_id": f"{run_id}/0/p{i}/0", "prompt_id": f"p{i}",
             "domain": domain, "sample_index": 0, "checkpoint_id": "perf", "engine": "hf",
             "prompt_token_ids": prompt, "response_token_ids": response,
             "rollout_logprobs": logprobs[i] if logprobs else [0.0] * len(response), "prompt_text": "",
             "response_text": "", "finish_reason": "length", "reward": 0.0}
            for i, (prompt, response) in enumerate(sequences)]


def invocation(script: str) -> str:
    """The command line that reproduces this run of `script` (a path from the repository root)."""
    return "python3 " + shlex.join([script, *sys.argv[1:]])


def write_results(out: Path, name: str, report: dict, markdown: str) -> None:
    """`out/NAME.json` and `out/NAME.md`; the Markdown is printed too."""
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{name}.json").write_text(json.dumps(report, indent=2) + "\n")
    (out / f"{name}.md").write_text(markdown)
    print(markdown)
