"""The HF rollout engine on a tiny random Llama model: schema, log-probs, seeding, EOS, padding."""

from __future__ import annotations

import pytest
import torch

from gopd_core.models import load_model
from gopd_core.rollout import SamplingParams, open_engine
from gopd_core.rollout.hf import HFEngine, PromptTooLongError
from gopd_core.tasks import make_split
from gopd_core.tokenizer import save_tokenizer
from gopd_core.zoo import ModelShape, new_model
from storage.parquet import read_shards, write_shard
from storage.schemas import ROLLOUTS


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    directory = tmp_path_factory.mktemp("hf-engine") / "random-llama"
    tokenizer = save_tokenizer(directory)
    new_model(ModelShape(hidden=64, layers=2, intermediate=128, max_positions=128), tokenizer, seed=0) \
        .save_pretrained(str(directory))
    return directory


@pytest.fixture(scope="module")
def engine(model_dir):
    with open_engine("hf", model_dir, batch_size=8, progress=False) as hf_engine:
        yield hf_engine


@pytest.fixture(scope="module")
def prompts():
    # prompts of different lengths, so batches need left padding
    return make_split("math", "test", 3, seed=0) + make_split("code", "test", 2, seed=0)


def test_rows_fit_the_rollouts_schema(engine, prompts, tmp_path):
    rows = engine.generate(prompts, SamplingParams(n=2, max_new_tokens=12, seed=1), run_id="run", iteration=3)
    assert [(r["prompt_id"], r["sample_index"]) for r in rows] == [(p["prompt_id"], j) for p in prompts for j in (0, 1)]
    for row in rows:
        assert row["engine"] == "hf" and row["checkpoint_id"] == "random-llama" and row["reward"] is None
        assert row["rollout_id"] == f"run/3/{row['prompt_id']}/{row['sample_index']}"
        assert len(row["rollout_logprobs"]) == len(row["response_token_ids"]) <= 12
        assert row["prompt_text"].endswith("<|im_start|>assistant\n")
        assert all(lp <= 0 for lp in row["rollout_logprobs"])
    path = write_shard(rows, tmp_path / "rollouts.parquet", ROLLOUTS)
    assert read_shards([path], ROLLOUTS).num_rows == len(rows)
    named = engine.generate(prompts[:1], SamplingParams(max_new_tokens=2), "run", 0, checkpoint_id="ckpt-7")
    assert named[0]["checkpoint_id"] == "ckpt-7"


def test_rollout_logprobs_match_a_full_forward_pass(engine, model_dir, prompts):
    sampling = SamplingParams(temperature=0.7, top_p=0.9, n=3, max_new_tokens=16, seed=5)
    rows = engine.generate(prompts, sampling, run_id="run", iteration=0)
    model = load_model(model_dir, dtype=torch.float32)
    for row in rows:
        ids = torch.tensor([row["prompt_token_ids"] + row["response_token_ids"]])
        with torch.no_grad():
            logprobs_LV = torch.log_softmax(model(input_ids=ids).logits[0].float(), dim=-1)
        start = len(row["prompt_token_ids"]) - 1
        expected_T = logprobs_LV[start:-1].gather(-1, torch.tensor(row["response_token_ids"])[:, None]).squeeze(-1)
        torch.testing.assert_close(torch.tensor(row["rollout_logprobs"]), expected_T, atol=1e-4, rtol=0)


def test_same_seed_same_rollouts_and_different_seed_differs(engine, prompts):
    def responses(seed: int) -> list[list[int]]:
        rows = engine.generate(prompts, SamplingParams(n=2, max_new_tokens=10, seed=seed), "run", 0)
        return [row["response_token_ids"] for row in rows]

    assert responses(11) == responses(11)
    assert responses(11) != responses(12)


def test_eos_stops_a_row_and_is_kept(engine, prompts):
    # a random model puts about 1% mass on EOS per token: over 32 rows x 64 tokens some rows stop
    rows = engine.generate(prompts[:2], SamplingParams(n=16, max_new_tokens=64, seed=0), "run", 0)
    eos = engine.tokenizer.eos_token_id
    stopped = [row for row in rows if row["finish_reason"] == "stop"]
    assert stopped and len(stopped) < len(rows)
    for row in rows:
        tokens = row["response_token_ids"]
        assert eos not in tokens[:-1]
        if row["finish_reason"] == "stop":
            assert tokens[-1] == eos and "<|im_end|>" not in row["response_text"]
        else:
            assert len(tokens) == 64


def test_left_padded_batch_matches_one_by_one(model_dir, prompts):
    greedy = SamplingParams(temperature=0.0, max_new_tokens=16)
    with HFEngine(model_dir, batch_size=8, progress=False) as batched, HFEngine(model_dir, batch_size=1) as single:
        together = batched.generate(prompts, greedy, "run", 0)
        alone = single.generate(prompts, greedy, "run", 0)
    assert [r["response_token_ids"] for r in together] == [r["response_token_ids"] for r in alone]
    for a, b in zip(together, alone):
        torch.testing.assert_close(torch.tensor(a["rollout_logprobs"]), torch.tensor(b["rollout_logprobs"]), atol=1e-4,
                                   rtol=0)


def test_tiny_top_p_is_greedy(engine, prompts):
    greedy = engine.generate(prompts, SamplingParams(temperature=0.0, max_new_tokens=8), "run", 0)
    nucleus = engine.generate(prompts, SamplingParams(temperature=1.0, top_p=1e-6, max_new_tokens=8, seed=3), "run", 0)
    assert [r["response_token_ids"] for r in greedy] == [r["response_token_ids"] for r in nucleus]


def test_prompt_longer_than_the_context_is_refused(engine):
    long_prompt = {"prompt_id": "too-long-1", "domain": "math", "messages": [{"role": "user", "content": "9" * 120}]}
    with pytest.raises(PromptTooLongError, match="too-long-1"):
        engine.generate([long_prompt], SamplingParams(max_new_tokens=16), "run", 0)
    assert issubclass(PromptTooLongError, ValueError)


def test_load_weights_switches_checkpoint(model_dir, tmp_path):
    other = tmp_path / "other-ckpt"
    tokenizer = save_tokenizer(other)
    new_model(ModelShape(hidden=64, layers=2, intermediate=128, max_positions=128), tokenizer, seed=1) \
        .save_pretrained(str(other))
    prompt = make_split("math", "test", 1, seed=0)
    greedy = SamplingParams(temperature=0.0, max_new_tokens=8)
    with HFEngine(model_dir) as hf_engine:
        before = hf_engine.generate(prompt, greedy, "run", 0)[0]
        hf_engine.load_weights(other)
        after = hf_engine.generate(prompt, greedy, "run", 0)[0]
    assert after["checkpoint_id"] == "other-ckpt"
    assert before["rollout_logprobs"] != after["rollout_logprobs"]
