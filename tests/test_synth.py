"""The procedural cross-view world: geometry, heading convention, files, knobs, difficulty."""

import dataclasses
import math
import subprocess
import sys

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from cvig_engine.cli import main
from cvig_engine.data import crop_panorama, load_image, load_mask, read_dataset
from cvig_engine.errors import CvigInputError
from cvig_engine.model import orientation_distance
from cvig_engine.polar import heading_to_shift, polar_transform
from cvig_engine.synth import (
    City,
    SynthSettings,
    build_city,
    colour_histogram_baseline,
    render_pairs,
    render_surface,
    render_tile,
    sample_style,
    sample_surface_conditions,
    sample_tile_conditions,
    synthesize,
)
from cvig_engine.synth.city import ROAD

TINY = dict(tile_size=64, pano_height=32, pano_width=128)


def _clean_conditions(city, seed=1):
    """Tile and surface conditions without noise, blur, tilt or occluders."""
    rng = np.random.default_rng(seed)
    tile = sample_tile_conditions(rng, city, city.settings)
    surface = sample_surface_conditions(rng, city, city.settings, tile)
    tile = dataclasses.replace(tile, noise=0.0, blur=0.0)
    surface = dataclasses.replace(surface, noise=0.0, blur=0.0, pitch=0.0, roll=0.0, occluders=[])
    return tile, surface


def _flat_city(settings, size_px):
    return City(sample_style(np.random.default_rng(0), 0), settings, size_px)


def _views_at(city, x, y):
    """Clean 360 deg panorama and overhead tile (centred on the camera's raster pixel) at (x, y)."""
    tile_conditions, surface_conditions = _clean_conditions(city)
    rng = np.random.default_rng(0)
    panorama = render_surface(city, x, y, 0.0, 360.0, surface_conditions, rng)
    row, column = (int(value) for value in city.to_pixel(x, y))
    return panorama, render_tile(city, row, column, tile_conditions, rng)


def _circular_mean_column(weights, width):
    angles = 2 * np.pi * np.arange(width) / width
    mean = math.atan2(np.sum(weights * np.sin(angles)), np.sum(weights * np.cos(angles)))
    return (mean % (2 * np.pi)) / (2 * np.pi) * width


def _column_error(a, b, width):
    return abs((a - b + width / 2) % width - width / 2)


# -- geometry --------------------------------------------------------------------------------------


@pytest.mark.parametrize("bearing", [0.0, 57.0, 135.0, 250.0, 318.0])
def test_landmark_appears_at_the_bearing_in_panorama_and_polar_tile(bearing):
    settings = SynthSettings(
        tile_size=64, tile_extent=64.0, pano_height=32, pano_width=360, city_size=200.0
    )
    city = _flat_city(settings, 200)  # 1 m per pixel; pixel centres at half-metres
    camera_x, camera_y = 0.5, -0.5
    # On a pixel corner (integer metres), so that the 2 x 2 m footprint is exactly 2 x 2 cells.
    tower_x = round(camera_x + 20.0 * math.sin(math.radians(bearing)))
    tower_y = round(camera_y + 20.0 * math.cos(math.radians(bearing)))
    city.add_box(tower_x, tower_y, 2.0, 2.0, 60.0)
    panorama, tile = _views_at(city.finish(), camera_x, camera_y)

    width = settings.pano_width
    true_bearing = math.degrees(math.atan2(tower_x - camera_x, tower_y - camera_y)) % 360
    # Panorama: column j faces 180 + j * 360 / W (column 0 south, clockwise).
    expected_panorama = ((true_bearing - 180.0) % 360.0) / 360.0 * width
    seen = _circular_mean_column(panorama.building.sum(axis=0), width)
    assert _column_error(seen, expected_panorama, width) <= 1.0

    # Polar tile: invert the transform's formula row = S/2 + r cos(theta), col = S/2 - r sin(theta)
    # at the tower's tile pixel (north up, 1 m per pixel).
    size = settings.tile_size
    tower_row = size / 2 - (tower_y - camera_y)
    tower_col = size / 2 + (tower_x - camera_x)
    theta = math.atan2(-(tower_col - size / 2), tower_row - size / 2) % (2 * math.pi)
    expected_polar = theta / (2 * math.pi) * width
    polar = polar_transform(
        torch.from_numpy(tile.building.astype(np.float32))[None, None], 32, width
    )[0, 0]
    seen_polar = _circular_mean_column(polar.sum(dim=0).numpy(), width)
    assert _column_error(seen_polar, expected_polar, width) <= 1.0
    # The two views line up at shift 0, which is what orientation search relies on.
    assert _column_error(seen, seen_polar, width) <= 1.5


