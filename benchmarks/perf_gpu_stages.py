"""The pipeline's stages on a CUDA GPU: hf rollout speed, and rollout -> score -> update -> evaluate.

1. Build the perf zoo (random weights: student ~25M, math teacher ~100M) if missing.
2. Measure the dense matmul peaks on this GPU: bf16, and fp32 as torch runs it by default (no TF32).
3. Rollout: generated tokens/s of the hf engine on the GPU (bf16 weights) at several batch sizes,
   for both models (`perf_rollout.engine_rollouts`, the rollout stage's call).
4. Stages: the `distill` flow's stage functions (`gopd_core.pipeline`, without Prefect, which this
   GPU image lacks) run `--iterations` iterations on `device: cuda` with math prompts, once per update
   precision ("auto" = bf16 autocast over fp32 weights, and "float32"). Reports each stage's wall
   seconds, and the update's processed tokens/s and FLOP utilisation 6 x params x tokens / step
   seconds / the matching peak; checks every loss and gradient norm is finite and evaluation ran.

    python3 benchmarks/perf_gpu_stages.py [--json PATH] [--md PATH] [--zoo DIR]
    python3 benchmarks/perf_gpu_stages.py --smoke      # tiny run on the CPU: checks the script, no GPU needed
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import sys
import tempfile
import time
from pathlib import Path

import torch

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import pyarrow.parquet as pq  # noqa: E402

from benchmarks.perf_common import zoo_prompts  # noqa: E402
from benchmarks.perf_gpu import matmul_peak, write_outputs  # noqa: E402
from benchmarks.perf_rollout import engine_rollouts  # noqa: E402
from gopd_core import pipeline  # noqa: E402
from gopd_core.config import parse_config  # noqa: E402
from gopd_core.models import keep_models_loaded  # noqa: E402
from gopd_core.rollout import SamplingParams, open_engine  # noqa: E402
from gopd_core.training import autocast_dtype  # noqa: E402
from gopd_core.zoo import build_zoo, read_manifest  # noqa: E402
from storage.readers import read_rollouts  # noqa: E402

FULL = {"device": "cuda", "batches": [1, 8, 32, 128], "rollout_tokens": 128, "iterations": 2, "prompts": 64, "n": 4,
        "max_new_tokens": 256, "eval_prompts": 32, "peak_size": 8192}
SMOKE = {"device": "cpu", "batches": [1, 2], "rollout_tokens": 4, "iterations": 1, "prompts": 2, "n": 1,
         "max_new_tokens": 4, "eval_prompts": 1, "peak_size": 256}


def rollout_speeds(zoo: Path, settings: dict) -> dict:
    speeds = {}
    prompts = zoo_prompts(zoo, max(settings["batches"]))
    for name in ("student-base", "teacher-math"):
        with open_engine("hf", zoo / name, device=settings["device"]) as engine:
            speeds[name] = engine_rollouts(engine, prompts, settings["batches"], settings["rollout_tokens"])
        print(json.dumps({"rollout": name, "results": speeds[name]}), flush=True)
    return speeds


def run_config(zoo: Path, root: Path, precision: str, settings: dict) -> dict:
    data = zoo / "data" / "math"
    return {
        "run_id": f"gpu-{precision}", "storage_root": str(root), "iterations": settings["iterations"],
        "device": settings["device"],
        "models": {"student": str(zoo / "student-base"), "teachers": {"math": str(zoo / "teacher-math")}},
        "sampling": {"temperature": 1.0, "max_new_tokens": settings["max_new_tokens"], "n": settings["n"]},
        "update": {"reward_scale": 1.0, "lr": 1e-5, "precision": precision, "micro_token_budget": 16384},
        "data": {"train": [str(data / "train.parquet")], "test": [str(data / "test.parquet")],
                 "prompts_per_iteration": settings["prompts"], "eval_prompts": settings["eval_prompts"]},
        "eval": {"every": 1, "n_samples": 2, "k": 2, "temperature": 0.7},
    }


def run_stages(zoo: Path, root: Path, precision: str, settings: dict, params: int, peaks: dict) -> dict:
    """The distill flow's stage sequence for one precision; per-iteration stage seconds and update throughput."""
    config = parse_config(run_config(zoo, root, precision, settings), "gpu stages")
    layout = pipeline.prepare_run(config)
    sampling = SamplingParams(1.0, 1.0, settings["max_new_tokens"], settings["n"], config.seed)
    checkpoint, iterations = Path(config.models.student), []
    with keep_models_loaded(config.resident_models):
        for iteration in range(config.iterations):
            record, lap = {"iteration": iteration}, time.perf_counter()
            pipeline.rollout_stage(layout, iteration, checkpoint, prompts_per_iteration=config.data.prompts_per_iteration,
                                   sampling=sampling, device=config.device)
            record["rollout_s"], lap = time.perf_counter() - lap, time.perf_counter()
            scorers = pipeline.plan_scorers(config, checkpoint, pipeline.train_domains(layout))
            written = pipeline.score_stage(layout, iteration, scorers, student_tokenizer=Path(config.models.student),
                                           token_budget=config.score_token_budget, chunk_rows=config.score_chunk_rows,
                                           device=config.device)
            record["score_s"], lap = time.perf_counter() - lap, time.perf_counter()
            checkpoint = pipeline.update_stage(layout, iteration, checkpoint, written, config)
            record["update_s"], lap = time.perf_counter() - lap, time.perf_counter()
            evals = pipeline.evaluate_stage(layout, checkpoint, iteration + 1, **pipeline.eval_settings(config))
            record["evaluate_s"] = time.perf_counter() - lap
            rollouts = read_rollouts(layout, iteration).to_pylist()
            steps = pq.read_table(layout.updates_path(iteration)).to_pylist()
            processed = sum(len(r["prompt_token_ids"]) + len(r["response_token_ids"]) for r in rollouts)
            step_s = sum(step["wall_s"] for step in steps)
            peak = peaks["bf16"] if autocast_dtype(precision, settings["device"]) is not None else peaks["fp32"]
            record.update({
                "sequences": len(rollouts), "response_tokens": sum(len(r["response_token_ids"]) for r in rollouts),
                "processed_tokens": processed, "update_step_s": round(step_s, 4),
                "update_processed_tok_s": round(processed / step_s), "update_gflops": round(6 * params * processed / step_s / 1e9),
                "update_mfu": round(6 * params * processed / step_s / 1e9 / peak, 4),
                "losses": [step["loss"] for step in steps], "grad_norms": [step["grad_norm"] for step in steps],
                "evals_written": Path(evals).exists()})
            record = {k: round(v, 3) if k.endswith("_s") else v for k, v in record.items()}
            if not all(math.isfinite(v) for v in record["losses"] + record["grad_norms"]):
                raise FloatingPointError(f"non-finite loss or gradient norm with precision {precision}: {record}")
            print(json.dumps({"precision": precision, **record}), flush=True)
            iterations.append(record)
    return {"precision": precision, "iterations": iterations}


