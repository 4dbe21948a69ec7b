"""Independent float64 references that the library's fast paths are tested against.

These are deliberately naive (explicit loops, real crops) and share no code with cvig_engine.
"""
import math

import numpy as np


def polar_reference(tile, height, width):
    """Polar transform of one tile [C, S, S] by evaluating the documented formula point by point."""
    tile = np.asarray(tile, dtype=np.float64)
    channels, size, _ = tile.shape
    out = np.zeros((channels, height, width))
    for i in range(height):
        radius = (size / 2.0) * (height - 1 - i) / height
        for j in range(width):
            theta = 2.0 * math.pi * j / width
            row = size / 2.0 + radius * math.cos(theta)
            col = size / 2.0 - radius * math.sin(theta)
            out[:, i, j] = _bilinear(tile, row, col)
    return out


def _bilinear(tile, row, col):
    """Bilinear sample at (row, col) in pixel-index coordinates, zero outside the tile."""
    size_y, size_x = tile.shape[1:]
    row0, col0 = math.floor(row), math.floor(col)
    value = np.zeros(tile.shape[0])
    for dy, dx in ((0, 0), (0, 1), (1, 0), (1, 1)):
        y, x = row0 + dy, col0 + dx
        weight = (1 - abs(row - y)) * (1 - abs(col - x))
        if 0 <= y < size_y and 0 <= x < size_x:
            value += weight * tile[:, y, x]
    return value


def orientation_distance_reference(ground, aerial):
    """Brute-force DSM distance: really crop every window, normalise it, take the first argmax.

    ground [Ng, C, H, Wg], aerial [Na, C, H, W] (same H). Returns (distance, shift, correlation)
    with correlation [Ng, Na, W] the raw circular correlation.
    """
    ground = np.asarray(ground, dtype=np.float64)
    aerial = np.asarray(aerial, dtype=np.float64)
    num_ground, _, _, ground_width = ground.shape
    num_aerial, _, _, aerial_width = aerial.shape
    distance = np.zeros((num_ground, num_aerial))
    shift = np.zeros((num_ground, num_aerial), dtype=np.int64)
    correlation = np.zeros((num_ground, num_aerial, aerial_width))
    for n in range(num_ground):
        g = ground[n] / np.sqrt(np.sum(ground[n] ** 2))
        for m in range(num_aerial):
            crops = []
            for o in range(aerial_width):
                columns = [(o + k) % aerial_width for k in range(ground_width)]
                crop = aerial[m][:, :, columns]
                crops.append(crop)
                correlation[n, m, o] = np.sum(crop * g)
            best = 0
            for o in range(1, aerial_width):  # strict '>' keeps the first maximum
                if correlation[n, m, o] > correlation[n, m, best]:
                    best = o
            crop = crops[best] / np.sqrt(np.sum(crops[best] ** 2))
            distance[n, m] = 2.0 - 2.0 * np.sum(crop * g)
            shift[n, m] = best
    return distance, shift, correlation


def correlated_features(rng, num_ground, num_aerial, ground_width, *, channels=16, height=4,
                        aerial_width=64, noise=0.3):
    """Aerial maps, and ground maps cut from shifted windows of their true tile plus noise.

    Ground n's true tile is n % num_aerial, at a random shift. Returns (ground, aerial, match, shifts).
    """
    aerial = rng.standard_normal((num_aerial, channels, height, aerial_width))
    match = np.arange(num_ground) % num_aerial
    shifts = rng.integers(0, aerial_width, num_ground)
    ground = np.empty((num_ground, channels, height, ground_width))
    for n in range(num_ground):
        columns = [(shifts[n] + k) % aerial_width for k in range(ground_width)]
        ground[n] = aerial[match[n]][:, :, columns] * rng.uniform(0.5, 2.0)
    ground += noise * rng.standard_normal(ground.shape)
    return ground, aerial, match, shifts


def density_cells_reference(latitudes, longitudes, cities, cell_size):
    """Grid cell (city, column, row) of each position by the documented formula, one at a time.

    Per city: origin = (mean latitude, circular-mean longitude); x = R * dlon * cos(lat0),
    y = R * dlat (radians, dlon wrapped into [-180, 180) degrees), R = 6371008.8 m.
    """
    radius = 6371008.8
    groups = {}
    for index, city in enumerate(cities):
        groups.setdefault(city, []).append(index)
    cells = [None] * len(cities)
    for city, indices in groups.items():
        latitude_origin = sum(latitudes[i] for i in indices) / len(indices)
        sine = sum(math.sin(math.radians(longitudes[i])) for i in indices) / len(indices)
        cosine = sum(math.cos(math.radians(longitudes[i])) for i in indices) / len(indices)
        longitude_origin = math.degrees(math.atan2(sine, cosine))
        for i in indices:
            offset = (longitudes[i] - longitude_origin + 180.0) % 360.0 - 180.0
            x = radius * math.radians(offset) * math.cos(math.radians(latitude_origin))
            y = radius * math.radians(latitudes[i] - latitude_origin)
            cells[i] = (city, math.floor(x / cell_size), math.floor(y / cell_size))
    return cells


