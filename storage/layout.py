"""Where every stored byte of a run lives. Nothing else builds paths by hand.

    <root>/<run_id>/
        run_config.json                       the validated run config
        prompts/split=<split>/part-00000.parquet
        rollouts/iteration=<i>/part-<k>.parquet
        scores/iteration=<i>/role=<role>/model=<hash>/part-<k>.parquet
        updates/iteration=<i>/part-00000.parquet
        evals/checkpoint=<id>/part-00000.parquet
        checkpoints/iteration=<i>/            HF directory (+ optimizer.pt)
        _stages/iteration=<i>/<stage>.json    completion markers (what a stage wrote)
        _quarantine/                          shards moved aside by `gopd doctor`, stale scores and evaluations
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import shutil
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from storage.parquet import atomic_file, fsync_dir


class RunLockedError(RuntimeError):
    """Another process holds this run's lock."""


def _iteration_dir(iteration: int) -> str:
    return f"iteration={iteration:06d}"


def iteration_of(path: Path) -> int | None:
    """The iteration a stored path belongs to (its `iteration=<i>` part), None if it has none."""
    for part in Path(path).parts:
        if part.startswith("iteration="):
            return int(part.removeprefix("iteration="))
    return None


@dataclass(frozen=True)
class RunLayout:
    """The paths of one run directory."""

    run_dir: Path

    @classmethod
    def under(cls, root: str | Path, run_id: str) -> RunLayout:
        if not run_id or "/" in run_id or run_id.startswith((".", "_")):
            raise ValueError(f"invalid run id {run_id!r}: use letters, digits, '-' or '_', not starting with '.' or '_'")
        return cls(Path(root) / run_id)

    @property
    def run_id(self) -> str:
        return self.run_dir.name

    @property
    def config_path(self) -> Path:
        return self.run_dir / "run_config.json"

    def table_dir(self, table: str) -> Path:
        return self.run_dir / table

    def prompts_path(self, split: str) -> Path:
        return self.run_dir / "prompts" / f"split={split}" / "part-00000.parquet"

    def rollouts_dir(self, iteration: int) -> Path:
        return self.run_dir / "rollouts" / _iteration_dir(iteration)

    def scores_dir(self, iteration: int, role: str, model_hash: str) -> Path:
        return self.run_dir / "scores" / _iteration_dir(iteration) / f"role={role}" / f"model={model_hash}"

    def updates_path(self, iteration: int) -> Path:
        return self.run_dir / "updates" / _iteration_dir(iteration) / "part-00000.parquet"

    def evals_path(self, checkpoint_id: str) -> Path:
        return self.run_dir / "evals" / f"checkpoint={checkpoint_id}" / "part-00000.parquet"

    def checkpoint_dir(self, iteration: int) -> Path:
        return self.run_dir / "checkpoints" / _iteration_dir(iteration)

    def report_dir(self) -> Path:
        return self.run_dir / "report"

    def quarantine_dir(self) -> Path:
        return self.run_dir / "_quarantine"

    # -- stage completion markers -------------------------------------------------------------
    def marker_path(self, iteration: int, stage: str) -> Path:
        return self.run_dir / "_stages" / _iteration_dir(iteration) / f"{stage}.json"

    def mark_done(self, iteration: int, stage: str, info: dict) -> Path:
        """Record that `stage` of `iteration` finished, with what it wrote (atomic)."""
        return write_json_atomic(self.marker_path(iteration, stage), info)

    def done_info(self, iteration: int, stage: str) -> dict | None:
        path = self.marker_path(iteration, stage)
        return json.loads(path.read_text()) if path.exists() else None

    def forget_stages_after(self, iteration: int) -> list[tuple[int, str]]:
        """Drop the completion markers of every stage recorded under a later iteration, so that they run again;
        returns the (iteration, stage) pairs dropped.

        Rollouts, updates and checkpoints are rewritten in place when their stages run again. Score sets and
        evaluations are stored under the hash or id of the weights they were taken with, which change: the
        later iterations' scores and the dropped evaluations move to the quarantine first (before the markers
        go, so an interrupted call leaves nothing behind that a rerun would miss), or the scores and evals
        tables would keep rows of rollouts and weights no longer there beside the new ones.
        """
        for scores in sorted(self.table_dir("scores").glob("iteration=*")):
            if iteration_of(scores) > iteration:
                self.quarantine(scores)
        dropped = []
        for marker in sorted((self.run_dir / "_stages").glob("iteration=*/*.json")):
            marked = iteration_of(marker.parent)
            if marked > iteration:
                if marker.stem == "evaluate":  # its result: the evals shard, evals/checkpoint=<id>/part-00000.parquet
                    evaluated = Path(json.loads(marker.read_text())["result"]).parent.name
                    self.quarantine(self.evals_path(evaluated.removeprefix("checkpoint=")))
                marker.unlink(missing_ok=True)
                dropped.append((marked, marker.stem))
        return dropped

    def quarantine(self, path: Path) -> Path | None:
        """Move `path` (a file or directory inside the run) under `quarantine_dir()` at the same relative path,
        with a `.<n>` suffix if that is taken; returns where it went, None if it was gone already (a rerun of an
        interrupted move)."""
        path = Path(path)
        if not path.exists():
            return None
        target = self.quarantine_dir() / path.relative_to(self.run_dir)
        taken, n = target, 0
        while taken.exists():
            n += 1
            taken = target.with_name(f"{target.name}.{n}")
        taken.parent.mkdir(parents=True, exist_ok=True)
        path.replace(taken)
        return taken

    @contextlib.contextmanager
    def lock(self) -> Iterator[None]:
        """Hold an exclusive lock on the run: a second flow on the same run id is refused."""
        self.run_dir.mkdir(parents=True, exist_ok=True)
        handle = open(self.run_dir / ".lock", "w")
        try:
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError as err:
                raise RunLockedError(
                    f"run {self.run_dir} is in use by another process (lock {self.run_dir / '.lock'}); "
                    "wait for it to finish or use another run id"
                ) from err
            handle.write(str(os.getpid()))
            handle.flush()
            yield
        finally:
            handle.close()


PENDING_WEIGHTS_FILE = ".weights-pending.json"  # in a checkpoint whose weights' deferred write has not landed


def write_json_atomic(path: Path, payload: dict) -> Path:
    """Write JSON to `path` via a temporary file and rename."""
    with atomic_file(path) as tmp:
        tmp.write_text(json.dumps(payload, indent=2, sort_keys=True, default=str))
    return path


@contextlib.contextmanager
def atomic_directory(final: Path) -> Iterator[Path]:
    """Yield a hidden staging directory; on success it replaces `final` in one rename.

    A crash leaves only the hidden staging directory, which readers never look at and the next
    write removes; `final` is either the old complete directory or the new complete one.
    """
    final.parent.mkdir(parents=True, exist_ok=True)
    for stale in final.parent.glob(f".{final.name}.staging-*"):
        shutil.rmtree(stale, ignore_errors=True)
    staging = final.parent / f".{final.name}.staging-{uuid.uuid4().hex[:8]}"
    staging.mkdir()
    try:
        yield staging
        if final.exists():
            trash = final.parent / f".{final.name}.old-{uuid.uuid4().hex[:8]}"
            os.replace(final, trash)
            os.replace(staging, final)
            shutil.rmtree(trash, ignore_errors=True)
        else:
            os.replace(staging, final)
        fsync_dir(final.parent)
    finally:
        if staging.exists():
            shutil.rmtree(staging, ignore_errors=True)