def markdown(payload: dict) -> str:
    lines = ["# The pipeline's stages on a GPU", "",
             f"Command: `{payload['command']}` on {payload['gpu']} (torch {payload['torch']}, Python {payload['python']}). "
             f"Measured dense matmul peaks ({payload['peak_size']}^3): bf16 **{payload['peaks']['bf16'] / 1000:.0f} "
             f"TFLOP/s**, fp32 (torch's default, no TF32) **{payload['peaks']['fp32'] / 1000:.0f} TFLOP/s**.", "",
             "Perf zoo, random weights: student-base (~25M) and teacher-math (~100M) over the zoo tokenizer.", "",
             "## Rollout: hf engine on the GPU (bf16 weights)", "",
             f"`engine.generate`, one sample per prompt, temperature 1, {payload['settings']['rollout_tokens']} new tokens.",
             "", "| model | batch | generated tokens | s | tok/s |", "|---|---|---|---|---|"]
    for name, results in payload["rollout"].items():
        lines += [f"| {name} | {r['batch']} | {r['generated_tokens']} | {r['seconds']} | {r['tokens_per_s']:,} |"
                  for r in results]
    settings = payload["settings"]
    lines += ["", "## Stages: rollout -> score -> update -> evaluate on `device: cuda`", "",
              f"`gopd_core.pipeline` stage functions (the distill flow's, without Prefect), {settings['prompts']} math "
              f"prompts x {settings['n']} samples, up to {settings['max_new_tokens']} new tokens, one minibatch "
              "(the update scores the student itself), evaluation on "
              f"{settings['eval_prompts']} test prompts x 2 samples. Update MFU = 6 x {payload['student_parameters'] / 1e6:.1f}M "
              "params x processed tokens / the update's step seconds / the peak of its precision.", "",
              "| update precision | iteration | rollout s | score s | update s | evaluate s | sequences | processed tokens "
              "| update step s | update tok/s | update MFU | loss |", "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for run in payload["stages"]:
        label = "auto (bf16 autocast)" if run["precision"] == "auto" else run["precision"]
        for r in run["iterations"]:
            lines.append(f"| {label} | {r['iteration']} | {r['rollout_s']} | {r['score_s']} | {r['update_s']} | "
                         f"{r['evaluate_s']} | {r['sequences']} | {r['processed_tokens']:,} | {r['update_step_s']} | "
                         f"{r['update_processed_tok_s']:,} | {r['update_mfu']:.1%} | {r['losses'][0]:.4f} |")
    lines += ["", *payload.get("notes", []), ""]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--json", type=Path)
    parser.add_argument("--md", type=Path)
    parser.add_argument("--zoo", type=Path, default=Path(tempfile.gettempdir()) / "gopd-zoo-perf")
    parser.add_argument("--smoke", action="store_true", help="tiny run on the CPU in float32 (no GPU needed)")
    parser.add_argument("--from-json", type=Path, help="only rewrite --md from this earlier --json output")
    args = parser.parse_args()
    if args.from_json:
        args.md.write_text(markdown(json.loads(args.from_json.read_text())))
        return
    settings = SMOKE if args.smoke else FULL
    if settings["device"] == "cuda" and not torch.cuda.is_available():
        raise SystemExit("no CUDA GPU here: run with --smoke to check the script on the CPU")
    started = time.perf_counter()
    build_zoo(args.zoo, preset="perf", progress=False, num_threads=None)
    print(json.dumps({"zoo_s": round(time.perf_counter() - started, 1)}), flush=True)
    device = settings["device"]
    peaks = {"bf16": matmul_peak(settings["peak_size"], device=device, dtype=torch.bfloat16),
             "fp32": matmul_peak(settings["peak_size"], device=device, dtype=torch.float32)}
    print(json.dumps({"peaks_gflops": peaks}), flush=True)
    rollout = rollout_speeds(args.zoo, settings)
    params = read_manifest(args.zoo)["models"]["student-base"]["parameters"]
    with tempfile.TemporaryDirectory() as root:
        stages = [run_stages(args.zoo, Path(root), precision, settings, params, peaks) for precision in ("auto", "float32")]
    payload = {"command": "python3 benchmarks/perf_gpu_stages.py " + " ".join(sys.argv[1:]),
               "gpu": torch.cuda.get_device_name() if device == "cuda" else "none (smoke, CPU)",
               "torch": torch.__version__, "python": platform.python_version(), "settings": settings,
               "peak_size": settings["peak_size"], "peaks": {k: round(v) for k, v in peaks.items()},
               "student_parameters": params, "rollout": rollout, "stages": stages,
               "wall_s": round(time.perf_counter() - started, 1)}
    write_outputs(payload, args.json, args.md, markdown)


if __name__ == "__main__":
    main()
