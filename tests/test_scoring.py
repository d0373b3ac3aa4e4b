"""Scoring: token-budget log-probs against a plain full forward pass, and score sets on disk."""

from __future__ import annotations

import math
import string
from pathlib import Path

import duckdb
import numpy as np
import pytest
import torch
from tokenizers import Regex, Tokenizer, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast, Qwen2Config, Qwen2ForCausalLM

import gopd_core.scoring as scoring
from gopd_core.attention import cpu_attention, packs_rows
from gopd_core.head_logprobs import sampled_token_logprobs
from gopd_core.models import VocabularyMismatchError, load_model, load_tokenizer, model_hash, render_prompt
from gopd_core.scoring import (
    ContextPromptError,
    context_prompt_ids,
    plan_microbatches,
    response_logprobs,
    score_rollouts,
)
from gopd_core.tokenizer import build_tokenizer, save_tokenizer
from gopd_core.training import packed_token_logprobs, token_logprobs
from storage.layout import RunLayout
from storage.parquet import list_shards, read_shards, write_shard
from storage.schemas import ROLLOUTS, SCORES

VOCAB = len(build_tokenizer())


def save_tiny_model(directory: Path, hidden: int, layers: int, seed: int) -> Path:
    """A random Qwen2 with the zoo's char tokenizer, saved as an HF directory."""
    torch.manual_seed(seed)
    config = Qwen2Config(
        vocab_size=VOCAB, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024,
    )
    model = Qwen2ForCausalLM(config)
    # larger random weights so log-probs spread well away from log(1/V) and models differ visibly
    with torch.no_grad():
        for parameter in model.parameters():
            if parameter.dim() == 2:
                parameter.normal_(0.0, 0.1)
    model.save_pretrained(str(directory))
    save_tokenizer(directory)
    return directory


@pytest.fixture(scope="module")
def zoo(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("zoo")
    return {
        "student": save_tiny_model(root / "student", hidden=32, layers=2, seed=0),
        "teacher": save_tiny_model(root / "teacher", hidden=64, layers=4, seed=1),
    }


def full_pass_logprobs(model, prompt: list[int], response: list[int]) -> np.ndarray:
    """Reference: one unpadded forward over prompt + response, full fp32 log_softmax, gather."""
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([prompt + response])).logits[0].float()
    logprobs = logits.log_softmax(-1)
    positions = torch.arange(len(prompt) - 1, len(prompt) + len(response) - 1)
    return logprobs[positions, torch.tensor(response)].numpy()


def random_sequences(seed: int) -> list[tuple[list[int], list[int]]]:
    """Rows of very different lengths, including a 1-token response and an empty one."""
    rng = np.random.default_rng(seed)
    shapes = [(3, 1), (40, 200), (5, 17), (12, 0), (1, 90), (25, 3), (8, 130), (2, 2)]
    return [(rng.integers(0, VOCAB, p).tolist(), rng.integers(0, VOCAB, r).tolist()) for p, r in shapes]


def write_rollouts(path: Path, rows: int, domains: tuple[str, ...] = ("math",), seed: int = 0,
                   prompt_ids: list[list[int]] | None = None) -> Path:
    """`rows` ROLLOUTS rows with random token ids; domains cycle over rows."""
    rng = np.random.default_rng(seed)
    records = []
    for i in range(rows):
        response = rng.integers(3, VOCAB, int(rng.integers(1, 40))).tolist()
        records.append({
            "run_id": "run", "iteration": 0, "rollout_id": f"run/0/s{seed}-p{i // 2}/{i % 2}", "prompt_id": f"p{i // 2}",
            "domain": domains[i % len(domains)], "sample_index": i % 2, "checkpoint_id": "student",
            "engine": "hf",
            "prompt_token_ids": prompt_ids[i] if prompt_ids else rng.integers(3, VOCAB, int(rng.integers(2, 20))).tolist(),
            "response_token_ids": response, "rollout_logprobs": [0.0] * len(response),
        })
    return write_shard(records, path, ROLLOUTS)


def stored(paths) -> dict[str, list[float]]:
    table = read_shards(paths, SCORES)
    return dict(zip(table.column("rollout_id").to_pylist(), table.column("logprobs").to_pylist(), strict=True))


def mtimes(directory: Path) -> dict[str, int]:
    return {p.name: p.stat().st_mtime_ns for p in sorted(directory.rglob("*")) if p.is_file()}


# -- response_logprobs -----------------------------------------------------------------------------


