"""Weighted soft-margin triplet loss (DSM / WITW)."""
from __future__ import annotations

import torch
import torch.nn.functional as F


def triplet_loss(distance: torch.Tensor, alpha: float = 10.0) -> torch.Tensor:
    """Soft-margin triplet loss in both directions over a batch's distance matrix.

    ``distance[i, j]`` is the distance between ground photo i and aerial tile j; matching pairs are
    on the diagonal. With B the batch size and softplus(x) = log(1 + e^x):

        L = [ sum_{i != j} softplus(alpha (d_ii - d_ij))      (photo -> tile)
            + sum_{i != j} softplus(alpha (d_jj - d_ij)) ]    (tile -> photo)
            / (2 B (B - 1))

    which is WITW's normalisation by the 2B(B-1) triplets of the batch.
    """
    if distance.dim() != 2 or distance.shape[0] != distance.shape[1] or distance.shape[0] < 2:
        raise ValueError("triplet_loss needs a square distance matrix of batch >= 2, "
                         f"got {tuple(distance.shape)}")
    batch = distance.shape[0]
    positive = distance.diagonal()
    off_diagonal = ~torch.eye(batch, dtype=torch.bool, device=distance.device)
    photo_to_tile = F.softplus(alpha * (positive[:, None] - distance))[off_diagonal]
    tile_to_photo = F.softplus(alpha * (positive[None, :] - distance))[off_diagonal]
    return (photo_to_tile.sum() + tile_to_photo.sum()) / (2 * batch * (batch - 1))
