"""Per-photo feature vectors and hand labels for the usable-scene filter.

Feature files (chosen by extension):

- ``.csv``: a header with an ``id`` column and numeric columns (one row per photo), e.g. the 467
  Places365 scene and attribute scores (365 + 102) that the user computed elsewhere.
- ``.npy``: a float array ``[N, D]``. Ids come from a sidecar text file beside it, one id per line,
  named ``<stem>.ids.txt`` (``places.npy`` -> ``places.ids.txt``); without the sidecar the rows
  have no ids and are matched by row order (row i is row i of the labels or dataset CSV).
- ``.h5`` / ``.hdf5``: either a plain ``/features [N, D]`` with ``/ids [N]``, or a cvig-engine
  feature store, whose ``/ground/features [N, C, H, Wg]`` maps are pooled per photo (``"mean"``:
  the C channel means over H and Wg, which do not depend on the photo's heading) or flattened
  (``"flatten"``), with ids from ``/ground/ids``.

Labels: a CSV with columns ``id,usable`` (1 = usable, 0 = not), or a dataset CSV (WITW layout)
whose ``usable`` column labels its ``surface`` photos. A dataset row's photo id is its ``id``
column when the CSV has one, else its surface path relative to the CSV's folder (forward
slashes), as in the feature stores of ``cvig-engine embed``.
"""
from __future__ import annotations

import csv
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from cvig_engine.errors import CvigInputError

FEATURE_EXTENSIONS = (".csv", ".npy", ".h5", ".hdf5")
STORE_POOLINGS = ("mean", "flatten")


@dataclass
class FeatureTable:
    """Feature vectors ``[N, D]`` (float64) and their photo ids (None: matched by row order)."""

    path: Path
    ids: list | None
    vectors: np.ndarray
    lines: list | None = None  # CSV line number of each row, for messages

    def __len__(self):
        return self.vectors.shape[0]

    def row_name(self, index: int) -> str:
        """How a row is named in messages: its place in the file and its id."""
        place = f"line {self.lines[index]}" if self.lines is not None else f"row {index}"
        return place if self.ids is None else f"{place} (id {self.ids[index]!r})"


def photo_id(surface_path, csv_path) -> str:
    """A photo's id: its surface path relative to the dataset CSV's folder (forward slashes).

    ``surface_path`` is the path as ``read_dataset`` gives it (already joined with the CSV's
    folder); a photo outside that folder keeps its absolute path. The rule is the one
    ``write_witw_csv`` writes paths with.
    """
    from cvig_engine.data import _relative

    return _relative(Path(surface_path), Path(csv_path).parent)


def record_photo_id(record) -> str:
    """The id of a dataset record's photo: its CSV's ``id`` column if any, else ``photo_id``.

    The same rule as the ground ids of ``cvig-engine embed`` feature stores.
    """
    return record.extra.get("id") or photo_id(record.surface, record.csv_path)


def read_features(path, store_pooling: str = "mean") -> FeatureTable:
    """Read a feature file (CSV, NPY or HDF5; see the module docstring) and check every value.

    Raises CvigInputError for an unknown extension, a malformed file, duplicate ids or a NaN/Inf
    value, naming the file and the row.
    """
    path = Path(path)
    if not path.is_file():
        raise CvigInputError(f"{path}: feature file not found")
    suffix = path.suffix.lower()
    lines = None
    if suffix == ".csv":
        ids, vectors, lines = _read_feature_csv(path)
    elif suffix == ".npy":
        ids, vectors = _read_feature_npy(path)
    elif suffix in (".h5", ".hdf5"):
        ids, vectors = _read_feature_hdf5(path, store_pooling)
    else:
        raise CvigInputError(f"{path}: unknown feature file format {path.suffix!r} "
                             f"(use one of {', '.join(FEATURE_EXTENSIONS)})")
    table = FeatureTable(path=path, ids=ids, vectors=vectors, lines=lines)
    _check_table(table)
    return table


def _read_feature_csv(path: Path):
    with open(path, newline="", encoding="utf-8-sig") as handle:
        reader = csv.reader(handle)
        header = next(reader, None)
        if header is None:
            raise CvigInputError(f"{path}: empty feature CSV (expected a header with an 'id' "
                                 "column)")
        header = [name.strip() for name in header]
        if "id" not in header:
            raise CvigInputError(f"{path}: line 1: no 'id' column in the header {header[:5]}")
        if len(header) < 2:
            raise CvigInputError(f"{path}: line 1: no feature columns besides 'id'")
        id_column = header.index("id")
        ids, rows, lines = [], [], []
        for line_number, row in enumerate(reader, start=2):
            if not row:
                continue
            if len(row) != len(header):
                raise CvigInputError(f"{path}: line {line_number}: {len(row)} values, "
                                     f"the header has {len(header)} columns")
            values = []
            for column, text in enumerate(row):
                if column == id_column:
                    continue
                try:
                    values.append(float(text))
                except ValueError:
                    raise CvigInputError(f"{path}: line {line_number}, column {header[column]!r}: "
                                         f"{text!r} is not a number") from None
            ids.append(row[id_column].strip())
            rows.append(values)
            lines.append(line_number)
    if not rows:
        raise CvigInputError(f"{path}: no feature rows")
    return ids, np.asarray(rows, dtype=np.float64), lines


