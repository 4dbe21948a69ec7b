"""The no-learning baseline: match photos to tiles by colour histograms alone.

A world where this baseline finds the right tile teaches a model nothing about cross-view
geometry; on the default synthetic settings it should stay near chance (top-1 % near 1 %).
"""

from __future__ import annotations

import numpy as np

__all__ = ["colour_histograms", "colour_histogram_baseline"]


def colour_histograms(images, bins: int = 8) -> np.ndarray:
    """Joint RGB histograms (``bins`` per channel), normalised to sum 1: float64 [N, bins**3]."""
    histograms = np.zeros((len(images), bins**3))
    for index, image in enumerate(images):
        quantised = (np.asarray(image, dtype=np.uint16) * bins) >> 8  # 0..bins-1 per channel
        code = (quantised[..., 0] * bins + quantised[..., 1]) * bins + quantised[..., 2]
        counts = np.bincount(code.ravel(), minlength=bins**3)
        histograms[index] = counts / max(counts.sum(), 1)
    return histograms


def colour_histogram_baseline(surface_images, overhead_images, bins: int = 8) -> dict:
    """Rank each photo's true tile (same index) among all tiles by chi-square histogram distance.

    Ranks follow the WITW rule (rank = number of tiles at distance <= the true tile's, ties count
    against the query); top-1 % counts queries with rank * 100 <= number of tiles.
    """
    if len(surface_images) != len(overhead_images) or len(surface_images) < 2:
        raise ValueError("need at least two (photo, tile) pairs, as many photos as tiles")
    ground = colour_histograms(surface_images, bins)
    aerial = colour_histograms(overhead_images, bins)
    count = len(ground)
    distance = np.empty((count, count))
    for query in range(count):
        total = ground[query][None, :] + aerial
        difference = ground[query][None, :] - aerial
        distance[query] = np.sum(
            np.divide(difference**2, total, out=np.zeros_like(total), where=total > 0), axis=1
        )
    true_distance = np.diag(distance)
    ranks = np.sum(distance <= true_distance[:, None], axis=1)
    return {
        "pairs": count,
        "ranks": ranks,
        "top1": float(np.mean(ranks == 1) * 100.0),
        "top1_percent": float(np.mean(ranks * 100 <= count) * 100.0),
        "chance_top1_percent": float(max(count // 100, 1) / count * 100.0),
        "median_rank": float(np.median(ranks)),
    }
