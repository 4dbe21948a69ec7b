"""All-pairs scoring of a feature store: ranks, top-K and (optionally) the full distance matrix.

For every ground photo n and aerial tile m the distance is the DSM / WITW orientation-searched
distance of ``orientation_distance`` (first argmax of the raw circular correlation, crop at that
shift normalised, d = 2 - 2 cos). N x M x W is never held; N x M only with ``store_matrix``
(written tile by tile).

Per query block (``tile[0]`` queries; the unit of resume):

1. the true pairs' distances and shifts, in float64 (``ExactPairs``);
2. for each aerial block (``tile[1]`` tiles), the float32 distances of the tile of pairs (the
   CPU / torch path, ``TileScorer``) or one fused CUDA kernel over all tiles (``cuda_kernel``);
3. rank counts: rank = 1 + #{m != true tile : d_m <= d_true} (pessimistic, WITW) or
   1 + #{m != true tile : d_m < d_true} (optimistic, DSM). Pairs whose float32 distance lies
   within ``FLOAT32_BAND`` of d_true are recomputed in float64 and compared with a tie tolerance
   of 1e-12, so ranks follow the float64 definition and duplicated tiles tie;
4. top-K: the K + 5 best candidates in float32 (with their shifts), merged block by block in
   (distance, index) order; the true tile takes its float64 distance and shift, candidates
   within 2 * band of another or of d_true are recomputed in float64, and the K best by
   (distance, index) are written.

Memory (bytes, float32 = 4): the aerial features as stored (M * C * Ha * W * itemsize), their
window energies (12 * M * V * W), the cached aerial operands (at most 1 GiB, else rebuilt per
block), and per tile of pairs Tq * Ta * (R + 2 * V * W + 8) * 4 with R the spectral rows (95 at
W = 64); see ``estimate_memory_bytes``.
"""
from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from cvig_engine.errors import CvigInputError

__all__ = ["score_feature_store", "parse_tile", "estimate_memory_bytes", "TIE_RULES", "DEVICES",
           "ALGORITHMS", "FLOAT32_BAND", "DEFAULT_TILES"]

TIE_RULES = ("pessimistic", "optimistic")
DEVICES = ("auto", "cpu", "cuda")
ALGORITHMS = ("auto", "spectral", "direct")
#: Float32 distances this close to d_true are recomputed in float64. The float32 paths err by
#: at most 8e-7 on Gaussian and ReLU-like features (C16 H4 W64); the band leaves 25x margin.
FLOAT32_BAND = 2e-5
#: Default (queries, tiles) per tile of pairs.
DEFAULT_TILES = {"cpu": (512, 1024), "cuda": (4096, 8192)}
_EXTRA_CANDIDATES = 5
_ENERGY_ROWS = 4096
#: Testing aid: seconds to sleep after each query block (the resume test kills a run mid-way).
BLOCK_DELAY_ENV = "CVIG_SCORE_BLOCK_DELAY"


def parse_tile(text) -> tuple[int, int] | None:
    """``"1024x2048"`` -> (1024, 2048); ``"512"`` -> (512, 512); None stays None."""
    if text is None:
        return None
    if isinstance(text, (tuple, list)):  # already parsed (a list after a JSON round trip)
        text = "x".join(str(part) for part in text)
    parts = str(text).lower().replace("*", "x").split("x")
    try:
        values = tuple(int(part) for part in parts)
    except ValueError:
        values = ()
    if len(values) == 1:
        values = values * 2
    if len(values) != 2 or min(values) < 1:
        raise CvigInputError(f"--tile {text!r}: expected QUERIESxTILES such as 1024x2048")
    return values


def estimate_memory_bytes(num_tiles: int, geometry, tile: tuple[int, int], itemsize: int = 4,
                          cache_bytes: int = 1 << 30) -> int:
    """Host memory the CPU path needs, apart from Python and torch themselves (see module doc)."""
    from cvig_engine.scoring.geometry import SpectralLayout

    rows = SpectralLayout(geometry.aerial_width).num_rows
    aerial = num_tiles * geometry.channels * geometry.aerial_height * geometry.aerial_width
    queries, tiles = tile
    operands = 4 * num_tiles * geometry.vertical * rows * geometry.depth
    if operands > cache_bytes:  # not cached: one aerial block's operands at a time
        operands = 4 * tiles * geometry.vertical * rows * geometry.depth
    # products (R rows), even/odd halves and correlations (W each per offset), masks, distances
    per_tile = queries * tiles * (rows + 2 * geometry.shifts + 8) * 4
    return int(aerial * itemsize + 12 * num_tiles * geometry.shifts + operands + per_tile)


