"""Settings of the procedural cross-view world, with validation of user-given values."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields

from cvig_engine.errors import CvigInputError

__all__ = ["SynthSettings"]


@dataclass(frozen=True)
class SynthSettings:
    """Every knob of `cvig-engine synth` (geometry in metres, angles in degrees).

    Image sizes: the overhead tile is ``tile_size`` x ``tile_size`` pixels over ``tile_extent``
    metres (north up); the panorama is ``pano_height`` x ``pano_width`` (360 deg wide, the same
    angular size per pixel vertically, so 128 x 512 spans 90 deg of elevation, horizon in the
    middle). A limited field of view photo is ``pano_height`` x ``int(fov / 360 * pano_width)``.

    Difficulty knobs (``independent_colours``, ``lighting_differs``, ``season_differs``) exist so
    that tests can build a control world where colour alone does match; keep them on for data.
    """

    pairs: int = 1000
    cities: int = 11
    test_cities: int = 1
    seed: int = 0
    fov: float = 360.0
    tile_size: int = 256
    tile_extent: float = 120.0
    pano_height: int = 128
    pano_width: int = 512
    city_size: float = 1000.0
    eye_height: float = 1.7
    view_distance: float = 150.0
    march_steps: int = 96
    geotag_noise: float = 2.0
    unusable_fraction: float = 0.03
    hotspots: int = 3
    hotspot_fraction: float = 0.3
    hotspot_radius: float = 40.0
    occluders: float = 1.0
    sensor_noise: float = 0.02
    blur: float = 0.5
    tilt_jitter: float = 1.5
    masks: bool = True
    independent_colours: bool = True
    lighting_differs: bool = True
    season_differs: bool = True

    @property
    def metres_per_pixel(self) -> float:
        """Ground sampling distance of the tile and of the city raster."""
        return self.tile_extent / self.tile_size

    @property
    def photo_width(self) -> int:
        """Width in pixels of a surface image (the panorama width at 360 deg)."""
        return int(self.fov / 360.0 * self.pano_width)

    @property
    def city_margin(self) -> float:
        """Distance from the city edge that photo locations keep (tile and view stay inside)."""
        return (
            max(self.tile_extent * math.sqrt(0.5), 0.5 * self.view_distance)
            + 4.0 * self.geotag_noise
        )

    def to_dict(self) -> dict:
        """JSON-able copy of the settings."""
        return asdict(self)

    def validate(self) -> "SynthSettings":
        """Raise ``CvigInputError`` naming the first bad setting; return self when all are fine."""
        positive_ints = ("pairs", "cities", "tile_size", "pano_height", "pano_width", "march_steps")
        for name in positive_ints:
            if int(getattr(self, name)) < 1:
                raise CvigInputError(
                    f"--{_option(name)} must be positive, got {getattr(self, name)}"
                )
        positive_floats = (
            "tile_extent",
            "city_size",
            "eye_height",
            "view_distance",
            "hotspot_radius",
        )
        for name in positive_floats:
            value = float(getattr(self, name))
            if not (value > 0.0 and math.isfinite(value)):
                raise CvigInputError(
                    f"--{_option(name)} must be a positive number, got {getattr(self, name)}"
                )
        non_negative = ("geotag_noise", "occluders", "sensor_noise", "blur", "tilt_jitter")
        for name in non_negative:
            value = float(getattr(self, name))
            if not (value >= 0.0 and math.isfinite(value)):
                raise CvigInputError(f"--{_option(name)} must be >= 0, got {getattr(self, name)}")
        for name in ("unusable_fraction", "hotspot_fraction"):
            value = float(getattr(self, name))
            if not 0.0 <= value <= 1.0:
                raise CvigInputError(f"--{_option(name)} must be in [0, 1], got {value}")
        if not (0.0 < float(self.fov) <= 360.0):
            raise CvigInputError(f"--fov must be in (0, 360] degrees, got {self.fov}")
        if self.photo_width < 1:
            raise CvigInputError(
                f"--fov {self.fov} gives a photo less than one pixel wide "
                f"at --pano-width {self.pano_width}"
            )
        if self.hotspots < 0:
            raise CvigInputError(f"--hotspots must be >= 0, got {self.hotspots}")
        if self.seed < 0:
            raise CvigInputError(f"--seed must be >= 0, got {self.seed}")
        # test_cities == cities makes a test-only world (train.csv holds just its header), e.g.
        # a held-out city for the demo.
        if not 1 <= self.test_cities <= self.cities:
            raise CvigInputError(
                f"--test-cities must be between 1 and --cities ({self.cities}), "
                f"got {self.test_cities}"
            )
        if self.pairs < self.cities:
            raise CvigInputError(
                f"--pairs ({self.pairs}) must be at least --cities ({self.cities}): "
                f"every city needs a pair"
            )
        if self.city_size <= 2.0 * self.city_margin:
            raise CvigInputError(
                f"--city-size {self.city_size} m leaves no room for photos: it must exceed twice "
                f"the margin ({2 * self.city_margin:.1f} m from --tile-extent, --view-distance "
                f"and --geotag-noise)"
            )
        if self.eye_height >= 20.0:
            raise CvigInputError(
                f"--eye-height must be below 20 m (a street-level view), got {self.eye_height}"
            )
        return self

    @classmethod
    def names(cls) -> list[str]:
        """Names of all settings."""
        return [field.name for field in fields(cls)]


def _option(name: str) -> str:
    return name.replace("_", "-")
