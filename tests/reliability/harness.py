"""Shared pieces of the reliability battery: a tiny world, run configs, counts, damage checks, a killable flow.

Everything here works on real files written by the real flow; nothing of ours is mocked.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import yaml
from tiny import World, tiny_distill_config

from storage.catalog import open_catalog
from storage.doctor import check_checkpoint, check_shard
from storage.schemas import TABLES

ROOT = Path(__file__).resolve().parents[2]
COUNTED_TABLES = ("rollouts", "scores", "updates", "evals")


def make_config(world: World, run_id: str, root: Path | None = None, **changes) -> dict:
    """The 2-iteration tiny distill config of tests/test_flows.py; `changes` set dotted keys."""
    return tiny_distill_config(world.base, world.models, world.data, run_id, root, **changes)


def table_counts(run_dir: Path) -> dict[str, int]:
    con = open_catalog(run_dir)
    return {t: con.sql(f"SELECT count(*) FROM {t}").fetchall()[0][0] for t in COUNTED_TABLES}


def checkpoint_steps(run_dir: Path) -> dict[str, int]:
    """trainer_state.json global_step of every visible checkpoint, by directory name."""
    return {d.name: json.loads((d / "trainer_state.json").read_text())["global_step"]
            for d in sorted((run_dir / "checkpoints").glob("iteration=*"))}


def visible_parquet(run_dir: Path) -> list[Path]:
    """Every Parquet file a reader can see (hidden temporaries and _quarantine excluded)."""
    return sorted(p for p in run_dir.rglob("*.parquet")
                  if not any(part.startswith((".", "_")) for part in p.relative_to(run_dir).parts))


def visible_damage(run_dir: Path) -> list[str]:
    """What a reader could trip over: a visible shard that does not read in full, or a visible checkpoint
    that is not complete. Hidden temporaries (`.name.tmp-*`, `.iteration=*.staging-*`) are allowed."""
    damage = []
    for path in visible_parquet(run_dir):
        table = path.relative_to(run_dir).parts[0]
        detail = check_shard(path, table) if table in TABLES else "not a known table"
        if detail:
            damage.append(f"{path}: {detail}")
    for checkpoint in sorted((run_dir / "checkpoints").glob("iteration=*")):
        detail = check_checkpoint(checkpoint)
        if detail:
            damage.append(f"{checkpoint}: {detail}")
    return damage


def hidden_temporaries(run_dir: Path) -> list[Path]:
    return sorted(p for p in run_dir.rglob(".*") if any(m in p.name for m in (".tmp-", ".staging-", ".old-")))


DISTILL_SCRIPT = textwrap.dedent("""
    import sys, yaml
    from flows.distill import distill
    distill(config=yaml.safe_load(open(sys.argv[1])))
""")


def start_flow(config: dict, api_url: str, log_path: Path) -> subprocess.Popen:
    """The distill flow in its own process group (so one SIGKILL takes all of it), on the given Prefect API."""
    config_path = log_path.with_suffix(".yaml")
    config_path.write_text(yaml.safe_dump(config))
    env = {**os.environ, "PYTHONPATH": str(ROOT), "PREFECT_API_URL": api_url, "PREFECT_LOGGING_LEVEL": "WARNING"}
    with open(log_path, "ab") as log:
        return subprocess.Popen([sys.executable, "-c", DISTILL_SCRIPT, str(config_path)], cwd=ROOT, env=env,
                                stdout=log, stderr=subprocess.STDOUT, start_new_session=True)


def kill_group(process: subprocess.Popen) -> None:
    try:
        os.killpg(process.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    process.wait()
