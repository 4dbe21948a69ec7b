"""Float64 distances of chosen pairs: true pairs, near-ties of the fast paths, and the top-K.

The fast paths (float32 spectral or direct, the CUDA kernel) decide most comparisons on their
own: a distance further than ``band`` from the query's true distance compares the same way in
any precision. Pairs inside the band are recomputed here in float64, and compared with a tie
tolerance of ``TIE_TOLERANCE``: two distances that agree to 1e-12 are equal, so duplicated tiles
tie whatever the summation order that produced them.
"""
from __future__ import annotations

import numpy as np

from cvig_engine.scoring.geometry import ENERGY_FLOOR, Geometry, ground_spectra

__all__ = ["ExactPairs", "TIE_TOLERANCE", "counts_under_tie_rule"]

#: Distances that differ by no more than this are a tie (float64 rounding is ~1e-15 here).
TIE_TOLERANCE = 1e-12
_PAIRS_PER_CHUNK = 512


def counts_under_tie_rule(distance, true_distance, tie_rule: str) -> np.ndarray:
    """Whether float64 ``distance`` counts against a query whose true distance is given."""
    if tie_rule == "pessimistic":
        return distance <= true_distance + TIE_TOLERANCE
    return distance < true_distance - TIE_TOLERANCE


class ExactPairs:
    """Float64 spectral distance and first-argmax shift for arbitrary (query, tile) pairs.

    Args:
        geometry: the problem's shapes.
        aerial: the aerial features [M, C, Ha, W] (any float dtype; rows are read on demand).
        energy: float64 window energies [M, V, W] (``window_energy_float64``).
    """

    def __init__(self, geometry: Geometry, aerial, energy: np.ndarray):
        self.geometry = geometry
        self.aerial = aerial
        self.energy = energy.reshape(energy.shape[0], -1)  # [M, S]

    def query_spectra(self, ground) -> np.ndarray:
        """rfft over the width (zero-padded to W) of the L2-normalised ground maps: [n, C, H, F]."""
        return ground_spectra(ground, self.geometry.aerial_width)

    def distances(self, query_spectra, query_rows, tiles):
        """Distance and shift of pairs (query_spectra[query_rows[i]], aerial[tiles[i]]).

        Returns:
            (distance float64 [P], shift int64 [P]) with shift = v * W + o, the first maximum of
            the correlation (v major).
        """
        query_rows = np.asarray(query_rows, dtype=np.int64)
        tiles = np.asarray(tiles, dtype=np.int64)
        distance = np.empty(len(tiles))
        shift = np.empty(len(tiles), dtype=np.int64)
        for start in range(0, len(tiles), _PAIRS_PER_CHUNK):
            chunk = slice(start, start + _PAIRS_PER_CHUNK)
            distance[chunk], shift[chunk] = self._chunk(query_spectra, query_rows[chunk],
                                                        tiles[chunk])
        return distance, shift

    def _chunk(self, query_spectra, query_rows, tiles):
        geometry = self.geometry
        unique, inverse = np.unique(tiles, return_inverse=True)
        aerial = np.asarray(self.aerial[unique], dtype=np.float64)
        aerial_spectra = np.fft.rfft(aerial, axis=-1)[inverse]  # [P, C, Ha, F]
        ground = np.conj(query_spectra[query_rows])  # [P, C, H, F]
        height = geometry.ground_height
        products = [np.einsum("pchf,pchf->pf", ground, aerial_spectra[:, :, v:v + height])
                    for v in range(geometry.vertical)]
        correlation = np.fft.irfft(np.stack(products, axis=1), n=geometry.aerial_width, axis=-1)
        correlation = correlation.reshape(len(tiles), -1)  # [P, S], s = v * W + o
        shift = correlation.argmax(axis=1)  # numpy returns the first maximum
        best = correlation[np.arange(len(tiles)), shift]
        energy = np.maximum(self.energy[tiles, shift], ENERGY_FLOOR)
        return 2.0 - 2.0 * best / np.sqrt(energy), shift
