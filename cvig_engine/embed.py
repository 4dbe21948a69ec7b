"""Batch-encode ground photos and overhead tiles into a resumable HDF5 feature store.

``embed_dataset(model_dir, csv, out)`` reads a dataset CSV (``cvig_engine.data``), encodes every
photo and every distinct tile with a backend (``cvig_engine.backends``) and writes the feature
store whose layout the README documents (``/ground``, ``/aerial``, root attributes). Tiles are
stored once: photos that share a tile (the same resolved ``overhead`` path) point to the same row
through ``/ground/match``. ``embed_tiles`` encodes a reference gallery (tiles only, N = 0 photos).

Pipeline: worker processes (a torch ``DataLoader``) decode and preprocess whole batches while the
main process encodes the previous one. With a CUDA backend, plain JPEGs are decoded on the GPU
(``torchvision.io.decode_jpeg``) and then preprocessed like any other image.

Resume: every dataset is allocated (NaN-filled) when the store is created, so later writes touch
only raw data and never the file's metadata. After each batch the features are flushed first and
the ``done`` mask second, so a killed run leaves a readable file in which every row marked done
holds its final features. A rerun with the same model, preprocessing and dataset continues where
it stopped; batches are fixed ranges of rows and are always recomputed whole, so the result is
identical to an uninterrupted run. A different model, preprocessing, dataset, precision or
storage type is refused.

Bad rows: every file is checked up front (``check_images``); a file that still fails to decode
in a worker is reported the same way (path, CSV row, reason, exit code 2). With ``skip_bad`` the
rows are recorded in ``/skipped`` and left out of the final store (which is then rewritten
without them); a tile that fails takes every photo that points to it along. Nothing is
zero-filled.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from cvig_engine.errors import CvigInputError
from cvig_engine.store import FORMAT, FORMAT_VERSION

LOGGER = logging.getLogger(__name__)

STORAGE_DTYPES = ("float32", "float16")
JPEG_DECODERS = ("auto", "cpu", "gpu")
DEFAULT_CROP_SEED = 0
_CHUNK_BYTES = 1 << 20  # ~1 MiB feature chunks: large sequential writes, small read-modify-writes
_COPY_ROWS = 4096
_JPEG_SUFFIXES = (".jpg", ".jpeg", ".jpe", ".jfif")

__all__ = ["embed_dataset", "embed_tiles", "read_tile_list"]


# -- the plan: which photos and tiles, in which rows ---------------------------------------------

@dataclass
class _Items:
    """Photos or tiles in store order."""

    ids: list
    paths: list                        # image paths (str)
    rows: np.ndarray                   # CSV line of the (first) record
    lat: np.ndarray
    lon: np.ndarray
    masks: list                        # per item: mask paths for the extra input bands, or None
    fov: np.ndarray | None = None      # photos: the image's field of view
    heading: np.ndarray | None = None  # photos: compass heading of the image's centre column

    def __len__(self):
        return len(self.ids)


@dataclass
class _Plan:
    """Everything the store holds except features; fixed once the store is created."""

    csv_path: Path | None
    ground: _Items
    aerial: _Items
    match: np.ndarray  # [N] tile index of each photo
    crop: np.ndarray   # [N] bool: a 360 deg panorama cropped to the model's fov
    city: str | None

    def digest(self) -> str:
        """sha256 of what decides the store's rows (ids, tiles, matches), for resume checks."""
        document = {"ground": self.ground.ids, "aerial": self.aerial.ids,
                    "match": self.match.tolist(), "crop": self.crop.tolist()}
        return hashlib.sha256(json.dumps(document, sort_keys=True).encode()).hexdigest()


def _relative_id(path, folder) -> str:
    from cvig_engine.data import _relative

    return _relative(Path(path), folder) if folder is not None else Path(path).as_posix()


def _id_column(record) -> str:
    """The CSV's ``id`` cell for this row (any capitalisation of the header), or ""."""
    return next((value for name, value in record.extra.items() if name.lower() == "id"), "")


def _uses_masks(config: dict) -> bool:
    """True for the 5-band model (RGB + building and road masks), False for RGB."""
    channels = int(config["in_channels"])
    if channels not in (3, 5):
        raise CvigInputError(f"the data pipeline feeds 3 or 5 input channels, the model takes "
                             f"{channels}")
    return channels == 5


def _mask_paths(record, names, use_masks: bool):
    """The record's mask files for the extra input bands, or None for an RGB model."""
    if not use_masks:
        return None
    missing = [name for name in names if name not in record.masks]
    if missing:
        raise CvigInputError(f"{record.where()}: the 5-channel model needs the mask column(s) "
                             f"{', '.join(missing)}")
    return [str(record.masks[name]) for name in names]


def _empty_columns(photos: bool) -> dict:
    names = ["ids", "paths", "rows", "lat", "lon", "masks"] + (["fov", "heading"] if photos else [])
    return {name: [] for name in names}


def _add_item(columns: dict, item_id: str, path, record, masks) -> None:
    for name, value in (("ids", item_id), ("paths", str(path)), ("rows", record.row),
                        ("lat", record.lat), ("lon", record.lon), ("masks", masks)):
        columns[name].append(value)


def _items(columns: dict) -> _Items:
    def floats(name):
        return np.asarray(columns[name], dtype=np.float64) if name in columns else None

    return _Items(ids=columns["ids"], paths=columns["paths"],
                  rows=np.asarray(columns["rows"], dtype=np.int64), lat=floats("lat"),
                  lon=floats("lon"), masks=columns["masks"], fov=floats("fov"),
                  heading=floats("heading"))


