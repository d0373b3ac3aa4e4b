"""The fast paths compute what the plain ones do: resident models, prepacked linears, the reserved
KV cache, and the update scoring the student in its own forward pass."""

from __future__ import annotations

import json
import os
import shutil
import threading
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from tiny import build_random_model, build_world, tiny_distill_config
from transformers import (
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
    Qwen3Config,
    Qwen3ForCausalLM,
)
from transformers.cache_utils import DynamicLayer

from flows.distill import distill
from gopd_core import hardware
from gopd_core.config import parse_config
from gopd_core.models import (
    ResidentModels,
    _tokenizer_content,
    _tokenizer_stamp,
    best_dtype,
    has_dropout,
    keep_models_loaded,
    load_model,
    load_tokenizer,
    prepacked_linears,
    resident_models,
)
from gopd_core.pipeline import (
    Scorer,
    plan_scorers,
    prepare_run,
    rollout_stage,
    score_stage,
    student_scored_in_update,
)
from gopd_core.rollout import SamplingParams, native
from gopd_core.rollout.hf import HFEngine, ReservedLayer, left_pad, reserve_cache
from gopd_core.rollout.lean_decode import LeanDecoder, _fused_norm, _signed_sin
from gopd_core.rollout.sampling import TokenSampler
from gopd_core.scoring import score_key, score_rollouts
from gopd_core.training import (
    OptimizerSettings,
    ScoreSets,
    autocast_dtype,
    update_policy,
)
from storage.layout import RunLayout
from storage.readers import read_score_map, rollout_shards


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    return build_world(tmp_path_factory.mktemp("fast"))


def test_a_run_reads_each_tokenizer_once_per_content(tmp_path):
    first = build_random_model(tmp_path / "first", seed=5)
    same = Path(shutil.copytree(first, tmp_path / "same"))  # another directory, the same tokenizer files
    (same / ".git" / "objects").mkdir(parents=True)  # hidden: not a tokenizer's
    (same / ".git" / "objects" / "ab12").write_bytes(b"anything")
    other = Path(shutil.copytree(first, tmp_path / "other"))
    config = json.loads((other / "tokenizer_config.json").read_text())
    (other / "tokenizer_config.json").write_text(json.dumps({**config, "model_max_length": 77}))
    reads = ResidentModels.tokenizer_loads
    assert load_tokenizer(first) is not load_tokenizer(first)  # outside a run nothing is kept
    assert ResidentModels.tokenizer_loads == reads + 2
    with keep_models_loaded(2):
        kept = load_tokenizer(first)
        assert load_tokenizer(first) is kept and load_tokenizer(same) is kept
        changed = load_tokenizer(other)
        assert changed is not kept and changed.model_max_length == 77
    assert ResidentModels.tokenizer_loads == reads + 4


def test_a_distill_run_reads_a_tokenizer_once_per_content_not_per_stage(world):
    # each stage used to read its model's tokenizer (rollout, each scorer twice, the update): 1.2-1.5 s each for
    # a 150k-token BPE tokenizer on this CPU. Checkpoints are new directories holding the same tokenizer files.
    base, models, data = world.base, world.models, world.data
    reads = ResidentModels.tokenizer_loads
    layout = RunLayout(Path(distill(config=tiny_distill_config(base, models, data, "tokenizer-reads"))))
    directories = [*models.values(), *(layout.checkpoint_dir(i) for i in (0, 1))]
    contents = {_tokenizer_content(str(d.resolve()), _tokenizer_stamp(d.resolve())) for d in directories}
    assert ResidentModels.tokenizer_loads - reads == len(contents) <= 4


def test_resident_models_reuse_a_load_and_notice_a_rewritten_checkpoint(tmp_path):
    path = build_random_model(tmp_path / "m", seed=5)
    cache = ResidentModels(capacity=2)
    first = cache.get(path)
    assert cache.get(path) is first and cache.loads == 1
    load_model(path).save_pretrained(str(path), safe_serialization=True)  # same weights, new files
    assert cache.get(path) is not first and cache.loads == 2
    taken, extras = cache.take(path)  # the update trains it: gone from the cache
    assert extras == {} and len(cache) == 1 and cache.take(path)[0] is not taken and cache.loads == 3
    cache.put(path, taken, optimizer="state")
    assert cache.take(path) == (taken, {"optimizer": "state"})
    off = ResidentModels(capacity=0)
    off.get(path), off.get(path)
    assert off.loads == 2 and len(off) == 0


