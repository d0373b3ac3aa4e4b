"""Scoring throughput: our `response_logprobs` vs a naive scorer vs vLLM prompt log-probs; peak memory.

1. `naive_logprobs` is the baseline of the issue: pad every row to the longest, run the full model
   (logits at every position) and take a float32 log_softmax over the whole vocabulary.
2. `compare_scorers` times both on the same rows (fastest of `repeats`, runs interleaved so a burst
   of load from other jobs hits both), checks they agree, and reports tokens/s and model FLOP
   utilisation 2 x params x tokens / time / peak, where tokens are the non-padding input tokens
   (prompt + response - 1 per row) that a forward pass must process.
3. `vllm_scoring` times `VLLMEngine.prompt_logprobs` on the same rows.
4. Run as a script (`python3 benchmarks/perf_scoring.py memory ...`) it scores N stored rollouts
   with `score_rollouts` in a fresh process and prints its peak RSS; `memory_growth` runs it for
   N and 10 N rows, so a scorer that held every row would show.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.perf_common import (  # noqa: E402
    REPO,
    load_average,
    parameter_count,
    peak_rss_mib,
    timed_with_peak,
)
from gopd_core.scoring import response_logprobs  # noqa: E402

Sequences = list[tuple[list[int], list[int]]]


@torch.inference_mode()
def naive_logprobs(model: torch.nn.Module, sequences: Sequences) -> list[np.ndarray]:
    """One right-padded batch, full logits, float32 log_softmax over the vocabulary (B, L, V)."""
    inputs = [prompt + response[:-1] for prompt, response in sequences]
    longest = max(len(ids) for ids in inputs)
    input_ids_BL = torch.zeros(len(inputs), longest, dtype=torch.long)
    mask_BL = torch.zeros_like(input_ids_BL)
    for b, ids in enumerate(inputs):
        input_ids_BL[b, :len(ids)] = torch.tensor(ids)
        mask_BL[b, :len(ids)] = 1
    logprobs_BLV = torch.log_softmax(model(input_ids=input_ids_BL, attention_mask=mask_BL).logits.float(), dim=-1)
    out = []
    for b, (prompt, response) in enumerate(sequences):
        positions = torch.arange(len(prompt) - 1, len(prompt) - 1 + len(response))
        out.append(logprobs_BLV[b, positions, torch.tensor(response)].numpy())
    return out


def token_counts(sequences: Sequences) -> dict:
    processed = sum(len(prompt) + len(response) - 1 for prompt, response in sequences)
    longest = max(len(prompt) + len(response) - 1 for prompt, response in sequences)
    return {"rows": len(sequences), "response_tokens": sum(len(r) for _, r in sequences),
            "processed_tokens": processed, "padded_to_longest_tokens": longest * len(sequences),
            "response_lengths": [min(len(r) for _, r in sequences), max(len(r) for _, r in sequences)]}


def rates(seconds: float, counts: dict, parameters: int, peaks: dict[str, float], adjacent: float) -> dict:
    """tokens/s and MFU (2 x params x processed tokens / s / peak) against each peak and the adjacent one."""
    flops = 2 * parameters * counts["processed_tokens"] / seconds / 1e9
    return {"seconds": round(seconds, 3), "response_tokens_per_s": round(counts["response_tokens"] / seconds, 1),
            "processed_tokens_per_s": round(counts["processed_tokens"] / seconds, 1), "model_gflops": round(flops, 2),
            **{f"mfu_vs_{name}": round(flops / peak, 4) for name, peak in peaks.items()},
            "adjacent_fp32_peak": adjacent, "mfu_vs_adjacent_fp32_peak": round(flops / adjacent, 4)}


def max_error(a: list, b: list) -> float:
    return max(float(np.abs(np.asarray(x, dtype=np.float64) - np.asarray(y)).max()) for x, y in zip(a, b))


def compare_scorers(model: torch.nn.Module, sequences: Sequences, peaks: dict[str, float], token_budget: int,
                    repeats: int, naive_repeats: int) -> dict:
    """Naive vs ours on the same rows; the fastest of the repeats of each, interleaved."""
    counts, parameters = token_counts(sequences), parameter_count(model)
    response_logprobs(model, sequences[:2], token_budget)  # warm-up
    before = load_average()
    runs = {"naive": [], "ours": []}
    scorers = {"naive": lambda: naive_logprobs(model, sequences),
               "ours": lambda: response_logprobs(model, sequences, token_budget)}
    outputs = {}
    for round_index in range(max(repeats, naive_repeats)):
        for name, count in (("naive", naive_repeats), ("ours", repeats)):
            if round_index < count:
                seconds, adjacent, outputs[name] = timed_with_peak(scorers[name])
                runs[name].append((seconds, adjacent))
    fastest = {name: min(values) for name, values in runs.items()}
    return {
        "parameters": parameters, "workload": counts, "token_budget": token_budget,
        "repeats": {"ours": repeats, "naive": naive_repeats},
        "seconds_per_run": {name: [round(s, 2) for s, _ in values] for name, values in runs.items()},
        "naive": rates(*fastest["naive"][:1], counts, parameters, peaks, fastest["naive"][1]),
        "ours": rates(*fastest["ours"][:1], counts, parameters, peaks, fastest["ours"][1]),
        "speedup_vs_naive": round(fastest["naive"][0] / fastest["ours"][0], 2),
        "max_abs_logprob_diff_vs_naive": max_error(outputs["ours"], outputs["naive"]),
        "load_before": before, "load_after": load_average(),
    }


def vllm_scoring(engine, model: torch.nn.Module, sequences: Sequences, peaks: dict[str, float],
                 repeats: int) -> dict:
    """vLLM prompt log-probs of the same rows (the engine's own process and threads)."""
    counts, parameters = token_counts(sequences), parameter_count(model)
    engine.prompt_logprobs(sequences[:2])  # warm-up
    before = load_average()
    seconds, adjacent, theirs = min(timed_with_peak(lambda: engine.prompt_logprobs(sequences))
                                    for _ in range(repeats))
    ours = response_logprobs(model, sequences)
    return {"repeats": repeats, **rates(seconds, counts, parameters, peaks, adjacent),
            "max_abs_logprob_diff_vs_ours": max_error(theirs, ours),
            "load_before": before, "load_after": load_average()}


def profile_scorer(model: torch.nn.Module, sequences: Sequences, token_budget: int, top: int = 8) -> dict:
    """Where our scorer's time goes: torch.profiler self CPU time of the top operators, as shares."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        response_logprobs(model, sequences, token_budget)
    events = sorted(prof.key_averages(), key=lambda e: -e.self_cpu_time_total)
    total = sum(e.self_cpu_time_total for e in events)
    return {"rows": len(sequences), "total_self_cpu_s": round(total / 1e6, 2),
            "top_ops": [{"op": e.key, "share": round(e.self_cpu_time_total / total, 3), "calls": e.count}
                        for e in events[:top]]}


# -- peak memory of streamed scoring ------------------------------------------------------------------


def _write_rollouts(directory: Path, sequences: Sequences) -> list[Path]:
    from benchmarks.perf_common import rollout_rows
    from storage.parquet import write_shard
    from storage.schemas import ROLLOUTS

    rows = rollout_rows("perf", sequences)
    return [write_shard(rows, directory / "part-00000.parquet", ROLLOUTS)]


class _RssSampler:
    """Highest resident memory of this process while the block runs, sampled every 5 ms."""

    def __enter__(self):
        import threading

        import psutil

        self._process, self._stop = psutil.Process(), threading.Event()
        self.before_mib = self.peak_mib = self._process.memory_info().rss / 2**20
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def _sample(self) -> None:
        while not self._stop.wait(0.005):
            self.peak_mib = max(self.peak_mib, self._process.memory_info().rss / 2**20)

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()


def _memory_child(model_path: str, rows: int, chunk_rows: int, token_budget: int, seed: int) -> dict:
    """Score `rows` stored rollouts with `score_rollouts`; runs in a fresh process (peak RSS is per process)."""
    from benchmarks.perf_common import spread_sequences
    from gopd_core.scoring import score_rollouts
    from storage.layout import RunLayout

    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    prompts = [rng.integers(3, 259, 40).tolist() for _ in range(8)]
    sequences = spread_sequences(prompts, rows, 8, 48, 512, 259, seed)
    with tempfile.TemporaryDirectory() as tmp:
        layout = RunLayout.under(tmp, "perf")
        shards = _write_rollouts(Path(tmp) / "rollouts", sequences)
        del sequences
        started = time.perf_counter()
        with _RssSampler() as rss:
            result = score_rollouts(layout, 0, shards, model_path, "student", chunk_rows=chunk_rows,
                                    token_budget=token_budget, progress=False)
        seconds = time.perf_counter() - started
    return {"rows": rows, "chunk_rows": chunk_rows, "shards_written": len(result.paths), "seconds": round(seconds, 2),
            "rss_before_scoring_mib": round(rss.before_mib, 1), "peak_rss_mib": round(rss.peak_mib, 1),
            "scoring_rss_growth_mib": round(rss.peak_mib - rss.before_mib, 1),
            "process_max_rss_mib": round(peak_rss_mib(), 1)}


def memory_growth(model_path: Path, rows: int, chunk_rows: int, token_budget: int) -> dict:
    """Peak RSS of streamed scoring for `rows` and 10 x `rows` stored rollouts (two fresh processes)."""
    runs = []
    for count in (rows, 10 * rows):
        command = [sys.executable, str(Path(__file__).resolve()), "memory", str(model_path), str(count),
                   str(chunk_rows), str(token_budget)]
        done = subprocess.run(command, capture_output=True, text=True, check=True, cwd=REPO)
        runs.append(json.loads(done.stdout.strip().splitlines()[-1]))
    small, large = runs
    return {"runs": runs, "rss_ratio_10x_rows": round(large["peak_rss_mib"] / small["peak_rss_mib"], 3),
            "rss_growth_mib": round(large["peak_rss_mib"] - small["peak_rss_mib"], 1),
            "scoring_growth_ratio_10x_rows": round(large["scoring_rss_growth_mib"]
                                                   / max(small["scoring_rss_growth_mib"], 1.0), 3)}


def main() -> None:
    parser = argparse.ArgumentParser(description="one streamed-scoring memory measurement (used by perf.py)")
    parser.add_argument("what", choices=["memory"])
    parser.add_argument("model")
    parser.add_argument("rows", type=int)
    parser.add_argument("chunk_rows", type=int)
    parser.add_argument("token_budget", type=int)
    args = parser.parse_args()
    print(json.dumps(_memory_child(args.model, args.rows, args.chunk_rows, args.token_budget, seed=0)))


if __name__ == "__main__":
    main()