@dataclass
class _Block:
    """One query block's inputs and float64 true pairs."""

    start: int
    ground: np.ndarray  # float32 [n, C, H, Wg]
    match: np.ndarray  # int64 [n]
    spectra: np.ndarray  # complex128 [n, C, H, F], for float64 recomputation
    true_distance: np.ndarray  # float64 [n], NaN where unknown
    true_shift: np.ndarray  # int64 [n] flat shift, -1 where unknown

    @property
    def known(self) -> np.ndarray:
        return self.match >= 0


def _check_options(topk, ties, device, precision, algorithm):
    from cvig_engine.scoring.tiles import PRECISIONS

    if int(topk) < 1:
        raise CvigInputError(f"--topk must be at least 1, got {topk}")
    for name, value, allowed in (("--ties", ties, TIE_RULES), ("--device", device, DEVICES),
                                 ("--precision", precision, PRECISIONS),
                                 ("--algorithm", algorithm, ALGORITHMS)):
        if value not in allowed:
            raise CvigInputError(f"{name} {value!r}: use one of {', '.join(allowed)}")


def _resolve_device(device: str, precision: str) -> str:
    import torch

    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        raise CvigInputError("--device cuda: no CUDA GPU is available (torch.cuda.is_available() "
                             "is False); use --device cpu")
    if device == "cpu" and precision != "fp32":
        raise CvigInputError(f"--precision {precision} needs a CUDA GPU; the CPU path is fp32")
    return device


def _load_aerial(store) -> tuple[np.ndarray, np.ndarray]:
    """The aerial features (as stored) and their float64 window energies [M, V, W]."""
    from cvig_engine.scoring.geometry import window_energy_float64

    aerial = store.aerial_features(dtype=None)
    ground_height, ground_width = store.ground_shape[1:]
    energy = np.concatenate([
        window_energy_float64(aerial[start:start + _ENERGY_ROWS], ground_height, ground_width)
        for start in range(0, len(aerial), _ENERGY_ROWS)])
    return aerial, energy


