"""The HDF5 feature store: reading and checking it, and a whole-array writer.

Layout (format ``cvig-features``, version 1; the README documents it)::

    /ground/features    float16 or float32 [N, C, H, Wg]   NCHW, as the encoder outputs
    /ground/ids         utf-8 strings [N]
    /ground/match       int64 [N]    row of /aerial holding the true tile, -1 when unknown
    /ground/lat, /ground/lon   float64 [N]     when known
    /ground/heading     float32 [N]  compass degrees, NaN where unknown
    /aerial/features    float16 or float32 [M, C, Ha, W]
    /aerial/ids, /aerial/lat, /aerial/lon
    /ground/done, /aerial/done   uint8 or bool [N], [M]: rows embedded so far (embedding only)
    root attributes: format, format_version, model_sha256, model_config (JSON), fov_deg,
                     backend, precision, complete (embedding only), city (when known)

``open_feature_store`` checks a store before anything reads it: every failure is a
``CvigInputError`` naming the file, the dataset and (where there is one) the first bad row.
The resumable writer of ``cvig-engine embed`` lives in :mod:`cvig_engine.embed`;
``write_feature_store`` here writes a whole store at once (tests, benchmarks, conversions).
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from cvig_engine.errors import CvigInputError
from cvig_engine.files import file_sha256

__all__ = ["FORMAT", "FORMAT_VERSION", "FeatureStore", "open_feature_store", "write_feature_store",
           "file_sha256", "decode_attribute"]

FORMAT = "cvig-features"
FORMAT_VERSION = 1
FEATURE_DTYPES = (np.float16, np.float32, np.float64)
# Rows read at a time when scanning features for NaN / Inf (about 64 MiB of float32 at 16x4x64).
_SCAN_ROWS = 4096


def decode_attribute(value):
    """An HDF5 attribute as a plain Python value (bytes -> str, numpy scalar -> item)."""
    if isinstance(value, bytes):
        return value.decode("utf-8")
    if isinstance(value, np.generic):
        return value.item()
    return value


@dataclass
class FeatureStore:
    """An open, checked feature store. Feature blocks are read on demand (``ground_features``).

    Use as a context manager, or call ``close()``.
    """

    path: Path
    num_ground: int
    num_aerial: int
    ground_shape: tuple  # (C, H, Wg)
    aerial_shape: tuple  # (C, Ha, W)
    match: np.ndarray  # int64 [N], -1 where unknown
    attributes: dict  # root attributes; model_config parsed from JSON into a dict
    ground_ids: list | None = None
    aerial_ids: list | None = None
    heading: np.ndarray | None = None  # float32 [N], NaN where unknown
    _handle: object = field(default=None, repr=False)
    _sha256: str | None = field(default=None, repr=False)

    @property
    def model_config(self) -> dict:
        """The encoder's config (``model_config`` attribute), ``{}`` when the store has none."""
        return self.attributes.get("model_config") or {}

    @property
    def vertical_search(self) -> bool:
        """Whether the model slides the ground map vertically too (aerial map taller)."""
        return bool(self.model_config.get("vertical_search", False))

    @property
    def fov_deg(self) -> float | None:
        """The photos' field of view in degrees, when recorded."""
        value = self.attributes.get("fov_deg")
        return float(value) if value is not None else None

    @property
    def sha256(self) -> str:
        """sha256 of the store file's bytes (computed once)."""
        if self._sha256 is None:
            self._sha256 = file_sha256(self.path)
        return self._sha256

    def ground_features(self, start: int = 0, stop: int | None = None) -> np.ndarray:
        """Ground feature maps of rows start..stop-1 as float32 [n, C, H, Wg]."""
        return np.asarray(self._handle["ground/features"][start:stop], dtype=np.float32)

    def ground_rows(self, rows) -> np.ndarray:
        """Ground feature maps of the given increasing row numbers, as float32."""
        return np.asarray(self._handle["ground/features"][np.asarray(rows)], dtype=np.float32)

    def aerial_features(self, start: int = 0, stop: int | None = None,
                        dtype=np.float32) -> np.ndarray:
        """Aerial feature maps of rows start..stop-1 [n, C, Ha, W] (float32 unless ``dtype``)."""
        data = self._handle["aerial/features"][start:stop]
        return np.asarray(data, dtype=dtype) if dtype is not None else data

    def aerial_dtype(self) -> np.dtype:
        """The dtype the aerial features are stored in."""
        return self._handle["aerial/features"].dtype

    def optional(self, name: str):
        """A dataset such as ``ground/lat`` read whole, or None when the store lacks it."""
        return self._handle[name][()] if name in self._handle else None

    def close(self) -> None:
        """Close the underlying HDF5 file."""
        if self._handle is not None and self._handle.id.valid:
            self._handle.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc_info):
        self.close()


def _fail(path, message):
    raise CvigInputError(f"{path}: {message}")


