import numpy as np
import pytest
import torch

from cvig_engine import orientation_distance, triplet_loss
from references import (correlated_features, orientation_distance_reference,
                        vertical_distance_reference)


@pytest.mark.parametrize("ground_width", [64, 32, 16, 13, 12])
def test_orientation_distance_matches_brute_force(ground_width):
    rng = np.random.default_rng(ground_width)
    ground, aerial, match, true_shifts = correlated_features(rng, 7, 5, ground_width, aerial_width=64)
    distance, shift = orientation_distance(torch.from_numpy(ground), torch.from_numpy(aerial))
    expected_distance, expected_shift, _ = orientation_distance_reference(ground, aerial)
    np.testing.assert_array_equal(shift.numpy(), expected_shift)
    np.testing.assert_allclose(distance.numpy(), expected_distance, atol=1e-10)
    # The true shift is recoverable from features made of shifted windows.
    np.testing.assert_array_equal(shift.numpy()[np.arange(7), match], true_shifts)
    # float32 agrees to float32 rounding.
    distance32, shift32 = orientation_distance(torch.from_numpy(ground).float(), torch.from_numpy(aerial).float())
    np.testing.assert_allclose(distance32.numpy(), expected_distance, atol=2e-5)
    np.testing.assert_array_equal(shift32.numpy(), expected_shift)


def test_first_argmax_wins_on_an_exact_tie():
    rng = np.random.default_rng(5)
    half = rng.standard_normal((3, 16, 4, 32))
    aerial = np.concatenate([half, half], axis=-1)  # period 32: corr[o] == corr[o + 32] exactly
    ground = rng.standard_normal((4, 16, 4, 13))
    distance, shift = orientation_distance(torch.from_numpy(ground), torch.from_numpy(aerial))
    expected_distance, expected_shift, correlation = orientation_distance_reference(ground, aerial)
    assert np.all(correlation[..., :32] == correlation[..., 32:])
    assert np.all(shift.numpy() < 32)
    np.testing.assert_array_equal(shift.numpy(), expected_shift)
    np.testing.assert_allclose(distance.numpy(), expected_distance, atol=1e-10)