def test_teacher_is_at_least_four_times_the_student(zoo):
    sizes = {name: sum(p.numel() for p in load_model(path).parameters()) for name, path in zoo.items()}
    assert sizes["teacher"] >= 4 * sizes["student"]


@pytest.mark.parametrize("name", ["student", "teacher"])
def test_matches_full_forward_pass(zoo, name):
    model = load_model(zoo[name])
    sequences = random_sequences(seed=1)
    got = response_logprobs(model, sequences, token_budget=256)
    for (prompt, response), values in zip(sequences, got, strict=True):
        assert values.dtype == np.float32 and values.shape == (len(response),)
        if response:
            np.testing.assert_allclose(values, full_pass_logprobs(model, prompt, response), atol=1e-5, rtol=0)
    # the random model is far from uniform, so the comparison is not between near-constants
    assert np.ptp(np.concatenate(got)) > 1.0


@pytest.mark.parametrize("name", ["student", "teacher"])
def test_bfloat16_within_bf16_tolerance(zoo, name):
    # bf16 keeps 8 significant bits: each rounding is off by up to 2^-9 ~ 0.2% relative. Weights, activations
    # and logits (magnitude ~5 here) are all rounded, through 2-4 layers, so a log-prob may move by a few
    # 1e-2 (measured: max 0.04, mean 0.007 for these models); atol 0.1 and a mean bound of 0.02 catch a
    # real bug (wrong position or token: errors of ~1 or more) without flaking on rounding.
    reference = load_model(zoo[name])
    sequences = random_sequences(seed=2)
    expected = np.concatenate([full_pass_logprobs(reference, p, r) for p, r in sequences if r])
    autocast = np.concatenate(response_logprobs(reference, sequences, dtype=torch.bfloat16))
    bf16_weights = np.concatenate(response_logprobs(load_model(zoo[name], dtype=torch.bfloat16), sequences))
    for got in (autocast, bf16_weights):
        np.testing.assert_allclose(got, expected, atol=0.1, rtol=0)
        assert np.abs(got - expected).mean() < 0.02
        assert not np.allclose(got, expected, atol=1e-5, rtol=0)  # bf16 really ran


def test_score_sets_are_bf16_where_the_precision_says(zoo, tmp_path, monkeypatch):
    # "auto" on a CPU with AVX512-BF16/AMX picks bf16 (test_fast_paths checks the pick); here the override
    layout = RunLayout.under(tmp_path, "run")
    shards = [write_rollouts(layout.rollouts_dir(0) / "part-00000.parquet", rows=5)]
    fp32 = stored(score_rollouts(layout, 0, shards, zoo["student"], "teacher", chunk_rows=5, progress=False).paths)
    monkeypatch.setenv("GOPD_PRECISION", "bfloat16")
    assert next(load_model(zoo["student"]).parameters()).dtype == torch.bfloat16
    result = score_rollouts(layout, 0, shards, zoo["student"], "teacher", chunk_rows=5, progress=False)
    assert not result.cache_hit  # the float32 set is no answer for a bf16 scoring: it is scored again, in place
    bf16 = stored(result.paths)
    assert bf16.keys() == fp32.keys()
    assert score_rollouts(layout, 0, shards, zoo["student"], "teacher", chunk_rows=5, progress=False).cache_hit
    differences = np.concatenate([np.abs(np.asarray(bf16[k]) - np.asarray(fp32[k])) for k in fp32])
    assert 1e-5 < differences.max() < 0.1 and differences.mean() < 0.02  # bf16 ran, within bf16 rounding


def test_results_independent_of_token_budget_and_logit_chunks(zoo):
    model = load_model(zoo["student"])
    sequences = random_sequences(seed=3)
    one_by_one = response_logprobs(model, sequences, token_budget=64)
    all_at_once = response_logprobs(model, sequences, token_budget=100_000)
    tiny_chunks = response_logprobs(model, sequences, token_budget=100_000, logit_chunk_elements=3 * VOCAB)
    # the GPU's per-forward cost (fewer, fuller micro-batches) plans differently, scores the same
    gpu_plan = response_logprobs(model, sequences, token_budget=100_000, batch_overhead_tokens=4096)
    for a, b, c, d in zip(one_by_one, all_at_once, tiny_chunks, gpu_plan, strict=True):
        np.testing.assert_allclose(a, b, atol=1e-5, rtol=0)
        np.testing.assert_allclose(c, b, atol=1e-5, rtol=0)
        np.testing.assert_allclose(d, b, atol=1e-5, rtol=0)


