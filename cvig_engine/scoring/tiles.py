"""Distances of one tile of pairs (a query block against an aerial block), in torch.

The same code runs on the CPU (the default path, for CI and users without a GPU) and on CUDA
(the fallback where the CuPy kernel cannot load, and the reduced-precision modes).

Two algorithms (``geometry.choose_algorithm`` picks one per shape):

- ``spectral``: for each spectral row a GEMM over K = C * H (batched, one call), then the inverse
  DFT and the first argmax over the shifts. On the CPU, for W = 2M with M a power of two and no
  vertical search, a compiled inverse real FFT fused with the argmax and the distance
  (``inverse_fft``); elsewhere the inverse DFT is a real GEMM against a precomputed basis (split
  in two halves for even W) and, with Wg == W (the window energy does not depend on the shift),
  only the maximum is taken.
- ``direct``: for each shift, a GEMM of the ground maps against that shifted aerial window, with
  a running first argmax (strict ``>``).

Both give float32 distances d = 2 - 2 corr[s*] / sqrt(E[m, s*]).
"""
from __future__ import annotations

import math

import numpy as np
import torch

from cvig_engine.scoring.geometry import (Geometry, SpectralLayout, ground_spectra,
                                          inverse_root_energy, normalised_ground)

__all__ = ["TileScorer", "PRECISIONS"]

PRECISIONS = ("fp32", "tf32", "bf16", "fp16")
_HALF_TYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