def test_resident_models_evict_the_least_recently_used(tmp_path):
    paths = [build_random_model(tmp_path / f"m{i}", seed=i) for i in range(3)]
    cache = ResidentModels(capacity=2)
    cache.get(paths[0]), cache.get(paths[1]), cache.get(paths[0]), cache.get(paths[2])  # paths[1] leaves
    cache.get(paths[0])
    assert cache.loads == 3
    cache.get(paths[1])
    assert cache.loads == 4


def test_prepacked_linears_match_the_stock_linear(tmp_path):
    model = load_model(build_random_model(tmp_path / "m", hidden=64, layers=2, seed=7))
    input_ids = torch.randint(0, model.config.vocab_size, (3, 17))
    with torch.inference_mode():
        plain = model(input_ids).logits
        with prepacked_linears(model):
            packed = model(input_ids).logits
        after = model(input_ids).logits
    assert (packed - plain).abs().max().item() < 1e-5
    assert torch.equal(after, plain)
    assert not any("forward" in vars(module) for module in model.modules())  # nothing left patched


def test_reserved_layer_matches_the_dynamic_layer():
    torch.manual_seed(0)
    reserved, dynamic = None, DynamicLayer()
    prefill = torch.randn(4, 2, 5, 8), torch.randn(4, 2, 5, 8)
    dynamic.update(*prefill)
    reserved = ReservedLayer(*prefill, capacity=7)  # room for 2 tokens: the third step must grow it
    reserved.batch_repeat_interleave(2), dynamic.batch_repeat_interleave(2)
    rows_per_step = [8, 8, 8, 5, 5, 4, 3, 3]  # after each selection below
    for step, rows in enumerate(rows_per_step):
        new = torch.randn(rows, 2, 1, 8), torch.randn(rows, 2, 1, 8)
        out_reserved, out_dynamic = reserved.update(*new), dynamic.update(*new)
        assert all(torch.equal(a, b) for a, b in zip(out_reserved, out_dynamic))
        assert reserved.get_seq_length() == dynamic.get_seq_length() == 6 + step
        keep = {2: [0, 2, 3, 5, 7],  # three rows finish: kept rows move up in place
                4: [0, 1, 3, 4],  # the first rows stay where they are
                5: [3, 0, 1]}.get(step)  # not ascending: gathered into a new buffer
        if keep is not None:
            reserved.batch_select_indices(torch.tensor(keep)), dynamic.batch_select_indices(torch.tensor(keep))


