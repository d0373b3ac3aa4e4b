"""How often a run reads its tokenizers from disk, and what one read costs: `results/tokenizer_reads.{json,md}`.

    python3 benchmarks/tokenizer_reads.py [--vocab 150000] [--iterations 2]   # ~2 min on 2 CPU cores

1. Cost: a byte-level BPE tokenizer of `--vocab` tokens with random merges (a real 150k-token vocabulary's
   tokenizer.json is about as large) saved as a Hugging Face directory; the median wall of 3
   `AutoTokenizer.from_pretrained` of it, as `models.load_tokenizer` reads one.
2. Count: a `distill` run on the perf zoo (student and math/code teachers, lam 1.25 so the reference scores
   too, an evaluation after every update) counting the `load_tokenizer` calls of its stages and the reads from
   disk behind them (`ResidentModels.tokenizer_loads`). The zoo's tokenizer is tiny; what its run would spend
   on the big one is calls x cost (each call was a read before the run kept tokenizers) against reads x cost.
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from benchmarks.field_gkd import ensure_zoo  # noqa: E402
from benchmarks.perf_common import load_average  # noqa: E402
from benchmarks.perf_flow import flow_config  # noqa: E402

RESULTS = REPO / "benchmarks" / "results"


def build_bpe_tokenizer(directory: Path, vocab: int, seed: int = 0) -> Path:
    """A byte-level BPE tokenizer of `vocab` tokens (random merges of existing tokens, up to 12 characters)."""
    from tokenizers import Tokenizer, decoders, models
    from tokenizers.pre_tokenizers import ByteLevel
    from transformers import PreTrainedTokenizerFast

    tokens = sorted(ByteLevel.alphabet())
    ids = {token: i for i, token in enumerate(tokens)}
    merges, rng = [], random.Random(seed)
    while len(ids) < vocab:
        left, right = rng.choice(tokens), rng.choice(tokens)
        merged = left + right
        if merged not in ids and len(merged) <= 12:
            ids[merged] = len(ids)
            tokens.append(merged)
            merges.append((left, right))
    backend = Tokenizer(models.BPE(ids, merges))
    backend.pre_tokenizer, backend.decoder = ByteLevel(add_prefix_space=False), decoders.ByteLevel()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend)
    tokenizer.add_special_tokens({"eos_token": "<|endoftext|>", "pad_token": "<|pad|>"})
    tokenizer.save_pretrained(str(directory))
    return directory


def read_seconds(directory: Path, repeats: int = 3) -> list[float]:
    from transformers import AutoTokenizer

    seconds = []
    for _ in range(repeats):
        started = time.perf_counter()
        AutoTokenizer.from_pretrained(str(directory))
        seconds.append(time.perf_counter() - started)
    return seconds


def count_reads(zoo: Path, root: Path, iterations: int) -> dict:
    """A distill run's `load_tokenizer` calls and the reads from disk behind them."""
    import gopd_core.models as models
    from flows.distill import distill

    calls = []
    tokenizer = models.ResidentModels.tokenizer

    def counted(cache, path):
        calls.append(str(path))
        return tokenizer(cache, path)

    config = flow_config(zoo, root, iterations, prompts=4, n=2, max_new_tokens=16)
    config["update"]["reward_scale"] = 1.25  # the reference scores too
    reads = models.ResidentModels.tokenizer_loads
    models.ResidentModels.tokenizer = counted
    try:
        started = time.perf_counter()
        distill(config=config)
        wall = time.perf_counter() - started
    finally:
        models.ResidentModels.tokenizer = tokenizer
    return {"iterations": iterations, "load_tokenizer_calls": len(calls),
            "reads_from_disk": models.ResidentModels.tokenizer_loads - reads, "flow_wall_s": round(wall, 2),
            "distinct_directories": len(set(calls))}


def markdown(result: dict) -> str:
    run, cost = result["run"], result["read_s_median"]
    per_iteration = run["iterations"]
    before, now = run["load_tokenizer_calls"] * cost, run["reads_from_disk"] * cost
    return "\n".join([
        "# Tokenizer reads in a run", "",
        f"Command: `{result['command']}` ({result['wall_s']} s, started {result['started_utc']}). "
        f"Load {result['load_before']} -> {result['load_after']}.", "",
        f"- One read of a {result['vocab']}-token byte-level BPE tokenizer (tokenizer.json "
        f"{result['tokenizer_json_mb']} MB): median **{cost:.2f} s** (runs {result['read_s']}).",
        f"- A {per_iteration}-iteration `distill` run on the perf zoo (math and code teachers, reference, "
        f"evaluations): **{run['load_tokenizer_calls']} `load_tokenizer` calls**, {run['distinct_directories']} "
        f"directories, **{run['reads_from_disk']} reads from disk** (flow {run['flow_wall_s']} s).",
        f"- With that tokenizer, reading at every call (before the run kept tokenizers): ~{before:.1f} s of the run, "
        f"~{before / per_iteration:.1f} s an iteration; one read per content: ~{now:.1f} s in all. Estimated "
        "from the two measurements above (the zoo's own tokenizer reads in milliseconds).", ""])


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--vocab", type=int, default=150_000)
    parser.add_argument("--iterations", type=int, default=2)
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    started, load_before = time.perf_counter(), load_average()
    started_utc = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    zoo = (REPO / "benchmarks" / ".cache" / "zoo-perf").resolve()
    ensure_zoo(zoo)
    with tempfile.TemporaryDirectory(prefix="tokenizer-reads-") as scratch:
        big = build_bpe_tokenizer(Path(scratch) / "tokenizer", args.vocab)
        seconds = read_seconds(big)
        run = count_reads(zoo, Path(scratch) / "runs", args.iterations)
        json_mb = round((big / "tokenizer.json").stat().st_size / 1e6, 1)
    command = "python3 benchmarks/tokenizer_reads.py" + (f" --vocab {args.vocab}" if args.vocab != 150_000 else "") + (
        f" --iterations {args.iterations}" if args.iterations != 2 else "")
    result = {"command": command, "started_utc": started_utc, "vocab": args.vocab, "tokenizer_json_mb": json_mb,
              "read_s": [round(s, 3) for s in seconds], "read_s_median": statistics.median(seconds), "run": run,
              "load_before": load_before, "load_after": load_average(),
              "wall_s": round(time.perf_counter() - started, 1)}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "tokenizer_reads.json").write_text(json.dumps(result, indent=2) + "\n")
    (args.out / "tokenizer_reads.md").write_text(markdown(result))
    print(markdown(result))
    return result


if __name__ == "__main__":
    main()
