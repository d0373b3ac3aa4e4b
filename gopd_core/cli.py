"""The `gopd` command line: run, rescore, eval, sql, report, doctor, allocator, zoo."""

from __future__ import annotations

import logging
import os
import shlex
from collections.abc import Callable
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


def _parse_overrides(pairs: list[str]) -> dict:
    import yaml

    overrides = {}
    for pair in pairs:
        if "=" not in pair:
            raise UserError(f"--set {pair!r}: use dotted.key=value, e.g. --set update.reward_scale=1.25")
        key, value = pair.split("=", 1)
        overrides[key] = yaml.safe_load(value)
    return overrides


@app.command()
def run(
    config: Path | None = typer.Argument(None, help="Run config (YAML). Omitted: the embedded demo (builds the zoo)."),
    set_: list[str] = typer.Option([], "--set", help="Override a config key: --set update.reward_scale=1.25"),
    home: Path = typer.Option(Path("gopd_home"), help="Where the demo keeps its zoo and runs."),
) -> None:
    """Run the `distill` flow: rollout -> score -> update -> evaluate, per iteration (resumes by run id)."""
    from flows.distill import distill
    from gopd_core.config import load_config, set_dotted
    from gopd_core.demo import demo_config, ensure_zoo
    from gopd_core.pipeline import check_run
    from gopd_core.report import before_after
    from storage.layout import RunLayout

    overrides = _parse_overrides(set_)
    if config is None:
        console.print(f"[bold]gopd demo[/bold]: zoo in {home / 'zoo'} (built if missing), run in {home / 'runs'}")
        ensure_zoo(home / "zoo")
        raw = demo_config(home).model_dump(mode="json")
        for key, value in overrides.items():
            set_dotted(raw, key, value)
        run_dir = distill(config=raw)
    else:
        check_run(load_config(config, overrides))  # refuse bad input before Prefect starts or anything is written
        run_dir = distill(config_path=str(config), overrides=overrides)
    layout = RunLayout(Path(run_dir))
    rows = before_after(layout)
    print_table(["benchmark", "metric", "before", "after", "after_updates"],
                [(r["benchmark"], r["metric"], r.get("before"), r.get("after"), r.get("after_updates")) for r in rows],
                title="test accuracy before / after distillation")
    console.print(f"data: {layout.run_dir}\nreport: {layout.report_dir() / 'report.md'}\n"
                  f"query: gopd sql --run {layout.run_dir} \"SELECT * FROM updates\"")


@app.command()
def rescore(
    run_dir: Path = typer.Argument(..., help="An existing run directory."),
    reference: Path | None = typer.Option(None, help="Score the rollouts with this model as the reference."),
    teacher_base: Path | None = typer.Option(None, "--teacher-base", help="... as the teacher's pre-RL base."),
    teacher: Path | None = typer.Option(None, help="... as a (new) teacher."),
    domain: str | None = typer.Option(None, help="With --teacher: only this domain's rollouts."),
) -> None:
    """Re-score stored rollouts with another reference or teacher; nothing is sampled again."""
    from flows.rescore import rescore as rescore_flow

    chosen = [(role, path) for role, path in (("reference", reference), ("teacher-base", teacher_base),
                                              ("teacher", teacher)) if path is not None]
    if len(chosen) != 1:
        raise UserError("give exactly one of --reference, --teacher-base, --teacher")
    role, path = chosen[0]
    written = rescore_flow(run_dir=str(run_dir), model=str(path), role=role, domain=domain)
    console.print(f"scored {len(written)} iteration(s) of {run_dir} as {role} with {path}")
    console.print(f"compare: gopd sql --run {run_dir} --lam 1.5 \"SELECT reference_role, reference_model, "
                  "avg(advantage) FROM token_advantages GROUP BY ALL\"")


@app.command(name="eval")
def eval_(
    checkpoints: list[Path] = typer.Argument(..., help="Checkpoint directories to evaluate."),
    run_dir: Path = typer.Option(Path("gopd_home/runs/eval"), "--run", help="Run directory for the evals table."),
    data: list[Path] = typer.Option([], help="Test prompt datasets (default: the run's test split)."),
    n_samples: int = typer.Option(4, help="Samples per prompt (avg@n)."),
    k: int = typer.Option(4, help="pass@k."),
    temperature: float = typer.Option(0.7),
    backend: str = typer.Option("hf", help="hf or vllm."),
) -> None:
    """Evaluate checkpoints on test prompts (avg@n, pass@k), written to the run's evals table."""
    from flows.evaluate import evaluate
    from storage.catalog import run_query

    if not data and not (run_dir / "prompts" / "split=test").exists():
        raise UserError(f"{run_dir} has no test prompts: pass --data FILE")
    evaluate(checkpoints=[str(c) for c in checkpoints], run_dir=str(run_dir), test_data=[str(d) for d in data],
             n_samples=n_samples, k=k, temperature=temperature, backend=backend)
    result = run_query(run_dir, "SELECT checkpoint_id, benchmark, metric, value FROM evals ORDER BY ALL")
    print_table(["checkpoint_id", "benchmark", "metric", "value"], result.fetchall(), title="evaluation")


