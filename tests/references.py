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