SMALL = {"vocab_size": 61, "hidden_size": 32, "intermediate_size": 48, "num_hidden_layers": 2,
         "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 64}
LEAN_ARCHITECTURES = {
    "llama, biases everywhere": (LlamaForCausalLM, LlamaConfig(**SMALL, attention_bias=True, mlp_bias=True,
                                                                 tie_word_embeddings=False)),
    "qwen2, q/k/v biases": (Qwen2ForCausalLM, Qwen2Config(**SMALL, tie_word_embeddings=True)),
    "qwen3, per-head q/k norms": (Qwen3ForCausalLM, Qwen3Config(**SMALL, head_dim=16)),
}


def _prefilled(model, prompts: list[list[int]], new_tokens: int, dtype: torch.dtype | None = None):
    input_ids_BL, mask_BL, positions_BL = left_pad(prompts, pad_id=0)
    out = model(input_ids=input_ids_BL, attention_mask=mask_BL, position_ids=positions_BL, use_cache=True,
                logits_to_keep=1)
    reserve_cache(out.past_key_values, new_tokens, dtype)
    return out.past_key_values, out.logits[:, -1], mask_BL, positions_BL[:, -1] + 1


@pytest.mark.parametrize("kernel", ["native", "onednn", "native-bf16"])
@pytest.mark.parametrize("architecture", sorted(LEAN_ARCHITECTURES))
def test_lean_decoder_steps_match_the_transformers_forward_pass(architecture, kernel, monkeypatch):
    if kernel == "onednn":  # the fallback where the native kernel cannot run
        monkeypatch.setattr(native, "available", lambda: False)
    elif kernel == "native-bf16":  # bf16 linears, on a CPU with AVX512-BF16 when the precision is bf16
        if "avx512_bf16" not in hardware.cpu_flags():
            pytest.skip("this CPU has no AVX512-BF16: the bf16 kernel cannot run here")
        monkeypatch.setenv(hardware.PRECISION_ENV, "bfloat16")
    else:
        assert native.available(), native.unavailable_reason() or "the native kernel's build failed"
    tolerance = 0.1 if kernel == "native-bf16" else 1e-5  # bf16 rounds weights and inputs: ~0.4% each
    model_class, config = LEAN_ARCHITECTURES[architecture]
    torch.manual_seed(3)
    model = model_class(config).eval()
    for parameter in model.parameters():  # random biases and norm weights, not zeros and ones
        torch.nn.init.normal_(parameter, std=0.2)
    assert LeanDecoder.supports(model)
    prompts = [[5, 9, 11], [7, 3, 8, 20, 21, 2, 4], [12, 13, 14, 15, 16]]  # left padding of 4, 0 and 2
    differences = []
    with torch.inference_mode():
        decoder = LeanDecoder(model)
        assert decoder.native == (kernel != "onednn")  # each layer one native call wherever the kernels run
        # native bf16 layers keep a bf16 KV cache (half the bytes each step reads), the others float32
        assert decoder.cache_dtype == (torch.bfloat16 if kernel == "native-bf16" else torch.float32)
        lean_cache, logits_BV, mask_BL, positions_B = _prefilled(model, prompts, new_tokens=8,
                                                                 dtype=decoder.cache_dtype)
        assert lean_cache.layers[0].keys.dtype == decoder.cache_dtype
        plain_cache, *_ = _prefilled(model, prompts, new_tokens=8)
        for step in range(6):
            tokens_B = logits_BV.argmax(-1)
            if step == 3:  # the middle row finishes: both caches drop it
                keep = torch.tensor([0, 2])
                tokens_B, mask_BL, positions_B = tokens_B[keep], mask_BL[keep], positions_B[keep]
                lean_cache.batch_select_indices(keep), plain_cache.batch_select_indices(keep)
            mask_BL = torch.cat([mask_BL, mask_BL.new_ones((mask_BL.shape[0], 1))], dim=-1)
            plain_BV = model(input_ids=tokens_B[:, None], attention_mask=mask_BL, position_ids=positions_B[:, None],
                             past_key_values=plain_cache, use_cache=True).logits[:, -1]
            logits_BV = decoder.step(tokens_B, positions_B, mask_BL.bool(), lean_cache)
            differences.append((logits_BV - plain_BV).abs().max().item())
            assert differences[-1] < tolerance, f"step {step}"
            positions_B = positions_B + 1
        unpadded = decoder.step(tokens_B, positions_B, None, lean_cache)  # no padding: no mask at all
    assert unpadded.shape == (2, config.vocab_size)
    assert (max(differences) > 1e-5) == (kernel == "native-bf16")  # the bf16 kernel really ran, and only there


@pytest.mark.parametrize("bf16", [False, True])
@pytest.mark.parametrize("architecture", sorted(LEAN_ARCHITECTURES))
def test_the_native_decode_layer_computes_what_the_python_layer_does(architecture, bf16, monkeypatch):
    if bf16:
        if "avx512_bf16" not in hardware.cpu_flags():
            pytest.skip("this CPU has no AVX512-BF16: the bf16 kernel cannot run here")
        monkeypatch.setenv(hardware.PRECISION_ENV, "bfloat16")
    model_class, config = LEAN_ARCHITECTURES[architecture]
    torch.manual_seed(6)
    model = model_class(config).eval()
    for parameter in model.parameters():
        torch.nn.init.normal_(parameter, std=0.2)
    prompts = [[5, 9, 11], [7, 3, 8, 20, 21, 2, 4], [12, 13, 14, 15, 16]]
    with torch.inference_mode():
        decoder = LeanDecoder(model)
        layer = decoder.layers[1]
        assert layer.native is not None
        python_cache, _, mask_BL, positions_B = _prefilled(model, prompts, new_tokens=1)  # the slot must grow
        native_cache, *_ = _prefilled(model, prompts, new_tokens=1, dtype=decoder.cache_dtype)  # bf16 with bf16
        for _step in range(3):
            mask_BL = torch.cat([mask_BL, mask_BL.new_ones((3, 1))], dim=-1)
            hidden_B1H = torch.randn(3, 1, config.hidden_size) * 2
            cos_B1D, sin_B1D = decoder.rotary(hidden_B1H, positions_B[:, None])
            expected_B1H = layer(hidden_B1H.clone(), cos_B1D[:, None], _signed_sin(sin_B1D[:, None]), mask_BL.bool(),
                                 python_cache.layers[1])
            hidden_BH = hidden_B1H[:, 0].clone()
            layer.native(hidden_BH, cos_B1D[:, 0].contiguous(), sin_B1D[:, 0].contiguous(),
                         *native_cache.layers[1].append_slot(), mask_BL.bool())
            tolerance = 0.05 if bf16 else 1e-5  # bf16: a norm's last bit may round an input the other way
            torch.testing.assert_close(hidden_BH, expected_B1H[:, 0], rtol=tolerance, atol=tolerance)
            python_layer, native_layer = python_cache.layers[1], native_cache.layers[1]
            assert native_layer.get_seq_length() == python_layer.get_seq_length()
            assert native_layer.keys.dtype == native_layer.values.dtype == decoder.cache_dtype
            torch.testing.assert_close(native_layer.keys.float(), python_layer.keys, rtol=tolerance, atol=tolerance)
            torch.testing.assert_close(native_layer.values.float(), python_layer.values, rtol=tolerance, atol=tolerance)
            positions_B = positions_B + 1
        hidden_BH, cos_BD = hidden_B1H[:, 0].clone(), cos_B1D[:, 0].contiguous()
        keys, values, position = native_cache.layers[1].append_slot()
        with pytest.raises(ValueError, match="hidden must be contiguous float32"):
            layer.native(hidden_BH.double(), cos_BD, cos_BD, keys, values, position, None)
        with pytest.raises(ValueError, match="cos/sin must be"):
            layer.native(hidden_BH, cos_BD[:, :4].contiguous(), cos_BD, keys, values, position, None)
        with pytest.raises(ValueError, match="capacity >"):
            layer.native(hidden_BH, cos_BD, cos_BD, keys, values, keys.shape[2], None)
        with pytest.raises(ValueError, match="both float32 or both bf16"):  # one cache of each kind
            layer.native(hidden_BH, cos_BD, cos_BD, keys, values.double(), position, None)
        with pytest.raises(ValueError, match=r"attend_BL .* must be \(rows, position \+ 1\)"):
            layer.native(hidden_BH, cos_BD, cos_BD, keys, values, position, mask_BL.bool())


@pytest.mark.parametrize("kernel", ["native", "native-bf16"])
@pytest.mark.parametrize("architecture", sorted(LEAN_ARCHITECTURES))
def test_lean_prefill_matches_the_transformers_forward_pass(architecture, kernel, monkeypatch):
    if kernel == "native-bf16":  # the body under bf16 autocast, the head's linear in bf16
        if "avx512_bf16" not in hardware.cpu_flags():
            pytest.skip("this CPU has no AVX512-BF16: the bf16 kernel cannot run here")
        monkeypatch.setenv(hardware.PRECISION_ENV, "bfloat16")
    tolerance = 0.1 if kernel == "native-bf16" else 1e-5
    model_class, config = LEAN_ARCHITECTURES[architecture]
    torch.manual_seed(4)
    model = model_class(config).eval()
    for parameter in model.parameters():
        torch.nn.init.normal_(parameter, std=0.2)
    input_ids_BL, mask_BL, positions_BL = left_pad([[5, 9, 11], [7, 3, 8, 20, 21, 2, 4]], pad_id=0)
    with torch.inference_mode():
        decoder = LeanDecoder(model)
        cache, logits_BV = decoder.prefill(model, input_ids_BL, mask_BL, positions_BL)
        reserve_cache(cache, 4, model.dtype)
        plain = model(input_ids=input_ids_BL, attention_mask=mask_BL, position_ids=positions_BL, use_cache=True)
    difference = (logits_BV - plain.logits[:, -1]).abs().max().item()
    assert logits_BV.dtype == torch.float32 and difference < tolerance
    assert (difference > 1e-5) == (kernel == "native-bf16")  # bf16 really ran, and only there
    for layer, plain_layer in zip(cache.layers, plain.past_key_values.layers):
        assert isinstance(layer, ReservedLayer) and layer.keys.dtype == layer.values.dtype == torch.float32
        assert (layer.keys - plain_layer.keys).abs().max().item() < tolerance * 2


class _OffsetRMSNorm(torch.nn.Module):
    """Gemma's form, weight applied as (1 + w): not what `F.rms_norm` computes."""

    def __init__(self, size: int) -> None:
        super().__init__()
        self.weight, self.variance_epsilon = torch.nn.Parameter(torch.randn(size)), 1e-6

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return hidden * torch.rsqrt(hidden.pow(2).mean(-1, keepdim=True) + self.variance_epsilon) * (1 + self.weight)


def test_lean_decoder_fuses_a_norm_only_where_the_fused_kernel_gives_the_modules_output():
    model_class, config = LEAN_ARCHITECTURES["qwen3, per-head q/k norms"]
    torch.manual_seed(5)
    norm = model_class(config).model.layers[0].input_layernorm
    torch.nn.init.normal_(norm.weight, std=0.5)
    fused, hidden = _fused_norm(norm), torch.randn(3, 1, config.hidden_size)
    assert fused is not norm
    assert (fused(hidden) - norm(hidden)).abs().max().item() < 1e-6
    offset = _OffsetRMSNorm(config.hidden_size)
    assert _fused_norm(offset) is offset


def test_lean_decoder_leaves_other_models_to_transformers():
    assert not LeanDecoder.supports(GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=40)))
    sliding = Qwen2ForCausalLM(Qwen2Config(**SMALL, use_sliding_window=True, sliding_window=8))
    assert not LeanDecoder.supports(sliding)
    assert not LeanDecoder.supports(Qwen2ForCausalLM(Qwen2Config(**SMALL)).to(torch.float64))
    with pytest.raises(ValueError, match="does not cover"):
        LeanDecoder(GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=40)))


