"""GPU scoring paths against the float64 brute force: the fused CuPy kernel and torch CUDA.

These skip with the reason on machines without a CUDA GPU (or without CuPy for the kernel).
"""
import json

import numpy as np
import pytest

from cvig_engine.scoring import score_feature_store
from cvig_engine.store import write_feature_store
from references import ranks_reference, topk_reference, vertical_distance_reference
from test_scoring import make_problem, read_scores, reference_for, shift_near_ties, vertical_problem


def _check_against_brute_force(scores, distance, shift, correlation, match, tie_rule, topk):
    near = shift_near_ties(correlation)
    assert near.sum() <= 3
    clean = ~near.any(axis=1)
    known = match >= 0
    rows = np.flatnonzero(known)
    np.testing.assert_array_equal(scores["rank"][clean], ranks_reference(distance, match,
                                                                         tie_rule)[clean])
    assert np.all(scores["rank"][~known] == 0)
    np.testing.assert_allclose(scores["true_distance"][rows], distance[rows, match[rows]],
                               atol=1e-6)
    np.testing.assert_array_equal(scores["true_shift"][rows], shift[rows, match[rows]])
    np.testing.assert_array_equal(scores["topk/index"][clean], topk_reference(distance,
                                                                              topk)[clean])
    np.testing.assert_allclose(scores["topk/distance"],
                               np.take_along_axis(distance, scores["topk/index"], 1), atol=1e-6)
    if "distance" in scores:
        np.testing.assert_allclose(scores["distance"][~near], distance[~near], atol=5e-6)
        np.testing.assert_array_equal(scores["distance"][rows, match[rows]],
                                      scores["true_distance"][rows])


def _problem(tmp_path, ground_width, num_ground=70, num_aerial=53):
    ground, aerial, match, _ = make_problem(100 + ground_width, num_ground, num_aerial,
                                            ground_width)
    match[[2, 9]] = -1
    features = write_feature_store(tmp_path / "features.h5", ground_features=ground,
                                   aerial_features=aerial,
                                   match=match)
    distance, shift, correlation = reference_for(("cuda", ground_width, num_ground, num_aerial),
                                                 ground, aerial)
    return features, match, distance, shift, correlation


@pytest.mark.requires_cupy
@pytest.mark.parametrize("ground_width, tie_rule", [(64, "pessimistic"), (13, "optimistic")])
def test_fused_kernel_matches_brute_force(tmp_path, ground_width, tie_rule):
    features, match, distance, shift, correlation = _problem(tmp_path, ground_width)
    # 24 queries per launch: the last of the 16-query thread blocks is partly empty.
    summary = score_feature_store(features, tmp_path / "scores.h5", device="cuda", topk=6,
                                  tile=(24, 8),
                                  ties=tie_rule, store_matrix=True, progress=False)
    assert summary["kernel"] == "cupy-fused-spectral", summary["kernel_fallback_reason"]
    scores = read_scores(tmp_path / "scores.h5")
    _check_against_brute_force(scores, distance, shift, correlation, match, tie_rule, 6)
    np.testing.assert_array_equal(scores["topk/shift"], np.take_along_axis(shift,
                                                                           scores["topk/index"], 1))


@pytest.mark.requires_cupy
def test_fused_kernel_vertical_search(tmp_path):
    ground, aerial, match = vertical_problem(21, 29, 37, 4.0)
    features = write_feature_store(tmp_path / "features.h5", ground_features=ground,
                                   aerial_features=aerial,
                                   match=match, attrs={"model_config": {"vertical_search": True}})
    summary = score_feature_store(features, tmp_path / "scores.h5", device="cuda", topk=4,
                                  progress=False)
    assert summary["kernel"] == "cupy-fused-spectral", summary["kernel_fallback_reason"]
    distance, flat_shift, correlation = vertical_distance_reference(ground, aerial)
    scores = read_scores(tmp_path / "scores.h5")
    clean = ~shift_near_ties(correlation).any(axis=1)
    np.testing.assert_array_equal(scores["rank"][clean], ranks_reference(distance, match,
                                                                         "pessimistic")[clean])
    np.testing.assert_array_equal(scores["topk/index"][clean], topk_reference(distance, 4)[clean])


