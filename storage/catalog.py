"""DuckDB views over a run directory (or a root holding many runs), and read-only SQL.

Views: prompts, rollouts, scores, updates, evals, and token_advantages, which recomputes G-OPD
advantages in SQL for every stored reference score set:

    advantage = lam * (teacher - reference) - (student - reference)      (lam = teacher - student at 1)

lam is the session variable `reward_scale` (default 1): `SET VARIABLE reward_scale = 1.5`.
The file list is fixed when the catalog opens, so a query sees a consistent snapshot of complete
shards even while a flow appends (writers rename whole files into place).
"""

from __future__ import annotations

from pathlib import Path

import duckdb

from storage.parquet import list_shards
from storage.schemas import TABLES

TOKEN_ADVANTAGES_SQL = """
CREATE VIEW token_advantages AS
WITH student AS (
    SELECT rollout_id, model_hash AS student_hash, logprobs FROM scores WHERE role = 'student'
), teacher AS (
    SELECT rollout_id, domain AS teacher_domain, role AS teacher_role, model_id AS teacher_model,
           model_hash AS teacher_hash, logprobs FROM scores WHERE role IN ('teacher', 'context-teacher')
), reference AS (
    SELECT rollout_id, role AS reference_role, model_id AS reference_model, model_hash AS reference_hash,
           logprobs FROM scores WHERE role IN ('reference', 'teacher-base')
), joined AS (
    SELECT r.run_id, r.iteration, r.rollout_id, r.domain, t.teacher_role, t.teacher_model, t.teacher_hash,
           s.student_hash, ref.reference_role, ref.reference_model, ref.reference_hash,
           s.logprobs AS s_lp, t.logprobs AS t_lp, ref.logprobs AS r_lp
    FROM rollouts r
    JOIN student s ON s.rollout_id = r.rollout_id
    JOIN teacher t ON t.rollout_id = r.rollout_id AND (t.teacher_domain IS NULL OR t.teacher_domain = r.domain)
    LEFT JOIN reference ref ON ref.rollout_id = r.rollout_id
), tokens AS (
    SELECT * EXCLUDE (s_lp, t_lp, r_lp),
           unnest(range(len(s_lp))) AS token_index,
           unnest(s_lp) AS student_logprob,
           unnest(t_lp) AS teacher_logprob,
           unnest(coalesce(r_lp, list_resize(CAST([] AS FLOAT[]), len(s_lp)))) AS reference_logprob
    FROM joined
)
SELECT *,
       CAST(coalesce(getvariable('reward_scale'), 1.0) AS DOUBLE) AS reward_scale,
       CASE WHEN CAST(coalesce(getvariable('reward_scale'), 1.0) AS DOUBLE) = 1.0
            THEN CAST(teacher_logprob AS DOUBLE) - CAST(student_logprob AS DOUBLE)
            ELSE CAST(coalesce(getvariable('reward_scale'), 1.0) AS DOUBLE)
                     * (CAST(teacher_logprob AS DOUBLE) - CAST(reference_logprob AS DOUBLE))
                 - (CAST(student_logprob AS DOUBLE) - CAST(reference_logprob AS DOUBLE))
       END AS advantage
FROM tokens
"""


class ReadOnlyQueryError(ValueError):
    """A statement given to `gopd sql` would write, attach, copy out, or load code."""


def _empty_select(table: str) -> str:
    columns = ", ".join(
        f"CAST(NULL AS {_duck_type(field.type)}) AS {field.name}" for field in TABLES[table]
    )
    return f"SELECT {columns} WHERE false"


def _duck_type(arrow_type) -> str:
    import pyarrow as pa

    if pa.types.is_list(arrow_type):
        return f"{_duck_type(arrow_type.value_type)}[]"
    if pa.types.is_struct(arrow_type):
        return "STRUCT(" + ", ".join(f"{f.name} {_duck_type(f.type)}" for f in arrow_type) + ")"
    return {
        pa.string(): "VARCHAR", pa.int32(): "INTEGER", pa.int64(): "BIGINT",
        pa.float32(): "FLOAT", pa.float64(): "DOUBLE", pa.bool_(): "BOOLEAN",
    }[arrow_type]