def _dataset(path, handle, name, ndim):
    import h5py

    if name not in handle or not isinstance(handle[name], h5py.Dataset):
        _fail(path, f"not a complete feature store: the dataset /{name} is missing")
    dataset = handle[name]
    if len(dataset.shape) != ndim:
        _fail(path, f"/{name} must have {ndim} dimensions, it has shape {dataset.shape}")
    return dataset


def _feature_dataset(path, handle, name):
    dataset = _dataset(path, handle, name, 4)
    if not any(dataset.dtype == dtype for dtype in FEATURE_DTYPES):
        _fail(path, f"/{name} has dtype {dataset.dtype}; features must be float16 or float32")
    return dataset


def _read_attributes(path, handle) -> dict:
    attributes = {name: decode_attribute(value) for name, value in handle.attrs.items()}
    found = attributes.get("format")
    if found != FORMAT:
        _fail(path, f"not a cvig-engine feature store (root attribute format = {found!r}, expected "
                    f"{FORMAT!r})")
    version = attributes.get("format_version")
    if version != FORMAT_VERSION:
        _fail(path, f"feature store format_version {version!r} is not supported (this cvig-engine "
                    f"reads version {FORMAT_VERSION})")
    config = attributes.get("model_config")
    if isinstance(config, str):
        try:
            attributes["model_config"] = json.loads(config) if config else {}
        except json.JSONDecodeError as error:
            _fail(path, f"root attribute model_config is not valid JSON ({error})")
    return attributes


def _check_complete(path, handle, attributes, sizes) -> None:
    for role, size in sizes.items():
        name = f"{role}/done"
        if name not in handle:
            continue
        done = np.asarray(handle[name][()]).astype(bool)
        if done.shape != (size,):
            _fail(path, f"/{name} has shape {done.shape}, expected ({size},)")
        if not done.all():
            missing = np.flatnonzero(~done)
            _fail(path, f"incomplete feature store: {missing.size} of {size} rows of /{role} are "
                        f"not embedded yet (first: row {int(missing[0])}); finish `cvig-engine "
                        "embed` (run it again to resume) before scoring")
    if attributes.get("complete") is False:
        _fail(path, "incomplete feature store (root attribute complete = false); finish "
                    "`cvig-engine embed` (run it again to resume) before scoring")


def _check_values(path, dataset, name) -> None:
    """Raise on the first row holding NaN or Inf, reading a block of rows at a time."""
    for start in range(0, dataset.shape[0], _SCAN_ROWS):
        block = np.asarray(dataset[start:start + _SCAN_ROWS])
        finite = np.isfinite(block.reshape(block.shape[0], -1)).all(axis=1)
        if not finite.all():
            row = start + int(np.flatnonzero(~finite)[0])
            kind = "NaN" if np.isnan(block[row - start]).any() else "Inf"
            _fail(path, f"/{name} row {row} holds {kind} values; the features are unusable "
                        "(re-embed that row)")


def _read_vector(path, handle, name, length, kind):
    if name not in handle:
        return None
    values = np.asarray(handle[name][()])
    if values.shape != (length,):
        _fail(path, f"/{name} has shape {values.shape}, expected ({length},)")
    if kind == "ids":
        return [value.decode("utf-8") if isinstance(value, bytes) else str(value)
                for value in values]
    return values


