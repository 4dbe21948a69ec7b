"""Rendering of the two views of a city: street-level panoramas/photos and overhead tiles.

Street view: column ``j`` of a surface image looks at compass azimuth

    heading - fov/2 + j * 360 / pano_width        (degrees clockwise from north),

so a 360 deg panorama with heading 0 has column 0 facing south and runs clockwise (south, west,
north, east), exactly like the polar-transformed tile (cvig_engine.polar). Row ``t`` looks at
elevation ``(pano_height/2 - 0.5 - t) * 360 / pano_width`` degrees: the same angular size per
pixel in both directions, the horizon between the two middle rows.

Each column is marched over a fixed set of geometrically spaced radii. A ray at elevation ``e``
stops at the first sample whose column reaches it, ``(h_k - eye) / r_k >= tan(e)``; with the
running maximum of that ratio monotone along the ray, a column's rows are all resolved in one
sweep down the rows (``loops.street_pixels``). Ground hits are then re-coloured at
the ray's exact ground intersection, facades per pixel (floors, windows, sun and shadow).

Heading convention: a photo whose centre faces compass heading ``h`` with field of view ``fov``
has its left column at ``h - fov/2``, so it lands at orientation bin
``cvig_engine.polar.heading_to_shift(h, fov, W)`` of a W-column aerial feature map, and is the
window of the aligned panorama that starts at column ``heading_to_shift(h, fov, pano_width)``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

from cvig_engine.synth.city import BUILDING, GROUND_NAMES, GRASS, MARKING, ROAD, TREE, VEHICLE, City
from cvig_engine.synth.loops import finish_image, street_pixels
from cvig_engine.synth.settings import SynthSettings
from cvig_engine.synth.style import SEASON_RATIOS, Sun

__all__ = [
    "View",
    "TileConditions",
    "SurfaceConditions",
    "sample_tile_conditions",
    "sample_surface_conditions",
    "render_surface",
    "render_tile",
    "render_closeup",
    "column_azimuths",
]

_SEASONS = tuple(SEASON_RATIOS)
_GLASS = np.array([0.10, 0.13, 0.17], np.float32)


@dataclass
class View:
    """One rendered image (uint8 [H, W, 3]) with its exact building and road masks (bool [H, W])."""

    image: np.ndarray
    building: np.ndarray
    road: np.ndarray


@dataclass
class TileConditions:
    """Acquisition conditions of one overhead tile."""

    season: str
    exposure: float
    tint: np.ndarray
    contrast: float
    noise: float
    blur: float


@dataclass
class SurfaceConditions:
    """Capture conditions of one street-level image: light, season, camera, clutter."""

    sun_index: int
    sun: Sun
    light: np.ndarray
    ambient: np.ndarray
    season: str
    exposure: float
    tint: np.ndarray
    sky_horizon: np.ndarray
    sky_zenith: np.ndarray
    haze_distance: float
    cloud_cover: float
    cloud_shift: int
    pitch: float
    roll: float
    noise: float
    blur: float
    occluders: list = field(default_factory=list)


def sample_tile_conditions(
    rng: np.random.Generator, city: City, settings: SynthSettings
) -> TileConditions:
    """Random acquisition conditions for one overhead tile."""
    season = city.style.overhead_season
    if settings.season_differs and rng.random() < 0.4:
        season = _SEASONS[rng.integers(len(_SEASONS))]
    return TileConditions(
        season=season,
        exposure=float(rng.uniform(0.85, 1.15)),
        tint=(1.0 + rng.uniform(-0.06, 0.06, 3)).astype(np.float32),
        contrast=float(rng.uniform(0.8, 1.0)),
        noise=float(settings.sensor_noise * rng.uniform(0.3, 1.0)),
        blur=float(settings.blur * rng.uniform(0.0, 0.6)),
    )


def sample_surface_conditions(
    rng: np.random.Generator, city: City, settings: SynthSettings, tile: TileConditions
) -> SurfaceConditions:
    """Random capture conditions of a street-level image, independent of the tile's by default."""
    sun_index = int(rng.integers(len(city.style.ground_suns)))
    sun = city.style.ground_suns[sun_index]
    sine = math.sin(math.radians(sun.elevation))
    warm = float(np.clip(1.0 - sun.elevation / 40.0, 0.0, 1.0))  # low sun: warm light, warm sky
    light = np.array([1.0, 0.93 - 0.12 * warm, 0.86 - 0.3 * warm], np.float32) * (
        0.75 + 0.25 * sine
    )
    ambient = np.array([0.30, 0.33, 0.40], np.float32) * (0.75 + 0.25 * sine)
    sky_zenith = np.array([0.30, 0.48, 0.82], np.float32) * rng.uniform(0.8, 1.1)
    sky_horizon = (
        np.array([0.78, 0.84, 0.92], np.float32) * (1.0 - warm)
        + np.array([0.95, 0.72, 0.50], np.float32) * warm
    )
    overcast = rng.random() < 0.2
    if overcast:
        grey = rng.uniform(0.6, 0.85)
        sky_zenith = sky_horizon = np.full(3, grey, np.float32)
        light = light * 0.35
        ambient = ambient * 1.6
    if settings.lighting_differs:
        exposure = float(rng.uniform(0.75, 1.3))
        tint = (1.0 + rng.uniform(-0.1, 0.1, 3)).astype(np.float32)
    else:
        exposure, tint = tile.exposure, tile.tint
    season = _SEASONS[rng.integers(len(_SEASONS))] if settings.season_differs else tile.season
    count = rng.poisson(settings.occluders)
    occluders = [_sample_occluder(rng, settings) for _ in range(count)]
    return SurfaceConditions(
        sun_index=sun_index,
        sun=sun,
        light=light,
        ambient=ambient,
        season=season,
        exposure=exposure,
        tint=tint,
        sky_horizon=sky_horizon.astype(np.float32),
        sky_zenith=sky_zenith.astype(np.float32),
        haze_distance=float(rng.uniform(250.0, 900.0)),
        cloud_cover=float(0.0 if overcast else rng.uniform(0, 0.8)),
        cloud_shift=int(rng.integers(1 << 20)),
        pitch=float(rng.normal(0.0, settings.tilt_jitter)),
        roll=float(rng.normal(0.0, settings.tilt_jitter)),
        noise=float(settings.sensor_noise * rng.uniform(0.5, 1.5)),
        blur=float(settings.blur * rng.uniform(0.0, 1.0)),
        occluders=occluders,
    )


