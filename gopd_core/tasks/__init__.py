"""Synthetic verifiable task domains: prompt datasets and reward dispatch.

Domains (`DOMAINS`): `math` (multi-step integer arithmetic, `arithmetic.py`) and `code` (write `f`
from input/output examples, `codegen.py`). Both are deterministic functions of a seed.

1. `make_split(domain, split, n, seed)` draws problems from a `random.Random` seeded by
   (domain, split, seed) and keeps those whose key hashes into `split`, so train and test never
   share a problem, whatever `n`.
2. Rows follow the `PROMPTS` schema; `extra` (JSON) carries the demonstration (a correct worked
   answer, used for SFT).
3. `verify(domain, response, ground_truth)` returns the reward (1.0 correct, 0.0 wrong) through
   `VERIFIERS`; `verify_batch` runs the code checks concurrently in the sandbox.
"""

from __future__ import annotations

import hashlib
import json
import random
from collections.abc import Callable, Sequence
from pathlib import Path

from gopd_core.tasks import arithmetic, codegen
from gopd_core.verify.code import verify_code, verify_code_batch
from gopd_core.verify.math_answers import verify_math
from storage.parquet import write_shard
from storage.schemas import PROMPTS

SPLITS = ("train", "test")
TEST_SHARE_PERCENT = 20  # share of the problem space reserved for the test split

# domain -> function(rng) -> {"prompt", "ground_truth", "demonstration", "key"}
DOMAINS: dict[str, Callable[[random.Random], dict]] = {
    "math": arithmetic.make_example,
    "code": codegen.make_example,
}


class UnknownTaskDomainError(KeyError):
    """A domain name that has no task generator or verifier."""

    def __str__(self) -> str:
        return str(self.args[0])


def _check_domain(domain: str, known: Sequence[str]) -> None:
    if domain not in known:
        raise UnknownTaskDomainError(f"unknown task domain {domain!r}; choose one of {sorted(known)}")


def split_of(key: str) -> str:
    """The split a problem belongs to, by a stable hash of its key."""
    bucket = int(hashlib.sha256(key.encode()).hexdigest()[:8], 16) % 100
    return "test" if bucket < TEST_SHARE_PERCENT else "train"


def make_split(domain: str, split: str, n: int, seed: int = 0) -> list[dict]:
    """`n` distinct prompt rows (PROMPTS schema) of `domain` for `split`, deterministic in `seed`."""
    _check_domain(domain, DOMAINS)
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; choose one of {SPLITS}")
    rng = random.Random(f"{domain}/{split}/{seed}")
    rows: list[dict] = []
    seen: set[str] = set()
    attempts = 0
    while len(rows) < n:
        attempts += 1
        if attempts > 50 * n + 1000:
            raise ValueError(f"could only draw {len(rows)} distinct {domain}/{split} problems, asked for {n}")
        example = DOMAINS[domain](rng)
        if example["key"] in seen or split_of(example["key"]) != split:
            continue
        seen.add(example["key"])
        rows.append({
            "prompt_id": f"{domain}-{split}-{len(rows):05d}",
            "domain": domain,
            "messages": [{"role": "user", "content": example["prompt"]}],
            "ground_truth": example["ground_truth"],
            "extra": json.dumps({"demonstration": example["demonstration"], "split": split, "seed": seed}),
        })
    return rows


def demonstration_of(row: dict) -> str:
    """The reference answer stored in a prompt row's `extra`."""
    return json.loads(row["extra"])["demonstration"]


def write_prompt_datasets(directory: str | Path, n_train: int, n_test: int, seed: int = 0) -> dict[str, str]:
    """Write `<directory>/<domain>/{train,test}.parquet` for every domain; returns "domain/split" -> path."""
    directory = Path(directory)
    written = {}
    for domain in DOMAINS:
        for split, n in (("train", n_train), ("test", n_test)):
            path = write_shard(make_split(domain, split, n, seed), directory / domain / f"{split}.parquet", PROMPTS)
            written[f"{domain}/{split}"] = str(path)
    return written


def _verify_math(response: str, ground_truth: str) -> float:
    return float(verify_math(response, ground_truth))


def _verify_code(response: str, ground_truth: str) -> float:
    return float(verify_code(response, json.loads(ground_truth)).passed)


VERIFIERS: dict[str, Callable[[str, str], float]] = {"math": _verify_math, "code": _verify_code}


def verify(domain: str, response: str, ground_truth: str) -> float:
    """Reward of one response: 1.0 if correct for `ground_truth`, else 0.0."""
    _check_domain(domain, VERIFIERS)
    return VERIFIERS[domain](response, ground_truth)


def verify_batch(
    domains: Sequence[str], responses: Sequence[str], ground_truths: Sequence[str], max_workers: int = 2
) -> list[float]:
    """Rewards of many responses, in order; code responses are checked concurrently in the sandbox."""
    if not len(domains) == len(responses) == len(ground_truths):
        raise ValueError(f"{len(domains)} domains, {len(responses)} responses, {len(ground_truths)} ground truths")
    rewards: list[float | None] = [None] * len(responses)
    code_rows = [i for i, domain in enumerate(domains) if domain == "code"]
    for i, domain in enumerate(domains):
        if domain != "code":
            rewards[i] = verify(domain, responses[i], ground_truths[i])
    if code_rows:
        verdicts = verify_code_batch(
            [responses[i] for i in code_rows], [json.loads(ground_truths[i]) for i in code_rows], max_workers=max_workers
        )
        for i, verdict in zip(code_rows, verdicts):
            rewards[i] = float(verdict.passed)
    return rewards
