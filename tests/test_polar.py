import numpy as np
import pytest
import torch

from cvig_engine.polar import heading_to_shift, polar_transform, shift_to_heading
from references import polar_reference


def test_polar_transform_matches_formula_in_float64():
    rng = np.random.default_rng(0)
    tiles = rng.random((2, 3, 48, 48))
    out = polar_transform(torch.from_numpy(tiles), height=24, width=60).numpy()
    for b in range(2):
        expected = polar_reference(tiles[b], 24, 60)
        np.testing.assert_allclose(out[b], expected, atol=1e-9)


def test_polar_transform_float32_batched_and_unbatched_agree():
    rng = np.random.default_rng(1)
    tiles = torch.from_numpy(rng.random((3, 5, 32, 32)).astype(np.float32))
    batched = polar_transform(tiles, 16, 64)
    assert batched.shape == (3, 5, 16, 64)
    single = polar_transform(tiles[1], 16, 64)
    torch.testing.assert_close(single, batched[1])
    expected = polar_reference(tiles[2].double().numpy(), 16, 64)
    np.testing.assert_allclose(batched[2].numpy(), expected, atol=1e-5)


def test_polar_column_zero_looks_south_and_columns_run_clockwise():
    size = 64
    tile = torch.zeros(1, 4, size, size)
    # One bright blob per compass direction, 20 px from the centre (north is up).
    centre = size // 2
    blobs = {0: (centre + 20, centre), 1: (centre, centre - 20), 2: (centre - 20, centre), 3: (centre, centre + 20)}
    for channel, (row, col) in blobs.items():  # south, west, north, east
        tile[0, channel, row - 2: row + 3, col - 2: col + 3] = 1.0
    polar = polar_transform(tile, 32, 64)[0]
    brightest_columns = [int(polar[c].sum(0).argmax()) for c in range(4)]
    assert brightest_columns == [0, 16, 32, 48]


def test_heading_shift_round_trip_and_known_values():
    # A 360 deg panorama aligned with column 0 facing south has its centre facing north.
    assert heading_to_shift(0.0, 360.0, 64) == 0
    # A 70 deg photo facing east (90) has its left edge at 55 deg, i.e. 235 deg past south.
    assert heading_to_shift(90.0, 70.0, 64) == round((55 - 180) % 360 / 360 * 64) % 64
    shifts = np.arange(64)
    for fov in (360.0, 70.0, 90.0):
        headings = shift_to_heading(shifts, fov, 64)
        np.testing.assert_array_equal(heading_to_shift(headings, fov, 64), shifts)
    assert 0.0 <= shift_to_heading(63, 70.0) < 360.0


@pytest.mark.parametrize("bad", [torch.zeros(2, 3, 8, 9), torch.zeros(8, 8)])
def test_polar_transform_rejects_non_square(bad):
    with pytest.raises(ValueError):
        polar_transform(bad)
