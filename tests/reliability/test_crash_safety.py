"""Crash safety: a distill flow SIGKILLed at 20 points over its five stages resumes to exactly the
row counts and checkpoint steps of an uninterrupted run, and no kill leaves a partial file visible.

Four chains of five kills. A chain is one run id: start the flow in its own process group, wait
until it is inside the chain's next target stage, wait a seeded random moment, SIGKILL the group,
check what a reader would see, and start it again for the next target (a target the run has
already passed is moved to the same stage of a later iteration). After the fifth kill the run
resumes in-process to the end. Being inside a stage is read from the disk and the flow's log:
`prepare` rewrote run_config.json (evaluate before any update), the previous step's completion
marker appeared (rollout, the last evaluate), the k-th new score chunk shard appeared (score), the
update's progress bar started (update), a new hidden `.iteration=N.staging-*` checkpoint directory
appeared (checkpoint write). Where a kill really landed is read afterwards from what it left: the
first step without a completion marker, "checkpoint" when that is an update whose checkpoint
directory (hidden staging, or renamed but not yet recorded) the killed process was writing.
"""

from __future__ import annotations

import os
import random
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import pytest
from harness import (
    checkpoint_steps,
    hidden_temporaries,
    kill_group,
    make_config,
    start_flow,
    table_counts,
    visible_damage,
)

from storage.catalog import run_query
from storage.doctor import diagnose, quarantine
from storage.layout import RunLayout

STAGES = ("rollout", "score", "update", "checkpoint", "evaluate")
# Resumable steps of the 2-iteration run with completion markers, in flow order (evaluate before
# any update and after the last; `evaluate` is keyed by updates done).
MARKED = [("evaluate", 0), ("rollout", 0), ("score", 0), ("update", 0), ("rollout", 1), ("score", 1),
          ("update", 1), ("evaluate", 2)]
TARGET_ORDER = [("evaluate", 0), ("rollout", 0), ("score", 0), ("update", 0), ("checkpoint", 0), ("score", 1),
                ("update", 1), ("checkpoint", 1), ("evaluate", 2)]
CHAINS = 4
SEED = 20260


@dataclass(frozen=True)
class Kill:
    chain: int
    target: tuple[str, int]
    landed: tuple[str, int | None]
    exit_code: int
    hidden_temporaries: int
    seconds: float


def plan_chains(rng: random.Random) -> list[list[tuple[str, int]]]:
    """One target per stage per chain (so 4 kills per stage), iterations drawn at random, in flow order."""
    plans = []
    for _ in range(CHAINS):
        targets = [("evaluate", rng.choice([0, 2])), ("rollout", 0), ("score", rng.choice([0, 1])),
                   ("update", rng.choice([0, 1])), ("checkpoint", rng.choice([0, 1]))]
        plans.append(sorted(targets, key=TARGET_ORDER.index))
    return plans


def progress(layout: RunLayout) -> int:
    """Index in TARGET_ORDER of the first target the run has not passed yet."""
    for stage, iteration in MARKED:
        if not layout.marker_path(iteration, stage).exists():
            return TARGET_ORDER.index(("score", 1) if (stage, iteration) == ("rollout", 1) else (stage, iteration))
    return len(TARGET_ORDER)


def reachable(target: tuple[str, int], layout: RunLayout) -> tuple[str, int] | None:
    """`target`, or if the run is past it the same stage later on (else the next step), None when done."""
    position = progress(layout)
    if TARGET_ORDER.index(target) >= position:
        return target
    ahead = TARGET_ORDER[position:]
    return next((t for t in ahead if t[0] == target[0]), ahead[0] if ahead else None)


def _newer(path: Path, since_ns: int) -> bool:
    try:
        return path.stat().st_mtime_ns > since_ns
    except FileNotFoundError:
        return False


