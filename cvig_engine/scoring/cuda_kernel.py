"""The fused CUDA scoring kernel (kernels/score.cu), compiled with NVRTC and launched through CuPy.

One launch scores a query block against every tile: correlation spectra, inverse DFT, first
argmax, crop-normalised distance, rank counts and top-L lists, with nothing of size N x M x W
reaching global memory. The host then merges the per-split top-L lists and recomputes in
float64 the near-tie pairs the kernel listed (``cvig_engine.scoring.engine``).

Shapes the kernel takes: W <= 64 (its inverse-DFT basis lives in constant memory) and fp32.
Anything else, or a machine where CuPy or NVRTC cannot load the kernel, uses the torch CUDA path.
"""
from __future__ import annotations

import importlib.resources
import math

import numpy as np

from cvig_engine.errors import CvigMissingDependency
from cvig_engine.scoring.geometry import Geometry, ground_spectra, inverse_root_energy

__all__ = ["FusedScorer", "kernel_source", "kernel_options", "inverse_dft_basis", "tile_spectra",
           "query_spectra", "split_plan", "merge_candidates", "MAX_WIDTH", "THREADS",
           "QUERIES_PER_BLOCK"]

MAX_WIDTH = 64
QUERIES_PER_BLOCK = 16  # CVIG_TQ in score.cu
_TILES_PER_STEP = 16  # CVIG_TA
THREADS = 256
_BLOCKS_PER_MULTIPROCESSOR = 8
_TILE_ROWS = 2048  # aerial rows transformed at a time when preparing the spectra


def kernel_source() -> str:
    """The CUDA C++ source shipped in the ``cvig_engine.kernels`` package."""
    return importlib.resources.files("cvig_engine.kernels").joinpath("score.cu").read_text()


def kernel_options(geometry: Geometry, candidates: int) -> tuple:
    """The -D options that fix the kernel's compile-time shape."""
    return (f"-DCVIG_W={geometry.aerial_width}", f"-DCVIG_K={geometry.depth}",
            f"-DCVIG_V={geometry.vertical}", f"-DCVIG_L={candidates}")


def tile_spectra(aerial, geometry: Geometry, xp=np):
    """complex64 [n, V, K, F]: the rfft over the width of each vertical window (numpy or cupy)."""
    spectrum = xp.fft.rfft(xp.asarray(aerial, dtype=xp.float64), axis=-1)  # [n, C, Ha, F]
    height = geometry.ground_height
    windows = [spectrum[:, :, v:v + height].reshape(len(spectrum), geometry.depth, -1)
               for v in range(geometry.vertical)]
    return xp.stack(windows, axis=1).astype(xp.complex64)


def query_spectra(ground, geometry: Geometry) -> np.ndarray:
    """complex64 [n, K, F]: the rfft of the normalised ground maps, zero-padded to W."""
    spectra = ground_spectra(ground, geometry.aerial_width)
    return spectra.reshape(len(spectra), geometry.depth, -1).astype(np.complex64)


