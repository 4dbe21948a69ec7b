"""Dataset CSVs (WITW and CVUSA layouts), image and mask loading, and model-input preprocessing.

CSV layouts
-----------
WITW layout: a header row, then one pair per row. Required columns::

    surface,overhead,lat,lon,heading,fov,city,usable

``surface`` / ``overhead`` are image paths, relative to the CSV's folder or absolute. ``lat`` /
``lon`` are degrees (empty when unknown). ``heading`` is the compass heading (degrees clockwise
from north) of the surface image's centre column, empty when unknown; an aligned 360 deg panorama
(column 0 facing south, see ``cvig_engine.polar``) has heading 0. ``fov`` is the surface image's
field of view in degrees, in (0, 360]. ``city`` may be empty. ``usable`` is 1/0 (true/false,
yes/no are accepted). Optional mask columns ``surface_building``, ``surface_road``,
``overhead_building``, ``overhead_road`` name PNG or NPY masks for the 5-channel input (an empty
cell means no mask for that row). Any other column is kept in ``PairRecord.extra``.

CVUSA layout: no header; ``overhead,surface`` per row (a third column, as in CVUSA's own split
files, is ignored). The layout carries no field of view or heading: rows are read as aligned 360
deg panoramas (fov 360, heading 0), usable, with unknown lat/lon and an empty city.

A file whose first row names ``surface`` or ``overhead`` (or another WITW column) is read as the
WITW layout; anything else as CVUSA.

Images
------
``load_image`` returns uint8 RGB [H, W, 3]: EXIF orientation is applied; grayscale is replicated
to the three channels; images with alpha (RGBA, LA, transparent palettes) are composited on black
(colour * alpha / 255, the same black that the polar transform pads with); 16-bit grayscale is
scaled to 8 bits as round(value / 257) (65535 -> 255); CMYK and other colour modes are converted
by Pillow. Floating-point images are refused.
"""

from __future__ import annotations

import csv
import io
import math
import os
import threading
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from cvig_engine.errors import CvigInputError

__all__ = [
    "PairRecord",
    "read_dataset",
    "write_witw_csv",
    "write_cvusa_csv",
    "load_image",
    "load_mask",
    "check_images",
    "crop_panorama",
    "preprocess_ground",
    "preprocess_aerial",
    "PairDataset",
    "WITW_COLUMNS",
    "FOV_TOLERANCE",
    "MASK_COLUMNS",
    "GROUND_MASKS",
    "AERIAL_MASKS",
]

WITW_COLUMNS = ("surface", "overhead", "lat", "lon", "heading", "fov", "city", "usable")
GROUND_MASKS = ("surface_building", "surface_road")
AERIAL_MASKS = ("overhead_building", "overhead_road")
MASK_COLUMNS = GROUND_MASKS + AERIAL_MASKS
_TRUE = {"1", "true", "yes", "y", "t"}
_FALSE = {"0", "false", "no", "n", "f"}
FOV_TOLERANCE = 1e-6


@dataclass
class PairRecord:
    """One (surface image, overhead tile) pair of a dataset CSV.

    ``row`` is the 1-based line number in the CSV file (the header is line 1). Paths are resolved
    against the CSV's folder. Unknown lat, lon and heading are NaN.
    """

    row: int
    surface: Path
    overhead: Path
    lat: float = math.nan
    lon: float = math.nan
    heading: float = math.nan
    fov: float = 360.0
    city: str = ""
    usable: bool = True
    masks: dict = field(default_factory=dict)
    csv_path: Path | None = None
    extra: dict = field(default_factory=dict)

    @property
    def is_panorama(self) -> bool:
        """Whether the surface image is a full 360 deg panorama (the only kind that is cropped)."""
        return self.fov >= 360.0 - FOV_TOLERANCE

    def where(self) -> str:
        """``"file.csv: row N"`` for error messages."""
        return (
            f"{self.csv_path}: row {self.row}" if self.csv_path is not None else f"row {self.row}"
        )


# -- reading -------------------------------------------------------------------------------------


def _read_rows(path: Path):
    if not path.exists():
        raise CvigInputError(f"{path}: CSV file not found")
    if path.is_dir():
        raise CvigInputError(f"{path}: is a folder, not a CSV file")
    try:
        text = path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as error:
        raise CvigInputError(f"{path}: not a UTF-8 text file ({error})") from None
    reader = csv.reader(io.StringIO(text))
    rows = []
    try:
        for cells in reader:
            if any(cell.strip() for cell in cells):  # blank lines are not records
                rows.append((reader.line_num, [cell.strip() for cell in cells]))
    except csv.Error as error:
        raise CvigInputError(f"{path}: row {reader.line_num}: malformed CSV ({error})") from None
    if not rows:
        raise CvigInputError(f"{path}: empty CSV (no rows)")
    return rows