def _sample_occluder(rng, settings):
    """A person, pole or passing vehicle close to the camera: (relative azimuth, size, colour)."""
    kind = rng.choice(["person", "pole", "vehicle"], p=[0.5, 0.25, 0.25])
    if kind == "person":
        distance, width, top = rng.uniform(1.5, 8.0), 0.5, rng.uniform(1.5, 1.9)
        colour = rng.uniform(0.05, 0.6, 3)
    elif kind == "pole":
        distance, width, top = rng.uniform(1.5, 10.0), 0.2, rng.uniform(3.5, 8.0)
        colour = np.full(3, rng.uniform(0.2, 0.5))
    else:
        distance, width, top = rng.uniform(2.5, 7.0), rng.uniform(3.8, 5.0), 1.5
        colour = rng.uniform(0.05, 0.9, 3)
    # Relative position inside the field of view (fraction of it), drawn now for determinism.
    return {
        "position": float(rng.random()),
        "distance": float(distance),
        "width": float(width),
        "top": float(top),
        "colour": np.asarray(colour, np.float32),
    }


# -- geometry shared by all images of one size --------------------------------------------------

_GEOMETRY_CACHE: dict = {}


def _geometry(settings: SynthSettings):
    key = (settings.pano_height, settings.pano_width, settings.view_distance, settings.march_steps)
    if key not in _GEOMETRY_CACHE:
        step = 2.0 * math.pi / settings.pano_width
        rows = np.arange(settings.pano_height)
        elevation = (settings.pano_height / 2.0 - 0.5 - rows) * step
        near = min(0.4, settings.view_distance / 10.0)
        radii = np.geomspace(near, settings.view_distance, settings.march_steps).astype(np.float32)
        clouds = _cloud_bank(settings.pano_height, settings.pano_width)
        _GEOMETRY_CACHE[key] = (step, elevation, radii, clouds)
    return _GEOMETRY_CACHE[key]


