"""End-to-end Prefect flows with tiny real models: distill, kill-and-resume, rescore, evaluate."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import yaml
from tiny import build_random_model, tiny_distill_config, write_task_data

from flows.distill import distill
from flows.evaluate import evaluate
from flows.rescore import rescore
from gopd_core.models import _hash_files, _weights_stamp
from gopd_core.report import write_report
from storage.catalog import open_catalog, run_query
from storage.layout import RunLayout

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    base = tmp_path_factory.mktemp("world")
    models = {
        "student": build_random_model(base / "student", hidden=32, seed=1),
        "teacher_math": build_random_model(base / "teacher-math", hidden=64, seed=2),
        "teacher_code": build_random_model(base / "teacher-code", hidden=64, seed=3),
        "teacher_base": build_random_model(base / "teacher-base", hidden=64, seed=4),
    }
    return base, models, write_task_data(base / "data", n_train=12, n_test=4)


def make_config(world, run_id: str, **changes) -> dict:
    base, models, data = world
    return tiny_distill_config(base, models, data, run_id, **changes)


def table_counts(run_dir: Path) -> dict[str, int]:
    con = open_catalog(run_dir)
    return {t: con.sql(f"SELECT count(*) FROM {t}").fetchall()[0][0]
            for t in ("rollouts", "scores", "updates", "evals")}


@pytest.fixture(scope="module")
def finished_run(world):
    return Path(distill(config=make_config(world, "reference-run")))


def test_distill_two_iterations(finished_run):
    layout = RunLayout(finished_run)
    counts = table_counts(finished_run)
    # 2 iterations x 6 prompts x 2 samples
    assert counts["rollouts"] == 24
    # per iteration: student (12) + math teacher (its rows) + code teacher (its rows) + reference (12) = 36
    assert counts["scores"] == 2 * 36
    # 2 minibatches -> 2 optimizer steps per iteration
    assert counts["updates"] == 4
    # evaluated before (0 updates) and after 2: 2 domains x (avg@2, pass@2) each
    assert counts["evals"] == 8
    for iteration in (0, 1):
        checkpoint = layout.checkpoint_dir(iteration)
        assert (checkpoint / "model.safetensors").exists() and (checkpoint / "optimizer.pt").exists()
    assert (layout.report_dir() / "metrics.png").stat().st_size > 1000
    # iteration 1 sampled checkpoint 0: its id carries the hash of the files as written (read back here,
    # while the run took it from memory while writing them with O_DIRECT)
    from_disk = _hash_files(_weights_stamp(layout.checkpoint_dir(0)))
    sampled_by = run_query(finished_run, "SELECT DISTINCT checkpoint_id FROM rollouts WHERE iteration = 1").fetchall()
    assert sampled_by == [(f"{layout.checkpoint_dir(0).name}@{from_disk[:8]}",)]
    roles = run_query(finished_run, "SELECT DISTINCT role, domain FROM scores ORDER BY ALL").fetchall()
    assert roles == [("reference", None), ("student", None), ("teacher", "code"), ("teacher", "math")]


def test_report_without_plot_keeps_the_last_png(finished_run):
    # the flow plots only after its last iteration: a report without a plot must not redraw it
    layout = RunLayout(finished_run)
    png = layout.report_dir() / "metrics.png"
    drawn = png.stat().st_mtime_ns
    summary = write_report(layout, plot=False)
    assert png.stat().st_mtime_ns == drawn
    assert "![metrics](metrics.png)" in summary.read_text()


def test_rerun_is_a_no_op(world, finished_run):
    before = table_counts(finished_run)
    mtimes = {p: p.stat().st_mtime_ns for p in finished_run.rglob("*.parquet")}
    distill(config=make_config(world, "reference-run"))
    assert table_counts(finished_run) == before
    assert {p: p.stat().st_mtime_ns for p in finished_run.rglob("*.parquet")} == mtimes


def test_changed_config_on_same_run_is_refused(world, finished_run):
    with pytest.raises(ValueError, match="different config"):
        distill(config=make_config(world, "reference-run", **{"update.reward_scale": 1.5}))


KILL_SCRIPT = textwrap.dedent("""
    import sys, yaml
    from flows.distill import distill
    distill(config=yaml.safe_load(open(sys.argv[1])))