def split_plan(num_tiles: int, num_queries: int, multiprocessors: int) -> tuple[int, int]:
    """(splits, tiles per split): enough thread blocks to fill the GPU a few times over."""
    query_blocks = max(1, -(-int(num_queries) // QUERIES_PER_BLOCK))
    wanted = max(1, _BLOCKS_PER_MULTIPROCESSOR * multiprocessors // query_blocks)
    steps = -(-num_tiles // _TILES_PER_STEP)
    per_split = -(-steps // max(1, min(wanted, steps))) * _TILES_PER_STEP
    return -(-num_tiles // per_split), per_split


def merge_candidates(distance, index, shift, num_tiles: int, size: int) -> dict:
    """The ``size`` best of the per-split lists [n, splits * L] in (distance, index) order.

    Returns a dict of [n, size] arrays: index (-1 for unfilled slots), distance, shift.
    """
    index = np.asarray(index, dtype=np.int64).copy()
    index[index >= num_tiles] = -1
    order = np.lexsort((np.where(index < 0, np.iinfo(np.int64).max, index), distance), axis=1)
    order = order[:, :size]
    return {"index": np.take_along_axis(index, order, 1),
            "distance": np.take_along_axis(np.asarray(distance), order, 1),
            "shift": np.take_along_axis(np.asarray(shift, dtype=np.int64), order, 1)}


def inverse_dft_basis(width: int) -> np.ndarray:
    """float32 [2F, W]: rows 2f and 2f+1 turn Re P_f and Im P_f into correlations (see score.cu)."""
    frequencies = width // 2 + 1
    orientation = np.arange(width, dtype=np.float64)
    basis = np.zeros((2 * frequencies, width))
    for f in range(frequencies):
        weight = 1.0 if f == 0 or 2 * f == width else 2.0
        angle = 2.0 * math.pi * f * orientation / width
        basis[2 * f] = weight * np.cos(angle) / width
        basis[2 * f + 1] = -weight * np.sin(angle) / width
    return basis.astype(np.float32)


class FusedScorer:
    """Scores query blocks against all tiles with the fused kernel.

    Args:
        geometry: the problem's shapes (W <= 64).
        aerial: aerial features [M, C, Ha, W] (numpy).
        energy: float64 window energies [M, V, W].
        ties: "pessimistic" or "optimistic".
        candidates: L, the top-L list length.
        band: near-tie band (pairs with |d - d_true| <= band are listed, not counted).
        queries_per_launch: the largest query block that will be passed to ``score``.

    Raises:
        CvigMissingDependency: CuPy is not installed. ValueError: a shape the kernel does not
        take. Any CuPy / NVRTC error when the kernel cannot be compiled or loaded.
    """

    def __init__(self, geometry: Geometry, aerial: np.ndarray, energy: np.ndarray, *, ties: str,
                 candidates: int, band: float, queries_per_launch: int):
        try:
            import cupy
        except ImportError:
            raise CvigMissingDependency("the CUDA kernel needs CuPy: pip install 'cvig-engine[gpu]'"
                                        ) from None
        if geometry.aerial_width > MAX_WIDTH:
            raise ValueError(f"the fused kernel takes W <= {MAX_WIDTH}, "
                             f"got {geometry.aerial_width}")
        self.cupy = cupy
        self.geometry = geometry
        self.ties = ties
        self.candidates = candidates
        self.band = band
        self.num_tiles = len(aerial)
        options = ("-std=c++17",) + kernel_options(geometry, candidates)
        self.module = cupy.RawModule(code=kernel_source(), options=options)
        self.function = self.module.get_function("cvig_score")
        basis = inverse_dft_basis(geometry.aerial_width)
        symbol = self.module.get_global("c_basis")
        cupy.ndarray(basis.shape, cupy.float32, symbol)[...] = cupy.asarray(basis)
        self.tile_spectra = cupy.concatenate([
            tile_spectra(aerial[start:start + _TILE_ROWS], geometry, xp=cupy)
            for start in range(0, len(aerial), _TILE_ROWS)])
        self.inverse_root = cupy.asarray(inverse_root_energy(energy.reshape(len(aerial), -1)))
        multiprocessors = cupy.cuda.Device().attributes["MultiProcessorCount"]
        self.splits, self.tiles_per_split = split_plan(self.num_tiles, queries_per_launch,
                                                       multiprocessors)
        self.near_capacity = 1 << 16

    def score(self, ground, match, true_distance, want_matrix: bool) -> dict:
        """Score a query block [n, C, H, Wg] against every tile.

        Returns:
            counts (uint32 [n], leaving out true and near pairs), near_rows / near_tiles (int64,
            the listed near pairs), candidates (``merge_candidates``: index, distance, flat
            shift, [n, L] each), and matrix (float32 [n, M]) when ``want_matrix``.
        """
        cupy = self.cupy
        count = len(ground)
        spectra = cupy.asarray(query_spectra(ground, self.geometry))
        true32 = cupy.asarray(np.asarray(true_distance, dtype=np.float32))
        match32 = cupy.asarray(np.asarray(match, dtype=np.int32))
        matrix = cupy.empty((count, self.num_tiles) if want_matrix else (1,), dtype=cupy.float32)
        while True:
            counts = cupy.zeros(count, dtype=cupy.uint32)
            near_count = cupy.zeros(1, dtype=cupy.int32)
            near_pairs = cupy.empty(2 * self.near_capacity, dtype=cupy.int32)
            shape = (count, self.splits, self.candidates)
            candidate_distance = cupy.empty(shape, dtype=cupy.float32)
            candidate_index = cupy.empty(shape, dtype=cupy.int32)
            candidate_shift = cupy.empty(shape, dtype=cupy.int32)
            grid = (-(-count // QUERIES_PER_BLOCK), self.splits)
            self.function(grid, (THREADS,), (
                spectra, self.tile_spectra, self.inverse_root, true32, match32,
                np.int32(count), np.int32(self.num_tiles), np.int32(self.tiles_per_split),
                np.int32(self.splits), np.int32(self.ties == "pessimistic"),
                np.float32(self.band), counts, near_count, near_pairs, np.int32(self.near_capacity),
                candidate_distance, candidate_index, candidate_shift, np.int32(want_matrix),
                matrix))
            listed = int(near_count.get()[0])
            if listed <= self.near_capacity:
                break
            self.near_capacity = int(listed * 1.25) + 1  # too many near ties: again, larger
        pairs = near_pairs[:2 * listed].get().reshape(-1, 2).astype(np.int64)
        candidates = merge_candidates(candidate_distance.get().reshape(count, -1),
                                      candidate_index.get().reshape(count, -1),
                                      candidate_shift.get().reshape(count, -1), self.num_tiles,
                                      self.candidates)
        result = {"counts": counts.get(), "near_rows": pairs[:, 0], "near_tiles": pairs[:, 1],
                  "candidates": candidates}
        if want_matrix:
            result["matrix"] = matrix.get()
        return result
