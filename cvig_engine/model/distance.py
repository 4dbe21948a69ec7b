"""Orientation-searched DSM / WITW distance between ground and aerial feature maps."""
from __future__ import annotations

import torch

__all__ = ["orientation_distance", "distance_at_shift", "normalize_ground", "window_energy"]

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
    """Sliding-window energy E[m, v, o] = sum of aerial^2 over the window at (v, o): [Na, V, W].

    Summed over channels first, so the windows (and their gradient) span an [Na, Ha, W] tensor
    rather than every window's C x height x width values.
    """
    squares = aerial.pow(2).sum(dim=1)  # [Na, Ha, W]
    rows = squares.unfold(1, height, 1).sum(dim=-1)  # [Na, V, W]
    extended = torch.cat([rows, rows[..., : width - 1]], dim=-1)  # circular in width
    return extended.unfold(2, width, 1).sum(dim=-1)


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
            best_correlation = best_correlation_value(correlation, best)
            best_energy = energy[torch.arange(num_aerial, device=aerial.device)[None, :], best]
    if track and vertical == 1:
        best_correlation = _ChosenCorrelation.apply(g, aerial, best,
                                                    best_correlation_value(correlation, best))
        energy = window_energy(aerial, ground_height, ground_width).flatten(1)  # [Na, V*W]
        best_energy = energy.gather(1, best.T).T
    elif track:
        crops = _chosen_windows(aerial, best // shifts, best % shifts, ground_height, ground_width)
        best_correlation = (crops * g.permute(0, 2, 3, 1)[:, None]).sum(dim=(2, 3, 4))
        best_energy = crops.pow(2).sum(dim=(2, 3, 4))
    distance = 2.0 - 2.0 * best_correlation / best_energy.clamp_min(_EPSILON).sqrt()
    shift = best % shifts
    if return_vertical:
        return distance, shift, best // shifts
    return distance, shift


def best_correlation_value(correlation: torch.Tensor, best: torch.Tensor) -> torch.Tensor:
    """corr[m, n, best[m, n]] of a [Ng, Na, shifts] correlation: [Ng, Na]."""
    return correlation.gather(2, best[..., None])[..., 0]


class _ChosenCorrelation(torch.autograd.Function):
    """corr[m, n] at each pair's chosen shift, with its gradient computed in the Fourier domain.

    corr[m, n] = sum_{c,h,k} aerial[n, c, h, (s + k) mod W] g[m, c, h, k] with s = shift[m, n].
    Its gradients are circular shifts: d/d aerial[n] = sum_m G[m, n] roll(g[m] padded to W, s) and
    d/d g[m] = sum_n G[m, n] roll(aerial[n], -s), first Wg columns. A roll by s is a phase
    exp(-2 pi i f s / W) per frequency f, so each is one small complex matmul per frequency instead
    of scattering Ng x Na gathered windows back (a tenth of a CPU training step).
    """

    @staticmethod
    def forward(ctx, ground, aerial, shift, value):
        ctx.save_for_backward(ground, aerial, shift)
        return value.to(aerial.dtype)

    @staticmethod
    def backward(ctx, grad_output):
        ground, aerial, shift = ctx.saved_tensors
        _, channels, height, ground_width = ground.shape
        num_aerial, _, _, width = aerial.shape
        frequencies = torch.arange(width // 2 + 1, device=aerial.device, dtype=aerial.dtype)
        angle = (-2.0 * torch.pi / width) * shift.to(aerial.dtype)[..., None] * frequencies
        phase = torch.polar(torch.ones_like(angle), angle)  # [Ng, Na, F]: a roll by +s
        weights = grad_output[..., None] * phase  # [Ng, Na, F]
        grad_ground = grad_aerial = None
        if ctx.needs_input_grad[0]:
            aerial_spectrum = torch.fft.rfft(aerial, dim=-1).flatten(1, 2)  # [Na, C*H, F]
            # sum_n weights* A[n]: a roll by -s; [F, Ng, Na] @ [F, Na, C*H].
            spectrum = torch.bmm(weights.conj().permute(2, 0, 1),
                                 aerial_spectrum.permute(2, 0, 1))
            rolled = torch.fft.irfft(spectrum.permute(1, 2, 0), n=width, dim=-1)
            grad_ground = rolled[..., :ground_width].reshape(ground.shape)
        if ctx.needs_input_grad[1]:
            padded = torch.nn.functional.pad(ground, (0, width - ground_width))
            ground_spectrum = torch.fft.rfft(padded, dim=-1).flatten(1, 2)  # [Ng, C*H, F]
            spectrum = torch.bmm(weights.permute(2, 1, 0), ground_spectrum.permute(2, 0, 1))
            grad_aerial = torch.fft.irfft(spectrum.permute(1, 2, 0), n=width, dim=-1)
            grad_aerial = grad_aerial.reshape(num_aerial, channels, height, width)
        return grad_ground, grad_aerial, None, None


def _chosen_windows(aerial, vertical, shift, height: int, width: int) -> torch.Tensor:
    """The aerial window of each pair at its (vertical, shift): [Ng, Na, height, width, C]."""
    device = aerial.device
    aerial_width = aerial.shape[-1]
    rows = vertical[..., None] + torch.arange(height, device=device)  # [Ng, Na, height]
    columns = (shift[..., None] + torch.arange(width, device=device)) % aerial_width
    tiles = torch.arange(aerial.shape[0], device=device)[None, :, None, None]
    return aerial.permute(0, 2, 3, 1)[tiles, rows[..., :, None], columns[..., None, :]]


def distance_at_shift(ground: torch.Tensor, aerial: torch.Tensor, shift: torch.Tensor):
    """DSM distance of each pair (ground[i], aerial[i]) at a given shift, without search.

    2 - 2 <crop / |crop|, g> for the aerial window that starts at column ``shift[i]`` (circular;
    the top rows where the aerial map is taller). Differentiable; ``shift`` is int64 [B].
    """
    if ground.shape[0] != aerial.shape[0] or shift.shape != (ground.shape[0],):
        raise ValueError(f"expected paired maps and one shift per pair, got ground "
                         f"{tuple(ground.shape)}, aerial {tuple(aerial.shape)}, "
                         f"shift {tuple(shift.shape)}")
    _, _, height, width = ground.shape
    g = normalize_ground(ground)
    vertical = torch.zeros_like(shift)
    # One "ground" row against every tile gives tile i's window at shift[i]: [B, C, H, Wg].
    crops = _chosen_windows(aerial, vertical[None, :], shift[None, :], height, width)[0]
    crops = crops.permute(0, 3, 1, 2)
    correlation = (crops * g).flatten(1).sum(dim=1)
    return 2.0 - 2.0 * correlation / crops.flatten(1).norm(dim=1).clamp_min(_EPSILON)
