"""Sampling photo locations and writing a synthetic dataset folder (images, masks, CSVs)."""

from __future__ import annotations

import json
import math
import struct
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from cvig_engine.errors import CvigInputError
from cvig_engine.synth.city import City, generate_city
from cvig_engine.synth.render import (
    View,
    render_closeup,
    render_surface,
    render_tile,
    sample_surface_conditions,
    sample_tile_conditions,
)
from cvig_engine.synth.settings import SynthSettings
from cvig_engine.synth.style import sample_style

__all__ = [
    "SynthPair",
    "build_city",
    "sample_locations",
    "render_pairs",
    "synthesize",
    "write_png",
    "SYNTH_FORMAT",
]

SYNTH_FORMAT = "cvig-synth-1"
MASK_NAMES = ("surface_building", "surface_road", "overhead_building", "overhead_road")


@dataclass
class SynthPair:
    """One rendered pair with its exact ground truth (world metres and lat/lon)."""

    city: str
    index: int
    surface: View
    overhead: View
    photo_x: float  # true camera location
    photo_y: float
    tile_x: float  # tile centre = the (noisy) geotag
    tile_y: float
    lat: float
    lon: float
    true_lat: float
    true_lon: float
    heading: float
    fov: float
    usable: bool
    close_up: str  # '' for a usable photo, else 'wall' or 'ground'


def build_city(settings: SynthSettings, city_index: int) -> City:
    """City number ``city_index`` of a run (depends only on the seed and the world settings)."""
    rng = np.random.default_rng([settings.seed, city_index, 0])
    style = sample_style(rng, city_index)
    return generate_city(style, settings, rng)


def _pair_rng(settings: SynthSettings, city_index: int, pair_index: int) -> np.random.Generator:
    return np.random.default_rng([settings.seed, city_index, 1, pair_index])


def sample_locations(city: City, count: int, rng: np.random.Generator):
    """``count`` camera locations (x, y) on open ground, a share of them around a few hot spots.

    Locations keep ``settings.city_margin`` from the city edge and at least one raster cell from
    any building, tree or vehicle.
    """
    settings = city.settings
    low, high = -city.half + settings.city_margin, city.half - settings.city_margin
    radius = settings.hotspot_radius
    centres = rng.uniform(
        low + min(radius, (high - low) / 4),
        high - min(radius, (high - low) / 4),
        (settings.hotspots, 2),
    )
    found, total = [], 0
    for _ in range(1000):
        needed = count - total
        if needed <= 0:
            break
        proposals = 2 * needed + 16
        points = rng.uniform(low, high, (proposals, 2))
        if settings.hotspots > 0:
            hot = rng.random(proposals) < settings.hotspot_fraction
            which = rng.integers(settings.hotspots, size=proposals)
            offsets = rng.normal(0.0, radius, (proposals, 2))
            points[hot] = centres[which[hot]] + offsets[hot]
        inside = np.all((points >= low) & (points <= high), axis=1)
        points = points[inside]
        rows, columns = city.to_pixel(points[:, 0], points[:, 1])
        free = np.ones(len(points), bool)
        for d_row in (-1, 0, 1):
            for d_column in (-1, 0, 1):
                free &= (
                    city.height[
                        np.clip(rows + d_row, 0, city.size_px - 1),
                        np.clip(columns + d_column, 0, city.size_px - 1),
                    ]
                    == 0.0
                )
        found.append(points[free][:needed])
        total += len(found[-1])
    if total < count:
        raise CvigInputError(
            f"city {city.style.name}: could not find {count} open-ground photo locations"
        )
    return np.concatenate(found)[:count]