def npy_ids_path(path) -> Path:
    """The sidecar id list of a ``.npy`` feature file: ``<stem>.ids.txt`` beside it."""
    path = Path(path)
    return path.with_name(path.stem + ".ids.txt")


def _read_feature_npy(path: Path):
    try:
        array = np.load(path, allow_pickle=False)
    except (ValueError, OSError) as error:
        raise CvigInputError(f"{path}: not a readable .npy array ({error})") from None
    vectors = _as_matrix(path, array, "the array")
    ids = None
    sidecar = npy_ids_path(path)
    if sidecar.is_file():
        lines = sidecar.read_text(encoding="utf-8").splitlines()
        ids = [line.strip() for line in lines if line.strip()]
        if len(ids) != len(vectors):
            raise CvigInputError(f"{sidecar}: {len(ids)} ids for the {len(vectors)} rows of {path}")
    return ids, vectors


def _read_feature_hdf5(path: Path, store_pooling: str):
    import h5py

    if store_pooling not in STORE_POOLINGS:
        raise CvigInputError(f"unknown feature-store pooling {store_pooling!r} "
                             f"(use one of {STORE_POOLINGS})")
    try:
        handle = h5py.File(path, "r")
    except OSError as error:
        raise CvigInputError(f"{path}: not a readable HDF5 file ({error})") from None
    with handle:
        if "features" in handle and "ids" in handle:
            vectors = _as_matrix(path, handle["features"][()], "/features")
            ids = _decode_ids(handle["ids"][()])
            where = "/ids"
        elif "ground/features" in handle and "ground/ids" in handle:
            maps = np.asarray(handle["ground/features"][()], dtype=np.float64)
            if maps.ndim != 4:
                raise CvigInputError(f"{path}: /ground/features has shape {maps.shape}, "
                                     "expected [N, C, H, Wg]")
            if store_pooling == "mean":
                vectors = maps.mean(axis=(2, 3))
            else:
                vectors = maps.reshape(maps.shape[0], -1)
            ids = _decode_ids(handle["ground/ids"][()])
            where = "/ground/ids"
        else:
            raise CvigInputError(f"{path}: no /features + /ids datasets and no feature store "
                                 "(/ground/features + /ground/ids)")
    if len(ids) != len(vectors):
        raise CvigInputError(f"{path}: {where} has {len(ids)} ids for {len(vectors)} feature rows")
    return ids, vectors


def _decode_ids(values) -> list:
    return [value.decode("utf-8") if isinstance(value, bytes) else str(value)
            for value in np.ravel(values)]


def _as_matrix(path: Path, array, what: str) -> np.ndarray:
    array = np.asarray(array)
    if array.dtype.kind not in "fiub":
        raise CvigInputError(f"{path}: {what} has dtype {array.dtype}, expected numbers")
    if array.ndim != 2 or array.shape[0] == 0 or array.shape[1] == 0:
        raise CvigInputError(f"{path}: {what} has shape {array.shape}, expected [N, D] with "
                             "N, D > 0")
    return array.astype(np.float64)


def _check_table(table: FeatureTable) -> None:
    finite = np.isfinite(table.vectors)
    if not finite.all():
        row, column = (int(value) for value in np.argwhere(~finite)[0])
        raise CvigInputError(f"{table.path}: {table.row_name(row)}, feature {column}: "
                             f"{table.vectors[row, column]} (NaN or Inf values are not allowed)")
    if table.ids is not None:
        _check_unique(table.path, table.ids, table.row_name)


def _check_unique(path, ids, name_of_row) -> None:
    seen = {}
    for index, identifier in enumerate(ids):
        if identifier == "":
            raise CvigInputError(f"{path}: {name_of_row(index)}: empty id")
        if identifier in seen:
            raise CvigInputError(f"{path}: {name_of_row(index)}: duplicate id {identifier!r} "
                                 f"(first at {name_of_row(seen[identifier])})")
        seen[identifier] = index


