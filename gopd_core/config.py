"""Typed run configuration (pydantic v2, frozen, unknown keys refused), loaded from YAML.

One `RunConfig` composes the stage configs; it is saved as JSON beside the run's data.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from gopd_core.models import ModelPathError, check_model_dir


class ConfigError(ValueError):
    """The run configuration file is unreadable or invalid."""


class _Frozen(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class ModelsConfig(_Frozen):
    """Which models play which role. Paths are local HF directories."""

    student: Path = Field(description="Initial student weights (also the default reference).")
    teachers: dict[str, Path] = Field(
        default_factory=dict,
        description="Domain -> teacher path. The key 'default' serves every domain without its own teacher.")
    reference: str = Field(
        "student-init",
        description="'student-init' (the student's initial weights), 'teacher-base' (reward correction), or a path.")
    teacher_base: Path | None = Field(None, description="The teacher's pre-RL base, for reference='teacher-base'.")
    teacher_context: Literal["none", "ground_truth"] = Field(
        "none", description="'ground_truth': context distillation, the teacher sees the reference solution.")

    @model_validator(mode="after")
    def _check_roles(self) -> ModelsConfig:
        if not self.teachers and self.teacher_context == "none":
            raise ValueError("models.teachers is empty: name at least one teacher (or set teacher_context)")
        if self.reference == "teacher-base" and self.teacher_base is None:
            raise ValueError("models.reference is 'teacher-base' but models.teacher_base is not set")
        return self

    def teacher_for(self, domain: str) -> Path:
        """The teacher of `domain` (context distillation: the initial student)."""
        if domain in self.teachers:
            return self.teachers[domain]
        if "default" in self.teachers:
            return self.teachers["default"]
        if self.teacher_context != "none" and not self.teachers:
            return self.student
        raise ConfigError(f"domain {domain!r} has no teacher: add it under models.teachers (have {sorted(self.teachers)})")

    def reference_path(self) -> Path:
        if self.reference == "student-init":
            return self.student
        if self.reference == "teacher-base":
            return self.teacher_base  # type: ignore[return-value]
        return Path(self.reference)

    def reference_role(self) -> str:
        return "teacher-base" if self.reference == "teacher-base" else "reference"


class SamplingConfig(_Frozen):
    temperature: float = Field(1.0, ge=0, description="Sampling temperature (0 = greedy).")
    top_p: float = Field(1.0, gt=0, le=1, description="Nucleus sampling mass.")
    max_new_tokens: int = Field(48, ge=1, le=32768, description="Response token budget.")
    n: int = Field(4, ge=1, le=256, description="Samples per prompt.")
    verify_rewards: bool = Field(
        True, description="Verify each rollout's answer (the rollouts' reward column). The G-OPD update does not "
                          "use it, so turning it off only loses the monitoring metric and saves sandbox time.")
    source: Literal["student", "teacher"] = Field(
        "student", description="Who samples the responses: the student (on-policy) or each domain's teacher "
                               "(off-policy; only with update.objective 'sft').")


class UpdateConfig(_Frozen):
    reward_scale: float = Field(1.0, description="lam: 1 = OPD, > 1 = ExOPD (reward extrapolation).")
    clip_low: float = Field(0.2, ge=0, lt=1)
    clip_high: float = Field(0.2, ge=0)
    is_threshold: float = Field(5.0, gt=0, description="Truncation of rollout/trainer importance weights.")
    aggregation: Literal["token-mean", "seq-mean-token-sum", "seq-mean-token-mean"] = "token-mean"
    objective: Literal["gopd", "sft"] = Field(
        "gopd", description="'gopd': the clipped lam-weighted policy gradient; 'sft': supervised fine-tuning on "
                            "the sampled tokens (the off-policy baseline, with sampling.source 'teacher').")
    lr: float = Field(1e-4, gt=0, description="AdamW learning rate.")
    weight_decay: float = Field(0.0, ge=0)
    warmup_steps: int = Field(0, ge=0, description="Linear LR warm-up, in optimizer steps.")
    max_grad_norm: float = Field(1.0, gt=0)
    minibatches: int = Field(1, ge=1, description="Optimizer steps per iteration (rollouts split into minibatches).")
    micro_token_budget: int = Field(4096, ge=64, description=(
        "Max tokens per micro-batch (gradient accumulation): all of them where rows are packed end to end "
        "(Llama-family models on the CPU), else rows x longest row."))
    precision: Literal["auto", "float32", "bfloat16"] = Field(
        "auto", description="Matmul precision of the update's forward and backward passes; weights and AdamW state "
                            "stay float32. 'auto': bfloat16 autocast where the device runs bf16 natively (a CUDA "
                            "GPU, a CPU with AVX512-BF16 or AMX), float32 elsewhere, or as GOPD_PRECISION says "
                            "('bfloat16' on a CPU without native bf16 is emulated, many times slower).")

    @field_validator("reward_scale")
    @classmethod
    def _positive_finite(cls, value: float) -> float:
        if not math.isfinite(value) or value <= 0:
            raise ValueError(f"update.reward_scale (lam) must be a finite number > 0, got {value}")
        return value


class DataConfig(_Frozen):
    train: list[Path] = Field(min_length=1,
                              description="Prompt datasets (Parquet in verl/gopd format, or JSONL) to sample from.")
    test: list[Path] = Field(default_factory=list, description="Held-out prompt datasets for evaluation.")
    prompts_per_iteration: int = Field(32, ge=1)
    eval_prompts: int = Field(64, ge=1, description="Max test prompts per dataset per evaluation.")


class EvalConfig(_Frozen):
    every: int = Field(1, ge=0, description="Evaluate every k iterations (0 = only before and after).")
    n_samples: int = Field(4, ge=1, description="Samples per test prompt (avg@n, pass@k).")
    k: int = Field(4, ge=1)
    temperature: float = Field(0.7, ge=0)


class RunConfig(_Frozen):
    run_id: str = Field(description="Name of the run directory under storage_root.")
    storage_root: Path = Field(Path("gopd_home/runs"), description="Where runs are stored.")
    iterations: int = Field(3, ge=1, le=100000)
    seed: int = 0
    backend: Literal["hf", "vllm"] = "hf"
    keep_engine: bool = Field(
        True, description="backend vllm, with resident_models > 0: one vLLM engine stays up for the whole run and "
                          "reloads each new checkpoint in place instead of starting again every stage; false "
                          "closes it after each stage, freeing its memory (on a GPU, its gpu_memory_utilization "
                          "share) for the update.")
    device: str = "cpu"
    score_token_budget: int = Field(8192, ge=64)
    score_chunk_rows: int = Field(256, ge=1)
    resident_models: int = Field(
        4, ge=0, description="Models the run keeps loaded between stages (student, teachers, reference), so no "
                             "stage reloads weights another stage already holds; 0 loads every model from disk "
                             "each time (least memory). Results are the same either way.")
    checkpoint_every: int = Field(
        1, ge=1, description="Write every k-th update's checkpoint (weights, AdamW state) to disk; with "
                             "resident_models > 0 the others stay in memory only, until the next update changes "
                             "them. The run's last checkpoint and every evaluated one are always written. A killed "
                             "run resumes from the last written checkpoint, redoing the updates after it from the "
                             "stored rollouts and scores. Results are the same for every k.")
    models: ModelsConfig
    sampling: SamplingConfig = SamplingConfig()
    update: UpdateConfig = UpdateConfig()
    data: DataConfig
    eval: EvalConfig = EvalConfig()

    @model_validator(mode="after")
    def _check_objective(self) -> RunConfig:
        if self.update.objective == "sft" and self.sampling.source != "teacher":
            raise ValueError("update.objective 'sft' trains on teacher samples: set sampling.source to 'teacher'")
        if self.sampling.source == "teacher" and self.update.objective != "sft":
            raise ValueError("sampling.source 'teacher' makes the rollouts off-policy, which the G-OPD update "
                             "does not support: set update.objective to 'sft' (or sampling.source to 'student')")
        if self.sampling.source == "teacher" and self.models.teacher_context != "none":
            raise ValueError("sampling.source 'teacher' needs teacher models, not a context teacher")
        return self

    def check_paths(self) -> None:
        """Every configured model and dataset must exist, named in the error if not."""
        named = {"models.student": self.models.student, "models.teacher_base": self.models.teacher_base}
        named.update({f"models.teachers.{d}": p for d, p in self.models.teachers.items()})
        if self.models.reference not in ("student-init", "teacher-base"):
            named["models.reference"] = Path(self.models.reference)
        for name, path in named.items():
            if path is not None:
                try:
                    check_model_dir(path, name)
                except ModelPathError as err:
                    raise ConfigError(str(err)) from err
        for path in [*self.data.train, *self.data.test]:
            if not Path(path).exists():
                raise ConfigError(f"data: prompt dataset {path} does not exist")


def _describe(err: ValidationError) -> str:
    parts = []
    for problem in err.errors():
        where = ".".join(str(p) for p in problem["loc"]) or "(top level)"
        message = "unknown key" if problem["type"] == "extra_forbidden" else problem["msg"]
        parts.append(f"{where}: {message}")
    return "; ".join(parts)


def parse_config(raw: dict, source: str = "config") -> RunConfig:
    try:
        return RunConfig.model_validate(raw)
    except ValidationError as err:
        raise ConfigError(f"{source}: {_describe(err)}") from None


def load_config(path: str | Path, overrides: dict | None = None) -> RunConfig:
    """Read and validate a YAML (or JSON) run config; relative paths resolve against the file's folder."""
    path = Path(path)
    try:
        raw = yaml.safe_load(path.read_text())
    except (OSError, UnicodeDecodeError) as err:
        raise ConfigError(f"cannot read config {path}: {err}") from None
    except yaml.YAMLError as err:
        raise ConfigError(f"config {path} is not valid YAML: {err}") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"config {path} must be a mapping of keys to values, got {type(raw).__name__}")
    for key, value in (overrides or {}).items():
        raw = set_dotted(raw, key, value)
    return parse_config(raw, source=str(path))


def set_dotted(raw: dict, dotted: str, value) -> dict:
    """Set `raw[a][b][c] = value` for dotted key 'a.b.c', creating missing levels; returns `raw`."""
    node = raw
    *parents, leaf = dotted.split(".")
    for parent in parents:
        node = node.setdefault(parent, {})
    node[leaf] = value
    return raw


def save_config(config: RunConfig, path: Path) -> None:
    from storage.layout import write_json_atomic

    write_json_atomic(path, json.loads(config.model_dump_json()))
