"""How close gopd runs to this machine's limit: one run, one machine, `results/perf.json` + `perf.md`.

    python3 benchmarks/perf.py            # full run (~14 min on 2 CPU cores, + ~12 min field_gkd)
    python3 benchmarks/perf.py --quick    # smoke run, small workloads, one repeat: ~2 min with
                                          # --skip-vllm --skip-field; writes to benchmarks/.cache/perf-quick
    python3 benchmarks/perf.py --from-json benchmarks/results/perf.json   # only rewrite perf.md

1. Limit: dense matmul GFLOP/s in fp32 and bf16 (torch, this process's threads).
2. Scoring: our `response_logprobs` vs the naive pad-to-longest fp32 log_softmax scorer vs vLLM
   prompt log-probs, on rows whose response lengths spread from 32 to ~470 tokens, for the perf
   zoo's ~25M student and ~100M teacher; MFU against both peaks; peak RSS of streamed
   `score_rollouts` for N and 10 N stored rollouts.
3. Rollout: generated tokens/s of the `hf` and `vllm` engines at several batch sizes, per model.
4. Update: `update_policy` tokens/s and 6 x params x tokens FLOP utilisation.
5. Orchestration: share of the `distill` flow's wall time outside its stages.
6. Field: `benchmarks/field_gkd.py` (TRL GKDTrainer vs gopd) as a subprocess, if the file exists.
The perf zoo (untrained, `gopd zoo build --preset perf`) is built into benchmarks/.cache if missing.
"""

from __future__ import annotations

import argparse
import json
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import gopd_core  # noqa: E402, F401  (before torch loads: gopd's OpenMP default, see gopd_core/__init__.py)
from gopd_core.allocator import reexec_with_preferred_allocator  # noqa: E402

if __name__ == "__main__":
    reexec_with_preferred_allocator()  # measure on the malloc the `gopd` command runs on (before torch loads)

# isort: split
import torch  # noqa: E402

from benchmarks import perf_common as common  # noqa: E402
from benchmarks.perf_flow import flow_overhead, vllm_engine_reuse  # noqa: E402
from benchmarks.perf_report import write_markdown  # noqa: E402
from benchmarks.perf_rollout import engine_rollouts, update_throughput  # noqa: E402
from benchmarks.perf_scoring import compare_scorers, memory_growth, profile_scorer, vllm_scoring  # noqa: E402
from gopd_core.config import RunConfig  # noqa: E402
from gopd_core.models import load_model, load_tokenizer, render_prompt  # noqa: E402
from gopd_core.rollout import open_engine  # noqa: E402

RESULTS = common.REPO / "benchmarks" / "results"
FIELD_SCRIPT = common.REPO / "benchmarks" / "field_gkd.py"

# workload sizes: (full, quick)
SIZES = {
    "score_rows": {common.STUDENT: (24, 8), common.TEACHER: (12, 4)},
    "score_repeats": (3, 1), "naive_repeats": (3, 1),  # interleaved; this shared machine's slow spells are +-20%
    "rollout_batches": ([1, 8, 32], [8]), "rollout_tokens": (64, 16),
    "memory_rows": (32, 8), "update_rows": (24, 6),
    # iterations, prompts, samples per prompt, max_new_tokens: about 2-minute iterations on the quiet 2-core machine
    "flow": ((2, 64, 4, 128), (1, 2, 2, 16)), "engine_reuse": ((3, 8, 32), (2, 2, 8)),
}
VLLM_DTYPE = "auto"  # `vllm_engine.engine_dtype`: bf16 where the CPU runs it natively, else float32, like our scorer


def size(name: str, quick: bool, model: str | None = None):
    value = SIZES[name][model] if model else SIZES[name]
    return value[1] if quick else value[0]


def measure_peaks(quick: bool) -> dict:
    before = common.load_average()
    fp32 = common.matmul_peak(torch.float32, (1024, 2048) if not quick else (1024,))
    native = common.machine()["gpu"] is not None or common.native_bf16("cpu")  # emulated bf16: 256^3 takes seconds
    bf16 = common.matmul_peak(torch.bfloat16, ((1024, 2048) if not quick else (1024,)) if native else (256,), repeats=3)
    return {"fp32": fp32, "bf16": bf16, "load_before": before, "load_after": common.load_average()}


