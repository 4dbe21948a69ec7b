"""Shapes of one scoring problem, the real-spectrum layout, the cost model and window energies.

Notation: C channels, ground map H x Wg, aerial map Ha x W. The ground map slides circularly over
the W columns (the orientation bin o) and, with vertical search, over V = Ha - H + 1 rows
(offset v). Shifts are numbered s = v * W + o, so the first maximum over s is the first over v,
then over o: the order of ``orientation_distance``.

Real spectrum: the circular correlation over the W columns is computed through the DFT along the
width. A real signal of length W has W real degrees of freedom in its spectrum: the real parts
of frequency 0 (and W/2 for even W) and the real and imaginary parts of 1 <= f < W/2. For a pair,
P_f = sum over (c, h) of conj(G_f) A_f; each complex product is formed with three real products
(Gauss): with a + ib = conj(G_f) and c + id = A_f,

    k1 = sum (a + b) c,   k2 = sum a (d - c),   k3 = sum b (c + d),
    Re P_f = k1 - k3,     Im P_f = k1 + k2,

so every "row" r of the spectrum is one real GEMM of the query side L_r against the tile side
A_r, contracted over K = C * H. The inverse DFT is then a real matrix (the basis) applied to the
rows. For even W the rows are grouped by the parity of f: even frequencies give a sequence of
period W/2 (E) and odd ones an antiperiodic one (O), so corr[o] = E[o] + O[o] and
corr[o + W/2] = E[o] - O[o], which halves the inverse transform.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

__all__ = ["Geometry", "SpectralLayout", "ENERGY_FLOOR", "window_energy_float64",
           "choose_algorithm", "flops_per_pair", "normalised_ground", "ground_spectra",
           "inverse_root_energy"]

#: Window energies are clamped to this before the square root, as in ``orientation_distance``.
ENERGY_FLOOR = 1e-12


@dataclass(frozen=True)
class Geometry:
    """Feature-map shapes of one scoring problem."""

    channels: int
    ground_height: int
    ground_width: int
    aerial_height: int
    aerial_width: int

    @classmethod
    def from_shapes(cls, ground_shape, aerial_shape) -> "Geometry":
        """From (C, H, Wg) and (C, Ha, W)."""
        channels, ground_height, ground_width = (int(value) for value in ground_shape)
        _, aerial_height, aerial_width = (int(value) for value in aerial_shape)
        return cls(channels, ground_height, ground_width, aerial_height, aerial_width)

    @property
    def vertical(self) -> int:
        """V, the number of vertical offsets (1 without vertical search)."""
        return self.aerial_height - self.ground_height + 1

    @property
    def shifts(self) -> int:
        """S = V * W candidate shifts per pair."""
        return self.vertical * self.aerial_width

    @property
    def depth(self) -> int:
        """K = C * H, the contraction length of one spectral row."""
        return self.channels * self.ground_height

    @property
    def full_circle(self) -> bool:
        """Wg == W: every window holds the whole row, so its energy does not depend on o."""
        return self.ground_width == self.aerial_width


class SpectralLayout:
    """Which spectral row holds what, and the inverse-DFT basis, for a width W.

    Attributes:
        rows: list of (frequency, kind) with kind in {"real", "k1", "k2", "k3"}, grouped (for
            even W) as all even frequencies first, then all odd ones.
        even_rows: how many rows belong to even frequencies (None for odd W: no split).
        basis: float64 [W, R]; corr[o] = sum_r basis[o, r] * P[r].
    """

    def __init__(self, width: int):
        self.width = width = int(width)
        real = [0] + ([width // 2] if width % 2 == 0 else [])
        complex_frequencies = list(range(1, (width + 1) // 2))
        entries = [(f, "real") for f in real]
        entries += [(f, kind) for f in complex_frequencies for kind in ("k1", "k2", "k3")]
        if width % 2 == 0:
            entries.sort(key=lambda entry: entry[0] % 2)  # stable: even frequencies first
            self.even_rows = sum(1 for f, _ in entries if f % 2 == 0)
        else:
            self.even_rows = None
        self.rows = entries
        orientation = np.arange(width, dtype=np.float64)[:, None]
        frequency = np.array([f for f, _ in entries], dtype=np.float64)[None, :]
        angle = 2.0 * math.pi * frequency * orientation / width
        cosine, sine = np.cos(angle), np.sin(angle)
        basis = np.empty((width, len(entries)))
        for column, (_, kind) in enumerate(entries):
            if kind == "real":
                basis[:, column] = cosine[:, column]
            elif kind == "k1":
                basis[:, column] = 2.0 * (cosine[:, column] - sine[:, column])
            elif kind == "k2":
                basis[:, column] = -2.0 * sine[:, column]
            else:
                basis[:, column] = -2.0 * cosine[:, column]
        self.basis = basis / width

    @property
    def num_rows(self) -> int:
        """R, the number of real GEMM rows per pair."""
        return len(self.rows)

    def query_rows(self, spectrum):
        """Query-side operands L_r from conj-free spectra.

        Args:
            spectrum: complex array [..., F] (numpy or torch), the rfft of the normalised map.

        Returns:
            A list of R real arrays [...], in row order: Re G for real rows; for complex rows
            a + b, a and b with a = Re G, b = -Im G.
        """
        out = []
        for frequency, kind in self.rows:
            value = spectrum[..., frequency]
            a, b = value.real, -value.imag
            out.append(a if kind in ("real", "k2") else (a + b if kind == "k1" else b))
        return out

    def tile_rows(self, spectrum):
        """Tile-side operands A_r: Re A for real rows; c, d - c and c + d for complex rows."""
        out = []
        for frequency, kind in self.rows:
            value = spectrum[..., frequency]
            c, d = value.real, value.imag
            out.append(c if kind in ("real", "k1") else (d - c if kind == "k2" else c + d))
        return out


def flops_per_pair(geometry: Geometry, algorithm: str, *, inverse_fft: bool = False) -> float:
    """Floating-point operations per (query, tile) pair of each algorithm.

    ``inverse_fft``: the spectral path inverts with the CPU's radix-2 FFT epilogue
    (``scoring.inverse_fft``: about 5 M log2 M for the butterflies, 12 M to pack the real
    spectrum into M complex points and W for the maximum, with W = 2M) rather than a GEMM.
    """
    if algorithm == "direct":
        return 2.0 * geometry.shifts * geometry.depth * geometry.ground_width
    layout_rows = SpectralLayout(geometry.aerial_width).num_rows
    gemm = 2.0 * layout_rows * geometry.depth
    width = geometry.aerial_width
    if inverse_fft:
        half = width // 2
        inverse = 5.0 * half * math.log2(half) + 12.0 * half + width
    else:
        inverse = (1.0 if width % 2 == 0 else 2.0) * width * layout_rows
    return geometry.vertical * (gemm + inverse)


def choose_algorithm(geometry: Geometry) -> str:
    """"spectral" or "direct", whichever costs fewer operations per pair.

    The spectral path carries more work per operation (more passes over its intermediates, a
    few small GEMMs), so it must win by a margin of 1.5x.
    """
    spectral = flops_per_pair(geometry, "spectral")
    direct = flops_per_pair(geometry, "direct")
    return "spectral" if 1.5 * spectral < direct else "direct"


def window_energy_float64(aerial, ground_height: int, ground_width: int) -> np.ndarray:
    """E[m, v, o] = sum of aerial^2 over the (circular) window at (v, o), in float64.

    Args:
        aerial: [M, C, Ha, W] (any float dtype).

    Returns:
        float64 [M, V, W].
    """
    squares = np.square(np.asarray(aerial, dtype=np.float64)).sum(axis=1)  # [M, Ha, W]
    vertical = squares.shape[1] - ground_height + 1
    rows = np.stack([squares[:, v:v + ground_height].sum(axis=1) for v in range(vertical)], axis=1)
    energy = np.zeros_like(rows)
    for column in range(ground_width):
        energy += np.roll(rows, -column, axis=-1)  # window at o holds columns o .. o+Wg-1 (mod W)
    return energy


def normalised_ground(ground) -> np.ndarray:
    """Ground maps [n, C, H, Wg] L2-normalised over (C, H, Wg), in float64 (norms clamped)."""
    ground = np.asarray(ground, dtype=np.float64)
    norms = np.sqrt(np.square(ground).reshape(len(ground), -1).sum(axis=1))
    return ground / np.maximum(norms, ENERGY_FLOOR)[:, None, None, None]


def ground_spectra(ground, width: int) -> np.ndarray:
    """rfft over the width (zero-padded to W) of the normalised ground maps [n, C, H, F]."""
    return np.fft.rfft(normalised_ground(ground), n=width, axis=-1)


def inverse_root_energy(energy) -> np.ndarray:
    """float32 1 / sqrt(max(E, ENERGY_FLOOR)), the factor that normalises the crop."""
    return (1.0 / np.sqrt(np.maximum(energy, ENERGY_FLOOR))).astype(np.float32)
