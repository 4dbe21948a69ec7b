"""Evaluate SCORES.h5 files into report.json, report.md and plots (cities, trials, comparisons).

Each SCORES.h5 file is one (configuration, city, trial). Files are given either plainly (one
configuration) or in named groups (one configuration per group). Within a configuration, files
with the same city label are trials of that city and are reported as mean ± sample standard
deviation. The city label of a file is, in order: the label given for it, its root attribute
``city``, then its file stem (plain files) or nothing (grouped files: a group without city
attributes is one unnamed city). With two or more groups, each later group is compared with
the first, city by city, by Student's two-sample t-test (equal variances, two-sided) on one
metric per trial (top-1% by default).
"""
from __future__ import annotations

import glob
import json
import math
from dataclasses import dataclass, field
from pathlib import Path

from cvig_engine.errors import CvigInputError
from cvig_engine.evaluate.metrics import TIE_RULES, heading_metrics, retrieval_metrics
from cvig_engine.evaluate.scores_file import ScoredRun, load_scores, report_attributes
from cvig_engine.evaluate.statistics import mean_and_std, two_sample_t_test

__all__ = ["evaluate_scores", "parse_groups", "RETRIEVAL_KEYS", "HEADING_KEYS", "CONVENTIONS"]

RETRIEVAL_KEYS = ("top1", "top5", "top10", "top1pct", "mean_rank", "median_rank")
HEADING_KEYS = ("exact_bin", "within_10pct_fov", "median_heading_error_deg")
PERCENT_KEYS = ("top1", "top5", "top10", "top1pct", "exact_bin", "within_10pct_fov")
METRIC_TITLES = {
    "top1": "Top-1 (%)", "top5": "Top-5 (%)", "top10": "Top-10 (%)", "top1pct": "Top-1% (%)",
    "mean_rank": "Mean rank", "median_rank": "Median rank", "exact_bin": "Exact bin (%)",
    "within_10pct_fov": "Within ±10% FoV (%)", "median_heading_error_deg": "Median error (°)",
}
TIE_RULE_TEXT = {
    "pessimistic": "ties count against the query (WITW): rank = #{tiles with d ≤ d_true}, "
                   "the true tile included",
    "optimistic": "strict rule (DSM): rank = 1 + #{tiles with d < d_true}",
}
CONVENTIONS = ("top-k = % of queries with rank ≤ k; top-1% = % of queries with rank·100 ≤ the "
               "number of tiles; queries with an unknown true tile are left out; trials are "
               "reported as mean ± sample standard deviation (n − 1); heading: exact bin = the "
               "true pair's orientation bin equals the bin of the true heading, within ±10% FoV "
               "= |heading of that bin − true heading| ≤ 0.1·FoV degrees (circular)")
JSON_NAME, MARKDOWN_NAME = "report.json", "report.md"
PLOT_NAMES = {"recall_at_k": "recall_at_k.png", "rank_cdf": "rank_cdf.png"}


@dataclass
class _Row:
    group: str | None
    city: str | None
    runs: list[ScoredRun] = field(default_factory=list)
    retrieval: list[dict] = field(default_factory=list)
    heading: list[dict] = field(default_factory=list)

    @property
    def label(self) -> str:
        return " / ".join(part for part in (self.group, self.city) if part) or "scores"


def parse_groups(options) -> dict[str, list[Path]]:
    """Turn ``NAME=PATTERN[,PATTERN...]`` options into ``{name: [files]}``, in the given order.

    Each pattern is a path or a glob (quote it in the shell); globs expand in sorted order.

    Raises:
        CvigInputError: no ``=``, an empty name, a name given twice, or a pattern that matches
            no file.
    """
    groups = {}
    for option in options:
        name, separator, patterns = option.partition("=")
        name = name.strip()
        if not separator or not name or not patterns.strip():
            raise CvigInputError(f"--group {option!r}: expected NAME=PATTERN[,PATTERN...]")
        if name in groups:
            raise CvigInputError(f"--group {name}: given twice")
        paths = groups[name] = []
        for pattern in (part.strip() for part in patterns.split(",") if part.strip()):
            if glob.has_magic(pattern):
                matches = sorted(glob.glob(pattern))
                if not matches:
                    raise CvigInputError(f"--group {name}: the pattern {pattern!r} matches no "
                                         "file")
                paths.extend(Path(match) for match in matches)
            else:
                paths.append(Path(pattern))
    return groups