def _resolve(folder: Path, value: str) -> Path:
    path = Path(value)
    return path if path.is_absolute() else folder / path


def _parse_float(value, name, where, *, optional):
    if value == "":
        if optional:
            return math.nan
        raise CvigInputError(f"{where}: empty {name}")
    try:
        number = float(value)
    except ValueError:
        raise CvigInputError(f"{where}: {name} {value!r} is not a number") from None
    if not math.isfinite(number):
        raise CvigInputError(f"{where}: {name} {value!r} is not finite")
    return number


def _parse_usable(value, where):
    lowered = value.lower()
    if lowered in _TRUE:
        return True
    if lowered in _FALSE:
        return False
    raise CvigInputError(f"{where}: usable {value!r} must be 1 or 0 (true/false, yes/no)")


def read_dataset(csv_path) -> list[PairRecord]:
    """Read a dataset CSV in the WITW or CVUSA layout (detected from the first row).

    Validates every row (missing columns, empty paths, unparsable numbers, lat/lon out of range,
    fov outside (0, 360]) and raises ``CvigInputError`` naming the file, the row and the reason.
    Images are not opened (see ``check_images``).
    """
    path = Path(csv_path)
    folder = path.parent
    rows = _read_rows(path)
    first_line, first = rows[0]
    names = [cell.lower() for cell in first]
    if not set(names) & set(WITW_COLUMNS + MASK_COLUMNS):
        return [_cvusa_record(path, folder, line, cells) for line, cells in rows]
    duplicates = sorted({name for name in names if names.count(name) > 1 and name})
    if duplicates:
        raise CvigInputError(
            f"{path}: row {first_line}: duplicate column(s) {', '.join(duplicates)}"
        )
    missing = [name for name in WITW_COLUMNS if name not in names]
    if missing:
        raise CvigInputError(
            f"{path}: row {first_line}: missing column(s) {', '.join(missing)} "
            f"(the WITW layout needs {','.join(WITW_COLUMNS)})"
        )
    if len(rows) == 1:
        raise CvigInputError(f"{path}: empty CSV (a header but no data rows)")
    column = {name: index for index, name in enumerate(names)}
    extras = [
        (index, original)
        for index, (name, original) in enumerate(zip(names, first))
        if name not in WITW_COLUMNS and name not in MASK_COLUMNS and name
    ]
    return [
        _witw_record(path, folder, line, cells, column, extras, len(first))
        for line, cells in rows[1:]
    ]


def _cvusa_record(path, folder, line, cells):
    where = f"{path}: row {line}"
    if len(cells) < 2:
        raise CvigInputError(
            f"{where}: a CVUSA-layout row needs 2 columns (overhead,surface), got {len(cells)}"
        )
    overhead, surface = cells[0], cells[1]
    if not overhead or not surface:
        raise CvigInputError(f"{where}: empty {'overhead' if not overhead else 'surface'} path")
    return PairRecord(
        row=line,
        surface=_resolve(folder, surface),
        overhead=_resolve(folder, overhead),
        heading=0.0,
        fov=360.0,
        csv_path=path,
    )


def _witw_record(path, folder, line, cells, column, extras, width):
    where = f"{path}: row {line}"
    if len(cells) != width:
        raise CvigInputError(f"{where}: {len(cells)} fields but the header has {width}")
    value = {name: cells[index] for name, index in column.items()}
    for name in ("surface", "overhead"):
        if not value[name]:
            raise CvigInputError(f"{where}: empty {name} path")
    lat = _parse_float(value["lat"], "lat", where, optional=True)
    lon = _parse_float(value["lon"], "lon", where, optional=True)
    if not (math.isnan(lat) or -90.0 <= lat <= 90.0):
        raise CvigInputError(f"{where}: lat {lat} outside [-90, 90]")
    if not (math.isnan(lon) or -180.0 <= lon <= 180.0):
        raise CvigInputError(f"{where}: lon {lon} outside [-180, 180]")
    heading = _parse_float(value["heading"], "heading", where, optional=True)
    if not math.isnan(heading):
        heading = heading % 360.0
    fov = _parse_float(value["fov"], "fov", where, optional=False)
    if not 0.0 < fov <= 360.0:
        raise CvigInputError(f"{where}: fov {fov} outside (0, 360] degrees")
    usable = _parse_usable(value["usable"], where)
    masks = {name: _resolve(folder, value[name]) for name in MASK_COLUMNS if value.get(name)}
    extra = {original: cells[index] for index, original in extras}
    return PairRecord(
        row=line,
        surface=_resolve(folder, value["surface"]),
        overhead=_resolve(folder, value["overhead"]),
        lat=lat,
        lon=lon,
        heading=heading,
        fov=fov,
        city=value["city"],
        usable=usable,
        masks=masks,
        csv_path=path,
        extra=extra,
    )


