"""Prefect artifacts for an iteration: a metrics table and a link to the plots."""

from __future__ import annotations

from prefect.artifacts import create_markdown_artifact, create_table_artifact

from gopd_core.report import iteration_metrics
from storage.layout import RunLayout


def publish_iteration_artifacts(layout: RunLayout, iteration: int) -> None:
    metrics = iteration_metrics(layout)
    key = "".join(c if c.isalnum() else "-" for c in layout.run_id.lower())
    create_table_artifact(key=f"{key}-metrics", table=metrics,
                          description=f"gopd run {layout.run_id}: metrics through iteration {iteration}")
    plot = (layout.report_dir() / "metrics.png").resolve()
    create_markdown_artifact(key=f"{key}-plots", markdown=(
        f"### gopd run `{layout.run_id}` after iteration {iteration}\n\n"
        f"- plots: [metrics.png](file://{plot})\n- report: `{layout.report_dir() / 'report.md'}`\n"),
        description="plots of reward, advantage, KL to reference, clip fraction, accuracy")