def read_labels(path) -> tuple[list, np.ndarray]:
    """Hand labels: ``(ids, usable)`` with usable an int array of 0/1.

    The CSV has columns ``id,usable``, or is a dataset CSV with ``surface`` and ``usable``
    columns (a row without an ``id`` then gets ``photo_id(surface, path)``). Values other than
    1/0 (also true/false, yes/no, y/n, t/f), duplicate ids and empty files raise CvigInputError
    naming the line.
    """
    path = Path(path)
    if not path.is_file():
        raise CvigInputError(f"{path}: label file not found")
    if path.suffix.lower() != ".csv":
        raise CvigInputError(f"{path}: unknown label file format {path.suffix!r} (use a .csv "
                             "with id,usable)")
    with open(path, newline="", encoding="utf-8-sig") as handle:
        reader = csv.DictReader(handle)
        fields = [name.strip() for name in (reader.fieldnames or [])]
        reader.fieldnames = fields
        if "usable" not in fields or not ({"id", "surface"} & set(fields)):
            raise CvigInputError(f"{path}: line 1: expected columns 'id,usable' (or a dataset CSV "
                                 f"with 'surface' and 'usable'), got {fields[:6]}")
        ids, labels, lines = [], [], []
        for row in reader:
            line_number = reader.line_num
            identifier = (row.get("id") or "").strip()
            surface = (row.get("surface") or "").strip()
            if not identifier and surface:  # a dataset CSV: the same ids as record_photo_id
                identifier = photo_id(path.parent / surface, path)
            labels.append(_parse_label(path, line_number, row.get("usable")))
            ids.append(identifier)
            lines.append(line_number)
    if not ids:
        raise CvigInputError(f"{path}: no label rows")
    _check_unique(path, ids, lambda index: f"line {lines[index]}")
    return ids, np.asarray(labels, dtype=np.int64)


_LABEL_WORDS = {"1": 1, "0": 0, "true": 1, "false": 0, "yes": 1, "no": 0, "y": 1, "n": 0, "t": 1,
                "f": 0, "1.0": 1, "0.0": 0}


def _parse_label(path, line_number, text) -> int:
    key = (text or "").strip().lower()
    if key not in _LABEL_WORDS:
        raise CvigInputError(f"{path}: line {line_number}: usable must be 1 or 0, got {text!r}")
    return _LABEL_WORDS[key]


def align_features(table: FeatureTable, ids: list, source, row_names=None) -> np.ndarray:
    """Feature rows for ``ids`` in that order (rows of ``source``, a labels or dataset file).

    Ids without a feature row raise CvigInputError naming ``source`` and the row. A table without
    ids (a .npy without sidecar) must have exactly one row per id, matched by order.
    """
    row_names = row_names or (lambda index: f"row {index}")
    if table.ids is None:
        if len(table) != len(ids):
            raise CvigInputError(
                f"{table.path}: {len(table)} feature rows but {source} has {len(ids)} rows; "
                f"without ids ({npy_ids_path(table.path).name}) rows are matched by order, so the "
                "counts must agree")
        return table.vectors
    position = {identifier: index for index, identifier in enumerate(table.ids)}
    indices = []
    for index, identifier in enumerate(ids):
        if identifier not in position:
            raise CvigInputError(f"{source}: {row_names(index)}: photo {identifier!r} has no "
                                 f"feature vector in {table.path}")
        indices.append(position[identifier])
    return table.vectors[np.asarray(indices, dtype=np.int64)]


def image_statistics(image) -> np.ndarray:
    """Simple colour and texture statistics of one photo ``[H, W, 3]`` (floats in [0, 1]).

    For each of three horizontal bands (top, middle, bottom third) and each RGB channel: the
    mean and standard deviation; then per band the mean absolute horizontal and vertical
    gradients of the grey image; and over the whole photo the fraction of strong edges. 3 * 6 +
    3 * 2 + 1 = 25 values. A stand-in for Places365 scores where none are available (e.g. the
    synthetic world): close-up photos of a wall lack the sky / street / facade band structure.
    """
    image = np.asarray(image, dtype=np.float64)
    if image.ndim != 3 or image.shape[2] < 3:
        raise CvigInputError(f"image_statistics needs an [H, W, 3] image, got shape {image.shape}")
    image = image[:, :, :3]
    grey = image.mean(axis=2)
    vertical = np.abs(np.diff(grey, axis=0))
    horizontal = np.abs(np.diff(grey, axis=1))
    height = image.shape[0]
    bounds = [0, height // 3, 2 * height // 3, height]
    colour, texture = [], []
    for band in range(3):
        rows = slice(bounds[band], max(bounds[band + 1], bounds[band] + 1))
        pixels = image[rows].reshape(-1, 3)
        colour.extend(pixels.mean(axis=0))
        colour.extend(pixels.std(axis=0))
        texture.append(horizontal[rows].mean() if horizontal[rows].size else 0.0)
        texture.append(vertical[rows].mean() if vertical[rows].size else 0.0)
    edges = np.concatenate([horizontal.ravel(), vertical.ravel()])
    strong = float(np.mean(edges > 0.1)) if edges.size else 0.0
    return np.asarray(colour + texture + [strong], dtype=np.float64)


def image_statistics_names() -> list:
    """Column names of ``image_statistics``, in order."""
    names = []
    for band in ("top", "middle", "bottom"):
        names += [f"{band}_{channel}_mean" for channel in "rgb"]
        names += [f"{band}_{channel}_std" for channel in "rgb"]
    for band in ("top", "middle", "bottom"):
        names += [f"{band}_gradient_x", f"{band}_gradient_y"]
    return names + ["strong_edge_fraction"]