# -- writing -------------------------------------------------------------------------------------


def _relative(path: Path, folder: Path) -> str:
    """Path relative to the CSV's folder when it lies inside it, else absolute (forward slashes)."""
    path = Path(path)
    absolute = Path(os.path.abspath(path))
    base = Path(os.path.abspath(folder))
    try:
        return absolute.relative_to(base).as_posix()
    except ValueError:
        return absolute.as_posix()


def _format_float(number: float) -> str:
    return "" if number is None or math.isnan(number) else repr(float(number))


def _write_rows(path: Path, rows) -> None:
    from cvig_engine.files import atomic_write_text

    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerows(rows)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path, buffer.getvalue())


def write_witw_csv(path, records) -> None:
    """Write records as a WITW-layout CSV (header; mask and extra columns when any record has them).

    Paths inside the CSV's folder are written relative to it; floats round-trip exactly.
    """
    path = Path(path)
    folder = path.parent
    unknown = sorted({name for record in records for name in record.masks} - set(MASK_COLUMNS))
    if unknown:
        raise ValueError(
            f"unknown mask name(s) {', '.join(unknown)}: use {', '.join(MASK_COLUMNS)}"
        )
    mask_names = [name for name in MASK_COLUMNS if any(name in record.masks for record in records)]
    extra_names = []
    for record in records:
        extra_names += [name for name in record.extra if name not in extra_names]
    rows = [list(WITW_COLUMNS) + mask_names + extra_names]
    for record in records:
        rows.append(
            [
                _relative(record.surface, folder),
                _relative(record.overhead, folder),
                _format_float(record.lat),
                _format_float(record.lon),
                _format_float(record.heading),
                _format_float(record.fov),
                record.city,
                "1" if record.usable else "0",
            ]
            + [
                _relative(record.masks[name], folder) if name in record.masks else ""
                for name in mask_names
            ]
            + [str(record.extra.get(name, "")) for name in extra_names]
        )
    _write_rows(path, rows)


def write_cvusa_csv(path, records) -> None:
    """Write records as a CVUSA-layout CSV: no header, ``overhead,surface`` per row."""
    path = Path(path)
    _write_rows(
        path,
        [
            [_relative(record.overhead, path.parent), _relative(record.surface, path.parent)]
            for record in records
        ],
    )


# -- images --------------------------------------------------------------------------------------


def _where(path, csv_path=None, row=None) -> str:
    if csv_path is not None and row is not None:
        return f"{path} ({csv_path}: row {row})"
    if csv_path is not None:
        return f"{path} ({csv_path})"
    return str(path)


def _open_image(path, where):
    from PIL import Image, ImageOps, UnidentifiedImageError

    try:
        with Image.open(path) as image:
            image.load()
            try:
                image = ImageOps.exif_transpose(image)
            except Exception:  # a broken EXIF block should not hide a good image
                pass
            return image.copy()
    except FileNotFoundError:
        raise CvigInputError(f"{where}: image file not found") from None
    except IsADirectoryError:
        raise CvigInputError(f"{where}: is a folder, not an image") from None
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as error:
        raise CvigInputError(f"{where}: cannot decode image ({error})") from None


def _sixteen_bit_to_eight(values: np.ndarray) -> np.ndarray:
    return np.rint(values.astype(np.float64) / 257.0).astype(np.uint8)


def load_image(path, *, csv_path=None, row=None) -> np.ndarray:
    """Decode an image file to uint8 RGB [H, W, 3] (conversions in the module docstring).

    Raises ``CvigInputError`` naming the path (and the CSV and row when given) for a missing,
    corrupt or unsupported file.
    """
    where = _where(path, csv_path, row)
    image = _open_image(path, where)
    mode = image.mode
    if mode == "P":
        image = image.convert("RGBA" if "transparency" in image.info else "RGB")
        mode = image.mode
    if mode == "RGB":
        array = np.asarray(image, dtype=np.uint8)
    elif mode in ("L", "1"):
        array = np.asarray(image.convert("L"), dtype=np.uint8)
    elif mode.startswith("I;16"):
        array = _sixteen_bit_to_eight(np.asarray(image))
    elif mode == "I":
        values = np.asarray(image)
        if values.size and (values.min() < 0 or values.max() > 65535):
            raise CvigInputError(f"{where}: 32-bit integer image with values outside 0..65535")
        array = _sixteen_bit_to_eight(values)
    elif mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = np.asarray(image.convert("RGBA"), dtype=np.float32)
        array = np.rint(rgba[..., :3] * (rgba[..., 3:] / 255.0)).astype(np.uint8)
    elif mode in ("F",):
        raise CvigInputError(
            f"{where}: floating-point images are not supported (save as 8-bit RGB)"
        )
    else:
        try:
            array = np.asarray(image.convert("RGB"), dtype=np.uint8)
        except (ValueError, OSError) as error:
            raise CvigInputError(f"{where}: unsupported image mode {mode} ({error})") from None
    if array.ndim == 2:
        array = np.repeat(array[..., None], 3, axis=2)
    if array.shape[0] == 0 or array.shape[1] == 0:
        raise CvigInputError(f"{where}: empty image")
    return np.ascontiguousarray(array)