def test_masks_are_exact_footprints_heights_and_road_extents():
    settings = SynthSettings(
        tile_size=64, tile_extent=64.0, pano_height=64, pano_width=360, city_size=200.0
    )
    city = _flat_city(settings, 200)
    camera_x, camera_y = 0.5, -0.5
    # A road 9 m wide running north-south (x from -4 to 5), and a 6 m tall block to the west
    # (3 x 9 cells, its east facade at x = -18, 18.5 m from the camera).
    x_centres, _ = city.pixel_centre(0, np.arange(200))
    road_columns = np.abs(x_centres - camera_x) < 5.0
    city.material[:, road_columns] = ROAD
    city.road[:, road_columns] = True
    city.add_box(camera_x - 20.0, camera_y, 3.0, 9.0, 6.0)
    panorama, tile = _views_at(city.finish(), camera_x, camera_y)

    # Overhead: footprint and road band, pixel for pixel (tile pixel 32 = the camera's pixel).
    tile_x = camera_x + np.arange(64) - 32
    tile_y = camera_y - (np.arange(64) - 32)
    expected_building = (np.abs(tile_y[:, None] - camera_y) < 4.5) & (
        np.abs(tile_x[None, :] - (camera_x - 20)) < 1.5
    )
    np.testing.assert_array_equal(tile.building, expected_building)
    np.testing.assert_array_equal(
        tile.road, np.broadcast_to(np.abs(tile_x - camera_x) < 5.0, (64, 64))
    )

    step = 360.0 / settings.pano_width
    elevation = (settings.pano_height / 2 - 0.5 - np.arange(settings.pano_height)) * step
    west = round((270.0 - 180.0) / step)  # column facing west
    east = round((90.0 - 180.0) % 360.0 / step)
    north = round((0.0 - 180.0) % 360.0 / step)
    # West: the facade 18.5 m away rises to atan((6 - eye) / 18.5).
    top = math.degrees(math.atan((6.0 - settings.eye_height) / 18.5))
    rows = np.nonzero(panorama.building[:, west])[0]
    assert abs(elevation[rows.min()] - top) <= step
    # East: road only within 4.5 m, i.e. below atan(eye / 4.5) under the horizon.
    road_rows = np.nonzero(panorama.road[:, east])[0]
    assert (
        abs(elevation[road_rows.min()] + math.degrees(math.atan(settings.eye_height / 4.5)))
        <= 1.5 * step
    )
    # North: road all the way from the bottom row up to the horizon (until the haze limit).
    assert panorama.road[settings.pano_height // 2 :, north].mean() > 0.9
    assert not panorama.road[: settings.pano_height // 2, north].any()
    assert not panorama.building[:, east].any()


# -- heading convention ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "heading, exact",
    [
        ((180.0 + 8 * 13 * 360 / 512 + 35.0) % 360, True),  # left edge on a bin boundary
        ((180.0 + 8 * 50 * 360 / 512 + 35.0) % 360, True),
        (12.34, False),
        (97.5, False),
        (301.0, False),
    ],
)
def test_photo_heading_maps_to_the_orientation_bin_of_orientation_distance(heading, exact):
    settings = SynthSettings(pano_height=32, pano_width=512, tile_size=64, city_size=400.0)
    city = build_city(settings, 0)
    _, conditions = _clean_conditions(city)
    x, y, fov, bins = 3.0, -7.0, 70.0, 64
    panorama = render_surface(city, x, y, 0.0, 360.0, conditions, np.random.default_rng(0)).image
    photo = render_surface(city, x, y, heading, fov, conditions, np.random.default_rng(0)).image
    assert photo.shape == (32, int(fov / 360 * 512), 3)

    # Pixel "features": 8 columns per bin (VGG16's width reduction), each column centred and scaled
    # to unit norm so that every aerial window has the same energy and the raw correlation ranks
    # windows by how well they match.
    def features(image, columns):
        pooled = (
            torch.from_numpy(image.astype(np.float64))
            .permute(2, 0, 1)
            .reshape(3, 32, columns, 8)
            .mean(dim=3)
        )
        pooled = pooled - pooled.mean(dim=(0, 1), keepdim=True)
        return (pooled / pooled.norm(dim=(0, 1), keepdim=True))[None]

    _, shift = orientation_distance(features(photo[:, :96], 12), features(panorama, bins))
    expected = heading_to_shift(heading, fov, bins)
    assert _column_error(int(shift[0, 0]), expected, bins) <= (0 if exact else 1)
    # The photo is the panorama's window that starts at the heading's left edge ...
    start = heading_to_shift(heading, fov, settings.pano_width)
    window = panorama[:, (start + np.arange(photo.shape[1])) % settings.pano_width]
    assert np.mean(np.abs(window.astype(int) - photo.astype(int))) < 6.0
    # ... and crop_panorama cuts that window, reporting a centre heading of the same bin.
    crop, centre = crop_panorama(panorama, fov, heading_deg=heading)
    np.testing.assert_array_equal(crop, window)
    assert heading_to_shift(centre, fov, settings.pano_width) == start


def test_aligned_photos_match_panorama_windows_exactly():
    settings = SynthSettings(pano_height=32, pano_width=512, tile_size=64, city_size=400.0)
    city = build_city(settings, 1)
    _, conditions = _clean_conditions(city)
    panorama = render_surface(
        city, -4.0, 9.0, 0.0, 360.0, conditions, np.random.default_rng(0)
    ).image
    for start in (0, 77, 480):  # a window that wraps around too
        heading = (180.0 + start * 360.0 / 512 + 35.0) % 360.0
        photo = render_surface(
            city, -4.0, 9.0, heading, 70.0, conditions, np.random.default_rng(0)
        ).image
        window = panorama[:, (start + np.arange(photo.shape[1])) % 512]
        assert np.mean(window == photo) > 0.99


# -- dataset files ---------------------------------------------------------------------------------


def _files(folder):
    return {
        path.relative_to(folder).as_posix(): path.read_bytes()
        for path in sorted(folder.rglob("*"))
        if path.is_file()
    }


def test_same_seed_gives_identical_files_whatever_the_workers_and_another_seed_does_not(tmp_path):
    knobs = dict(pairs=12, cities=3, seed=4, city_size=400.0, unusable_fraction=0.2, **TINY)
    synthesize(tmp_path / "a", progress=False, **knobs)
    arguments = ("--pairs 12 --cities 3 --seed 4 --city-size 400 --unusable-fraction 0.2 "
                 "--tile-size 64 --pano-height 32 --pano-width 128 --workers 2").split()
    command = [sys.executable, "-m", "cvig_engine.cli", "synth", "-o", str(tmp_path / "b")]
    result = subprocess.run(command + arguments, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    first, second = _files(tmp_path / "a"), _files(tmp_path / "b")
    assert len(first) == 4 + 1 + 12 * 6  # 4 CSVs, synth.json, per pair 2 images and 4 masks
    assert first.keys() == second.keys()
    assert all(first[name] == second[name] for name in first)
    synthesize(tmp_path / "c", progress=False, **dict(knobs, seed=5))
    third = _files(tmp_path / "c")
    assert sum(name.endswith(".jpg") for name in first) == 24  # photos and tiles
    images = [name for name in first if name.endswith((".jpg", ".png"))]
    assert len([name for name in images if first[name] != third.get(name)]) > 60


def test_png_writer_round_trips_through_pillow(tmp_path):
    from PIL import Image

    from cvig_engine.synth import write_png

    rng = np.random.default_rng(0)
    for shape in [(5, 7, 3), (9, 4), (1, 1, 3), (128, 512, 3)]:
        for level in (0, 1, 9):
            array = rng.integers(0, 256, shape, dtype=np.uint8)
            write_png(tmp_path / "image.png", array, level)
            with Image.open(tmp_path / "image.png") as image:
                np.testing.assert_array_equal(np.asarray(image), array)


def test_jpeg_and_png_images_decode_to_the_rendered_pixels(tmp_path):
    knobs = dict(pairs=4, cities=2, seed=3, city_size=400.0, unusable_fraction=0.0, **TINY)
    synthesize(tmp_path / "jpeg", progress=False, **knobs)
    synthesize(tmp_path / "png", progress=False, image_format="png", **knobs)
    settings = SynthSettings(**knobs)
    rendered = [pair for index in range(2)
                for pair in render_pairs(build_city(settings, index), 2, city_index=index)]
    records = {}
    for image_format in ("jpeg", "png"):
        folder = tmp_path / image_format
        records[image_format] = [*read_dataset(folder / "train.csv"),
                                 *read_dataset(folder / "test.csv")]
    for pair, jpeg, png in zip(rendered, records["jpeg"], records["png"], strict=True):
        assert jpeg.surface.suffix == ".jpg" and png.surface.suffix == ".png"
        for view, jpeg_path, png_path in ((pair.surface, jpeg.surface, png.surface),
                                          (pair.overhead, jpeg.overhead, png.overhead)):
            exact = load_image(png_path)
            np.testing.assert_array_equal(exact, view.image)  # PNG: lossless
            error = np.abs(load_image(jpeg_path).astype(np.float32) - view.image)
            assert error.mean() < 8.0  # JPEG: lossy (noise, 4:2:0 chroma), close
        for name, mask in jpeg.masks.items():  # masks are PNG, bit-exact, in both
            assert mask.suffix == ".png" and mask.read_bytes() == png.masks[name].read_bytes()


def test_dataset_layout_split_and_csv_twins(tmp_path):
    summary = synthesize(
        tmp_path,
        pairs=15,
        cities=3,
        test_cities=1,
        fov=70.0,
        seed=2,
        city_size=400.0,
        progress=False,
        **TINY,
    )
    train, test = read_dataset(tmp_path / "train.csv"), read_dataset(tmp_path / "test.csv")
    assert len(train) == 10 and len(test) == 5 == summary["test_pairs"]
    test_city = summary["cities"][-1]["name"]
    assert {record.city for record in test} == {test_city}
    assert test_city not in {record.city for record in train}
    for split, records in (("train", train), ("test", test)):
        twins = read_dataset(tmp_path / f"{split}_cvusa.csv")
        assert [(t.overhead, t.surface) for t in twins] == [
            (r.overhead, r.surface) for r in records
        ]
    photo_width = int(70.0 / 360.0 * 128)
    for record in train + test:
        assert record.fov == 70.0 and 0.0 <= record.heading < 360.0
        assert load_image(record.surface).shape == (32, photo_width, 3)
        assert load_image(record.overhead).shape == (64, 64, 3)
        assert load_mask(record.masks["surface_building"]).shape == (32, photo_width)
        assert load_mask(record.masks["overhead_road"]).shape == (64, 64)
    assert len({record.heading for record in train}) == len(train)  # random headings, recorded


def test_realism_knobs_geotag_noise_unusable_fraction_hot_spots():
    settings = SynthSettings(
        pairs=200,
        cities=2,
        seed=7,
        geotag_noise=5.0,
        unusable_fraction=0.5,
        hotspots=1,
        hotspot_fraction=1.0,
        hotspot_radius=15.0,
        city_size=400.0,
        **TINY,
    )
    city = build_city(settings, 0)
    pairs = list(render_pairs(city, 200, city_index=0, render_surface_image=False))
    offsets = np.array([(p.tile_x - p.photo_x, p.tile_y - p.photo_y) for p in pairs])
    # Per-axis std 5 m, plus up to half a tile pixel of snapping to the pixel grid.
    assert 4.0 < offsets.std(axis=0).mean() < 6.2
    usable = np.array([p.usable for p in pairs])
    assert 70 <= usable.sum() <= 130  # binomial(200, 0.5): 5 sigma
    assert all(p.close_up in ("wall", "ground") for p in pairs if not p.usable)
    locations = np.array([(p.photo_x, p.photo_y) for p in pairs])
    assert locations.std(axis=0).max() < 25.0  # one hot spot of radius 15 m
    spread = build_city(dataclasses.replace(settings, hotspots=0, geotag_noise=0.0), 0)
    uniform = np.array(
        [
            (p.photo_x, p.photo_y)
            for p in render_pairs(spread, 200, city_index=0, render_surface_image=False)
        ]
    )
    assert uniform.std(axis=0).min() > 50.0
    exact = [p for p in render_pairs(spread, 50, city_index=0, render_surface_image=False)]
    assert max(math.hypot(p.tile_x - p.photo_x, p.tile_y - p.photo_y) for p in exact) <= (
        settings.metres_per_pixel * math.sqrt(0.5) + 1e-9
    )


def test_unusable_photos_are_close_ups_flagged_in_the_csv(tmp_path):
    synthesize(
        tmp_path,
        pairs=20,
        cities=2,
        seed=3,
        unusable_fraction=0.5,
        city_size=400.0,
        progress=False,
        **TINY,
    )
    records = read_dataset(tmp_path / "train.csv") + read_dataset(tmp_path / "test.csv")
    flagged = [r for r in records if not r.usable]
    assert 0 < len(flagged) < len(records)
    for record in records:
        assert (record.extra["close_up"] != "") == (not record.usable)
        building = load_mask(record.masks["surface_building"])
        if record.extra["close_up"] == "wall":
            assert building.min() == 1.0  # the wall fills the frame
        if record.extra["close_up"] == "ground":
            assert building.max() == 0.0


# -- arguments -------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "arguments, message",
    [
        (["--pairs", "0"], "--pairs"),
        (["--tile-size", "0"], "--tile-size"),
        (["--pano-width", "-4"], "--pano-width"),
        (["--tile-extent", "0"], "--tile-extent"),
        (["--fov", "0"], "--fov"),
        (["--fov", "361"], "--fov"),
        (["--cities", "2", "--test-cities", "3"], "--test-cities"),
        (["--pairs", "3", "--cities", "4"], "--pairs"),
        (["--unusable-fraction", "1.5"], "--unusable-fraction"),
        (["--jpeg-quality", "0"], "--jpeg-quality"),
        (["--image-format", "bmp"], "--image-format"),
    ],
)
def test_bad_arguments_exit_2_with_a_clear_message(tmp_path, arguments, message):
    result = CliRunner().invoke(main, ["synth", "-o", str(tmp_path / "out")] + arguments)
    assert result.exit_code == 2, result.output
    assert message in result.output and "Traceback" not in result.output
    assert not (tmp_path / "out").exists()


def test_bad_arguments_in_a_real_process_and_non_empty_folder(tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "cvig_engine.cli", "synth", "-o", str(tmp_path), "--fov", "400"],
        capture_output=True,
        text=True,
    )
    assert result.returncode == 2 and "--fov" in result.stderr and "Traceback" not in result.stderr
    (tmp_path / "keep.txt").write_text("x")
    with pytest.raises(CvigInputError, match="not empty"):
        synthesize(tmp_path, pairs=2, cities=2, progress=False, **TINY)


