"""Resuming a run whose update was recorded before its checkpoint's deferred part landed.

The update writes its weights, records itself, and writes the AdamW state on a background thread while the
next rollout and scoring run (`training.save_checkpoint`). A kill in that window leaves an update that a
resumed run does again (`pipeline.run_once`'s `complete`), and later stages that may have run on weights the
redone update does not give back (`pipeline.forget_stages_built_on`).
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from tiny import build_world, tiny_distill_config

from flows.distill import distill
from gopd_core.config import parse_config
from gopd_core.models import PENDING_WEIGHTS_FILE, ModelPathError, model_hash
from gopd_core.pipeline import checkpoint_id, eval_settings, evaluate_stage, forget_stages_built_on
from gopd_core.scoring import store_scores
from gopd_core.training import checkpoint_complete
from storage.catalog import run_query
from storage.layout import RunLayout
from storage.readers import read_evals, read_rollouts, read_score_map, rollout_shards


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    return build_world(tmp_path_factory.mktemp("resume"))


def _lose_deferred_part(checkpoint: Path) -> None:
    """What a kill after the weights were renamed in, before the AdamW and trainer state, leaves."""
    (checkpoint / "trainer_state.json").unlink()
    (checkpoint / "optimizer.pt").unlink()


def _leave_placeholders(checkpoint: Path) -> None:
    """What a kill before the deferred weights write leaves: files of their size holding zeros, and their hash."""
    hash_before = model_hash(checkpoint)
    weights = checkpoint / "model.safetensors"
    size, stat = weights.stat().st_size, weights.stat()
    with open(weights, "wb") as placeholder:
        placeholder.truncate(size)
    os.utime(weights, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    (checkpoint / PENDING_WEIGHTS_FILE).write_text(json.dumps({"hash": hash_before}))


def _perturb_weights(checkpoint: Path) -> None:
    weights = load_file(str(checkpoint / "model.safetensors"))
    name = sorted(weights)[0]
    weights[name] = weights[name] + 1e-3
    save_file(weights, str(checkpoint / "model.safetensors"), metadata={"format": "pt"})


def _same_weights(one: Path, other: Path) -> bool:
    first, second = (load_file(str(c / "model.safetensors")) for c in (one, other))
    return first.keys() == second.keys() and all(torch.equal(first[k], second[k]) for k in first)


@pytest.mark.parametrize("lost", ["optimizer state", "whole checkpoint"])
def test_an_update_whose_deferred_write_never_landed_runs_again_on_resume(world, lost):
    base, models, data = world.base, world.models, world.data
    settings = {"update.minibatches": 1, "data.test": []}
    whole = RunLayout(Path(distill(config=tiny_distill_config(base, models, data, "deferred-whole", **settings))))
    run_id = f"deferred-cut-{lost.split()[0]}"
    cut = RunLayout(Path(distill(config=tiny_distill_config(base, models, data, run_id, iterations=1, **settings))))
    first = cut.checkpoint_dir(0)
    assert checkpoint_complete(first)
    if lost == "optimizer state":
        _lose_deferred_part(first)
    else:  # the checkpoint directory deleted after its update was recorded
        shutil.rmtree(first)
    assert cut.done_info(0, "update") is not None and not checkpoint_complete(first)
    distill(config=tiny_distill_config(base, models, data, run_id, **settings))  # resumes
    for i in (0, 1):
        assert checkpoint_complete(cut.checkpoint_dir(i))
        assert _same_weights(cut.checkpoint_dir(i), whole.checkpoint_dir(i))
        redone, straight = (torch.load(r.checkpoint_dir(i) / "optimizer.pt", weights_only=True)["state"]
                            for r in (cut, whole))
        assert all(torch.equal(redone[slot][k], straight[slot][k]) for slot in straight for k in straight[slot])


@pytest.mark.parametrize("left", ["weights unchanged", "weights changed", "weights never written"])
def test_a_redone_update_runs_the_later_stages_again_only_if_its_weights_changed(world, left):
    # update 0's deferred part never landed, but the next rollout, scoring and update were recorded: on resume
    # update 0 runs again; where the weights it gives differ from those the later stages used (a GPU's kernels
    # need not repeat bit for bit), those stages must run again on the new weights
    base, models, data = world.base, world.models, world.data
    settings = {"update.minibatches": 1, "data.test": []}
    straight = RunLayout(Path(distill(config=tiny_distill_config(base, models, data, "redo-straight", **settings))))
    weights_changed = left == "weights changed"
    run_id = f"redo-{left.split()[1]}"
    layout = RunLayout(Path(distill(config=tiny_distill_config(base, models, data, run_id, **settings))))
    first = layout.checkpoint_dir(0)
    _lose_deferred_part(first)
    if weights_changed:  # the weights the later stages ran on are not the ones update 0 gives again
        _perturb_weights(first)
    if left == "weights never written":  # killed before the weights' deferred write: their hash is kept beside
        _leave_placeholders(first)
        with pytest.raises(ModelPathError, match="never written"):
            model_hash(first)
    later = [(1, stage) for stage in ("rollout", "score", "update")]
    stamps = {key: layout.marker_path(*key).stat().st_mtime_ns for key in later}
    distill(config=tiny_distill_config(base, models, data, run_id, **settings))  # resumes
    rerun = {key for key in later if layout.marker_path(*key).stat().st_mtime_ns != stamps[key]}
    assert rerun == (set(later) if weights_changed else set())
    assert set(read_rollouts(layout, 1, ["checkpoint_id"]).column("checkpoint_id").to_pylist()) == {
        checkpoint_id(first)}
    for i in (0, 1):
        assert checkpoint_complete(layout.checkpoint_dir(i))
        assert _same_weights(layout.checkpoint_dir(i), straight.checkpoint_dir(i))


@pytest.mark.parametrize("first_redo", ["none", "killed after rewriting the checkpoint"])
def test_stages_built_on_replaced_weights_run_again_and_their_scores_and_evaluations_leave_the_tables(world, first_redo):
    # as above with an evaluation after every update: the weights the later stages (evaluation 1 included) ran
    # on are not those update 0 gives again. Evaluation 1 is stored under the replaced checkpoint's id: it must
    # leave the evals table (moved to the quarantine), or the table would show two checkpoints for update 1;
    # so must iteration 1's student scores, stored under the replaced weights' hash (two score sets per rollout).
    # "killed after rewriting": a first resume rewrote checkpoint 0 and was killed before it dropped the later
    # stages; the second resume must still compare with the weights those stages used, not the rewritten ones.
    base, models, data = world.base, world.models, world.data
    settings = {"update.minibatches": 1, "eval.every": 1}
    straight = RunLayout(Path(distill(config=tiny_distill_config(base, models, data, "evals-straight", **settings))))
    run_id = f"evals-{first_redo.split()[0]}"
    config = tiny_distill_config(base, models, data, run_id, **settings)
    layout = RunLayout(Path(distill(config=config)))
    first = layout.checkpoint_dir(0)
    _lose_deferred_part(first)
    ran_on = layout.scores_dir(1, "student", model_hash(first))  # the update stored the student's log-probs here
    _perturb_weights(first)  # the weights iteration 1's stages ran on: its student scores and evaluation 1 are
    stale = layout.evals_path(checkpoint_id(first))  # stored under their hash and id, as the stages store them
    store_scores(layout, 1, rollout_shards(layout, 1), first, "student", read_score_map(layout, 1, "student",
                 ran_on.name.removeprefix("model=")), chunk_rows=4)
    shutil.rmtree(ran_on)
    layout.evals_path(checkpoint_id(straight.checkpoint_dir(0))).unlink()
    layout.mark_done(1, "evaluate", {"result": str(evaluate_stage(layout, first, 1, **eval_settings(parse_config(config))))})
    if first_redo != "none":
        forget_stages_built_on(layout, 0, first)  # the first resume's redo began...
        shutil.copy(straight.checkpoint_dir(0) / "model.safetensors", first / "model.safetensors")  # ...rewrote
    later = [(1, "rollout"), (1, "score"), (1, "update"), (1, "evaluate"), (2, "evaluate")]
    stamps = {key: layout.marker_path(*key).stat().st_mtime_ns for key in later}
    distill(config=config)  # resumes
    assert {key for key in later if layout.marker_path(*key).stat().st_mtime_ns != stamps[key]} == set(later)
    assert set(read_evals(layout).column("checkpoint_id").to_pylist()) == {
        checkpoint_id(Path(models["student"])), *(checkpoint_id(layout.checkpoint_dir(i)) for i in (0, 1))}
    assert not stale.exists() and (layout.quarantine_dir() / stale.relative_to(layout.run_dir)).exists()
    assert [p.name for p in ran_on.parent.iterdir()] == [f"model={model_hash(first)}"]  # the stale set moved to the quarantine with its iteration's scores
    duplicated = "SELECT count(*) FROM (SELECT rollout_id, token_index FROM token_advantages GROUP BY ALL HAVING count(*) > 1)"
    assert run_query(layout.run_dir, duplicated).fetchall() == [(0,)]
    for i in (0, 1):
        assert checkpoint_complete(layout.checkpoint_dir(i))
        assert _same_weights(layout.checkpoint_dir(i), straight.checkpoint_dir(i))
