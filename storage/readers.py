"""Typed reads of one run's tables."""

from __future__ import annotations

import numpy as np
import pyarrow as pa

from storage.layout import RunLayout
from storage.parquet import list_shards, read_shards
from storage.schemas import EVALS, PROMPTS, ROLLOUTS, SCORES, UPDATES


class MissingScoresError(LookupError):
    """An update needs scores that the scoring stage did not store."""


def rollout_shards(layout: RunLayout, iteration: int) -> list:
    return list_shards(layout.rollouts_dir(iteration))


def read_rollouts(layout: RunLayout, iteration: int, columns: list[str] | None = None) -> pa.Table:
    return read_shards(rollout_shards(layout, iteration), ROLLOUTS, columns)


def read_prompts(layout: RunLayout, split: str) -> pa.Table:
    return read_shards(list_shards(layout.prompts_path(split).parent), PROMPTS)


def read_score_map(layout: RunLayout, iteration: int, role: str, model_hash: str) -> dict[str, np.ndarray]:
    """rollout_id -> float32 log-probs, for one stored score set."""
    shards = list_shards(layout.scores_dir(iteration, role, model_hash))
    if not shards:
        raise MissingScoresError(
            f"no {role} scores by model {model_hash} for iteration {iteration} in {layout.run_dir}")
    table = read_shards(shards, SCORES, ["rollout_id", "logprobs"])
    ids = table.column("rollout_id").to_pylist()
    values = table.column("logprobs").to_pylist()
    return {rollout_id: np.asarray(v, dtype=np.float32) for rollout_id, v in zip(ids, values)}


def read_updates(layout: RunLayout) -> pa.Table:
    return read_shards(list_shards(layout.table_dir("updates")), UPDATES)


def read_evals(layout: RunLayout) -> pa.Table:
    return read_shards(list_shards(layout.table_dir("evals")), EVALS)