# -- difficulty ------------------------------------------------------------------------------------


def test_colour_histogram_baseline_finds_colour_identical_pairs():
    rng = np.random.default_rng(0)
    tiles = [rng.integers(0, 256, (16, 16, 3), dtype=np.uint8) for _ in range(100)]
    result = colour_histogram_baseline(tiles, tiles)
    assert result["top1"] == 100.0 and result["top1_percent"] == 100.0
    shuffled = colour_histogram_baseline(tiles, tiles[1:] + tiles[:1])
    assert shuffled["top1"] < 10.0


@pytest.mark.slow
def test_colour_histograms_stay_near_chance_on_default_settings():
    settings = SynthSettings()  # default sizes and knobs
    city = build_city(settings, 0)
    pairs = list(render_pairs(city, 250, city_index=0))
    result = colour_histogram_baseline(
        [p.surface.image for p in pairs], [p.overhead.image for p in pairs]
    )
    # Chance: top-1 % means rank <= 2 of 250 (0.8 %). Allow a few lucky queries, no shortcut.
    assert result["top1_percent"] <= 4.0, result["top1_percent"]
    assert result["median_rank"] > 0.3 * len(pairs)


# -- compiled loops against plain numpy ------------------------------------------------------------


def _shadow_reference(height, resolution, sun):
    """Row-by-row numpy form of the shadow recurrence, on explicitly transposed/flipped copies."""
    radians = math.radians(sun.azimuth)
    d_row, d_col = -math.cos(radians), math.sin(radians)
    transpose = abs(d_col) > abs(d_row)
    work = height.T if transpose else height
    major, minor = (d_col, d_row) if transpose else (d_row, d_col)
    flip = major > 0
    work = work[::-1] if flip else work
    lateral = minor / abs(major)
    tan_elevation = math.tan(math.radians(max(sun.elevation, 1.0)))
    drop = np.float32(resolution * math.sqrt(1.0 + lateral * lateral) * tan_elevation)
    offsets = np.rint(np.arange(work.shape[0]) * lateral).astype(np.int64)
    result = np.empty_like(work)
    result[0] = work[0]
    for i in range(1, work.shape[0]):
        shifted = np.zeros_like(result[i - 1])
        step = offsets[i] - offsets[i - 1]
        if step > 0:
            shifted[:-1] = result[i - 1, 1:]
        elif step < 0:
            shifted[1:] = result[i - 1, :-1]
        else:
            shifted = result[i - 1]
        result[i] = np.maximum(work[i], shifted - drop)
    result = result[::-1] if flip else result
    return result.T if transpose else result