class _Scorer:
    """Holds the chosen backend and scores one query block at a time."""

    def __init__(self, geometry, aerial, energy, *, device, algorithm, tile, precision, ties,
                 candidates, progress_bar, use_kernel=True):
        from cvig_engine.scoring.exact import ExactPairs

        self.geometry = geometry
        self.exact = ExactPairs(geometry, aerial, energy)
        self.ties = ties
        self.candidates = candidates
        self.band = FLOAT32_BAND if precision == "fp32" else 0.0
        self.refined_pairs = 0  # near-tie pairs recomputed in float64 by this run
        self.progress_bar = progress_bar
        self.device = device
        self.kernel = None
        self.fallback_reason = None
        if use_kernel and device == "cuda" and precision == "fp32" and algorithm == "spectral":
            from cvig_engine.scoring import cuda_kernel

            try:
                self.kernel = cuda_kernel.FusedScorer(geometry, aerial, energy, ties=ties,
                                                      candidates=candidates, band=self.band,
                                                      queries_per_launch=tile[0])
            except Exception as error:  # any load or compile failure: torch CUDA instead
                self.fallback_reason = f"{type(error).__name__}: {error}"
        if self.kernel is None:
            from cvig_engine.scoring.tiles import TileScorer

            self.tiles = TileScorer(geometry, aerial, energy, device=device, algorithm=algorithm,
                                    tile_aerial=tile[1], precision=precision)
        prefix = "cpu" if device == "cpu" else "torch-cuda"
        self.name = "cupy-fused-spectral" if self.kernel is not None else f"{prefix}-{algorithm}"

    # -- one query block ------------------------------------------------------------------------

    def prepare(self, start, ground, match) -> _Block:
        """Float64 spectra and true pairs of a query block."""
        spectra = self.exact.query_spectra(ground)
        true_distance = np.full(len(ground), np.nan)
        true_shift = np.full(len(ground), -1, dtype=np.int64)
        rows = np.flatnonzero(match >= 0)
        if rows.size:
            true_distance[rows], true_shift[rows] = self.exact.distances(spectra, rows, match[rows])
        return _Block(start, ground, match, spectra, true_distance, true_shift)

    def score(self, block: _Block, matrix_writer):
        """Rank counts [n] (true tile left out) and the candidates of a block.

        The candidates are a dict of numpy [n, L] arrays: index (-1 where unfilled), float32
        distance and flat shift, each row in (distance, index) order.
        """
        if self.kernel is not None:
            return self._score_fused(block, matrix_writer)
        return self._score_tiles(block, matrix_writer)

    def _refine(self, block, rows, tiles):
        """Float64 distances of near-tie pairs and whether each counts against its query."""
        self.refined_pairs += len(rows)
        distance, _ = self.exact.distances(block.spectra, rows, tiles)
        from cvig_engine.scoring.exact import counts_under_tie_rule

        return distance, counts_under_tie_rule(distance, block.true_distance[rows], self.ties)

    def _score_tiles(self, block: _Block, matrix_writer):
        import torch

        from cvig_engine.scoring.candidates import CandidateList

        device = self.tiles.device
        count = len(block.ground)
        query_operands = self.tiles.query_operands(block.ground)
        true32 = torch.from_numpy(block.true_distance.astype(np.float32)).to(device)[:, None]
        match = block.match
        counts = torch.zeros(count, dtype=torch.int64, device=device)
        candidates = CandidateList(count, self.candidates, device)
        for index, (tile_start, tile_stop) in enumerate(self.tiles.blocks):
            inside = np.flatnonzero((match >= tile_start) & (match < tile_stop))
            if self.tiles.counts_ranks:  # the CPU epilogue counts and flags near ties itself
                distance = self._count_in_epilogue(block, query_operands, index, inside, counts)
            else:
                distance = self.tiles.tile_distances(query_operands, index)
                self._count(block, distance, inside, tile_start, true32, counts)
            if matrix_writer is not None:
                matrix_writer(block.start, tile_start, distance.cpu().numpy())
            candidates.update(distance, tile_start, self.tiles.shifts_of)
            if self.progress_bar is not None:
                self.progress_bar.update(count * (tile_stop - tile_start))
        return counts.cpu().numpy(), {"index": candidates.index.cpu().numpy(),
                                      "distance": candidates.distance.cpu().numpy(),
                                      "shift": candidates.shift.cpu().numpy()}

    def _count(self, block, distance, inside, tile_start, true32, counts):
        """Add the pairs of a tile that count against their query (torch; near ties in float64).

        The true pairs take their float64 distance in ``distance`` and refined near ties their
        float64 one (in float32).
        """
        import torch

        device = distance.device
        match = block.match
        true_rows = torch.from_numpy(inside).to(device)
        true_columns = torch.from_numpy(match[inside] - tile_start).to(device)
        distance[true_rows, true_columns] = true32[true_rows, 0]
        # d - d_true is zero only when d == d_true and keeps its sign (IEEE subtraction), so
        # one difference serves the tie rule and the band. NaN (unknown match) is never true.
        difference = distance - true32
        counted = difference <= 0 if self.ties == "pessimistic" else difference < 0
        if self.band > 0:
            near = difference.abs_() <= self.band
            near[true_rows, true_columns] = False
            rows, columns = (part.cpu().numpy() for part in torch.nonzero(near, as_tuple=True))
            if rows.size:
                exact, counts_against = self._refine(block, rows, columns + tile_start)
                rows_t = torch.from_numpy(rows).to(device)
                columns_t = torch.from_numpy(columns).to(device)
                exact32 = torch.from_numpy(exact.astype(np.float32)).to(device)
                distance[rows_t, columns_t] = exact32
                counted[rows_t, columns_t] = torch.from_numpy(counts_against).to(device)
        counted[true_rows, true_columns] = False
        counts += counted.sum(dim=1)

    def _count_in_epilogue(self, block, query_operands, index, inside, counts):
        """Distances of a tile with the counting done by the compiled epilogue (CPU)."""
        import torch

        from cvig_engine.scoring.inverse_fft import TileRanks

        tile_start, tile_stop = self.tiles.blocks[index]
        true_column = np.full(len(block.match), -1, np.int64)
        true_column[inside] = block.match[inside] - tile_start
        ranks = TileRanks(block.true_distance, true_column, self.ties == "pessimistic", self.band,
                          tile_stop - tile_start)
        distance = self.tiles.tile_ranks(query_operands, index, ranks)
        rows, columns = np.nonzero(ranks.near)
        if rows.size:
            exact, counts_against = self._refine(block, rows, columns + tile_start)
            distance[torch.from_numpy(rows), torch.from_numpy(columns)] = torch.from_numpy(
                exact.astype(np.float32))
            np.add.at(ranks.counts, rows, counts_against.astype(np.int64))
        counts += torch.from_numpy(ranks.counts)
        return distance

    def _score_fused(self, block: _Block, matrix_writer):
        result = self.kernel.score(block.ground, block.match, block.true_distance,
                                   want_matrix=matrix_writer is not None)
        counts = result["counts"].astype(np.int64)
        rows, tiles = result["near_rows"], result["near_tiles"]
        matrix = result.get("matrix")
        if rows.size:
            exact, counts_against = self._refine(block, rows, tiles)
            np.add.at(counts, rows, counts_against.astype(np.int64))
            if matrix is not None:
                matrix[rows, tiles] = exact.astype(np.float32)
        if matrix is not None:
            known = np.flatnonzero(block.known)
            matrix[known, block.match[known]] = block.true_distance[known].astype(np.float32)
            matrix_writer(block.start, 0, matrix)
        if self.progress_bar is not None:
            self.progress_bar.update(len(block.ground) * self.exact.energy.shape[0])
        return counts, result["candidates"]

    def finish(self, block: _Block, counts, candidates, topk: int) -> dict:
        """Ranks, true-pair rows and the top-K of a block, as dataset rows.

        The top-K come from the float32 candidates; the true tile takes its float64 distance and
        shift, and candidates within 2 * band of another candidate or of d_true are recomputed
        in float64, so that near ties are ordered as in float64 (ties within 1e-12 by index).
        """
        from cvig_engine.scoring.exact import TIE_TOLERANCE

        index, shift = candidates["index"], candidates["shift"].astype(np.int64)
        valid = index >= 0
        distance = np.where(valid, candidates["distance"].astype(np.float64), np.inf)
        is_true = valid & (index == block.match[:, None])
        if self.band > 0:
            order = np.argsort(distance, axis=1, kind="stable")
            close = np.diff(np.take_along_axis(distance, order, 1), axis=1) <= 2 * self.band
            near = np.zeros(distance.shape, dtype=bool)
            near[:, 1:] |= close
            near[:, :-1] |= close
            refine = np.zeros(distance.shape, dtype=bool)
            np.put_along_axis(refine, order, near, 1)
            with np.errstate(invalid="ignore"):
                refine |= np.abs(distance - block.true_distance[:, None]) <= 2 * self.band
            rows, columns = np.nonzero(refine & valid & ~is_true)
            if rows.size:
                self.refined_pairs += rows.size
                distance[rows, columns], shift[rows, columns] = self.exact.distances(
                    block.spectra, rows, index[rows, columns])
        rows, columns = np.nonzero(is_true)
        distance[rows, columns] = block.true_distance[rows]
        shift[rows, columns] = block.true_shift[rows]
        key = np.round(distance / TIE_TOLERANCE)  # distances within ~1e-12 tie: lower index first
        order = np.lexsort((np.where(valid, index, np.iinfo(np.int64).max), key), axis=1)[:, :topk]
        width = self.geometry.aerial_width
        top_shift = np.take_along_axis(shift, order, 1)
        known = block.known
        results = {
            "rank": np.where(known, counts + 1, 0).astype(np.int64),
            "true_distance": block.true_distance.astype(np.float32),
            "true_shift": np.where(known, block.true_shift % width, -1).astype(np.int32),
            "topk/index": np.take_along_axis(index, order, 1),
            "topk/distance": np.take_along_axis(distance, order, 1).astype(np.float32),
            "topk/shift": (top_shift % width).astype(np.int32),
        }
        if self.geometry.vertical > 1:
            vertical = np.where(known, block.true_shift // width, -1)
            results["true_vertical"] = vertical.astype(np.int32)
            results["topk/vertical"] = (top_shift // width).astype(np.int32)
        return results


def _metrics(ranks, true_shift, heading, num_tiles, fov_deg, width) -> dict:
    from cvig_engine.evaluate.metrics import heading_metrics, retrieval_metrics

    metrics = retrieval_metrics(ranks, num_tiles)
    if heading is not None and fov_deg is not None and np.isfinite(heading[ranks >= 1]).any():
        metrics.update(heading_metrics(true_shift, heading, fov_deg, width, mask=ranks >= 1))
    return metrics


def score_feature_store(features, output, *, topk: int = 10, device: str = "auto", tile=None,
                        store_matrix: bool = False, ties: str = "pessimistic",
                        precision: str = "fp32", algorithm: str = "auto",
                        overwrite: bool = False, expected_model_sha256: str | None = None,
                        progress: bool = True, precision_check_queries: int = 512,
                        use_kernel: bool = True) -> dict:
    """Score every ground photo of a feature store against every aerial tile; write SCORES.h5.

    Args:
        features: FEATURES.h5 (``cvig-engine embed`` or ``write_feature_store``).
        output: SCORES.h5 to write, or to resume when it holds the same run unfinished.
        topk: tiles kept per query (at most M).
        device: "auto" (CUDA when available), "cpu" or "cuda".
        tile: (queries, tiles) per tile of pairs, or "QxA"; the query count is also the unit
            of resume. Default ``DEFAULT_TILES``.
        store_matrix: also write the full float32 matrix /distance [N, M].
        ties: "pessimistic" (WITW: ties count against the query) or "optimistic" (DSM).
        precision: "fp32"; on CUDA also "tf32", "bf16", "fp16" GEMM inputs, which then also
            rescore up to ``precision_check_queries`` queries in fp32 and record how many ranks
            changed (attribute ``precision_check``).
        algorithm: "auto" (cost model), "spectral" or "direct".
        overwrite: replace an existing output that cannot be resumed.
        expected_model_sha256: refuse a store made by another model.
        progress: show a progress bar (on a terminal).
        use_kernel: on CUDA in fp32, use the fused CuPy kernel when it loads (False: torch).

    Returns:
        A summary: output, metrics, kernel, device, precision, elapsed_seconds, resumed,
        already_complete, num_queries, num_tiles, refined_pairs (near ties recomputed in
        float64 by this call), kernel_fallback_reason.

    Raises:
        CvigInputError: bad options or a bad feature store (see ``open_feature_store``), an
            output that holds another run.
    """
    from cvig_engine.scoring.geometry import Geometry, choose_algorithm
    from cvig_engine.store import open_feature_store

    started = time.perf_counter()
    _check_options(topk, ties, device, precision, algorithm)
    if Path(output).resolve() == Path(features).resolve():
        raise CvigInputError(f"{output}: the scores file cannot be the feature store itself")
    with open_feature_store(features) as store:
        if store.num_ground == 0 or store.num_aerial == 0:
            raise CvigInputError(f"{store.path}: nothing to score ({store.num_ground} ground "
                                 f"photos, {store.num_aerial} aerial tiles)")
        found = store.attributes.get("model_sha256")
        if expected_model_sha256 is not None and found != expected_model_sha256:
            raise CvigInputError(f"{store.path}: made by another model (model_sha256 {found!r}, "
                                 f"the named model has {expected_model_sha256!r}); embed again "
                                 "with this model or give its own feature store")
        device = _resolve_device(device, precision)
        geometry = Geometry.from_shapes(store.ground_shape, store.aerial_shape)
        if algorithm == "auto":
            algorithm = choose_algorithm(geometry)
        tile = parse_tile(tile) or DEFAULT_TILES[device]
        return _score(store, output, geometry=geometry, topk=min(int(topk), store.num_aerial),
                      device=device, tile=tile, store_matrix=store_matrix, ties=ties,
                      precision=precision, algorithm=algorithm, overwrite=overwrite,
                      progress=progress, started=started, use_kernel=use_kernel,
                      precision_check_queries=precision_check_queries)


def _score(store, output, *, geometry, topk, device, tile, store_matrix, ties, precision,
           algorithm, overwrite, progress, started, precision_check_queries, use_kernel) -> dict:
    from tqdm import tqdm

    from cvig_engine.scoring.output import ScoresFile

    num_queries, num_tiles = store.num_ground, store.num_aerial
    block_size = tile[0]
    num_blocks = -(-num_queries // block_size)
    candidates = min(num_tiles, topk + _EXTRA_CANDIDATES)
    aerial, energy = _load_aerial(store)
    bar = tqdm(total=0, unit="pair", unit_scale=True, disable=None if progress else True,
               desc="score")
    scorer = _Scorer(geometry, aerial, energy, device=device, algorithm=algorithm, tile=tile,
                     precision=precision, ties=ties, candidates=candidates, progress_bar=bar,
                     use_kernel=use_kernel)
    run_key = {"features_sha256": store.sha256, "topk": topk, "ties": ties,
               "store_matrix": bool(store_matrix), "precision": precision, "kernel": scorer.name,
               "algorithm": algorithm, "tile": list(tile), "num_queries": num_queries,
               "num_tiles": num_tiles}
    layout = {"num_queries": num_queries, "num_tiles": num_tiles, "topk": topk,
              "num_blocks": num_blocks, "vertical": geometry.vertical > 1,
              "store_matrix": bool(store_matrix)}
    heading = store.heading if store.heading is not None else np.full(num_queries, np.nan,
                                                                        np.float32)
    query = {"ids": store.ground_ids or [str(row) for row in range(num_queries)],
             "heading": heading, "match": store.match}
    attributes = {"tie_rule": ties, "num_tiles": num_tiles, "num_queries": num_queries,
                  "aerial_width": geometry.aerial_width, "ground_width": geometry.ground_width,
                  "fov_deg": store.fov_deg, "city": store.attributes.get("city"),
                  "features": str(store.path), "features_sha256": store.sha256,
                  "model_sha256": store.attributes.get("model_sha256"),
                  "device": device, "kernel": scorer.name, "algorithm": algorithm,
                  "precision": precision, "topk": topk, "tile": list(tile),
                  "kernel_fallback_reason": scorer.fallback_reason}
    scores = ScoresFile.open_or_create(output, run_key, layout, attributes, query,
                                       overwrite=overwrite)
    try:
        already_complete = scores.complete
        previous_seconds = scores.recorded_seconds()
        pending = scores.pending_blocks()
        bar.total = sum(min(block_size, num_queries - block * block_size)
                        for block in pending) * num_tiles
        bar.refresh()
        writer = scores.write_matrix if store_matrix else None
        delay = float(os.environ.get(BLOCK_DELAY_ENV, "0") or 0)
        for block_index in pending:
            block_started = time.perf_counter()
            start = block_index * block_size
            stop = min(start + block_size, num_queries)
            block = scorer.prepare(start, store.ground_features(start, stop),
                                   store.match[start:stop])
            counts, candidate_tiles = scorer.score(block, writer)
            results = scorer.finish(block, counts, candidate_tiles, topk)
            scores.write_block(block_index, start, results, time.perf_counter() - block_started)
            if delay > 0:
                time.sleep(delay)
        bar.close()
        ranks = scores.read("rank")
        true_shift = scores.read("true_shift")
        metrics = _metrics(ranks, true_shift, store.heading, num_tiles, store.fov_deg,
                           geometry.aerial_width)
        if already_complete:
            elapsed = float(scores.attribute("elapsed_seconds") or 0.0)
        else:
            elapsed = previous_seconds + time.perf_counter() - started
            final = {"metrics": json.dumps(metrics), "elapsed_seconds": elapsed}
            if precision != "fp32":
                final["precision_check"] = json.dumps(_precision_check(
                    store, aerial, energy, geometry, ranks, ties=ties, topk=topk, tile=tile,
                    algorithm=algorithm, queries=precision_check_queries))
            scores.finish(final)
        return {"output": str(scores.path), "metrics": metrics, "kernel": scorer.name,
                "device": device, "precision": precision, "elapsed_seconds": elapsed,
                "resumed": scores.resumed, "already_complete": already_complete,
                "num_queries": num_queries, "num_tiles": num_tiles,
                "refined_pairs": scorer.refined_pairs,
                "kernel_fallback_reason": scorer.fallback_reason}
    finally:
        bar.close()
        scores.close()


def _precision_check(store, aerial, energy, geometry, ranks, *, ties, topk, tile, algorithm,
                     queries) -> dict:
    """Rescore a sample of known queries in fp32 on the same device and compare ranks."""
    known = np.flatnonzero(ranks >= 1)
    if known.size == 0:
        return {"queries_checked": 0, "ranks_changed": 0}
    sample = known[np.linspace(0, known.size - 1, min(queries, known.size)).astype(np.int64)]
    sample = np.unique(sample)
    scorer = _Scorer(geometry, aerial, energy, device="cuda", algorithm=algorithm, tile=tile,
                     precision="fp32", ties=ties, candidates=min(store.num_aerial, topk),
                     progress_bar=None)
    block = scorer.prepare(0, store.ground_rows(sample), store.match[sample])
    counts, _ = scorer.score(block, None)
    reference = counts + 1
    changed = reference != ranks[sample]
    return {"queries_checked": int(sample.size), "ranks_changed": int(changed.sum()),
            "max_rank_change": int(np.abs(reference - ranks[sample]).max()),
            "reference_precision": "fp32", "reference_kernel": scorer.name}
