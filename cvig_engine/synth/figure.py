"""A one-picture summary of a synthetic pair (the README's sample image)."""

from __future__ import annotations

import numpy as np

from cvig_engine.synth.dataset import build_city, render_pairs
from cvig_engine.synth.settings import SynthSettings

__all__ = ["sample_figure"]


def sample_figure(
    settings: SynthSettings | None = None, *, city_index: int = 0, pair_index: int = 0
) -> np.ndarray:
    """uint8 RGB figure of one pair: the panorama, the polar-transformed tile below it (the two
    line up column for column), then the raw tile and its building (red) / road (blue) masks.
    """
    import torch

    from cvig_engine.polar import polar_transform

    settings = settings or SynthSettings(pairs=1, cities=2, unusable_fraction=0.0)
    city = build_city(settings, city_index)
    pair = list(render_pairs(city, pair_index + 1, city_index=city_index))[pair_index]
    panorama, tile = pair.surface.image, pair.overhead.image
    height, width = panorama.shape[:2]
    polar = polar_transform(torch.from_numpy(tile).permute(2, 0, 1).float()[None], height, width)[0]
    polar = polar.permute(1, 2, 0).round().clamp(0, 255).byte().numpy()
    masks = np.zeros_like(tile)
    masks[pair.overhead.building] = (200, 40, 40)
    masks[pair.overhead.road] = (40, 80, 200)
    size = tile.shape[0]
    bottom = np.full((size, width, 3), 255, np.uint8)
    bottom[:, :size] = tile
    bottom[:, width - size :] = masks if width >= 2 * size else masks[:, : width - size]
    gap = np.full((4, width, 3), 255, np.uint8)
    return np.concatenate([panorama, gap, polar, gap, bottom], axis=0)
