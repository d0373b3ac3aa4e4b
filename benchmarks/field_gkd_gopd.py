"""gopd side of `field_gkd.py`: the same on-policy distillation step with gopd's stages; prints one JSON line.

Runs in the project's environment, in its own process so its peak memory is its own. Usage:

    python3 benchmarks/field_gkd_gopd.py SETTINGS_JSON

One step is one G-OPD iteration at lam = 1 on a temporary run directory, through
`gopd_core.pipeline` exactly as the `distill` flow calls it:
1. `rollout_stage`: the current checkpoint samples `batch` prompts x 1 sample (HF engine,
   temperature 1, top_p 1, `max_new_tokens`) and writes the rollouts shard.
2. `score_stage` with the math teacher. At lam = 1 the reference cancels (A_t = teacher - student),
   so the reference scorer of `plan_scorers` is left out; the student needs no scoring pass with
   one minibatch (`student_scored_in_update`).
3. `update_stage`: one AdamW step (one minibatch, one micro-batch), whose forward pass also stores
   the student's log-probs; then the new checkpoint is saved, and the next step starts from it
   (kept in memory by `keep_models_loaded`, as in the `distill` flow). `checkpoint_every` in the
   settings is the run's (default 1: every update writes its checkpoint to disk; a larger value
   keeps the others in memory only, and the run's last update, the profiled step, always writes).
Step 0 is the warm-up and is reported apart. Wall and process CPU seconds are kept per step, and each
stage's wall seconds for the breakdown; `update_steps_s` is the part of the update's wall in its
optimizer steps (forward, backward, AdamW: the `updates` table's `wall_s`), the rest being its reads,
the student's scores and the checkpoint.

With `profile_step` (field_gkd.py sets it) one more step runs after the measured ones, its scoring and
update each under torch.profiler: `profile` gives per stage its wall seconds, the seconds its matmuls
took (`MATMUL_OPS`, self time on the stage's thread: the ops run their own threads inside) and the
seconds of every other profiled op, the largest of them by name. That step is not among the measured
ones: the profiler slows small ops down, not matmuls.
"""

from __future__ import annotations

import json
import os
import resource
import sys
import tempfile
import time
from contextlib import nullcontext
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # the repository, where gopd is not installed
from gopd_core.allocator import loaded_allocator  # noqa: E402
from gopd_core.config import parse_config  # noqa: E402
from gopd_core.pipeline import (  # noqa: E402
    checkpoint_complete,
    keep_models_loaded,
    plan_scorers,
    prepare_run,
    rollout_stage,
    score_stage,
    update_stage,
)
from gopd_core.rollout import SamplingParams  # noqa: E402
from storage.readers import read_rollouts, read_updates  # noqa: E402

REFERENCE_ROLES = ("reference", "teacher-base")
MATMUL_OPS = ("aten::mm", "aten::addmm", "aten::bmm", "aten::baddbmm")
PROFILED_STAGES = ("score", "update")


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def run_config(settings: dict, storage_root: Path):
    batch, max_new_tokens = settings["batch"], settings["max_new_tokens"]
    return parse_config({
        "run_id": "field-gkd", "storage_root": str(storage_root), "iterations": settings["steps"] + 2,
        "seed": settings["seed"], "models": {"student": settings["student"], "teachers": {"math": settings["teacher"]}},
        "checkpoint_every": settings.get("checkpoint_every", 1),
        "sampling": {"temperature": 1.0, "top_p": 1.0, "max_new_tokens": max_new_tokens, "n": 1,
                     "verify_rewards": False},  # monitoring only; TRL's step verifies nothing either
        "update": {"reward_scale": 1.0, "lr": settings["lr"], "minibatches": 1,
                   "micro_token_budget": max(4096, batch * (max_new_tokens + 512))},  # the whole batch at once
        "data": {"train": [settings["prompts"]], "prompts_per_iteration": batch},
    })