def table_shards(path: Path, table: str) -> list[Path]:
    """Shards of `table` anywhere under `path` (a run directory or a root of runs)."""
    path = Path(path)
    if (path / table).is_dir():
        return list_shards(path / table)
    return [p for run in sorted(path.iterdir()) if run.is_dir() and not run.name.startswith((".", "_"))
            for p in list_shards(run / table)]


def open_catalog(
    path: str | Path, reward_scale: float = 1.0, read_only_sandbox: bool = True
) -> duckdb.DuckDBPyConnection:
    """An in-memory DuckDB connection with views over every table stored under `path`.

    With `read_only_sandbox` the connection may read only files under `path` and its configuration
    is locked (no ATTACH, COPY TO, INSTALL/LOAD or other file access).
    """
    path = Path(path).resolve()
    if not path.is_dir():
        raise FileNotFoundError(f"no run directory at {path}")
    con = duckdb.connect(":memory:")
    for table in TABLES:
        shards = table_shards(path, table)
        if shards:
            files = ", ".join("'" + str(p).replace("'", "''") + "'" for p in shards)
            source = f"SELECT * FROM read_parquet([{files}], union_by_name = true, hive_partitioning = false)"
        else:
            source = _empty_select(table)
        con.execute(f"CREATE VIEW {table} AS {source}")
    con.execute(TOKEN_ADVANTAGES_SQL)
    con.execute(f"SET VARIABLE reward_scale = {float(reward_scale)!r}")
    if read_only_sandbox:
        allowed = str(path).replace("'", "''")
        con.execute(f"SET allowed_directories = ['{allowed}']")
        con.execute("SET enable_external_access = false")
        con.execute("SET autoinstall_known_extensions = false")
        con.execute("SET autoload_known_extensions = false")
        con.execute("SET lock_configuration = true")
    return con


ALLOWED_STATEMENTS = {"SELECT", "EXPLAIN"}


def check_read_only(query: str) -> None:
    """Refuse anything but SELECT statements and EXPLAINs of them, naming the offending statement.

    EXPLAIN ANALYZE runs the statement it explains (`EXPLAIN ANALYZE COPY ... TO` writes a file),
    so an EXPLAIN is judged by what it explains.
    """
    try:
        statements = duckdb.extract_statements(query)
    except duckdb.Error as err:
        raise ReadOnlyQueryError(f"cannot parse query: {err}") from err
    if not statements:
        raise ReadOnlyQueryError("empty query")
    for statement in statements:
        kind = statement.type.name
        if kind == "EXPLAIN":
            explained = _explained_kind(statement.query)
            kind = "EXPLAIN" if explained == "SELECT" else f"EXPLAIN {explained}"
        if kind not in ALLOWED_STATEMENTS:
            raise ReadOnlyQueryError(
                f"refused: `gopd sql` is read-only and this is a {kind} statement: {statement.query.strip()[:80]!r}"
            )


def _explained_kind(query: str) -> str:
    try:
        explained = duckdb.extract_statements(_explained(query))
    except duckdb.Error:
        return "(unparsable)"
    return explained[0].type.name if len(explained) == 1 else "(unparsable)"


def _explained(query: str) -> str:
    """The statement text after `EXPLAIN [ANALYZE] [(options)]` (comments skipped)."""
    spans = duckdb.tokenize(query)
    words = [(start, query[start: spans[i + 1][0] if i + 1 < len(spans) else len(query)].strip().lower())
             for i, (start, kind) in enumerate(spans) if kind != duckdb.token_type.comment]
    depth = 0
    for start, word in words[1:]:  # words[0] is EXPLAIN
        depth += (word == "(") - (word == ")")
        if depth == 0 and word not in ("analyze", ")"):
            return query[start:]
    return ""


def run_query(path: str | Path, query: str, reward_scale: float = 1.0) -> duckdb.DuckDBPyRelation:
    """Run a read-only query over the catalog of `path`; returns a relation (all statements run, last returned)."""
    check_read_only(query)
    con = open_catalog(path, reward_scale=reward_scale)
    statements = duckdb.extract_statements(query)
    for statement in statements[:-1]:
        con.execute(statement)
    return con.sql(statements[-1].query)
