"""report.md: the report dict of :func:`cvig_engine.evaluate.evaluate_scores` as Markdown."""
from __future__ import annotations

from pathlib import Path

from cvig_engine.evaluate.report import (HEADING_KEYS, METRIC_TITLES, PERCENT_KEYS,
                                         RETRIEVAL_KEYS)

__all__ = ["render_markdown", "metrics_table", "summary_text"]


def _number(value, key) -> str:
    if value is None:
        return "—"
    return f"{value:.2f}" if key in PERCENT_KEYS else f"{value:.1f}"


def _cell(mean, std, key) -> str:
    if std is None:
        return _number(mean, key)
    return f"{_number(mean, key)} ± {_number(std, key)}"


def _p_value(p_value) -> str:
    if p_value is None:
        return "—"
    return f"{p_value:.3f}" if p_value >= 0.001 else f"{p_value:.2e}"


def _table(header: list[str], lines: list[list[str]]) -> list[str]:
    return ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|",
            *("| " + " | ".join(line) + " |" for line in lines)]


def metrics_table(report: dict) -> str:
    """The retrieval table: one line per trial of a multi-trial row, then its mean ± std line."""
    header = ["Row", "Trials", "Queries", "Tiles", *(METRIC_TITLES[key] for key in RETRIEVAL_KEYS)]
    lines = []
    for row in report["rows"]:
        if row["num_trials"] > 1:
            for trial, (path, values) in enumerate(zip(row["files"], row["retrieval_trials"]), 1):
                lines.append([f"{row['label']}, trial {trial} (`{Path(path).name}`)", "1",
                              str(values["num_queries"]), str(row["num_tiles"]),
                              *(_number(values[key], key) for key in RETRIEVAL_KEYS)])
        std = row["retrieval_std"] or {}
        name = f"**{row['label']}** (mean ± std)" if row["num_trials"] > 1 else row["label"]
        lines.append([name, str(row["num_trials"]), str(row["num_queries"]), str(row["num_tiles"]),
                      *(_cell(row["retrieval"][key], std.get(key), key) for key in RETRIEVAL_KEYS)])
    return "\n".join(_table(header, lines))


def _t_statistic(value) -> str:
    return "—" if value is None else f"{value:.3f}"


def summary_text(report: dict) -> str:
    """What `cvig-engine evaluate` prints: the retrieval table and one line per t-test."""
    lines = [metrics_table(report)]
    for comparison in report["comparisons"]:
        city = f" on {comparison['city']}" if comparison["city"] else ""
        lines.append(f"{comparison['group_b']} vs {comparison['group_a']}{city} "
                     f"({comparison['metric']}): t = {_t_statistic(comparison['t_statistic'])}, "
                     f"df = {comparison['degrees_of_freedom']}, "
                     f"p = {_p_value(comparison['p_value'])}")
    return "\n".join(lines)


def _heading_section(report: dict) -> list[str]:
    rows = [row for row in report["rows"] if row["heading"]]
    if not rows:
        return ["No query has a known true heading, so there are no heading metrics."]
    header = ["Row", "Trials", "Queries with heading",
              *(METRIC_TITLES[key] for key in HEADING_KEYS)]
    lines = []
    for row in rows:
        std = row["heading_std"] or {}
        tolerance = f" (±{row['heading']['tolerance_deg']:.1f}°)"
        lines.append([row["label"] + tolerance, str(row["num_trials"]),
                      str(row["heading"]["num_headings"]),
                      *(_cell(row["heading"][key], std.get(key), key) for key in HEADING_KEYS)])
    return _table(header, lines)


def _comparison_section(report: dict) -> list[str]:
    comparisons = report["comparisons"]
    if not comparisons:
        return []
    metric = report["compare_metric"]
    first = comparisons[0]
    lines = ["## Comparison", "",
             f"{first['test']}, of {METRIC_TITLES[metric]} per trial; each group against "
             f"`{first['group_a']}`, on the cities that both hold.", ""]
    header = ["City", "Baseline", "Mean ± std (n)", "Other", "Mean ± std (n)", "t", "df", "p"]
    table = []
    for comparison in comparisons:
        table.append([
            comparison["city"] or "—",
            comparison["group_a"],
            f"{_cell(comparison['mean_a'], comparison['std_a'], metric)} ({comparison['n_a']})",
            comparison["group_b"],
            f"{_cell(comparison['mean_b'], comparison['std_b'], metric)} ({comparison['n_b']})",
            _t_statistic(comparison["t_statistic"]),
            str(comparison["degrees_of_freedom"]), _p_value(comparison["p_value"])])
    return lines + _table(header, table) + [""]


def _runs_section(report: dict) -> list[str]:
    header = ["File", "Row", "Trial", "Ties", "Device", "Kernel", "Precision", "Seconds"]
    lines = []
    for run in report["runs"]:
        scoring = run["scoring"]
        label = " / ".join(part for part in (run["group"], run["city"]) if part) or "scores"
        ties = run["tie_rule"] + (" (recounted)" if run["tie_rule"] != run["tie_rule_scored"]
                                  else "")
        seconds = scoring.get("elapsed_seconds")
        lines.append([f"`{run['path']}`", label, str(run["trial"]), ties,
                      str(scoring.get("device", "—")), str(scoring.get("kernel", "—")),
                      str(scoring.get("precision", "—")),
                      f"{seconds:.2f}" if isinstance(seconds, (int, float)) else "—"])
    return _table(header, lines)


def render_markdown(report: dict) -> str:
    """The whole report.md text."""
    conventions = report["conventions"]
    lines = ["# cvig-engine evaluation", "",
             f"Conventions: ranks use the {conventions['tie_rule']} tie rule "
             f"({conventions['ranks']}); {conventions['metrics']}.", "",
             "## Retrieval", "", metrics_table(report), "",
             "## Heading", "", *_heading_section(report), "",
             *_comparison_section(report),
             "## Plots", ""]
    plots = report["files"]["plots"]
    if plots:
        lines += [f"![Recall@k]({plots['recall_at_k']})", "", f"![Rank CDF]({plots['rank_cdf']})"]
    else:
        lines.append("No plots: no query has a known true tile.")
    lines += ["", "## Runs", "", *_runs_section(report), ""]
    return "\n".join(lines)