@pytest.mark.parametrize("azimuth", [0.0, 30.0, 80.0, 100.0, 170.0, 200.0, 260.0, 290.0, 340.0])
def test_shadow_heights_match_the_numpy_recurrence_for_every_sun_direction(azimuth):
    from cvig_engine.synth import Sun
    from cvig_engine.synth.city import shadow_heights

    rng = np.random.default_rng(int(azimuth))
    height = np.where(rng.random((37, 53)) < 0.1, rng.uniform(2, 30, (37, 53)), 0.0)
    height = height.astype(np.float32)
    for elevation in (8.0, 35.0):
        sun = Sun(azimuth, elevation)
        got = shadow_heights(height, 0.5, sun)
        np.testing.assert_array_equal(got, _shadow_reference(height, 0.5, sun))
        assert got.shape == height.shape and np.all(got >= height)
    assert np.any(got > height)  # something is in shadow


@pytest.mark.parametrize("wrap", [False, True])
def test_image_finish_matches_the_numpy_formula(wrap):
    from cvig_engine.synth.loops import finish_image

    rng = np.random.default_rng(1)
    image = rng.uniform(0.0, 1.2, (9, 14, 3)).astype(np.float32)
    gain = np.array([200.0, 255.0, 240.0], np.float32)
    noise = rng.standard_normal(image.shape).astype(np.float32)
    blur = 0.3
    padded = np.pad(image.astype(np.float64), ((1, 1), (1, 1), (0, 0)),
                    mode="edge")
    if wrap:
        padded[:, 0], padded[:, -1] = padded[:, -2], padded[:, 1]
    around = padded[:-2, 1:-1] + padded[2:, 1:-1] + padded[1:-1, :-2] + padded[1:-1, 2:]
    expected = ((1 - blur) * image + blur / 4 * around) * gain + noise * 5.0
    expected = np.floor(np.clip(expected + 0.5, 0, 255)).astype(np.uint8)
    got = finish_image(image, gain, blur, noise, 5.0, wrap)
    assert np.mean(got != expected) < 0.01 and np.abs(got.astype(int) - expected).max() <= 1
    clean = finish_image(image, gain, 0.0, np.zeros((0, 0, 3), np.float32), 0.0, wrap)
    np.testing.assert_array_equal(clean, np.floor(np.clip(image * gain + 0.5, 0, 255)))