def _plan_pairs(records, csv_path: Path, config: dict) -> _Plan:
    from cvig_engine.data import AERIAL_MASKS, FOV_TOLERANCE, GROUND_MASKS

    use_masks = _uses_masks(config)
    model_fov = float(config["fov"])
    folder = csv_path.parent
    tile_index: dict = {}
    aerial, ground = _empty_columns(False), _empty_columns(True)
    match, crop, first_row_of_id = [], [], {}
    for record in records:
        cropped = record.is_panorama and model_fov < 360.0 - FOV_TOLERANCE
        if abs(record.fov - model_fov) > FOV_TOLERANCE and not cropped:
            raise CvigInputError(f"{record.where()}: the photo covers {record.fov:g} deg but the "
                                 f"model expects {model_fov:g} deg (only 360 deg panoramas are "
                                 "cropped)")
        ground_masks = _mask_paths(record, GROUND_MASKS, use_masks)
        aerial_masks = _mask_paths(record, AERIAL_MASKS, use_masks)
        # Tile identity: the resolved file (and its masks), however the CSV spells the path.
        key = (str(Path(record.overhead).resolve()), tuple(aerial_masks or ()))
        if key not in tile_index:
            tile_index[key] = len(aerial["ids"])
            _add_item(aerial, _relative_id(record.overhead, folder), record.overhead, record,
                      aerial_masks)
        photo_id = _id_column(record) or _relative_id(record.surface, folder)
        if photo_id in first_row_of_id:
            raise CvigInputError(f"{record.where()}: photo id {photo_id!r} repeats row "
                                 f"{first_row_of_id[photo_id]} (ground ids must be unique; add an "
                                 "'id' column to tell them apart)")
        first_row_of_id[photo_id] = record.row
        _add_item(ground, photo_id, record.surface, record, ground_masks)
        ground["fov"].append(record.fov)
        ground["heading"].append(record.heading)
        match.append(tile_index[key])
        crop.append(cropped)
    cities = {record.city for record in records}
    return _Plan(csv_path=csv_path, ground=_items(ground), aerial=_items(aerial),
                 match=np.asarray(match, dtype=np.int64), crop=np.asarray(crop, dtype=bool),
                 city=cities.pop() if len(cities) == 1 and "" not in cities else None)


def read_tile_list(tiles) -> tuple[list, Path | None]:
    """Read a reference gallery: a CSV with an ``overhead`` column, or a list of tile paths.

    The CSV may also have ``id``, ``lat``, ``lon`` and ``overhead_building`` /
    ``overhead_road`` (mask) columns; paths are relative to the CSV's folder. Returns
    (records, csv_path) with ``PairRecord`` records whose ``surface`` is None.
    """
    from cvig_engine.data import AERIAL_MASKS, PairRecord, _parse_float, _read_rows, _resolve

    if not isinstance(tiles, (str, os.PathLike)):
        paths = [Path(path) for path in tiles]
        if not paths:
            raise CvigInputError("empty tile list")
        return [PairRecord(row=index + 1, surface=None, overhead=path)
                for index, path in enumerate(paths)], None
    csv_path = Path(tiles)
    rows = _read_rows(csv_path)
    header_line, header = rows[0]
    names = [cell.lower() for cell in header]
    if "overhead" not in names:
        raise CvigInputError(f"{csv_path}: row {header_line}: missing column overhead (a tile list "
                             f"needs an 'overhead' column; got {', '.join(header)})")
    if len(rows) == 1:
        raise CvigInputError(f"{csv_path}: empty CSV (a header but no data rows)")
    column = {name: index for index, name in enumerate(names)}
    records = []
    for line, cells in rows[1:]:
        where = f"{csv_path}: row {line}"
        if len(cells) != len(header):
            raise CvigInputError(f"{where}: {len(cells)} fields but the header has {len(header)}")
        value = {name: cells[index] for name, index in column.items()}
        if not value["overhead"]:
            raise CvigInputError(f"{where}: empty overhead path")
        position = {}
        for name, limit in (("lat", 90.0), ("lon", 180.0)):
            position[name] = _parse_float(value.get(name, ""), name, where, optional=True)
            if abs(position[name]) > limit:
                raise CvigInputError(f"{where}: {name} {position[name]} outside [-{limit:g}, "
                                     f"{limit:g}]")
        masks = {name: _resolve(csv_path.parent, value[name])
                 for name in AERIAL_MASKS if value.get(name)}
        records.append(PairRecord(
            row=line, surface=None, overhead=_resolve(csv_path.parent, value["overhead"]),
            lat=position["lat"], lon=position["lon"], masks=masks, csv_path=csv_path,
            extra={"id": value["id"]} if value.get("id") else {}))
    return records, csv_path


def _plan_tiles(records, csv_path: Path | None, config: dict) -> _Plan:
    from cvig_engine.data import AERIAL_MASKS

    use_masks = _uses_masks(config)
    folder = csv_path.parent if csv_path is not None else None
    seen: dict = {}
    aerial = _empty_columns(False)
    for record in records:
        tile_id = _id_column(record) or _relative_id(record.overhead, folder)
        key = str(Path(record.overhead).resolve())
        if tile_id in seen or key in seen:
            raise CvigInputError(f"{record.where()}: tile {tile_id!r} repeats row "
                                 f"{seen.get(tile_id, seen.get(key))} (a gallery lists each tile "
                                 "once)")
        seen[tile_id] = seen[key] = record.row
        _add_item(aerial, tile_id, record.overhead, record,
                  _mask_paths(record, AERIAL_MASKS, use_masks))
    return _Plan(csv_path=csv_path, ground=_items(_empty_columns(True)), aerial=_items(aerial),
                 match=np.zeros(0, dtype=np.int64), crop=np.zeros(0, dtype=bool), city=None)


# -- preprocessing (runs in the worker processes) ------------------------------------------------

def _preprocessing_description(manifest: dict, crop_seed: int, jpeg_decoder: str) -> dict:
    """What the embed does to images before the encoder; a resume must do exactly the same."""
    jpeg = "nvjpeg (torchvision.io.decode_jpeg on CUDA)" if jpeg_decoder == "gpu" else "Pillow"
    return {
        "model": manifest.get("preprocess", {}),
        "aerial_input_kind": manifest.get("aerial_input_kind", "polar"),
        "image_decoding": {"library": "cvig_engine.data.load_image (Pillow)", "jpeg": jpeg},
        "panorama_crop": {"seed": int(crop_seed),
                          "rule": "360 deg panoramas for a narrower model: crop_panorama with "
                                  "rng = numpy.random.default_rng([seed, csv_row]) (start column "
                                  "rng.integers(width)); /ground/heading holds the crop's centre"},
    }


