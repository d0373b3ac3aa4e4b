"""The tiny model zoo: loadable directories with cards, a manifest, and an idempotent rebuild."""

from __future__ import annotations

import json

import pytest
from transformers import AutoModelForCausalLM, AutoTokenizer

from gopd_core.models import read_card, render_prompt
from gopd_core.zoo import PRESETS, UnknownPresetError, ZooMismatchError, build_zoo, read_manifest

MODELS = ["student-base", "teacher-math", "teacher-code", "strong-base", "strong-teacher"]


def test_manifest_lists_models_and_datasets(tiny_zoo):
    manifest = read_manifest(tiny_zoo)
    assert manifest["preset"] == "tiny" and manifest["seed"] == 0
    assert sorted(manifest["models"]) == sorted(MODELS)
    assert sorted(manifest["datasets"]) == ["code/test", "code/train", "math/test", "math/train"]
    for relative in manifest["datasets"].values():
        assert (tiny_zoo / relative).exists()
    assert manifest["models"]["teacher-math"]["parent"] == "student-base"
    assert manifest["models"]["strong-teacher"]["parent"] == "strong-base"


@pytest.mark.parametrize("name", MODELS)
def test_model_dirs_load_with_auto_classes_and_carry_a_card(tiny_zoo, name):
    path = tiny_zoo / name
    model = AutoModelForCausalLM.from_pretrained(str(path))
    tokenizer = AutoTokenizer.from_pretrained(str(path))
    # the char-level vocabulary survives the round trip, whitespace and newlines included
    text = "7+5=12\n\\boxed{12} ok"
    assert tokenizer.decode(tokenizer(text, add_special_tokens=False)["input_ids"]) == text
    rendered = tokenizer.decode(render_prompt(tokenizer, [{"role": "user", "content": "hi"}]))
    assert rendered == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
    card = read_card(path)
    assert card["name"] == name and card["preset"] == "tiny" and card["seed"] == 0
    assert card["parameters"] == sum(p.numel() for p in model.parameters())
    assert set(card["accuracy"]) == {"math", "code"}
    assert all(0.0 <= value <= 1.0 for value in card["accuracy"].values())
    assert card["wall_time_s"] > 0 and "greedy" in card["accuracy_method"]


def test_strong_base_is_at_least_four_times_the_student(tiny_zoo):
    cards = {name: read_card(tiny_zoo / name) for name in ("student-base", "strong-base")}
    assert cards["strong-base"]["parameters"] >= 4 * cards["student-base"]["parameters"]
    default = {recipe.name: recipe.shape for recipe in PRESETS["default"].recipes if recipe.shape is not None}
    assert default["strong-base"].hidden > default["student-base"].hidden


def test_second_build_is_a_no_op(tiny_zoo):
    before = {p: p.stat().st_mtime_ns for p in tiny_zoo.rglob("*") if p.is_file()}
    manifest = build_zoo(tiny_zoo, preset="tiny", seed=0, progress=False)
    assert manifest == json.loads((tiny_zoo / "manifest.json").read_text())
    assert {p: p.stat().st_mtime_ns for p in tiny_zoo.rglob("*") if p.is_file()} == before
    assert not list(tiny_zoo.glob(".*staging*"))
    with pytest.raises(ZooMismatchError, match="preset 'tiny'"):
        build_zoo(tiny_zoo, preset="tiny", seed=1, progress=False)


def test_unknown_preset_is_refused(tmp_path):
    with pytest.raises(UnknownPresetError, match="unknown zoo preset 'huge'"):
        build_zoo(tmp_path / "zoo", preset="huge")
