"""Read and check a SCORES.h5 file written by `cvig-engine score`."""
from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np

from cvig_engine.errors import CvigInputError
from cvig_engine.evaluate.metrics import TIE_RULES, ranks_from_distances

__all__ = ["ScoredRun", "load_scores", "report_attributes"]

# Root attributes copied into the report as they are, to say how the run was scored.
SCORING_ATTRIBUTES = ("device", "kernel", "precision", "elapsed_seconds", "features_sha256")


@dataclasses.dataclass
class ScoredRun:
    """What evaluation needs from one SCORES.h5 file (one city, one trial)."""

    path: Path
    ranks: np.ndarray  # int64 [N], 1-based under `tie_rule`; below 1 where the match is unknown
    num_tiles: int
    tie_rule: str
    tie_rule_scored: str  # the rule the file was scored with
    city: str | None = None
    true_shift: np.ndarray | None = None  # int [N]
    heading: np.ndarray | None = None  # float64 [N], NaN where unknown
    query_ids: list[str] | None = None
    fov_deg: float | None = None
    aerial_width: int | None = None
    ground_width: int | None = None
    scoring: dict = dataclasses.field(default_factory=dict)

    @property
    def known(self) -> np.ndarray:
        """Rows whose true tile is known (rank >= 1)."""
        return self.ranks >= 1

    def row_name(self, row: int) -> str:
        """'row 7' or 'row 7 (query "id")' for error messages."""
        if self.query_ids is not None:
            return f"row {row} (query {self.query_ids[row]!r})"
        return f"row {row}"


def _attribute(attributes, name):
    value = attributes.get(name)
    if isinstance(value, bytes):
        value = value.decode("utf-8")
    if isinstance(value, np.generic):
        value = value.item()
    return value


def _decode_ids(dataset) -> list[str]:
    return [value.decode("utf-8") if isinstance(value, bytes) else str(value)
            for value in dataset[()]]


def _required_attribute(path, attributes, name, kind):
    value = _attribute(attributes, name)
    if value is None:
        raise CvigInputError(f"{path}: not a scores file written by `cvig-engine score`: "
                             f"the root attribute {name!r} is missing")
    try:
        return kind(value)
    except (TypeError, ValueError) as error:
        raise CvigInputError(f"{path}: root attribute {name!r} = {value!r} is not "
                             f"{kind.__name__}") from error


def _check_length(path, name, array, num_queries):
    if array.shape[:1] != (num_queries,):
        raise CvigInputError(f"{path}: {name} has {array.shape[0] if array.ndim else 0} rows, "
                             f"/rank has {num_queries}")