def _entries(score_paths, labels, groups):
    """(group, label or None, path) for every input file, with the options checked."""
    score_paths = [Path(path) for path in score_paths or ()]
    groups = dict(groups or {})
    if score_paths and groups:
        raise CvigInputError("give either SCORES files or --group options, not both")
    if not score_paths and not groups:
        raise CvigInputError("no SCORES file given")
    if labels:
        if groups:
            raise CvigInputError("--label applies to plain SCORES files; with --group, label "
                                 "cities with the files' `city` attribute")
        if len(labels) != len(score_paths):
            raise CvigInputError(f"{len(labels)} --label options for {len(score_paths)} SCORES "
                                 "files: give one label per file, in order")
    entries = [(None, labels[index] if labels else None, path)
               for index, path in enumerate(score_paths)]
    for name, paths in groups.items():
        if not paths:
            raise CvigInputError(f"--group {name}: no file")
        entries.extend((name, None, Path(path)) for path in paths)
    seen = {}
    for _, _, path in entries:
        key = path.resolve()
        if key in seen:
            raise CvigInputError(f"{path}: given twice (as {seen[key]} and as {path}); each file "
                                 "is one trial")
        seen[key] = path
    return entries


def _load_runs(entries, tie_rule):
    runs = [load_scores(path, tie_rule) for _, _, path in entries]
    if tie_rule is None:
        rules = {run.tie_rule for run in runs}
        if len(rules) > 1:
            listing = ", ".join(f"{run.path} ({run.tie_rule})" for run in runs)
            raise CvigInputError(f"the files were scored with different tie rules: {listing}; "
                                 "choose one with --ties")
    return runs


def _rows(entries, runs) -> list[_Row]:
    rows: dict[tuple, _Row] = {}
    for (group, label, path), run in zip(entries, runs):
        city = label or run.city or (path.stem if group is None else None)
        row = rows.setdefault((group, city), _Row(group, city))
        if row.runs and (row.runs[0].num_tiles, row.runs[0].ranks.size) != (
                run.num_tiles, run.ranks.size):
            first = row.runs[0]
            raise CvigInputError(
                f"{path}: {run.ranks.size} queries x {run.num_tiles} tiles, but {first.path}, "
                f"another trial of {row.label!r}, has {first.ranks.size} x {first.num_tiles}; "
                "trials must score the same city (label them apart with --label or `city`)")
        row.runs.append(run)
        row.retrieval.append(retrieval_metrics(run.ranks, run.num_tiles))
        heading = {}
        if run.heading is not None:
            try:
                heading = heading_metrics(run.true_shift, run.heading, run.fov_deg,
                                          run.aerial_width, mask=run.known)
            except CvigInputError as error:
                raise CvigInputError(f"{path}: {error}") from error
        row.heading.append(heading)
    return list(rows.values())


def _aggregate(per_trial: list[dict], keys) -> tuple[dict, dict | None]:
    """Mean and std of each key over the trials that have it."""
    present = [values for values in per_trial if values]
    if not present:
        return {}, None
    means, stds = {}, {}
    for key in keys:
        means[key], stds[key] = mean_and_std([values[key] for values in present])
    return means, (stds if len(present) > 1 else None)


def _row_report(row: _Row) -> dict:
    retrieval, retrieval_std = _aggregate(row.retrieval, RETRIEVAL_KEYS)
    heading, heading_std = _aggregate(row.heading, HEADING_KEYS)
    if heading:
        # Trials score the same queries, so the first trial's counts stand for the row.
        first = next(values for values in row.heading if values)
        heading["num_headings"] = first["num_headings"]
        heading["tolerance_deg"] = first["tolerance_deg"]
    return {
        "group": row.group, "city": row.city, "label": row.label,
        "num_trials": len(row.runs), "files": [str(run.path) for run in row.runs],
        "num_tiles": row.runs[0].num_tiles,
        "num_queries": row.retrieval[0]["num_queries"],
        "retrieval": retrieval, "retrieval_std": retrieval_std,
        "retrieval_trials": row.retrieval,
        "heading": heading, "heading_std": heading_std, "heading_trials": row.heading,
    }


def _comparisons(rows: list[_Row], metric: str) -> list[dict]:
    groups = list(dict.fromkeys(row.group for row in rows if row.group is not None))
    if len(groups) < 2:
        return []
    by_key = {(row.group, row.city): row for row in rows}
    baseline = groups[0]
    comparisons = []
    for other in groups[1:]:
        cities = [row.city for row in rows if row.group == baseline
                  and (other, row.city) in by_key]
        if not cities:
            raise CvigInputError(f"groups {baseline!r} and {other!r} share no city label, so "
                                 "they cannot be compared; give their files the same `city` "
                                 "attribute")
        for city in cities:
            samples = []
            for group in (baseline, other):
                row = by_key[(group, city)]
                values = [values[metric] for values in row.retrieval]
                if any(value is None for value in values):
                    raise CvigInputError(f"{row.label}: a trial has no query with a known true "
                                         f"tile, so it has no {metric} to compare")
                samples.append(values)
            try:
                test = two_sample_t_test(*samples)
            except CvigInputError as error:
                raise CvigInputError(f"comparing {baseline!r} with {other!r} on "
                                     f"{city or 'their files'}: {error}") from error
            _, std_a = mean_and_std(samples[0])
            _, std_b = mean_and_std(samples[1])
            comparisons.append({
                "city": city, "metric": metric, "group_a": baseline, "group_b": other,
                "values_a": samples[0], "values_b": samples[1], "std_a": std_a, "std_b": std_b,
                "test": "Student's two-sample t-test (equal variances, two-sided)", **test,
            })
    return comparisons