def test_plan_microbatches_respects_budget_and_buckets_lengths():
    lengths = [5, 300, 7, 60, 6, 250, 8]
    batches = plan_microbatches(lengths, token_budget=600)
    assert sorted(i for batch in batches for i in batch) == list(range(len(lengths)))
    for batch in batches:
        assert len(batch) * max(lengths[i] for i in batch) <= 600
    # cost = padded tokens + 64 per batch: [300, 250] together 600 + 64 < apart 300 + 250 + 128;
    # 60 alone (60 + 64) beats padding four short rows to 60 (5 x 60 + 64 vs 124 + 4 x 8 + 64)
    assert batches == [[1, 5], [3], [6, 2, 4, 0]]
    # a row longer than the budget still gets scored, alone
    assert plan_microbatches([10, 2000], token_budget=100) == [[1], [0]]


def test_plan_microbatches_with_a_large_per_forward_cost_makes_fewer_batches():
    lengths = list(range(32, 512, 20))
    cpu, gpu = plan_microbatches(lengths, 8192, 64), plan_microbatches(lengths, 8192, 4096)
    assert len(gpu) < len(cpu)
    assert all(len(batch) * lengths[batch[0]] <= 8192 for batch in gpu)


def test_plan_microbatches_pads_an_even_spread_little():
    lengths = list(range(32, 512, 20))  # 24 rows, 32..492 tokens
    batches = plan_microbatches(lengths, token_budget=8192)
    padded = sum(len(batch) * lengths[batch[0]] for batch in batches)
    # greedy filling to the budget padded 16 rows to 492 (~45% padding); the plan keeps it under 10%
    assert padded <= 1.1 * sum(lengths)
    assert all(len(batch) * lengths[batch[0]] <= 8192 for batch in batches)
    assert [lengths[i] for batch in batches for i in batch] == sorted(lengths, reverse=True)


def test_out_of_vocabulary_ids_refused(zoo):
    with pytest.raises(ValueError, match="outside the model's vocabulary"):
        response_logprobs(load_model(zoo["student"]), [([1, 2], [VOCAB + 5])])


# -- score_rollouts --------------------------------------------------------------------------------


def test_score_rollouts_writes_caches_and_adds_a_second_model(zoo, tmp_path):
    layout = RunLayout.under(tmp_path, "run")
    shards = [write_rollouts(layout.rollouts_dir(0) / "part-00000.parquet", rows=7)]
    first = score_rollouts(layout, 0, shards, zoo["student"], "teacher", chunk_rows=3, progress=False)
    assert not first.cache_hit and first.rows == 7 and len(first.paths) == math.ceil(7 / 3)
    assert first.directory == layout.scores_dir(0, "teacher", model_hash(zoo["student"]))
    rollouts = read_shards(shards, ROLLOUTS)
    model = load_model(zoo["student"])
    expected = response_logprobs(model, list(zip(rollouts.column("prompt_token_ids").to_pylist(),
                                                 rollouts.column("response_token_ids").to_pylist(), strict=True)))
    got = stored(first.paths)
    for rollout_id, values in zip(rollouts.column("rollout_id").to_pylist(), expected, strict=True):
        np.testing.assert_allclose(got[rollout_id], values, atol=1e-6)
    count, hashes = duckdb.connect().execute(
        f"SELECT count(*), list(DISTINCT model_hash) FROM read_parquet('{first.directory}/*.parquet')").fetchone()
    assert count == 7 and hashes == [first.model_hash]

    before = mtimes(layout.run_dir / "scores")
    again = score_rollouts(layout, 0, shards, zoo["student"], "teacher", chunk_rows=3, progress=False)
    assert again.cache_hit and again.paths == first.paths and again.rows == 7
    assert mtimes(layout.run_dir / "scores") == before

    second = score_rollouts(layout, 0, shards, zoo["teacher"], "teacher", chunk_rows=3, progress=False)
    assert second.directory.parent == first.directory.parent and second.directory != first.directory
    assert len(list_shards(first.directory.parent)) == 2 * len(first.paths)
    assert stored(second.paths).keys() == got.keys()