class _Preprocessor:
    """Loads and preprocesses one photo or tile; picklable, so DataLoader workers can run it."""

    def __init__(self, plan: _Plan, config: dict, aerial_kind: str, crop_seed: int,
                 raw_jpeg: bool):
        self.plan = plan
        self.config = config
        self.aerial_kind = aerial_kind
        self.crop_seed = int(crop_seed)
        self.raw_jpeg = raw_jpeg

    def items(self, kind: str) -> _Items:
        return self.plan.ground if kind == "ground" else self.plan.aerial

    def _where(self, items: _Items, index: int) -> str:
        row = int(items.rows[index])
        csv_path = self.plan.csv_path
        return f"{items.paths[index]} ({f'{csv_path}: row {row}' if csv_path else f'item {row}'})"

    def _masks(self, items: _Items, index: int):
        from cvig_engine.data import load_mask

        if items.masks[index] is None:
            return None
        return [load_mask(path, csv_path=self.plan.csv_path, row=int(items.rows[index]))
                for path in items.masks[index]]

    def load(self, items: _Items, index: int) -> np.ndarray:
        """The decoded image, uint8 [H, W, 3] (``cvig_engine.data.load_image``)."""
        from cvig_engine.data import load_image

        return load_image(items.paths[index], csv_path=self.plan.csv_path,
                          row=int(items.rows[index]))

    def raw_or_image(self, items: _Items, index: int) -> np.ndarray:
        """The decoded image, or (with GPU JPEG decoding) the file's bytes for a plain JPEG."""
        path = items.paths[index]
        if self.raw_jpeg and _is_plain_jpeg(path):
            return np.fromfile(path, dtype=np.uint8)
        return self.load(items, index)

    def finish(self, kind: str, index: int, image) -> tuple[np.ndarray, float]:
        """Model input [C, H, W] float32 and, for a photo, its centre's heading (NaN: unknown)."""
        items = self.items(kind)
        try:
            if kind == "aerial":
                return self._aerial(items, index, image), math.nan
            return self._ground(items, index, image)
        except CvigInputError as error:
            raise CvigInputError(f"{self._where(items, index)}: {error}") from None

    def _ground(self, items: _Items, index: int, image) -> tuple[np.ndarray, float]:
        from cvig_engine.data import _prepare_ground

        rng = None
        if self.plan.crop[index]:  # the same crop on every run: seeded by the CSV row
            rng = np.random.default_rng([self.crop_seed, int(items.rows[index])])
        tensor, offset = _prepare_ground(image, self.config, rng=rng,
                                         image_fov_deg=float(items.fov[index]),
                                         masks=self._masks(items, index))
        heading = float(items.heading[index])
        return tensor.numpy(), (heading + offset) % 360.0 if math.isfinite(heading) else math.nan

    def _aerial(self, items: _Items, index: int, image) -> np.ndarray:
        from cvig_engine.data import _check_channels, _stack_layers, _to_tensor, preprocess_aerial

        masks = self._masks(items, index)
        if self.aerial_kind == "polar":
            return preprocess_aerial(image, self.config, masks=masks).numpy()
        # The polar transform is inside the exported graph: feed the normalised square tile.
        layers = _stack_layers(image, masks, "overhead")
        _check_channels(layers, self.config, "overhead tile")
        if layers.shape[0] != layers.shape[1]:
            raise CvigInputError(f"overhead tiles must be square, got {layers.shape[1]}x"
                                 f"{layers.shape[0]} pixels")
        size = int(self.config["aerial_size"])
        return _to_tensor(layers, (size, size), self.config).numpy()


def _is_plain_jpeg(path) -> bool:
    """A baseline RGB or grey JPEG without an EXIF rotation (nvjpeg then decodes it like Pillow)."""
    if not str(path).lower().endswith(_JPEG_SUFFIXES):
        return False
    from PIL import Image

    try:
        with Image.open(path) as image:
            return (image.format == "JPEG" and image.mode in ("RGB", "L")
                    and image.getexif().get(0x0112, 1) == 1)
    except Exception:  # load_image reports it, with the row
        return False


@dataclass
class _Batch:
    kind: str
    indices: np.ndarray  # the batch's rows that are to be encoded now
    inputs: list         # per row: model input, or JPEG bytes still to be decoded
    headings: list
    failures: list       # [(row index, reason)]

    def keep(self, positions) -> None:
        """Keep only the rows at these positions of the batch."""
        self.indices = self.indices[np.asarray(positions, dtype=np.int64)]
        self.inputs = [self.inputs[position] for position in positions]
        self.headings = [self.headings[position] for position in positions]


class _BatchSource:
    """Map-style dataset of whole batches (the DataLoader runs one batch per worker call)."""

    def __init__(self, preprocessor: _Preprocessor, jobs: list):
        self.preprocessor = preprocessor
        self.jobs = jobs

    def __len__(self):
        return len(self.jobs)

    def __getitem__(self, job: int) -> _Batch:
        kind, indices = self.jobs[job]
        items = self.preprocessor.items(kind)
        kept, inputs, headings, failures = [], [], [], []
        for index in indices:
            try:
                image = self.preprocessor.raw_or_image(items, index)
                if image.ndim == 1:  # JPEG bytes for the GPU decoder
                    model_input, heading = image, math.nan
                else:
                    model_input, heading = self.preprocessor.finish(kind, index, image)
            except CvigInputError as error:
                failures.append((int(index), str(error)))
                continue
            kept.append(int(index))
            inputs.append(model_input)
            headings.append(heading)
        return _Batch(kind, np.asarray(kept, dtype=np.int64), inputs, headings, failures)


def _no_collate(batch):
    return batch


