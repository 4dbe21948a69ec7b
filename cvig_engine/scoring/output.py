"""SCORES.h5: creation with every dataset allocated up front, block-wise writes, resume checks.

Resume design: the file is created whole (under a temporary name, then renamed), with every
dataset allocated at creation (HDF5 early allocation). Later writes touch raw data only, never
the file's metadata, so a run killed between two flushes leaves a readable file. After each
query block the results are flushed first and the block's ``/progress/done`` flag second; a
rerun with the same feature store and options recomputes only the blocks not marked done. Each
block is computed from the same inputs in the same way, so the result is identical to an
uninterrupted run. ``/progress`` is removed when the run completes.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np

from cvig_engine.errors import CvigInputError
from cvig_engine.store import decode_attribute

__all__ = ["SCORES_FORMAT", "SCORES_FORMAT_VERSION", "ScoresFile"]

SCORES_FORMAT = "cvig-scores"
SCORES_FORMAT_VERSION = 1
_MATRIX_CHUNK = (256, 1024)  # 1 MiB float32 chunks of /distance


def _early(group, name, shape, dtype, fill, chunks=None):
    """A dataset allocated at creation: later writes change raw data only."""
    import h5py

    dcpl = h5py.h5p.create(h5py.h5p.DATASET_CREATE)
    dcpl.set_alloc_time(h5py.h5d.ALLOC_TIME_EARLY)
    if fill is None:
        dcpl.set_fill_time(h5py.h5d.FILL_TIME_NEVER)
    if 0 in shape:
        return group.create_dataset(name, shape=shape, dtype=dtype)
    return group.create_dataset(name, shape=shape, dtype=dtype, chunks=chunks, fillvalue=fill,
                                dcpl=dcpl)


class ScoresFile:
    """An open SCORES.h5 being written. Create with ``open_or_create``."""

    def __init__(self, path: Path, handle, resumed: bool):
        self.path = path
        self.handle = handle
        self.resumed = resumed

    # -- opening --------------------------------------------------------------------------------

    @classmethod
    def open_or_create(cls, path, run_key: dict, layout: dict, attributes: dict, query: dict,
                       overwrite: bool = False) -> "ScoresFile":
        """Resume ``path`` if it holds the same run, else create it.

        Args:
            run_key: what must match for a resume (feature store sha256, options, backend).
            layout: num_queries, num_tiles, topk, num_blocks, vertical (bool), store_matrix.
            attributes: root attributes written at creation.
            query: ids (list of str), heading (float32 [N]), match (int64 [N]).
            overwrite: replace an existing file that cannot be resumed.

        Raises:
            CvigInputError: the file exists but holds another run, or is not a scores file
                (unless ``overwrite``).
        """
        import h5py

        path = Path(path)
        if path.is_dir():
            raise CvigInputError(f"{path}: is a folder; give the scores file's name (SCORES.h5)")
        if path.exists() and not overwrite:
            try:
                handle = h5py.File(path, "r+")
            except OSError as error:
                raise CvigInputError(f"{path}: exists but cannot be opened as HDF5 ({error}); "
                                     "delete it or pass --overwrite") from None
            try:
                cls._check_resumable(path, handle, run_key)
            except BaseException:
                handle.close()
                raise
            return cls(path, handle, resumed=True)
        path.parent.mkdir(parents=True, exist_ok=True)
        temporary = path.with_name(path.name + ".creating")
        with h5py.File(temporary, "w") as handle:
            cls._create(handle, run_key, layout, attributes, query)
        os.replace(temporary, path)
        return cls(path, h5py.File(path, "r+"), resumed=False)

    @staticmethod
    def _check_resumable(path, handle, run_key):
        found = decode_attribute(handle.attrs.get("format"))
        if found != SCORES_FORMAT:
            raise CvigInputError(f"{path}: exists and is not a cvig-engine scores file (format = "
                                 f"{found!r}); refusing to overwrite it: delete it or pass "
                                 "--overwrite")
        try:
            stored = json.loads(decode_attribute(handle.attrs.get("run_key", "{}")))
        except json.JSONDecodeError:
            stored = {}
        differences = [f"{name}: was {stored.get(name)!r}, now {value!r}"
                       for name, value in run_key.items() if stored.get(name) != value]
        if differences:
            raise CvigInputError(
                f"{path}: holds a scoring run with other inputs or options, so it cannot be "
                f"resumed ({'; '.join(differences)}); delete it, choose another -o, or pass "
                "--overwrite")
        if "progress/done" not in handle and not bool(handle.attrs.get("complete", False)):
            raise CvigInputError(f"{path}: has no progress record and is not complete; delete it "
                                 "or pass --overwrite")

    @staticmethod
    def _create(handle, run_key, layout, attributes, query):
        import h5py

        queries, tiles, topk = layout["num_queries"], layout["num_tiles"], layout["topk"]
        handle.attrs["format"] = SCORES_FORMAT
        handle.attrs["format_version"] = SCORES_FORMAT_VERSION
        handle.attrs["run_key"] = json.dumps(run_key, sort_keys=True)
        handle.attrs["complete"] = False
        for name, value in attributes.items():
            if value is not None:
                handle.attrs[name] = value
        _early(handle, "rank", (queries,), np.int64, 0)
        _early(handle, "true_distance", (queries,), np.float32, np.nan)
        _early(handle, "true_shift", (queries,), np.int32, -1)
        topk_group = handle.create_group("topk")
        _early(topk_group, "index", (queries, topk), np.int64, -1)
        _early(topk_group, "distance", (queries, topk), np.float32, np.nan)
        _early(topk_group, "shift", (queries, topk), np.int32, -1)
        if layout["vertical"]:
            _early(handle, "true_vertical", (queries,), np.int32, -1)
            _early(topk_group, "vertical", (queries, topk), np.int32, -1)
        if layout["store_matrix"]:
            chunks = (min(_MATRIX_CHUNK[0], queries), min(_MATRIX_CHUNK[1], tiles))
            _early(handle, "distance", (queries, tiles), np.float32, None, chunks=chunks)
        query_group = handle.create_group("query")
        query_group.create_dataset("ids", data=np.asarray(query["ids"], dtype=object),
                                   dtype=h5py.string_dtype("utf-8"))
        query_group.create_dataset("heading", data=np.asarray(query["heading"], dtype=np.float32))
        query_group.create_dataset("match", data=np.asarray(query["match"], dtype=np.int64))
        progress = handle.create_group("progress")
        _early(progress, "done", (layout["num_blocks"],), np.uint8, 0)
        _early(progress, "seconds", (layout["num_blocks"],), np.float64, 0.0)

    # -- state ----------------------------------------------------------------------------------

    @property
    def complete(self) -> bool:
        """Whether the run finished (metrics written, /progress removed)."""
        return bool(self.handle.attrs.get("complete", False))

    def pending_blocks(self) -> list[int]:
        """Query blocks not yet marked done."""
        if self.complete:
            return []
        return [int(block) for block in np.flatnonzero(self.handle["progress/done"][()] == 0)]

    def recorded_seconds(self) -> float:
        """Seconds spent on blocks done so far (in this and earlier runs)."""
        if "progress/seconds" not in self.handle:
            return float(self.handle.attrs.get("elapsed_seconds", 0.0))
        return float(self.handle["progress/seconds"][()].sum())

    def write_matrix(self, query_start: int, tile_start: int, distance: np.ndarray) -> None:
        """Write a block of /distance."""
        rows, columns = distance.shape
        self.handle["distance"][query_start:query_start + rows,
                                tile_start:tile_start + columns] = distance

    def write_block(self, block: int, start: int, results: dict, seconds: float) -> None:
        """Write one query block's rows, flush, then mark the block done and flush again."""
        stop = start + len(results["rank"])
        for name, values in results.items():
            self.handle[name][start:stop] = values
        self.handle["progress/seconds"][block] = seconds
        self.handle.flush()
        self.handle["progress/done"][block] = 1
        self.handle.flush()

    def read(self, name: str) -> np.ndarray:
        """A whole dataset."""
        return self.handle[name][()]

    def finish(self, attributes: dict) -> None:
        """Write the final attributes, drop /progress and mark the run complete."""
        for name, value in attributes.items():
            if value is not None:
                self.handle.attrs[name] = value
        if "progress" in self.handle:
            del self.handle["progress"]
        self.handle.attrs["complete"] = True
        self.handle.flush()

    def attribute(self, name: str):
        """A root attribute, decoded."""
        return decode_attribute(self.handle.attrs.get(name))

    def close(self) -> None:
        """Close the file."""
        if self.handle.id.valid:
            self.handle.close()