def load_mask(path, *, csv_path=None, row=None) -> np.ndarray:
    """Read a mask (PNG or other image, or NPY) as float32 [H, W] in [0, 1].

    Integer masks whose values are all 0 or 1 are binary; other 8-bit masks are divided by 255,
    16-bit ones by 65535. NPY masks may be bool, integer (same rules) or float within [0, 1].
    Colour image masks must have equal R, G and B. Anything else raises ``CvigInputError``.
    """
    where = _where(path, csv_path, row)
    path = Path(path)
    if path.suffix.lower() == ".npy":
        try:
            values = np.load(path, allow_pickle=False)
        except FileNotFoundError:
            raise CvigInputError(f"{where}: mask file not found") from None
        except (ValueError, OSError, EOFError) as error:
            raise CvigInputError(f"{where}: cannot read NPY mask ({error})") from None
        if values.ndim == 3 and values.shape[-1] == 1:
            values = values[..., 0]
        if values.ndim != 2:
            raise CvigInputError(f"{where}: a mask must be 2-D [H, W], got shape {values.shape}")
        scale = 65535.0 if values.dtype == np.uint16 else 255.0
    else:
        image = _open_image(path, where)
        if image.mode in ("RGB", "RGBA", "CMYK", "YCbCr"):
            rgb = np.asarray(image.convert("RGB"))
            if not (
                np.array_equal(rgb[..., 0], rgb[..., 1])
                and np.array_equal(rgb[..., 0], rgb[..., 2])
            ):
                raise CvigInputError(
                    f"{where}: a mask must be single-channel (grey), got a colour image"
                )
            values = rgb[..., 0]
        elif image.mode in ("LA", "PA"):
            values = np.asarray(image)[..., 0]
        else:
            values = np.asarray(image)  # '1', 'L', 'P' (palette indices), 'I;16', 'I'
        scale = 65535.0 if image.mode.startswith("I;16") else 255.0
    return _mask_values(values, scale, where)


def _mask_values(values: np.ndarray, scale: float, where: str) -> np.ndarray:
    if values.dtype == bool:
        return values.astype(np.float32)
    if np.issubdtype(values.dtype, np.integer):
        if values.size == 0:
            raise CvigInputError(f"{where}: empty mask")
        low, high = int(values.min()), int(values.max())
        if low < 0:
            raise CvigInputError(f"{where}: negative mask values")
        if high <= 1:
            return values.astype(np.float32)
        if high > 255 and scale == 255.0:
            scale = 65535.0
        if high > scale:
            raise CvigInputError(f"{where}: mask values up to {high} do not fit 8 or 16 bits")
        return (values.astype(np.float32) / np.float32(scale)).astype(np.float32)
    if np.issubdtype(values.dtype, np.floating):
        if not np.all(np.isfinite(values)):
            raise CvigInputError(f"{where}: mask has NaN or infinite values")
        if values.size and (values.min() < -1e-6 or values.max() > 1.0 + 1e-6):
            raise CvigInputError(
                f"{where}: float mask values must lie in [0, 1], "
                f"got {values.min():g}..{values.max():g}"
            )
        return np.clip(values, 0.0, 1.0).astype(np.float32)
    raise CvigInputError(f"{where}: unsupported mask type {values.dtype}")


def _verify_file(path: Path) -> str | None:
    """Reason why a file cannot be used, or None. Fast: PIL ``verify`` (headers, PNG CRCs)."""
    from PIL import Image, UnidentifiedImageError

    if not path.exists():
        return "file not found"
    if path.is_dir():
        return "is a folder"
    if path.suffix.lower() == ".npy":
        try:
            values = np.load(path, mmap_mode="r", allow_pickle=False)
        except (ValueError, OSError, EOFError) as error:
            return f"cannot read NPY ({error})"
        return None if values.ndim in (2, 3) else f"NPY of shape {values.shape} is not a mask"
    try:
        with Image.open(path) as image:
            if image.width == 0 or image.height == 0:
                return "empty image"
            image.verify()
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as error:
        return f"cannot decode image ({error})"
    return None


