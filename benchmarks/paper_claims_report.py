"""Read the paper-claims runs back (DuckDB over the stored Parquet) and write JSON, Markdown and a plot.

1. `read_run(run_dir)`: avg@k per evaluated iteration and domain, and the run's cost (stage wall
   times from the stage markers, tokens scored per role, tokens trained) via `storage.catalog`.
2. `summarize(records)`: mean, standard deviation and standard error over seeds of the final
   accuracy, per (setting, method, domain).
3. `judge_claims(summary)`: each claim's comparisons as differences of means with 2-standard-error
   bands: "held" (difference > 2 SE), "reversed" (< -2 SE), else "within noise".
4. `write_outputs(...)`: paper_claims.json (every seed's row), paper_claims.md, paper_claims.png.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

from storage.catalog import run_query
from storage.layout import RunLayout, write_json_atomic

STAGES = ("rollout", "score", "update", "evaluate")
_SETTING_ORDER = {"same-size": 0, "multi-teacher": 1, "strong-to-weak": 2}


def read_run(run_dir: Path) -> dict:
    """Accuracy curve and cost of one run directory (a distill run or an evaluation-only run)."""
    evals = run_query(run_dir, "SELECT coalesce(iteration, 0) AS iteration, split_part(benchmark, '/', 1) AS domain, "
                               "metric, value FROM evals ORDER BY iteration, domain, metric").fetchall()
    curve = [{"iteration": int(i), "domain": d, "metric": m, "value": float(v)} for i, d, m, v in evals]
    cost = {"stage_wall_s": _stage_wall(RunLayout(Path(run_dir)))}
    if any((Path(run_dir) / "scores").glob("**/*.parquet")):
        scored = run_query(run_dir, "SELECT role, sum(len(logprobs)) FROM scores GROUP BY role").fetchall()
        cost["tokens_scored"] = {role: int(n) for role, n in scored}
        trained = run_query(run_dir, "SELECT sum(tokens), count(DISTINCT iteration) FROM updates").fetchall()[0]
        cost["tokens_trained"], cost["iterations"] = int(trained[0] or 0), int(trained[1] or 0)
    return {"run_dir": str(run_dir), "curve": curve, "cost": cost}


def _stage_wall(layout: RunLayout) -> dict[str, float]:
    totals = dict.fromkeys(STAGES, 0.0)
    iteration = 0
    while any(layout.done_info(iteration, s) for s in STAGES):
        for stage in STAGES:
            info = layout.done_info(iteration, stage)
            totals[stage] += float(info.get("wall_s", 0.0)) if info else 0.0
        iteration += 1
    return {stage: round(value, 2) for stage, value in totals.items()}


def _avg_metric(record: dict) -> str:
    return next((p["metric"] for p in record["curve"] if p["metric"].startswith("avg@")), "avg@?")


def final_accuracy(record: dict) -> dict[str, float]:
    """avg@k per domain at the last evaluated iteration."""
    metric = _avg_metric(record)
    points = [p for p in record["curve"] if p["metric"] == metric]
    last = max((p["iteration"] for p in points), default=0)
    return {p["domain"]: round(p["value"], 4) for p in points if p["iteration"] == last}


def _stats(values: list[float]) -> dict:
    n = len(values)
    mean = sum(values) / n
    std = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1)) if n > 1 else 0.0
    return {"mean": mean, "std": std, "se": std / math.sqrt(n), "n": n, "values": values}


def summarize(records: list[dict]) -> dict[tuple[str, str, str], dict]:
    """(setting, method, domain) -> statistics over seeds of the final avg@k."""
    groups: dict[tuple[str, str, str], list[float]] = {}
    for record in records:
        for domain, value in final_accuracy(record).items():
            groups.setdefault((record["setting"], record["method"], domain), []).append(value)
    return {key: _stats(values) for key, values in sorted(groups.items())}


def _compare(summary: dict, left: tuple, right: tuple, what: str) -> dict:
    a, b = summary.get(left), summary.get(right)
    if a is None or b is None:
        return {"comparison": what, "verdict": "not run"}
    diff = a["mean"] - b["mean"]
    band = 2 * math.sqrt(a["se"] ** 2 + b["se"] ** 2)
    verdict = "held" if diff > band else "reversed" if diff < -band else "within noise"
    return {"comparison": what, "left": round(a["mean"], 4), "right": round(b["mean"], 4),
            "difference": round(diff, 4), "two_se": round(band, 4), "verdict": verdict}


def judge_claims(summary: dict) -> list[dict]:
    """The three claims as lists of comparisons, each with a verdict, and an overall verdict per claim."""
    def overall(items: list[dict]) -> str:
        verdicts = {i["verdict"] for i in items}
        if verdicts == {"held"}:
            return "held"
        if "held" in verdicts:
            return "partly held"
        return "did not hold" if "reversed" in verdicts else "not shown (differences within noise)"

    claim1 = [_compare(summary, (s, f"ExOPD lam={lam}", d), (s, "OPD", d), f"{s} {d}: ExOPD lam={lam} vs OPD")
              for s, domains in (("same-size", ["math"]), ("strong-to-weak", ["math"]))
              for d in domains for lam in ("1.25", "1.5")]
    claim2 = []
    for domain in ("math", "code"):
        teacher = ("models", f"teacher-{domain}", domain)
        for method in ("ExOPD lam=1.25", "ExOPD lam=1.5"):
            item = _compare(summary, ("multi-teacher", method, domain), teacher,
                            f"multi-teacher {domain}: {method} vs teacher-{domain}")
            # "match or surpass": not clearly below the teacher.
            item["verdict"] = {"held": "held", "within noise": "held", "reversed": "reversed"}.get(
                item["verdict"], item["verdict"])
            claim2.append({**item, "part": method})
        item = _compare(summary, ("multi-teacher", "OPD", domain), teacher, f"multi-teacher {domain}: OPD vs teacher-{domain}")
        if "difference" in item:  # the claim is that OPD stays below the teacher
            item["verdict"] = "held" if item["difference"] < 0 else "not below"
        item["comparison"] += " (claim: OPD stays below)"
        claim2.append({**item, "part": "OPD"})
    claim3 = [_compare(summary, ("strong-to-weak", f"ExOPD+RC lam={lam}", "math"),
                       ("strong-to-weak", f"ExOPD lam={lam}", "math"), f"strong-to-weak math: RC vs no RC at lam={lam}")
              for lam in ("1.25", "1.5")]
    texts = [
        "ExOPD (lam > 1) beats OPD for same-size and strong-to-weak pairs",
        "multi-teacher merge: ExOPD matches or beats each domain teacher on its domain, OPD stays below",
        "strong-to-weak: reward correction (teacher's base as reference) beats ExOPD with the student as reference",
    ]
    verdicts = [overall(claim1), _merge_verdict(claim2), overall(claim3)]
    return [{"claim": i + 1, "text": text, "overall": verdict, "comparisons": items}
            for i, (text, verdict, items) in enumerate(zip(texts, verdicts, (claim1, claim2, claim3)))]


def _merge_verdict(items: list[dict]) -> str:
    """Claim 2 is a conjunction: some ExOPD lam matches every teacher on its domain AND OPD stays below."""
    def all_held(part: str) -> bool:
        return all(i["verdict"] == "held" for i in items if i["part"] == part)

    exopd_matches = any(all_held(f"ExOPD lam={lam}") for lam in ("1.25", "1.5"))
    if exopd_matches and all_held("OPD"):
        return "held"
    if exopd_matches:
        return "partly held (ExOPD matches the teachers, but OPD does too)"
    return "did not hold (ExOPD stays clearly below a teacher)"


def against_start(summary: dict) -> list[dict]:
    """Context for the claims: did each method move the student off its starting point (student-base)?"""
    rows = []
    for (setting, method, domain) in summary:
        if setting != "models":
            rows.append(_compare(summary, (setting, method, domain), ("models", "student-base", domain),
                                 f"{setting} {domain}: {method} vs student-base"))
    return rows


def _cost_row(records: list[dict]) -> dict:
    walls = [r["job_wall_s"] for r in records]
    scored = [sum(r["cost"].get("tokens_scored", {}).values()) for r in records]
    return {"wall_s": sum(walls) / len(walls), "tokens_scored": sum(scored) / len(scored)}


def markdown(records: list[dict], summary: dict, claims: list[dict], meta: dict) -> str:
    scale, host = meta["scale"], meta["machine"]
    lines = [
        "# Paper claims at small scale (G-OPD / ExOPD)", "",
        f"Command: `{meta['command']}`  ",
        f"Machine: {host['cpu']}, {host['cores']} cores, {host['memory_gib']} GiB, torch {host['torch']}, "
        f"Python {host['python']}; load average before {_load(meta['load_average_before'])}, "
        f"after {_load(meta['load_average_after'])}  ",
        f"Wall time: {meta['benchmark_wall_s'] / 60:.1f} min for this command, of which zoo build "
        f"{meta['zoo_build_s'] / 60:.1f} min (the zoo's own build, as recorded in its manifest: "
        f"{(meta['zoo_build_recorded_s'] or 0) / 60:.1f} min); {meta['workers']} worker processes, one torch thread each.",
        "",
        f"Zoo preset `{scale['preset']}`; seeds {list(scale['seeds'])}; {scale['iterations']} iterations of "
        f"{scale['prompts_per_iteration']} prompts x {scale['samples_per_prompt']} samples (temperature 1, "
        f"<= {scale['max_new_tokens']} tokens), AdamW lr {scale['lr']}, {scale['minibatches']} steps per iteration. "
        f"Accuracy = avg@{scale['eval_samples']} (temperature 0.7) on the first {scale['eval_prompts']} held-out "
        f"test prompts per domain, evaluated every {scale['eval_every']} iterations (multi-teacher: every "
        f"{max(1, round(scale['eval_every'] * meta['settings']['multi-teacher'].get('eval_every_factor', 1)))}); "
        "tables give the final "
        "iteration, mean ± standard deviation over seeds.", "",
        "## Summary", "",
        *_summary(summary, claims), "",
        "## Verdicts", "",
    ]
    for claim in claims:
        lines.append(f"**Claim {claim['claim']}: {claim['text']}: {claim['overall']}.**")
        lines.append("")
        for item in claim["comparisons"]:
            if item["verdict"] == "not run":
                lines.append(f"- {item['comparison']}: not run")
                continue
            lines.append(f"- {item['comparison']}: {item['left']:.3f} vs {item['right']:.3f} "
                         f"(difference {item['difference']:+.3f}, 2 SE {item['two_se']:.3f}) -> {item['verdict']}")
        lines.append("")
    lines += ["Verdict rule: a difference of means counts only beyond two standard errors (seeds); "
              "'within noise' means this scale cannot tell. For claim 2, 'match' means not clearly below the teacher. "
              f"With {len(meta['scale']['seeds'])} seeds the standard errors are themselves rough: read a 'held' "
              "whose band is much narrower than the spread in the tables below with care.", "",
              "## Context: did training move the student at all?", "",
              "Each method's final accuracy against the student base it started from (same rule):", ""]
    for item in against_start(summary):
        lines.append(f"- {item['comparison']}: {item['left']:.3f} vs {item['right']:.3f} "
                     f"({item['difference']:+.3f}, 2 SE {item['two_se']:.3f}) -> {_moved(item['verdict'])}")
    lines += ["", "## Accuracy by setting", ""]
    models = {k: v for k, v in summary.items() if k[0] == "models"}
    for setting, spec in sorted(meta["settings"].items(), key=lambda item: _SETTING_ORDER.get(item[0], 9)):
        domains = spec["domains"]
        lines += [f"### {setting}", "", "| method | " + " | ".join(domains) + " | wall s / run | tokens scored / run |",
                  "|---|" + "---|" * len(domains) + "---|---|"]
        for model in _models_of(spec):
            cells = [_cell(models.get(("models", model, d))) for d in domains]
            lines.append(f"| {model} (zoo model) | " + " | ".join(cells) + " | | |")
        for method in dict.fromkeys(r["method"] for r in records if r["setting"] == setting):
            cells = [_cell(summary.get((setting, method, d))) for d in domains]
            cost = _cost_row([r for r in records if r["setting"] == setting and r["method"] == method])
            lines.append(f"| {method} | " + " | ".join(cells) + f" | {cost['wall_s']:.0f} | {cost['tokens_scored']:,.0f} |")
        lines.append("")
    lines += ["![accuracy over iterations](paper_claims.png)", "",
              "Every seed's numbers, curves and costs: `paper_claims.json`."]
    return "\n".join(lines) + "\n"


def _summary(summary: dict, claims: list[dict]) -> list[str]:
    lines = [f"- Claim {c['claim']} ({c['text']}): **{c['overall']}**." for c in claims]
    moved = [i for i in against_start(summary) if i["verdict"] in ("held", "reversed")]
    still = len(against_start(summary)) - len(moved)
    lines.append(f"- Training moved the student beyond noise in {len(moved)} of {len(moved) + still} "
                 "(setting, method, domain) cells: " + (", ".join(
                     f"{i['comparison'].replace(' vs student-base', '')} {_moved(i['verdict'])} ({i['difference']:+.3f})"
                     for i in moved) or "none") + ". Read the claims' differences against that.")
    return lines


def _moved(verdict: str) -> str:
    return {"held": "improved", "reversed": "got worse", "within noise": "no change beyond noise"}.get(verdict, verdict)


def _models_of(spec: dict) -> list[str]:
    names = ["student-base", *dict.fromkeys(spec["teachers"].values())]
    return names + ([spec["teacher_base"]] if "teacher_base" in spec else [])


def _cell(stats: dict | None) -> str:
    return "-" if stats is None else f"{stats['mean']:.3f} ± {stats['std']:.3f}"


def _load(values) -> str:
    return "/".join(f"{v:.1f}" for v in values)


def plot(records: list[dict], meta: dict, path: Path) -> Path:
    """Accuracy over iterations, one panel per (setting, domain), mean over seeds with a ±1 std band."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [(s, d) for s, spec in sorted(meta["settings"].items(), key=lambda item: _SETTING_ORDER.get(item[0], 9))
              for d in spec["domains"]]
    figure, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 3.6), squeeze=False)
    models = summarize([r for r in records if r["setting"] == "models"])
    for axis, (setting, domain) in zip(axes[0], panels):
        for method in dict.fromkeys(r["method"] for r in records if r["setting"] == setting):
            curves: dict[int, list[float]] = {}
            for record in (r for r in records if r["setting"] == setting and r["method"] == method):
                metric = _avg_metric(record)
                for p in record["curve"]:
                    if p["domain"] == domain and p["metric"] == metric:
                        curves.setdefault(p["iteration"], []).append(p["value"])
            xs = sorted(curves)
            stats = [_stats(curves[x]) for x in xs]
            means = [s["mean"] for s in stats]
            line, = axis.plot(xs, means, marker="o", markersize=3, label=method)
            axis.fill_between(xs, [m - s["std"] for m, s in zip(means, stats)],
                              [m + s["std"] for m, s in zip(means, stats)], color=line.get_color(), alpha=0.12)
        for model in _models_of(meta["settings"][setting]):
            stats = models.get(("models", model, domain))
            if stats is not None and model != "student-base":
                axis.axhline(stats["mean"], linestyle="--", linewidth=1, color="grey")
                axis.annotate(model, (0, stats["mean"]), fontsize=7, color="grey", va="bottom")
        axis.set_title(f"{setting}: {domain}", fontsize=10)
        axis.set_xlabel("iteration")
        axis.set_ylabel("avg@k (test)")
        axis.legend(fontsize=6, loc="center right")
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return path