def load_scores(path, tie_rule: str | None = None) -> ScoredRun:
    """Read the ranks and heading data of a SCORES.h5 file, checking them.

    Args:
        path: the file written by `cvig-engine score`.
        tie_rule: ``None`` keeps the file's own rule (its ``tie_rule`` attribute). Asking for the
            other rule recomputes the ranks from the full matrix ``/distance``, which exists only
            when the file was scored with ``--store-matrix``; otherwise this raises.

    Raises:
        CvigInputError: a missing or unreadable file, a file that is not a scores file,
            inconsistent rows (a known match without a rank, a rank above the number of tiles,
            lengths that differ), or a tie rule that cannot be applied.
    """
    import h5py

    path = Path(path)
    if tie_rule is not None and tie_rule not in TIE_RULES:
        raise CvigInputError(f"unknown tie rule {tie_rule!r}; use one of {', '.join(TIE_RULES)}")
    if not path.is_file():
        raise CvigInputError(f"{path}: no such scores file")
    try:
        handle = h5py.File(path, "r")
    except OSError as error:
        raise CvigInputError(f"{path}: not an HDF5 file ({error})") from error
    with handle:
        if "rank" not in handle or not isinstance(handle["rank"], h5py.Dataset):
            raise CvigInputError(f"{path}: not a scores file written by `cvig-engine score`: "
                                 "it has no /rank dataset")
        attributes = handle.attrs
        ranks = np.asarray(handle["rank"][()])
        if ranks.ndim != 1 or not np.issubdtype(ranks.dtype, np.integer):
            raise CvigInputError(f"{path}: /rank must be a 1-D integer dataset, "
                                 f"got {ranks.dtype} {ranks.shape}")
        ranks = ranks.astype(np.int64)
        num_queries = ranks.shape[0]
        num_tiles = _required_attribute(path, attributes, "num_tiles", int)
        tie_rule_scored = _required_attribute(path, attributes, "tie_rule", str)
        if tie_rule_scored not in TIE_RULES:
            raise CvigInputError(f"{path}: root attribute tie_rule = {tie_rule_scored!r} is not "
                                 f"one of {', '.join(TIE_RULES)}")
        run = ScoredRun(path=path, ranks=ranks, num_tiles=num_tiles, tie_rule=tie_rule_scored,
                        tie_rule_scored=tie_rule_scored)
        city = _attribute(attributes, "city")
        run.city = str(city) if city not in (None, "") else None
        fov_deg = _attribute(attributes, "fov_deg")
        run.fov_deg = float(fov_deg) if fov_deg is not None else None
        for name in ("aerial_width", "ground_width"):
            value = _attribute(attributes, name)
            setattr(run, name, int(value) if value is not None else None)
        run.scoring = {name: _attribute(attributes, name) for name in SCORING_ATTRIBUTES
                       if name in attributes}

        if "query/ids" in handle:
            run.query_ids = _decode_ids(handle["query/ids"])
            _check_length(path, "/query/ids", np.asarray(run.query_ids), num_queries)
        match = None
        if "query/match" in handle:
            match = np.asarray(handle["query/match"][()]).astype(np.int64)
            _check_length(path, "/query/match", match, num_queries)
        if "true_shift" in handle:
            run.true_shift = np.asarray(handle["true_shift"][()]).astype(np.int64)
            _check_length(path, "/true_shift", run.true_shift, num_queries)
        if "query/heading" in handle:
            run.heading = np.asarray(handle["query/heading"][()], dtype=np.float64)
            _check_length(path, "/query/heading", run.heading, num_queries)

        _check_ranks(run, match)
        if tie_rule is not None and tie_rule != tie_rule_scored:
            if "distance" not in handle:
                raise CvigInputError(
                    f"{path}: scored with {tie_rule_scored} ties and holds no /distance matrix, so "
                    f"its ranks cannot be recounted with {tie_rule} ties; score again with "
                    f"`--ties {tie_rule}` (or with `--store-matrix`)")
            if match is None:
                raise CvigInputError(f"{path}: recounting ranks needs /query/match, which is "
                                     "missing")
            distance = handle["distance"]
            if distance.shape != (num_queries, num_tiles):
                raise CvigInputError(f"{path}: /distance has shape {distance.shape}, expected "
                                     f"({num_queries}, {num_tiles})")
            try:
                run.ranks = ranks_from_distances(distance, match, tie_rule)
            except CvigInputError as error:
                raise CvigInputError(f"{path}: {error}") from error
            run.tie_rule = tie_rule
    _check_headings(run)
    return run


def _check_ranks(run: ScoredRun, match) -> None:
    """Known matches have ranks in 1..M; unknown ones have none."""
    ranks, path = run.ranks, run.path
    too_high = ranks > run.num_tiles
    if too_high.any():
        row = int(np.flatnonzero(too_high)[0])
        raise CvigInputError(f"{path}: {run.row_name(row)}: rank {int(ranks[row])} exceeds the "
                             f"number of tiles ({run.num_tiles})")
    if match is None:
        return
    out_of_range = match >= run.num_tiles
    missing_rank = (match >= 0) & (ranks < 1)
    stray_rank = (match < 0) & (ranks >= 1)
    for bad, what in ((out_of_range, "its match is outside 0..num_tiles-1"),
                      (missing_rank, "its match is known but its rank is below 1"),
                      (stray_rank, "its match is unknown (-1) but it has a rank")):
        if bad.any():
            row = int(np.flatnonzero(bad)[0])
            raise CvigInputError(f"{path}: {run.row_name(row)}: {what} "
                                 f"(match {int(match[row])}, rank {int(ranks[row])})")


def _check_headings(run: ScoredRun) -> None:
    """Heading metrics need the shifts, the field of view and W wherever a heading is known."""
    if run.heading is None or not np.isfinite(run.heading[run.known]).any():
        return
    missing = [name for name, value in (("/true_shift", run.true_shift), ("fov_deg", run.fov_deg),
                                        ("aerial_width", run.aerial_width)) if value is None]
    if missing:
        raise CvigInputError(f"{run.path}: it has true headings but no {', '.join(missing)}, "
                             "which the heading metrics need")


def report_attributes(run: ScoredRun) -> dict:
    """The file's description as it goes into report.json."""
    return {"path": str(run.path), "city": run.city, "num_tiles": run.num_tiles,
            "num_queries": int(run.ranks.size), "num_unknown_match": int((~run.known).sum()),
            "tie_rule": run.tie_rule, "tie_rule_scored": run.tie_rule_scored,
            "fov_deg": run.fov_deg, "aerial_width": run.aerial_width,
            "ground_width": run.ground_width, "scoring": run.scoring}