def test_vertical_search_matches_brute_force_over_offsets():
    rng = np.random.default_rng(9)
    ground = rng.standard_normal((3, 4, 2, 6))
    aerial = rng.standard_normal((4, 4, 5, 16))
    distance, shift, vertical = orientation_distance(
        torch.from_numpy(ground), torch.from_numpy(aerial), return_vertical=True)
    offsets = aerial.shape[2] - ground.shape[2] + 1
    per_offset = [orientation_distance_reference(ground, aerial[:, :, v: v + 2]) for v in range(offsets)]
    correlation = np.stack([result[2] for result in per_offset], axis=2)  # [Ng, Na, V, W]
    flat = correlation.reshape(3, 4, -1)
    best = flat.argmax(axis=2)  # numpy's argmax returns the first maximum
    np.testing.assert_array_equal(vertical.numpy(), best // 16)
    np.testing.assert_array_equal(shift.numpy(), best % 16)
    for n in range(3):
        for m in range(4):
            v = best[n, m] // 16
            np.testing.assert_allclose(distance[n, m].item(), per_offset[v][0][n, m], atol=1e-10)


def test_orientation_distance_with_width_one_is_cosine_distance():
    rng = np.random.default_rng(2)
    ground = rng.standard_normal((5, 32, 1, 1))
    aerial = rng.standard_normal((6, 32, 1, 1))
    distance, shift = orientation_distance(torch.from_numpy(ground), torch.from_numpy(aerial))
    g = ground[:, :, 0, 0] / np.linalg.norm(ground[:, :, 0, 0], axis=1, keepdims=True)
    a = aerial[:, :, 0, 0] / np.linalg.norm(aerial[:, :, 0, 0], axis=1, keepdims=True)
    np.testing.assert_allclose(distance.numpy(), 2 - 2 * g @ a.T, atol=1e-12)
    assert not shift.any()


def test_orientation_distance_rejects_mismatched_maps():
    with pytest.raises(ValueError):
        orientation_distance(torch.zeros(1, 8, 4, 12), torch.zeros(1, 16, 4, 64))
    with pytest.raises(ValueError):
        orientation_distance(torch.zeros(1, 16, 4, 65), torch.zeros(1, 16, 4, 64))


def test_triplet_loss_matches_explicit_sum():
    rng = np.random.default_rng(3)
    batch, alpha = 6, 10.0
    distance = rng.uniform(0, 2, (batch, batch))
    expected = 0.0
    for i in range(batch):
        for j in range(batch):
            if i != j:
                expected += np.log1p(np.exp(alpha * (distance[i, i] - distance[i, j])))
                expected += np.log1p(np.exp(alpha * (distance[j, j] - distance[i, j])))
    expected /= 2 * batch * (batch - 1)
    loss = triplet_loss(torch.from_numpy(distance), alpha=alpha)
    assert loss.item() == pytest.approx(expected, rel=1e-12)


def test_triplet_loss_falls_as_matches_separate():
    close = torch.full((4, 4), 1.0).fill_diagonal_(0.9)
    far = torch.full((4, 4), 1.0).fill_diagonal_(0.1)
    assert triplet_loss(far) < triplet_loss(close)


@pytest.mark.parametrize("ground_shape, aerial_shape", [((2, 3, 2, 8), (3, 3, 2, 8)),
                                                        ((2, 3, 2, 3), (3, 3, 2, 8)),
                                                        ((3, 2, 2, 4), (2, 2, 2, 7)),
                                                        ((2, 3, 2, 3), (2, 3, 4, 8))])
def test_distance_gradients_match_finite_differences(ground_shape, aerial_shape):
    # With gradients on, only the chosen windows are re-gathered: same values, and gradients that
    # agree with central differences (the argmax is locally constant for generic inputs).
    generator = torch.Generator().manual_seed(sum(ground_shape) + sum(aerial_shape))
    ground = torch.randn(ground_shape, dtype=torch.float64, generator=generator, requires_grad=True)
    aerial = torch.randn(aerial_shape, dtype=torch.float64, generator=generator, requires_grad=True)
    distance, shift, vertical = orientation_distance(ground, aerial, return_vertical=True)
    expected, expected_shift, expected_vertical = vertical_or_plain_reference(
        ground.detach().numpy(), aerial.detach().numpy())
    np.testing.assert_allclose(distance.detach().numpy(), expected, atol=1e-12)
    np.testing.assert_array_equal(shift.numpy(), expected_shift)
    np.testing.assert_array_equal(vertical.numpy(), expected_vertical)
    assert torch.autograd.gradcheck(lambda g, a: orientation_distance(g, a)[0], (ground, aerial))


def vertical_or_plain_reference(ground, aerial):
    """Distances, shifts and vertical offsets of the float64 references."""
    if ground.shape[2] == aerial.shape[2]:
        distance, shift, _ = orientation_distance_reference(ground, aerial)
        return distance, shift, np.zeros_like(shift)
    distance, flat_shift, _ = vertical_distance_reference(ground, aerial)
    width = aerial.shape[3]
    return distance, flat_shift % width, flat_shift // width


@pytest.mark.parametrize("ground_width", [64, 12])
def test_fourier_gradients_match_the_gathered_windows_at_model_sizes(ground_width):
    # Training's backward pass goes through the Fourier domain; the reference gathers each pair's
    # window explicitly (float64) and lets autograd differentiate that.
    generator = torch.Generator().manual_seed(ground_width)
    ground = torch.randn((5, 16, 4, ground_width), dtype=torch.float64, generator=generator,
                         requires_grad=True)
    aerial = torch.randn((6, 16, 4, 64), dtype=torch.float64, generator=generator,
                         requires_grad=True)
    weights = torch.randn((5, 6), dtype=torch.float64, generator=generator)
    distance, shift = orientation_distance(ground, aerial)
    grad_ground, grad_aerial = torch.autograd.grad((distance * weights).sum(), (ground, aerial))

    g = ground / ground.flatten(1).norm(dim=1)[:, None, None, None]
    columns = (shift[..., None] + torch.arange(ground_width)) % 64  # [Ng, Na, Wg]
    crops = aerial[torch.arange(6)[None, :, None], :, :, columns]  # [Ng, Na, Wg, C, H]
    crops = crops.permute(0, 1, 3, 4, 2)
    reference = 2 - 2 * (crops * g[:, None]).sum(dim=(2, 3, 4)) / crops.pow(2).sum(
        dim=(2, 3, 4)).sqrt()
    torch.testing.assert_close(distance, reference, rtol=0, atol=1e-12)
    expected_ground, expected_aerial = torch.autograd.grad((reference * weights).sum(),
                                                           (ground, aerial))
    torch.testing.assert_close(grad_ground, expected_ground, rtol=0, atol=1e-12)
    torch.testing.assert_close(grad_aerial, expected_aerial, rtol=0, atol=1e-12)


def test_window_energy_matches_the_float64_reference_with_vertical_offsets():
    from cvig_engine.model import window_energy
    from cvig_engine.scoring.geometry import window_energy_float64

    aerial = torch.randn((3, 4, 6, 10), dtype=torch.float64,
                         generator=torch.Generator().manual_seed(4))
    energy = window_energy(aerial, 4, 7)
    assert energy.shape == (3, 3, 10)
    np.testing.assert_allclose(energy.numpy(), window_energy_float64(aerial.numpy(), 4, 7),
                               rtol=1e-12)


@pytest.mark.parametrize("ground_width", [64, 12])
def test_distance_at_shift_matches_the_explicit_window_and_its_gradients(ground_width):
    from cvig_engine.model import distance_at_shift

    rng = np.random.default_rng(7 + ground_width)
    ground = torch.tensor(rng.normal(size=(5, 3, 2, ground_width)), requires_grad=True)
    aerial = torch.tensor(rng.normal(size=(5, 3, 2, 64)), requires_grad=True)
    shift = torch.tensor([0, 63, 17, 52, 5])
    distance = distance_at_shift(ground, aerial, shift)
    for i in range(5):  # float64 reference: the window's columns taken one by one
        g = ground[i].detach().numpy()
        g = g / np.sqrt((g ** 2).sum())
        columns = [(int(shift[i]) + k) % 64 for k in range(ground_width)]
        crop = aerial[i].detach().numpy()[:, :, columns]
        expected = 2 - 2 * (crop * g).sum() / np.sqrt((crop ** 2).sum())
        assert distance[i].item() == pytest.approx(expected, abs=1e-12)
    assert torch.autograd.gradcheck(lambda g, a: distance_at_shift(g, a, shift), (ground, aerial))
    # At the searched shift it is the searched distance.
    searched, best = orientation_distance(ground, aerial)
    torch.testing.assert_close(distance_at_shift(ground, aerial, best.diagonal().clone()),
                               searched.diagonal(), rtol=0, atol=1e-12)
