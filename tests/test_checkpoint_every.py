"""`checkpoint_every`: updates whose checkpoint stays in memory only, and runs resumed across them.

With `checkpoint_every: k` (and models resident) only every k-th update, the run's last one and any evaluated
one write their checkpoint; the others keep their weights in the run's memory (`models.hold_weights`) until the
next update changes them. A resumed run goes on from the last written checkpoint, redoing the updates after it
from the stored rollouts and scores (`pipeline.update_complete`).
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from tiny import build_random_model, build_world, tiny_distill_config
from transformers import AutoModelForCausalLM

from flows.distill import distill
from gopd_core.config import parse_config
from gopd_core.models import (
    PENDING_WEIGHTS_FILE,
    ModelPathError,
    hold_weights,
    keep_models_loaded,
    load_model,
    model_hash,
    release_held_weights,
    save_model,
    weights_written,
)
from gopd_core.pipeline import checkpoint_id, keeps_checkpoint
from gopd_core.training import checkpoint_complete, checkpoint_not_kept
from storage.doctor import diagnose
from storage.layout import RunLayout
from storage.readers import read_rollouts

SETTINGS = {"update.minibatches": 1, "data.test": []}


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    return build_world(tmp_path_factory.mktemp("every"))


@pytest.fixture(scope="module")
def straight(world):
    """The same run writing every checkpoint, 3 iterations."""
    config = tiny_distill_config(world.base, world.models, world.data, "every-straight", iterations=3, **SETTINGS)
    return RunLayout(Path(distill(config=config)))


def _run(world, run_id: str, **changes) -> RunLayout:
    return RunLayout(Path(distill(config=tiny_distill_config(world.base, world.models, world.data, run_id,
                                                             **{**SETTINGS, **changes}))))


def _same_checkpoint(one: Path, other: Path) -> bool:
    first, second = (load_file(str(c / "model.safetensors")) for c in (one, other))
    if first.keys() != second.keys() or not all(torch.equal(first[k], second[k]) for k in first):
        return False
    mine, theirs = (torch.load(c / "optimizer.pt", weights_only=True)["state"] for c in (one, other))
    return all(torch.equal(mine[slot][k], theirs[slot][k]) for slot in theirs for k in theirs[slot])


def _marker_stamps(layout: RunLayout, iterations: int) -> dict:
    return {(i, stage): layout.marker_path(i, stage).stat().st_mtime_ns
            for i in range(iterations) for stage in ("rollout", "score", "update")}


def test_which_updates_keep_their_checkpoint(world):
    config = tiny_distill_config(world.base, world.models, world.data, "policy", iterations=7, checkpoint_every=3,
                                 **{"eval.every": 0})
    kept = [i for i in range(7) if keeps_checkpoint(parse_config(config), i)]
    assert kept == [2, 5, 6]  # every 3rd, and the last (which the flow also evaluates)
    assert [i for i in range(7) if keeps_checkpoint(parse_config({**config, "eval": {"every": 2}}), i)] == [1, 2, 3, 5, 6]
    assert all(keeps_checkpoint(parse_config({**config, "resident_models": 0}), i) for i in range(7))


def test_only_every_kth_checkpoint_is_written_and_the_run_is_the_same(world, straight):
    layout = _run(world, "every-2", iterations=3, checkpoint_every=2)
    first = layout.checkpoint_dir(0)
    assert checkpoint_not_kept(first) and not checkpoint_complete(first)
    assert not (first / "optimizer.pt").exists() and (first / PENDING_WEIGHTS_FILE).exists()
    assert os.stat(first / "model.safetensors").st_blocks * 512 < 4096  # a placeholder: no weight bytes on disk
    with pytest.raises(ModelPathError, match="not kept on disk"):
        load_model(first)
    for i in (1, 2):
        assert checkpoint_complete(layout.checkpoint_dir(i)) and not checkpoint_not_kept(layout.checkpoint_dir(i))
        assert _same_checkpoint(layout.checkpoint_dir(i), straight.checkpoint_dir(i))
    # the next iteration sampled from the checkpoint held in memory, recorded under its weights' hash
    assert set(read_rollouts(layout, 1, ["checkpoint_id"]).column("checkpoint_id").to_pylist()) == {
        checkpoint_id(straight.checkpoint_dir(0))}
    assert diagnose(layout.run_dir) == []  # not a broken checkpoint


def test_a_killed_run_redoes_the_updates_after_its_last_written_checkpoint(world, straight):
    layout = _run(world, "every-killed", iterations=3, checkpoint_every=3)
    assert [checkpoint_complete(layout.checkpoint_dir(i)) for i in range(3)] == [False, False, True]
    # killed during update 2: no marker, no checkpoint
    layout.marker_path(2, "update").unlink()
    for path in layout.checkpoint_dir(2).iterdir():
        path.unlink()
    layout.checkpoint_dir(2).rmdir()
    stamps = _marker_stamps(layout, 2) | {(2, s): layout.marker_path(2, s).stat().st_mtime_ns for s in ("rollout", "score")}
    _run(world, "every-killed", iterations=3, checkpoint_every=3)  # resumes
    rerun = {key for key, stamp in stamps.items() if layout.marker_path(*key).stat().st_mtime_ns != stamp}
    assert rerun == {(0, "update"), (1, "update")}  # redone from stored rollouts and scores; nothing sampled again
    assert _same_checkpoint(layout.checkpoint_dir(2), straight.checkpoint_dir(2))


def test_an_extended_run_goes_on_from_its_last_written_checkpoint(world, straight):
    layout = _run(world, "every-extended", iterations=2, checkpoint_every=2)
    assert [checkpoint_complete(layout.checkpoint_dir(i)) for i in range(2)] == [False, True]
    stamps = _marker_stamps(layout, 2)
    _run(world, "every-extended", iterations=3, checkpoint_every=2)  # one more iteration
    assert all(layout.marker_path(*key).stat().st_mtime_ns == stamp for key, stamp in stamps.items())  # no redo
    assert not checkpoint_complete(layout.checkpoint_dir(0))
    assert _same_checkpoint(layout.checkpoint_dir(2), straight.checkpoint_dir(2))  # AdamW state read back from disk


def test_a_held_checkpoint_is_written_when_asked_for_until_released(tmp_path):
    model = AutoModelForCausalLM.from_pretrained(str(build_random_model(tmp_path / "source")))
    with keep_models_loaded(2):
        held, released = tmp_path / "held", tmp_path / "released"
        for directory in (held, released):
            hold_weights(directory, save_model(model, directory, defer_weights=True, held=True))
        hash_before = model_hash(held)
        weights_written(held)  # e.g. a vLLM engine about to load it from disk
        assert not (held / PENDING_WEIGHTS_FILE).exists() and model_hash(held) == hash_before
        on_disk = load_file(str(held / "model.safetensors"))
        assert all(torch.equal(on_disk[k], v) for k, v in model.state_dict().items() if k in on_disk)
        release_held_weights(released)  # the next update changes the weights
        weights_written(released)  # nothing to write any more
        assert (released / PENDING_WEIGHTS_FILE).exists()
        with pytest.raises(ModelPathError, match="not kept on disk"):
            load_model(released)
        at_the_end = tmp_path / "at-the-end"
        hold_weights(at_the_end, save_model(model, at_the_end, defer_weights=True, held=True))
    # the run's end releases what it still held: its models, and their weights, are gone with it
    with pytest.raises(ModelPathError, match="not kept on disk"):
        load_model(at_the_end)
    assert model_hash(at_the_end) == model_hash(held)  # the id stays known