def test_rollouts_through_the_lean_decoder_match_the_transformers_decode(tmp_path):
    engine = HFEngine(build_random_model(tmp_path / "m", hidden=64, seed=4), progress=False)
    assert LeanDecoder.supports(engine.model)
    prompts = [[40, 41, 42], [50, 51, 52, 53, 54, 55], [60, 61]]
    sampling = SamplingParams(temperature=1.0, max_new_tokens=12, n=2, seed=0)
    with torch.inference_mode():
        plain = engine._generate_batch(prompts, sampling, TokenSampler(1.0, 1.0, torch.Generator().manual_seed(1)),
                                       decoder=None)
        lean = engine._generate_batch(prompts, sampling, TokenSampler(1.0, 1.0, torch.Generator().manual_seed(1)),
                                      decoder=LeanDecoder(engine.model))
    assert [tokens for tokens, _ in lean] == [tokens for tokens, _ in plain]
    assert max(abs(a - b) for (_, x), (_, y) in zip(lean, plain) for a, b in zip(x, y)) < 1e-5


def _tiny_run(world, run_id: str, **changes):
    config = parse_config(tiny_distill_config(world.base, world.models, world.data, run_id,
                                              **{"update.minibatches": 1, **changes}))
    layout = prepare_run(config)
    rollout_stage(layout, 0, config.models.student, prompts_per_iteration=6,
                  sampling=SamplingParams(temperature=1.0, max_new_tokens=10, n=2), seed=0)
    return config, layout


