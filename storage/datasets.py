"""Load prompt datasets into the `prompts` schema.

Accepted inputs:
- verl / G-OPD Parquet: `prompt` (chat messages), `data_source`, `reward_model.ground_truth`,
  `extra_info` (with `opd_teacher` naming the domain, optional `index`);
- gopd's own prompts Parquet (the `prompts` schema);
- JSONL with `prompt` (text or chat messages), `answer`, optional `domain` and `id`.
"""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from storage.parquet import CorruptShardError, SchemaMismatchError, conform
from storage.schemas import PROMPTS


class DatasetError(ValueError):
    """A prompt dataset is missing a column, has a wrong type, or an unusable row."""


DEFAULT_DOMAIN = "default"


def load_prompts(path: str | Path, default_domain: str = DEFAULT_DOMAIN) -> pa.Table:
    """Read a prompt dataset file into a validated `PROMPTS` table."""
    path = Path(path)
    if not path.exists():
        raise DatasetError(f"prompt dataset {path} does not exist")
    if path.suffix == ".parquet":
        rows = _parquet_rows(path, default_domain)
    elif path.suffix in (".jsonl", ".json"):
        rows = _jsonl_rows(path, default_domain)
    else:
        raise DatasetError(f"prompt dataset {path}: unsupported file type {path.suffix!r} (use .parquet or .jsonl)")
    if not rows:
        raise DatasetError(f"prompt dataset {path} has no rows")
    seen: set[str] = set()
    for row_number, row in enumerate(rows):
        if row["prompt_id"] in seen:
            raise DatasetError(f"prompt dataset {path}: duplicate prompt id {row['prompt_id']!r} at row {row_number}")
        seen.add(row["prompt_id"])
    try:
        return conform(rows, PROMPTS, what=f"prompt dataset {path}")
    except SchemaMismatchError as err:
        raise DatasetError(str(err)) from err


def _messages(value, path: Path, row: int, column: str) -> list[dict]:
    if isinstance(value, str):
        messages = [{"role": "user", "content": value}]
    elif isinstance(value, (list, tuple)) and all(isinstance(m, dict) for m in value):
        messages = [{"role": str(m.get("role", "")), "content": m.get("content")} for m in value]
    else:
        raise DatasetError(f"prompt dataset {path}: row {row} column {column!r} must be text or a list of "
                           f"{{role, content}} messages, got {type(value).__name__}")
    if not messages or any(not isinstance(m["content"], str) for m in messages):
        raise DatasetError(f"prompt dataset {path}: row {row} column {column!r} has a message without text content")
    if not any(m["content"].strip() for m in messages):
        raise DatasetError(f"prompt dataset {path}: row {row} has an empty prompt")
    return messages


def _require(columns: list[str], needed: list[str], path: Path) -> None:
    for column in needed:
        if column not in columns:
            raise DatasetError(f"prompt dataset {path} is missing required column {column!r} (has {columns})")


def _parquet_rows(path: Path, default_domain: str) -> list[dict]:
    try:
        table = pq.read_table(path)
    except (pa.ArrowInvalid, OSError) as err:
        raise CorruptShardError(f"cannot read Parquet file {path}: {err}") from err
    columns = table.column_names
    if "prompt_id" in columns and "messages" in columns:
        _require(columns, PROMPTS.names, path)
        records = table.select(PROMPTS.names).to_pylist()
        for row, record in enumerate(records):
            record["messages"] = _messages(record["messages"], path, row, "messages")
        return records
    _require(columns, ["prompt", "reward_model"], path)
    rows = []
    for row, record in enumerate(table.to_pylist()):
        reward_model = record.get("reward_model")
        if not isinstance(reward_model, dict) or "ground_truth" not in reward_model:
            raise DatasetError(f"prompt dataset {path}: row {row} column 'reward_model' lacks 'ground_truth'")
        extra = record.get("extra_info") or {}
        if not isinstance(extra, dict):
            raise DatasetError(f"prompt dataset {path}: row {row} column 'extra_info' must be a struct")
        domain = extra.get("opd_teacher") or record.get("data_source") or default_domain
        index = extra.get("index", row)
        rows.append({
            "prompt_id": f"{record.get('data_source') or path.stem}-{index}",
            "domain": str(domain),
            "messages": _messages(record["prompt"], path, row, "prompt"),
            "ground_truth": _as_text(reward_model["ground_truth"]),
            "extra": json.dumps({k: v for k, v in extra.items()}, default=str),
        })
    return rows


def _as_text(value) -> str | None:
    if value is None or isinstance(value, str):
        return value
    return json.dumps(value)


def _jsonl_rows(path: Path, default_domain: str) -> list[dict]:
    rows = []
    with open(path, encoding="utf-8") as lines:
        for row, line in enumerate(lines):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as err:
                raise DatasetError(f"prompt dataset {path}: line {row + 1} is not valid JSON: {err}") from err
            if not isinstance(record, dict):
                raise DatasetError(f"prompt dataset {path}: line {row + 1} is not a JSON object")
            for column in ("prompt", "answer"):
                if column not in record:
                    raise DatasetError(f"prompt dataset {path} is missing required column {column!r} at line {row + 1}")
            extra = {k: v for k, v in record.items() if k not in ("prompt", "answer", "domain", "id")}
            rows.append({
                "prompt_id": str(record.get("id", f"{path.stem}-{row}")),
                "domain": str(record.get("domain") or default_domain),
                "messages": _messages(record["prompt"], path, row, "prompt"),
                "ground_truth": _as_text(record["answer"]),
                "extra": json.dumps(extra, default=str),
            })
    return rows