def test_crash_resume_rescoring_only_the_missing_chunk(zoo, tmp_path):
    layout = RunLayout.under(tmp_path, "run")
    shards = [write_rollouts(layout.rollouts_dir(0) / "part-00000.parquet", rows=10)]
    first = score_rollouts(layout, 0, shards, zoo["student"], "student", chunk_rows=4, progress=False)
    before = stored(first.paths)
    (first.directory / "_SUCCESS.json").unlink()
    first.paths[1].unlink()
    kept = {p.name: p.stat().st_mtime_ns for p in (first.paths[0], first.paths[2])}
    resumed = score_rollouts(layout, 0, shards, zoo["student"], "student", chunk_rows=4, progress=False)
    assert not resumed.cache_hit and resumed.paths == first.paths
    assert {p.name: p.stat().st_mtime_ns for p in (first.paths[0], first.paths[2])} == kept
    table = read_shards(list_shards(first.directory), SCORES)
    assert table.num_rows == 10 and len(set(table.column("rollout_id").to_pylist())) == 10
    assert stored(resumed.paths) == before


def test_changed_rollouts_replace_a_stale_score_set(zoo, tmp_path):
    layout = RunLayout.under(tmp_path, "run")
    path = layout.rollouts_dir(0) / "part-00000.parquet"
    write_rollouts(path, rows=10)
    score_rollouts(layout, 0, [path], zoo["student"], "student", chunk_rows=4, progress=False)
    write_rollouts(path, rows=5, seed=9)  # the rollout stage re-ran: same ids, fewer and other rows
    redone = score_rollouts(layout, 0, [path], zoo["student"], "student", chunk_rows=4, progress=False)
    assert not redone.cache_hit and len(list_shards(redone.directory)) == 2
    rollouts = read_shards([path], ROLLOUTS)
    assert [len(v) for v in stored(redone.paths).values()] == [
        len(r) for r in rollouts.column("response_token_ids").to_pylist()]


def test_vocabulary_mismatch_refused_before_writing(zoo, tmp_path):
    other = save_tiny_model(tmp_path / "other", hidden=32, layers=1, seed=5)
    vocab = {c: i for i, c in enumerate(["<|endoftext|>", "<|im_end|>", *string.ascii_lowercase])}
    core = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<|endoftext|>"))
    core.pre_tokenizer = pre_tokenizers.Split(Regex("[\\s\\S]"), behavior="isolated")
    PreTrainedTokenizerFast(tokenizer_object=core, eos_token="<|im_end|>").save_pretrained(str(other))
    assert len(load_tokenizer(other)) < VOCAB
    layout = RunLayout.under(tmp_path, "run")
    shards = [write_rollouts(layout.rollouts_dir(0) / "part-00000.parquet", rows=3)]
    with pytest.raises(VocabularyMismatchError, match="teacher model"):
        score_rollouts(layout, 0, shards, other, "teacher", student_tokenizer_path=zoo["student"], progress=False)
    assert not (layout.run_dir / "scores").exists()


def test_context_teacher_sees_ground_truth_and_scores_the_same_response(zoo, tmp_path):
    tokenizer = load_tokenizer(zoo["teacher"])
    prompts = {f"p{i}": {"prompt_id": f"p{i}", "domain": "math", "ground_truth": str(6 * i + 42),
                         "messages": [{"role": "user", "content": f"What is {i} + 6*7?"}]} for i in range(3)}
    student_prompts = [render_prompt(tokenizer, prompts[f"p{i // 2}"]["messages"]) for i in range(6)]
    layout = RunLayout.under(tmp_path, "run")
    shards = [write_rollouts(layout.rollouts_dir(0) / "part-00000.parquet", rows=6, prompt_ids=student_prompts)]
    plain = score_rollouts(layout, 0, shards, zoo["teacher"], "teacher", progress=False)
    context = score_rollouts(layout, 0, shards, zoo["teacher"], "context-teacher", context="ground_truth",
                             prompts=prompts, student_tokenizer_path=zoo["student"], progress=False)
    assert context.model_hash != plain.model_hash == model_hash(zoo["teacher"])

    def teacher_view(prompt_id: str) -> str:  # the chat template written out by hand
        i, truth = prompt_id[1:], prompts[prompt_id]["ground_truth"]
        return f"<|im_start|>user\nWhat is {i} + 6*7?\n\nReference solution: {truth}<|im_end|>\n<|im_start|>assistant\n"

    seen_by_teacher = context_prompt_ids(tokenizer, prompts["p1"], "ground_truth")
    assert seen_by_teacher == tokenizer.encode(teacher_view("p1"), add_special_tokens=False)
    assert "Reference solution: 48" in teacher_view("p1")
    assert "solution:48" in tokenizer.decode(seen_by_teacher).replace(" ", "")
    model = load_model(zoo["teacher"])
    plain_rows, context_rows = stored(plain.paths), stored(context.paths)
    for row in read_shards(shards, ROLLOUTS).to_pylist():
        response, rollout_id = row["response_token_ids"], row["rollout_id"]
        seen_prompt = tokenizer.encode(teacher_view(row["prompt_id"]), add_special_tokens=False)
        expected = full_pass_logprobs(model, seen_prompt, response)
        np.testing.assert_allclose(context_rows[rollout_id], expected, atol=1e-5, rtol=0)
        assert len(context_rows[rollout_id]) == len(plain_rows[rollout_id]) == len(response)
        assert not np.allclose(context_rows[rollout_id], plain_rows[rollout_id], atol=1e-3)