def test_update_scores_the_student_in_its_forward_pass_like_a_scoring_pass(world):
    config, layout = _tiny_run(world, "fused")
    student = Path(config.models.student)
    assert student_scored_in_update(config)
    assert [s.role for s in plan_scorers(config, student, ["code", "math"])] == ["teacher", "teacher", "reference"]
    written = score_stage(layout, 0, [s for s in plan_scorers(config, student, ["code", "math"])
                                      if s.role == "teacher"], student_tokenizer=student, chunk_rows=4)
    teachers = {key.split(":")[1]: ("teacher", digest) for key, digest in written.items()}
    kwargs = {"reward_scale": 1.0, "micro_token_budget": 64, "score_chunk_rows": 4, "progress": False}
    fused_checkpoint, fused_steps = update_policy(layout, 0, student, ScoreSets(None, teachers), **kwargs)
    fused_weights = load_file(str(fused_checkpoint / "model.safetensors"))
    written_hash = score_key(student, None)
    from_update = read_score_map(layout, 0, "student", written_hash)
    hit = score_rollouts(layout, 0, rollout_shards(layout, 0), student, "student", chunk_rows=4, progress=False)
    assert hit.cache_hit and hit.model_hash == written_hash  # the update's set is the scoring pass's set

    scores_dir = layout.scores_dir(0, "student", written_hash)
    for path in scores_dir.iterdir():
        path.unlink()
    scored = score_rollouts(layout, 0, rollout_shards(layout, 0), student, "student", chunk_rows=4, progress=False)
    assert not scored.cache_hit
    from_scorer = read_score_map(layout, 0, "student", written_hash)
    assert from_update.keys() == from_scorer.keys()
    assert max(np.abs(from_update[k] - from_scorer[k]).max(initial=0) for k in from_scorer) < 1e-5

    separate_checkpoint, separate_steps = update_policy(
        layout, 0, student, ScoreSets(("student", written_hash), teachers), **kwargs)
    separate_weights = load_file(str(separate_checkpoint / "model.safetensors"))
    assert max((fused_weights[k] - separate_weights[k]).abs().max().item() for k in fused_weights) < 1e-5
    assert fused_steps[0]["loss"] == pytest.approx(separate_steps[0]["loss"], abs=1e-5)
    assert fused_steps[0]["advantage_mean"] == pytest.approx(separate_steps[0]["advantage_mean"], abs=1e-5)