def render_pairs(
    city: City, count: int, *, city_index: int | None = None, render_surface_image: bool = True
):
    """Yield ``count`` rendered ``SynthPair`` of one city (pair i depends only on seed, city, i)."""
    settings = city.settings
    city_index = city.style.index if city_index is None else city_index
    locations = sample_locations(city, count, np.random.default_rng([settings.seed, city_index, 2]))
    for index in range(count):
        rng = _pair_rng(settings, city_index, index)
        photo_x, photo_y = (float(value) for value in locations[index])
        heading = 0.0 if settings.fov >= 360.0 else round(float(rng.uniform(0.0, 360.0)), 2) % 360.0
        close_up = ""
        if rng.random() < settings.unusable_fraction:
            close_up = "wall" if rng.random() < 0.5 else "ground"
        geotag = np.array([photo_x, photo_y]) + rng.normal(0.0, settings.geotag_noise, 2)
        row, column = city.to_pixel(geotag[0], geotag[1])
        row, column = int(row), int(column)
        tile_x, tile_y = (float(value) for value in city.pixel_centre(row, column))
        tile_conditions = sample_tile_conditions(rng, city, settings)
        surface_conditions = sample_surface_conditions(rng, city, settings, tile_conditions)
        overhead = render_tile(city, row, column, tile_conditions, rng)
        if not render_surface_image:
            surface = None
        elif close_up:
            surface = render_closeup(
                city, photo_x, photo_y, close_up, settings.fov, surface_conditions, rng
            )
        else:
            surface = render_surface(
                city, photo_x, photo_y, heading, settings.fov, surface_conditions, rng
            )
        lat, lon = city.to_latlon(tile_x, tile_y)
        true_lat, true_lon = city.to_latlon(photo_x, photo_y)
        yield SynthPair(
            city=city.style.name,
            index=index,
            surface=surface,
            overhead=overhead,
            photo_x=photo_x,
            photo_y=photo_y,
            tile_x=tile_x,
            tile_y=tile_y,
            lat=round(float(lat), 7),
            lon=round(float(lon), 7),
            true_lat=round(float(true_lat), 7),
            true_lon=round(float(true_lon), 7),
            heading=heading,
            fov=float(settings.fov),
            usable=not close_up,
            close_up=close_up,
        )


def write_png(path, array: np.ndarray, level: int = 1) -> None:
    """Write a uint8 grey [H, W] or RGB [H, W, 3] array as PNG, fast and deterministic.

    Every row uses PNG's "Up" filter. Colour images are deflated with Huffman coding only (on
    noisy renders as small as zlib level 6 and several times faster than Pillow's encoder);
    grey masks, full of long runs, with ordinary deflate at ``level``. Level 0 stores raw bytes.
    """
    array = np.ascontiguousarray(array, dtype=np.uint8)
    height, width = array.shape[:2]
    colour_type = 2 if array.ndim == 3 else 0
    flat = array.reshape(height, -1)
    rows = np.empty((height, 1 + flat.shape[1]), np.uint8)
    rows[:, 0] = 2  # filter type Up: each byte minus the byte above it (mod 256)
    rows[0, 1:] = flat[0]
    np.subtract(flat[1:], flat[:-1], out=rows[1:, 1:])
    strategy = zlib.Z_HUFFMAN_ONLY if colour_type == 2 and level > 0 else zlib.Z_DEFAULT_STRATEGY
    compressor = zlib.compressobj(level, zlib.DEFLATED, 15, 8, strategy)
    data = compressor.compress(rows.tobytes()) + compressor.flush()

    def chunk(kind: bytes, payload: bytes) -> bytes:
        return (
            struct.pack(">I", len(payload))
            + kind
            + payload
            + struct.pack(">I", zlib.crc32(kind + payload))
        )

    header = struct.pack(">IIBBBBB", width, height, 8, colour_type, 0, 0, 0)
    Path(path).write_bytes(
        b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", data) + chunk(b"IEND", b"")
    )


def write_jpeg(path, array: np.ndarray, quality: int = 95) -> None:
    """Write a uint8 RGB [H, W, 3] array as a baseline JPEG (4:2:0, like camera photos)."""
    from PIL import Image

    Image.fromarray(np.ascontiguousarray(array, dtype=np.uint8)).save(
        path, format="JPEG", quality=quality, subsampling="4:2:0", optimize=False
    )


# Photo and tile formats: extension of the files written.
IMAGE_FORMATS = {"jpeg": ".jpg", "png": ".png"}


