"""TRL side of `field_gkd.py`: on-policy reverse-KL GKD steps with TRL's `GKDTrainer`; prints one JSON line.

Runs inside `benchmarks/.venv-trl` (TRL is never installed in the project's environment). Usage:

    benchmarks/.venv-trl/bin/python benchmarks/field_gkd_trl.py SETTINGS_JSON

SETTINGS_JSON (written by `field_gkd.py`) names the student and teacher directories, the prompts
Parquet file, `batch`, `max_new_tokens`, `steps` (measured) plus one warm-up step, `lr`, `threads`,
`seed` and `output_dir`.

1. The dataset is the prompts' chat `messages` plus the ground truth as an assistant turn: TRL's
   `DataCollatorForChatML` takes `messages[:-1]` as the prompt; with `lmbda=1` the assistant turn is
   always replaced by a fresh student sample, so its content is never trained on.
2. `GKDConfig(lmbda=1.0, beta=1.0, temperature=1.0)`: every step samples from the student (top_k=0,
   top_p=1), and the loss is TRL's generalized JSD at beta=1, which TRL computes as
   `F.kl_div(teacher_log_probs, student_log_probs, log_target=True)` = KL(student || teacher), the
   reverse KL, over the full vocabulary at every response position.
3. Wall time (and process CPU time) per optimizer step is the time between consecutive `on_step_end`
   callbacks (the first step, from `on_train_begin`, is the warm-up and is reported apart). Peak
   memory is this process's `ru_maxrss`.
"""

from __future__ import annotations

import json
import os
import resource
import sys
import time
from pathlib import Path

os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")

import datasets  # noqa: E402
import pyarrow.parquet as pq  # noqa: E402
import torch  # noqa: E402
import transformers  # noqa: E402
import trl  # noqa: E402
from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback  # noqa: E402
from trl.experimental.gkd import GKDConfig, GKDTrainer  # noqa: E402

from gopd_core.allocator import loaded_allocator  # noqa: E402  (a pure module: reads /proc/self/maps)


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


class StepClock(TrainerCallback):
    """Seconds between consecutive optimizer steps; element 0 starts at `on_train_begin`."""

    def __init__(self) -> None:
        self.last = (0.0, 0.0)
        self.seconds: list[float] = []
        self.cpu_seconds: list[float] = []

    def on_train_begin(self, args, state, control, **kwargs):
        self.last = (time.perf_counter(), time.process_time())

    def on_step_end(self, args, state, control, **kwargs):
        now = (time.perf_counter(), time.process_time())
        self.seconds.append(now[0] - self.last[0])
        self.cpu_seconds.append(now[1] - self.last[1])
        self.last = now


class CountingGKDTrainer(GKDTrainer):
    """GKDTrainer that records how many response tokens each on-policy sample had (for the report only)."""

    response_tokens: list[int] = []
    generate_seconds: list[float] = []

    @staticmethod
    def generate_on_policy_outputs(model, inputs, generation_config):
        started = time.perf_counter()
        input_ids, attention_mask, labels = GKDTrainer.generate_on_policy_outputs(model, inputs, generation_config)
        CountingGKDTrainer.generate_seconds.append(time.perf_counter() - started)
        CountingGKDTrainer.response_tokens.extend((labels != -100).sum(dim=1).tolist())
        return input_ids, attention_mask, labels


def training_rows(prompts_path: str) -> datasets.Dataset:
    rows = pq.read_table(prompts_path, columns=["messages", "ground_truth"]).to_pylist()
    return datasets.Dataset.from_list([
        {"messages": [*r["messages"], {"role": "assistant", "content": r["ground_truth"] or ""}]} for r in rows])


def main(settings: dict) -> dict:
    torch.set_num_threads(settings["threads"])
    rss_after_imports = peak_rss_mb()
    tokenizer = AutoTokenizer.from_pretrained(settings["student"])
    student = AutoModelForCausalLM.from_pretrained(settings["student"], dtype=torch.float32)
    teacher = AutoModelForCausalLM.from_pretrained(settings["teacher"], dtype=torch.float32)
    args = GKDConfig(
        output_dir=settings["output_dir"], lmbda=1.0, beta=1.0, temperature=1.0,
        max_new_tokens=settings["max_new_tokens"], per_device_train_batch_size=settings["batch"],
        gradient_accumulation_steps=1, max_steps=settings["steps"] + 1, learning_rate=settings["lr"],
        lr_scheduler_type="constant", warmup_steps=0, weight_decay=0.0, max_grad_norm=1.0, bf16=settings.get("bf16", False), fp16=False,
        use_cpu=True, seed=settings["seed"], save_strategy="no", report_to=[], logging_steps=1, disable_tqdm=True,
        dataloader_num_workers=0, gradient_checkpointing=False,
    )
    clock = StepClock()
    trainer = CountingGKDTrainer(model=student, teacher_model=teacher, args=args,
                                 train_dataset=training_rows(settings["prompts"]), processing_class=tokenizer,
                                 callbacks=[clock])
    trainer.train()
    warmup, *measured = clock.seconds
    tokens = CountingGKDTrainer.response_tokens
    return {
        "trl_version": trl.__version__, "transformers_version": transformers.__version__,
        "torch_version": torch.__version__, "threads": torch.get_num_threads(),
        "student_parameters": sum(p.numel() for p in student.parameters()),
        "teacher_parameters": sum(p.numel() for p in teacher.parameters()),
        "warmup_step_s": warmup, "step_s": measured, "step_cpu_s": clock.cpu_seconds[1:],
        "generate_s": CountingGKDTrainer.generate_seconds[1:],
        "mean_response_tokens": sum(tokens) / max(1, len(tokens)), "responses": len(tokens),
        "optimizer": type(trainer.optimizer.optimizer if hasattr(trainer.optimizer, "optimizer")
                          else trainer.optimizer).__name__,
        "optim": str(getattr(args.optim, "value", args.optim)),  # transformers' default: adamw_torch_fused
        "peak_rss_mb": peak_rss_mb(), "rss_after_imports_mb": rss_after_imports,
        "allocator": loaded_allocator(), "malloc_conf": os.environ.get("MALLOC_CONF"),
    }


if __name__ == "__main__":
    result = main(json.loads(Path(sys.argv[1]).read_text()))
    print("RESULT " + json.dumps(result), flush=True)