def open_feature_store(path, *, check_values: bool = True, require_complete: bool = True
                       ) -> FeatureStore:
    """Open a feature store and check it; the returned store keeps the file open.

    Checks: the format attributes; 4-D float features; equal channel counts; equal heights
    (or, with vertical search in the model config, a ground map no taller than the aerial map);
    ground width <= aerial width; /ground/match in -1..M-1 with N rows; ids, heading and done
    masks of the right length; every done mask true (``require_complete``); and, with
    ``check_values``, no NaN or Inf in any feature map.

    Raises:
        CvigInputError: naming the file, the dataset and the first bad row.
    """
    import h5py

    path = Path(path)
    if not path.is_file():
        raise CvigInputError(f"{path}: no such feature store")
    try:
        handle = h5py.File(path, "r")
    except OSError as error:
        raise CvigInputError(f"{path}: not a readable HDF5 file ({error})") from None
    try:
        attributes = _read_attributes(path, handle)
        ground = _feature_dataset(path, handle, "ground/features")
        aerial = _feature_dataset(path, handle, "aerial/features")
        num_ground, channels, ground_height, ground_width = ground.shape
        num_aerial, aerial_channels, aerial_height, aerial_width = aerial.shape
        if require_complete:
            _check_complete(path, handle, attributes, {"ground": num_ground, "aerial": num_aerial})
        vertical = bool((attributes.get("model_config") or {}).get("vertical_search", False))
        if channels != aerial_channels:
            _fail(path, f"ground and aerial features have different channel counts "
                        f"(/ground/features C = {channels}, "
                        f"/aerial/features C = {aerial_channels})")
        if ground_height != aerial_height and not (vertical and ground_height < aerial_height):
            rule = ("with vertical search the ground map must not be taller than the aerial map"
                    if vertical else "vertical search is off in the model config")
            _fail(path, f"ground and aerial feature heights differ (/ground/features H = "
                        f"{ground_height}, /aerial/features H = {aerial_height}); {rule}")
        if ground_width > aerial_width:
            _fail(path, f"the ground map is wider than the aerial map (/ground/features Wg = "
                        f"{ground_width} > /aerial/features W = {aerial_width})")
        match_dataset = _dataset(path, handle, "ground/match", 1)
        if not np.issubdtype(match_dataset.dtype, np.integer):
            _fail(path, f"/ground/match must be integers, it is {match_dataset.dtype}")
        match = np.asarray(match_dataset[()], dtype=np.int64)
        if match.shape != (num_ground,):
            _fail(path, f"/ground/match has {match.shape[0]} rows, /ground/features {num_ground}")
        bad = (match < -1) | (match >= num_aerial)
        if bad.any():
            row = int(np.flatnonzero(bad)[0])
            _fail(path, f"/ground/match row {row} is {int(match[row])}, outside "
                        f"-1..{num_aerial - 1} (the store has {num_aerial} aerial tiles)")
        store = FeatureStore(
            path=path, num_ground=num_ground, num_aerial=num_aerial,
            ground_shape=(channels, ground_height, ground_width),
            aerial_shape=(aerial_channels, aerial_height, aerial_width),
            match=match, attributes=attributes,
            ground_ids=_read_vector(path, handle, "ground/ids", num_ground, "ids"),
            aerial_ids=_read_vector(path, handle, "aerial/ids", num_aerial, "ids"),
            _handle=handle)
        heading = _read_vector(path, handle, "ground/heading", num_ground, "values")
        store.heading = heading.astype(np.float32) if heading is not None else None
        for name, length in (("ground/lat", num_ground), ("ground/lon", num_ground),
                             ("aerial/lat", num_aerial), ("aerial/lon", num_aerial)):
            _read_vector(path, handle, name, length, "values")
        if check_values:
            _check_values(path, ground, "ground/features")
            _check_values(path, aerial, "aerial/features")
        return store
    except BaseException:
        handle.close()
        raise


def write_feature_store(path, *, ground_features, aerial_features, match, ground_ids=None,
                        aerial_ids=None, ground_lat=None, ground_lon=None, aerial_lat=None,
                        aerial_lon=None, heading=None, attrs=None, dtype=None) -> Path:
    """Write a complete feature store from whole arrays, atomically (temporary file, rename).

    Args:
        ground_features: [N, C, H, Wg]; aerial_features: [M, C, Ha, W] (numpy or torch).
        match: int [N], the true tile's row, -1 when unknown.
        ground_ids, aerial_ids: strings (default: the row numbers).
        ground_lat, ground_lon, aerial_lat, aerial_lon, heading: optional per-row values.
        attrs: root attributes; ``model_config`` may be a dict (stored as JSON). Defaults:
            model_sha256 "", model_config {}, fov_deg 360 * Wg / W, backend "unknown",
            precision "fp32".
        dtype: storage dtype (float16 or float32; default: the input's, float64 -> float32).

    Returns:
        The path written. The arrays are not checked here; ``open_feature_store`` checks them.
    """
    import h5py

    path = Path(path)
    ground_features = np.asarray(ground_features)
    aerial_features = np.asarray(aerial_features)
    if dtype is None:
        dtype = np.float16 if ground_features.dtype == np.float16 else np.float32
    num_ground, num_aerial = ground_features.shape[0], aerial_features.shape[0]
    attributes = {"model_sha256": "", "model_config": {}, "backend": "unknown", "precision": "fp32",
                  "fov_deg": 360.0 * ground_features.shape[-1] / aerial_features.shape[-1]}
    attributes.update(attrs or {})
    attributes.update(format=FORMAT, format_version=FORMAT_VERSION)
    if isinstance(attributes["model_config"], dict):
        attributes["model_config"] = json.dumps(attributes["model_config"], sort_keys=True)
    strings = h5py.string_dtype("utf-8")
    temporary = path.with_name(path.name + ".writing")
    with h5py.File(temporary, "w") as handle:
        for name, value in attributes.items():
            handle.attrs[name] = value
        for role, features, ids, size in (("ground", ground_features, ground_ids, num_ground),
                                          ("aerial", aerial_features, aerial_ids, num_aerial)):
            group = handle.create_group(role)
            group.create_dataset("features", data=features.astype(dtype, copy=False))
            ids = [str(row) for row in range(size)] if ids is None else [str(i) for i in ids]
            group.create_dataset("ids", data=np.asarray(ids, dtype=object), dtype=strings)
        handle["ground"].create_dataset("match", data=np.asarray(match, dtype=np.int64))
        for name, values, kind in (("ground/lat", ground_lat, np.float64),
                                   ("ground/lon", ground_lon, np.float64),
                                   ("aerial/lat", aerial_lat, np.float64),
                                   ("aerial/lon", aerial_lon, np.float64),
                                   ("ground/heading", heading, np.float32)):
            if values is not None:
                handle.create_dataset(name, data=np.asarray(values, dtype=kind))
    os.replace(temporary, path)
    return path