def _pair_counts(settings: SynthSettings) -> list[int]:
    base, extra = divmod(settings.pairs, settings.cities)
    return [base + (1 if index < extra else 0) for index in range(settings.cities)]


def synthesize(
    output_dir,
    settings: SynthSettings | None = None,
    *,
    overwrite: bool = False,
    progress: bool = True,
    png_level: int = 1,
    image_format: str = "jpeg",
    jpeg_quality: int = 95,
    workers: int = 1,
    **knobs,
) -> dict:
    """Render a whole dataset into ``output_dir``; return a summary.

    Pass a ``SynthSettings`` or its fields as keywords: ``synthesize(out, pairs=48, cities=2)``.

    Writes ``<city>/surface/*.jpg``, ``<city>/overhead/*.jpg`` (``*.png`` with
    ``image_format="png"``), ``<city>/masks/*.png`` (when ``settings.masks``, always lossless),
    ``train.csv`` / ``test.csv`` (WITW layout, the last ``test_cities``
    cities held out), ``train_cvusa.csv`` / ``test_cvusa.csv`` (CVUSA layout) and ``synth.json``
    (the settings and each city's style). The same settings give byte-identical files, whatever
    the number of ``workers`` (processes, one city at a time each).
    """
    from tqdm import tqdm

    from cvig_engine.data import write_cvusa_csv, write_witw_csv

    if settings is None:
        unknown = sorted(set(knobs) - set(SynthSettings.names()))
        if unknown:
            raise TypeError(f"synthesize() got unknown settings: {', '.join(unknown)}")
        settings = SynthSettings(**knobs)
    elif knobs:
        raise TypeError("pass either a SynthSettings or keyword settings, not both")
    settings.validate()
    if not 0 <= png_level <= 9:
        raise CvigInputError(f"--png-level must be in 0..9, got {png_level}")
    if image_format not in IMAGE_FORMATS:
        raise CvigInputError(
            f"--image-format must be one of {', '.join(IMAGE_FORMATS)}, got {image_format!r}"
        )
    if not 1 <= jpeg_quality <= 100:
        raise CvigInputError(f"--jpeg-quality must be in 1..100, got {jpeg_quality}")
    if workers < 1:
        raise CvigInputError(f"--workers must be positive, got {workers}")
    output_dir = Path(output_dir)
    if output_dir.exists() and not output_dir.is_dir():
        raise CvigInputError(f"{output_dir}: exists and is not a folder")
    if output_dir.exists() and any(output_dir.iterdir()) and not overwrite:
        raise CvigInputError(
            f"{output_dir}: folder is not empty (choose a new one, or pass --overwrite)"
        )
    output_dir.mkdir(parents=True, exist_ok=True)
    counts = _pair_counts(settings)
    jobs = [
        (output_dir, settings, city_index, count, png_level, image_format, jpeg_quality)
        for city_index, count in enumerate(counts)
    ]
    results = [None] * len(jobs)
    with tqdm(
        total=settings.pairs, desc="synth", unit="pair", disable=None if progress else True
    ) as bar:
        if workers == 1:
            for city_index, job in enumerate(jobs):
                results[city_index] = _write_city(*job, on_pair=lambda: bar.update(1))
        else:
            from concurrent.futures import ProcessPoolExecutor, as_completed

            with ProcessPoolExecutor(max_workers=min(workers, len(jobs))) as pool:
                futures = {pool.submit(_write_city, *job): index for index, job in enumerate(jobs)}
                for future in as_completed(futures):
                    results[futures[future]] = future.result()
                    bar.update(counts[futures[future]])
    records = {"train": [], "test": []}
    for city_records, summary in results:
        records[summary["split"]].extend(city_records)
    cities = [summary for _, summary in results]
    paths = {}
    for split in ("train", "test"):
        paths[split] = output_dir / f"{split}.csv"
        paths[f"{split}_cvusa"] = output_dir / f"{split}_cvusa.csv"
        write_witw_csv(paths[split], records[split])
        write_cvusa_csv(paths[f"{split}_cvusa"], records[split])
    document = {
        "format": SYNTH_FORMAT,
        "settings": settings.to_dict(),
        "png_level": png_level,
        "image_format": image_format,
        "jpeg_quality": jpeg_quality if image_format == "jpeg" else None,
        "files": {key: path.name for key, path in paths.items()},
        "cities": cities,
    }
    (output_dir / "synth.json").write_text(
        json.dumps(document, indent=2, sort_keys=True) + "\n", encoding="utf-8"
    )
    return {
        "output": str(output_dir),
        "pairs": settings.pairs,
        "train_pairs": len(records["train"]),
        "test_pairs": len(records["test"]),
        "cities": cities,
        "files": {key: str(path) for key, path in paths.items()},
    }