def test_context_teacher_without_ground_truth_refused(zoo, tmp_path):
    prompts = {"p0": {"prompt_id": "p0", "ground_truth": None, "messages": [{"role": "user", "content": "hi"}]}}
    layout = RunLayout.under(tmp_path, "run")
    shards = [write_rollouts(layout.rollouts_dir(0) / "part-00000.parquet", rows=2)]
    with pytest.raises(ContextPromptError, match="no ground_truth"):
        score_rollouts(layout, 0, shards, zoo["teacher"], "context-teacher", context="ground_truth",
                       prompts=prompts, progress=False)


def test_streams_in_chunks_and_filters_by_domain(zoo, tmp_path, monkeypatch):
    seen: list[tuple[int, int]] = []
    real_iter_batches = scoring.iter_batches

    def spy(paths, schema, batch_rows, columns=None):
        for batch in real_iter_batches(paths, schema, batch_rows, columns):
            seen.append((batch_rows, batch.num_rows))
            yield batch

    monkeypatch.setattr(scoring, "iter_batches", spy)
    layout = RunLayout.under(tmp_path, "run")
    shards = [write_rollouts(layout.rollouts_dir(0) / f"part-{k:05d}.parquet", rows=25, domains=("math", "code"),
                             seed=k) for k in range(2)]
    whole = score_rollouts(layout, 0, shards, zoo["student"], "student", chunk_rows=8, progress=False)
    assert len(whole.paths) == math.ceil(50 / 8) and whole.rows == 50
    assert [read_shards([p], SCORES).num_rows for p in whole.paths] == [8] * 6 + [2]
    assert all(rows <= batch_rows == 8 for batch_rows, rows in seen if batch_rows != 65536)

    math_only = score_rollouts(layout, 0, shards, zoo["teacher"], "teacher", domain="math", chunk_rows=8,
                               progress=False)
    assert math_only.directory == layout.scores_dir(0, "teacher", model_hash(zoo["teacher"])) / "domain=math"
    table = read_shards(math_only.paths, SCORES)
    assert table.num_rows == math_only.rows == 26 and len(math_only.paths) == math.ceil(26 / 8)
    assert set(table.column("domain").to_pylist()) == {"math"}
    math_ids = {r["rollout_id"] for r in read_shards(shards, ROLLOUTS).to_pylist() if r["domain"] == "math"}
    assert set(table.column("rollout_id").to_pylist()) == math_ids


def test_zoo_tokenizer_keeps_whitespace_in_a_model_directory(zoo):
    # AutoTokenizer builds a Qwen2Tokenizer for a qwen2 config; the zoo's byte-level vocabulary must
    # survive that rebuild: one token per byte, whitespace included.
    tokenizer = load_tokenizer(zoo["teacher"])
    ids = tokenizer.encode("a b\nc", add_special_tokens=False)
    assert len(ids) == 5
    assert tokenizer.decode(ids) == "a b\nc"


def test_update_log_probs_need_no_padding_mask_for_right_padded_rows(zoo):
    # training.token_logprobs runs right-padded rows with the causal mask only, as the scorer does
    model = load_model(zoo["student"])
    rows = [row for row in random_sequences(seed=5) if row[1]][:4]
    width, longest = max(len(r) for _, r in rows), max(len(p) + len(r) for p, r in rows)
    input_ids_BL = torch.zeros(len(rows), longest, dtype=torch.long)
    mask_BL = torch.zeros_like(input_ids_BL)
    for b, (prompt, response) in enumerate(rows):
        input_ids_BL[b, :len(prompt) + len(response)] = torch.tensor(prompt + response)
        mask_BL[b, :len(prompt) + len(response)] = 1
    starts_B = torch.tensor([len(prompt) for prompt, _ in rows])
    with torch.no_grad():
        masked_BT = token_logprobs(model, input_ids_BL, mask_BL, starts_B, width)
        causal_BT = token_logprobs(model, input_ids_BL, None, starts_B, width)
    for b, (prompt, response) in enumerate(rows):
        np.testing.assert_allclose(causal_BT[b, :len(response)].numpy(), masked_BT[b, :len(response)].numpy(),
                                   atol=1e-5, rtol=0)
        np.testing.assert_allclose(causal_BT[b, :len(response)].numpy(), full_pass_logprobs(model, prompt, response),
                                   atol=1e-4, rtol=0)


