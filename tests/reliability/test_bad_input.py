"""Bad input is refused up front: a one-line error naming the problem, exit code 2, and no rows written.

Every case goes through `gopd run CONFIG` (the `gopd` entry point `cli.main`, which turns our
errors into one line and exit code 2) and through the library's own first step (`prepare_run`,
what the distill flow calls before any stage), and each must leave the storage root without a
single Parquet file: problems found mid-run (a domain without a teacher, a prompt longer than the
context, a teacher with another vocabulary) would leave rollouts behind.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml
from harness import ROOT, World, make_config

import flows.distill  # noqa: F401  (Prefect sets up its log handlers now, not on a stream capsys closes later)
from gopd_core.cli import main
from gopd_core.config import load_config
from gopd_core.pipeline import prepare_run
from gopd_core.tokenizer import build_tokenizer


def _write_config(tmp_path: Path, config: dict | str) -> Path:
    path = tmp_path / "bad.yaml"
    path.write_text(config if isinstance(config, str) else yaml.safe_dump(config))
    return path


def _jsonl(tmp_path: Path, *rows: dict) -> str:
    path = tmp_path / "prompts.jsonl"
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return str(path)


def _with_train(world: World, tmp_path: Path, dataset: str) -> dict:
    return make_config(world, "bad", root=tmp_path / "runs", **{"data.train": [dataset]})


def empty_prompt(world, tmp_path):
    dataset = _jsonl(tmp_path, {"prompt": "1+1?", "answer": "2", "domain": "math"},
                     {"prompt": "   ", "answer": "3", "domain": "math"})
    return _with_train(world, tmp_path, dataset), "row 1 has an empty prompt"


def prompt_longer_than_context(world, tmp_path):
    # byte-level tokenizer: 600 characters are 600+ tokens, the tiny models hold 512 positions
    dataset = _jsonl(tmp_path, {"prompt": "1+1?", "answer": "2", "domain": "math"},
                     {"prompt": "7" * 600, "answer": "7", "domain": "math", "id": "long-one"})
    return _with_train(world, tmp_path, dataset), "'long-one' has 6"


def missing_column_jsonl(world, tmp_path):
    return _with_train(world, tmp_path, _jsonl(tmp_path, {"prompt": "1+1?", "domain": "math"})), \
        "missing required column 'answer'"


def missing_column_parquet(world, tmp_path):
    path = tmp_path / "verl.parquet"
    pq.write_table(pa.table({"prompt": [[{"role": "user", "content": "1+1?"}]], "data_source": ["gsm"]}), path)
    return _with_train(world, tmp_path, str(path)), "missing required column 'reward_model'"


def wrong_type_jsonl(world, tmp_path):
    return _with_train(world, tmp_path, _jsonl(tmp_path, {"prompt": 42, "answer": "42", "domain": "math"})), \
        "must be text or a list of {role, content} messages, got int"


def wrong_type_parquet(world, tmp_path):
    path = tmp_path / "verl.parquet"
    pq.write_table(pa.table({"prompt": ["1+1?"], "reward_model": ["2"], "data_source": ["gsm"]}), path)
    return _with_train(world, tmp_path, str(path)), "column 'reward_model' lacks 'ground_truth'"


def wrong_type_messages(world, tmp_path):
    dataset = _jsonl(tmp_path, {"prompt": [{"role": "user", "content": 7}], "answer": "7", "domain": "math"})
    return _with_train(world, tmp_path, dataset), "has a message without text content"


def domain_without_teacher(world, tmp_path):
    config = make_config(world, "bad", root=tmp_path / "runs")
    del config["models"]["teachers"]["code"]
    return config, "domain 'code' has no teacher"


def teacher_with_other_vocabulary(world, tmp_path):
    odd = tmp_path / "odd-teacher"
    shutil.copytree(world.models["teacher_code"], odd)
    tokenizer = build_tokenizer()
    tokenizer.add_tokens(["<|odd|>"])
    tokenizer.save_pretrained(str(odd))
    config = make_config(world, "bad", root=tmp_path / "runs", **{"models.teachers.code": str(odd)})
    return config, "different tokenizer vocabulary than the student"


def _lam(value):
    def case(world, tmp_path):
        return make_config(world, "bad", root=tmp_path / "runs", **{"update.reward_scale": value}), \
            "reward_scale (lam) must be a finite number > 0"
    return case


def missing_student(world, tmp_path):
    return make_config(world, "bad", root=tmp_path / "runs", **{"models.student": str(tmp_path / "nowhere")}), \
        f"models.student path {tmp_path / 'nowhere'} does not exist"


def teacher_without_weights(world, tmp_path):
    hollow = tmp_path / "hollow"
    shutil.copytree(world.models["teacher_math"], hollow)
    (hollow / "model.safetensors").unlink()
    return make_config(world, "bad", root=tmp_path / "runs", **{"models.teachers.math": str(hollow)}), \
        "models.teachers.math path"


def missing_dataset(world, tmp_path):
    return _with_train(world, tmp_path, str(tmp_path / "absent.jsonl")), "absent.jsonl does not exist"


def no_train_dataset(world, tmp_path):
    return make_config(world, "bad", root=tmp_path / "runs", **{"data.train": []}), "data.train"


def bad_yaml(world, tmp_path):
    return "run_id: [unclosed\nmodels: {", "is not valid YAML"


def not_a_mapping(world, tmp_path):
    return "- just\n- a list\n", "must be a mapping of keys to values, got list"


def unknown_key(world, tmp_path):
    config = make_config(world, "bad", root=tmp_path / "runs")
    config["update"]["learning_rate"] = 0.1
    return config, "update.learning_rate: unknown key"


def unknown_top_level_key(world, tmp_path):
    return {**make_config(world, "bad", root=tmp_path / "runs"), "iteratons": 3}, "iteratons: unknown key"


BAD_INPUTS: dict[str, Callable] = {
    "empty prompt": empty_prompt, "prompt longer than the context": prompt_longer_than_context,
    "missing column (jsonl)": missing_column_jsonl, "missing column (verl parquet)": missing_column_parquet,
    "wrong type (jsonl prompt)": wrong_type_jsonl, "wrong type (parquet reward_model)": wrong_type_parquet,
    "wrong type (message content)": wrong_type_messages, "domain without a teacher": domain_without_teacher,
    "teacher with another vocabulary": teacher_with_other_vocabulary, "lam = 0": _lam(0.0),
    "lam < 0": _lam(-1.5), "lam = NaN": _lam(float("nan")), "lam = inf": _lam(float("inf")),
    "student path missing": missing_student, "teacher without weights": teacher_without_weights,
    "prompt dataset missing": missing_dataset, "no train dataset": no_train_dataset, "bad YAML": bad_yaml,
    "config not a mapping": not_a_mapping, "unknown key": unknown_key, "unknown top-level key": unknown_top_level_key,
}


@pytest.fixture(params=list(BAD_INPUTS))
def bad_input(request, tiny_world, tmp_path) -> tuple[Path, str]:
    config, fragment = BAD_INPUTS[request.param](tiny_world, tmp_path)
    return _write_config(tmp_path, config), fragment


def _written(tmp_path: Path) -> list[Path]:
    return sorted((tmp_path / "runs").rglob("*")) if (tmp_path / "runs").exists() else []


def test_gopd_run_refuses_with_one_line_and_exit_code_2(bad_input, tmp_path, monkeypatch, capsys):
    config_path, fragment = bad_input
    monkeypatch.setattr(sys, "argv", ["gopd", "run", str(config_path)])
    with pytest.raises(SystemExit) as exited:
        main()
    out = capsys.readouterr().out
    assert exited.value.code == 2, out
    lines = out.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error ("), out
    assert fragment in lines[0]
    assert _written(tmp_path) == []  # not even a run directory


def test_the_flow_refuses_before_writing(bad_input, tmp_path):
    config_path, fragment = bad_input
    with pytest.raises((ValueError, LookupError, OSError)) as refused:
        prepare_run(load_config(config_path))
    assert fragment in str(refused.value)
    assert _written(tmp_path) == []


def test_a_mid_run_problem_through_the_distill_flow_writes_nothing(tiny_world, prefect_api_url, tmp_path):
    config, fragment = domain_without_teacher(tiny_world, tmp_path)
    with pytest.raises(ValueError, match=fragment):
        flows.distill.distill(config=config)
    assert list((tmp_path / "runs").rglob("*.parquet")) == []
    assert not (tmp_path / "runs" / "bad" / "run_config.json").exists()  # the run id is not poisoned


def test_the_installed_entry_point(tiny_world, tmp_path):
    config, fragment = teacher_with_other_vocabulary(tiny_world, tmp_path)
    config_path = _write_config(tmp_path, config)
    result = subprocess.run([sys.executable, "-c", "from gopd_core.cli import main; main()", "run", str(config_path)],
                            cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 2, result.stdout + result.stderr
    assert result.stdout.count("\n") == 1 and "VocabularyMismatchError" in result.stdout
    assert fragment in result.stdout and "Traceback" not in result.stdout + result.stderr
    assert _written(tmp_path) == []
