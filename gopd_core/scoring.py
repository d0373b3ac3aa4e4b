"""Score sampled responses: the log-prob of every response token under a teacher, reference or student.

Shape suffixes: `_B` rows of a micro-batch, `_L` padded sequence positions, `_N` response tokens
gathered from a micro-batch, `_H` hidden size, `_V` vocabulary.

1. `response_logprobs` sorts rows by length and packs them into micro-batches of at most
   `token_budget` padded tokens (rows * longest row), split where padding plus per-batch overhead
   is least (`plan_microbatches`), so a short row is never padded to a much longer one.
2. Each micro-batch is right-padded and run through the decoder only (no logits), with the causal
   mask alone: right padding comes after every real token, so no real position attends to it,
   and SDPA can skip the blocks above the diagonal instead of applying a (B, L, L) mask. The hidden states
   that predict response tokens are gathered, and `lm_head` is applied to them in chunks: each
   chunk's logits are upcast to fp32 for a logsumexp, and the chosen token's logit is gathered.
   No (B, L, V) float32 log_softmax is ever built.
3. `score_rollouts` streams rollout shards in chunks of `chunk_rows`, scores each chunk, and writes
   one `scores` shard per chunk. An `_INPUTS.json` written first records what is being scored, and a
   `_SUCCESS.json` written last makes a repeat call a no-op; after a crash, chunk shards already
   written (for the same inputs) are kept and only the missing chunks are scored.
4. Context distillation (`context="ground_truth"`): the teacher sees the prompt re-rendered with its
   own chat template plus the ground truth as a reference solution; the student's response token ids
   are scored unchanged.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import torch
from tqdm.auto import tqdm
from transformers import PreTrainedTokenizerBase

from gopd_core.attention import attention_kernels, cpu_attention, packed_rows, packs_rows
from gopd_core.fused_layers import fused_layers
from gopd_core.head_logprobs import chosen_logprobs, logit_transform
from gopd_core.models import (
    best_dtype,
    check_same_vocab,
    load_tokenizer,
    model_hash,
    render_prompt,
    resident_models,
)
from storage.layout import RunLayout, write_json_atomic
from storage.parquet import CorruptShardError, iter_batches, open_shard, write_shard
from storage.schemas import ROLLOUTS, SCORES

logger = logging.getLogger(__name__)

Sequences = Sequence[tuple[Sequence[int], Sequence[int]]]

# One forward pass costs about as much as this many extra padded tokens (python, kernel launches),
# by device type. CPU: measured on the perf zoo's 25M model on 2 cores (16 tokens 66 ms, 64 tokens
# 132 ms). CUDA: an eager forward launches ~10 kernels per layer, worth thousands of tokens on a
# GPU: on an H200 the CPU value split 512 rows into 44 forwards; 4096 was fastest or within 3% of it
# for a 100M and a 0.9B model (benchmarks/results/perf_gpu_sweep.jsonl).
BATCH_OVERHEAD_TOKENS = 64
BATCH_OVERHEAD_TOKENS_BY_DEVICE = {"cpu": BATCH_OVERHEAD_TOKENS, "cuda": 4096}
LOGIT_CHUNK_ELEMENTS = 1 << 25  # fp32 logits per lm_head chunk: 128 MiB, e.g. 221 tokens of a 151k vocab
INPUTS_MARKER = "_INPUTS.json"
SUCCESS_MARKER = "_SUCCESS.json"
ROLLOUT_COLUMNS = ["run_id", "iteration", "rollout_id", "prompt_id", "domain", "prompt_token_ids", "response_token_ids"]


class ContextPromptError(KeyError):
    """Context distillation needs a prompt row (with a ground truth) that is missing."""

    def __str__(self) -> str:  # KeyError quotes its message; keep it readable
        return str(self.args[0])


@dataclass(frozen=True)
class ScoreResult:
    """What one `score_rollouts` call left on disk."""

    directory: Path
    paths: tuple[Path, ...]
    rows: int
    model_hash: str
    cache_hit: bool


# -- core: per-token log-probs ------------------------------------------------------------------


def plan_microbatches(lengths: Sequence[int], token_budget: int,
                      batch_overhead_tokens: int = BATCH_OVERHEAD_TOKENS) -> list[list[int]]:
    """Group row indices into micro-batches with rows * longest row <= token_budget, padding little.

    1. Sort rows longest first (an out-of-memory shows up on the first batch, not the last); every
       micro-batch is a run of consecutive sorted rows, so it is padded to its own first row.
    2. Dynamic programming over the split points picks the runs that minimise padded tokens plus
       `batch_overhead_tokens` per micro-batch (the fixed cost of one forward pass, in tokens).
       Greedy filling up to the budget padded a 250-token row to 500 whenever they shared a batch.
    A single row longer than the budget gets a micro-batch of its own.
    """
    if token_budget < 1:
        raise ValueError(f"token_budget must be >= 1, got {token_budget}")
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    best_cost = [0] + [float("inf")] * len(order)  # best_cost[k]: cheapest plan of the k longest rows
    split = [0] * (len(order) + 1)
    for end in range(1, len(order) + 1):
        for start in range(end - 1, -1, -1):  # the batch is order[start:end], padded to order[start]
            padded = (end - start) * lengths[order[start]]
            if padded > token_budget and end - start > 1:
                break
            cost = best_cost[start] + padded + batch_overhead_tokens
            if cost < best_cost[end]:
                best_cost[end], split[end] = cost, start
    batches, end = [], len(order)
    while end > 0:
        batches.append(order[split[end]:end])
        end = split[end]
    return batches[::-1]


def plan_packs(lengths: Sequence[int], token_budget: int) -> list[list[int]]:
    """Group row indices into packs of at most `token_budget` tokens in all (rows laid end to end, no padding).

    Longest rows first (an out-of-memory shows up on the first pack), each pack filled in that order until the
    next row would not fit; a row longer than the budget gets a pack of its own.
    """
    if token_budget < 1:
        raise ValueError(f"token_budget must be >= 1, got {token_budget}")
    packs: list[list[int]] = []
    filled = token_budget
    for i in sorted(range(len(lengths)), key=lambda i: -lengths[i]):
        if filled + lengths[i] > token_budget:
            packs.append([])
            filled = 0
        packs[-1].append(i)
        filled += lengths[i]
    return packs


def pack_rows(
    rows: list[tuple[Sequence[int], Sequence[int]]], device: torch.device | str
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, list[int]]:
    """Rows' inputs (prompt + response[:-1]) end to end in one sequence, for `attention.packed_rows`.

    Returns input_ids_1T, position_ids_1T (restarting at 0 for each row), for the N response tokens of all
    rows in order index_N (the packed position whose hidden state predicts the token) and target_N, and
    each row's packed length (what `packed_rows` takes). The scorer's and the update's packing.
    """
    input_ids, positions, index_N, target_N, lengths = [], [], [], [], []
    for prompt, response in rows:
        start = len(input_ids)
        input_ids.extend(prompt)
        input_ids.extend(response[:-1])
        lengths.append(len(input_ids) - start)
        positions.extend(range(lengths[-1]))
        index_N.extend(range(start + len(prompt) - 1, start + len(prompt) - 1 + len(response)))
        target_N.extend(response)
    as_long = lambda values: torch.tensor(values, dtype=torch.long, device=device)  # noqa: E731
    return as_long(input_ids)[None], as_long(positions)[None], as_long(index_N), as_long(target_N), lengths


def _pad_microbatch(
    rows: list[tuple[Sequence[int], Sequence[int]]], device: torch.device
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Right-padded inputs (prompt + response[:-1]) and where each response token is predicted.

    Returns input_ids_BL, and for the N response tokens of all rows in order: row_N, position_N
    (the position whose hidden state predicts the token) and target_N. No attention mask: with
    right padding, the causal mask alone keeps every real position from seeing a pad token.
    """
    inputs = [list(prompt) + list(response[:-1]) for prompt, response in rows]
    longest = max(len(ids) for ids in inputs)
    input_ids_BL = torch.zeros(len(rows), longest, dtype=torch.long)
    row_N, position_N, target_N = [], [], []
    for b, (ids, (prompt, response)) in enumerate(zip(inputs, rows, strict=True)):
        input_ids_BL[b, :len(ids)] = torch.tensor(ids)
        row_N.extend([b] * len(response))
        position_N.extend(range(len(prompt) - 1, len(prompt) - 1 + len(response)))
        target_N.extend(response)
    as_long = lambda values: torch.tensor(values, dtype=torch.long, device=device)  # noqa: E731
    return input_ids_BL.to(device), as_long(row_N), as_long(position_N), as_long(target_N)


