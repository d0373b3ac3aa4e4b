"""Which malloc gopd's processes run on: jemalloc where the system has it, glibc's otherwise.

Why: every large tensor torch frees goes back to glibc, which returns blocks over its mmap threshold
to the kernel; the next step's tensor of the same size is a fresh mapping whose pages fault in again
on first touch. At a 151,936-token vocabulary one TRL-comparison step (`benchmarks/field_gkd.py`)
took ~430,000 minor page faults (rollout ~78,000, scoring 76,000, update ~280,000: gradients and the
head's (N, V) buffer); under jemalloc, which keeps freed pages mapped, a few thousand
(`benchmarks/results/allocator.md`).

How: the allocator is chosen when a process starts (`LD_PRELOAD`), not by an import, so the `gopd`
program (`cli.program`; in-process callers use `cli.main`) re-executes itself once with the variable
set (`reexec_with_preferred_allocator`, before it imports torch). Processes started another way (a
Prefect worker, a benchmark, a notebook) take the variables from `preload_environment()`, or in a
shell from `gopd allocator --shell`.

`GOPD_ALLOCATOR` picks: `auto` (default: jemalloc if found, else the system's), `system` (never
preload), `jemalloc` (required: an error if it is missing), or the path of a malloc library to preload.
Debian/Ubuntu: `apt-get install libjemalloc2`. Linux only; elsewhere the system allocator is kept.
"""

from __future__ import annotations

import logging
import os
import sys
from pathlib import Path

log = logging.getLogger(__name__)

ALLOCATOR_VARIABLE = "GOPD_ALLOCATOR"
REEXEC_MARKER = "GOPD_ALLOCATOR_REEXEC"  # set in the re-executed process: never re-execute twice
JEMALLOC_NAME = "libjemalloc.so.2"
JEMALLOC_DIRS = ("/usr/lib/x86_64-linux-gnu", "/usr/lib/aarch64-linux-gnu", "/usr/lib64", "/usr/lib",
                 "/usr/local/lib")
# jemalloc keeps freed pages for reuse instead of purging them after 10 s: a training step frees and
# re-allocates the same few hundred MB every few seconds. The cost: RSS stays at the run's peak.
JEMALLOC_CONF = "background_thread:false,dirty_decay_ms:-1,muzzy_decay_ms:-1"
KNOWN_ALLOCATORS = ("jemalloc", "tcmalloc", "mimalloc")


class AllocatorError(RuntimeError):
    """GOPD_ALLOCATOR names an allocator this machine does not have."""


def _jemalloc_dirs() -> tuple[str, ...]:
    return (*JEMALLOC_DIRS, str(Path(sys.prefix) / "lib"))


def find_jemalloc() -> Path | None:
    """The first libjemalloc.so.2 in the usual library folders (and this Python's prefix), or None."""
    for folder in _jemalloc_dirs():
        candidate = Path(folder) / JEMALLOC_NAME
        if candidate.is_file():
            return candidate
    return None


def loaded_allocator(maps_path: Path = Path("/proc/self/maps")) -> str:
    """The malloc library mapped into this process ('jemalloc', 'tcmalloc', 'mimalloc'), else 'system'."""
    try:
        maps = maps_path.read_text()
    except OSError:  # not Linux
        return "system"
    for name in KNOWN_ALLOCATORS:
        if f"lib{name}" in maps:
            return name
    return "system"


def preferred_library(environ: dict[str, str]) -> Path | None:
    """The library GOPD_ALLOCATOR asks for on this machine; None for the system allocator."""
    choice = environ.get(ALLOCATOR_VARIABLE, "auto").strip() or "auto"
    if choice == "system" or not sys.platform.startswith("linux"):
        return None
    if choice in ("auto", "jemalloc"):
        found = find_jemalloc()
        if found is None and choice == "jemalloc":
            raise AllocatorError(f"{ALLOCATOR_VARIABLE}=jemalloc but no {JEMALLOC_NAME} in {', '.join(_jemalloc_dirs())}: "
                                 f"install it (Debian/Ubuntu: apt-get install libjemalloc2) or set "
                                 f"{ALLOCATOR_VARIABLE}=system")
        return found
    library = Path(choice)
    if not library.is_file():
        raise AllocatorError(f"{ALLOCATOR_VARIABLE}={choice}: no such file (use auto, system, jemalloc or the "
                             f"path of a malloc library)")
    return library


def preload_environment(environ: dict[str, str] | None = None) -> dict[str, str]:
    """The variables a new process needs to start on the preferred allocator ({} for the system's).

    LD_PRELOAD keeps what the caller already preloads (after ours); jemalloc's MALLOC_CONF is the caller's if set.
    """
    environ = dict(os.environ if environ is None else environ)
    library = preferred_library(environ)
    if library is None:
        return {}
    preloads = [entry for entry in environ.get("LD_PRELOAD", "").replace(":", " ").split() if entry]
    variables = {"LD_PRELOAD": " ".join([str(library), *[p for p in preloads if p != str(library)]])}
    if "jemalloc" in library.name:
        variables["MALLOC_CONF"] = environ.get("MALLOC_CONF", JEMALLOC_CONF)
    return variables


def child_environment(choice: str, environ: dict[str, str] | None = None) -> dict[str, str]:
    """A whole environment for a child process on the allocator `choice` (a GOPD_ALLOCATOR value).

    The parent's own preload is dropped first, so `system` really means the system's malloc.
    """
    environ = {k: v for k, v in (os.environ if environ is None else environ).items()
               if k not in ("LD_PRELOAD", "MALLOC_CONF", REEXEC_MARKER)}
    return {**environ, **preload_environment({**environ, ALLOCATOR_VARIABLE: choice})}


def reexec_with_preferred_allocator() -> None:
    """Replace this process by itself started on the preferred allocator, if it is not on it already.

    Call it first thing in a command's entry point (before torch loads: nothing is lost but the
    interpreter's start). Does nothing under GOPD_ALLOCATOR=system, when no library is found, when
    a known allocator is already loaded, or in a process that already re-executed once.
    """
    if os.environ.get(REEXEC_MARKER):
        if loaded_allocator() == "system":
            log.warning("started with LD_PRELOAD=%s but no allocator library is loaded; running on the system's",
                        os.environ.get("LD_PRELOAD"))
        return
    if loaded_allocator() != "system":
        return
    variables = preload_environment()
    if not variables:
        return
    environ = {**os.environ, **variables, REEXEC_MARKER: "1"}
    sys.stdout.flush()
    sys.stderr.flush()
    os.execve(sys.executable, [sys.executable, *sys.orig_argv[1:]], environ)
