"""Atomic, idempotent Parquet shard writes and validated reads.

A shard is written to a hidden temporary file in its final directory, fsynced, then renamed into
place: readers see either no file or the whole file. Writing the same shard path again replaces it,
so a rerun never duplicates rows. Every data page carries a CRC that readers verify, so flipped
bytes on disk raise `CorruptShardError` instead of returning wrong numbers.
"""

from __future__ import annotations

import contextlib
import os
import uuid
from collections.abc import Iterator, Sequence
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq


class SchemaMismatchError(ValueError):
    """Rows do not fit a table's schema (missing column, wrong type, null in a required column)."""


class CorruptShardError(IOError):
    """A stored Parquet shard cannot be read (truncated, corrupted, or not Parquet)."""


def conform(rows: pa.Table | Sequence[dict], schema: pa.Schema, what: str) -> pa.Table:
    """Return `rows` as a table with exactly `schema`, or raise naming the column and row at fault."""
    if not isinstance(rows, pa.Table):
        try:
            rows = pa.Table.from_pylist(list(rows), schema=schema)
        except (pa.ArrowInvalid, pa.ArrowTypeError, TypeError, UnicodeEncodeError) as err:  # e.g. a lone surrogate
            raise SchemaMismatchError(f"{what}: rows do not fit the schema: {err}") from err
    missing = [name for name in schema.names if name not in rows.column_names]
    if missing:
        raise SchemaMismatchError(f"{what}: missing column(s) {missing}")
    rows = rows.select(schema.names)
    for field in schema:
        column = rows.column(field.name)
        if not field.nullable and column.null_count:
            row = next(i for i, v in enumerate(column.is_null().to_pylist()) if v)
            raise SchemaMismatchError(f"{what}: column {field.name!r} is null at row {row}, but it is required")
    try:
        return rows.cast(schema, safe=True)
    except (pa.ArrowInvalid, pa.ArrowTypeError, pa.ArrowNotImplementedError) as err:
        raise SchemaMismatchError(f"{what}: a column has the wrong type: {err}") from err


def write_shard(rows: pa.Table | Sequence[dict], path: str | Path, schema: pa.Schema) -> Path:
    """Atomically write `rows` (validated against `schema`) to `path`, replacing any previous shard."""
    path = Path(path)
    table = conform(rows, schema, what=str(path))
    with atomic_file(path) as tmp, open(tmp, "wb") as sink:
        pq.write_table(table, sink, compression="zstd", write_page_checksum=True)
        sink.flush()
        os.fsync(sink.fileno())
    return path


@contextlib.contextmanager
def atomic_file(path: Path) -> Iterator[Path]:
    """Yield a hidden temporary path beside `path`; once written, it replaces `path` in one rename.

    A crash leaves only the hidden temporary (`.NAME.tmp-*`, which readers skip and `storage.doctor`
    lists), never a half-written `path`.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.parent / f".{path.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    try:
        yield tmp
        os.replace(tmp, path)
        fsync_dir(path.parent)
    finally:
        tmp.unlink(missing_ok=True)


def fsync_dir(directory: Path) -> None:
    """Make a rename in `directory` durable."""
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def list_shards(directory: str | Path) -> list[Path]:
    """All visible shards under `directory`, sorted; hidden temporaries and quarantined files excluded."""
    directory = Path(directory)
    if not directory.exists():
        return []
    return sorted(
        p for p in directory.rglob("*.parquet")
        if not any(part.startswith((".", "_")) for part in p.relative_to(directory).parts)
    )


def open_shard(path: Path) -> pq.ParquetFile:
    """Open a shard, turning any read failure into `CorruptShardError` naming the file."""
    try:
        return pq.ParquetFile(path, page_checksum_verification=True)
    except (pa.ArrowInvalid, OSError) as err:
        raise CorruptShardError(f"cannot read Parquet shard {path}: {err}") from err


def read_shards(paths: Sequence[str | Path], schema: pa.Schema, columns: Sequence[str] | None = None) -> pa.Table:
    """Read and concatenate shards; every shard must hold `schema`'s columns."""
    tables = [batch_table for batch_table in (_read_one(Path(p), schema, columns) for p in paths)]
    if not tables:
        empty = schema if columns is None else pa.schema([schema.field(c) for c in columns])
        return empty.empty_table()
    return pa.concat_tables(tables)


def _read_one(path: Path, schema: pa.Schema, columns: Sequence[str] | None) -> pa.Table:
    shard = open_shard(path)
    missing = [c for c in (columns or schema.names) if c not in shard.schema_arrow.names]
    if missing:
        raise SchemaMismatchError(f"shard {path} lacks column(s) {missing}")
    try:
        table = shard.read(columns=list(columns) if columns else schema.names)
    except (pa.ArrowInvalid, OSError) as err:
        raise CorruptShardError(f"cannot read Parquet shard {path}: {err}") from err
    wanted = schema if columns is None else pa.schema([schema.field(c) for c in columns])
    return table.cast(wanted)


def iter_batches(
    paths: Sequence[str | Path], schema: pa.Schema, batch_rows: int, columns: Sequence[str] | None = None
) -> Iterator[pa.Table]:
    """Stream rows from shards in tables of at most `batch_rows` rows (bounded memory)."""
    wanted = schema if columns is None else pa.schema([schema.field(c) for c in columns])
    for path in paths:
        shard = open_shard(Path(path))
        try:
            for batch in shard.iter_batches(batch_size=batch_rows, columns=wanted.names):
                yield pa.Table.from_batches([batch]).cast(wanted)
        except (pa.ArrowInvalid, OSError) as err:
            raise CorruptShardError(f"cannot read Parquet shard {path}: {err}") from err
