"""A city as a 2.5-D raster map: ground cover, roads, buildings with heights, trees, vehicles.

World coordinates are metres, x east and y north, with the origin at the city centre. Raster
pixel (row i, column j) has its centre at

    x = (j + 0.5) * resolution - half,   y = half - (i + 0.5) * resolution,

so row 0 is the northern edge (north up, as in the overhead tiles). The raster resolution is
the overhead tile's ground sampling distance, so a tile is an integer crop of the city image.

The road grid, blocks and buildings are laid out in the city's own rotated frame
(u along the grid's first axis, v across it) and resampled into the north-up world raster.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from cvig_engine.synth.loops import (overhead_colours, plant_crowns, resample_layers,
                                     shadow_sweep)
from cvig_engine.synth.settings import SynthSettings
from cvig_engine.synth.style import SEASON_RATIOS, CityStyle, Sun

__all__ = [
    "City",
    "generate_city",
    "shadow_heights",
    "GRASS",
    "PAVEMENT",
    "SOIL",
    "ROAD",
    "MARKING",
    "BUILDING",
    "TREE",
    "VEHICLE",
    "VEHICLE_COLOURS",
]

# Material codes of the material layer.
GRASS, PAVEMENT, SOIL, ROAD, MARKING, BUILDING, TREE, VEHICLE = range(8)
GROUND_NAMES = ("grass", "pavement", "soil", "road", "marking")
VEHICLE_HEIGHT = 1.5

VEHICLE_COLOURS = np.array(
    [
        [0.90, 0.90, 0.90],
        [0.08, 0.08, 0.09],
        [0.62, 0.63, 0.66],
        [0.55, 0.08, 0.07],
        [0.10, 0.20, 0.45],
        [0.35, 0.36, 0.38],
        [0.80, 0.70, 0.20],
        [0.15, 0.35, 0.20],
    ],
    dtype=np.float32,
)

# How strongly the per-cell texture noise modulates each material's colour.
_TEXTURE_AMPLITUDE = np.array([0.18, 0.07, 0.15, 0.08, 0.05, 0.04, 0.22, 0.03], dtype=np.float32)


@dataclass
class _Buildings:
    """Per-building attributes (index = object id of the building's cells)."""

    rects: list  # (u0, u1, v0, v1) in the city frame
    heights: list
    roof: list  # palette index
    facade: list  # palette index
    window_spacing: list

    def arrays(self):
        rects = np.array(self.rects, dtype=np.float32).reshape(-1, 4)
        return (
            rects,
            np.array(self.heights, dtype=np.float32),
            np.array(self.roof, dtype=np.int64),
            np.array(self.facade, dtype=np.int64),
            np.array(self.window_spacing, dtype=np.float32),
        )


class City:
    """Raster layers of one city plus per-object attribute tables.

    Layers ([N, N], north up): ``height`` (m, as seen from the street: buildings, trees, parked
    vehicles), ``material`` (uint8 codes above), ``object_id`` (index into the building, tree or
    vehicle table of the cell's material, -1 for ground), ``road`` (road surface, also under
    trees and vehicles), ``texture`` (noise in about [-1, 1]). ``finish()`` adds the shadow
    height maps and the overhead colour image.
    """

    def __init__(
        self, style: CityStyle, settings: SynthSettings, size_px: int, angle_deg: float = 0.0
    ):
        self.style = style
        self.settings = settings
        self.size_px = int(size_px)
        self.resolution = settings.metres_per_pixel
        self.half = self.size_px * self.resolution / 2.0
        self.angle = math.radians(angle_deg)
        shape = (self.size_px, self.size_px)
        self.height = np.zeros(shape, np.float32)
        self.material = np.full(shape, GRASS, np.uint8)
        self.object_id = np.full(shape, -1, np.int32)
        self.road = np.zeros(shape, bool)
        self.texture = np.zeros(shape, np.float32)
        self.overhead_vehicle = np.full(
            shape, -1, np.int16
        )  # vehicles present at the overhead's time
        self.building_rects = np.zeros((0, 4), np.float32)
        self.building_heights = np.zeros(0, np.float32)
        self.building_roof = np.zeros(0, np.int64)
        self.building_facade = np.zeros(0, np.int64)
        self.building_window_spacing = np.zeros(0, np.float32)
        self.tree_shade = np.zeros(0, np.float32)
        self.vehicle_colours = np.zeros((0, 3), np.float32)
        self.overhead_vehicle_colours = np.zeros((0, 3), np.float32)
        self.ground_shadow_heights: list[np.ndarray] = []
        self.overhead_image: np.ndarray | None = None
        self.vegetation: np.ndarray | None = None
        self.street_colour_index: np.ndarray | None = None

    # -- coordinates --------------------------------------------------------------------------
    def to_pixel(self, x, y):
        """Raster (row, column) integer indices of world points, clipped to the raster."""
        column = np.floor((np.asarray(x) + self.half) / self.resolution).astype(np.int64)
        row = np.floor((self.half - np.asarray(y)) / self.resolution).astype(np.int64)
        last = self.size_px - 1
        return np.clip(row, 0, last), np.clip(column, 0, last)

    def pixel_centre(self, row, column):
        """World (x, y) of a raster pixel's centre."""
        x = (np.asarray(column) + 0.5) * self.resolution - self.half
        y = self.half - (np.asarray(row) + 0.5) * self.resolution
        return x, y

    def to_city_frame(self, x, y):
        """World (x, y) -> the rotated city frame (u, v)."""
        cos_a, sin_a = math.cos(self.angle), math.sin(self.angle)
        return x * cos_a + y * sin_a, -x * sin_a + y * cos_a

    def from_city_frame(self, u, v):
        """Rotated city frame (u, v) -> world (x, y)."""
        cos_a, sin_a = math.cos(self.angle), math.sin(self.angle)
        return u * cos_a - v * sin_a, u * sin_a + v * cos_a

    def to_latlon(self, x, y):
        """World metres -> (lat, lon) degrees around the city's origin (local equirectangular)."""
        lat = self.style.origin_lat + np.asarray(y) / 111_320.0
        lon = self.style.origin_lon + np.asarray(x) / (
            111_320.0 * math.cos(math.radians(self.style.origin_lat))
        )
        return lat, lon

    # -- building blocks for hand-made worlds (tests, demos) ------------------------------------
    def add_box(
        self,
        x: float,
        y: float,
        width: float,
        depth: float,
        height: float,
        roof: int = 0,
        facade: int = 0,
    ) -> int:
        """Add an axis-aligned (in the city frame) building centred at world (x, y); return its id.

        ``width`` runs along the city frame's u axis, ``depth`` along v.
        """
        u, v = self.to_city_frame(x, y)
        rect = (u - width / 2.0, u + width / 2.0, v - depth / 2.0, v + depth / 2.0)
        ident = len(self.building_heights)
        self.building_rects = np.vstack([self.building_rects, np.array(rect, np.float32)[None]])
        self.building_heights = np.append(self.building_heights, np.float32(height))
        self.building_roof = np.append(self.building_roof, roof)
        self.building_facade = np.append(self.building_facade, facade)
        self.building_window_spacing = np.append(self.building_window_spacing, np.float32(3.0))
        rows, columns = np.mgrid[0 : self.size_px, 0 : self.size_px]
        cell_u, cell_v = self.to_city_frame(*self.pixel_centre(rows, columns))
        inside = (cell_u >= rect[0]) & (cell_u < rect[1]) & (cell_v >= rect[2]) & (cell_v < rect[3])
        self.height[inside] = height
        self.material[inside] = BUILDING
        self.object_id[inside] = ident
        return ident

    # -- derived layers -------------------------------------------------------------------------
    def finish(self) -> "City":
        """Compute shadow height maps (overhead and street suns) and the overhead colour image."""
        street_suns = self.style.ground_suns
        self.ground_shadow_heights = [
            shadow_heights(self.height, self.resolution, sun) for sun in street_suns
        ]
        self.overhead_image, self.vegetation = self._overhead_image()
        # Street-view colour index: ground materials, then facades, crowns, vehicles by object id.
        buildings, trees = len(self.building_heights), len(self.tree_shade)
        index = self.material.astype(np.int32)
        index = np.where(self.material == BUILDING, len(GROUND_NAMES) + self.object_id, index)
        index = np.where(
            self.material == TREE, len(GROUND_NAMES) + buildings + self.object_id, index
        )
        self.street_colour_index = np.where(
            self.material == VEHICLE, len(GROUND_NAMES) + buildings + trees + self.object_id, index
        )
        return self

    def _overhead_image(self):
        style = self.style
        overhead_material = np.where(self.material == VEHICLE, ROAD, self.material).astype(np.uint8)
        overhead_height = np.where(self.material == VEHICLE, np.float32(0.0), self.height)
        is_tree = overhead_material == TREE
        # One colour table (ground materials, roofs, crowns, overhead-time vehicles) and one gather.
        ground_table = np.stack([style.ground_colours[name] for name in GROUND_NAMES]).astype(
            np.float32
        )
        roofs = style.palette[self.building_roof].reshape(-1, 3)
        crowns = style.foliage[None, :] * self.tree_shade[:, None]
        table = np.concatenate([ground_table, roofs, crowns, self.overhead_vehicle_colours]).astype(
            np.float32
        )
        roof_start = len(ground_table)
        crown_start = roof_start + len(roofs)
        vehicle_start = crown_start + len(crowns)
        sun = style.overhead_sun
        crown_light = (_crown_lambert(overhead_height, self.resolution, sun, is_tree)
                       if is_tree.any() else np.zeros(0, np.float32))
        shadow = shadow_heights(overhead_height, self.resolution, sun) > overhead_height + 0.3
        image, vegetation = overhead_colours(
            self.material, self.object_id, self.overhead_vehicle, self.texture, _TEXTURE_AMPLITUDE,
            table, roof_start, crown_start, vehicle_start, crown_light, shadow,
            SEASON_RATIOS[style.overhead_season])
        return image, vegetation


def _crown_lambert(height, resolution, sun, cells):
    """Lambert term (0..1) of the sun on tree crowns, from the height map's gradient at cells."""
    rows, columns = np.nonzero(cells)
    last = height.shape[0] - 1
    # Central differences; x east = +columns, y north = -rows.
    slope_east = (
        height[rows, np.minimum(columns + 1, last)] - height[rows, np.maximum(columns - 1, 0)]
    ) / (2.0 * resolution)
    slope_north = (
        height[np.maximum(rows - 1, 0), columns] - height[np.minimum(rows + 1, last), columns]
    ) / (2.0 * resolution)
    east, north = sun.horizontal_direction() * math.cos(math.radians(sun.elevation))
    up = math.sin(math.radians(sun.elevation))
    lambert = (-slope_east * east - slope_north * north + up) / np.sqrt(
        slope_east**2 + slope_north**2 + 1.0
    )
    return np.clip(lambert, 0.0, 1.0).astype(np.float32)


def shadow_heights(height: np.ndarray, resolution: float, sun: Sun) -> np.ndarray:
    """Height below which each cell's vertical line is in shadow for ``sun`` (>= the cell's height).

    Sweeps rows (or columns) from the sun's side: S(p) = max(H(p), S(p + step toward sun) - drop),
    following a Bresenham line so that shadow edges stay sharp.
    """
    radians = math.radians(sun.azimuth)
    d_row, d_col = -math.cos(radians), math.sin(radians)  # toward the sun in raster steps
    tan_elevation = math.tan(math.radians(max(sun.elevation, 1.0)))
    transpose = abs(d_col) > abs(d_row)  # sweep columns rather than rows
    major, minor = (d_col, d_row) if transpose else (d_row, d_col)
    flip = major > 0  # sweep from the last row (column) back
    lateral = minor / abs(major)
    drop = np.float32(resolution * math.sqrt(1.0 + lateral * lateral) * tan_elevation)
    length = height.shape[1] if transpose else height.shape[0]
    offsets = np.rint(np.arange(length) * lateral).astype(np.int64)
    return shadow_sweep(np.ascontiguousarray(height, np.float32), transpose, flip, offsets, drop)


# -- procedural generation -----------------------------------------------------------------------


def _road_lines(rng, extent, spacing, widths, major_every):
    """Centre positions and widths of parallel roads covering [-extent, extent]."""
    positions, road_widths = [], []
    position = -extent + rng.uniform(0.0, spacing)
    count = 0
    while position < extent:
        positions.append(position)
        road_widths.append(widths[1] if count % major_every == 0 else widths[0])
        position += spacing * rng.uniform(0.7, 1.3)
        count += 1
    return np.array(positions), np.array(road_widths)


def _band_slice(coordinate_min, resolution, low, high, count):
    """Index range of the local cells whose centres lie in [low, high) along an increasing axis."""
    start = int(math.ceil((low - coordinate_min) / resolution - 0.5))
    stop = int(math.ceil((high - coordinate_min) / resolution - 0.5))
    return slice(max(start, 0), min(max(stop, 0), count))


class _LocalFrame:
    """An axis-aligned raster in the city's rotated frame (row index grows with -v)."""

    def __init__(self, extent, resolution):
        self.extent = extent
        self.resolution = resolution
        self.count = int(math.ceil(2.0 * extent / resolution))
        shape = (self.count, self.count)
        self.material = np.full(shape, GRASS, np.uint8)
        self.height = np.zeros(shape, np.float32)
        self.object_id = np.full(shape, -1, np.int32)
        self.road = np.zeros(shape, bool)
        self.overhead_vehicle = np.full(shape, -1, np.int16)

    def u_slice(self, low, high):
        return _band_slice(-self.extent, self.resolution, low, high, self.count)

    def v_slice(self, low, high):
        # Rows run from v = +extent downward: row p has v = extent - (p + 0.5) res.
        return _band_slice(-self.extent, self.resolution, -high, -low, self.count)

    def rect(self, u0, u1, v0, v1):
        return self.v_slice(v0, v1), self.u_slice(u0, u1)


def generate_city(style: CityStyle, settings: SynthSettings, rng: np.random.Generator) -> City:
    """Lay out a city from its style (roads, blocks, buildings, trees, vehicles) and finish it."""
    resolution = settings.metres_per_pixel
    size_px = int(math.ceil(settings.city_size / resolution))
    city = City(style, settings, size_px, angle_deg=style.road_angle)
    extent = city.half * math.sqrt(2.0) + resolution
    frame = _LocalFrame(extent, resolution)
    sidewalk = style.sidewalk_width
    u_roads = _road_lines(rng, extent, style.block_size[0], style.road_width, style.major_every)
    v_roads = _road_lines(rng, extent, style.block_size[1], style.road_width, style.major_every)
    buildings = _Buildings([], [], [], [], [])
    block_edges_u = _block_intervals(*u_roads, sidewalk, extent)
    block_edges_v = _block_intervals(*v_roads, sidewalk, extent)
    park_trees = []
    for u0, u1 in block_edges_u:
        for v0, v1 in block_edges_v:
            _fill_block(
                frame, rng, style, settings, (u0, u1, v0, v1), buildings, park_trees, city.half
            )
    # Sidewalks, then carriageways, then centre markings, over the blocks.
    for positions, widths, along_u in (
        (u_roads[0], u_roads[1], False),
        (v_roads[0], v_roads[1], True),
    ):
        for centre, width in zip(positions, widths):
            _paint_road(frame, centre, width, sidewalk, along_u)
    if style.avenue_angle is not None:
        _paint_avenue(frame, rng, style, sidewalk)
    vehicle_colours, overhead_colours = _place_vehicles(
        frame, rng, style, u_roads, v_roads, city.half
    )
    _resample_into_world(frame, city)
    (
        city.building_rects,
        city.building_heights,
        city.building_roof,
        city.building_facade,
        city.building_window_spacing,
    ) = buildings.arrays()
    city.vehicle_colours = vehicle_colours
    city.overhead_vehicle_colours = overhead_colours
    trees = _street_trees(rng, style, u_roads, v_roads, extent) + park_trees
    _plant_trees(city, rng, trees)
    city.texture = _texture(rng, size_px)
    # A one-cell flat border: rays and tiles that leave the raster see open ground.
    for layer, value in ((city.height, 0.0), (city.material, GRASS), (city.object_id, -1)):
        layer[[0, -1], :] = value
        layer[:, [0, -1]] = value
    return city.finish()


def _block_intervals(positions, widths, sidewalk, extent):
    """[low, high) intervals between the outer sidewalk edges of consecutive roads."""
    edges = []
    previous = -extent
    for centre, width in zip(positions, widths):
        low = centre - width / 2.0 - sidewalk
        if low > previous:
            edges.append((previous, low))
        previous = centre + width / 2.0 + sidewalk
    if previous < extent:
        edges.append((previous, extent))
    return edges


def _fill_block(frame, rng, style, settings, bounds, buildings, park_trees, half):
    u0, u1, v0, v1 = bounds
    # Blocks outside the world square never show; skip their buildings for speed.
    corners = np.array([[u0, v0], [u0, v1], [u1, v0], [u1, v1]])
    cos_a, sin_a = math.cos(math.radians(style.road_angle)), math.sin(
        math.radians(style.road_angle)
    )
    x = corners[:, 0] * cos_a - corners[:, 1] * sin_a
    y = corners[:, 0] * sin_a + corners[:, 1] * cos_a
    if x.max() < -half or x.min() > half or y.max() < -half or y.min() > half:
        return
    rows, columns = frame.rect(u0, u1, v0, v1)
    draw = rng.random()
    if draw < style.park_fraction:
        frame.material[rows, columns] = GRASS
        area = (u1 - u0) * (v1 - v0)
        count = rng.poisson(style.park_tree_density * area / 100.0)
        for _ in range(count):
            park_trees.append((rng.uniform(u0, u1), rng.uniform(v0, v1)))
        return
    draw -= style.park_fraction
    if draw < style.plaza_fraction:
        frame.material[rows, columns] = PAVEMENT
        return
    draw -= style.plaza_fraction
    if draw < style.empty_fraction:
        frame.material[rows, columns] = SOIL
        return
    yard = GRASS if rng.random() < style.yard_grass else PAVEMENT
    frame.material[rows, columns] = yard
    # Two rows of lots back to back along the block's longer side.
    long_along_u = (u1 - u0) >= (v1 - v0)
    length = (u1 - u0) if long_along_u else (v1 - v0)
    depth = (v1 - v0) if long_along_u else (u1 - u0)
    halves = [(0.0, depth / 2.0), (depth / 2.0, depth)] if depth > 16.0 else [(0.0, depth)]
    centre_distance = math.hypot((u0 + u1) / 2.0, (v0 + v1) / 2.0)
    boost = 1.0 + (style.downtown_boost - 1.0) * math.exp(-((centre_distance / (0.35 * half)) ** 2))
    for depth_low, depth_high in halves:
        position = 0.0
        while position < length - 4.0:
            lot = rng.uniform(*style.lot_width)
            lot_end = min(position + lot, length)
            if lot_end - position >= 4.0 and rng.random() < style.building_density:
                setback = rng.uniform(*style.setback)
                side = rng.uniform(0.0, 1.5)
                a0, a1 = position + side / 2.0, lot_end - side / 2.0
                b0, b1 = depth_low + setback, depth_high - setback * rng.uniform(0.0, 1.0)
                if a1 - a0 >= 3.0 and b1 - b0 >= 3.0:
                    if long_along_u:
                        rect = (u0 + a0, u0 + a1, v0 + b0, v0 + b1)
                    else:
                        rect = (u0 + b0, u0 + b1, v0 + a0, v0 + a1)
                    height = min(
                        style.height_median
                        * math.exp(style.height_sigma * rng.standard_normal())
                        * boost,
                        120.0,
                    )
                    height = max(height, 3.0)
                    _add_building(frame, rng, style, settings, rect, height, buildings)
            position = lot_end


def _add_building(frame, rng, style, settings, rect, height, buildings):
    rows, columns = frame.rect(*rect)
    if rows.stop <= rows.start or columns.stop <= columns.start:
        return
    ident = len(buildings.heights)
    frame.height[rows, columns] = height
    frame.material[rows, columns] = BUILDING
    frame.object_id[rows, columns] = ident
    roof = int(rng.integers(len(style.palette)))
    # Roof and facade colours are independent draws: the roof says little about the walls.
    facade = int(rng.integers(len(style.palette))) if settings.independent_colours else roof
    buildings.rects.append(rect)
    buildings.heights.append(height)
    buildings.roof.append(roof)
    buildings.facade.append(facade)
    buildings.window_spacing.append(rng.uniform(2.2, 4.0))


def _paint_road(frame, centre, width, sidewalk, along_u):
    """A road running along u (constant v = centre) when ``along_u``, else along v (constant u)."""
    band = frame.v_slice if along_u else frame.u_slice

    def region(half_width):
        interval = band(centre - half_width, centre + half_width)
        return (interval, slice(None)) if along_u else (slice(None), interval)

    sidewalk_region, road_region = region(width / 2.0 + sidewalk), region(width / 2.0)
    frame.material[sidewalk_region] = PAVEMENT
    frame.height[sidewalk_region] = 0.0
    frame.object_id[sidewalk_region] = -1
    frame.material[road_region] = ROAD
    frame.road[road_region] = True
    # Dashed centre line, at least one cell wide: 3 m dashes every 6 m along the road.
    marking = frame.material[region(max(0.15, frame.resolution / 2.0))]
    along = (np.arange(frame.count) + 0.5) * frame.resolution - frame.extent
    dashes = np.mod(along, 6.0) < 3.0
    if along_u:
        marking[:, dashes] = MARKING
    else:
        marking[dashes, :] = MARKING


def _paint_avenue(frame, rng, style, sidewalk):
    """A straight diagonal avenue through the grid, cutting the buildings it crosses."""
    angle = math.radians(style.avenue_angle)
    width = style.road_width[1]
    offset = rng.uniform(-0.3, 0.3) * frame.extent
    sin_a, cos_a = math.sin(angle), math.cos(angle)
    marking = max(0.15, frame.resolution / 2.0)
    coordinates = (np.arange(frame.count) + 0.5) * frame.resolution - frame.extent
    dashes = np.mod(coordinates, 6.0) < 3.0
    # Row by row: across = -u sin + v cos - offset is linear in u, so each band is one column range.
    for row in range(frame.count):
        v = frame.extent - (row + 0.5) * frame.resolution
        centre_u = (v * cos_a - offset) / sin_a
        for half_width, kind in (
            (width / 2.0 + sidewalk, PAVEMENT),
            (width / 2.0, ROAD),
            (marking, MARKING),
        ):
            reach = half_width / sin_a
            columns = frame.u_slice(centre_u - reach, centre_u + reach)
            if columns.stop <= columns.start:
                continue
            if kind == MARKING:
                # Dashes along the avenue, approximated by the cell's u coordinate.
                part = frame.material[row, columns]
                part[dashes[columns]] = MARKING
                continue
            frame.material[row, columns] = kind
            if kind == PAVEMENT:
                frame.height[row, columns] = 0.0
                frame.object_id[row, columns] = -1
            else:
                frame.road[row, columns] = True


def _place_vehicles(frame, rng, style, u_roads, v_roads, half):
    """Parked/driving vehicles on the grid roads: one set for street time, one for the overhead."""
    colours = {0: [], 1: []}
    for along_u, (positions, widths) in ((False, u_roads), (True, v_roads)):
        for centre, width in zip(positions, widths):
            for lane_offset in (-width / 4.0, width / 4.0):
                lane = centre + lane_offset
                for which in (0, 1):
                    count = rng.poisson(style.vehicle_density * 2.0 * frame.extent / 100.0)
                    starts = rng.uniform(-frame.extent, frame.extent, count)
                    lengths = rng.uniform(4.0, 5.2, count)
                    palette_index = rng.integers(len(VEHICLE_COLOURS), size=count)
                    brightness = rng.uniform(0.85, 1.1, count)
                    if abs(lane) > half * 1.5:
                        continue  # only vehicles near the world square can show
                    for start, length, index, scale in zip(
                        starts, lengths, palette_index, brightness
                    ):
                        if abs(start) > half * 1.5:
                            continue
                        if along_u:
                            region = frame.rect(start, start + length, lane - 0.9, lane + 0.9)
                        else:
                            region = frame.rect(lane - 0.9, lane + 0.9, start, start + length)
                        on_road = frame.road[region]
                        if on_road.size == 0 or not on_road.all():
                            continue
                        ident = len(colours[which])
                        colours[which].append(VEHICLE_COLOURS[index] * scale)
                        if which == 0:
                            frame.height[region] = VEHICLE_HEIGHT
                            frame.material[region] = VEHICLE
                            frame.object_id[region] = ident
                        else:
                            frame.overhead_vehicle[region] = ident
    as_array = [np.array(colours[i], np.float32).reshape(-1, 3) for i in (0, 1)]
    return as_array[0], as_array[1]


def _resample_into_world(frame, city):
    """Nearest-neighbour resampling of the city-frame layers into the north-up world raster."""
    index = np.arange(city.size_px)
    x, _ = city.pixel_centre(0, index)
    _, y = city.pixel_centre(index, 0)
    layers = (frame.height, frame.material, frame.object_id, frame.road, frame.overhead_vehicle)
    (city.height, city.material, city.object_id, city.road,
     city.overhead_vehicle) = resample_layers(
        x, y, math.cos(city.angle), math.sin(city.angle), float(frame.extent),
        float(frame.resolution), frame.count, *(layer.ravel() for layer in layers))


def _street_trees(rng, style, u_roads, v_roads, extent):
    """Tree positions (u, v) along the sidewalks."""
    trees = []
    if style.street_tree_spacing is None:
        return trees
    spacing = style.street_tree_spacing
    for constant_u, (positions, widths) in ((True, u_roads), (False, v_roads)):
        for centre, width in zip(positions, widths):
            if rng.random() < 0.3:
                continue  # not every street is lined
            for side in (-1.0, 1.0):
                across = centre + side * (width / 2.0 + style.sidewalk_width / 2.0)
                along = np.arange(-extent + rng.uniform(0, spacing), extent, spacing)
                along = along + rng.uniform(-1.0, 1.0, len(along))
                for position in along:
                    trees.append((across, position) if constant_u else (position, across))
    return trees


def _plant_trees(city, rng, trees_uv):
    """Rasterise tree crowns (domes, solid down to the ground from the street) into the world."""
    style = city.style
    if not trees_uv:
        return
    trees_uv = np.array(trees_uv, dtype=np.float64)
    x, y = city.from_city_frame(trees_uv[:, 0], trees_uv[:, 1])
    inside = (np.abs(x) < city.half) & (np.abs(y) < city.half)
    x, y = x[inside], y[inside]
    count = len(x)
    radii = rng.uniform(*style.crown_radius, count)
    heights = rng.uniform(*style.tree_height, count)
    city.tree_shade = rng.uniform(0.75, 1.2, count).astype(np.float32)
    plant_crowns(x, y, radii, heights, city.resolution, city.half, city.height, city.material,
                 city.object_id, BUILDING, TREE)


def _texture(rng, size_px):
    """Smooth plus fine noise in roughly [-1, 1] (ground grain, roof wear, canopy clumps)."""
    coarse_size = max(size_px // 8, 2)
    coarse = rng.standard_normal((coarse_size, coarse_size)).astype(np.float32)
    # Bilinear upsampling as two small matrix products.
    position = np.clip(
        (np.arange(size_px) + 0.5) / size_px * coarse_size - 0.5, 0.0, coarse_size - 1.0
    )
    low = np.minimum(np.floor(position).astype(np.int64), coarse_size - 2)
    weight = (position - low).astype(np.float32)
    interpolation = np.zeros((size_px, coarse_size), np.float32)
    interpolation[np.arange(size_px), low] = 1.0 - weight
    interpolation[np.arange(size_px), low + 1] += weight
    smooth = interpolation @ coarse @ interpolation.T
    fine = rng.standard_normal((size_px, size_px), dtype=np.float32)
    return np.clip(0.5 * smooth + 0.35 * fine, -1.0, 1.0).astype(np.float32)
