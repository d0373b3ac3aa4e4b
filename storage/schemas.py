"""Explicit pyarrow schemas of every stored table. Token-level arrays are list columns."""

from __future__ import annotations

import pyarrow as pa

MESSAGE = pa.struct([("role", pa.string()), ("content", pa.string())])

PROMPTS = pa.schema([
    pa.field("prompt_id", pa.string(), nullable=False),
    pa.field("domain", pa.string(), nullable=False),
    pa.field("messages", pa.list_(MESSAGE), nullable=False),
    pa.field("ground_truth", pa.string()),
    pa.field("extra", pa.string()),  # JSON object as text
])

ROLLOUTS = pa.schema([
    pa.field("run_id", pa.string(), nullable=False),
    pa.field("iteration", pa.int32(), nullable=False),
    pa.field("rollout_id", pa.string(), nullable=False),
    pa.field("prompt_id", pa.string(), nullable=False),
    pa.field("domain", pa.string(), nullable=False),
    pa.field("sample_index", pa.int32(), nullable=False),
    pa.field("checkpoint_id", pa.string(), nullable=False),
    pa.field("engine", pa.string(), nullable=False),
    pa.field("prompt_token_ids", pa.list_(pa.int32()), nullable=False),
    pa.field("response_token_ids", pa.list_(pa.int32()), nullable=False),
    pa.field("rollout_logprobs", pa.list_(pa.float32()), nullable=False),
    pa.field("prompt_text", pa.string()),
    pa.field("response_text", pa.string()),
    pa.field("finish_reason", pa.string()),  # "stop" (EOS) or "length"
    pa.field("reward", pa.float32()),  # verifier outcome, 1.0 correct / 0.0 wrong, null if unverified
])

SCORES = pa.schema([
    pa.field("run_id", pa.string(), nullable=False),
    pa.field("iteration", pa.int32(), nullable=False),
    pa.field("rollout_id", pa.string(), nullable=False),
    pa.field("role", pa.string(), nullable=False),  # teacher | reference | student | teacher-base | context-teacher
    pa.field("domain", pa.string()),  # the teacher's domain; null for roles that score every domain
    pa.field("model_id", pa.string(), nullable=False),  # path or name as configured
    pa.field("model_hash", pa.string(), nullable=False),  # content hash of weights (+ context mode)
    pa.field("logprobs", pa.list_(pa.float32()), nullable=False),  # one per response token
])

UPDATES = pa.schema([
    pa.field("run_id", pa.string(), nullable=False),
    pa.field("iteration", pa.int32(), nullable=False),
    pa.field("step", pa.int32(), nullable=False),
    pa.field("reward_scale", pa.float64()),
    pa.field("reference_role", pa.string()),
    pa.field("loss", pa.float64()),
    pa.field("clip_fraction", pa.float64()),
    pa.field("is_weight_mean", pa.float64()),
    pa.field("advantage_mean", pa.float64()),
    pa.field("approx_kl", pa.float64()),
    pa.field("grad_norm", pa.float64()),
    pa.field("lr", pa.float64()),
    pa.field("tokens", pa.int64()),
    pa.field("sequences", pa.int64()),
    pa.field("wall_s", pa.float64()),
])

EVALS = pa.schema([
    pa.field("run_id", pa.string(), nullable=False),
    pa.field("iteration", pa.int32()),
    pa.field("checkpoint_id", pa.string(), nullable=False),
    pa.field("benchmark", pa.string(), nullable=False),  # e.g. "math/test"
    pa.field("metric", pa.string(), nullable=False),  # e.g. "avg@4", "pass@4"
    pa.field("value", pa.float64(), nullable=False),
    pa.field("n_samples", pa.int32()),
])

TABLES: dict[str, pa.Schema] = {
    "prompts": PROMPTS,
    "rollouts": ROLLOUTS,
    "scores": SCORES,
    "updates": UPDATES,
    "evals": EVALS,
}
