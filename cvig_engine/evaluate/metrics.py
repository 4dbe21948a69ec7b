"""Retrieval and heading metrics of one scored run, as pure functions of ranks and shifts.

Conventions (WITW's, the default everywhere in cvig-engine):

- Ranks are 1-based and already follow a tie rule. ``pessimistic`` (WITW) counts ties against
  the query: rank = #{tiles with d <= d_true}, the true tile included. ``optimistic`` (DSM)
  is strict: rank = 1 + #{tiles with d < d_true}. :func:`ranks_from_distances` applies either.
- A rank below 1 (0 or -1) means the query's true tile is unknown; such queries are left out.
- top-k is the percentage of queries with rank <= k; top-1% is the percentage with
  rank * 100 <= number of tiles (so with fewer than 100 tiles no query reaches it).
- Values that an empty set leaves undefined are ``None`` (JSON ``null``), never NaN.

This module only needs numpy and :mod:`cvig_engine.polar`, so the scoring stage can import it.
"""
from __future__ import annotations

import numpy as np

from cvig_engine.errors import CvigInputError
from cvig_engine.polar import heading_to_shift, shift_to_heading

__all__ = [
    "TIE_RULES",
    "retrieval_metrics",
    "recall_at_k",
    "heading_metrics",
    "heading_error_deg",
    "ranks_from_distances",
    "top1pct_cutoff",
]

TIE_RULES = ("pessimistic", "optimistic")

#: Fraction of the field of view within which a heading counts as right (Shi et al., Table 4).
HEADING_TOLERANCE_FRACTION = 0.1


def _known_ranks(ranks) -> np.ndarray:
    ranks = np.asarray(ranks)
    if ranks.ndim != 1 or not np.issubdtype(ranks.dtype, np.integer):
        raise CvigInputError(f"ranks must be a 1-D integer array, got {ranks.dtype} {ranks.shape}")
    return ranks[ranks >= 1].astype(np.int64)


def top1pct_cutoff(num_tiles: int) -> int:
    """Largest rank that counts as top-1%: rank * 100 <= num_tiles, i.e. floor(num_tiles / 100)."""
    return int(num_tiles) // 100


def retrieval_metrics(ranks, num_tiles: int) -> dict:
    """Top-1/5/10, top-1%, mean and median rank of 1-based ranks.

    Args:
        ranks: integer array [N]; entries below 1 (unknown match) are left out.
        num_tiles: number of tiles M that were ranked.

    Returns:
        ``top1``, ``top5``, ``top10``, ``top1pct`` (percent of the known queries), ``mean_rank``,
        ``median_rank`` (the mean of the two middle ranks for an even count) and ``num_queries``
        (the known queries). With no known query every metric is ``None``.

    Raises:
        CvigInputError: a rank above ``num_tiles``, or ranks that are not a 1-D integer array.
    """
    num_tiles = int(num_tiles)
    known = _known_ranks(ranks)
    if known.size and known.max() > num_tiles:
        row = int(np.flatnonzero(np.asarray(ranks) > num_tiles)[0])
        raise CvigInputError(f"row {row}: rank {int(np.asarray(ranks)[row])} exceeds the "
                             f"number of tiles ({num_tiles})")
    metrics = {"num_queries": int(known.size)}
    if known.size == 0:
        metrics.update(dict.fromkeys(
            ("top1", "top5", "top10", "top1pct", "mean_rank", "median_rank")))
        return metrics
    for k in (1, 5, 10):
        metrics[f"top{k}"] = 100.0 * float(np.mean(known <= k))
    metrics["top1pct"] = 100.0 * float(np.mean(known * 100 <= num_tiles))
    metrics["mean_rank"] = float(np.mean(known))
    metrics["median_rank"] = float(np.median(known))
    return metrics


def recall_at_k(ranks, ks) -> np.ndarray:
    """Recall@k in percent for each k in ``ks``: the share of known queries with rank <= k.

    Args:
        ranks: integer array [N]; entries below 1 (unknown match) are left out.
        ks: the cut-offs k (any shape).

    Returns:
        float64 array shaped like ``ks``; NaN everywhere when no query is known.
    """
    known = np.sort(_known_ranks(ranks))
    ks = np.asarray(ks)
    if known.size == 0:
        return np.full(ks.shape, np.nan)
    return 100.0 * np.searchsorted(known, ks, side="right") / known.size


def heading_error_deg(heading_a, heading_b) -> np.ndarray:
    """Circular absolute difference of two compass headings, in degrees within [0, 180]."""
    difference = np.asarray(heading_a, dtype=np.float64) - np.asarray(heading_b, dtype=np.float64)
    return np.abs(np.mod(difference + 180.0, 360.0) - 180.0)