class TileScorer:
    """Float32 distances for (query block, aerial block) tiles on one torch device.

    Args:
        geometry: the problem's shapes.
        aerial: aerial features [M, C, Ha, W] (numpy, any float dtype), kept by reference.
        energy: float64 window energies [M, V, W].
        device: torch device.
        algorithm: "spectral" or "direct".
        tile_aerial: tiles per aerial block.
        precision: "fp32", or on CUDA "tf32", "bf16", "fp16" for the spectral GEMMs.
        cache_bytes: keep every aerial block's operands (spectral rows or float32 maps) when they
            take no more than this; otherwise they are rebuilt for each query block.
    """

    def __init__(self, geometry: Geometry, aerial: np.ndarray, energy: np.ndarray, *, device,
                 algorithm: str, tile_aerial: int, precision: str = "fp32",
                 cache_bytes: int = 1 << 30):
        self.geometry = geometry
        self.aerial = aerial
        self.device = torch.device(device)
        self.algorithm = algorithm
        self.precision = precision
        self.blocks = [(start, min(start + tile_aerial, len(aerial)))
                       for start in range(0, len(aerial), tile_aerial)]
        inverse_root = inverse_root_energy(energy)  # [M, V, W]
        if geometry.full_circle:
            inverse_root = inverse_root[:, :, 0]  # constant over o
        self.inverse_root = torch.from_numpy(np.ascontiguousarray(inverse_root)).to(self.device)
        self.fft_epilogue = None
        if algorithm == "spectral":
            self.layout = SpectralLayout(geometry.aerial_width)
            basis = torch.from_numpy(self.layout.basis.astype(np.float32)).to(self.device)
            half = geometry.aerial_width // 2
            if self.layout.even_rows is not None:
                split = self.layout.even_rows
                self.basis_even = basis[:half, :split].T.contiguous()  # [R_even, W/2]
                self.basis_odd = basis[:half, split:].T.contiguous()  # [R_odd, W/2]
            else:
                self.basis_full = basis.T.contiguous()  # [R, W]
            per_tile = 4 * geometry.vertical * self.layout.num_rows * geometry.depth
            if self.device.type == "cpu":  # numba only where it runs: CUDA hosts may lack it
                from cvig_engine.scoring.inverse_fft import FftEpilogue, applies_to

                if applies_to(geometry, "cpu"):
                    self.fft_epilogue = FftEpilogue(self.layout)
                    # [M, 1] (full circle: one energy per tile) or [M, W], as the epilogue reads.
                    self.inverse_root_rows = np.ascontiguousarray(
                        self.inverse_root.numpy().reshape(len(aerial), -1), dtype=np.float32)
        else:
            per_tile = 4 * geometry.channels * geometry.aerial_height * geometry.aerial_width
        self._cache = {} if per_tile * len(aerial) <= cache_bytes else None
        self._buffers = {}

    # -- operands -------------------------------------------------------------------------------

    def query_operands(self, ground: np.ndarray):
        """Query-side operands of a block of ground maps [n, C, H, Wg]."""
        if self.algorithm == "direct":
            flat = normalised_ground(ground).reshape(len(ground), -1).astype(np.float32)
            return torch.from_numpy(flat).to(self.device)
        spectrum = ground_spectra(ground, self.geometry.aerial_width)
        spectrum = spectrum.reshape(len(ground), self.geometry.depth, -1)  # [n, K, F]
        by_frequency = np.ascontiguousarray(spectrum.transpose(2, 0, 1))  # rows: contiguous
        rows = np.empty((self.layout.num_rows, len(ground), self.geometry.depth), np.float32)
        for row, values in enumerate(self.layout.query_rows(np.moveaxis(by_frequency, 0, -1))):
            rows[row] = values  # [n, K]
        return self._lower(torch.from_numpy(rows).to(self.device))

    def aerial_operands(self, block: int):
        """Tile-side operands of aerial block ``block`` (cached when they fit)."""
        if self._cache is not None and block in self._cache:
            return self._cache[block]
        start, stop = self.blocks[block]
        aerial = np.asarray(self.aerial[start:stop], dtype=np.float64)
        if self.algorithm == "direct":
            operands = torch.from_numpy(aerial.astype(np.float32)).to(self.device)
        else:
            geometry = self.geometry
            spectrum = np.fft.rfft(aerial, axis=-1)  # [Ta, C, Ha, F]
            operands = np.empty((geometry.vertical, self.layout.num_rows, geometry.depth,
                                 len(aerial)), np.float32)
            for v in range(geometry.vertical):
                window = spectrum[:, :, v:v + geometry.ground_height]
                window = window.reshape(len(aerial), geometry.depth, -1)  # [Ta, K, F]
                # One transposing copy to [F, K, Ta]: each row is then a contiguous slice.
                by_frequency = np.ascontiguousarray(window.transpose(2, 1, 0))
                for row, values in enumerate(self.layout.tile_rows(np.moveaxis(by_frequency,
                                                                               0, -1))):
                    operands[v, row] = values  # [K, Ta]
            operands = self._lower(torch.from_numpy(operands).to(self.device))
        if self._cache is not None:
            self._cache[block] = operands
        return operands

    def _lower(self, tensor):
        """Cast GEMM operands to the reduced precision, if one was asked for."""
        return tensor.to(_HALF_TYPES[self.precision]) if self.precision in _HALF_TYPES else tensor

    # -- distances ------------------------------------------------------------------------------

    def tile_distances(self, query_operands, block: int) -> torch.Tensor:
        """Float32 distances [n, Ta] of the query block against aerial block ``block``.

        ``shifts_of`` then gives the shift of chosen pairs of this tile (until the next call).
        """
        start, stop = self.blocks[block]
        aerial_operands = self.aerial_operands(block)
        if self.fft_epilogue is not None:
            return self._spectral_fft(query_operands, aerial_operands, start, stop)
        inverse_root = self.inverse_root[start:stop]
        if self.algorithm == "direct":
            best, offset = self._direct(query_operands, aerial_operands)
        else:
            best, offset = self._spectral(query_operands, aerial_operands)
        count = stop - start
        if offset is None:  # full circle, one vertical offset: E depends on the tile only
            selected = inverse_root[:, 0][None, :]
        else:  # index of E: the flat shift, or with a full circle the vertical offset
            columns = torch.arange(count, device=self.device)[None, :]
            selected = inverse_root.reshape(count, -1)[columns, offset]
        return 2.0 - 2.0 * best * selected

    def shifts_of(self, rows: torch.Tensor, columns: torch.Tensor) -> torch.Tensor:
        """Flat shifts s = v * W + o (first maximum) of pairs (rows, columns) of the last tile."""
        kind, data = self._last
        if kind == "shift":
            return data[rows, columns]
        pairs = rows * data["tiles"] + columns
        if kind == "halves":  # corr[o] = E[o] + O[o], corr[o + W/2] = E[o] - O[o]
            even, odd = data["even"][pairs], data["odd"][pairs]
            correlation = torch.cat([even + odd, even - odd], dim=1)
        else:
            correlation = data["correlation"][pairs].reshape(len(pairs), -1)
        return correlation.argmax(dim=1)  # the first maximum

    def _buffer(self, name, shape):
        """A float32 scratch tensor of ``shape``: a view of one allocation kept per name.

        The allocation only grows, so the last, smaller aerial block of each query block does
        not free and re-fault hundreds of megabytes.
        """
        size = math.prod(shape)
        buffer = self._buffers.get(name)
        if buffer is None or buffer.numel() < size:
            buffer = torch.empty(size, dtype=torch.float32, device=self.device)
            self._buffers[name] = buffer
        return buffer[:size].view(shape)

    def _products(self, query_operands, tile_operands, out):
        """P = L_r A_r for every row r into ``out`` [R, n, Ta] (float32)."""
        if self.precision in _HALF_TYPES:
            try:
                out.copy_(torch.bmm(query_operands, tile_operands, out_dtype=torch.float32))
            except (TypeError, RuntimeError, NotImplementedError):  # no fp32 output: upcast
                torch.bmm(query_operands.float(), tile_operands.float(), out=out)
        elif self.device.type == "cuda":
            previous = torch.backends.cuda.matmul.allow_tf32
            torch.backends.cuda.matmul.allow_tf32 = self.precision == "tf32"
            try:
                torch.bmm(query_operands, tile_operands, out=out)
            finally:
                torch.backends.cuda.matmul.allow_tf32 = previous
        else:
            torch.bmm(query_operands, tile_operands, out=out)
        return out

    def _halves(self, flat_products, pairs):
        """E[o] and O[o] for o < W/2 from the even- and odd-frequency rows: [pairs, W/2] each."""
        split, half = self.layout.even_rows, self.geometry.aerial_width // 2
        even = torch.mm(flat_products[:split].T, self.basis_even,
                        out=self._buffer("even", (pairs, half)))  # period W/2
        odd = torch.mm(flat_products[split:].T, self.basis_odd,
                       out=self._buffer("odd", (pairs, half)))  # antiperiodic
        return even, odd

    def _spectral(self, query_operands, aerial_operands):
        """Best correlation [n, Ta] and the index of its window energy (None: per tile).

        Buffers are kept between calls: fresh multi-megabyte tensors would cost page faults.
        """
        geometry = self.geometry
        rows, count, _ = query_operands.shape
        tiles = aerial_operands.shape[-1]
        pairs = count * tiles
        width, half = geometry.aerial_width, geometry.aerial_width // 2
        products = self._buffer("products", (rows, count, tiles))
        flat_products = products.view(rows, pairs)
        split = self.layout.even_rows
        if geometry.full_circle and geometry.vertical == 1 and split is not None:
            # Only the maximum is needed, and max(E + O, E - O) = E + |O| exactly (rounding is
            # monotone): no correlation buffer. E and O stay for ``shifts_of``.
            self._products(query_operands, aerial_operands[0], products)
            even, odd = self._halves(flat_products, pairs)
            upper = torch.abs(odd, out=self._buffer("upper", (pairs, half))).add_(even)
            self._last = ("halves", {"even": even, "odd": odd, "tiles": tiles})
            return upper.amax(dim=1).view(count, tiles), None
        correlation = self._buffer("correlation", (pairs, geometry.vertical, width))
        for v in range(geometry.vertical):
            self._products(query_operands, aerial_operands[v], products)
            if split is None:
                torch.mm(flat_products.T, self.basis_full, out=correlation[:, v, :])
                continue
            even, odd = self._halves(flat_products, pairs)
            torch.add(even, odd, out=correlation[:, v, :half])  # corr[o]
            torch.sub(even, odd, out=correlation[:, v, half:])  # corr[o + W/2]
        flat = correlation.view(pairs, geometry.shifts)
        if geometry.full_circle:  # E depends on v only: the maximum per offset, then over v
            per_offset = correlation.amax(dim=2)  # [pairs, V]
            self._last = ("correlation", {"correlation": correlation, "tiles": tiles})
            if geometry.vertical == 1:
                return per_offset[:, 0].view(count, tiles), None
            offset = per_offset.argmax(dim=1, keepdim=True)  # first maximum over v
            return per_offset.gather(1, offset).view(count, tiles), offset.view(count, tiles)
        shift = _first_argmax(flat)
        self._last = ("shift", shift.view(count, tiles))
        return flat.gather(1, shift[:, None]).view(count, tiles), shift.view(count, tiles)

    @property
    def counts_ranks(self) -> bool:
        """Whether ``tile_ranks`` is available (the compiled CPU epilogue counts in passing)."""
        return self.fft_epilogue is not None

    def tile_ranks(self, query_operands, block: int, ranks) -> torch.Tensor:
        """``tile_distances`` that also fills an ``inverse_fft.TileRanks`` (see there)."""
        start, stop = self.blocks[block]
        return self._spectral_fft(query_operands, self.aerial_operands(block), start, stop, ranks)

    def _spectral_fft(self, query_operands, aerial_operands, start, stop, ranks=None):
        """Distances [n, Ta] through the compiled inverse FFT (CPU, W = 2M, M a power of two)."""
        rows, count, _ = query_operands.shape
        tiles = stop - start
        products = self._buffer("products", (rows, count, tiles))
        self._products(query_operands, aerial_operands[0], products)
        # Fresh outputs (the caller keeps the distances); small next to the products buffer.
        distance = torch.empty((count, tiles), dtype=torch.float32)
        shift = torch.empty((count, tiles), dtype=torch.int16)
        self.fft_epilogue(products.view(rows, count * tiles).numpy(), count, tiles,
                          self.inverse_root_rows[start:stop], distance.numpy(), shift.numpy(),
                          ranks)
        self._last = ("shift", shift)
        return distance

    def _direct(self, query_operands, aerial_operands):
        """Per-shift GEMMs with a running first argmax: best [n, Ta] and shift [n, Ta]."""
        geometry = self.geometry
        tiles = aerial_operands.shape[0]
        best = torch.full((query_operands.shape[0], tiles), -torch.inf, device=self.device)
        shift = torch.zeros(best.shape, dtype=torch.int64, device=self.device)
        offsets = torch.arange(geometry.ground_width, device=self.device)
        for v in range(geometry.vertical):
            band = aerial_operands[:, :, v:v + geometry.ground_height]
            for o in range(geometry.aerial_width):
                columns = (offsets + o) % geometry.aerial_width
                window = band[..., columns].reshape(tiles, -1)
                correlation = query_operands @ window.T
                greater = correlation > best  # strict: the first maximum wins
                best = torch.where(greater, correlation, best)
                shift.masked_fill_(greater, v * geometry.aerial_width + o)
        self._last = ("shift", shift)
        if geometry.full_circle:  # the energy table holds one value per offset
            return best, torch.div(shift, geometry.aerial_width, rounding_mode="floor")
        return best, shift


def _first_argmax(values: torch.Tensor) -> torch.Tensor:
    """Index of the first maximum along dim 1 (numpy's SIMD argmax is much faster on the CPU)."""
    if values.device.type == "cpu":
        return torch.from_numpy(values.numpy().argmax(axis=1))
    return values.argmax(dim=1)