def _check_sequences(sequences: Sequences, vocab_size: int) -> None:
    for i, (prompt, response) in enumerate(sequences):
        if response and not prompt:
            raise ValueError(f"row {i} has an empty prompt: its first response token has no context to score")
        ids = [*prompt, *response]
        if ids and not 0 <= min(ids) <= max(ids) < vocab_size:
            raise ValueError(
                f"row {i} holds token id {max(ids) if max(ids) >= vocab_size else min(ids)} outside the "
                f"model's vocabulary [0, {vocab_size}): were these ids made by another tokenizer?"
            )


@torch.inference_mode()
def response_logprobs(
    model: torch.nn.Module, sequences: Sequences, token_budget: int = 8192, dtype: torch.dtype | None = None,
    *, logit_chunk_elements: int = LOGIT_CHUNK_ELEMENTS, batch_overhead_tokens: int | None = None,
) -> list[np.ndarray]:
    """Log-prob of each response token under `model`, one float32 array (len(response),) per row.

    sequences: (prompt_token_ids, response_token_ids) per row, in any order and of any lengths.
    token_budget: most tokens per forward pass: padded ones (rows x longest row), or, where rows are packed
        end to end (`attention.packs_rows`: Llama-family models on the CPU), all of them.
    dtype: compute dtype; None runs in the model's own dtype, another dtype runs under
        torch.autocast (e.g. bfloat16 matmuls over fp32 weights). The logsumexp is always fp32.
    logit_chunk_elements: most logits (tokens x vocab) materialised at once.
    batch_overhead_tokens: the fixed cost of one forward pass in padded tokens, for the micro-batch
        plan (`plan_microbatches`); None takes the device type's (BATCH_OVERHEAD_TOKENS_BY_DEVICE).
    """
    decoder, lm_head = model.get_decoder(), model.get_output_embeddings()
    _check_sequences(sequences, model.get_input_embeddings().num_embeddings)
    device = next(model.parameters()).device
    autocast = dtype is not None and dtype != next(model.parameters()).dtype
    transform = logit_transform(model.config)
    chunk_tokens = max(1, logit_chunk_elements // lm_head.out_features)
    results = [np.zeros(0, dtype=np.float32) for _ in sequences]
    scored = [i for i, (_, response) in enumerate(sequences) if len(response)]
    lengths = [len(sequences[i][0]) + len(sequences[i][1]) - 1 for i in scored]
    if batch_overhead_tokens is None:
        batch_overhead_tokens = BATCH_OVERHEAD_TOKENS_BY_DEVICE.get(device.type, BATCH_OVERHEAD_TOKENS)
    packed = packs_rows(model)
    plan = (plan_packs(lengths, token_budget) if packed
            else plan_microbatches(lengths, token_budget, batch_overhead_tokens))
    # bf16 on AVX512-BF16 CPUs: the native kernel instead of SDPA; on CUDA, SDPA without cuDNN's
    with cpu_attention(model), attention_kernels(device), fused_layers(model):
        for batch in plan:
            rows = [sequences[scored[j]] for j in batch]
            if packed:  # rows end to end in one sequence, attending within themselves: no padding at all
                input_ids_1T, position_ids_1T, index_N, target_N, row_lengths = pack_rows(rows, device)
                with packed_rows(row_lengths), torch.autocast(device.type, dtype=dtype, enabled=autocast):
                    hidden_TH = decoder(input_ids=input_ids_1T, position_ids=position_ids_1T,
                                        use_cache=False).last_hidden_state[0]
                    logprobs_N = chosen_logprobs(hidden_TH[index_N], target_N, lm_head, transform, chunk_tokens)
            else:
                input_ids_BL, row_N, position_N, target_N = _pad_microbatch(rows, device)
                with torch.autocast(device.type, dtype=dtype, enabled=autocast):
                    # causal mask only (no padding mask): SDPA then skips the blocks above the diagonal,
                    # ~40% less scoring time on the perf zoo; pad positions' outputs are never read
                    hidden_BLH = decoder(input_ids=input_ids_BL, use_cache=False).last_hidden_state
                    logprobs_N = chosen_logprobs(hidden_BLH[row_N, position_N], target_N, lm_head, transform,
                                                 chunk_tokens)
            ends = np.cumsum([len(response) for _, response in rows])[:-1]
            for j, values in zip(batch, np.split(logprobs_N.float().cpu().numpy(), ends), strict=True):
                results[scored[j]] = values
    return results


# -- context distillation -----------------------------------------------------------------------


def with_ground_truth(prompt_row: dict) -> list[dict]:
    """The prompt's messages with its ground truth added to the last user message as a reference."""
    ground_truth = prompt_row.get("ground_truth")
    if ground_truth is None:
        raise ContextPromptError(
            f"prompt {prompt_row.get('prompt_id')!r} has no ground_truth: context distillation "
            "(context='ground_truth') needs one for every scored prompt"
        )
    messages = [dict(message) for message in prompt_row["messages"]]
    users = [i for i, message in enumerate(messages) if message["role"] == "user"]
    reference = f"Reference solution: {ground_truth}"
    if users:
        messages[users[-1]]["content"] = f"{messages[users[-1]]['content']}\n\n{reference}"
    else:
        messages.append({"role": "user", "content": reference})
    return messages


# context mode -> how the teacher's messages are built from a prompts row
CONTEXT_MODES: dict[str, Callable[[dict], list[dict]]] = {"ground_truth": with_ground_truth}


def context_prompt_ids(tokenizer: PreTrainedTokenizerBase, prompt_row: dict, context: str) -> list[int]:
    """Prompt token ids the context teacher sees: its own chat template over the augmented messages."""
    return render_prompt(tokenizer, CONTEXT_MODES[context](prompt_row))


def score_key(model_path: str | Path, context: str | None) -> str:
    """Hash naming a score set: the weights hash, plus the context mode for context teachers."""
    weights = model_hash(model_path)
    if context is None:
        return weights
    return hashlib.sha256(f"{weights}|context={context}".encode()).hexdigest()[:16]


# -- streaming rollouts -------------------------------------------------------------------------


def rollout_chunks(shards: Sequence[Path], chunk_rows: int, domain: str | None) -> Iterator[pa.Table]:
    """Rollout rows (only `domain`'s if given) in tables of exactly `chunk_rows` rows, the last shorter.

    Streams: at most about 2 * chunk_rows rows are held. Chunk k is the same rows on every call.
    """
    pending: list[pa.Table] = []
    held = 0
    for batch in iter_batches(shards, ROLLOUTS, chunk_rows, columns=ROLLOUT_COLUMNS):
        if domain is not None:
            batch = batch.filter(pc.equal(batch.column("domain"), domain))
        pending.append(batch)
        held += batch.num_rows
        while held >= chunk_rows:
            combined = pa.concat_tables(pending).combine_chunks()
            yield combined.slice(0, chunk_rows)
            pending, held = [combined.slice(chunk_rows)], held - chunk_rows
    if held:
        yield pa.concat_tables(pending).combine_chunks()


def count_rollouts(shards: Sequence[Path], domain: str | None) -> int:
    """Rows `rollout_chunks` will yield (reads only the domain column)."""
    if domain is None:
        return sum(open_shard(Path(path)).metadata.num_rows for path in shards)
    return sum(int(pc.sum(pc.equal(batch.column("domain"), domain)).as_py() or 0)
               for batch in iter_batches(shards, ROLLOUTS, 65536, columns=["domain"]))


def _chunk_sequences(
    chunk: pa.Table, tokenizer: PreTrainedTokenizerBase, context: str | None,
    prompts: dict[str, dict] | None, rendered: dict[str, list[int]],
) -> list[tuple[list[int], list[int]]]:
    """(prompt ids, response ids) to score for each rollout row; context prompts are cached in `rendered`."""
    responses = chunk.column("response_token_ids").to_pylist()
    if context is None:
        return list(zip(chunk.column("prompt_token_ids").to_pylist(), responses, strict=True))
    prompt_ids = []
    for prompt_id in chunk.column("prompt_id").to_pylist():
        if prompt_id not in rendered:
            if prompt_id not in prompts:
                raise ContextPromptError(
                    f"prompt {prompt_id!r} of a rollout is not in `prompts`: pass the run's prompt rows "
                    "so the context teacher can see each prompt's ground truth"
                )
            rendered[prompt_id] = context_prompt_ids(tokenizer, prompts[prompt_id], context)
        prompt_ids.append(rendered[prompt_id])
    return list(zip(prompt_ids, responses, strict=True))


# -- score sets on disk -------------------------------------------------------------------------


def _shard_holds(path: Path, rollout_ids: list[str]) -> bool:
    """True if `path` is a readable scores shard for exactly these rollouts, in this order."""
    if not path.exists():
        return False
    try:
        stored = open_shard(path).read(columns=["rollout_id"]).column("rollout_id").to_pylist()
    except (CorruptShardError, pa.ArrowInvalid, OSError):
        return False
    return stored == rollout_ids


def _inputs_identity(
    shards: Sequence[Path], model_path: str | Path, key: str, role: str, domain: str | None,
    context: str | None, chunk_rows: int, precision: str,
) -> dict:
    """What a score set is computed from; a set is reused only for an equal identity.

    `precision` (float32, bfloat16) is in it: the same weights scored in another precision (another
    machine's native bf16, or GOPD_PRECISION) give other log-probs, so the set is scored again.
    """
    stamps = [[str(Path(p).resolve()), Path(p).stat().st_size, Path(p).stat().st_mtime_ns] for p in shards]
    return {"rollout_shards": stamps, "model_id": str(model_path), "model_hash": key, "role": role,
            "domain": domain, "context": context, "chunk_rows": chunk_rows, "precision": precision}


def _read_json(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return None


def _cached_result(directory: Path, identity: dict) -> ScoreResult | None:
    """The finished score set in `directory` if it was made from `identity` and is all there."""
    done = _read_json(directory / SUCCESS_MARKER)
    if done is None or done.get("inputs") != identity:
        return None
    paths = tuple(directory / name for name in done["shards"])
    if not all(path.exists() for path in paths):
        return None
    return ScoreResult(directory, paths, int(done["rows"]), identity["model_hash"], cache_hit=True)


def _start_or_resume(directory: Path, identity: dict) -> None:
    """Keep chunk shards of an interrupted call with the same inputs; otherwise clear stale ones."""
    (directory / SUCCESS_MARKER).unlink(missing_ok=True)
    if _read_json(directory / INPUTS_MARKER) != identity:
        for stale in directory.glob("part-*.parquet"):
            stale.unlink()
    write_json_atomic(directory / INPUTS_MARKER, identity)


def _scores_table(chunk: pa.Table, logprobs: list[np.ndarray], role: str, domain: str | None,
                  model_id: str, key: str) -> pa.Table:
    rows = chunk.num_rows
    return pa.table({
        "run_id": chunk.column("run_id"),
        "iteration": chunk.column("iteration"),
        "rollout_id": chunk.column("rollout_id"),
        "role": pa.array([role] * rows, pa.string()),
        "domain": pa.array([domain] * rows, pa.string()),
        "model_id": pa.array([model_id] * rows, pa.string()),
        "model_hash": pa.array([key] * rows, pa.string()),
        "logprobs": pa.array([values.tolist() for values in logprobs], pa.list_(pa.float32())),
    })


def _check_lengths(role: str, rollout_ids: list[str], logprobs: list[np.ndarray], lengths: pa.Array) -> None:
    """One log-prob per response token of every row, or the row is refused before anything is written."""
    for rollout_id, values, length in zip(rollout_ids, logprobs, lengths.to_pylist(), strict=True):
        if len(values) != length:
            raise ValueError(f"{role} log-probs of rollout {rollout_id}: {len(values)} values for {length} "
                             "response tokens")


def _check_arguments(role: str, domain: str | None, context: str | None, prompts, chunk_rows: int) -> None:
    if not role or "/" in role:
        raise ValueError(f"role must be a non-empty name without '/', got {role!r}")
    if domain is not None and (not domain or "/" in domain or domain.startswith((".", "_"))):
        raise ValueError(f"domain {domain!r} cannot name a directory: use letters, digits, '-', not starting with '.' or '_'")
    if context is not None and context not in CONTEXT_MODES:
        raise ValueError(f"unknown context mode {context!r}; choose one of {sorted(CONTEXT_MODES)} or None")
    if context is not None and prompts is None:
        raise ValueError(f"context={context!r} needs `prompts` (prompt_id -> prompts row with ground_truth)")
    if chunk_rows < 1:
        raise ValueError(f"chunk_rows must be >= 1, got {chunk_rows}")


def score_rollouts(
    layout: RunLayout, iteration: int, rollout_shards: list[Path], model_path: str | Path, role: str, *,
    domain: str | None = None, context: str | None = None, prompts: dict[str, dict] | None = None,
    student_tokenizer_path: str | Path | None = None, chunk_rows: int = 256, token_budget: int = 8192,
    device: str = "cpu", dtype: torch.dtype | None = None, progress: bool = True,
) -> ScoreResult:
    """Score every response token of `rollout_shards` with `model_path`; write one scores shard per chunk.

    Shards go to `layout.scores_dir(iteration, role, key)/part-{k:05d}.parquet` (under a further
    `domain=<domain>/` when `domain` is given, so one model may teach several domains), where key is
    the weights hash (plus the context mode for context teachers). Raises VocabularyMismatchError,
    before writing anything, if the scorer's vocabulary differs from `student_tokenizer_path`'s.
    """
    _check_arguments(role, domain, context, prompts, chunk_rows)
    tokenizer = load_tokenizer(model_path)
    if student_tokenizer_path is not None:
        check_same_vocab(load_tokenizer(student_tokenizer_path), tokenizer, f"{role} model {model_path}")
    model, rendered = None, {}

    def chunk_logprobs(chunk: pa.Table) -> list[np.ndarray]:
        nonlocal model
        if model is None:  # loaded on the first chunk not already on disk
            model = resident_models().get(model_path, dtype=dtype, device=device)
        return response_logprobs(model, _chunk_sequences(chunk, tokenizer, context, prompts, rendered), token_budget,
                                 dtype)

    precision = str(dtype or best_dtype(device)).removeprefix("torch.")
    return _write_score_set(layout, iteration, rollout_shards, model_path, role, domain, context, chunk_rows,
                            chunk_logprobs, progress, precision)


def store_scores(layout: RunLayout, iteration: int, rollout_shards: list[Path], model_path: str | Path, role: str,
                 logprobs_by_rollout: dict[str, np.ndarray], *, chunk_rows: int = 256,
                 precision: str = "float32") -> ScoreResult:
    """Store log-probs computed elsewhere as the score set `score_rollouts` would write for them.

    The update computes the student's log-probs in its own forward pass when one optimizer step
    uses every rollout (`pipeline.student_scored_in_update`); stored here, they serve the audit
    tables and later lam re-runs exactly like a scoring pass, and a later `score_rollouts` call with
    the same inputs is a cache hit. Rollouts missing from `logprobs_by_rollout` must have empty
    responses (they score no token). `precision` is the matmul precision they were computed in.
    """
    _check_arguments(role, None, None, None, chunk_rows)

    def chunk_logprobs(chunk: pa.Table) -> list[np.ndarray]:
        empty = np.zeros(0, np.float32)
        return [logprobs_by_rollout.get(rollout_id, empty) for rollout_id in chunk.column("rollout_id").to_pylist()]

    return _write_score_set(layout, iteration, rollout_shards, model_path, role, None, None, chunk_rows,
                            chunk_logprobs, False, precision)


def _write_score_set(layout: RunLayout, iteration: int, rollout_shards: list[Path], model_path: str | Path,
                     role: str, domain: str | None, context: str | None, chunk_rows: int,
                     chunk_logprobs: Callable[[pa.Table], list[np.ndarray]], progress: bool,
                     precision: str) -> ScoreResult:
    """Write one score set, a shard per chunk of rollouts, resuming an interrupted set; see `score_rollouts`."""
    key = score_key(model_path, context)
    directory = layout.scores_dir(iteration, role, key)
    directory = directory / f"domain={domain}" if domain is not None else directory
    identity = _inputs_identity(rollout_shards, model_path, key, role, domain, context, chunk_rows, precision)
    cached = _cached_result(directory, identity)
    if cached is not None:
        logger.info("%s scores of %d rows already in %s (cache hit)", role, cached.rows, directory)
        return cached
    _start_or_resume(directory, identity)
    paths, rows = [], 0
    bar = tqdm(total=count_rollouts(rollout_shards, domain), unit="row", desc=f"score {role}", disable=not progress)
    for k, chunk in enumerate(rollout_chunks(rollout_shards, chunk_rows, domain)):
        path = directory / f"part-{k:05d}.parquet"
        rollout_ids = chunk.column("rollout_id").to_pylist()
        if not _shard_holds(path, rollout_ids):
            logprobs = chunk_logprobs(chunk)
            _check_lengths(role, rollout_ids, logprobs, pc.list_value_length(chunk.column("response_token_ids")))
            write_shard(_scores_table(chunk, logprobs, role, domain, str(model_path), key), path, SCORES)
        paths.append(path)
        rows += chunk.num_rows
        bar.update(chunk.num_rows)
    bar.close()
    write_json_atomic(directory / SUCCESS_MARKER,
                      {"inputs": identity, "rows": rows, "shards": [path.name for path in paths]})
    logger.info("scored %d rollouts (iteration %d, role %s, domain %s) with %s -> %d shard(s) in %s",
                rows, iteration, role, domain or "all", model_path, len(paths), directory)
    return ScoreResult(directory, tuple(paths), rows, key, cache_hit=False)
