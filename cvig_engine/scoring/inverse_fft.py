"""CPU epilogue of the spectral path: the inverse real FFT of every pair's spectrum, the first
argmax over the shifts and the crop-normalised distance, fused in one compiled (numba) pass.

The GEMM form of the inverse DFT costs W * R / 2 multiply-adds per pair (3,040 at W = 64) and
streams its [pairs, W] output through memory twice more for the maximum. A radix-2 FFT needs
about 5 * W * log2(W) / 2 operations and keeps each chunk of pairs in cache: the spectral rows
of up to 1,024 pairs are read once, the correlations never leave the core. Every stage is a loop
over the pairs of a chunk, so that each vectorises: the packing of the spectrum, the butterflies,
a running first argmax, and the distances with their rank counts.

Real IFFT of even length N = 2M through one complex IFFT of length M: with X the spectrum of
the correlation x (X_f = P_f, Hermitian), e[n] = x[2n] and o[n] = x[2n + 1] have the M-point
spectra E_k = (X_k + conj X_{M-k}) / 2 and O_k = (X_k - conj X_{M-k}) e^{+2 pi i k / N} / 2, and
z = e + i o = IFFT_M(E + i O). Only N = 2M with M a power of two is handled (W = 64 for VGG16);
other widths keep the GEMM form.
"""
from __future__ import annotations

import math

import numba
import numpy as np

__all__ = ["FftEpilogue", "TileRanks", "applies_to", "supports_width"]

#: Floats in each of a chunk's two [M, pairs] arrays (real and imaginary parts): 128 KiB each,
#: so both stay in L2; 1,024 pairs at W = 64. Long loops pay for the per-loop set-up of the ~200
#: loops per chunk: 256 pairs per chunk was 10% slower, 64 pairs 30% slower.
CHUNK_FLOATS = 32768


def supports_width(width: int) -> bool:
    """True when the width is 2M with M a power of two (at least 2)."""
    half = width // 2
    return width % 2 == 0 and half >= 2 and half & (half - 1) == 0


def applies_to(geometry, device_type: str) -> bool:
    """Whether the spectral path inverts with this epilogue: CPU, W = 2M, no vertical search."""
    return (device_type == "cpu" and geometry.vertical == 1
            and supports_width(geometry.aerial_width))


