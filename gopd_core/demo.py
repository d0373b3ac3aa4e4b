"""The embedded default job: build the zoo if needed, then multi-teacher distillation of the student.

`gopd run` with no config runs this: the small student base is distilled from the zoo's math and
code teachers (G-OPD with the student's initial weights as reference) for a few iterations on the CPU.
"""

from __future__ import annotations

from pathlib import Path

from gopd_core.config import RunConfig, parse_config

DEFAULT_HOME = Path("gopd_home")


def ensure_zoo(zoo_dir: Path, preset: str = "default") -> Path:
    """Build the model zoo into `zoo_dir` unless a complete one is already there."""
    from gopd_core.zoo import build_zoo

    if not (zoo_dir / "manifest.json").exists():
        build_zoo(zoo_dir, preset=preset)
    return zoo_dir


def demo_config(home: Path = DEFAULT_HOME, run_id: str = "demo", reward_scale: float = 1.0) -> RunConfig:
    zoo = home / "zoo"
    return parse_config({
        "run_id": run_id,
        "storage_root": str(home / "runs"),
        "iterations": 4,
        "models": {
            "student": str(zoo / "student-base"),
            "teachers": {"math": str(zoo / "teacher-math"), "code": str(zoo / "teacher-code")},
        },
        "sampling": {"temperature": 1.0, "max_new_tokens": 48, "n": 4},
        "update": {"reward_scale": reward_scale, "lr": 2e-4, "minibatches": 4},
        "data": {
            "train": [str(zoo / "data" / "math" / "train.parquet"), str(zoo / "data" / "code" / "train.parquet")],
            "test": [str(zoo / "data" / "math" / "test.parquet"), str(zoo / "data" / "code" / "test.parquet")],
            "prompts_per_iteration": 64,
            "eval_prompts": 50,
        },
        "eval": {"every": 0, "n_samples": 4, "k": 4, "temperature": 0.7},
    }, source="embedded demo config")