def model_section(name: str, args, peaks: dict[str, float], prompt_ids: list[list[int]], prompts: list[dict]) -> dict:
    """Scoring (ours, naive, vLLM) and rollout (hf, vllm) numbers for one zoo model."""
    path = args.zoo / name
    model = load_model(path)
    context = int(model.config.max_position_embeddings)
    # prompt + response < context: vLLM needs room for the one token it generates after a prompt
    sequences = common.spread_sequences(prompt_ids, size("score_rows", args.quick, name), 32, 512, context - 1,
                                        model.config.vocab_size)
    budget = RunConfig.model_fields["score_token_budget"].default
    section = {"scoring": compare_scorers(model, sequences, peaks, budget, size("score_repeats", args.quick),
                                          size("naive_repeats", args.quick))}
    print(f"[perf] {name} scoring: {json.dumps(section['scoring'])}", flush=True)
    if name == common.TEACHER:
        section["scoring"]["profile"] = profile_scorer(model, sequences[: len(sequences) // 2], budget)
    batches, tokens = size("rollout_batches", args.quick), size("rollout_tokens", args.quick)
    with open_engine("hf", path, batch_size=max(batches), progress=False) as engine:
        section["rollout_hf"] = engine_rollouts(engine, prompts, batches, tokens)
    if not args.skip_vllm and not (args.quick and name == common.TEACHER):  # quick: one vLLM start-up
        started = time.perf_counter()
        with open_engine("vllm", path, max_model_len=context, dtype=VLLM_DTYPE) as engine:
            section["vllm_startup_s"] = round(time.perf_counter() - started, 1)
            section["scoring"]["vllm"] = vllm_scoring(engine, model, sequences, peaks, 1)
            section["rollout_vllm"] = engine_rollouts(engine, prompts, batches, tokens)
    print(f"[perf] {name} rollout/vllm: {json.dumps({k: v for k, v in section.items() if k != 'scoring'})}",
          flush=True)
    return section


# the scoring comparison again with the ~100M teacher widened to real vocabularies (field_gkd.widen_vocabulary):
# the zoo's 259-token vocabulary makes the naive scorer's full-vocabulary log_softmax nearly free
SCORING_VOCABULARIES = (32000, 151936)


def vocabulary_scoring(args, peaks: dict[str, float], prompt_ids: list[list[int]]) -> dict:
    """`compare_scorers` on the teacher with each of SCORING_VOCABULARIES rows, on the teacher's own rows."""
    from benchmarks.field_gkd import widen_vocabulary

    budget = RunConfig.model_fields["score_token_budget"].default
    out = {}
    for vocab in SCORING_VOCABULARIES[:0] if args.quick else SCORING_VOCABULARIES:
        model = load_model(widen_vocabulary(args.zoo.resolve(), vocab) / common.TEACHER)
        # the same rows as the teacher's section: same seed and count, ids of the zoo's 259 tokens
        sequences = common.spread_sequences(prompt_ids, size("score_rows", args.quick, common.TEACHER), 32, 512,
                                            int(model.config.max_position_embeddings) - 1, 259)
        name = f"{common.TEACHER}, vocabulary {vocab}"
        out[name] = {"scoring": compare_scorers(model, sequences, peaks, budget, size("score_repeats", args.quick),
                                                size("naive_repeats", args.quick))}
        print(f"[perf] {name} scoring: {json.dumps(out[name]['scoring'])}", flush=True)
        del model
    return out


# the TRL comparison's (response tokens, vocabulary): reasoning-length and short answers over the zoo's
# 259-token byte vocabulary, then short answers with the models widened to real vocabularies
# (Llama-2/Mistral's 32000, Qwen3's 151936), where every (B, L, V) tensor costs real time and memory
# (max new tokens, vocabulary, rounds): the 64-token steps are short (1.5-4 s), so this shared machine's slow spells
# move their medians most; they get 4 rounds of each side (field_gkd's default is 2). At 2 rounds the 32000-token row
# read 1.70x in one run and 2.16x in the next against TRL on gopd's malloc, TRL's step moving 3.5 -> 4.2 s.
FIELD_RUNS = ((256, None, 2), (64, None, 4), (64, 32000, 4), (64, 151936, 2))


def field_section(skip: bool, quick: bool) -> dict:
    """Run the TRL comparison (`field_gkd.py`) for each of FIELD_RUNS and read the JSON it writes."""
    if skip:
        return {"status": "skipped (--skip-field)"}
    if not FIELD_SCRIPT.exists():
        return {"status": f"absent: {FIELD_SCRIPT.relative_to(common.REPO)} does not exist"}
    runs = []
    for tokens, vocab, rounds in FIELD_RUNS[:1] if quick else FIELD_RUNS:
        options = ["--quick"] if quick else ["--max-new-tokens", str(tokens), *(["--vocab", str(vocab)] if vocab else []),
                                            *(["--rounds", str(rounds)] if rounds != 2 else [])]
        with tempfile.TemporaryDirectory() as tmp:
            output = Path(tmp) / "field.json"
            command = [sys.executable, str(FIELD_SCRIPT), "--json", str(output), *options]
            started = time.perf_counter()
            done = subprocess.run(command, capture_output=True, text=True, cwd=common.REPO)
            seconds = round(time.perf_counter() - started, 1)
            if done.returncode != 0 or not output.exists():
                return {"status": f"failed (exit {done.returncode})", "command": shlex.join(command[1:]),
                        "stderr_tail": done.stderr[-2000:]}
            runs.append({"command": shlex.join(["python3", "benchmarks/field_gkd.py", *options]), "seconds": seconds,
                         "result": json.loads(output.read_text())})
        print(f"[perf] field {runs[-1]['command']}: speedup {runs[-1]['result'].get('speedup')}", flush=True)
    return {"status": "ran", "runs": runs}


def run(args) -> dict:
    started = time.perf_counter()
    torch.set_num_threads(common.machine()["cores"])
    if not (args.zoo / "manifest.json").exists():
        from gopd_core.zoo import build_zoo

        build_zoo(args.zoo, preset="perf", progress=False)
    results = {"command": "python3 " + shlex.join(sys.argv), "quick": args.quick, "machine": common.machine(),
               "started_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    results["peaks"] = measure_peaks(args.quick)
    peaks = {"fp32_peak": results["peaks"]["fp32"]["gflops"], "bf16_peak": results["peaks"]["bf16"]["gflops"]}
    print(f"[perf] peaks {peaks}", flush=True)
    tokenizer = load_tokenizer(args.zoo / common.STUDENT)
    prompts = common.zoo_prompts(args.zoo, 64)
    prompt_ids = [render_prompt(tokenizer, row["messages"]) for row in prompts]
    results["models"] = {name: model_section(name, args, peaks, prompt_ids, prompts)
                         for name in (common.STUDENT, common.TEACHER)}
    results["vocabulary_scoring"] = vocabulary_scoring(args, peaks, prompt_ids)
    budget = RunConfig.model_fields["score_token_budget"].default
    results["scoring_memory"] = memory_growth(args.zoo / common.STUDENT, size("memory_rows", args.quick), 16, budget)
    print(f"[perf] memory {json.dumps(results['scoring_memory'])}", flush=True)
    student = load_model(args.zoo / common.STUDENT)
    update_rows = common.spread_sequences(prompt_ids, size("update_rows", args.quick), 32, 256,
                                          int(student.config.max_position_embeddings), student.config.vocab_size)
    results["update"] = update_throughput(args.zoo / common.STUDENT, update_rows, common.parameter_count(student),
                                          peaks, minibatches=2,
                                          micro_token_budget=RunConfig.model_fields["update"].default.micro_token_budget)
    print(f"[perf] update {json.dumps(results['update'])}", flush=True)
    results["orchestration"] = flow_overhead(args.zoo, *size("flow", args.quick))
    print(f"[perf] orchestration {json.dumps(results['orchestration'])}", flush=True)
    if not args.skip_vllm:
        results["vllm_engine_reuse"] = vllm_engine_reuse(args.zoo, *size("engine_reuse", args.quick))
        print(f"[perf] vllm engine reuse {json.dumps(results['vllm_engine_reuse'])}", flush=True)
    results["peaks_end"] = measure_peaks(args.quick)  # the load changes: the limit is the best of both
    results["field"] = field_section(args.skip_field, args.quick)
    results["wall_s"] = round(time.perf_counter() - started, 1)
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="smoke run: small workloads, one repeat")
    parser.add_argument("--skip-field", action="store_true", help="do not run benchmarks/field_gkd.py")
    parser.add_argument("--skip-vllm", action="store_true", help="no vLLM scoring/rollouts (vllm not installed)")
    parser.add_argument("--zoo", type=Path, default=common.ZOO_DIR, help="perf zoo directory (built if missing)")
    parser.add_argument("--out", type=Path, help=f"where perf.json and perf.md go (default {RESULTS}; "
                        "--quick: benchmarks/.cache/perf-quick, so a smoke run never replaces the full results)")
    parser.add_argument("--from-json", type=Path, help="only rewrite perf.md from an earlier perf.json")
    args = parser.parse_args()
    args.out = args.out or (common.REPO / "benchmarks" / ".cache" / "perf-quick" if args.quick else RESULTS)
    if args.from_json:
        write_markdown(json.loads(args.from_json.read_text()), args.out / "perf.md")
        return
    results = run(args)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "perf.json").write_text(json.dumps(results, indent=2) + "\n")
    write_markdown(results, args.out / "perf.md")
    print(f"[perf] wrote {args.out / 'perf.json'} and {args.out / 'perf.md'} in {results['wall_s']:.0f} s")


if __name__ == "__main__":
    main()