def _curves(rows: list[_Row]):
    from cvig_engine.evaluate.plots import curve_from_trials

    return [curve_from_trials(row.label, row.runs[0].num_tiles, [run.ranks for run in row.runs])
            for row in rows if any(values["num_queries"] for values in row.retrieval)]


def _json_safe(value):
    """NaN and infinities become None so report.json is strict JSON."""
    if isinstance(value, dict):
        return {key: _json_safe(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(item) for item in value]
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def evaluate_scores(score_paths, out_dir, *, labels=None, groups=None, tie_rule=None,
                    compare_metric: str = "top1pct") -> dict:
    """Evaluate SCORES.h5 files and write report.json, report.md and the PNG plots.

    Args:
        score_paths: plain SCORES.h5 files (one configuration); may be empty with ``groups``.
        out_dir: the report directory (created if missing; earlier reports are overwritten).
        labels: optional city label per plain file, in order (files sharing one are trials).
        groups: optional ``{name: [paths]}``, one configuration per name (see :func:`parse_groups`).
        tie_rule: ``None`` keeps each file's rule (they must agree); ``pessimistic`` or
            ``optimistic`` recounts the files scored otherwise, which needs their /distance.
        compare_metric: the per-trial metric the t-test compares (a key of RETRIEVAL_KEYS).

    Returns:
        The report as written to report.json: ``conventions``, ``runs`` (one per file),
        ``rows`` (one per configuration and city: means in ``retrieval`` / ``heading``, sample
        std in ``retrieval_std`` / ``heading_std`` or None for a single trial, per-trial values),
        ``comparisons`` (t-tests) and ``files`` (names of what was written into ``out_dir``).

    Raises:
        CvigInputError: a missing or invalid file, or options that do not fit together.
    """
    if compare_metric not in RETRIEVAL_KEYS:
        raise CvigInputError(f"unknown metric {compare_metric!r} to compare; use one of "
                             f"{', '.join(RETRIEVAL_KEYS)}")
    if tie_rule is not None and tie_rule not in TIE_RULES:
        raise CvigInputError(f"unknown tie rule {tie_rule!r}; use one of {', '.join(TIE_RULES)}")
    entries = _entries(score_paths, labels, groups)
    runs = _load_runs(entries, tie_rule)
    rows = _rows(entries, runs)
    comparisons = _comparisons(rows, compare_metric)

    out_dir = Path(out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise CvigInputError(f"{out_dir}: exists and is not a directory")
    out_dir.mkdir(parents=True, exist_ok=True)
    rule = runs[0].tie_rule
    report = {
        "conventions": {"tie_rule": rule, "ranks": TIE_RULE_TEXT[rule], "metrics": CONVENTIONS},
        "compare_metric": compare_metric,
        "runs": [],
        "rows": [_row_report(row) for row in rows],
        "comparisons": comparisons,
        "files": {"json": JSON_NAME, "markdown": MARKDOWN_NAME, "plots": {}},
    }
    for row in rows:
        for trial, (run, retrieval, heading) in enumerate(
                zip(row.runs, row.retrieval, row.heading), start=1):
            report["runs"].append({**report_attributes(run), "group": row.group,
                                   "city": row.city, "trial": trial,
                                   "retrieval": retrieval, "heading": heading})
    curves = _curves(rows)
    if curves:
        from cvig_engine.evaluate.plots import plot_rank_cdf, plot_recall_at_k

        plot_recall_at_k(curves, out_dir / PLOT_NAMES["recall_at_k"])
        plot_rank_cdf(curves, out_dir / PLOT_NAMES["rank_cdf"])
        report["files"]["plots"] = dict(PLOT_NAMES)
    report = _json_safe(report)
    (out_dir / JSON_NAME).write_text(
        json.dumps(report, indent=2, ensure_ascii=False, allow_nan=False, default=str) + "\n",
        encoding="utf-8")
    from cvig_engine.evaluate.markdown import render_markdown

    (out_dir / MARKDOWN_NAME).write_text(render_markdown(report), encoding="utf-8")
    return report