def check_images(records, *, skip_bad: bool = False, progress: bool = True):
    """Open every image and mask once (fast ``verify``); return (good_records, [(record, reason)]).

    Unless ``skip_bad``, a bad file raises ``CvigInputError`` listing the first few (CSV, row,
    file, reason). A truncated file that still passes ``verify`` fails later in ``load_image``,
    which names it too.
    """
    from tqdm import tqdm

    cache: dict[Path, str | None] = {}
    good, bad = [], []
    for record in tqdm(
        records, desc="checking images", unit="pair", disable=None if progress else True
    ):
        reasons = []
        for kind, path in [("surface", record.surface), ("overhead", record.overhead)] + sorted(
            record.masks.items()
        ):
            path = Path(path)
            if path not in cache:
                cache[path] = _verify_file(path)
            if cache[path]:
                reasons.append(f"{kind} {path}: {cache[path]}")
        if reasons:
            bad.append((record, "; ".join(reasons)))
        else:
            good.append(record)
    if bad and not skip_bad:
        shown = "\n".join(f"  {record.where()}: {reason}" for record, reason in bad[:5])
        more = f"\n  ... and {len(bad) - 5} more" if len(bad) > 5 else ""
        raise CvigInputError(
            f"{len(bad)} of {len(records)} pairs have unreadable files "
            f"(pass --skip-bad to leave them out):\n{shown}{more}"
        )
    return good, bad


# -- preprocessing -------------------------------------------------------------------------------


def crop_panorama(
    panorama: np.ndarray,
    fov_deg: float,
    *,
    heading_deg: float | None = None,
    rng=None,
    panorama_heading_deg: float = 0.0,
):
    """Cut a ``fov_deg`` window out of a 360 deg panorama [H, W, ...] (circularly).

    The panorama's column j faces ``panorama_heading_deg + 180 + j * 360 / W`` (an aligned
    panorama, heading 0, has column 0 facing south). The window is ``int(fov / 360 * W)`` columns
    wide and starts at the column nearest to ``heading_deg - fov/2``; with ``heading_deg`` None it
    starts at a column drawn from ``rng`` (or faces heading 0 when ``rng`` is None too).

    Returns ``(crop, centre_heading)``: the crop and the compass heading of its centre, defined as
    its left column's azimuth + fov/2 (the convention of ``cvig_engine.polar.heading_to_shift``).
    """
    if not 0.0 < fov_deg <= 360.0:
        raise CvigInputError(f"field of view must be in (0, 360] degrees, got {fov_deg}")
    width = panorama.shape[1]
    crop_width = max(int(fov_deg / 360.0 * width), 1)
    if heading_deg is None and rng is not None:
        start = int(rng.integers(width))
    else:
        heading = 0.0 if heading_deg is None else float(heading_deg)
        left = (heading - fov_deg / 2.0 - 180.0 - panorama_heading_deg) % 360.0
        start = int(round(left / 360.0 * width)) % width
    columns = (start + np.arange(crop_width)) % width
    centre = (panorama_heading_deg + 180.0 + start * 360.0 / width + fov_deg / 2.0) % 360.0
    return panorama[:, columns], centre


def _flatten(value):
    """The leaves of nested tuples and lists (for cache sizes)."""
    if isinstance(value, (tuple, list)):
        for part in value:
            yield from _flatten(part)
    elif value is not None:
        yield value


def _stack_layers(image_uint8, masks, what):
    image = np.asarray(image_uint8)
    if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
        raise CvigInputError(
            f"{what} image must be uint8 [H, W, 3], got {image.dtype} {image.shape}"
        )
    layers = image.astype(np.float32) / np.float32(255.0)
    if masks:
        extra = []
        for mask in masks:
            mask = np.asarray(mask, dtype=np.float32)
            if mask.shape != image.shape[:2]:
                raise CvigInputError(
                    f"{what} mask of shape {mask.shape} does not match the image {image.shape[:2]}"
                )
            extra.append(mask[..., None])
        layers = np.concatenate([layers] + extra, axis=2)
    return layers


def _check_channels(layers, config, what):
    expected = int(config.get("in_channels", 3))
    if layers.shape[2] != expected:
        raise CvigInputError(
            f"the model takes {expected} input channels but the {what} has {layers.shape[2]} "
            f"(3 colour + {layers.shape[2] - 3} masks)"
        )


def _to_tensor(layers, size, config):
    """[H, W, C] float -> normalised torch tensor [C, size[0], size[1]] (bilinear, antialiased)."""
    import torch
    import torch.nn.functional as F

    tensor = torch.from_numpy(np.ascontiguousarray(layers.transpose(2, 0, 1)))[None]
    if tuple(tensor.shape[-2:]) != tuple(size):
        tensor = F.interpolate(
            tensor, size=tuple(size), mode="bilinear", align_corners=False, antialias=True
        )
    mean = torch.tensor(config["mean"], dtype=torch.float32)[:, None, None]
    std = torch.tensor(config["std"], dtype=torch.float32)[:, None, None]
    return ((tensor[0] - mean) / std).contiguous()


