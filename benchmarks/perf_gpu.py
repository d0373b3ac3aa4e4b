"""Scorer throughput and bf16 FLOP utilisation on a CUDA GPU (`perf.py` measures the CPU it runs on).

1. Measure the dense bf16 matmul peak (8192^3 products, median of timed repeats).
2. Build random-weight Llama models in bf16 on the GPU: the perf zoo's ~100M teacher shape (259-token
   vocabulary, as in the zoo) and the same with a 32k vocabulary, plus a ~1.2B model.
3. Score rows with response lengths spread over 32-512 tokens (prompts 48-96) with our scorer
   (`gopd_core.scoring.response_logprobs`) and with the naive baseline (pad to the longest row, full
   fp32 log_softmax); report response tok/s, processed tok/s and MFU = 2 x params x processed tokens
   / s / measured bf16 peak, and the max difference between the two.

    python3 benchmarks/perf_gpu.py [--json PATH] [--md PATH] [--rows 512]
    python3 benchmarks/perf_gpu.py --from-json PATH --md PATH      # rewrite the Markdown only
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from pathlib import Path

import torch
from transformers import LlamaConfig, LlamaForCausalLM

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from gopd_core.scoring import BATCH_OVERHEAD_TOKENS_BY_DEVICE, response_logprobs  # noqa: E402

SHAPES = {  # name -> (hidden, layers, intermediate, vocab)
    "perf-teacher-100M": (768, 14, 2048, 259),
    "perf-teacher-100M-vocab32k": (768, 14, 2048, 32000),
    "llama-1.2B-vocab32k": (2048, 16, 5632, 32000),
}


DEVICE, DTYPE = "cuda", torch.bfloat16  # --smoke: cpu, float32 (checks the script without a GPU)


def sync(device: str | None = None) -> None:
    if (device or DEVICE) == "cuda":
        torch.cuda.synchronize()


def matmul_peak(size: int = 8192, repeats: int = 10, device: str | None = None, dtype: torch.dtype | None = None) -> float:
    """Dense size^3 matmul GFLOP/s (median of timed repeats after warm-ups), on DEVICE in DTYPE unless given."""
    device, dtype = device or DEVICE, dtype or DTYPE
    a = torch.randn(size, size, device=device, dtype=dtype)
    b = torch.randn(size, size, device=device, dtype=dtype)
    for _ in range(3):
        a @ b
    times = []
    for _ in range(repeats):
        sync(device)
        start = time.perf_counter()
        a @ b
        sync(device)
        times.append(time.perf_counter() - start)
    return 2 * size**3 / statistics.median(times) / 1e9


def make_model(hidden: int, layers: int, intermediate: int, vocab: int) -> LlamaForCausalLM:
    config = LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=intermediate, num_hidden_layers=layers,
                         num_attention_heads=hidden // 64, num_key_value_heads=hidden // 64, head_dim=64,
                         max_position_embeddings=1024, tie_word_embeddings=True, attn_implementation="sdpa")
    torch.manual_seed(0)
    return LlamaForCausalLM(config).to(device=DEVICE, dtype=DTYPE).eval()


def make_rows(count: int, vocab: int, seed: int = 0) -> list[tuple[list[int], list[int]]]:
    generator = torch.Generator().manual_seed(seed)
    rows = []
    for _ in range(count):
        prompt = int(torch.randint(48, 97, (1,), generator=generator))
        response = int(torch.randint(32, 513, (1,), generator=generator))
        ids = torch.randint(3, vocab, (prompt + response,), generator=generator).tolist()
        rows.append((ids[:prompt], ids[prompt:]))
    return rows


@torch.inference_mode()
def naive_logprobs(model, rows, batch_rows: int) -> list:
    """Pad each batch to its longest row, full-vocabulary fp32 log_softmax at every position."""
    out = []
    for start in range(0, len(rows), batch_rows):
        batch = rows[start:start + batch_rows]
        width = max(len(p) + len(r) for p, r in batch)
        ids = torch.zeros(len(batch), width, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for i, (p, r) in enumerate(batch):
            ids[i, :len(p) + len(r)] = torch.tensor(p + r)
            mask[i, :len(p) + len(r)] = 1
        ids, mask = ids.to(DEVICE), mask.to(DEVICE)
        logprobs = torch.log_softmax(model(input_ids=ids, attention_mask=mask).logits.float(), dim=-1)
        for i, (p, r) in enumerate(batch):
            positions = torch.arange(len(p) - 1, len(p) + len(r) - 1, device=DEVICE)
            out.append(logprobs[i, positions, ids[i, positions + 1]].cpu().numpy())
    return out


def timed(function, repeats: int = 3) -> tuple[float, object]:
    result = function()  # warm-up (kernels, allocator)
    times = []
    for _ in range(repeats):
        sync()
        start = time.perf_counter()
        result = function()
        sync()
        times.append(time.perf_counter() - start)
    return min(times), result


def measure(name: str, shape: tuple, rows_count: int, peak: float, token_budget: int) -> dict:
    model = make_model(*shape)
    params = sum(p.numel() for p in model.parameters())
    rows = make_rows(rows_count, shape[3])
    processed = sum(len(p) + len(r) - 1 for p, r in rows)
    response = sum(len(r) for _, r in rows)
    ours_s, ours = timed(lambda: response_logprobs(model, rows, token_budget=token_budget))
    naive_rows = 16 if shape[3] > 1000 else 64  # the naive fp32 logits of 32k x 560 x rows must fit
    naive_s, naive = timed(lambda: naive_logprobs(model, rows, naive_rows), repeats=1)
    max_diff = max(float(abs(a - b).max()) for a, b in zip(ours, naive))
    result = {"model": name, "parameters": params, "shape": dict(zip(("hidden", "layers", "intermediate", "vocab"), shape)),
              "rows": rows_count, "response_tokens": response, "processed_tokens": processed,
              "token_budget": token_budget}
    for label, seconds in (("ours", ours_s), ("naive", naive_s)):
        result[label] = {"s": round(seconds, 4), "response_tok_s": round(response / seconds),
                         "processed_tok_s": round(processed / seconds),
                         "mfu_bf16": round(2 * params * processed / seconds / 1e9 / peak, 4)}
    result["speedup_vs_naive"] = round(naive_s / ours_s, 2)
    result["max_abs_diff_vs_naive"] = max_diff
    print(json.dumps(result), flush=True)
    return result


def markdown(payload: dict) -> str:
    lines = ["# Scoring on a GPU (bf16)", "",
             f"Command: `{payload['command']}` on {payload['gpu']} (torch {payload['torch']}, Python "
             f"{payload['python']}). Measured bf16 matmul peak (8192^3): "
             f"**{payload['bf16_matmul_peak_gflops'] / 1000:.0f} TFLOP/s**.", "",
             "Random-weight Llama models in bf16, 512 rows with prompts of 48-96 and responses of 32-512 tokens; "
             "fastest of 3 timed runs after a warm-up (naive: one run). MFU = 2 x params x processed tokens / s / "
             f"peak. Micro-batch plan: per-forward cost {payload.get('batch_overhead_tokens', '?')} tokens, "
             "token budget as in the command.", "",
             "| model | params | vocab | ours tok/s (response) | ours MFU | naive tok/s | naive MFU | speedup | max diff |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in payload["results"]:
        lines.append(f"| {r['model']} | {r['parameters'] / 1e6:.0f}M | {r['shape']['vocab']} | "
                     f"{r['ours']['response_tok_s']:,} | {r['ours']['mfu_bf16']:.1%} | {r['naive']['response_tok_s']:,} | "
                     f"{r['naive']['mfu_bf16']:.1%} | {r['speedup_vs_naive']:.2f}x | {r['max_abs_diff_vs_naive']:.1e} |")
    lines += ["", "The 60%-of-bf16-peak target of issue 6 does not hold on this GPU for these small models: a "
              "768-wide model is bound by kernel launches and Python in eager mode (cProfile: the transformers "
              "forward, rotary embedding and RMSNorm calls dominate, not the matmuls), and even the 0.9B model "
              "reaches about 37%. `perf_gpu_sweep.jsonl` holds the per-forward-cost sweep that set the CUDA "
              "micro-batch plan (`scoring.BATCH_OVERHEAD_TOKENS_BY_DEVICE`).", ""]
    return "\n".join(lines)


def write_outputs(payload: dict, json_path: Path | None, md_path: Path | None, markdown) -> None:
    """The run's JSON and its Markdown table, where asked for (`markdown(payload)` renders the table)."""
    if json_path:
        json_path.write_text(json.dumps(payload, indent=2))
    if md_path:
        md_path.write_text(markdown(payload))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--json", type=Path)
    parser.add_argument("--rows", type=int, default=512)
    parser.add_argument("--token-budget", type=int, default=65536)
    parser.add_argument("--smoke", action="store_true", help="tiny run on the CPU in float32 (no GPU needed)")
    parser.add_argument("--md", type=Path, help="also write the Markdown table here")
    parser.add_argument("--from-json", type=Path, help="only rewrite --md from this earlier --json output")
    args = parser.parse_args()
    if args.from_json:
        args.md.write_text(markdown(json.loads(args.from_json.read_text())))
        return
    global DEVICE, DTYPE
    shapes = SHAPES
    if args.smoke:
        DEVICE, DTYPE = "cpu", torch.float32
        shapes = {"smoke": (128, 2, 256, 300)}
    peak = matmul_peak(512 if args.smoke else 8192)
    print(json.dumps({"bf16_peak_gflops": round(peak)}), flush=True)
    results = []
    for name, shape in shapes.items():
        results.append(measure(name, shape, args.rows, peak, args.token_budget))
        if DEVICE == "cuda":
            torch.cuda.empty_cache()  # the model of `measure` is gone with its frame
    payload = {"command": "python3 benchmarks/perf_gpu.py " + " ".join(sys.argv[1:]),
               "gpu": torch.cuda.get_device_name() if DEVICE == "cuda" else "none (smoke)", "torch": torch.__version__, "python": platform.python_version(),
               "bf16_matmul_peak_gflops": round(peak), "results": results,
               "batch_overhead_tokens": BATCH_OVERHEAD_TOKENS_BY_DEVICE.get(DEVICE)}
    write_outputs(payload, args.json, args.md, markdown)


if __name__ == "__main__":
    main()
