"""Per-city style: palette, density, heights, road angles, vegetation, location, suns.

Cities differ the way WITW's eleven cities do: each draws its own palette of building colours
(roofs and facades are drawn independently from it), its own road grid angle and block sizes,
its own building heights, tree density and ground colours.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

__all__ = ["CityStyle", "Sun", "sample_style", "SEASON_RATIOS", "BUILDING_MATERIALS"]

# Building materials (linear RGB in 0..1) that a city palette is drawn from.
BUILDING_MATERIALS = np.array(
    [
        [0.62, 0.60, 0.57],  # concrete
        [0.55, 0.27, 0.20],  # brick
        [0.78, 0.70, 0.52],  # sandstone
        [0.86, 0.85, 0.82],  # white plaster
        [0.70, 0.42, 0.28],  # terracotta
        [0.30, 0.36, 0.42],  # dark glass / slate
        [0.45, 0.40, 0.36],  # brown stone
        [0.80, 0.74, 0.62],  # cream
        [0.40, 0.45, 0.40],  # green-grey metal
        [0.68, 0.55, 0.58],  # pink render
        [0.25, 0.25, 0.27],  # tar / dark metal
        [0.58, 0.64, 0.72],  # blue-grey panels
    ],
    dtype=np.float32,
)

# Vegetation colour multipliers per season (applied to summer green).
SEASON_RATIOS = {
    "summer": np.array([1.0, 1.0, 1.0], dtype=np.float32),
    "spring": np.array([1.15, 1.15, 0.95], dtype=np.float32),
    "autumn": np.array([2.0, 1.05, 0.65], dtype=np.float32),
    "dry": np.array([2.1, 1.35, 1.3], dtype=np.float32),
    "winter": np.array([1.7, 0.95, 1.45], dtype=np.float32),
}

_CITY_SYLLABLES = [
    "ka",
    "lo",
    "mer",
    "va",
    "sun",
    "dor",
    "ti",
    "an",
    "bel",
    "ro",
    "zen",
    "qua",
    "mi",
    "tor",
    "el",
    "sa",
    "nor",
    "vi",
    "ham",
    "lu",
]


@dataclass(frozen=True)
class Sun:
    """A sun position: compass azimuth (deg, toward the sun) and elevation (deg)."""

    azimuth: float
    elevation: float

    def horizontal_direction(self) -> np.ndarray:
        """Unit (east, north) vector toward the sun."""
        radians = math.radians(self.azimuth)
        return np.array([math.sin(radians), math.cos(radians)])


@dataclass
class CityStyle:
    """Everything random about one city except the layout itself."""

    name: str
    index: int
    origin_lat: float
    origin_lon: float
    road_angle: float  # degrees, counterclockwise from east, of the grid's first axis
    block_size: tuple[float, float]  # mean spacing of roads along each grid axis (m)
    road_width: tuple[float, float]  # minor, major carriageway width (m)
    major_every: int  # every n-th road is major
    sidewalk_width: float
    avenue_angle: float | None  # a diagonal avenue, degrees from the grid axis, or None
    building_density: float  # chance a lot holds a building
    lot_width: tuple[float, float]
    setback: tuple[float, float]
    height_median: float
    height_sigma: float
    downtown_boost: float  # height multiplier at the city centre
    park_fraction: float
    plaza_fraction: float
    empty_fraction: float
    yard_grass: float  # chance a built lot's yard is grass rather than pavement
    street_tree_spacing: float | None
    park_tree_density: float  # trees per 100 m^2 of park
    tree_height: tuple[float, float]
    crown_radius: tuple[float, float]
    vehicle_density: float  # vehicles per 100 m of lane
    palette: np.ndarray  # [K, 3] building colours
    ground_colours: dict = field(default_factory=dict)  # material name -> RGB
    foliage: np.ndarray = None
    overhead_sun: Sun = None
    ground_suns: tuple = ()
    overhead_season: str = "summer"
    floor_height: float = 3.2


def _city_name(rng: np.random.Generator, index: int) -> str:
    syllables = rng.choice(_CITY_SYLLABLES, size=int(rng.integers(2, 4)))
    return f"{''.join(syllables).capitalize()}-{index:02d}"


def _jitter_colour(rng, colour, amount):
    return np.clip(
        np.asarray(colour, dtype=np.float32) * rng.uniform(1 - amount, 1 + amount, 3), 0.02, 0.98
    )


def sample_style(rng: np.random.Generator, index: int) -> CityStyle:
    """Draw a city style from ``rng`` (the same generator state gives the same style)."""
    palette_size = int(rng.integers(4, 7))
    chosen = rng.choice(len(BUILDING_MATERIALS), size=palette_size, replace=False)
    palette = np.stack([_jitter_colour(rng, BUILDING_MATERIALS[i], 0.12) for i in chosen]).astype(
        np.float32
    )
    grass = _jitter_colour(rng, [0.30, 0.45, 0.20], 0.15)
    ground_colours = {
        "grass": grass,
        "pavement": _jitter_colour(rng, [0.66, 0.64, 0.60], 0.1),
        "soil": _jitter_colour(rng, [0.50, 0.40, 0.29], 0.12),
        "road": _jitter_colour(rng, [0.28, 0.28, 0.29], 0.15),
        "marking": (
            np.array([0.92, 0.92, 0.88], dtype=np.float32)
            if rng.random() < 0.6
            else np.array([0.90, 0.78, 0.25], dtype=np.float32)
        ),
    }
    foliage = _jitter_colour(rng, [0.20, 0.36, 0.14], 0.15)
    block_mean = rng.uniform(50.0, 130.0)
    seasons = list(SEASON_RATIOS)
    return CityStyle(
        name=_city_name(rng, index),
        index=index,
        origin_lat=float(rng.uniform(-45.0, 60.0)),
        origin_lon=float(rng.uniform(-170.0, 170.0)),
        road_angle=float(rng.uniform(0.0, 90.0)),
        block_size=(block_mean * rng.uniform(0.7, 1.3), block_mean * rng.uniform(0.7, 1.3)),
        road_width=(float(rng.uniform(6.0, 10.0)), float(rng.uniform(12.0, 20.0))),
        major_every=int(rng.integers(3, 6)),
        sidewalk_width=float(rng.uniform(1.5, 3.5)),
        avenue_angle=float(rng.uniform(20.0, 70.0)) if rng.random() < 0.5 else None,
        building_density=float(rng.uniform(0.55, 0.95)),
        lot_width=(float(rng.uniform(8.0, 14.0)), float(rng.uniform(18.0, 35.0))),
        setback=(0.0, float(rng.uniform(0.5, 6.0))),
        height_median=float(np.exp(rng.uniform(np.log(5.0), np.log(25.0)))),
        height_sigma=float(rng.uniform(0.25, 0.6)),
        downtown_boost=float(rng.uniform(1.0, 2.5)),
        park_fraction=float(rng.uniform(0.03, 0.2)),
        plaza_fraction=float(rng.uniform(0.0, 0.08)),
        empty_fraction=float(rng.uniform(0.0, 0.08)),
        yard_grass=float(rng.uniform(0.1, 0.9)),
        street_tree_spacing=float(rng.uniform(8.0, 25.0)) if rng.random() < 0.75 else None,
        park_tree_density=float(rng.uniform(0.3, 1.5)),
        tree_height=(float(rng.uniform(4.0, 7.0)), float(rng.uniform(9.0, 16.0))),
        crown_radius=(float(rng.uniform(1.5, 2.5)), float(rng.uniform(3.0, 5.5))),
        vehicle_density=float(rng.uniform(0.5, 3.0)),
        palette=palette,
        ground_colours=ground_colours,
        foliage=foliage,
        overhead_sun=Sun(float(rng.uniform(0.0, 360.0)), float(rng.uniform(35.0, 70.0))),
        ground_suns=tuple(
            Sun(float(rng.uniform(0.0, 360.0)), float(rng.uniform(12.0, 65.0))) for _ in range(3)
        ),
        overhead_season=str(rng.choice(seasons[:3])),
        floor_height=float(rng.uniform(2.8, 4.0)),
    )