@pytest.mark.parametrize("autocast", [False, True])
def test_packed_update_log_probs_and_gradients_match_the_padded_ones(zoo, autocast):
    # training.packed_token_logprobs lays the rows end to end (attention.packed_rows): the same log-probs as
    # right-padded rows, zeros past each row's response, and the same gradients through them
    model = load_model(zoo["student"], dtype=torch.float32)
    rows = [row for row in random_sequences(seed=6) if row[1]][:5]
    width, longest = max(len(r) for _, r in rows), max(len(p) + len(r) for p, r in rows)
    input_ids_BL = torch.zeros(len(rows), longest, dtype=torch.long)
    for b, (prompt, response) in enumerate(rows):
        input_ids_BL[b, :len(prompt) + len(response)] = torch.tensor(prompt + response)
    starts_B = torch.tensor([len(prompt) for prompt, _ in rows])
    mask_BT = torch.zeros(len(rows), width)
    for b, (_, response) in enumerate(rows):
        mask_BT[b, :len(response)] = 1
    assert packs_rows(model)
    results = {}
    for packed in (False, True):
        model.zero_grad()
        with cpu_attention(model), torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            if packed:
                logprobs_BT = packed_token_logprobs(model, [np.asarray(p + r) for p, r in rows], starts_B.tolist(),
                                                    "cpu")
            else:
                logprobs_BT = token_logprobs(model, input_ids_BL, None, starts_B, width) * mask_BT
        (logprobs_BT * mask_BT).sum().backward()
        results[packed] = (logprobs_BT.detach(), model.lm_head.weight.grad.clone(),
                           model.model.layers[0].self_attn.q_proj.weight.grad.clone())
    tolerance = 0.05 if autocast else 1e-4
    assert results[True][0].shape == (len(rows), width)
    assert torch.equal(results[True][0] * (1 - mask_BT), torch.zeros_like(mask_BT))  # zeros past each response
    for padded, packed in zip(results[False], results[True]):
        torch.testing.assert_close(packed, padded, atol=tolerance * max(1.0, padded.abs().max().item()), rtol=0)


class _Head(torch.nn.Module):
    """The two things `sampled_token_logprobs` asks of a causal LM: its output layer and its config."""

    def __init__(self, hidden: int, vocab: int, bias: bool, **config) -> None:
        super().__init__()
        self.lm_head = torch.nn.Linear(hidden, vocab, bias=bias)
        self.config = type("Config", (), config)()

    def get_output_embeddings(self) -> torch.nn.Module:
        return self.lm_head


@pytest.mark.parametrize(("bias", "config"), [(False, {}), (True, {}), (False, {"final_logit_softcapping": 3.0})])
def test_sampled_token_logprobs_match_autograd_values_and_gradients(bias, config):
    # the update's hand-written backward (plain heads) and the autograd one (transformed heads) vs log_softmax
    torch.manual_seed(0)
    head = _Head(16, 300, bias, **config)
    hidden_NH = (torch.randn(9, 16) * 3).requires_grad_()
    targets_N, upstream_N = torch.randint(0, 300, (9,)), torch.randn(9)
    got_N = sampled_token_logprobs(head, hidden_NH, targets_N)
    (got_N * upstream_N).sum().backward()
    got = [hidden_NH.grad.clone(), *(p.grad.clone() for p in head.parameters())]
    hidden_NH.grad = None
    head.zero_grad()
    logits_NV = head.lm_head(hidden_NH)
    if config:
        logits_NV = torch.tanh(logits_NV / 3.0) * 3.0
    want_N = torch.log_softmax(logits_NV, dim=-1).gather(1, targets_N[:, None]).squeeze(1)
    (want_N * upstream_N).sum().backward()
    want = [hidden_NH.grad, *(p.grad for p in head.parameters())]
    torch.testing.assert_close(got_N, want_N, atol=1e-5, rtol=0)
    assert len(got) == len(want) == (3 if bias else 2)
    for got_grad, want_grad in zip(got, want):
        torch.testing.assert_close(got_grad, want_grad, atol=1e-5, rtol=1e-5)
