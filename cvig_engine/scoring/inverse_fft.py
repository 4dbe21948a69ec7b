"""CPU epilogue of the spectral path: the inverse real FFT of every pair's spectrum, the first
argmax over the shifts and the crop-normalised distance, fused in one compiled (numba) pass.

The GEMM form of the inverse DFT costs W * R / 2 multiply-adds per pair (3,040 at W = 64) and
streams its [pairs, W] output through memory twice more for the maximum. A radix-2 FFT needs
about 5 * W * log2(W) / 2 operations and keeps each chunk of pairs in cache: the spectral rows
of 256 pairs are read once, the correlations never leave the core.

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

#: Pairs per chunk: a chunk's two [M, CHUNK] float32 arrays stay in L2 (64 KiB at W = 64);
#: 256 measured fastest (128 and 1024 were ~25% slower).
CHUNK = 256


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
    per_shift = inverse_root.shape[1] > 1
    two = np.float32(2.0)
    scale = np.float32(1.0 / half)
    for query in numba.prange(count):
        d_true = true_distance[query]
        counted = 0
        for first_tile in range(0, tiles, CHUNK):
            start = query * tiles + first_tile
            size = min(CHUNK, tiles - first_tile)
            real = np.empty((half, CHUNK), np.float32)
            imag = np.empty((half, CHUNK), np.float32)
            spectrum = np.empty((4, CHUNK), np.float32)  # Re X_k, Im X_k, Re X_{M-k}, Im X_{M-k}
            for k in range(half // 2 + 1):
                # X_k and X_{M-k} give both Z_k and Z_{M-k} (Z_k = E_k + i O_k): each spectral
                # row is read once. Z goes to the bit-reversed place for the in-place FFT.
                mirror = half - k
                _spectrum(products, rows, k, start, size, spectrum, 0)
                _spectrum(products, rows, mirror, start, size, spectrum, 2)
                _pack(real, imag, spectrum, 0, 2, pack_cos[k], pack_sin[k], bit_reverse[k], size)
                if 0 < k < mirror:  # Z_M does not exist; k = M/2 is its own mirror
                    _pack(real, imag, spectrum, 2, 0, pack_cos[mirror], pack_sin[mirror],
                          bit_reverse[mirror], size)
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
            # corr[2n] = Re z[n] / M and corr[2n + 1] = Im z[n] / M. The maximum (a pass that
            # vectorises), then per pair a scan for the first o that reaches it, which stops
            # early; select-based running argmaxes compile to slow masked stores here.
            # (Two rows used in turn: "best = max(best, x)" in place becomes a masked store.)
            running = np.empty((2, CHUNK), np.float32)
            for p in range(size):
                running[0, p] = real[0, p]
            for n in range(half):
                source, target = running[n % 2], running[(n + 1) % 2]
                for p in range(size):
                    a, b, c = real[n, p], imag[n, p], source[p]
                    larger = a if a > b else b
                    target[p] = larger if larger > c else c
            best = running[half % 2]
            best_shift = np.empty(CHUNK, np.int64)
            for p in range(size):
                for n in range(half):
                    if real[n, p] == best[p]:
                        best_shift[p] = 2 * n
                        break
                    if imag[n, p] == best[p]:
                        best_shift[p] = 2 * n + 1
                        break
            for p in range(size):
                tile = first_tile + p
                o = best_shift[p]
                root = inverse_root[tile, o] if per_shift else inverse_root[tile, 0]
                value = two - two * (best[p] * scale) * root
                shift[query, tile] = o
                if tile == true_column[query]:
                    distance[query, tile] = d_true
                    continue
                distance[query, tile] = value
                # d - d_true keeps its sign and is 0 only for equal values; NaN compares false.
                difference = value - d_true
                if band > 0 and abs(difference) <= band:
                    near[query, tile] = True
                elif difference < 0 or (pessimistic and difference == 0):
                    counted += 1
        counts[query] += counted


@numba.njit(inline="always", cache=True)
def _pack(real, imag, spectrum, at, mirror_at, cos_k, sin_k, target, size):  # pragma: no cover
    """Z_k = E_k + i O_k into row ``target`` from X_k (spectrum[at]) and X_{M-k} (at mirror_at)."""
    point_five = np.float32(0.5)
    for p in range(size):
        x_real, x_imag = spectrum[at, p], spectrum[at + 1, p]
        m_real, m_imag = spectrum[mirror_at, p], -spectrum[mirror_at + 1, p]
        difference_real = point_five * (x_real - m_real)
        difference_imag = point_five * (x_imag - m_imag)
        odd_real = difference_real * cos_k - difference_imag * sin_k
        odd_imag = difference_real * sin_k + difference_imag * cos_k
        real[target, p] = point_five * (x_real + m_real) - odd_imag
        imag[target, p] = point_five * (x_imag + m_imag) + odd_real


@numba.njit(inline="always", cache=True)
def _spectrum(products, rows, frequency, start, size, out, at):  # pragma: no cover - compiled
    """out[at], out[at + 1] = Re, Im of P_f for ``size`` pairs, from its real or k1, k2, k3 rows."""
    first, k2, k3 = rows[frequency, 0], rows[frequency, 1], rows[frequency, 2]
    if k2 < 0:
        for p in range(size):
            out[at, p] = products[first, start + p]
            out[at + 1, p] = 0.0
        return
    for p in range(size):
        value = products[first, start + p]
        out[at, p] = value - products[k3, start + p]
        out[at + 1, p] = value + products[k2, start + p]