def _new_staging(layout: RunLayout, iteration: int, since_ns: int) -> bool:
    prefix = f".{layout.checkpoint_dir(iteration).name}.staging-"
    parent = layout.checkpoint_dir(iteration).parent
    names = os.listdir(parent) if parent.is_dir() else []
    return any(name.startswith(prefix) and _newer(parent / name, since_ns) for name in names)


def _new_score_shards(layout: RunLayout, iteration: int, since_ns: int) -> int:
    directory = layout.run_dir / "scores" / f"iteration={iteration:06d}"
    return sum(_newer(p, since_ns) for p in directory.rglob("part-*.parquet")) if directory.is_dir() else 0


def _logged_since(log_path: Path, offset: int, text: str) -> bool:
    with open(log_path, "rb") as log:
        log.seek(offset)
        return text.encode() in log.read()


def reached(target: tuple[str, int], layout: RunLayout, since_ns: int, log: tuple[Path, int], shards: int) -> bool:
    """True once the flow started at `since_ns` is inside `target` (or past it)."""
    stage, iteration = target
    done = lambda s, i: layout.marker_path(i, s).exists()  # noqa: E731
    prepared = _newer(layout.config_path, since_ns)  # this process passed `prepare`
    if stage == "evaluate" and iteration == 0:
        return prepared
    if stage == "rollout":
        return prepared and done("evaluate", 0)
    if stage == "score":
        return _new_score_shards(layout, iteration, since_ns) >= shards or done("score", iteration)
    if stage == "update":
        return _logged_since(*log, f"update it{iteration}") or done("update", iteration)
    if stage == "checkpoint":
        return _new_staging(layout, iteration, since_ns) or done("update", iteration)
    reported = _newer(layout.report_dir() / "report.md", since_ns)  # the report after iteration 0 ran
    return prepared and done("update", 1) and reported  # evaluate after the last update


def landed_stage(layout: RunLayout, since_ns: int) -> tuple[str, int | None]:
    if not _newer(layout.config_path, since_ns):
        return "before the flow started", None
    for stage, iteration in MARKED:
        if not layout.marker_path(iteration, stage).exists():
            if stage == "update" and (_new_staging(layout, iteration, since_ns)
                                      or _newer(layout.checkpoint_dir(iteration), since_ns)):
                return "checkpoint", iteration
            return stage, iteration
    return "after the last stage", None


# Seconds to wait once inside a stage (uniform in the range): short stages get short waits. The tiny
# run's evaluation takes well under a second since identical code answers share one sandbox run; the
# last one reuses the first one's sandbox answers and took 0.06 s on an AVX512 EPYC (a 0.02-0.3 s wait
# outlived it there and the kill landed after the run), so it gets its own, shorter range. The rollout
# (12 rows x 10 tokens, entered when the first evaluate's marker appears) and the update's two steps
# (entered when its progress bar starts) took 0.06-0.1 s there, so their waits are drawn within half
# of what they took in the reference run on this machine: fixed 0-0.3 s and 0-0.2 s waits had all four
# rollout kills of a CI run, and three of four update kills of a local run, land in later stages.
KILL_DELAY = {"evaluate": (0.02, 0.3), "score": (0.0, 0.05), "checkpoint": (0.0, 0.0), ("evaluate", 2): (0.0, 0.02)}
FAST_POLL = ("rollout", "update", "checkpoint")  # stages whose window to kill in is short: poll every millisecond


def measured_delays(run_dir: Path) -> dict:
    """KILL_DELAY plus the rollout's and each update's wait range, from the reference run's timings."""
    layout = RunLayout(run_dir)
    rollout = layout.marker_path(0, "rollout").stat().st_mtime - layout.marker_path(0, "evaluate").stat().st_mtime
    steps = dict(run_query(run_dir, "SELECT iteration, sum(wall_s) FROM updates GROUP BY iteration").fetchall())
    return {**KILL_DELAY, "rollout": (0.0, rollout / 2), **{("update", i): (0.0, s / 2) for i, s in steps.items()}}