def _decode_on_gpu(batch: _Batch, preprocessor: _Preprocessor) -> _Batch:
    """Decode the JPEG bytes of a batch with nvjpeg, then preprocess them like any image.

    A file nvjpeg rejects is decoded by Pillow instead (which names it if it is really broken).
    """
    import torch
    from torchvision.io import ImageReadMode, decode_jpeg

    raw = [position for position, value in enumerate(batch.inputs) if value.ndim == 1]
    if not raw:
        return batch
    items = preprocessor.items(batch.kind)
    encoded = [torch.from_numpy(batch.inputs[position]) for position in raw]
    try:
        decoded = decode_jpeg(encoded, mode=ImageReadMode.RGB, device="cuda")
    except RuntimeError:
        decoded = [None] * len(raw)
    failed = set()
    for position, image in zip(raw, decoded):
        index = int(batch.indices[position])
        try:
            if image is None:
                array = preprocessor.load(items, index)
            else:
                array = np.ascontiguousarray(image.permute(1, 2, 0).cpu().numpy())
            batch.inputs[position], batch.headings[position] = preprocessor.finish(
                batch.kind, index, array)
        except CvigInputError as error:
            batch.failures.append((index, str(error)))
            failed.add(position)
    if failed:
        batch.keep([position for position in range(len(batch.inputs)) if position not in failed])
    return batch


def _prefetched(iterator, function, depth: int = 2):
    """Apply ``function`` to the iterator's items in a background thread, ``depth`` items ahead."""
    import queue
    import threading

    results: queue.Queue = queue.Queue(maxsize=depth)
    stop = threading.Event()

    def produce():
        try:
            for item in iterator:
                if stop.is_set():
                    return
                results.put(("item", function(item)))
            results.put(("end", None))
        except BaseException as error:  # handed to the consumer, which re-raises it
            results.put(("error", error))

    thread = threading.Thread(target=produce, daemon=True, name="cvig-embed-gpu-decode")
    thread.start()
    try:
        while True:
            kind, value = results.get()
            if kind == "error":
                raise value
            if kind == "end":
                return
            yield value
    finally:
        stop.set()
        while thread.is_alive():  # unblock the producer if it waits on a full queue
            try:
                results.get(timeout=0.1)
            except queue.Empty:
                pass


# -- the HDF5 store ------------------------------------------------------------------------------