def records_from_json(payload: dict) -> list[dict]:
    """The per-job records `write_outputs` took, rebuilt from its paper_claims.json."""
    records: dict[tuple, dict] = {}
    for row in payload["results"]:
        key = (row["setting"], row["method"], row["seed"])
        cost = dict(row["cost"])
        records.setdefault(key, {"setting": key[0], "method": key[1], "seed": key[2], "curve": row["curve"],
                                 "job_wall_s": cost.pop("job_wall_s"), "cost": cost})
    return list(records.values())


def write_outputs(records: list[dict], meta: dict, out: Path) -> list[Path]:
    out.mkdir(parents=True, exist_ok=True)
    summary = summarize(records)
    claims = judge_claims(summary)
    rows = [{"setting": r["setting"], "method": r["method"], "seed": r["seed"], "domain": d, "accuracy": v,
             "metric": _avg_metric(r), "cost": {**r["cost"], "job_wall_s": r["job_wall_s"]}, "curve": r["curve"]}
            for r in records for d, v in final_accuracy(r).items()]
    payload = {"meta": meta, "claims": claims, "results": rows,
               "summary": [{"setting": s, "method": m, "domain": d, **stats} for (s, m, d), stats in summary.items()]}
    json_path = write_json_atomic(out / "paper_claims.json", json.loads(json.dumps(payload)))
    md_path = out / "paper_claims.md"
    md_path.write_text(markdown(records, summary, claims, meta))
    return [json_path, md_path, plot(records, meta, out / "paper_claims.png")]