def _prepare_ground(
    image_uint8, config, *, heading_offset_deg=None, rng=None, image_fov_deg=None, masks=None
):
    """``preprocess_ground`` that also returns the crop's centre heading relative to the image's."""
    layers = _stack_layers(image_uint8, masks, "surface")
    _check_channels(layers, config, "surface image")
    model_fov = float(config["fov"])
    image_fov = model_fov if image_fov_deg is None else float(image_fov_deg)
    offset = 0.0
    if image_fov < model_fov - FOV_TOLERANCE:
        raise CvigInputError(
            f"the surface image covers {image_fov:g} deg, less than the model's {model_fov:g} deg"
        )
    if image_fov > model_fov + FOV_TOLERANCE:
        if image_fov < 360.0 - FOV_TOLERANCE:
            raise CvigInputError(
                f"cannot cut a {model_fov:g} deg view out of a {image_fov:g} deg photo: "
                f"only 360 deg panoramas are cropped"
            )
        # The offset is relative to the panorama's centre column (heading 0 of an aligned panorama).
        layers, offset = crop_panorama(layers, model_fov, heading_deg=heading_offset_deg, rng=rng)
    tensor = _to_tensor(layers, (config["ground_height"], config["ground_width"]), config)
    return tensor, offset


def preprocess_ground(
    image_uint8, config, *, heading_offset_deg=None, rng=None, image_fov_deg=None, masks=None
):
    """Surface image -> model input tensor [C, ground_height, ground_width] (ImageNet-normalised).

    ``image_fov_deg`` is the image's field of view (None: the model's, no crop). A 360 deg
    panorama fed to a model with ``config["fov"] < 360`` is cropped with ``crop_panorama``: the
    window's centre faces ``heading_offset_deg`` relative to the panorama's centre column
    (= the compass heading for an aligned panorama), or a column drawn from ``rng``. ``masks``
    ([H, W] float arrays in [0, 1]) are appended as extra channels (mean 0, std 1).
    """
    tensor, _ = _prepare_ground(
        image_uint8,
        config,
        heading_offset_deg=heading_offset_deg,
        rng=rng,
        image_fov_deg=image_fov_deg,
        masks=masks,
    )
    return tensor


def preprocess_aerial(
    image_uint8, config, *, masks=None, crop_fraction: float = 1.0, offset_px=(0, 0)
):
    """Overhead tile -> polar-transformed model input [C, polar_height, polar_width].

    The tile (north up, square) keeps its central ``crop_fraction``, is resized to
    ``config["aerial_size"]``, shifted by ``offset_px`` = (down, right) pixels of that size (edge
    pixels repeat; a training augmentation for geotag noise), ImageNet-normalised (masks: mean 0,
    std 1) and polar-transformed (``cvig_engine.polar``).
    """
    import torch

    from cvig_engine.polar import polar_transform

    layers = _stack_layers(image_uint8, masks, "overhead")
    _check_channels(layers, config, "overhead tile")
    height, width = layers.shape[:2]
    if height != width:
        raise CvigInputError(f"overhead tiles must be square, got {width}x{height} pixels")
    if not 0.0 < crop_fraction <= 1.0:
        raise CvigInputError(f"crop fraction must be in (0, 1], got {crop_fraction}")
    if crop_fraction < 1.0:
        keep = max(int(round(height * crop_fraction)), 1)
        start = (height - keep) // 2
        layers = layers[start : start + keep, start : start + keep]
    size = int(config["aerial_size"])
    tensor = _to_tensor(layers, (size, size), config)
    down, right = (int(round(value)) for value in offset_px)
    if down or right:
        rows = torch.clamp(torch.arange(size) - down, 0, size - 1)
        columns = torch.clamp(torch.arange(size) - right, 0, size - 1)
        tensor = tensor[:, rows][:, :, columns]
    return polar_transform(tensor, int(config["polar_height"]), int(config["polar_width"]))


def jitter_colours(tensor, strength: float, rng):
    """A copy of an input with each RGB channel scaled by exp(N(0, s)) and shifted by N(0, s).

    s is ``strength``. Applied to the ImageNet-normalised channels (so the scale changes contrast
    and the shift brightness, in units of the channel's standard deviation); mask channels are
    left as they are.
    Training augmentation against each city's own palette.
    """
    gain = np.exp(rng.normal(0.0, strength, 3)).astype(np.float32)
    shift = rng.normal(0.0, strength, 3).astype(np.float32)
    out = tensor.clone()
    for channel in range(3):
        out[channel] = tensor[channel] * float(gain[channel]) + float(shift[channel])
    return out


