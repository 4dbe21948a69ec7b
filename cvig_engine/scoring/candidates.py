"""Running top-K candidates per query, chosen tile by tile, merged in (distance, index) order."""
from __future__ import annotations

import torch

__all__ = ["CandidateList"]


def _lexicographic(distance, index, shift):
    """Sort each row by (distance, index): stable sorts by index, then by distance."""
    order = torch.sort(index, dim=1, stable=True).indices
    distance, index, shift = (values.gather(1, order) for values in (distance, index, shift))
    order = torch.sort(distance, dim=1, stable=True).indices
    return tuple(values.gather(1, order) for values in (distance, index, shift))


class CandidateList:
    """The ``size`` smallest distances seen so far for each of ``rows`` queries, with their shifts.

    Ties are broken by the lower tile index, also where more tiles than ``size`` tie at the
    boundary of one aerial block. Unfilled slots hold distance inf and index -1.
    """

    def __init__(self, rows: int, size: int, device):
        self.size = size
        self.distance = torch.full((rows, size), torch.inf, device=device)
        self.index = torch.full((rows, size), -1, dtype=torch.int64, device=device)
        self.shift = torch.full((rows, size), -1, dtype=torch.int64, device=device)

    def update(self, distance: torch.Tensor, first_tile: int, shifts_of) -> None:
        """Merge a block of distances [rows, Ta] whose column j is tile ``first_tile + j``.

        ``shifts_of(rows, columns)`` gives the shifts of the chosen pairs of the block.
        """
        count = min(self.size, distance.shape[1])
        values, columns = torch.topk(distance, count, dim=1, largest=False, sorted=False)
        boundary = values.amax(dim=1)
        crowded = (distance <= boundary[:, None]).sum(dim=1) > count
        for row in torch.nonzero(crowded).flatten().tolist():
            # More tiles tie at the boundary than fit: keep the lowest indices among them.
            tied = torch.nonzero(distance[row] <= boundary[row]).flatten()  # ascending index
            order = torch.sort(distance[row, tied], stable=True).indices[:count]
            columns[row] = tied[order]
            values[row] = distance[row, columns[row]]
        rows = torch.arange(len(distance), device=distance.device)[:, None].expand_as(columns)
        shifts = shifts_of(rows.reshape(-1), columns.reshape(-1)).view(columns.shape)
        self.merge(values, columns + first_tile, shifts)

    def merge(self, distance: torch.Tensor, index: torch.Tensor, shift: torch.Tensor) -> None:
        """Merge candidate lists [rows, k] (distance, global tile index, shift) found elsewhere."""
        merged = _lexicographic(torch.cat([self.distance, distance], dim=1),
                                torch.cat([self.index, index], dim=1),
                                torch.cat([self.shift, shift.to(self.shift.dtype)], dim=1))
        self.distance, self.index, self.shift = (values[:, :self.size].contiguous()
                                                 for values in merged)