@pytest.mark.requires_cupy
def test_fused_kernel_near_list_and_counts_cover_every_pair(tmp_path):
    """With a band wider than every distance gap all pairs go to the near list; a tiny list
    capacity makes the wrapper relaunch with a larger one."""
    from cvig_engine.scoring.cuda_kernel import FusedScorer
    from cvig_engine.scoring.geometry import Geometry, window_energy_float64

    ground, aerial, match, _ = make_problem(31, 20, 17, 13)
    geometry = Geometry.from_shapes(ground.shape[1:], aerial.shape[1:])
    energy = window_energy_float64(aerial, 4, 13)
    scorer = FusedScorer(geometry, aerial.astype(np.float32), energy, ties="pessimistic",
                         candidates=5,
                         band=10.0, queries_per_launch=20)
    scorer.near_capacity = 4
    distance, _, _ = reference_for(("cuda", 13, 20, 17), ground, aerial)
    true = distance[np.arange(20), match]
    result = scorer.score(ground.astype(np.float32), match, true, want_matrix=True)
    assert np.all(result["counts"] == 0)
    listed = set(zip(result["near_rows"].tolist(), result["near_tiles"].tolist()))
    expected = {(n, m) for n in range(20) for m in range(17) if m != match[n]}
    assert listed == expected
    np.testing.assert_allclose(result["matrix"], distance, atol=5e-6)
    np.testing.assert_array_equal(result["candidates"]["index"], topk_reference(distance, 5))

    scorer.band = 0.0  # no near list: the kernel counts every pair itself
    result = scorer.score(ground.astype(np.float32), match, true, want_matrix=False)
    expected_counts = ranks_reference(distance, match, "pessimistic") - 1
    near = np.abs(distance - true[:, None]) < 1e-5
    near[np.arange(20), match] = False
    clean = ~near.any(axis=1)
    np.testing.assert_array_equal(result["counts"][clean], expected_counts[clean])


@pytest.mark.requires_cuda
@pytest.mark.parametrize("ground_width, algorithm",
                         [(64, "spectral"), (13, "spectral"), (13, "direct")])
def test_torch_cuda_fallback_matches_brute_force(tmp_path, ground_width, algorithm):
    features, match, distance, shift, correlation = _problem(tmp_path, ground_width)
    summary = score_feature_store(features, tmp_path / "scores.h5", device="cuda", topk=6,
                                  tile=(24, 16),
                                  algorithm=algorithm, store_matrix=True, use_kernel=False,
                                  progress=False)
    assert summary["kernel"] == f"torch-cuda-{algorithm}"
    scores = read_scores(tmp_path / "scores.h5")
    _check_against_brute_force(scores, distance, shift, correlation, match, "pessimistic", 6)


@pytest.mark.requires_cuda
@pytest.mark.parametrize("precision", ["tf32", "bf16"])
def test_reduced_precision_records_rank_changes_against_fp32(tmp_path, precision):
    features, match, distance, _, _ = _problem(tmp_path, 64)
    score_feature_store(features, tmp_path / "scores.h5", device="cuda", precision=precision,
                        progress=False)
    scores = read_scores(tmp_path / "scores.h5")
    check = json.loads(scores["attrs"]["precision_check"])
    assert check["queries_checked"] == int((match >= 0).sum())
    expected = ranks_reference(distance, match, "pessimistic")
    changed = int((scores["rank"] != expected).sum())
    # The fp32 rescoring agrees with the brute force, up to a near-tie or two.
    assert abs(check["ranks_changed"] - changed) <= 2
    assert changed <= len(match) // 4
