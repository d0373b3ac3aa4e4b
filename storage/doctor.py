"""Check a run directory for damage, and quarantine broken shards without touching good ones.

Problems found:
- a Parquet shard that cannot be read in full (truncated, corrupted, not Parquet, wrong columns);
- a checkpoint directory missing its config or weights, with unreadable safetensors, or whose
  weights were never written (an update stopped before its deferred write; a checkpoint the run's
  `checkpoint_every` kept in memory only is not a problem);
- stale temporaries left by a killed writer (hidden `.*.tmp-*` files, `.*.staging-*` directories).

Quarantine moves a broken shard under `_quarantine/` (same relative path) and drops the completion
markers that vouched for it, so the next run of the flow rewrites exactly what was lost.
"""

from __future__ import annotations

import json
import shutil
import struct
from dataclasses import dataclass
from pathlib import Path

import pyarrow as pa

from storage.layout import PENDING_WEIGHTS_FILE, RunLayout, iteration_of
from storage.parquet import CorruptShardError, list_shards, open_shard
from storage.schemas import TABLES

STAGE_OF_TABLE = {"rollouts": "rollout", "scores": "score", "updates": "update", "evals": "evaluate"}


@dataclass(frozen=True)
class Problem:
    path: Path
    kind: str  # corrupt-shard | bad-checkpoint | stale-temporary
    detail: str


def check_shard(path: Path, table: str) -> str | None:
    """None if the shard reads in full with its table's columns, else what is wrong."""
    try:
        shard = open_shard(path)
        missing = [c for c in TABLES[table].names if c not in shard.schema_arrow.names]
        if missing:
            return f"lacks column(s) {missing}"
        shard.read()
    except (CorruptShardError, pa.ArrowException, OSError) as err:
        cause = err.__cause__ if isinstance(err, CorruptShardError) and err.__cause__ else err  # path is listed apart
        return (str(cause).strip().splitlines() or [type(cause).__name__])[0]
    return None


def check_checkpoint(directory: Path) -> str | None:
    if not (directory / "config.json").exists():
        return "missing config.json"
    weights = sorted(directory.glob("*.safetensors"))
    if not weights:
        return "missing its weights (*.safetensors)"
    pending = directory / PENDING_WEIGHTS_FILE
    if pending.exists():
        try:
            kept = json.loads(pending.read_text()).get("kept", True)
        except (ValueError, OSError):
            kept = True
        if not kept:  # the run's `checkpoint_every` kept it in memory only: nothing is broken
            return None
        return f"its weights were never written ({PENDING_WEIGHTS_FILE}: the update stopped before its deferred write)"
    for path in weights:
        try:
            with open(path, "rb") as handle:
                (header_size,) = struct.unpack("<Q", handle.read(8))
                header = json.loads(handle.read(header_size))
            end = max((v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"), default=0)
            if path.stat().st_size < 8 + header_size + end:
                return f"{path.name} is truncated ({path.stat().st_size} bytes, needs {8 + header_size + end})"
        except (struct.error, ValueError, KeyError, OSError) as err:
            return f"{path.name} is unreadable: {err}"
    return None


def diagnose(run_dir: str | Path) -> list[Problem]:
    """Every problem in `run_dir` (nothing is changed)."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise FileNotFoundError(f"no run directory at {run_dir}")
    problems = []
    for table in TABLES:
        for shard in list_shards(run_dir / table):
            detail = check_shard(shard, table)
            if detail:
                problems.append(Problem(shard, "corrupt-shard", detail))
    for checkpoint in sorted((run_dir / "checkpoints").glob("iteration=*")):
        detail = check_checkpoint(checkpoint)
        if detail:
            problems.append(Problem(checkpoint, "bad-checkpoint", detail))
    for path in sorted(run_dir.rglob(".*")):
        if ".tmp-" in path.name or ".staging-" in path.name or ".old-" in path.name:
            if "_quarantine" not in path.parts:
                problems.append(Problem(path, "stale-temporary", "left by an interrupted write"))
    return problems


def quarantine(run_dir: str | Path, problems: list[Problem]) -> list[Path]:
    """Move broken shards/checkpoints aside and drop the markers that vouched for them."""
    layout = RunLayout(Path(run_dir))
    moved = []
    for problem in problems:
        if problem.kind == "stale-temporary":
            shutil.rmtree(problem.path, ignore_errors=True) if problem.path.is_dir() else problem.path.unlink(
                missing_ok=True)
            continue
        relative = problem.path.relative_to(layout.run_dir)
        target = layout.quarantine(problem.path)
        if target is not None:
            moved.append(target)
        iteration = iteration_of(relative)
        stage = "update" if problem.kind == "bad-checkpoint" else STAGE_OF_TABLE.get(relative.parts[0])
        if stage == "score":
            (problem.path.parent / "_SUCCESS.json").unlink(missing_ok=True)
        if stage == "evaluate":
            _drop_markers_naming(layout, str(problem.path))
        elif iteration is not None and stage is not None:
            layout.marker_path(iteration, stage).unlink(missing_ok=True)
    return moved


def _drop_markers_naming(layout: RunLayout, path: str) -> None:
    for marker in (layout.run_dir / "_stages").rglob("*.json"):
        if path in marker.read_text():
            marker.unlink()