def heading_metrics(true_shift, heading_deg, fov_deg: float, width: int, mask=None) -> dict:
    """How well the true pair's orientation bin recovers the photo's compass heading.

    Args:
        true_shift: integer array [N], the orientation bin (0..width-1) of each true pair.
        heading_deg: float array [N], the photo's true compass heading; NaN where unknown.
        fov_deg: the photos' horizontal field of view in degrees.
        width: W, the number of orientation bins over 360 degrees.
        mask: optional boolean array [N] of rows to consider (e.g. rank >= 1); rows with a
            negative shift or a non-finite heading are left out as well.

    Returns:
        Empty dict when no heading is known; otherwise ``num_headings``, ``exact_bin``
        (percent with true_shift == heading_to_shift(heading)), ``within_10pct_fov``
        (percent whose heading error is at most 0.1 * fov degrees), ``tolerance_deg``
        (that 0.1 * fov) and ``median_heading_error_deg``. The heading error compares
        shift_to_heading(true_shift) with the true heading, circularly.

    Raises:
        CvigInputError: a shift outside 0..width-1 on a considered row, or mismatched lengths.
    """
    true_shift = np.asarray(true_shift)
    heading = np.asarray(heading_deg, dtype=np.float64)
    if true_shift.shape != heading.shape or true_shift.ndim != 1:
        raise CvigInputError(f"true_shift {true_shift.shape} and heading {heading.shape} "
                             "must be 1-D arrays of the same length")
    keep = np.isfinite(heading) & (true_shift >= 0)
    if mask is not None:
        keep &= np.asarray(mask, dtype=bool)
    if not keep.any():
        return {}
    out_of_range = keep & (true_shift >= width)
    if out_of_range.any():
        row = int(np.flatnonzero(out_of_range)[0])
        raise CvigInputError(f"row {row}: orientation bin {int(true_shift[row])} is outside "
                             f"0..{width - 1}")
    shift = true_shift[keep].astype(np.int64)
    heading = heading[keep]
    error = heading_error_deg(shift_to_heading(shift, fov_deg, width), heading)
    tolerance = HEADING_TOLERANCE_FRACTION * float(fov_deg)
    return {
        "num_headings": int(shift.size),
        "exact_bin": 100.0 * float(np.mean(shift == heading_to_shift(heading, fov_deg, width))),
        "within_10pct_fov": 100.0 * float(np.mean(error <= tolerance)),
        "tolerance_deg": tolerance,
        "median_heading_error_deg": float(np.median(error)),
    }


def ranks_from_distances(distance, match, tie_rule: str = "pessimistic",
                         block_rows: int | None = None) -> np.ndarray:
    """1-based rank of each query's true tile in a full distance matrix, under a tie rule.

    Args:
        distance: array-like [N, M] (a numpy array or an h5py dataset), read ``block_rows``
            rows at a time so a large matrix never sits in memory whole (default: about 2^24
            values, 64 MB of float32, per block).
        match: integer array [N], the true tile of each query, -1 where unknown.
        tie_rule: ``pessimistic`` (d <= d_true counts, WITW) or ``optimistic`` (strict <, DSM).

    Returns:
        int64 array [N]; 0 where the match is unknown.

    Raises:
        CvigInputError: an unknown tie rule, a match out of range, or a non-finite distance.
    """
    if tie_rule not in TIE_RULES:
        raise CvigInputError(f"unknown tie rule {tie_rule!r}; use one of {', '.join(TIE_RULES)}")
    match = np.asarray(match, dtype=np.int64)
    num_queries, num_tiles = distance.shape
    if match.shape != (num_queries,):
        raise CvigInputError(f"match has shape {match.shape}, expected ({num_queries},)")
    if (match >= num_tiles).any():
        row = int(np.flatnonzero(match >= num_tiles)[0])
        raise CvigInputError(f"row {row}: match {int(match[row])} is outside 0..{num_tiles - 1}")
    if block_rows is None:
        block_rows = max(1, 2**24 // max(num_tiles, 1))
    ranks = np.zeros(num_queries, dtype=np.int64)
    for start in range(0, num_queries, block_rows):
        # The stored precision is kept: comparisons between stored values are exact in any dtype.
        block = np.asarray(distance[start:start + block_rows])
        block_match = match[start:start + block.shape[0]]
        known = block_match >= 0
        bad = ~np.isfinite(block).all(axis=1) & known
        if bad.any():
            raise CvigInputError(f"row {start + int(np.flatnonzero(bad)[0])}: the distance "
                                 "matrix holds NaN or Inf")
        rows = np.flatnonzero(known)
        true_distance = block[rows, block_match[rows]][:, None]
        if tie_rule == "pessimistic":
            ranks[start + rows] = (block[rows] <= true_distance).sum(axis=1)
        else:
            ranks[start + rows] = 1 + (block[rows] < true_distance).sum(axis=1)
    return ranks