class FftEpilogue:
    """Row indices and twiddles of a ``SpectralLayout``, and the compiled pass over a tile.

    Args:
        layout: the ``SpectralLayout`` whose rows the products follow.
    """

    def __init__(self, layout):
        width = layout.width
        if not supports_width(width):
            raise ValueError(f"width {width}: the FFT epilogue needs W = 2M, M a power of two")
        half = width // 2
        # For every frequency 0..M: the rows holding Re X (or k1), k2 and k3 (-1: real row).
        index = -np.ones((half + 1, 3), np.int64)
        for row, (frequency, kind) in enumerate(layout.rows):
            index[frequency, {"real": 0, "k1": 0, "k2": 1, "k3": 2}[kind]] = row
        self.rows = index
        angle = 2.0 * math.pi * np.arange(half) / width  # e^{+2 pi i k / N}, k < M
        self.pack_cos = np.cos(angle).astype(np.float32)
        self.pack_sin = np.sin(angle).astype(np.float32)
        levels = int(math.log2(half))
        self.bit_reverse = np.array([int(format(k, f"0{levels}b")[::-1], 2) if levels else 0
                                     for k in range(half)], np.int64)
        # Twiddles e^{+2 pi i j / size} of every stage, stage s (size 2^(s+1)) at [2^s - 1 + j].
        twiddle = np.concatenate([np.exp(2j * math.pi * np.arange(size // 2) / size)
                                  for size in (2 ** (s + 1) for s in range(levels))])
        self.twiddle_cos = twiddle.real.astype(np.float32)
        self.twiddle_sin = twiddle.imag.astype(np.float32)

    def __call__(self, products, count, tiles, inverse_root, distance, shift, ranks=None):
        """Distances and first-argmax shifts of a tile of pairs, in place; optionally rank counts.

        Args:
            products: float32 [R, count * tiles], spectral row r of pair q * tiles + t.
            inverse_root: float32 [tiles, W] 1 / sqrt(window energy) per shift, or [tiles, 1]
                when it does not depend on the shift (Wg == W).
            distance: float32 [count, tiles] out, 2 - 2 corr[o*] * inverse_root[t, o*].
            shift: int16 [count, tiles] out, o* (the first maximum).
            ranks: optional ``TileRanks``: each query's true pair takes its distance, and the
                pairs that count against the query (d <= d_true, or < under the optimistic rule)
                are counted, except those within ``band`` of d_true, which are flagged instead.
        """
        # As many threads as torch uses for the GEMMs (``--threads``, OMP_NUM_THREADS).
        import torch

        numba.set_num_threads(max(1, min(torch.get_num_threads(), numba.config.NUMBA_NUM_THREADS)))
        if ranks is None:
            ranks = TileRanks.none(count, tiles)
        _tile_epilogue(products, count, tiles, self.rows, self.pack_cos, self.pack_sin,
                       self.bit_reverse, self.twiddle_cos, self.twiddle_sin, inverse_root,
                       distance, shift, ranks.true_distance, ranks.true_column, ranks.pessimistic,
                       np.float32(ranks.band), ranks.counts, ranks.near)


class TileRanks:
    """Rank bookkeeping of one tile of pairs, filled by the epilogue.

    Args:
        true_distance: float32 [count] d_true per query (NaN: unknown, nothing counts).
        true_column: int64 [count] the true tile's column in this tile of pairs, or -1.
        pessimistic: ties count against the query (WITW) or not (DSM).
        band: pairs with |d - d_true| <= band are flagged in ``near`` rather than counted.
        tiles: the tile of pairs' width (its aerial block's size).

    Attributes:
        counts: int64 [count] pairs counted against each query (true and near pairs left out).
        near: bool [count, tiles] pairs to recompute in float64.
    """

    def __init__(self, true_distance, true_column, pessimistic: bool, band: float, tiles: int):
        self.true_distance = np.ascontiguousarray(true_distance, dtype=np.float32)
        self.true_column = np.ascontiguousarray(true_column, dtype=np.int64)
        self.pessimistic = bool(pessimistic)
        self.band = float(band)
        self.counts = np.zeros(len(self.true_distance), np.int64)
        self.near = np.zeros((len(self.true_distance), tiles), np.bool_)

    @classmethod
    def none(cls, count, tiles):
        """No true pairs: nothing counts (NaN never compares)."""
        return cls(np.full(count, np.nan), np.full(count, -1), True, 0.0, tiles)


@numba.njit(parallel=True, cache=True, nogil=True)
def _tile_epilogue(products, count, tiles, rows, pack_cos, pack_sin, bit_reverse, twiddle_cos,
                   twiddle_sin, inverse_root, distance, shift, true_distance, true_column,
                   pessimistic, band, counts, near):  # pragma: no cover - compiled
    # float32 throughout (typed constants): mixing in float64 would halve the SIMD width.
    # Arrays are indexed in full (products[row, start + p]), not sliced: sliced views lose
    # their contiguity for LLVM and the loops stop vectorising.
    # One query row per parallel task: its rank count has a single writer.
    half = pack_cos.shape[0]
    chunk = max(1, min(tiles, max(64, CHUNK_FLOATS // half)))
    per_shift = inverse_root.shape[1] > 1
    two = np.float32(2.0)
    scale = np.float32(1.0 / half)
    for query in numba.prange(count):
        d_true = true_distance[query]
        counted = 0
        real = np.empty((half, chunk), np.float32)
        imag = np.empty((half, chunk), np.float32)
        # Running maximum and its shift (float32: the selects stay in one SIMD width), in two
        # rows used in turn: "best = max(best, x)" in place compiles to slow masked stores.
        best = np.empty((2, chunk), np.float32)
        best_shift = np.empty((2, chunk), np.float32)
        root = np.empty(chunk, np.float32)
        for first_tile in range(0, tiles, chunk):
            start = query * tiles + first_tile
            size = min(chunk, tiles - first_tile)
            _pack(products, rows, start, size, pack_cos, pack_sin, bit_reverse, real, imag)
            length = 2
            while length <= half:
                step = length // 2
                for block in range(0, half, length):
                    for j in range(step):
                        w_real = twiddle_cos[step - 1 + j]
                        w_imag = twiddle_sin[step - 1 + j]
                        a, b = block + j, block + j + step
                        for p in range(size):
                            t_real = w_real * real[b, p] - w_imag * imag[b, p]
                            t_imag = w_real * imag[b, p] + w_imag * real[b, p]
                            real[b, p] = real[a, p] - t_real
                            imag[b, p] = imag[a, p] - t_imag
                            real[a, p] += t_real
                            imag[a, p] += t_imag
                length *= 2
            # corr[2n] = Re z[n] / M and corr[2n + 1] = Im z[n] / M; strict ">" keeps the
            # first of equal maxima.
            for p in range(size):
                best[0, p] = real[0, p]
                best_shift[0, p] = 0.0
            for n in range(half):
                source, target = n % 2, (n + 1) % 2
                even, odd = np.float32(2 * n), np.float32(2 * n + 1)
                for p in range(size):
                    x_even, x_odd, previous = real[n, p], imag[n, p], best[source, p]
                    larger = x_even if x_even > previous else previous
                    at = even if x_even > previous else best_shift[source, p]
                    best[target, p] = x_odd if x_odd > larger else larger
                    best_shift[target, p] = odd if x_odd > larger else at
            last = half % 2
            if per_shift:  # 1 / sqrt(E) at o*: a gather, kept out of the loop that vectorises
                for p in range(size):
                    root[p] = inverse_root[first_tile + p, np.int32(best_shift[last, p])]
            else:
                for p in range(size):
                    root[p] = inverse_root[first_tile + p, 0]
            for p in range(size):
                tile = first_tile + p
                o = np.int32(best_shift[last, p])
                value = two - two * (best[last, p] * scale) * root[p]
                shift[query, tile] = o
                distance[query, tile] = value
                is_near, against = _compare(value, d_true, band, pessimistic)
                near[query, tile] = is_near
                counted += np.int64(against)
        column = true_column[query]
        if column >= 0:  # the true pair takes d_true and is neither counted nor flagged
            counted -= np.int64(_compare(distance[query, column], d_true, band, pessimistic)[1])
            near[query, column] = False
            distance[query, column] = d_true
        counts[query] += counted


@numba.njit(inline="always", cache=True)
def _compare(value, d_true, band, pessimistic):  # pragma: no cover - compiled
    """(near, counts): within ``band`` of d_true (to recompute), or counted against the query.

    d - d_true keeps its sign and is 0 only for equal values; NaN compares false.
    """
    difference = value - d_true
    is_near = (band > 0) & (abs(difference) <= band)
    against = ((difference < 0) | (pessimistic & (difference == 0))) > is_near  # and not near
    return is_near, against


@numba.njit(inline="always", cache=True)
def _pack(products, rows, start, size, pack_cos, pack_sin, bit_reverse, real,
          imag):  # pragma: no cover - compiled
    """Z_k = E_k + i O_k for k < M into the bit-reversed rows of ``real``, ``imag``.

    X_f is P_f: real rows for f = 0 and M, else k1, k2, k3 with X = (k1 - k3) + i (k1 + k2).
    Each k with its mirror M - k reads the six rows of X_k and X_{M-k} once and writes Z_k and
    Z_{M-k}, in one loop over the pairs.
    """
    half = pack_cos.shape[0]
    point_five = np.float32(0.5)
    dc, nyquist, target = rows[0, 0], rows[half, 0], bit_reverse[0]
    for p in range(size):  # X_0 and X_M are real: Z_0 = (X_0 + X_M) / 2 + i (X_0 - X_M) / 2
        x_dc, x_nyquist = products[dc, start + p], products[nyquist, start + p]
        real[target, p] = point_five * (x_dc + x_nyquist)
        imag[target, p] = point_five * (x_dc - x_nyquist)
    for k in range(1, half // 2 + 1):
        mirror = half - k
        k1, k2, k3 = rows[k, 0], rows[k, 1], rows[k, 2]
        m1, m2, m3 = rows[mirror, 0], rows[mirror, 1], rows[mirror, 2]
        cos_k, sin_k, cos_m, sin_m = pack_cos[k], pack_sin[k], pack_cos[mirror], pack_sin[mirror]
        target_k, target_m = bit_reverse[k], bit_reverse[mirror]
        both = k < mirror  # k = M/2 is its own mirror
        for p in range(size):
            value = products[k1, start + p]
            x_real = value - products[k3, start + p]
            x_imag = value + products[k2, start + p]
            value = products[m1, start + p]
            y_real = value - products[m3, start + p]
            y_imag = value + products[m2, start + p]
            # With X = X_k, Y = X_{M-k}: S = (X + conj Y) / 2, D = (X - conj Y) / 2, and
            # Z_k = S + i D e^{i theta_k}; Z_{M-k} uses conj S and -conj D.
            sum_real = point_five * (x_real + y_real)
            sum_imag = point_five * (x_imag - y_imag)
            difference_real = point_five * (x_real - y_real)
            difference_imag = point_five * (x_imag + y_imag)
            odd_real = difference_real * cos_k - difference_imag * sin_k
            odd_imag = difference_real * sin_k + difference_imag * cos_k
            real[target_k, p] = sum_real - odd_imag
            imag[target_k, p] = sum_imag + odd_real
            if both:
                odd_real = -difference_real * cos_m - difference_imag * sin_m
                odd_imag = -difference_real * sin_m + difference_imag * cos_m
                real[target_m, p] = sum_real - odd_imag
                imag[target_m, p] = odd_real - sum_imag