def _cloud_bank(height, width):
    """A fixed wrap-around cloud texture (0..1) in panorama coordinates."""
    rng = np.random.default_rng(12345)
    coarse = rng.random((max(height // 8, 2), max(width // 16, 2)))
    texture = np.repeat(np.repeat(coarse, 8, axis=0), 16, axis=1)[:height, :width]
    texture = np.pad(
        texture, ((0, height - texture.shape[0]), (0, width - texture.shape[1])), mode="edge"
    )
    for _ in range(3):  # cheap smoothing, circular across the width
        texture = (
            texture
            + np.roll(texture, 5, axis=1)
            + np.roll(texture, -5, axis=1)
            + np.roll(texture, 2, axis=0)
            + np.roll(texture, -2, axis=0)
        ) / 5.0
    return np.clip((texture - 0.45) * 4.0, 0.0, 1.0).astype(np.float32)


def column_azimuths(settings: SynthSettings, heading: float, fov: float) -> np.ndarray:
    """Compass azimuth (degrees) of each column of a surface image facing ``heading``."""
    width = int(fov / 360.0 * settings.pano_width)
    return heading - fov / 2.0 + np.arange(width) * (360.0 / settings.pano_width)


def _street_table(city: City, season: str) -> np.ndarray:
    style = city.style
    ratio = SEASON_RATIOS[season]
    ground = np.stack([style.ground_colours[name] for name in GROUND_NAMES]).astype(np.float32)
    ground[GRASS] *= ratio
    facades = style.palette[city.building_facade].reshape(-1, 3)
    crowns = style.foliage[None, :] * ratio[None, :] * city.tree_shade[:, None]
    return np.concatenate([ground, facades, crowns, city.vehicle_colours]).astype(np.float32)


def render_surface(city: City, x: float, y: float, heading: float, fov: float,
                   conditions: SurfaceConditions, rng: np.random.Generator) -> View:
    """Street-level image from eye height at world (x, y), centred on compass ``heading``."""
    settings = city.settings
    step, elevation, radii, clouds = _geometry(settings)
    azimuth_deg = column_azimuths(settings, heading, fov)
    azimuth = np.radians(azimuth_deg)
    # Camera tilt: pitch at the centre column, roll across the view.
    relative = azimuth - math.radians(heading)
    tilt = (math.radians(conditions.pitch) * np.cos(relative)
            + math.radians(conditions.roll) * np.sin(relative))
    sun = conditions.sun
    sun_east, sun_north = sun.horizontal_direction()
    cloud_columns = np.rint(np.mod(azimuth_deg, 360.0) / 360.0 * settings.pano_width)
    cloud_columns = np.mod(cloud_columns.astype(np.int64) + conditions.cloud_shift,
                           settings.pano_width)
    haze = (0.6 * conditions.sky_horizon + 0.4 * np.float32(0.55)).astype(np.float32)
    image, building, road, distance = street_pixels(
        float(x), float(y), float(settings.eye_height), np.sin(azimuth), np.cos(azimuth), tilt,
        elevation, radii,
        city.height.ravel(), city.material.ravel(), city.street_colour_index.ravel(),
        city.texture.ravel(), city.ground_shadow_heights[conditions.sun_index].ravel(),
        city.road.ravel(), city.object_id.ravel(),
        float(city.half), float(city.resolution), city.size_px,
        city.building_rects, city.building_window_spacing, float(city.style.floor_height),
        math.cos(city.angle), math.sin(city.angle),
        _street_table(city, conditions.season), conditions.ambient, conditions.light,
        math.sin(math.radians(sun.elevation)), float(sun_east), float(sun_north),
        0.9 * math.cos(math.radians(sun.elevation)),
        haze, float(conditions.haze_distance), _GLASS + 0.35 * conditions.sky_horizon,
        conditions.sky_horizon, conditions.sky_zenith,
        (settings.pano_height / 2.0) * step, clouds, cloud_columns,
        float(conditions.cloud_cover),
        np.float32(0.95) * (conditions.ambient + conditions.light).clip(0.0, 1.1),
    )
    if conditions.occluders:
        elevation_grid = elevation[:, None] + tilt[None, :]
        _draw_occluders(image, building, road, distance, conditions, azimuth_deg, elevation_grid,
                        heading, fov, settings.eye_height)
    image = _finish(image, conditions.exposure, conditions.tint, conditions.blur, conditions.noise,
                    rng, wrap=fov >= 360.0)
    return View(image, building, road)


def _draw_occluders(image, building, road, distance, conditions, azimuth_deg, elevation, heading,
                    fov, eye):
    """People, poles and passing vehicles near the camera, in front of whatever they hide."""
    for occluder in conditions.occluders:
        centre = heading - fov / 2.0 + occluder["position"] * fov
        half_angle = math.degrees(math.atan(occluder["width"] / 2.0 / occluder["distance"]))
        offset = np.mod(azimuth_deg - centre + 180.0, 360.0) - 180.0
        columns = np.abs(offset) <= half_angle
        if not columns.any():
            continue
        low = math.atan(-eye / occluder["distance"])
        high = math.atan((occluder["top"] - eye) / occluder["distance"])
        covered = ((elevation >= low) & (elevation <= high) & columns[None, :]
                   & (distance > occluder["distance"]))
        shade = np.float32(0.9) * (conditions.ambient + 0.6 * conditions.light)
        image[covered] = occluder["colour"] * shade
        building[covered] = False
        road[covered] = False


_NOISE_BANK: list = []


def _noise(rng, shape):
    """Standard normal noise: a random window of a fixed bank (much faster than fresh draws)."""
    if not _NOISE_BANK:
        _NOISE_BANK.append(np.random.default_rng(2024).standard_normal(1 << 22, dtype=np.float32))
    bank = _NOISE_BANK[0]
    count = int(np.prod(shape))
    if count > len(bank) // 2:
        return rng.standard_normal(shape, dtype=np.float32)
    start = int(rng.integers(len(bank) - count))
    return bank[start : start + count].reshape(shape)


def _finish(image, exposure, tint, blur, noise, rng, wrap):
    """Exposure and tint, blur, sensor noise, 8-bit quantisation of a linear float image."""
    gain = (np.float32(exposure * 255.0) * tint).astype(np.float32)
    sensor = _noise(rng, image.shape) if noise > 0.0 else np.zeros((0, 0, 3), np.float32)
    return finish_image(np.ascontiguousarray(image, np.float32), gain, float(blur), sensor,
                        float(noise * 255.0), bool(wrap))


def render_tile(
    city: City, row: int, column: int, conditions: TileConditions, rng: np.random.Generator
) -> View:
    """Overhead tile (north up) centred on raster pixel (row, column), at tile pixel S/2."""
    size = city.settings.tile_size
    top, left = row - size // 2, column - size // 2
    if top >= 0 and left >= 0 and top + size <= city.size_px and left + size <= city.size_px:
        window = (slice(top, top + size), slice(left, left + size))
    else:  # near the raster edge: repeat the border
        window = np.ix_(
            np.clip(np.arange(top, top + size), 0, city.size_px - 1),
            np.clip(np.arange(left, left + size), 0, city.size_px - 1),
        )
    image = city.overhead_image[window] * np.float32(conditions.contrast)
    image += np.float32((1.0 - conditions.contrast) * 0.6)
    if conditions.season != city.style.overhead_season:
        vegetation = city.vegetation[window]
        image[vegetation] *= (
            SEASON_RATIOS[conditions.season] / SEASON_RATIOS[city.style.overhead_season]
        )
    building = city.material[window] == BUILDING
    road = np.array(city.road[window])
    image = _finish(
        image,
        conditions.exposure,
        conditions.tint,
        conditions.blur,
        conditions.noise,
        rng,
        wrap=False,
    )
    return View(image, building, road)


def render_closeup(
    city: City,
    x: float,
    y: float,
    kind: str,
    fov: float,
    conditions: SurfaceConditions,
    rng: np.random.Generator,
) -> View:
    """An unusable photo: a wall (``kind='wall'``) or the ground (``'ground'``) at close range."""
    settings = city.settings
    height, width = settings.pano_height, int(fov / 360.0 * settings.pano_width)
    rows = np.arange(height, dtype=np.float32)[:, None]
    columns = np.arange(width, dtype=np.float32)[None, :]
    light = conditions.ambient + 0.6 * conditions.light
    if kind == "wall":
        palette = city.style.palette
        base = palette[rng.integers(len(palette))]
        course = rng.uniform(0.05, 0.12) * height
        length = course * rng.uniform(2.0, 3.0)
        phase = rng.uniform(0.0, course)
        brick_row = np.floor((rows + phase) / course)
        along = columns + np.mod(brick_row, 2.0) * length / 2.0
        mortar = (np.mod(rows + phase, course) < 0.15 * course) | (
            np.mod(along, length) < 0.08 * length
        )
        brick_id = (brick_row * 7919 + np.floor(along / length)).astype(np.int64)
        jitter = (
            np.random.default_rng(int(rng.integers(1 << 31)))
            .uniform(0.85, 1.15, 4096)
            .astype(np.float32)
        )
        shade = jitter[np.mod(brick_id, 4096)]
        image = np.where(mortar[..., None], np.float32(0.75), base * shade[..., None])
        ramp = 0.85 + 0.3 * columns / max(width - 1, 1)
        image = image * (light * ramp[..., None])
        building = np.ones((height, width), bool)
        road = np.zeros((height, width), bool)
    else:
        row, column = city.to_pixel(x, y)
        material = int(city.material[row, column])
        code = material if material <= MARKING else GRASS
        table = _street_table(city, conditions.season)
        base = table[ROAD if code == MARKING else code]
        coarse = rng.standard_normal((max(height // 6, 2), max(width // 6, 2))).astype(np.float32)
        grain = np.repeat(np.repeat(coarse, 6, axis=0), 6, axis=1)
        grain = np.pad(
            grain,
            ((0, max(height - grain.shape[0], 0)), (0, max(width - grain.shape[1], 0))),
            mode="edge",
        )[:height, :width]
        fine = rng.standard_normal((height, width)).astype(np.float32)
        texture = 1.0 + 0.12 * grain + 0.1 * fine
        ramp = 0.8 + 0.3 * rows / max(height - 1, 1)  # nearer (lower rows) is brighter
        image = base * texture[..., None] * (light * ramp[..., None])
        building = np.zeros((height, width), bool)
        road = np.full((height, width), bool(city.road[row, column]))
    image = _finish(
        image.astype(np.float32),
        conditions.exposure,
        conditions.tint,
        conditions.blur,
        conditions.noise,
        rng,
        wrap=False,
    )
    return View(image, building, road)