def one_step(layout, config, iteration: int, checkpoint: Path,
             profiles: dict | None = None) -> tuple[Path, dict[str, float]]:
    """Rollout, score (student + teacher), update; returns the new checkpoint and seconds per stage.

    profiles: given, the `PROFILED_STAGES` run under torch.profiler and their `stage_profile`s go in it."""
    sampling = config.sampling

    def score() -> dict[str, str]:
        scorers = [s for s in plan_scorers(config, checkpoint, ["math"]) if s.role not in REFERENCE_ROLES]
        return score_stage(layout, iteration, scorers, student_tokenizer=config.models.student,
                           token_budget=config.score_token_budget, chunk_rows=config.score_chunk_rows)

    stages = {
        "rollout": lambda: rollout_stage(
            layout, iteration, checkpoint, prompts_per_iteration=config.data.prompts_per_iteration,
            sampling=SamplingParams(temperature=sampling.temperature, top_p=sampling.top_p,
                                    max_new_tokens=sampling.max_new_tokens, n=sampling.n),
            seed=config.seed, verify_rewards=config.sampling.verify_rewards),
        "score": score,
        "update": lambda: update_stage(layout, iteration, checkpoint, outputs["score"], config),
    }
    seconds, outputs = {}, {}
    for name, stage in stages.items():
        profiled = profiles is not None and name in PROFILED_STAGES
        with torch.profiler.profile(activities=[ProfilerActivity.CPU]) if profiled else nullcontext() as profile:
            started = time.perf_counter()
            outputs[name] = stage()
            seconds[name] = time.perf_counter() - started
        if profiled:
            profiles[name] = stage_profile(seconds[name], {e.key: e.self_cpu_time_total / 1e6
                                                           for e in profile.key_averages()})
    return outputs["update"], seconds


def stage_profile(wall_s: float, op_seconds: dict[str, float], top: int = 8) -> dict:
    """One profiled stage: its wall, its matmuls' seconds, every other op's, and the `top` largest of those."""
    others = sorted(((name, s) for name, s in op_seconds.items() if name not in MATMUL_OPS), key=lambda o: -o[1])
    return {"wall_s": wall_s, "matmul_s": sum(s for name, s in op_seconds.items() if name in MATMUL_OPS),
            "other_ops_s": sum(s for _, s in others), "top_other_ops": [[name, s] for name, s in others[:top]]}


def _step_tokens(rollouts: dict[str, list]) -> dict:
    """One step's token counts: rows, prompt and response tokens, and each response's length."""
    response_lengths = [len(t) for t in rollouts["response_token_ids"]]
    return {"rows": len(response_lengths), "prompt": sum(len(t) for t in rollouts["prompt_token_ids"]),
            "response": sum(response_lengths), "response_lengths": response_lengths}


def main(settings: dict) -> dict:
    torch.set_num_threads(settings["threads"])
    torch.manual_seed(settings["seed"])
    rss_after_imports = peak_rss_mb()
    with tempfile.TemporaryDirectory(prefix="field-gkd-", dir=settings.get("scratch")) as scratch:
        config = run_config(settings, Path(scratch))
        layout = prepare_run(config)
        checkpoint, steps, profile = Path(config.models.student), [], None
        with keep_models_loaded(config.resident_models):  # as the distill flow does
            for iteration in range(settings["steps"] + 1):
                started, cpu_started = time.perf_counter(), time.process_time()
                checkpoint, stages = one_step(layout, config, iteration, checkpoint)
                steps.append({"step_s": time.perf_counter() - started, "step_cpu_s": time.process_time() - cpu_started,
                              **{f"{k}_s": v for k, v in stages.items()}})
            peak_rss = peak_rss_mb()  # of the measured steps: the profiled one keeps the profiler's events too
            if settings.get("profile_step"):
                profile = {}
                one_step(layout, config, len(steps), checkpoint, profile)
        tokens = [_step_tokens(read_rollouts(layout, it, ["prompt_token_ids", "response_token_ids"]).to_pydict())
                  for it in range(len(steps))]
        written = [it for it in range(config.iterations) if checkpoint_complete(layout.checkpoint_dir(it))]
        updates = read_updates(layout).to_pydict()
        for step, stages in enumerate(steps):  # the update's optimizer steps (forward, backward, AdamW) in its wall
            stages["update_steps_s"] = sum(w for it, w in zip(updates["iteration"], updates["wall_s"]) if it == step)
    lengths = [n for step in tokens for n in step.pop("response_lengths")]
    warmup, *measured = steps
    return {
        "torch_version": torch.__version__, "threads": torch.get_num_threads(),
        "warmup_step_s": warmup["step_s"], "step_s": [s["step_s"] for s in measured],
        "step_cpu_s": [s["step_cpu_s"] for s in measured],
        "stages_s": measured, "warmup_stages_s": warmup,
        "mean_response_tokens": sum(lengths) / max(1, len(lengths)), "responses": len(lengths),
        "tokens_per_step": tokens[1:],
        "profile": profile, "peak_rss_mb": peak_rss, "rss_after_imports_mb": rss_after_imports,
        "checkpoint_every": config.checkpoint_every, "checkpoints_written": written,
        "allocator": loaded_allocator(), "malloc_conf": os.environ.get("MALLOC_CONF"),
    }


if __name__ == "__main__":
    result = main(json.loads(Path(sys.argv[1]).read_text()))
    print("RESULT " + json.dumps(result), flush=True)