def kill_at(target, config, layout, api_url, log_path, rng, delays) -> tuple[int, tuple[str, int | None], float]:
    shards = rng.randint(1, 3)
    delay = rng.uniform(*(delays[target] if target in delays else delays[target[0]]))
    log = (log_path, log_path.stat().st_size if log_path.exists() else 0)
    started_ns = time.time_ns()
    process = start_flow(config, api_url, log_path)
    deadline = time.time() + 300
    poll = 0.001 if target[0] in FAST_POLL else 0.01
    while not reached(target, layout, started_ns, log, shards) and process.poll() is None and time.time() < deadline:
        time.sleep(poll)
    time.sleep(delay)
    kill_group(process)
    return process.returncode, landed_stage(layout, started_ns), (time.time_ns() - started_ns) / 1e9


@pytest.mark.slow
def test_sigkill_anywhere_resumes_to_the_uninterrupted_run(tiny_world, reference_run, prefect_api_url, tmp_path):
    from flows.distill import distill

    expected_counts, expected_steps = table_counts(reference_run), checkpoint_steps(reference_run)
    assert expected_steps == {"iteration=000000": 2, "iteration=000001": 4}
    delays = measured_delays(reference_run)
    rng = random.Random(SEED)
    kills: list[Kill] = []
    started = time.perf_counter()
    for chain, plan in enumerate(plan_chains(rng)):
        config = make_config(tiny_world, f"crash-{chain}", root=tmp_path / "runs")
        layout = RunLayout.under(config["storage_root"], config["run_id"])
        log_path = tmp_path / f"chain-{chain}.log"
        for planned in plan:
            target = reachable(planned, layout)
            assert target is not None, f"chain {chain} finished before its kill at {planned}"
            exit_code, landed, seconds = kill_at(target, config, layout, prefect_api_url, log_path, rng, delays)
            kills.append(Kill(chain, target, landed, exit_code, len(hidden_temporaries(layout.run_dir)), seconds))
            assert exit_code == -9, f"flow ended on its own ({exit_code}) before kill {kills[-1]}:\n" + \
                log_path.read_text()[-3000:]
            assert visible_damage(layout.run_dir) == [], f"after kill {kills[-1]}"
            assert {p.kind for p in diagnose(layout.run_dir)} <= {"stale-temporary"}  # the doctor agrees
        distill(config=config)  # resume in-process to the end
        assert table_counts(layout.run_dir) == expected_counts, f"chain {chain}: {plan}"
        assert checkpoint_steps(layout.run_dir) == expected_steps, f"chain {chain}: {plan}"
        duplicates = run_query(layout.run_dir, "SELECT count(*) FROM (SELECT rollout_id, role, model_hash, "
                               "count(*) AS c FROM scores GROUP BY ALL HAVING c > 1)").fetchall()[0][0]
        assert duplicates == 0
        assert visible_damage(layout.run_dir) == []
        leftovers = diagnose(layout.run_dir)  # only hidden temporaries of killed writers; the doctor clears them
        assert {p.kind for p in leftovers} <= {"stale-temporary"}
        quarantine(layout.run_dir, leftovers)
        assert diagnose(layout.run_dir) == [] and table_counts(layout.run_dir) == expected_counts
    elapsed = time.perf_counter() - started
    landed = Counter(kill.landed[0] for kill in kills)
    print(f"\n{len(kills)} SIGKILLs in {elapsed:.0f} s; landed per stage: {dict(landed)}; "
          f"hidden temporaries seen after kills: {sum(k.hidden_temporaries for k in kills)}; "
          f"measured wait ranges: " + ", ".join(f"{k} 0-{v[1]:.3f} s" for k, v in delays.items() if k not in KILL_DELAY))
    for kill in kills:
        print(f"  chain {kill.chain}: target {kill.target} landed {kill.landed} after {kill.seconds:.1f} s")
    assert len(kills) == 20
    assert set(landed) == set(STAGES), f"kills must cover every stage: {dict(landed)}"
