"""Polar transform of overhead tiles, and the compass-heading <-> orientation-bin convention.

Polar pixel (i, j) of a ``height x width`` polar image samples the S x S tile at

    row = S/2 + r cos(theta),   column = S/2 - r sin(theta),
    r = (S/2) (height - 1 - i) / height,   theta = 2 pi j / width,

in pixel-index coordinates (pixel (y, x) has its centre at (y, x)), bilinearly, with zeros
outside the tile. Row 0 of the polar image is the far ring, the last row the centre.

With north up in the tile, column 0 looks south (theta = 0 points down the rows) and columns
run clockwise seen from above: south, west, north, east. A ground panorama aligned the same way
(column 0 facing south, as in CVUSA) then matches the polar tile at shift 0.

Orientation bins: the feature maps have ``W`` columns over 360 degrees (W = 64 for VGG16). The
bin ``o`` that ``orientation_distance`` returns is the aerial column where the ground map's
first (left) column lands. A photo with field of view ``fov`` whose centre faces compass heading
``h`` (degrees clockwise from north) has its left edge at ``h - fov/2``, so

    o = round(((h - fov/2 - 180) mod 360) / 360 * W) mod W,
    h = (180 + o * 360 / W + fov/2) mod 360.
"""
from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F

__all__ = ["polar_transform", "polar_sampling_grid", "polar_sample_points", "heading_to_shift",
           "shift_to_heading"]

_GRID_CACHE: dict[tuple, np.ndarray] = {}


def polar_sample_points(size: int, height: int = 128,
                        width: int = 512) -> tuple[np.ndarray, np.ndarray]:
    """Rows and columns (float64 pixel indices, shape [height, width]) that the polar image
    samples."""
    i = np.arange(height, dtype=np.float64)[:, None]
    j = np.arange(width, dtype=np.float64)[None, :]
    radius = (size / 2.0) * (height - 1 - i) / height
    theta = 2.0 * math.pi * j / width
    rows = size / 2.0 + radius * np.cos(theta)
    cols = size / 2.0 - radius * np.sin(theta)
    return rows, cols


def polar_sampling_grid(size: int, height: int = 128, width: int = 512) -> torch.Tensor:
    """The ``grid_sample`` grid [1, height, width, 2] (x, y in [-1, 1], align_corners=True)."""
    key = (size, height, width)
    if key not in _GRID_CACHE:
        rows, cols = polar_sample_points(size, height, width)
        # align_corners=True maps index 0 -> -1 and index size-1 -> +1.
        x = 2.0 * cols / (size - 1) - 1.0
        y = 2.0 * rows / (size - 1) - 1.0
        _GRID_CACHE[key] = np.stack([x, y], axis=-1)[None]
    # A fresh tensor each call: a cached tensor made while tracing (torch.export) would be fake.
    return torch.from_numpy(_GRID_CACHE[key])


def polar_transform(aerial: torch.Tensor, height: int = 128, width: int = 512) -> torch.Tensor:
    """Polar-transform square overhead tiles into fake panoramas.

    Args:
        aerial: float tensor [B, C, S, S] (or [C, S, S]), north up.
        height, width: size of the polar image.

    Returns:
        Tensor [B, C, height, width] (or [C, height, width]) on the input's device and dtype.
    """
    squeeze = aerial.dim() == 3
    if squeeze:
        aerial = aerial.unsqueeze(0)
    if aerial.dim() != 4 or aerial.shape[-1] != aerial.shape[-2]:
        raise ValueError("polar_transform expects [B, C, S, S] square tiles, "
                         f"got {tuple(aerial.shape)}")
    size = aerial.shape[-1]
    grid = polar_sampling_grid(size, height, width).to(device=aerial.device, dtype=aerial.dtype)
    grid = grid.expand(aerial.shape[0], -1, -1, -1)
    out = F.grid_sample(aerial, grid, mode="bilinear", padding_mode="zeros", align_corners=True)
    return out[0] if squeeze else out


def heading_to_shift(heading_deg, fov_deg: float, width: int = 64):
    """Orientation bin (0..width-1) where a photo facing ``heading_deg`` lands (see module doc)."""
    heading = np.asarray(heading_deg, dtype=np.float64)
    left_edge = np.mod(heading - fov_deg / 2.0 - 180.0, 360.0)
    shift = np.mod(np.rint(left_edge / 360.0 * width), width).astype(np.int64)
    return shift if shift.ndim else int(shift)


def shift_to_heading(shift, fov_deg: float, width: int = 64):
    """Compass heading (degrees, [0, 360)) of a photo's centre for orientation bin ``shift``."""
    heading = np.mod(180.0 + np.asarray(shift, dtype=np.float64) * 360.0 / width + fov_deg / 2.0,
                     360.0)
    return heading if heading.ndim else float(heading)
