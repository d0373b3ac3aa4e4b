"""Do the G-OPD paper's claims hold at small scale? A benchmark anyone can rerun on a 2-core CPU.

Claims tested (Yang et al., 2026, "Learning beyond Teacher: Generalized On-Policy Distillation with
Reward Extrapolation"):
  1. ExOPD (lam > 1) beats OPD (lam = 1) for same-size and strong-to-weak teacher/student pairs.
  2. Multi-teacher merge: with ExOPD the student matches or beats each domain teacher on its own
     domain, while OPD stays below.
  3. Strong-to-weak: the teacher's pre-RL base as reference (reward correction, "RC") beats ExOPD
     with the student's initial weights as reference.

Steps:
  1. Build the `claims` zoo (gopd_core.zoo) into the work folder, unless it is there.
  2. Evaluate the zoo models (student base, teachers, strong base) with the public `evaluate` flow,
     once per seed (the seed drives sampling).
  3. For each setting x method x seed, run the public `distill` flow (gopd's own pipeline: rollout,
     score, update, evaluate every `eval_every` iterations). Jobs run in `--workers` spawned
     processes with one torch thread each; a finished job is skipped on a rerun (resumable).
  4. Read every run back with DuckDB (`storage.catalog.run_query`) and write
     `paper_claims.json`, `paper_claims.md` and `paper_claims.png` into `--out`.

    python3 benchmarks/paper_claims.py              # the full run (committed results)
    python3 benchmarks/paper_claims.py --quick      # a 2-minute smoke run on the tiny zoo
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import asdict, dataclass, replace
from multiprocessing import get_context
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

import paper_claims_report  # noqa: E402  (benchmarks/ sibling module)


@dataclass(frozen=True)
class Scale:
    """How big the benchmark is: zoo preset, seeds, iterations and per-iteration sizes."""

    preset: str = "claims"
    seeds: tuple[int, ...] = (0, 1, 2)
    iterations: int = 6
    eval_every: int = 2
    prompts_per_iteration: int = 64
    samples_per_prompt: int = 4
    max_new_tokens: int = 48
    eval_prompts: int = 100
    eval_samples: int = 4
    lr: float = 3e-4
    minibatches: int = 4


QUICK = Scale(preset="tiny", seeds=(0,), iterations=2, eval_every=1, prompts_per_iteration=8,
              samples_per_prompt=2, max_new_tokens=16, eval_prompts=8, eval_samples=2, minibatches=2)

# setting -> teachers by domain (zoo model names), domains trained and tested, reward-correction base.
# Multi-teacher evaluates less often: its code tests run in the sandbox, the benchmark's costliest step.
SETTINGS: dict[str, dict] = {
    "same-size": {"teachers": {"math": "teacher-math"}, "domains": ["math"]},
    "multi-teacher": {"teachers": {"math": "teacher-math", "code": "teacher-code"}, "domains": ["math", "code"],
                      "eval_every_factor": 1.5},
    "strong-to-weak": {"teachers": {"default": "strong-teacher"}, "domains": ["math"], "teacher_base": "strong-base"},
}

# method -> run-config overrides (dotted keys). RC methods need the setting's teacher_base.
METHODS: dict[str, dict] = {
    "OPD": {"update.reward_scale": 1.0},
    "ExOPD lam=1.25": {"update.reward_scale": 1.25},
    "ExOPD lam=1.5": {"update.reward_scale": 1.5},
    "ExOPD+RC lam=1.25": {"update.reward_scale": 1.25, "models.reference": "teacher-base"},
    "ExOPD+RC lam=1.5": {"update.reward_scale": 1.5, "models.reference": "teacher-base"},
    "SFT on teacher samples": {"update.objective": "sft", "sampling.source": "teacher"},
}
REFERENCE_MODELS = ("student-base", "teacher-math", "teacher-code", "strong-base", "strong-teacher")


@dataclass(frozen=True)
class Job:
    """One unit of work: a distill run (`config`) or an evaluation of a zoo model."""

    name: str
    setting: str
    method: str
    seed: int
    config: dict | None = None
    model: str | None = None


def _slug(text: str) -> str:
    return "".join(c if c.isalnum() else "-" for c in text.lower()).strip("-").replace("--", "-")


def methods_of(setting: str) -> list[str]:
    """Reward correction only exists where the teacher has a pre-RL base (strong-to-weak)."""
    rc = "teacher_base" in SETTINGS[setting]
    return [m for m in METHODS if rc or "RC" not in m]


def run_config(setting: str, method: str, seed: int, zoo: Path, runs: Path, scale: Scale) -> dict:
    """The distill run config of one (setting, method, seed)."""
    from gopd_core.config import set_dotted

    spec = SETTINGS[setting]
    data = {split: [str(zoo / "data" / d / f"{split}.parquet") for d in spec["domains"]] for split in ("train", "test")}
    config = {
        "run_id": f"{setting}-{_slug(method)}-s{seed}",
        "storage_root": str(runs),
        "iterations": scale.iterations,
        "seed": seed,
        "models": {"student": str(zoo / "student-base"),
                   "teachers": {d: str(zoo / m) for d, m in spec["teachers"].items()}},
        # Rollout rewards are only a monitoring metric (the update does not use them): skip the sandbox time.
        "sampling": {"temperature": 1.0, "max_new_tokens": scale.max_new_tokens, "n": scale.samples_per_prompt,
                     "verify_rewards": False},
        "update": {"lr": scale.lr, "minibatches": scale.minibatches},
        "data": {**data, "prompts_per_iteration": scale.prompts_per_iteration, "eval_prompts": scale.eval_prompts},
        "eval": {"every": max(1, round(scale.eval_every * spec.get("eval_every_factor", 1))),
                 "n_samples": scale.eval_samples, "k": scale.eval_samples,
                 "temperature": 0.7},
    }
    if "teacher_base" in spec:
        config["models"]["teacher_base"] = str(zoo / spec["teacher_base"])
    for key, value in METHODS[method].items():
        set_dotted(config, key, value)
    return config


def plan_jobs(zoo: Path, runs: Path, scale: Scale) -> list[Job]:
    """Zoo-model evaluations first (cheap), then every distill run, slowest setting first."""
    jobs = [Job(f"eval-{model}-s{seed}", "models", model, seed, model=model)
            for seed in scale.seeds for model in REFERENCE_MODELS]
    for setting in ("multi-teacher", "strong-to-weak", "same-size"):
        for seed in scale.seeds:
            for method in methods_of(setting):
                config = run_config(setting, method, seed, zoo, runs, scale)
                jobs.append(Job(config["run_id"], setting, method, seed, config=config))
    return jobs


def _worker_init(prefect_home: str) -> None:
    """Each worker: one torch thread (two workers share the two cores), its own Prefect database,
    and death with the parent (a killed benchmark leaves no orphan workers; rerun it to resume)."""
    if sys.platform.startswith("linux"):
        import ctypes
        import signal

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    os.environ["PREFECT_HOME"] = prefect_home + f"-{os.getpid()}"
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    import torch

    torch.set_num_threads(1)


def run_job(job: Job, zoo: str, runs: str, scale: Scale) -> dict:
    """Run one job through the public flows and return its result record (read back with DuckDB)."""
    started = time.perf_counter()
    if job.config is not None:
        from flows.distill import distill

        run_dir = distill(config=job.config)
    else:
        from flows.evaluate import evaluate

        run_dir = str(Path(runs) / job.name)
        domains = sorted({d for s in SETTINGS.values() for d in s["domains"]})
        evaluate(checkpoints=[str(Path(zoo) / job.model)], run_dir=run_dir,
                 test_data=[str(Path(zoo) / "data" / d / "test.parquet") for d in domains],
                 n_samples=scale.eval_samples, k=scale.eval_samples, temperature=0.7,
                 max_new_tokens=scale.max_new_tokens, eval_prompts=scale.eval_prompts, seed=job.seed)
    wall_s = time.perf_counter() - started
    return {**paper_claims_report.read_run(Path(run_dir)), "job": job.name, "setting": job.setting,
            "method": job.method, "seed": job.seed, "job_wall_s": round(wall_s, 2)}


def run_all(jobs: list[Job], zoo: Path, runs: Path, work: Path, scale: Scale, workers: int) -> list[dict]:
    """Run the jobs not yet done (each result saved as it lands, so a rerun resumes)."""
    from storage.layout import write_json_atomic

    done_dir = work / "done"
    done_dir.mkdir(parents=True, exist_ok=True)
    results = {}
    todo = []
    for job in jobs:
        path = done_dir / f"{job.name}.json"
        if path.exists():
            results[job.name] = json.loads(path.read_text())
        else:
            todo.append(job)
    print(f"{len(jobs)} jobs, {len(results)} already done, {len(todo)} to run on {workers} workers", flush=True)
    with ProcessPoolExecutor(workers, mp_context=get_context("spawn"), initializer=_worker_init,
                             initargs=(str(work / "prefect"),)) as pool:
        futures = {pool.submit(run_job, job, str(zoo), str(runs), scale): job for job in todo}
        for number, future in enumerate(as_completed(futures), 1):
            job = futures[future]
            try:
                record = future.result()
            except Exception as err:  # a failed job stops the benchmark; finished jobs stay done for a rerun
                raise RuntimeError(f"job {job.name} failed ({type(err).__name__}: {err}); its run is under "
                                   f"{runs / job.name}; fix it and rerun the same command to resume") from err
            write_json_atomic(done_dir / f"{job.name}.json", record)
            results[job.name] = record
            print(f"[{number}/{len(todo)}] {job.name}: {record['job_wall_s']:.0f}s, final accuracy "
                  f"{paper_claims_report.final_accuracy(record)}", flush=True)
    return [results[job.name] for job in jobs]


def machine() -> dict:
    import torch

    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor())
    return {"cpu": cpu, "cores": os.cpu_count(), "memory_gib": round(os.sysconf("SC_PAGE_SIZE")
                                                                     * os.sysconf("SC_PHYS_PAGES") / 2**30, 1),
            "python": platform.python_version(), "torch": torch.__version__, "platform": platform.platform()}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="tiny zoo, 1 seed, 2 iterations (smoke run)")
    parser.add_argument("--seeds", type=int, help="number of seeds (default 3)")
    parser.add_argument("--iterations", type=int, help="distill iterations per run (default 6)")
    parser.add_argument("--workers", type=int, default=2, help="parallel worker processes (default 2)")
    parser.add_argument("--work", type=Path, help="work folder (zoo, runs); default benchmarks/.cache/claims[-quick]")
    parser.add_argument("--out", type=Path, help="results folder; default benchmarks/results (quick: the work folder)")
    parser.add_argument("--rewrite", action="store_true",
                        help="only rewrite paper_claims.md/.png from the --out folder's paper_claims.json (no runs)")
    args = parser.parse_args(argv)
    scale = QUICK if args.quick else Scale()
    if args.seeds:
        scale = replace(scale, seeds=tuple(range(args.seeds)))
    if args.iterations:
        scale = replace(scale, iterations=args.iterations)
    work = (args.work or ROOT / "benchmarks" / ".cache" / ("claims-quick" if args.quick else "claims")).resolve()
    out = (args.out or (work if args.quick else ROOT / "benchmarks" / "results")).resolve()
    if args.rewrite:
        if not (out / "paper_claims.json").exists():
            parser.error(f"--rewrite needs {out / 'paper_claims.json'} from an earlier run")
        payload = json.loads((out / "paper_claims.json").read_text())
        written = paper_claims_report.write_outputs(paper_claims_report.records_from_json(payload), payload["meta"], out)
        print("rewrote " + ", ".join(str(p) for p in written))
        return 0
    command = "python3 benchmarks/paper_claims.py " + " ".join(argv if argv is not None else sys.argv[1:])
    load_before = os.getloadavg()
    started = time.perf_counter()

    from gopd_core.zoo import build_zoo

    zoo = work / "zoo"
    zoo_started = time.perf_counter()
    manifest = build_zoo(zoo, preset=scale.preset)
    zoo_s = time.perf_counter() - zoo_started
    jobs = plan_jobs(zoo, work / "runs", scale)
    records = run_all(jobs, zoo, work / "runs", work, scale, args.workers)
    meta = {"command": command.strip(), "machine": machine(), "scale": asdict(scale), "workers": args.workers,
            "zoo_build_s": round(zoo_s, 1), "zoo_models": manifest["models"],
            "zoo_build_recorded_s": manifest.get("build_wall_time_s"),
            "benchmark_wall_s": round(time.perf_counter() - started, 1),
            "load_average_before": load_before, "load_average_after": os.getloadavg(),
            "methods": {m: METHODS[m] for m in METHODS}, "settings": SETTINGS}
    written = paper_claims_report.write_outputs(records, meta, out)
    print("wrote " + ", ".join(str(p) for p in written))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
