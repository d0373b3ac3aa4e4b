"""The `gopd` command line: run, rescore, eval, sql, report, doctor, zoo."""

from __future__ import annotations

import logging
from pathlib import Path

import typer
from rich.console import Console
from rich.table import Table

app = typer.Typer(help="Generalized On-Policy Distillation (G-OPD / ExOPD) pipeline.", no_args_is_help=True,
                  pretty_exceptions_enable=False)
zoo_app = typer.Typer(help="Build the local model zoo and synthetic tasks.", no_args_is_help=True)
app.add_typer(zoo_app, name="zoo")
console = Console()


class UserError(Exception):
    """Errors whose message is the whole story: printed on one line, exit code 2."""


def print_table(columns: list[str], rows: list[tuple], title: str | None = None, limit: int = 200) -> None:
    table = Table(title=title, show_lines=False)
    for column in columns:
        table.add_column(column)
    for row in rows[:limit]:
        table.add_row(*[_cell(v) for v in row])
    console.print(table)
    if len(rows) > limit:
        console.print(f"... {len(rows) - limit} more rows (use --out to write them all)")


def _cell(value) -> str:
    if isinstance(value, float):
        return f"{value:.6g}"
    if isinstance(value, list) and len(value) > 8:
        return "[" + ", ".join(_cell(v) for v in value[:8]) + f", ... ({len(value)} items)]"
    return str(value)


@app.command()
def sql(
    query: str = typer.Argument(..., help="A read-only SQL query (SELECT/EXPLAIN) over the run's views."),
    run: Path = typer.Option(Path("."), "--run", "-r", help="Run directory (or a root holding runs)."),
    reward_scale: float = typer.Option(1.0, "--reward-scale", "--lam", help="lam used by the token_advantages view."),
    out: Path | None = typer.Option(None, "--out", "-o", help="Write all rows to this .csv or .parquet file."),
) -> None:
    """Query everything stored in a run with DuckDB (views: prompts, rollouts, scores, updates, evals, token_advantages)."""
    from storage.catalog import run_query

    try:
        result = run_query(run, query, reward_scale=reward_scale).arrow()
    except Exception as err:  # duckdb errors and our refusals are both user-facing here
        raise UserError(str(err).splitlines()[0]) from err
    if hasattr(result, "read_all"):
        result = result.read_all()
    if out is not None:
        _write_table(result, out)
        console.print(f"wrote {result.num_rows} rows to {out}")
        return
    print_table(result.column_names, [tuple(r.values()) for r in result.to_pylist()])


def _write_table(table, out: Path) -> None:
    import pyarrow.csv as pacsv
    import pyarrow.parquet as pq

    out.parent.mkdir(parents=True, exist_ok=True)
    if out.suffix == ".csv":
        pacsv.write_csv(table, out)
    elif out.suffix == ".parquet":
        pq.write_table(table, out)
    else:
        raise UserError(f"--out {out}: use a .csv or .parquet file name")


def main() -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        app()
    except UserError as err:
        console.print(f"[red]error:[/red] {err}")
        raise SystemExit(2) from None