@app.command()
def report(run_dir: Path = typer.Argument(..., help="A run directory.")) -> None:
    """Write the run's plots (PNG) and Markdown summary; print the summary table."""
    from gopd_core.report import before_after, write_report
    from storage.layout import RunLayout

    layout = RunLayout(run_dir)
    path = write_report(layout)
    rows = before_after(layout)
    print_table(["benchmark", "metric", "before", "after"],
                [(r["benchmark"], r["metric"], r.get("before"), r.get("after")) for r in rows])
    console.print(f"report: {path}\nplots: {path.parent / 'metrics.png'}")


@zoo_app.command("build")
def zoo_build(
    directory: Path = typer.Argument(Path("gopd_home/zoo"), help="Where to build the zoo."),
    preset: str = typer.Option("default", help="default | tiny | perf"),
    seed: int = typer.Option(0),
) -> None:
    """Build the local model zoo (tokenizer, student base, domain teachers, strong teacher + base) and tasks."""
    from gopd_core.zoo import build_zoo

    manifest = build_zoo(directory, preset=preset, seed=seed)
    console.print(f"zoo ready in {directory}: {', '.join(sorted(manifest.get('models', {})))}")


@app.command()
def doctor(
    run_dir: Path = typer.Argument(..., help="A run directory."),
    fix: bool = typer.Option(False, "--quarantine", help="Move broken shards to _quarantine/ (good ones untouched)."),
) -> None:
    """List every problem in a run directory: unreadable shards, checkpoints without weights, stale temporaries."""
    from storage.doctor import diagnose, quarantine

    problems = diagnose(run_dir)
    if not problems:
        console.print(f"{run_dir}: no problems found")
        return
    console.print(f"{len(problems)} problem(s) in {run_dir}:")
    for problem in problems:  # one line each, never truncated: the path is what the user acts on
        console.print(f"{problem.kind} {problem.path}: {problem.detail}", soft_wrap=True, markup=False,
                      highlight=False)
    if fix:
        moved = quarantine(run_dir, problems)
        console.print(f"quarantined {len(moved)} item(s) under {run_dir / '_quarantine'}; rerun the flow to rebuild them")
    else:
        raise typer.Exit(1)


@app.command()
def allocator(
    shell: bool = typer.Option(False, "--shell", help="Print `export` lines for processes started outside gopd."),
) -> None:
    """Which malloc this process runs on, and how other processes (a Prefect worker) get the same one."""
    from gopd_core.allocator import ALLOCATOR_VARIABLE, loaded_allocator, preload_environment

    variables = preload_environment()
    if shell:
        for name, value in variables.items():
            print(f"export {name}={shlex.quote(value)}")
        return
    console.print(f"loaded: {loaded_allocator()}")
    console.print(f"{ALLOCATOR_VARIABLE}={os.environ.get(ALLOCATOR_VARIABLE, 'auto')}")
    for name, value in variables.items() or [("preload", "none (the system allocator)")]:
        console.print(f"{name}={value}", markup=False, highlight=False)


def main() -> None:
    """Run the command line in this process (what in-process callers and tests use)."""
    _run(app)


def program() -> None:
    """The `gopd` program: first re-executes itself on the preferred malloc (`gopd_core.allocator`), then `main`.

    Only a process's entry point may re-execute it, so in-process callers use `main`.
    """
    from gopd_core.allocator import reexec_with_preferred_allocator

    # before torch loads: the allocator is picked at process start
    _run(reexec_with_preferred_allocator, app)


def _run(*steps: Callable[[], object]) -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        for step in steps:
            step()
    except (UserError, ValueError, LookupError, FileNotFoundError, RuntimeError, OSError) as err:
        # Our errors say what, where and how to fix: one line, no traceback (GOPD_DEBUG=1 shows it).
        if os.environ.get("GOPD_DEBUG"):
            raise
        message = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        console.print(f"[red]error ({type(err).__name__}):[/red] {message}", soft_wrap=True)
        raise SystemExit(2) from None


if __name__ == "__main__":
    program()