# -- dataset -------------------------------------------------------------------------------------


class _PairDatasetImplementation:
    """Logic of ``PairDataset`` (kept free of torch so that importing this module stays fast)."""

    def __init__(
        self,
        records,
        config,
        *,
        train: bool,
        seed: int = 0,
        tile_offset_px: float = 0.0,
        aerial_crop: float = 1.0,
        cache_bytes: int = 0,
        colour_jitter: float = 0.0,
    ):
        self.records = list(records)
        self.config = dict(config)
        self.train = bool(train)
        self.seed = int(seed)
        self.tile_offset_px = float(tile_offset_px)
        self.aerial_crop = float(aerial_crop)
        if colour_jitter < 0:
            raise CvigInputError(f"colour jitter must be >= 0, got {colour_jitter}")
        self.colour_jitter = float(colour_jitter)
        self.epoch = 0
        # In-memory cache of at most ``cache_bytes`` (training reads every pair once per epoch):
        # model inputs that draw nothing at random are kept as tensors, the others as decoded
        # images. Once full, further pairs are simply read again each time.
        self.cache = {} if cache_bytes > 0 else None
        self.cache_bytes = int(cache_bytes)
        self.cached_bytes = 0
        self._cache_lock = threading.Lock()  # ``prefetch`` may fill the cache from a thread
        channels = int(self.config.get("in_channels", 3))
        if channels not in (3, 5):
            raise CvigInputError(
                f"the data pipeline feeds 3 (RGB) or 5 (RGB + building, road) channels, "
                f"not {channels}"
            )
        self.use_masks = channels == 5
        model_fov = float(self.config["fov"])
        # Training's panoramas are kept whole (resized) and cut per item.
        self._panorama_config = dict(self.config, fov=360.0,
                                     ground_width=int(self.config["polar_width"]))
        for record in self.records:
            if self.use_masks:
                missing = [name for name in MASK_COLUMNS if name not in record.masks]
                if missing:
                    raise CvigInputError(
                        f"{record.where()}: the 5-channel model needs the mask column(s) "
                        f"{', '.join(missing)}"
                    )
            fits = (
                abs(record.fov - model_fov) <= FOV_TOLERANCE
                or record.is_panorama
            )
            if not fits:
                raise CvigInputError(
                    f"{record.where()}: the photo covers {record.fov:g} deg but the model "
                    f"expects {model_fov:g} deg (only 360 deg panoramas are cropped)"
                )

    def __len__(self) -> int:
        return len(self.records)

    def set_epoch(self, epoch: int) -> None:
        """Choose the epoch whose random crops and offsets ``__getitem__`` draws (training only)."""
        self.epoch = int(epoch)

    def __getitem__(self, index: int) -> dict:
        return self.item(index, epoch=self.epoch)

    def item(self, index: int, epoch: int = 0, ground_fov: float | None = None) -> dict:
        """Pair ``index`` as model inputs: dict(ground, aerial, index, heading).

        Random choices (panorama crop, tile offset) depend only on (seed, epoch, index) when
        training and on (seed, index) otherwise. ``heading`` is the compass heading of the ground
        input's centre (NaN when the CSV has none). ``ground_fov`` (training on 360 deg panoramas
        only) cuts ground views of another width than the model's field of view, e.g. full
        panoramas while a limited-view model warms up.
        """
        record = self.records[index]
        if self.train:
            rng = np.random.default_rng([self.seed, int(epoch), int(index)])
        else:
            rng = np.random.default_rng([self.seed, int(index)])
        model_fov = float(self.config["fov"])
        if ground_fov is not None and abs(float(ground_fov) - model_fov) > FOV_TOLERANCE:
            if not (self.train and record.is_panorama):
                raise CvigInputError(f"{record.where()}: only training on 360 deg panoramas cuts "
                                     f"{float(ground_fov):g} deg views for a {model_fov:g} deg "
                                     "model")
        else:
            ground_fov = model_fov
        try:
            if self.train and record.is_panorama:
                # Training cuts its random window out of the resized panorama, kept once whatever
                # the window's width (evaluation crops first, then resizes, at a seeded heading;
                # the two differ by under one column's scale).
                full, offset = self._cached(("ground", index), True,
                                            lambda: self._ground(record, None, keep=False,
                                                                 config=self._panorama_config))
                ground, crop_offset = crop_panorama(full.permute(1, 2, 0), float(ground_fov),
                                                    rng=rng)
                ground = ground.permute(2, 0, 1).contiguous()
                offset = (offset + crop_offset) % 360.0
            else:
                # A photo of the model's field of view is used whole; evaluation seeds its crop.
                ground, offset = self._cached(("ground", index), True,
                                              lambda: self._ground(record, rng, keep=False))
            random_offsets = self.train and self.tile_offset_px > 0
            shift = (0, 0)
            if random_offsets:
                limit = int(math.floor(self.tile_offset_px))
                shift = tuple(int(value) for value in rng.integers(-limit, limit + 1, 2))
            aerial = self._cached(("aerial", index), not random_offsets,
                                  lambda: self._aerial(record, shift, keep=random_offsets))
        except CvigInputError as error:
            raise CvigInputError(f"{record.where()}: {error}") from None
        if self.train and self.colour_jitter > 0:
            # Its own stream, so that the crops and offsets stay those of a run without it.
            jitter_rng = np.random.default_rng([self.seed, int(epoch), int(index), 1])
            ground = jitter_colours(ground, self.colour_jitter, jitter_rng)
            aerial = jitter_colours(aerial, self.colour_jitter, jitter_rng)
        heading = (record.heading + offset) % 360.0 if math.isfinite(record.heading) else math.nan
        return {"ground": ground, "aerial": aerial, "index": int(index), "heading": float(heading)}

    def prefetch(self, indices, epoch: int = 0, stop=None) -> int:
        """Fill the cache with the inputs of ``indices``, in that order (e.g. from a thread while
        training steps on the first epoch); returns how many were prepared.

        Stops early when the cache is full, when ``stop`` (a ``threading.Event``) is set, or at
        an unreadable pair, which is left for ``item`` to report.
        """
        if self.cache is None:
            return 0
        prepared = 0
        for index in indices:
            if (stop is not None and stop.is_set()) or self.cached_bytes >= self.cache_bytes:
                break
            try:
                self.item(int(index), epoch=epoch)
            except CvigInputError:
                break
            prepared += 1
        return prepared

    def _cached(self, key, cacheable: bool, compute):
        """``compute()``, read from and kept in the cache when ``cacheable``.

        Model inputs are cacheable when they draw nothing at random; decoded images when their
        model input is not cached itself (the choice is fixed per view, so a key is either
        always or never cacheable).
        """
        if self.cache is None or not cacheable:
            return compute()
        if key in self.cache:
            return self.cache[key]
        value = compute()
        self._keep(key, value)
        return value

    def _keep(self, key, value) -> None:
        """Cache ``value`` (tensors and arrays, possibly in tuples) if it fits the budget."""
        size = sum(getattr(part, "nbytes", 0) for part in _flatten(value))
        with self._cache_lock:
            if key not in self.cache and self.cached_bytes + size <= self.cache_bytes:
                self.cache[key] = value
                self.cached_bytes += size

    def _decoded(self, record, kind: str, keep: bool):
        """The decoded image and masks (None for RGB input) of one view, cached if ``keep``.

        Views whose model input is cached as a tensor are not kept decoded as well.
        """
        path = record.surface if kind == "surface" else record.overhead

        def decode():
            image = load_image(path, csv_path=record.csv_path, row=record.row)
            masks = None
            if self.use_masks:
                names = GROUND_MASKS if kind == "surface" else AERIAL_MASKS
                masks = [load_mask(record.masks[name], csv_path=record.csv_path, row=record.row)
                         for name in names]
            return image, masks

        return self._cached((kind, record.row, path), keep, decode)

    def _ground(self, record, rng, keep: bool, config=None):
        image, masks = self._decoded(record, "surface", keep)
        return _prepare_ground(image, config or self.config, rng=rng, image_fov_deg=record.fov,
                               masks=masks)

    def _aerial(self, record, shift, keep: bool):
        image, masks = self._decoded(record, "overhead", keep)
        return preprocess_aerial(image, self.config, masks=masks, crop_fraction=self.aerial_crop,
                                 offset_px=shift)


def _pair_dataset_class():
    import torch.utils.data

    class PairDataset(_PairDatasetImplementation, torch.utils.data.Dataset):
        """A torch map-style dataset of model-ready pairs (see ``_PairDatasetImplementation.item``).

        ``PairDataset(records, config, *, train, seed=0, tile_offset_px=0.0, aerial_crop=1.0)``:
        ``config`` is the model's config (fov, in_channels, sizes, mean/std). 360 deg panoramas
        are cropped to the model's fov at a random column; ``tile_offset_px`` shifts training
        tiles by up to that many pixels; ``aerial_crop`` keeps the tiles' central fraction;
        ``colour_jitter`` randomises each training view's colours (``jitter_colours``).
        """

    PairDataset.__module__ = __name__
    return PairDataset


def __getattr__(name):
    # PairDataset subclasses torch's Dataset; build it on first use so `import cvig_engine.data`
    # (used by the CSV tools and `synth`) does not pay for importing torch.
    if name == "PairDataset":
        cls = _pair_dataset_class()
        globals()["PairDataset"] = cls
        return cls
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
