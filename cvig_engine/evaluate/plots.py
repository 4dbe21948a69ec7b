"""Recall@k and rank-CDF plots (matplotlib, Agg backend, fixed size: 960 x 600 pixels)."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from cvig_engine.evaluate.metrics import recall_at_k, top1pct_cutoff

__all__ = ["Curve", "curve_cutoffs", "plot_recall_at_k", "plot_rank_cdf", "FIGURE_PIXELS"]

FIGURE_INCHES = (9.6, 6.0)
FIGURE_DPI = 100
#: (width, height) of every PNG the report writes.
FIGURE_PIXELS = (960, 600)


@dataclass
class Curve:
    """One line of a plot: recall (percent) at the rank cut-offs ``ks`` of ``num_tiles`` tiles.

    ``recall`` is the mean over trials and ``recall_std`` their sample standard deviation
    (``None`` for a single trial); the plots shade mean ± std.
    """

    label: str
    num_tiles: int
    ks: np.ndarray
    recall: np.ndarray
    recall_std: np.ndarray | None = None


def curve_cutoffs(num_tiles: int, points: int = 1000) -> np.ndarray:
    """Rank cut-offs 1..num_tiles, dense at both ends: a log grid joined with a linear one."""
    logarithmic = np.geomspace(1, num_tiles, points)
    linear = np.linspace(1, num_tiles, points)
    return np.unique(np.rint(np.concatenate([logarithmic, linear])).astype(np.int64))


def curve_from_trials(label: str, num_tiles: int, trial_ranks: list[np.ndarray]) -> Curve:
    """Mean (and std over trials) recall curve of one row."""
    ks = curve_cutoffs(num_tiles)
    recalls = np.stack([recall_at_k(ranks, ks) for ranks in trial_ranks])
    if len(trial_ranks) == 1:
        return Curve(label, num_tiles, ks, recalls[0])
    return Curve(f"{label} (mean ± std of {len(trial_ranks)} trials)", num_tiles, ks,
                 recalls.mean(axis=0), recalls.std(axis=0, ddof=1))


def _figure():
    # A bare Figure (no pyplot) renders with Agg, keeps no global state and opens no window.
    from matplotlib.figure import Figure

    figure = Figure(figsize=FIGURE_INCHES, dpi=FIGURE_DPI)
    axes = figure.add_subplot()
    axes.grid(True, which="major", alpha=0.4)
    axes.set_ylim(0, 100)
    axes.set_ylabel("Queries whose true tile is within the cut-off (%)")
    return figure, axes


def _draw(axes, x, curve: Curve):
    line, = axes.step(x, curve.recall, where="post", label=curve.label, linewidth=1.6)
    if curve.recall_std is not None:
        axes.fill_between(x, curve.recall - curve.recall_std, curve.recall + curve.recall_std,
                          step="post", color=line.get_color(), alpha=0.2, linewidth=0)
    return line


def _save(figure, axes, path: Path) -> Path:
    axes.legend(loc="lower right", fontsize="small")
    figure.savefig(path, dpi=FIGURE_DPI, format="png")
    return path


def plot_recall_at_k(curves: list[Curve], path) -> Path:
    """Recall@k against k (log axis from 1 to the largest M); a dot marks each line's top-1%."""
    figure, axes = _figure()
    for curve in curves:
        line = _draw(axes, curve.ks, curve)
        cutoff = top1pct_cutoff(curve.num_tiles)
        if cutoff >= 1:
            index = np.searchsorted(curve.ks, cutoff, side="right") - 1
            axes.plot([cutoff], [curve.recall[index]], "o", color=line.get_color(), markersize=6)
    axes.set_xscale("log")
    axes.set_xlim(1, max(curve.num_tiles for curve in curves))
    axes.set_xlabel("k (rank cut-off, log scale); dots mark top-1% (k = tiles / 100)")
    axes.set_title("Recall@k: share of queries whose true tile ranks in the top k")
    return _save(figure, axes, Path(path))


def plot_rank_cdf(curves: list[Curve], path) -> Path:
    """CDF of the rank as a percentage of each city's tiles (so cities of any size compare)."""
    figure, axes = _figure()
    for curve in curves:
        _draw(axes, 100.0 * curve.ks / curve.num_tiles, curve)
    axes.axvline(1.0, color="grey", linestyle="--", linewidth=1)
    axes.set_xlim(0, 100)
    axes.set_xlabel("Rank of the true tile, as % of the tiles (dashed line: top-1%)")
    axes.set_title("Rank CDF")
    return _save(figure, axes, Path(path))