def _early_dataset(group, name, shape, dtype, fill):
    """A chunked dataset whose chunks are all allocated (and filled) at creation.

    Later writes then touch raw data only, never the file's metadata, which keeps a file whose
    writer was killed between two flushes readable.
    """
    import h5py

    if shape[0] == 0:
        return group.create_dataset(name, shape=shape, dtype=dtype)
    row_bytes = int(np.prod(shape[1:], dtype=np.int64)) * np.dtype(dtype).itemsize
    chunk_rows = int(max(1, min(shape[0], _CHUNK_BYTES // max(row_bytes, 1))))
    dcpl = h5py.h5p.create(h5py.h5p.DATASET_CREATE)
    dcpl.set_alloc_time(h5py.h5d.ALLOC_TIME_EARLY)
    return group.create_dataset(name, shape=shape, dtype=dtype, fillvalue=fill, dcpl=dcpl,
                                chunks=(chunk_rows,) + tuple(shape[1:]))


_SKIPPED_COLUMNS = ("row", "surface", "overhead", "reason")


def _create_store(path: Path, plan: _Plan, attributes: dict, ground_shape, aerial_shape,
                  storage_dtype: str, skipped: list) -> None:
    """Write an empty store (nothing done) for ``plan``, atomically: no file if killed meanwhile."""
    import h5py

    temporary = path.with_name(path.name + ".creating")
    strings = h5py.string_dtype("utf-8")
    with h5py.File(temporary, "w") as handle:
        for name, value in attributes.items():
            handle.attrs[name] = value
        handle.attrs["complete"] = False
        for role, items, shape in (("ground", plan.ground, ground_shape),
                                   ("aerial", plan.aerial, aerial_shape)):
            group = handle.create_group(role)
            _early_dataset(group, "features", (len(items),) + tuple(shape), storage_dtype, np.nan)
            _early_dataset(group, "done", (len(items),), np.uint8, 0)
            group.create_dataset("ids", data=np.asarray(items.ids, dtype=object), dtype=strings)
            group.create_dataset("row", data=items.rows)
            if np.isfinite(items.lat).any() or np.isfinite(items.lon).any():
                group.create_dataset("lat", data=items.lat)
                group.create_dataset("lon", data=items.lon)
        handle["ground"].create_dataset("match", data=plan.match)
        if np.isfinite(plan.ground.heading).any():
            # Cropped panoramas get their crop's centre heading when they are encoded.
            heading = _early_dataset(handle["ground"], "heading", (len(plan.ground),), np.float32,
                                     np.nan)
            heading[:] = np.where(plan.crop, np.nan, plan.ground.heading).astype(np.float32)
        group = handle.create_group("skipped")
        for name in _SKIPPED_COLUMNS:
            group.create_dataset(name, shape=(0,), maxshape=(None,), chunks=(256,),
                                 dtype=np.int64 if name == "row" else strings)
        if skipped:
            _append_skipped(handle, skipped)
    os.replace(temporary, path)


def _append_skipped(handle, entries) -> None:
    group = handle["skipped"]
    start = group["row"].shape[0]
    for position, name in enumerate(_SKIPPED_COLUMNS):
        dataset = group[name]
        dataset.resize((start + len(entries),))
        values = [entry[position] for entry in entries]
        dataset[start:] = np.asarray(values, dtype=np.int64 if name == "row" else object)


def _read_skipped(handle) -> list:
    group = handle["skipped"]
    columns = [group["row"][:]] + [group[name].asstr()[:] for name in _SKIPPED_COLUMNS[1:]]
    return [(int(row), surface, overhead, reason)
            for row, surface, overhead, reason in zip(*columns)]


def _runs(indices: np.ndarray):
    """Split sorted indices into (start, stop, positions) runs of consecutive values."""
    if indices.size == 0:
        return
    breaks = np.flatnonzero(np.diff(indices) != 1) + 1
    edges = np.concatenate([[0], breaks, [indices.size]])
    for low, high in zip(edges[:-1], edges[1:]):
        yield int(indices[low]), int(indices[high - 1]) + 1, slice(int(low), int(high))


def _open_existing(path: Path, mode: str = "r+"):
    import h5py

    try:
        handle = h5py.File(path, mode)
    except OSError as error:
        if "lock" in str(error).lower():
            raise CvigInputError(f"{path}: is open in another program (another embed writing "
                                 f"it?): {error}") from None
        raise CvigInputError(f"{path}: exists and is not a readable HDF5 feature store ({error}); "
                             "delete it or choose another output") from None
    if handle.attrs.get("format") != FORMAT:
        handle.close()
        raise CvigInputError(f"{path}: exists and is not a cvig feature store (format attribute "
                             f"!= {FORMAT!r}); delete it or choose another output")
    return handle


def _check_resumable(path: Path, handle, attributes: dict) -> None:
    """Refuse to add to a store made with another model, preprocessing, dataset or storage type."""
    complete = bool(handle.attrs.get("complete", False))
    checks = [("model_sha256", "model (MODEL_DIR's model_sha256)"),
              ("preprocessing", "preprocessing"),
              ("plan_sha256", "dataset rows (photos, tiles or their order)"),
              ("storage_dtype", "storage type"), ("precision", "precision")]
    if not complete:
        checks.append(("backend", "backend"))  # mixing runtimes would change the last bits
    for name, what in checks:
        stored = handle.attrs.get(name)
        if stored != attributes[name]:
            state = "complete" if complete else "partly written"
            raise CvigInputError(
                f"{path}: this {state} feature store was made with a different {what} "
                f"({name}: stored {_short(stored)}, now {_short(attributes[name])}); it cannot be "
                "resumed or reused: delete it or choose another output")


def _short(value) -> str:
    text = str(value)
    return text if len(text) <= 80 else text[:77] + "..."


# -- encoding ------------------------------------------------------------------------------------

def _pads_batches(backend) -> bool:
    """Runtimes with a fixed batch shape: TensorRT profiles and torch's captured CUDA graphs."""
    return backend.name == "tensorrt" or bool(getattr(backend, "cuda_graphs", False))


def _encode(backend, kind: str, inputs: np.ndarray, batch_size: int) -> np.ndarray:
    """Encode one batch; a partial batch is padded to ``batch_size`` for fixed-shape runtimes."""
    encode = backend.encode_ground if kind == "ground" else backend.encode_aerial
    count = len(inputs)
    if count < batch_size and _pads_batches(backend):
        # Repeat the last input: the padding rows are encoded and dropped, never stored.
        inputs = np.concatenate([inputs, np.repeat(inputs[-1:], batch_size - count, axis=0)])
    return np.asarray(encode(inputs), dtype=np.float32)[:count]


def _to_storage(features: np.ndarray, storage_dtype: str, kind: str, where: str) -> np.ndarray:
    if not np.isfinite(features).all():
        raise RuntimeError(f"the {kind} encoder returned NaN or infinite features for {where}")
    stored = features.astype(storage_dtype)
    if not np.isfinite(stored).all():
        raise CvigInputError(f"{kind} features of {where} exceed the float16 range (max |value| "
                             f"{np.abs(features).max():.4g}); store them as float32")
    return stored


def _resolve_workers(workers) -> int:
    if workers is None:
        return max(1, min(8, (os.cpu_count() or 2) - 1))
    if int(workers) < 0:
        raise CvigInputError(f"workers must be >= 0, got {workers}")
    return int(workers)


@contextlib.contextmanager
def _torch_threads(count):
    """Run with ``count`` torch intra-op threads (None: unchanged), restoring them afterwards."""
    if count is None:
        yield
        return
    import torch

    previous = torch.get_num_threads()
    torch.set_num_threads(min(count, previous))
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def _gpu_jpeg_available() -> bool:
    import torch

    if not torch.cuda.is_available():  # checked before importing torchvision, which takes seconds
        return False
    try:
        from torchvision.io import decode_jpeg  # noqa: F401
    except ImportError:
        return False
    return True


def _choose_jpeg_decoder(jpeg_decoder: str, backend) -> str:
    if jpeg_decoder not in JPEG_DECODERS:
        raise CvigInputError(f"jpeg_decoder must be one of {JPEG_DECODERS}, got {jpeg_decoder!r}")
    if jpeg_decoder == "cpu":
        return "cpu"
    if jpeg_decoder == "gpu":
        if not _gpu_jpeg_available():
            raise CvigInputError("GPU JPEG decoding needs torchvision with CUDA and a CUDA GPU")
        return "gpu"
    return "gpu" if str(backend.device).startswith("cuda") and _gpu_jpeg_available() else "cpu"


# -- the run -------------------------------------------------------------------------------------

def _kept(plan: _Plan, skipped_rows) -> tuple[np.ndarray, np.ndarray]:
    """(photo kept [N], tile kept [M]) once the given CSV rows are skipped.

    A pair dataset keeps the tiles its kept photos point to; a gallery every tile not skipped.
    """
    skipped = np.asarray(sorted(skipped_rows), dtype=np.int64)
    photo_kept = ~np.isin(plan.ground.rows, skipped)
    if len(plan.ground) == 0:
        return photo_kept, ~np.isin(plan.aerial.rows, skipped)
    tile_kept = np.zeros(len(plan.aerial), dtype=bool)
    tile_kept[plan.match[photo_kept]] = True
    return photo_kept, tile_kept


class _Run:
    """One embed run over a created (or partly written) store."""

    def __init__(self, path: Path, plan: _Plan, backend, preprocessor: _Preprocessor, *,
                 batch_size: int, workers: int, storage_dtype: str, skip_bad: bool,
                 progress: bool, gpu_jpeg: bool):
        self.path = path
        self.plan = plan
        self.backend = backend
        self.preprocessor = preprocessor
        self.batch_size = batch_size
        self.workers = workers
        self.storage_dtype = storage_dtype
        self.skip_bad = skip_bad
        self.progress = progress
        self.gpu_jpeg = gpu_jpeg
        self.encoded = {"ground": 0, "aerial": 0}
        self.seconds = 0.0  # spent in the pipeline (decoding, encoding, writing)

    def jobs(self, handle, skipped_rows: set) -> list:
        """Batches still to do: fixed row ranges with a needed row that is not done yet."""
        photo_kept, tile_kept = _kept(self.plan, skipped_rows)
        jobs = []
        for kind, wanted in (("aerial", tile_kept), ("ground", photo_kept)):
            done = handle[kind]["done"][:].astype(bool)
            for start in range(0, len(wanted), self.batch_size):
                rows = np.arange(start, min(start + self.batch_size, len(wanted)))
                rows = rows[wanted[rows]]
                if rows.size and not done[rows].all():
                    jobs.append((kind, rows))
        return jobs

    def run(self) -> None:
        """Encode every batch still to do; the store is flushed after each and closed on return."""
        from tqdm import tqdm

        with _open_existing(self.path, "r") as handle:
            skipped_rows = {entry[0] for entry in _read_skipped(handle)}
            jobs = self.jobs(handle, skipped_rows)
        # Start the decoding workers before the store is opened for writing: a forked worker
        # would share the file's lock and hold it after this process is killed.
        started = time.perf_counter()
        batches = self._batches(jobs)
        bar = tqdm(total=sum(len(rows) for _, rows in jobs), unit="img", desc="embedding",
                   disable=None if self.progress else True, smoothing=0.1)
        try:
            with _open_existing(self.path, "r+") as handle:
                for batch in batches:
                    if batch.failures:
                        self._record_failures(handle, batch, skipped_rows)
                    if batch.kind == "ground" and skipped_rows:
                        # Photos whose tile failed meanwhile: drop them as a resume would.
                        self._drop_skipped(batch, skipped_rows)
                    if batch.indices.size:
                        self._write(handle, batch)
                    bar.update(len(batch.indices) + len(batch.failures))
        finally:
            self.seconds = time.perf_counter() - started
            bar.close()
            shutdown = getattr(batches, "_shutdown_workers", None)  # a DataLoader iterator's
            if shutdown is not None:
                shutdown()

    def _batches(self, jobs):
        """An iterator of preprocessed batches; DataLoader workers are started here."""
        source = _BatchSource(self.preprocessor, jobs)
        if self.workers == 0 or not jobs:
            batches = (source[job] for job in range(len(source)))
        else:
            import torch.utils.data

            batches = iter(torch.utils.data.DataLoader(
                source, batch_size=None, shuffle=False, num_workers=min(self.workers, len(jobs)),
                collate_fn=_no_collate, prefetch_factor=2))
        if self.gpu_jpeg:
            return _prefetched(batches, lambda batch: _decode_on_gpu(batch, self.preprocessor))
        return batches

    def _record_failures(self, handle, batch: _Batch, skipped_rows: set) -> None:
        if not self.skip_bad:
            raise CvigInputError(f"{batch.failures[0][1]} (pass --skip-bad to leave such rows out; "
                                 f"the rows embedded so far are kept in {self.path} and a rerun "
                                 "resumes)")
        plan, entries = self.plan, []
        for index, reason in batch.failures:
            if batch.kind == "ground":
                entries.append((int(plan.ground.rows[index]), plan.ground.paths[index],
                                plan.aerial.paths[plan.match[index]], reason))
                continue
            # A bad tile takes every photo that points to it along (a gallery: the tile's row).
            if len(plan.ground) == 0:
                entries.append((int(plan.aerial.rows[index]), "", plan.aerial.paths[index],
                                reason))
            for photo in np.flatnonzero(plan.match == index):
                entries.append((int(plan.ground.rows[photo]), plan.ground.paths[photo],
                                plan.aerial.paths[index], reason))
        entries = [entry for entry in entries if entry[0] not in skipped_rows]
        LOGGER.warning("skipping %d row(s): %s", len(entries), batch.failures[0][1])
        if entries:
            _append_skipped(handle, entries)
            handle.flush()
            skipped_rows.update(entry[0] for entry in entries)

    def _drop_skipped(self, batch: _Batch, skipped_rows: set) -> None:
        rows = self.plan.ground.rows[batch.indices]
        keep = np.flatnonzero(~np.isin(rows, np.fromiter(skipped_rows, dtype=np.int64)))
        if len(keep) < len(batch.indices):
            batch.keep(keep.tolist())

    def _write(self, handle, batch: _Batch) -> None:
        group = handle[batch.kind]
        items = self.preprocessor.items(batch.kind)
        inputs = np.stack(batch.inputs).astype(np.float32, copy=False)
        features = _encode(self.backend, batch.kind, inputs, self.batch_size)
        where = (f"{self.plan.csv_path or 'the tile list'} rows {items.rows[batch.indices[0]]}.."
                 f"{items.rows[batch.indices[-1]]}")
        stored = _to_storage(features, self.storage_dtype, batch.kind, where)
        headings = np.asarray(batch.headings, dtype=np.float32)
        for start, stop, positions in _runs(batch.indices):
            group["features"][start:stop] = stored[positions]
            cropped = self.plan.crop[start:stop] if batch.kind == "ground" else np.zeros(0, bool)
            if cropped.any() and "heading" in group:
                current = group["heading"][start:stop]
                group["heading"][start:stop] = np.where(cropped, headings[positions], current)
        handle.flush()  # features first, then the done mask: a row marked done is complete
        for start, stop, _ in _runs(batch.indices):
            group["done"][start:stop] = 1
        handle.flush()
        self.encoded[batch.kind] += int(batch.indices.size)


def _finish(path: Path, plan: _Plan) -> tuple[dict, int]:
    """Mark the store complete, first rewriting it without skipped rows and unused tiles.

    Returns the rows kept ({"ground": N, "aerial": M}) and the number of skipped CSV rows.
    """
    with _open_existing(path, "r+") as handle:
        skipped_rows = {entry[0] for entry in _read_skipped(handle)}
        photo_kept, tile_kept = _kept(plan, skipped_rows)
        for role, kept in (("ground", photo_kept), ("aerial", tile_kept)):
            done = handle[role]["done"][:].astype(bool)
            if not done[kept].all():
                raise RuntimeError(f"{path}: {role} rows "
                                   f"{np.flatnonzero(kept & ~done)[:5].tolist()} were not encoded")
        compact = not (photo_kept.all() and tile_kept.all())
        if not compact:
            handle.attrs["complete"] = True
    if compact:
        _compact(path, photo_kept, tile_kept)
    return {"ground": int(photo_kept.sum()), "aerial": int(tile_kept.sum())}, len(skipped_rows)


def _compact(path: Path, photo_kept: np.ndarray, tile_kept: np.ndarray) -> None:
    """Rewrite the store with only the kept rows (``match`` renumbered); replace it atomically."""
    import h5py

    temporary = path.with_name(path.name + ".compacting")
    new_tile = np.full(len(tile_kept), -1, dtype=np.int64)
    new_tile[tile_kept] = np.arange(int(tile_kept.sum()))
    with h5py.File(path, "r") as source, h5py.File(temporary, "w") as target:
        for name, value in source.attrs.items():
            target.attrs[name] = value
        for role, kept in (("ground", photo_kept), ("aerial", tile_kept)):
            rows = np.flatnonzero(kept)
            group = target.create_group(role)
            for name, dataset in source[role].items():
                shape = (len(rows),) + dataset.shape[1:]
                if name in ("features", "done", "heading"):
                    copy = _early_dataset(group, name, shape, dataset.dtype, dataset.fillvalue)
                else:
                    copy = group.create_dataset(name, shape=shape, dtype=dataset.dtype)
                for start in range(0, len(rows), _COPY_ROWS):
                    block = rows[start: start + _COPY_ROWS]
                    values = dataset[block[0]: block[-1] + 1][block - block[0]]
                    if role == "ground" and name == "match":
                        values = new_tile[values]
                    copy[start: start + len(block)] = values
        source.copy(source["skipped"], target, name="skipped")
        target.attrs["complete"] = True
    os.replace(temporary, path)


def _attributes(manifest, engine, plan: _Plan, preprocessing: dict, storage_dtype: str,
                batch_size: int) -> dict:
    from cvig_engine import __version__

    config = engine.config
    try:
        description = engine.describe()
    except Exception as error:  # describe() is informational only
        description = {"error": str(error)}
    attributes = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "model_sha256": manifest["model_sha256"],
        "model_config": json.dumps(config, sort_keys=True),
        "fov_deg": float(config["fov"]),
        "backend": str(engine.name),
        "precision": str(engine.precision),
        "backend_description": json.dumps(description, sort_keys=True, default=str),
        "preprocessing": json.dumps(preprocessing, sort_keys=True),
        "dataset_csv": os.path.abspath(plan.csv_path) if plan.csv_path is not None else "",
        "plan_sha256": plan.digest(),
        "storage_dtype": storage_dtype,
        "batch_size": int(batch_size),
        "cvig_engine_version": __version__,
    }
    if plan.city:
        attributes["city"] = plan.city
    return attributes


def _check_files(records, *, gallery: bool, skip_bad: bool, progress: bool) -> list:
    """Check every file once up front; return the skipped rows [(row, surface, overhead, why)]."""
    from cvig_engine.data import _verify_file, check_images

    if not gallery:
        _, bad = check_images(records, skip_bad=skip_bad, progress=progress)
    else:
        bad = []
        for record in records:
            files = [("overhead", record.overhead)] + sorted(record.masks.items())
            reasons = [f"{kind} {path}: {reason}" for kind, path in files
                       if (reason := _verify_file(Path(path)))]
            if reasons:
                bad.append((record, "; ".join(reasons)))
        if bad and not skip_bad:
            shown = "\n".join(f"  {record.where()}: {reason}" for record, reason in bad[:5])
            more = f"\n  ... and {len(bad) - 5} more" if len(bad) > 5 else ""
            raise CvigInputError(f"{len(bad)} of {len(records)} tiles have unreadable files "
                                 f"(pass --skip-bad to leave them out):\n{shown}{more}")
    return [(int(record.row), str(record.surface or ""), str(record.overhead), reason)
            for record, reason in bad]


def _stored_batch_size(out_path: Path, batch_size: int) -> int:
    """A partly written store keeps its batch size: the same batches give the same features."""
    if not out_path.exists():
        return int(batch_size)
    with _open_existing(out_path, "r") as handle:
        return int(handle.attrs.get("batch_size", batch_size))


def _embed(plan: _Plan, records, model_dir, out_path, *, backend, device, precision, batch_size,
           workers, storage_dtype, skip_bad, strict, progress, crop_seed, jpeg_decoder) -> dict:
    from cvig_engine.backends import open_backend
    from cvig_engine.export import read_manifest

    started = time.perf_counter()
    if storage_dtype not in STORAGE_DTYPES:
        raise CvigInputError(f"storage dtype must be one of {STORAGE_DTYPES}, got "
                             f"{storage_dtype!r}")
    if int(batch_size) < 1:
        raise CvigInputError(f"batch size must be >= 1, got {batch_size}")
    out_path = Path(out_path)
    if out_path.is_dir():
        raise CvigInputError(f"{out_path}: is a folder; give the feature store's file name "
                             "(FEATURES.h5)")
    batch_size = _stored_batch_size(out_path, batch_size)
    workers = _resolve_workers(workers)
    manifest = read_manifest(model_dir, verify=True)
    # On CPU the encoder shares the cores with the decoding workers; oversubscribed, both slow
    # down (2 cores, tiny model, 1 worker: onnxruntime at 1 thread 35 images/s, at 2 threads 29).
    threads = max(1, (os.cpu_count() or 1) - workers)
    options = {"threads": threads} if backend in ("auto", "onnxruntime") else {}
    engine = open_backend(model_dir, backend=backend, device=device, precision=precision,
                          strict=strict, batch_size=batch_size, **options)
    config = engine.config
    decoder = _choose_jpeg_decoder(jpeg_decoder, engine)
    preprocessing = _preprocessing_description(manifest, crop_seed, decoder)
    attributes = _attributes(manifest, engine, plan, preprocessing, storage_dtype, batch_size)
    resumed = out_path.exists()
    if resumed:
        with _open_existing(out_path, "r") as handle:
            _check_resumable(out_path, handle, attributes)
            if bool(handle.attrs.get("complete", False)):
                counts = {role: int(handle[role]["ids"].shape[0]) for role in ("ground", "aerial")}
                return _summary(out_path, counts, len(_read_skipped(handle)),
                                {"ground": 0, "aerial": 0}, started, attributes, resumed=True,
                                already_complete=True)
    else:
        bad = _check_files(records, gallery=len(plan.ground) == 0, skip_bad=skip_bad,
                           progress=progress)
        out_path.parent.mkdir(parents=True, exist_ok=True)
        _create_store(out_path, plan, attributes, config["ground_feature_shape"],
                      config["aerial_feature_shape"], storage_dtype, bad)
    preprocessor = _Preprocessor(plan, config, manifest.get("aerial_input_kind", "polar"),
                                 crop_seed, raw_jpeg=decoder == "gpu")
    run = _Run(out_path, plan, engine, preprocessor, batch_size=batch_size, workers=workers,
               storage_dtype=storage_dtype, skip_bad=skip_bad, progress=progress,
               gpu_jpeg=decoder == "gpu")
    with _torch_threads(threads if engine.name == "torch" and engine.device == "cpu" else None):
        run.run()
    counts, skipped = _finish(out_path, plan)
    return _summary(out_path, counts, skipped, run.encoded, started, attributes, resumed=resumed,
                    already_complete=False, pipeline_seconds=run.seconds)


def _summary(path, counts, skipped, encoded, started, attributes, *, resumed,
             already_complete, pipeline_seconds=0.0) -> dict:
    images = encoded["ground"] + encoded["aerial"]
    return {
        "path": str(path),
        "ground": counts["ground"],
        "aerial": counts["aerial"],
        "skipped_rows": skipped,
        "encoded": dict(encoded),
        "resumed": resumed,
        "already_complete": already_complete,
        "seconds": time.perf_counter() - started,
        "images_per_second": images / pipeline_seconds if pipeline_seconds > 0 else 0.0,
        "backend": attributes["backend"],
        "precision": attributes["precision"],
        "storage_dtype": attributes["storage_dtype"],
        "model_sha256": attributes["model_sha256"],
    }


def _is_tile_list(csv_path: Path) -> bool:
    """A CSV whose header names ``overhead`` but no ``surface`` is a gallery of tiles."""
    from cvig_engine.data import _read_rows

    _, header = _read_rows(csv_path)[0]
    names = {cell.lower() for cell in header}
    return "overhead" in names and "surface" not in names


def embed_dataset(model_dir, csv_path, out_path, *, backend="auto", device="auto",
                  precision="fp32", batch_size=32, workers=None, storage_dtype="float32",
                  skip_bad=False, strict=False, progress=True, include_unusable=False,
                  crop_seed=DEFAULT_CROP_SEED, jpeg_decoder="auto") -> dict:
    """Encode a dataset CSV's photos and tiles into the HDF5 feature store ``out_path``.

    Resumes a partly written store and returns at once for a complete one, provided both were
    made with the same model, preprocessing, dataset rows, precision and storage type (otherwise
    ``CvigInputError``). A CSV with an ``overhead`` column and no ``surface`` column is read as
    a tile gallery (see ``embed_tiles``).

    Args:
        model_dir: an exported MODEL_DIR (``cvig-engine export``).
        csv_path: dataset CSV (WITW or CVUSA layout, ``cvig_engine.data.read_dataset``); an
            ``id`` column, when present, names the photos.
        out_path: the feature store to write (FEATURES.h5).
        backend, device, precision, strict: passed to ``cvig_engine.backends.open_backend``.
        batch_size: images per encoder call; a partly written store keeps its own.
        workers: decoding processes (None: CPU count - 1, at most 8; 0: decode in this process).
        storage_dtype: "float32" or "float16" features on disk.
        skip_bad: leave out rows whose files are missing or cannot be decoded, recording them in
            ``/skipped``; otherwise the first one raises ``CvigInputError``.
        progress: show a progress bar (on a terminal).
        include_unusable: also embed rows with ``usable`` = 0 (left out by default).
        crop_seed: seed of the per-row crop heading of 360 deg panoramas for a narrower model.
        jpeg_decoder: "auto" (nvjpeg when the backend runs on CUDA), "cpu" or "gpu".

    Returns:
        A summary dict: path, ground, aerial (rows in the store), skipped_rows, encoded (images
        encoded by this call, per role), resumed, already_complete, seconds (in all),
        images_per_second (while decoding, encoding and writing, without the start-up), backend,
        precision, storage_dtype, model_sha256.
    """
    from cvig_engine.data import read_dataset
    from cvig_engine.export import read_manifest

    options = dict(backend=backend, device=device, precision=precision, batch_size=batch_size,
                   workers=workers, storage_dtype=storage_dtype, skip_bad=skip_bad, strict=strict,
                   progress=progress, jpeg_decoder=jpeg_decoder)
    csv_path = Path(csv_path)
    if csv_path.is_file() and _is_tile_list(csv_path):
        return embed_tiles(model_dir, csv_path, out_path, **options)
    records = read_dataset(csv_path)
    if not include_unusable:
        records = [record for record in records if record.usable]
        if not records:
            raise CvigInputError(f"{csv_path}: every row has usable = 0 (pass --include-unusable "
                                 "to embed them)")
    plan = _plan_pairs(records, csv_path, read_manifest(model_dir, verify=False)["config"])
    return _embed(plan, records, model_dir, out_path, crop_seed=crop_seed, **options)


def embed_tiles(model_dir, tiles, out_path, *, backend="auto", device="auto", precision="fp32",
                batch_size=32, workers=None, storage_dtype="float32", skip_bad=False,
                strict=False, progress=True, jpeg_decoder="auto") -> dict:
    """Encode a reference gallery (tiles only) into a feature store with no photos (N = 0).

    ``tiles`` is a CSV with an ``overhead`` column (optional ``id``, ``lat``, ``lon`` and
    overhead mask columns) or a list of tile paths. Other arguments and the result as in
    ``embed_dataset``.
    """
    from cvig_engine.export import read_manifest

    records, csv_path = read_tile_list(tiles)
    plan = _plan_tiles(records, csv_path, read_manifest(model_dir, verify=False)["config"])
    return _embed(plan, records, model_dir, out_path, backend=backend, device=device,
                  precision=precision, batch_size=batch_size, workers=workers,
                  storage_dtype=storage_dtype, skip_bad=skip_bad, strict=strict,
                  progress=progress, crop_seed=DEFAULT_CROP_SEED, jpeg_decoder=jpeg_decoder)