""")


def test_killed_during_scoring_resumes_to_same_counts(world, finished_run, tmp_path):
    config = make_config(world, "killed-run")
    config_path = tmp_path / "config.yaml"
    config_path.write_text(yaml.safe_dump(config))
    layout = RunLayout.under(config["storage_root"], "killed-run")
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    process = subprocess.Popen([sys.executable, "-c", KILL_SCRIPT, str(config_path)], cwd=ROOT, env=env,
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    scores_dir = layout.run_dir / "scores" / "iteration=000001"
    deadline = time.time() + 300
    # kill as soon as the second iteration's scoring has written its first chunk shard
    while time.time() < deadline and process.poll() is None and not list(scores_dir.rglob("part-*.parquet")):
        time.sleep(0.005)
    os.killpg(process.pid, signal.SIGKILL)
    process.wait()
    assert layout.done_info(0, "update") is not None, "the kill should land in iteration 1"
    assert layout.done_info(1, "score") is None, "the kill should land before scoring completed"
    assert not layout.checkpoint_dir(1).exists()
    distill(config=config)
    assert table_counts(layout.run_dir) == table_counts(finished_run)
    duplicates = run_query(layout.run_dir, "SELECT count(*) FROM (SELECT rollout_id, role, model_hash, count(*) c "
                           "FROM scores GROUP BY ALL HAVING c > 1)").fetchall()[0][0]
    assert duplicates == 0


def test_rescore_with_teacher_base_changes_advantages_only_for_lam_not_one(world, finished_run):
    _, models, _ = world
    written = rescore(run_dir=str(finished_run), model=str(models["teacher_base"]), role="teacher-base")
    assert sorted(written) == [0, 1]
    per_reference = run_query(finished_run, "SELECT reference_role, count(DISTINCT rollout_id) FROM token_advantages "
                              "GROUP BY ALL ORDER BY ALL").fetchall()
    assert per_reference == [("reference", 24), ("teacher-base", 24)]
    compare = """SELECT max(abs(a.advantage - b.advantage)) FROM token_advantages a JOIN token_advantages b
                 USING (rollout_id, token_index) WHERE a.reference_role = 'reference'
                 AND b.reference_role = 'teacher-base'"""
    assert run_query(finished_run, compare, reward_scale=1.0).fetchall()[0][0] == 0.0
    assert run_query(finished_run, compare, reward_scale=1.5).fetchall()[0][0] > 1e-3


def test_evaluate_flow_on_checkpoints(world, finished_run, tmp_path):
    _, models, data = world
    layout = RunLayout(finished_run)
    eval_run = tmp_path / "eval-run"
    shards = evaluate(checkpoints=[str(models["student"]), str(layout.checkpoint_dir(1))], run_dir=str(eval_run),
                      test_data=[str(p) for p in data["test"]], n_samples=2, k=2, eval_prompts=2)
    assert len(shards) == 2
    rows = run_query(eval_run, "SELECT count(DISTINCT checkpoint_id), count(*) FROM evals").fetchall()[0]
    assert rows == (2, 8)


def test_sft_baseline_trains_on_teacher_samples(world):
    run_dir = Path(distill(config=make_config(world, "sft-run", iterations=1, **{
        "update.objective": "sft", "sampling.source": "teacher", "sampling.verify_rewards": False})))
    samplers = run_query(run_dir, "SELECT domain, list(DISTINCT split_part(checkpoint_id, '@', 1)) "
                                  "FROM rollouts GROUP BY domain ORDER BY domain").fetchall()
    # each domain's prompts were sampled by that domain's teacher, not by the student
    assert samplers == [("code", ["teacher-code"]), ("math", ["teacher-math"])]
    steps = run_query(run_dir, "SELECT count(*), min(clip_fraction), max(clip_fraction) FROM updates").fetchall()
    assert steps == [(2, 0.0, 0.0)]  # SFT steps report no clipping
    assert (RunLayout(run_dir).checkpoint_dir(0) / "model.safetensors").exists()
    # verify_rewards off: the reward column stays null and the report still renders
    assert run_query(run_dir, "SELECT count(reward) FROM rollouts").fetchall() == [(0,)]
    assert (RunLayout(run_dir).report_dir() / "report.md").exists()


@pytest.mark.parametrize("changes, message", [
    ({"update.objective": "sft"}, "sampling.source to 'teacher'"),
    ({"sampling.source": "teacher"}, "set update.objective to 'sft'"),
])
def test_off_policy_settings_must_agree(world, changes, message):
    from gopd_core.config import ConfigError, parse_config

    with pytest.raises(ConfigError, match=message):
        parse_config(make_config(world, "mismatch", **changes))