def test_resampling_into_the_world_matches_the_numpy_formula():
    from cvig_engine.synth.loops import resample_layers

    rng = np.random.default_rng(3)
    count, size, extent, resolution = 40, 31, 10.0, 0.5
    layers = (rng.random((count, count)).astype(np.float32),
              rng.integers(0, 8, (count, count)).astype(np.uint8),
              rng.integers(-1, 50, (count, count)).astype(np.int32),
              rng.random((count, count)) < 0.5,
              rng.integers(-1, 9, (count, count)).astype(np.int16))
    x = (np.arange(size) + 0.5) * 0.6 - 9.3
    y = 9.3 - (np.arange(size) + 0.5) * 0.6
    angle = 0.7
    got = resample_layers(x, y, math.cos(angle), math.sin(angle), extent, resolution, count,
                          *(layer.ravel() for layer in layers))
    u = x[None, :] * math.cos(angle) + y[:, None] * math.sin(angle)
    v = -x[None, :] * math.sin(angle) + y[:, None] * math.cos(angle)
    columns = np.clip(np.floor((u + extent) / resolution), 0, count - 1).astype(np.int64)
    rows = np.clip(np.floor((extent - v) / resolution), 0, count - 1).astype(np.int64)
    for layer, result in zip(layers, got, strict=True):
        assert result.dtype == layer.dtype
        np.testing.assert_array_equal(result, layer[rows, columns])


