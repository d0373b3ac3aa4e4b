"""Writing one iteration's checkpoint: through the page cache vs around it: `results/checkpoint_io.{json,md}`.

    python3 benchmarks/checkpoint_io.py [--rounds 3] [--vocab 151936]   # ~2 min on 2 CPU cores

The update writes, every iteration, the new weights (safetensors), their content hash (the rollout's
`checkpoint_id`) and the AdamW state (twice the weights). This measures those three on the perf
zoo's student widened to `--vocab` tokens (103.5M parameters at 151,936), the two ways alternating
in each round, every file written new and kept to the end, as a run's checkpoints are:
- buffered (before): `save_pretrained`, the hash read back from the written files, `torch.save` to
  a path;
- direct (now): `gopd_core.models.save_model` with the weights deferred (the shards caught, hashed
  from memory with BLAKE3, placeholders written), then `SavedModel.write_weights` (O_DIRECT from the
  tensors' own page-aligned memory, `storage.direct_io`), `write_torch` of the page-aligned AdamW state.
Wall seconds and this process's user and kernel CPU seconds (`os.times`) per part. In a run, the
hash is on the update's critical path (before: the weights write); the weights and the AdamW state
are written on the deferred background thread, where their CPU seconds compete with the next rollout's.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

import torch  # noqa: E402

from benchmarks import perf_common as common  # noqa: E402
from benchmarks.field_gkd import ensure_zoo, widen_vocabulary  # noqa: E402
from gopd_core.allocator import reexec_with_preferred_allocator  # noqa: E402
from gopd_core.models import load_model, model_hash, save_model  # noqa: E402
from storage.direct_io import page_aligned, write_torch  # noqa: E402

RESULTS = REPO / "benchmarks" / "results"
PARTS = ("weights", "hash", "optimizer")


def timed(work) -> dict:
    before, started = os.times(), time.perf_counter()
    work()
    after = os.times()
    return {"wall_s": round(time.perf_counter() - started, 3), "user_s": round(after.user - before.user, 3),
            "kernel_s": round(after.system - before.system, 3)}


def write_buffered(model, state: dict, directory: Path) -> dict:
    return {
        "weights": timed(lambda: model.save_pretrained(str(directory), safe_serialization=True)),
        "hash": timed(lambda: model_hash(directory)),  # nothing promised for it: read back
        "optimizer": timed(lambda: torch.save(state, directory / "optimizer.pt")),
    }


def write_direct(model, state: dict, directory: Path) -> dict:
    saved = []
    times = {"hash": timed(lambda: saved.append(save_model(model, directory, defer_weights=True)))}
    times["weights"] = timed(lambda: saved[0].write_weights(directory))
    times["optimizer"] = timed(lambda: write_torch(state, directory / "optimizer.pt"))
    return times


def page_align(model, state: dict) -> None:
    """As the update does once per run (`training._page_align`): parameters and AdamW state in page-aligned memory."""
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.data = page_aligned(parameter.data)
    for slot in state["state"].values():
        for name, value in slot.items():
            slot[name] = page_aligned(value)


def trained_state(model) -> dict:
    """An AdamW state of the model's shape (one step on a small loss), as the update keeps it."""
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-6)
    model(torch.tensor([[1, 2, 3, 4]]), labels=torch.tensor([[1, 2, 3, 4]])).loss.backward()
    optimizer.step()
    return optimizer.state_dict()


def medians(rounds: list[dict], way: str) -> dict:
    return {part: {key: round(statistics.median(r[way][part][key] for r in rounds), 3)
                   for key in ("wall_s", "user_s", "kernel_s")} for part in PARTS}


def markdown(report: dict) -> str:
    lines = [
        "# Checkpoint writes: page cache vs O_DIRECT", "",
        f"Command: `{report['command']}` ({report['wall_s']:.0f} s, started {report['started']}).", "",
        f"Machine: {report['machine']['cpu']}, {report['machine']['cores']} cores, "
        f"{report['machine']['ram_gib']} GiB RAM, torch {report['machine']['torch']}, "
        f"malloc {report['machine']['allocator']}. Load {report['load_before']} -> {report['load_after']}.", "",
        f"Model: perf zoo student widened to {report['vocab']} tokens, {report['parameters'] / 1e6:.1f}M "
        f"parameters; weights {report['bytes']['weights'] / 2**20:.0f} MiB, AdamW state "
        f"{report['bytes']['optimizer'] / 2**20:.0f} MiB; scratch on `{report['scratch_filesystem']}`; "
        f"{report['rounds']} rounds, the two ways alternating, medians below (every round in the JSON).", "",
        "| part | buffered wall s | buffered kernel s | direct wall s | direct kernel s | wall ratio |",
        "|---|---|---|---|---|---|",
    ]
    for part in PARTS:
        before, after = report["median"]["buffered"][part], report["median"]["direct"][part]
        ratio = before["wall_s"] / after["wall_s"] if after["wall_s"] else float("inf")
        lines.append(f"| {part} | {before['wall_s']} | {before['kernel_s']} | {after['wall_s']} | "
                     f"{after['kernel_s']} | {ratio:.1f}x |")
    lines += ["", "Buffered (before): the weights on the update's critical path, hash and optimizer on the deferred "
              "thread. Direct (now): the hash, taken from memory, on the critical path; the weights and the "
              "optimizer on the deferred thread, overlapping the next rollout (their CPU seconds take from it).", ""]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--vocab", type=int, default=151936)
    parser.add_argument("--scratch", type=Path, default=REPO / "benchmarks" / ".cache",
                        help="where the checkpoints are written (the run storage's filesystem)")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    reexec_with_preferred_allocator()  # as the gopd command runs
    torch.set_num_threads(2)
    started_at, started = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), time.perf_counter()
    zoo = common.ZOO_DIR.resolve()
    ensure_zoo(zoo)
    model = load_model(widen_vocabulary(zoo, args.vocab) / "student-base")
    state = trained_state(model)
    page_align(model, state)
    load_before, rounds = common.load_average(), []
    args.scratch.mkdir(parents=True, exist_ok=True)
    scratch = Path(tempfile.mkdtemp(prefix="checkpoint-io-", dir=args.scratch))
    try:
        for index in range(args.rounds):
            ways = [("buffered", write_buffered), ("direct", write_direct)]
            if index % 2:
                ways.reverse()  # neither way always goes first
            row = {}
            for way, write in ways:
                directory = scratch / f"{way}-{index}"
                directory.mkdir()
                row[way] = write(model, state, directory)
                print(way, index, json.dumps(row[way]), flush=True)
            rounds.append(row)
        sizes = {"weights": sum(p.stat().st_size for p in (scratch / "direct-0").glob("*.safetensors")),
                 "optimizer": (scratch / "direct-0" / "optimizer.pt").stat().st_size}
        df = subprocess.run(["df", "--output=fstype", str(scratch)], capture_output=True, text=True)
        filesystem = df.stdout.split()[1:2]
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    report = {
        "benchmark": "checkpoint_io", "command": common.invocation("benchmarks/checkpoint_io.py"),
        "started": started_at, "wall_s": round(time.perf_counter() - started, 1), "machine": common.machine(),
        "vocab": args.vocab, "parameters": common.parameter_count(model), "bytes": sizes,
        "scratch_filesystem": filesystem[0] if filesystem else "unknown", "rounds": args.rounds,
        "load_before": load_before, "load_after": common.load_average(),
        "median": {way: medians(rounds, way) for way in ("buffered", "direct")}, "per_round": rounds,
    }
    common.write_results(args.out, "checkpoint_io", report, markdown(report))


if __name__ == "__main__":
    main()
