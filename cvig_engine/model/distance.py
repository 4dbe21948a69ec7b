"""Orientation-searched DSM / WITW distance between ground and aerial feature maps."""
from __future__ import annotations

import torch

__all__ = ["orientation_distance", "normalize_ground", "window_energy"]

_EPSILON = 1e-12


def normalize_ground(ground: torch.Tensor) -> torch.Tensor:
    """L2-normalise each ground map over (C, H, W) jointly."""
    norms = ground.flatten(1).norm(dim=1).clamp_min(_EPSILON)
    return ground / norms[:, None, None, None]


def _aerial_windows(aerial: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """All (vertical, circular horizontal) windows: [Na, C, V, W, height, width]."""
    extended = torch.cat([aerial, aerial[..., : width - 1]], dim=-1)  # circular in width
    windows = extended.unfold(3, width, 1)  # [Na, C, Ha, W, width]
    windows = windows.unfold(2, height, 1)  # [Na, C, V, W, width, height]
    return windows.transpose(-1, -2)


def window_energy(aerial: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """Sliding-window energy E[m, v, o] = sum of aerial^2 over the window at (v, o): [Na, V, W]."""
    return _aerial_windows(aerial * aerial, height, width).sum(dim=(1, 4, 5))


def orientation_distance(ground: torch.Tensor, aerial: torch.Tensor, return_vertical: bool = False):
    """DSM distance with orientation search, for every (ground, aerial) pair.

    g is the ground map L2-normalised over (C, H, Wg); corr[o] = sum aerial[c, h, (o+k) mod W]
    g[c, h, k] over the raw aerial map; the shift is the first argmax of corr; the distance is
    2 - 2 <crop / |crop|, g> for the aerial window (crop) at that shift, computed in closed form as
    2 - 2 corr[o*] / sqrt(E[o*]) with E the window energy. Differentiable (through the chosen
    shift).

    Where the aerial map is taller than the ground map (vertical search) the window also slides
    vertically (non-circularly); the first argmax is taken over (vertical, horizontal) with the
    vertical offset major.

    Args:
        ground: [Ng, C, Hg, Wg]. aerial: [Na, C, Ha, W] with Hg <= Ha and Wg <= W.
        return_vertical: also return the vertical offsets.

    Returns:
        ``(distance [Ng, Na], shift [Ng, Na] int64)``, plus ``vertical [Ng, Na]`` if asked.
    """
    if ground.dim() != 4 or aerial.dim() != 4:
        raise ValueError(f"expected 4-D maps, got ground {tuple(ground.shape)} "
                         f"and aerial {tuple(aerial.shape)}")
    _, channels, ground_height, ground_width = ground.shape
    _, aerial_channels, aerial_height, aerial_width = aerial.shape
    if channels != aerial_channels:
        raise ValueError(f"ground has {channels} channels, aerial {aerial_channels}")
    if ground_height > aerial_height or ground_width > aerial_width:
        raise ValueError(f"ground map {ground_height}x{ground_width} is larger than aerial "
                         f"{aerial_height}x{aerial_width}")
    g = normalize_ground(ground)
    # The search itself needs no gradient; when one is wanted, only the chosen windows carry it
    # (back-propagating through every window's correlation cost most of a training step).
    track = torch.is_grad_enabled() and (ground.requires_grad or aerial.requires_grad)
    with torch.no_grad():
        windows = _aerial_windows(aerial, ground_height, ground_width)  # [Na, C, V, W, Hg, Wg]
        num_aerial, _, vertical, shifts = windows.shape[:4]
        # [Na*V*W, C*Hg*Wg] so that one matmul gives every correlation.
        flat_windows = windows.permute(0, 2, 3, 1, 4, 5).reshape(num_aerial * vertical * shifts, -1)
        correlation = g.flatten(1) @ flat_windows.T  # [Ng, Na*V*W]
        correlation = correlation.view(len(g), num_aerial, vertical * shifts)
        best = correlation.argmax(dim=2)  # torch returns the first maximal index
        if not track:
            energy = flat_windows.pow(2).sum(dim=1).view(num_aerial, vertical * shifts)
            best_correlation = correlation.gather(2, best[..., None])[..., 0]
            best_energy = energy[torch.arange(num_aerial, device=aerial.device)[None, :], best]
    if track:
        crops = _chosen_windows(aerial, best // shifts, best % shifts, ground_height, ground_width)
        best_correlation = (crops * g.permute(0, 2, 3, 1)[:, None]).sum(dim=(2, 3, 4))
        best_energy = crops.pow(2).sum(dim=(2, 3, 4))
    distance = 2.0 - 2.0 * best_correlation / best_energy.clamp_min(_EPSILON).sqrt()
    shift = best % shifts
    if return_vertical:
        return distance, shift, best // shifts
    return distance, shift


def _chosen_windows(aerial, vertical, shift, height: int, width: int) -> torch.Tensor:
    """The aerial window of each pair at its (vertical, shift): [Ng, Na, height, width, C]."""
    device = aerial.device
    aerial_width = aerial.shape[-1]
    rows = vertical[..., None] + torch.arange(height, device=device)  # [Ng, Na, height]
    columns = (shift[..., None] + torch.arange(width, device=device)) % aerial_width
    tiles = torch.arange(aerial.shape[0], device=device)[None, :, None, None]
    return aerial.permute(0, 2, 3, 1)[tiles, rows[..., :, None], columns[..., None, :]]