def test_tree_crowns_match_a_per_tree_numpy_rasterisation():
    from cvig_engine.synth.city import BUILDING, TREE
    from cvig_engine.synth.loops import plant_crowns

    rng = np.random.default_rng(4)
    size, resolution = 48, 0.5
    half = size * resolution / 2
    height = np.where(rng.random((size, size)) < 0.2, rng.uniform(1, 9, (size, size)), 0.0)
    height = height.astype(np.float32)
    material = np.where(height > 0, BUILDING, 0).astype(np.uint8)
    object_id = np.full((size, size), -1, np.int32)
    count = 25
    x, y = rng.uniform(-half - 2, half + 2, count), rng.uniform(-half - 2, half + 2, count)
    radii, heights = rng.uniform(1.0, 4.0, count), rng.uniform(3.0, 12.0, count)
    expected = [layer.copy() for layer in (height, material, object_id)]
    for ident in range(count):  # later trees win where they are taller, as in the city
        rows, columns = np.meshgrid(np.arange(size), np.arange(size), indexing="ij")
        cell_x = (columns + 0.5) * resolution - half
        cell_y = half - (rows + 0.5) * resolution
        distance2 = ((cell_x - x[ident]) ** 2 + (cell_y - y[ident]) ** 2) / radii[ident] ** 2
        dome = (heights[ident] * (0.35 + 0.65 * np.sqrt(np.clip(1 - distance2, 0, 1))))
        dome = dome.astype(np.float32)
        grow = (distance2 < 1) & (expected[1] != BUILDING) & (dome > expected[0])
        expected[0][grow], expected[1][grow], expected[2][grow] = dome[grow], TREE, ident
    plant_crowns(x, y, radii, heights, resolution, half, height, material, object_id,
                 BUILDING, TREE)
    for got, want in zip((height, material, object_id), expected, strict=True):
        np.testing.assert_array_equal(got, want)
    assert (material == TREE).sum() > 50 and set(np.unique(object_id)) > {-1, 0}


