"""Density-limited subsets: at most K pairs per grid cell of R metres.

Hot spots (Paris's Eiffel Tower, Arc de Triomphe) hold many photos of one place; capping the
pairs per cell keeps them from dominating training or evaluation.

Grid: each city (the CSV's ``city`` column; one group when it is empty) gets a local
equirectangular projection around the mean of its pairs' positions (latitude: arithmetic mean;
longitude: circular mean, so a city across the antimeridian works):

    x = R_earth * radians(lon - lon0) * cos(radians(lat0)),   y = R_earth * radians(lat - lat0),

with R_earth = 6 371 008.8 m (the mean Earth radius) and ``lon - lon0`` wrapped into
[-180, 180). A pair falls in cell ``(floor(x / R), floor(y / R))``, so a cell corner sits at the
city's mean position. Within a city of a few kilometres the projection's distances are within a
fraction of a percent of the true ones.

Choice: every pair draws a random priority from one seeded shuffle of all pairs; each cell keeps
its K pairs of lowest priority. The kept pairs are written in their input order, so the same
seed gives the same subset and a subset's order is stable.
"""
from __future__ import annotations

import math
from collections import defaultdict

import numpy as np

from cvig_engine.errors import CvigInputError

EARTH_RADIUS_METRES = 6371008.8


def local_projection(latitudes, longitudes) -> tuple[np.ndarray, np.ndarray]:
    """East and north metres of each position from the positions' mean (module docstring)."""
    latitudes = np.asarray(latitudes, dtype=np.float64)
    longitudes = np.asarray(longitudes, dtype=np.float64)
    latitude_origin = latitudes.mean()
    radians = np.radians(longitudes)
    longitude_origin = math.degrees(math.atan2(np.sin(radians).mean(), np.cos(radians).mean()))
    longitude_offset = (longitudes - longitude_origin + 180.0) % 360.0 - 180.0
    parallel_scale = math.cos(math.radians(latitude_origin))
    east = EARTH_RADIUS_METRES * np.radians(longitude_offset) * parallel_scale
    north = EARTH_RADIUS_METRES * np.radians(latitudes - latitude_origin)
    return east, north


def grid_cells(latitudes, longitudes, cities, cell_size: float) -> list:
    """The cell ``(city, column, row)`` of every position, with a projection per city."""
    if not cell_size > 0 or not math.isfinite(cell_size):
        raise CvigInputError(f"the cell size must be a positive number of metres, got {cell_size}")
    latitudes = np.asarray(latitudes, dtype=np.float64)
    longitudes = np.asarray(longitudes, dtype=np.float64)
    cities = list(cities)
    groups = defaultdict(list)
    for index, city in enumerate(cities):
        groups[city].append(index)
    cells = [None] * len(cities)
    for city, indices in groups.items():
        indices = np.asarray(indices)
        east, north = local_projection(latitudes[indices], longitudes[indices])
        columns = np.floor(east / cell_size).astype(np.int64)
        rows = np.floor(north / cell_size).astype(np.int64)
        for index, column, row in zip(indices, columns, rows):
            cells[index] = (city, int(column), int(row))
    return cells


def density_limit_indices(latitudes, longitudes, cities, cell_size: float, max_per_cell: int,
                          seed: int = 0) -> tuple[np.ndarray, dict]:
    """Indices (ascending) of the pairs kept when each cell holds at most ``max_per_cell``.

    Returns ``(kept, summary)``; the summary counts pairs, cells, capped cells and the largest
    cell before and after.
    """
    if max_per_cell < 1:
        raise CvigInputError(f"the cap per cell must be at least 1, got {max_per_cell}")
    cells = grid_cells(latitudes, longitudes, cities, cell_size)
    priority = np.random.default_rng(seed).permutation(len(cells))
    members = defaultdict(list)
    for index, cell in enumerate(cells):
        members[cell].append(index)
    kept = []
    for indices in members.values():
        kept.extend(sorted(indices, key=lambda index: priority[index])[:max_per_cell])
    kept = np.sort(np.asarray(kept, dtype=np.int64))
    sizes = [len(indices) for indices in members.values()]
    summary = {
        "cell_size_m": float(cell_size),
        "max_per_cell": int(max_per_cell),
        "seed": int(seed),
        "pairs_in": len(cells),
        "pairs_out": int(len(kept)),
        "cells": len(members),
        "cells_capped": int(sum(size > max_per_cell for size in sizes)),
        "largest_cell_in": int(max(sizes, default=0)),
        "largest_cell_out": int(min(max(sizes, default=0), max_per_cell)),
    }
    return kept, summary


def density_limit(records, cell_size: float, max_per_cell: int, seed: int = 0,
                  source: str = "dataset") -> tuple[list, dict]:
    """Keep at most ``max_per_cell`` of the records (with ``lat``, ``lon``, ``city``) per cell."""
    latitudes, longitudes = [], []
    for index, record in enumerate(records):
        latitude, longitude = float(record.lat), float(record.lon)
        if not (math.isfinite(latitude) and -90.0 <= latitude <= 90.0 and math.isfinite(longitude)):
            row = getattr(record, "row", index)
            raise CvigInputError(f"{source}: row {row}: latitude/longitude {record.lat}, "
                                 f"{record.lon} is not a position (the density limit needs both)")
        latitudes.append(latitude)
        longitudes.append(longitude)
    cities = [record.city or "" for record in records]
    kept, summary = density_limit_indices(latitudes, longitudes, cities, cell_size, max_per_cell,
                                          seed)
    return [records[index] for index in kept], summary
