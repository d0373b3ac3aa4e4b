"""Everything gopd stores: Parquet schemas, atomic writers, readers, and the DuckDB catalog."""

from storage.layout import RunLayout
from storage.parquet import CorruptShardError, SchemaMismatchError, read_shards, write_shard

__all__ = ["RunLayout", "CorruptShardError", "SchemaMismatchError", "read_shards", "write_shard"]