def test_overhead_colours_match_the_numpy_formula():
    from cvig_engine.synth.city import BUILDING, GRASS, ROAD, TREE, VEHICLE
    from cvig_engine.synth.loops import overhead_colours

    rng = np.random.default_rng(5)
    size = 24
    material = rng.integers(0, 8, (size, size)).astype(np.uint8)
    material[5:12, 5:12] = BUILDING  # a roof with an interior and an edge
    object_id = rng.integers(0, 6, (size, size)).astype(np.int32)
    overhead_vehicle = np.where(rng.random((size, size)) < 0.1, rng.integers(0, 3, (size, size)),
                                -1).astype(np.int16)
    texture = rng.uniform(-1, 1, (size, size)).astype(np.float32)
    amplitude = rng.uniform(0, 0.2, 8).astype(np.float32)
    table = rng.uniform(0, 1, (5 + 6 + 6 + 3, 3)).astype(np.float32)
    shadow = rng.random((size, size)) < 0.3
    ratio = np.array([2.0, 1.05, 0.65], np.float32)
    code = np.where(material == VEHICLE, ROAD, material)
    is_tree = code == TREE
    crown_light = rng.uniform(0, 1, int(is_tree.sum())).astype(np.float32)
    image, vegetation = overhead_colours(material, object_id, overhead_vehicle, texture,
                                         amplitude, table, 5, 11, 17, crown_light, shadow, ratio)
    index = code.astype(np.int64)
    index = np.where(code == BUILDING, 5 + object_id, index)
    index = np.where(is_tree, 11 + object_id, index)
    index = np.where((overhead_vehicle >= 0) & (code != BUILDING) & ~is_tree,
                     17 + overhead_vehicle, index)
    factor = 1.0 + amplitude[code] * texture
    building = code == BUILDING
    edge = np.zeros_like(building)
    edge[1:-1, 1:-1] = building[1:-1, 1:-1] & ~(building[:-2, 1:-1] & building[2:, 1:-1]
                                                & building[1:-1, :-2] & building[1:-1, 2:])
    factor[edge] *= 0.78
    factor[is_tree] *= 0.55 + 0.6 * crown_light
    factor[shadow] *= 0.5
    expected = table[index] * factor[..., None]
    green = (code == GRASS) | is_tree
    expected[green] *= ratio
    np.testing.assert_array_equal(vegetation, green)
    np.testing.assert_array_equal(image, expected)
    assert edge.sum() > 0 and building[6:11, 6:11].all() and not edge[6:11, 6:11].any()