def haversine_metres(latitude1, longitude1, latitude2, longitude2):
    """Great-circle distance in metres on a sphere of radius 6371008.8 m."""
    phi1, phi2 = math.radians(latitude1), math.radians(latitude2)
    half_dphi = (phi2 - phi1) / 2.0
    half_dlambda = math.radians(longitude2 - longitude1) / 2.0
    a = math.sin(half_dphi) ** 2 + math.cos(phi1) * math.cos(phi2) * math.sin(half_dlambda) ** 2
    return 2.0 * 6371008.8 * math.asin(math.sqrt(a))


def bilinear_resize_reference(image, height, width):
    """Bilinear resize of a 2-D array (half-pixel centres, edge pixels repeat), float64 loops.

    The convention of ``torch.nn.functional.interpolate(mode="bilinear", align_corners=False)``
    when enlarging (no antialiasing is involved then).
    """
    image = np.asarray(image, dtype=np.float64)
    in_height, in_width = image.shape
    out = np.zeros((height, width))

    def source(index, in_size, out_size):
        position = max((index + 0.5) * in_size / out_size - 0.5, 0.0)
        low = min(int(math.floor(position)), in_size - 1)
        return low, min(low + 1, in_size - 1), position - low

    for i in range(height):
        y0, y1, fy = source(i, in_height, height)
        for j in range(width):
            x0, x1, fx = source(j, in_width, width)
            top = image[y0, x0] * (1 - fx) + image[y0, x1] * fx
            bottom = image[y1, x0] * (1 - fx) + image[y1, x1] * fx
            out[i, j] = top * (1 - fy) + bottom * fy
    return out


def vertical_distance_reference(ground, aerial):
    """Brute force with vertical search: ``orientation_distance_reference`` at every vertical offset.

    ground [Ng, C, H, Wg], aerial [Na, C, Ha, W] with H <= Ha. The first maximum of the raw
    correlation over (offset v, shift o), v major, picks the crop. Returns (distance, flat shift
    v * W + o, correlation [Ng, Na, V * W]).
    """
    ground = np.asarray(ground, dtype=np.float64)
    aerial = np.asarray(aerial, dtype=np.float64)
    height, aerial_height, width = ground.shape[2], aerial.shape[2], aerial.shape[3]
    per_offset = [orientation_distance_reference(ground, aerial[:, :, v:v + height])
                  for v in range(aerial_height - height + 1)]
    correlation = np.concatenate([result[2] for result in per_offset], axis=2)
    distance = np.zeros(correlation.shape[:2])
    shift = np.zeros(correlation.shape[:2], dtype=np.int64)
    for n in range(correlation.shape[0]):
        for m in range(correlation.shape[1]):
            best = 0
            for s in range(1, correlation.shape[2]):  # strict '>' keeps the first maximum
                if correlation[n, m, s] > correlation[n, m, best]:
                    best = s
            shift[n, m] = best
            distance[n, m] = per_offset[best // width][0][n, m]
    return distance, shift, correlation


def ranks_reference(distance, match, tie_rule):
    """1-based rank of each query's true tile, counted one query at a time; 0 where match is -1.

    pessimistic (WITW): #{tiles with d <= d_true}, the true tile included; optimistic (DSM):
    1 + #{tiles with d < d_true}.
    """
    ranks = np.zeros(len(match), dtype=np.int64)
    for n, true_tile in enumerate(match):
        if true_tile < 0:
            continue
        true_distance = distance[n][true_tile]
        if tie_rule == "pessimistic":
            ranks[n] = sum(1 for value in distance[n] if value <= true_distance)
        else:
            ranks[n] = 1 + sum(1 for value in distance[n] if value < true_distance)
    return ranks


def topk_reference(distance, k):
    """Indices of the k smallest distances of each row, ties broken by the lower index."""
    return np.array([sorted(range(len(row)), key=lambda m: (row[m], m))[:k] for row in distance],
                    dtype=np.int64)