def test_the_update_overlaps_the_previous_deferred_write_and_steps_adamw_after_it(world):
    config, layout = _tiny_run(world, "overlap")
    student, events = Path(config.models.student), []
    teachers_of = [s for s in plan_scorers(config, student, ["code", "math"]) if s.role == "teacher"]
    kwargs = {"reward_scale": 1.0, "micro_token_budget": 64, "score_chunk_rows": 4, "progress": False}
    with keep_models_loaded(4) as cache:  # room for the two teachers and the student
        written = score_stage(layout, 0, teachers_of, student_tokenizer=student, chunk_rows=4)
        teachers = {key.split(":")[1]: ("teacher", digest) for key, digest in written.items()}
        first, _ = update_policy(layout, 0, student, ScoreSets(None, teachers), **kwargs)
        rollout_stage(layout, 1, first, prompts_per_iteration=6,
                      sampling=SamplingParams(temperature=1.0, max_new_tokens=10, n=2), seed=0)
        written = score_stage(layout, 1, teachers_of, student_tokenizer=student, chunk_rows=4)
        cache.wait()
        model, extras = cache.take(first)
        model.get_input_embeddings().register_forward_hook(
            lambda *_: events.append("forward") if "forward" not in events else None)
        extras["optimizer"].register_step_pre_hook(lambda *_: events.append("adamw step"))
        cache.put(first, model, **extras)
        release = threading.Event()

        def slow_write():  # stands for the previous checkpoint's deferred optimizer-state write
            release.wait(10)
            events.append("deferred write done")

        cache.defer(slow_write, "slow")
        threading.Timer(1.0, release.set).start()
        teachers = {key.split(":")[1]: ("teacher", digest) for key, digest in written.items()}
        update_policy(layout, 1, first, ScoreSets(None, teachers), **kwargs)
    assert events == ["forward", "deferred write done", "adamw step"]


