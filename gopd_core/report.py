"""Run reports: per-iteration metrics from the store, PNG plots and a Markdown summary."""

from __future__ import annotations

from pathlib import Path

from storage.catalog import open_catalog
from storage.layout import RunLayout

ITERATION_METRICS_SQL = """
WITH r AS (SELECT iteration, avg(reward) AS reward, count(*) AS rollouts,
                  avg(len(response_token_ids)) AS response_tokens FROM rollouts GROUP BY iteration),
u AS (SELECT iteration, avg(advantage_mean) AS advantage, avg(approx_kl) AS kl_to_reference,
             avg(clip_fraction) AS clip_fraction, avg(loss) AS loss, CAST(sum(tokens) AS BIGINT) AS tokens,
             sum(wall_s) AS update_s FROM updates GROUP BY iteration)
SELECT r.iteration, r.rollouts, r.reward, r.response_tokens, u.advantage, u.kl_to_reference,
       u.clip_fraction, u.loss, u.tokens, u.update_s
FROM r LEFT JOIN u USING (iteration) ORDER BY r.iteration
"""

ACCURACY_SQL = """
SELECT coalesce(iteration, 0) AS updates, benchmark, metric, avg(value) AS value
FROM evals GROUP BY ALL ORDER BY updates, benchmark, metric
"""


def _query(con, sql: str) -> list[dict]:
    return con.sql(sql).arrow().read_all().to_pylist()


def iteration_metrics(layout: RunLayout) -> list[dict]:
    return _query(open_catalog(layout.run_dir), ITERATION_METRICS_SQL)


def accuracy_table(layout: RunLayout) -> list[dict]:
    return _query(open_catalog(layout.run_dir), ACCURACY_SQL)


def before_after(layout: RunLayout, accuracy: list[dict] | None = None) -> list[dict]:
    """Per benchmark/metric: value before training (0 updates) and after the last evaluation.

    accuracy: rows of `accuracy_table(layout)` if the caller already has them.
    """
    table: dict[tuple, dict] = {}
    for row in accuracy if accuracy is not None else accuracy_table(layout):
        entry = table.setdefault((row["benchmark"], row["metric"]), {"benchmark": row["benchmark"],
                                                                     "metric": row["metric"]})
        entry.setdefault("before", row["value"]) if row["updates"] == 0 else None
        entry["after"] = row["value"]
        entry["after_updates"] = row["updates"]
    return list(table.values())


def plot_metrics(layout: RunLayout, metrics: list[dict], accuracy: list[dict]) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [("reward", "rollout reward"), ("advantage", "mean advantage"),
              ("kl_to_reference", "KL to reference"), ("clip_fraction", "clip fraction")]
    figure, axes = plt.subplots(1, len(panels) + 1, figsize=(4 * (len(panels) + 1), 3.2))
    iterations = [m["iteration"] for m in metrics]
    for axis, (key, title) in zip(axes, panels):
        axis.plot(iterations, [m[key] if m[key] is not None else float("nan") for m in metrics], marker="o")
        axis.set_title(title)
        axis.set_xlabel("iteration")
    accuracy_axis = axes[-1]
    for benchmark in sorted({a["benchmark"] for a in accuracy}):
        points = [a for a in accuracy if a["benchmark"] == benchmark and a["metric"].startswith("avg@")]
        accuracy_axis.plot([p["updates"] for p in points], [p["value"] for p in points], marker="o", label=benchmark)
    accuracy_axis.set_title("test accuracy (avg@n)")
    accuracy_axis.set_xlabel("updates")
    if accuracy:
        accuracy_axis.legend(fontsize=7)
    figure.tight_layout()
    path = layout.report_dir() / "metrics.png"
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(".metrics.tmp.png")
    figure.savefig(tmp, dpi=90)
    plt.close(figure)
    tmp.replace(path)
    return path


def _markdown_table(rows: list[dict], columns: list[str]) -> str:
    def cell(value) -> str:
        return f"{value:.4g}" if isinstance(value, float) else ("" if value is None else str(value))

    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(cell(row.get(c)) for c in columns) + " |" for row in rows]
    return "\n".join(lines)


def write_report(layout: RunLayout, plot: bool = True) -> Path:
    """Write report/report.md (and report/metrics.png if `plot`) for the run; returns the Markdown path.

    Plotting costs seconds (matplotlib), a large share of a short iteration's overhead; the
    `distill` flow plots only after its last iteration (and `gopd report` always).
    """
    con = open_catalog(layout.run_dir)  # one catalog for both queries: opening one scans the store
    metrics, accuracy = _query(con, ITERATION_METRICS_SQL), _query(con, ACCURACY_SQL)
    png = plot_metrics(layout, metrics, accuracy) if plot else layout.report_dir() / "metrics.png"
    text = "\n\n".join([
        f"# gopd run `{layout.run_id}`",
        f"Data: `{layout.run_dir}` (query it: `gopd sql --run {layout.run_dir} \"SELECT ...\"`)",
        "## Accuracy before / after", _markdown_table(before_after(layout, accuracy),
                                                      ["benchmark", "metric", "before", "after", "after_updates"]),
        "## Per iteration", _markdown_table(metrics, list(metrics[0]) if metrics else ["iteration"]),
        f"![metrics]({png.name})" if png.exists() else "(plots: written after the last iteration, or by `gopd report`)",
    ])
    path = layout.report_dir() / "report.md"
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(".report.tmp.md")
    tmp.write_text(text + "\n")
    tmp.replace(path)
    return path