def _write_city(
    output_dir: Path,
    settings: SynthSettings,
    city_index: int,
    count: int,
    png_level: int,
    image_format: str,
    jpeg_quality: int,
    on_pair=None,
):
    """Build city ``city_index``, write its ``count`` pairs; return (records, city summary)."""
    from cvig_engine.data import PairRecord

    city = build_city(settings, city_index)
    name = city.style.name
    split = "test" if city_index >= settings.cities - settings.test_cities else "train"
    folders = {kind: output_dir / name / kind for kind in ("surface", "overhead", "masks")}
    for kind, folder in folders.items():
        if kind != "masks" or settings.masks:
            folder.mkdir(parents=True, exist_ok=True)
    digits = max(5, len(str(count)))
    extension = IMAGE_FORMATS[image_format]
    records = []
    for pair in render_pairs(city, count, city_index=city_index):
        stem = f"{pair.index:0{digits}d}"
        surface_path = folders["surface"] / f"{stem}{extension}"
        overhead_path = folders["overhead"] / f"{stem}{extension}"
        for image_path, image in ((surface_path, pair.surface.image),
                                  (overhead_path, pair.overhead.image)):
            if image_format == "jpeg":
                write_jpeg(image_path, image, jpeg_quality)
            else:
                write_png(image_path, image, png_level)
        masks = {}
        if settings.masks:
            layers = (
                pair.surface.building,
                pair.surface.road,
                pair.overhead.building,
                pair.overhead.road,
            )
            for mask_name, layer in zip(MASK_NAMES, layers):
                masks[mask_name] = folders["masks"] / f"{stem}_{mask_name}.png"
                write_png(masks[mask_name], layer.astype(np.uint8) * 255, png_level)
        geotag_error = math.hypot(pair.photo_x - pair.tile_x, pair.photo_y - pair.tile_y)
        records.append(
            PairRecord(
                row=0,
                surface=surface_path,
                overhead=overhead_path,
                lat=pair.lat,
                lon=pair.lon,
                heading=pair.heading,
                fov=pair.fov,
                city=name,
                usable=pair.usable,
                masks=masks,
                csv_path=output_dir / f"{split}.csv",
                extra={
                    "true_lat": f"{pair.true_lat:.7f}",
                    "true_lon": f"{pair.true_lon:.7f}",
                    "geotag_error_m": f"{geotag_error:.3f}",
                    "close_up": pair.close_up,
                },
            )
        )
        if on_pair is not None:
            on_pair()
    return records, _city_summary(city, split, count, sum(record.usable for record in records))


def _city_summary(city: City, split: str, pairs: int, usable: int) -> dict:
    style = city.style
    return {
        "name": style.name,
        "index": style.index,
        "split": split,
        "pairs": pairs,
        "usable_pairs": usable,
        "origin_lat": round(style.origin_lat, 6),
        "origin_lon": round(style.origin_lon, 6),
        "road_angle_deg": round(style.road_angle, 3),
        "block_size_m": [round(v, 2) for v in style.block_size],
        "building_height_median_m": round(style.height_median, 2),
        "buildings": int(len(city.building_heights)),
        "trees": int(len(city.tree_shade)),
        "palette": np.round(style.palette, 3).tolist(),
        "overhead_season": style.overhead_season,
    }