def test_update_refuses_to_score_the_student_with_several_minibatches(world):
    config, layout = _tiny_run(world, "fused-minibatches")
    with pytest.raises(ValueError, match="only with one minibatch"):
        update_policy(layout, 0, config.models.student, ScoreSets(None, {"default": ("teacher", "x")}),
                      reward_scale=1.0, minibatches=2)


@pytest.mark.parametrize("native", [False, True])
def test_update_precision_picks_autocast_only_where_it_is_native(world, monkeypatch, native):
    monkeypatch.delenv(hardware.PRECISION_ENV, raising=False)
    monkeypatch.setattr(hardware, "native_bf16", lambda device="cpu": native)
    assert autocast_dtype("auto", "cpu") is (torch.bfloat16 if native else None)
    assert best_dtype("cpu") is (torch.bfloat16 if native else torch.float32)  # the scorer's weights
    assert autocast_dtype("float32", "cpu") is None
    assert autocast_dtype("bfloat16", "cpu") is torch.bfloat16
    monkeypatch.setenv(hardware.PRECISION_ENV, "float32")  # the override wins over the hardware
    assert autocast_dtype("auto", "cpu") is None and best_dtype("cpu") is torch.float32
    monkeypatch.setenv(hardware.PRECISION_ENV, "fp16")
    with pytest.raises(ValueError, match="GOPD_PRECISION must be one of auto, float32, bfloat16, got 'fp16'"):
        best_dtype("cpu")
    with pytest.raises(ValueError, match="'auto', 'float32' or 'bfloat16'"):
        autocast_dtype("fp8", "cpu")
    with pytest.raises(ValueError, match="precision"):
        parse_config(tiny_distill_config(world.base, world.models, world.data, "x", **{"update.precision": "fp16"}))


def test_a_bfloat16_update_trains_float32_weights_close_to_the_float32_update(world):
    config, layout = _tiny_run(world, "precision")
    student = Path(config.models.student)
    written = score_stage(layout, 0, [s for s in plan_scorers(config, student, ["code", "math"])
                                      if s.role == "teacher"], student_tokenizer=student, chunk_rows=4)
    teachers = {key.split(":")[1]: ("teacher", digest) for key, digest in written.items()}
    kwargs = {"reward_scale": 1.0, "micro_token_budget": 64, "score_chunk_rows": 4, "progress": False,
              "optimizer_settings": OptimizerSettings(lr=1e-3)}
    results = {}
    for precision in ("float32", "bfloat16"):
        checkpoint, steps = update_policy(layout, 0, student, ScoreSets(None, teachers), precision=precision, **kwargs)
        results[precision] = (load_file(str(checkpoint / "model.safetensors")), steps[0])
    start = load_file(str(student / "model.safetensors"))
    (fp32, fp32_step), (bf16, bf16_step) = results["float32"], results["bfloat16"]
    assert all(tensor.dtype == torch.float32 for tensor in bf16.values())  # mixed precision: fp32 master weights
    assert bf16_step["loss"] != fp32_step["loss"]  # the bf16 matmuls did run ...
    assert bf16_step["loss"] == pytest.approx(fp32_step["loss"], rel=0.05, abs=0.02)  # ... and stayed close
    assert bf16_step["grad_norm"] == pytest.approx(fp32_step["grad_norm"], rel=0.1)
    step_fp32 = torch.cat([(fp32[k] - start[k]).flatten() for k in start])
    step_bf16 = torch.cat([(bf16[k] - start[k]).flatten() for k in start])
    assert step_fp32.abs().max() > 1e-4  # the update moved the weights, and the bf16 one in about the same direction
    # (AdamW's first step is about lr x sign(gradient): entries whose gradient is near 0 may flip)
    cosine = torch.nn.functional.cosine_similarity(step_fp32, step_bf16, dim=0).item()
    assert cosine > 0.8


def test_students_with_dropout_keep_their_scoring_pass(world, tmp_path):
    base, models, data = world.base, world.models, world.data
    student = build_random_model(tmp_path / "dropout", hidden=32, seed=1)
    config_path = student / "config.json"
    config_path.write_text(config_path.read_text().replace('"attention_dropout": 0.0', '"attention_dropout": 0.1'))
    assert has_dropout(student) and not has_dropout(models["student"])
    config = parse_config(tiny_distill_config(base, {**models, "student": student}, data, "dropout",
                                              **{"update.minibatches": 1}))
    assert not student_scored_in_update(config)
    assert plan_scorers(config, student, ["math"])[0] == Scorer("student", student)


def test_resident_models_leave_the_distill_flow_results_unchanged(world):
    base, models, data = world.base, world.models, world.data
    weights, loads = {}, {}
    for resident in (4, 0):
        config = tiny_distill_config(base, models, data, f"resident-{resident}", resident_models=resident,
                                     **{"update.minibatches": 1, "data.test": []})
        before = ResidentModels.total_loads
        layout = RunLayout(Path(distill(config=config)))
        loads[resident] = ResidentModels.total_loads - before
        weights[resident] = [load_file(str(layout.checkpoint_dir(i) / "model.safetensors")) for i in (0, 1)]
        assert resident_models().capacity == 0 and len(resident_models()) == 0  # the run's cache is gone
        optimizers = [torch.load(layout.checkpoint_dir(i) / "optimizer.pt", weights_only=True) for i in (0, 1)]
        weights[resident] = list(zip(weights[resident], optimizers))
    for (kept, kept_state), (reloaded, reloaded_state) in zip(weights[4], weights[0]):
        assert all(torch.equal(kept[k], reloaded[k]) for k in kept)
        # resident: the optimizer state is written in the background, and there by the flow's end
        for slot, state in kept_state["state"].items():
            assert all(torch.equal(state[k], reloaded_state["state"][slot][k]) for k in state)
    # kept: the student init (rollout 0), the 2 teachers, and the student init again as iteration 1's
    # reference (iteration 0's update trained the first copy); reloaded: per iteration the rollout, 2
    # teachers, the reference and the update each load a model
    assert loads == {4: 4, 0: 10}


def test_each_run_scope_has_its_own_resident_models(tmp_path):
    import threading

    from gopd_core.models import keep_models_loaded

    path = build_random_model(tmp_path / "m", seed=6)
    seen = {}

    def other_run():
        with keep_models_loaded(2) as cache:
            seen["other"] = cache.get(path)

    with keep_models_loaded(2) as cache:
        mine = resident_models().get(path)
        assert resident_models() is cache and cache.get(path) is mine
        thread = threading.Thread(target=other_run)
        thread.start(), thread.join()
    assert seen["other"] is not mine  # never the same object: one run may train what another samples
    assert resident_models().capacity == 0  # outside a run nothing is kept


def test_deferred_writes_run_in_the_background_and_hand_back_their_errors(tmp_path):
    release, ran = threading.Event(), []

    def slow_write():
        release.wait(5)
        ran.append(threading.current_thread().name)
        if hasattr(os, "sched_getscheduler"):  # Linux: the normal priority, so that it ends before the next update
            ran.append(os.sched_getscheduler(threading.get_native_id()) == os.SCHED_OTHER)

    with keep_models_loaded(2) as cache:
        cache.defer(slow_write, "slow")
        assert ran == []  # still waiting: the caller went on
        release.set()
    assert ran[0] == "gopd-slow" and all(ran[1:])  # joined when the run's scope closed

    def failing_write():
        raise OSError("disk full")

    cache = ResidentModels(capacity=2)
    cache.defer(failing_write, "failing")
    with pytest.raises(OSError, match="disk full"):
        cache.wait()
    cache.wait()  # reported once
    now = ResidentModels(capacity=0)  # a run that keeps nothing reads the state back: written at once
    with pytest.raises(OSError, match="disk full"):
        now.defer(failing_write, "failing")

