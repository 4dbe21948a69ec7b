"""`cvig-engine score` on the CPU against independent float64 brute force (tests/references.py)."""
import json
import os
import signal
import subprocess
import sys
import time

import h5py
import numpy as np
import pytest
import torch
from click.testing import CliRunner

from cvig_engine.cli import main
from cvig_engine.scoring import score_feature_store
from cvig_engine.scoring.geometry import Geometry, window_energy_float64
from cvig_engine.scoring.tiles import TileScorer
from cvig_engine.store import write_feature_store
from references import (correlated_features, orientation_distance_reference, ranks_reference,
                        topk_reference, vertical_distance_reference)

# A pair is a "shift near-tie" when its two largest float64 correlations differ by less than this
# fraction of the largest |correlation|: float32 paths may then pick the other shift (their
# correlation errors are ~1e-7 relative). Only such pairs may disagree with the brute force.
SHIFT_NEAR_TIE = 2e-6


def shift_near_ties(correlation):
    """Boolean [Ng, Na]: pairs whose top-2 correlations are within SHIFT_NEAR_TIE."""
    top_two = np.sort(correlation, axis=2)[..., -2:]
    scale = np.abs(correlation).max(axis=2)
    return (top_two[..., 1] - top_two[..., 0]) < SHIFT_NEAR_TIE * scale


def make_problem(seed, num_ground, num_aerial, ground_width, **kwargs):
    """Correlated features whose ranks spread: each query gets its own noise level.

    A wrong tile's best normalised correlation is about 2.4 / sqrt(C H Wg); noise up to
    0.8 sqrt(C H Wg) times the signal brings the true one down to that level for some queries.
    """
    rng = np.random.default_rng(seed)
    size = kwargs.get("channels", 16) * kwargs.get("height", 4) * ground_width
    noise = rng.uniform(0.0, 0.8 * np.sqrt(size), (num_ground, 1, 1, 1))
    return correlated_features(rng, num_ground, num_aerial, ground_width, noise=noise, **kwargs)


_REFERENCES = {}


def reference_for(key, ground, aerial):
    """Float64 brute force, computed once per problem."""
    if key not in _REFERENCES:
        _REFERENCES[key] = orientation_distance_reference(ground, aerial)
    return _REFERENCES[key]


def read_scores(path):
    with h5py.File(path, "r") as handle:
        arrays = {name: handle[name][()] for name in
                  ("rank", "true_distance", "true_shift", "topk/index", "topk/distance",
                   "topk/shift",
                   "query/match", "query/heading")}
        if "distance" in handle:
            arrays["distance"] = handle["distance"][()]
        arrays["attrs"] = dict(handle.attrs)
    return arrays


@pytest.mark.parametrize("ground_width, algorithm, tie_rule", [
    (64, "spectral", "pessimistic"), (13, "spectral", "optimistic"), (13, "direct", "pessimistic")])
def test_scores_match_float64_brute_force(tmp_path, ground_width, algorithm, tie_rule):
    ground, aerial, match, true_shifts = make_problem(ground_width, 41, 29, ground_width)
    match[[3, 17]] = -1  # unknown true tiles: top-K but no rank
    features = write_feature_store(tmp_path / "features.h5", ground_features=ground,
                                   aerial_features=aerial, match=match)
    tile = (8, 6) if algorithm == "spectral" else (24, 16)  # partial blocks on both axes
    summary = score_feature_store(features, tmp_path / "scores.h5", topk=7, tile=tile,
                                  store_matrix=True, ties=tie_rule, algorithm=algorithm,
                                  progress=False)
    assert summary["kernel"] == f"cpu-{algorithm}"
    scores = read_scores(tmp_path / "scores.h5")
    distance, shift, correlation = reference_for((ground_width, 41, 29), ground, aerial)
    near = shift_near_ties(correlation)
    assert near.sum() <= 3  # a handful at most on these features
    clean = ~near.any(axis=1)

    known = match >= 0
    expected_ranks = ranks_reference(distance, match, tie_rule)
    np.testing.assert_array_equal(scores["rank"][clean], expected_ranks[clean])
    assert np.all(scores["rank"][~known] == 0)
    assert len(set(expected_ranks[known])) > 5, "ranks should spread on these features"
    rows = np.flatnonzero(known)
    np.testing.assert_allclose(scores["true_distance"][rows], distance[rows, match[rows]],
                               atol=1e-6)
    np.testing.assert_array_equal(scores["true_shift"][rows], shift[rows, match[rows]])
    assert np.all(np.isnan(scores["true_distance"][~known]))
    assert np.all(scores["true_shift"][~known] == -1)
    # Low-noise queries recover the shift their ground map was cut at.
    assert np.mean(scores["true_shift"][rows] == true_shifts[rows]) > 0.5

    expected_topk = topk_reference(distance, 7)
    np.testing.assert_array_equal(scores["topk/index"][clean], expected_topk[clean])
    picked = np.take_along_axis(distance, scores["topk/index"], 1)
    np.testing.assert_allclose(scores["topk/distance"], picked, atol=1e-6)
    np.testing.assert_array_equal(scores["topk/shift"][clean],
                                  np.take_along_axis(shift, scores["topk/index"], 1)[clean])

    matrix = scores["distance"]
    np.testing.assert_allclose(matrix[~near], distance[~near], atol=2e-6)
    np.testing.assert_array_equal(matrix[rows, match[rows]], scores["true_distance"][rows])

    metrics = json.loads(scores["attrs"]["metrics"])
    known_ranks = expected_ranks[known]
    assert metrics["num_queries"] == known.sum()
    assert metrics["top1"] == pytest.approx(100.0 * np.mean(known_ranks <= 1))
    assert metrics["top5"] == pytest.approx(100.0 * np.mean(known_ranks <= 5))
    assert metrics["mean_rank"] == pytest.approx(known_ranks.mean())
    assert metrics["median_rank"] == pytest.approx(np.median(known_ranks))
    assert scores["attrs"]["tie_rule"] == tie_rule and scores["attrs"]["num_tiles"] == 29
    np.testing.assert_array_equal(scores["query/match"], match)


def vertical_problem(seed, num_ground, num_aerial, max_noise):
    """2 x 6 ground maps cut from 5 x 16 tiles at random (offset, shift), plus noise."""
    rng = np.random.default_rng(seed)
    aerial = rng.standard_normal((num_aerial, 4, 5, 16))
    ground = np.empty((num_ground, 4, 2, 6))
    for n in range(num_ground):
        v, o = rng.integers(0, 4), rng.integers(0, 16)
        ground[n] = aerial[n % num_aerial][:, v:v + 2, (o + np.arange(6)) % 16]
    ground += rng.uniform(0, max_noise, (num_ground, 1, 1, 1)) * rng.standard_normal(ground.shape)
    return ground, aerial, np.arange(num_ground) % num_aerial


def test_vertical_search_matches_brute_force(tmp_path):
    ground, aerial, match = vertical_problem(4, 11, 9, 3.0)
    features = write_feature_store(tmp_path / "features.h5", ground_features=ground,
                                   aerial_features=aerial,
                                   match=match, attrs={"model_config": {"vertical_search": True}})
    score_feature_store(features, tmp_path / "scores.h5", topk=4, tile=(4, 5), progress=False)
    distance, flat_shift, correlation = vertical_distance_reference(ground, aerial)
    near = shift_near_ties(correlation)
    clean = ~near.any(axis=1)
    with h5py.File(tmp_path / "scores.h5", "r") as handle:
        rows = np.arange(11)
        true_flat = handle["true_vertical"][()] * 16 + handle["true_shift"][()]
        np.testing.assert_array_equal(true_flat, flat_shift[rows, match])
        np.testing.assert_allclose(handle["true_distance"][()], distance[rows, match], atol=1e-6)
        np.testing.assert_array_equal(handle["rank"][()][clean],
                                      ranks_reference(distance, match, "pessimistic")[clean])
        index = handle["topk/index"][()]
        np.testing.assert_array_equal(index[clean], topk_reference(distance, 4)[clean])
        topk_flat = handle["topk/vertical"][()] * 16 + handle["topk/shift"][()]
        np.testing.assert_array_equal(topk_flat, np.take_along_axis(flat_shift, index, 1))


@pytest.mark.parametrize("shape", [
    # (H, Ha, Wg, W): odd width (no radix-2 split), width 1, narrow and full windows, vertical.
    (3, 3, 5, 15), (3, 3, 15, 15), (1, 1, 1, 1), (2, 2, 3, 8), (2, 4, 8, 8), (2, 4, 3, 8)])
@pytest.mark.parametrize("algorithm", ["spectral", "direct"])
def test_tile_distances_match_brute_force_for_other_shapes(shape, algorithm):
    height, aerial_height, ground_width, width = shape
    rng = np.random.default_rng(sum(shape))
    ground = rng.standard_normal((5, 3, height, ground_width))
    aerial = rng.standard_normal((7, 3, aerial_height, width))
    geometry = Geometry.from_shapes(ground.shape[1:], aerial.shape[1:])
    energy = window_energy_float64(aerial, height, ground_width)
    scorer = TileScorer(geometry, aerial.astype(np.float32), energy, device="cpu",
                        algorithm=algorithm, tile_aerial=3)
    operands = scorer.query_operands(ground.astype(np.float32))
    distance = torch.cat([scorer.tile_distances(operands,
                                                block) for block in range(len(scorer.blocks))], 1)
    expected, _, _ = vertical_distance_reference(ground, aerial)
    np.testing.assert_allclose(distance.numpy(), expected, atol=2e-6)


def test_exact_ties_follow_the_tie_rule_and_lower_index_first(tmp_path):
    rng = np.random.default_rng(8)
    base = rng.standard_normal((5, 16, 4, 64))
    # Tiles 0, 5, 6, ..., 23 are copies of base[0]; 1..4 are other tiles.
    aerial = np.concatenate([base[:1], base[1:], np.repeat(base[:1], 19, axis=0)])
    ground = np.stack([np.roll(base[0], -3, axis=-1), np.roll(base[2], -5, axis=-1)])
    ground = ground + 0.5 * rng.standard_normal(ground.shape)
    match = np.array([6, 2])  # query 0's true tile has 19 exact copies elsewhere
    features = write_feature_store(tmp_path / "features.h5", ground_features=ground,
                                   aerial_features=aerial,
                                   match=match)
    expected, _, _ = orientation_distance_reference(ground, aerial)
    duplicates = [0] + list(range(5, 24))
    assert np.ptp(expected[0, duplicates]) == 0.0  # the brute force sees exact ties
    for tie_rule in ("pessimistic", "optimistic"):
        out = tmp_path / f"{tie_rule}.h5"
        # 8 copies in the first block of 12 tiles, more than the 2 + 5 candidates kept.
        score_feature_store(features, out, topk=2, tile=(2, 12), ties=tie_rule, progress=False)
        scores = read_scores(out)
        np.testing.assert_array_equal(scores["rank"], ranks_reference(expected, match, tie_rule))
        np.testing.assert_array_equal(scores["topk/index"], topk_reference(expected, 2))
    assert read_scores(tmp_path / "pessimistic.h5")["rank"][0] == 20
    assert read_scores(tmp_path / "optimistic.h5")["rank"][0] == 1
    np.testing.assert_array_equal(read_scores(out)["topk/index"][0], [0, 5])


def test_heading_metrics_where_headings_are_known(tmp_path):
    _, aerial, match, true_shifts = make_problem(5, 12, 10, 64)
    # Each photo is its tile's window at a known shift, so the recovered bin is that shift.
    ground = np.stack([np.roll(aerial[m], -s, axis=-1) for m, s in zip(match, true_shifts)])
    fov = 360.0
    # The heading whose bin is the recovered shift (polar.py convention), NaN for two photos.
    heading = np.mod(180.0 + true_shifts * 360.0 / 64 + fov / 2.0, 360.0).astype(np.float32)
    heading[[0, 1]] = np.nan
    features = write_feature_store(tmp_path / "features.h5", ground_features=ground,
                                   aerial_features=aerial,
                                   match=match, heading=heading, attrs={"fov_deg": fov,
                                                                        "city": "testville"})
    score_feature_store(features, tmp_path / "scores.h5", progress=False)
    scores = read_scores(tmp_path / "scores.h5")
    metrics = json.loads(scores["attrs"]["metrics"])
    assert metrics["num_headings"] == 10 and metrics["exact_bin"] == 100.0
    np.testing.assert_array_equal(scores["query/heading"][2:], heading[2:])
    assert scores["attrs"]["city"] == "testville" and scores["attrs"]["fov_deg"] == fov


def test_cli_prints_metrics_and_completed_runs_are_not_recomputed(tmp_path):
    ground, aerial, match, _ = make_problem(6, 20, 15, 13)
    write_feature_store(tmp_path / "f.h5", ground_features=ground, aerial_features=aerial,
                        match=match)
    arguments = ["score", "--features", str(tmp_path / "f.h5"), "-o", str(tmp_path / "s.h5"),
                 "--device", "cpu", "--tile", "8x4", "--no-progress"]
    result = CliRunner().invoke(main, arguments)
    assert result.exit_code == 0, result.output
    for text in ("top-1%", "median rank", "written"):
        assert text in result.output
    before = read_scores(tmp_path / "s.h5")
    again = CliRunner().invoke(main, arguments)
    assert again.exit_code == 0 and "already complete" in again.output
    after = read_scores(tmp_path / "s.h5")
    assert before["attrs"]["elapsed_seconds"] == after["attrs"]["elapsed_seconds"]
    np.testing.assert_array_equal(before["topk/index"], after["topk/index"])


def _write_bad_store(path, **changes):
    rng = np.random.default_rng(0)
    arrays = {"ground_features": rng.standard_normal((6, 4, 2, 8)),
              "aerial_features": rng.standard_normal((5, 4, 2, 8)),
              "match": np.array([0, 1, 2, 3, 4, -1])}
    arrays.update(changes)
    write_feature_store(path, **arrays)


@pytest.mark.parametrize("changes, message", [
    ({"aerial_features": np.zeros((5, 3, 2, 8))}, "different channel counts"),
    ({"aerial_features": np.ones((5, 4, 3, 8))}, "heights differ"),
    ({"ground_features": np.ones((6, 4, 2, 9))}, "wider than the aerial map"),
    ({"match": np.array([0, 1, 2, 3, 5, -1])}, "/ground/match row 4 is 5"),
])
def test_bad_feature_stores_exit_with_code_2(tmp_path, changes, message):
    _write_bad_store(tmp_path / "bad.h5", **changes)
    result = CliRunner().invoke(main, ["score", "--features", str(tmp_path / "bad.h5"),
                                       "-o", str(tmp_path / "s.h5"), "--no-progress"])
    assert result.exit_code == 2, result.output
    assert message in result.output and "bad.h5" in result.output
    assert "Traceback" not in result.output
    assert not (tmp_path / "s.h5").exists()


@pytest.mark.parametrize("role, row, value, kind", [("ground", 4, np.nan, "NaN"), ("aerial", 2,
                                                                                   np.inf, "Inf")])
def test_non_finite_features_name_the_dataset_and_row(tmp_path, role, row, value, kind):
    rng = np.random.default_rng(1)
    features = {"ground": rng.standard_normal((6, 4, 2, 8)), "aerial": rng.standard_normal((5, 4,
                                                                                            2, 8))}
    features[role][row, 1, 0, 3] = value
    write_feature_store(tmp_path / "bad.h5", ground_features=features["ground"],
                        aerial_features=features["aerial"], match=np.arange(6) % 5)
    result = CliRunner().invoke(main, ["score", "--features", str(tmp_path / "bad.h5"),
                                       "-o", str(tmp_path / "s.h5"), "--no-progress"])
    assert result.exit_code == 2
    assert f"/{role}/features row {row} holds {kind}" in result.output


def test_store_made_by_another_model_is_refused(tmp_path):
    _write_bad_store(tmp_path / "f.h5", attrs={"model_sha256": "a" * 64})
    from cvig_engine.errors import CvigInputError

    with pytest.raises(CvigInputError, match="made by another model"):
        score_feature_store(tmp_path / "f.h5", tmp_path / "s.h5", expected_model_sha256="b" * 64,
                            progress=False)
    score_feature_store(tmp_path / "f.h5", tmp_path / "s.h5", expected_model_sha256="a" * 64,
                        progress=False)


def test_cuda_options_are_refused_without_a_gpu(tmp_path):
    if torch.cuda.is_available():
        pytest.skip("this machine has a CUDA GPU")
    _write_bad_store(tmp_path / "f.h5")
    for extra in (["--device", "cuda"], ["--precision", "bf16"]):
        result = CliRunner().invoke(main, ["score", "--features", str(tmp_path / "f.h5"),
                                           "-o", str(tmp_path / "s.h5"), *extra])
        assert result.exit_code == 2 and "CUDA" in result.output


# -- resume -----------------------------------------------------------------------------------

def _resume_problem(tmp_path):
    rng = np.random.default_rng(11)
    aerial = rng.standard_normal((300, 16, 4, 64)).astype(np.float32)
    match = rng.integers(0, 300, 160)
    ground = aerial[match][..., :13] + 20.0 * rng.standard_normal((160, 16, 4,
                                                                   13)).astype(np.float32)
    return write_feature_store(tmp_path / "features.h5", ground_features=ground,
                               aerial_features=aerial,
                               match=match)


def _progress_done(path):
    """Blocks marked done in a scores file another process is writing (0 while it is created)."""
    try:
        with h5py.File(path, "r", locking=False) as handle:
            return int(handle["progress/done"][()].sum())
    except (OSError, KeyError):
        return 0


@pytest.mark.slow
def test_resume_after_sigkill_ends_identical_to_an_uninterrupted_run(tmp_path):
    features = _resume_problem(tmp_path)
    options = dict(topk=5, tile=(8, 128), store_matrix=True, device="cpu", progress=False)
    score_feature_store(features, tmp_path / "whole.h5", **options)

    killed = tmp_path / "killed.h5"
    command = [sys.executable, "-m", "cvig_engine.cli", "score", "--features", str(features), "-o",
               str(killed),
               "--topk", "5", "--tile", "8x128", "--store-matrix", "--device", "cpu",
               "--no-progress"]
    # 20 blocks, each followed by a pause, so that the kill lands part-way through.
    slow = dict(os.environ, CVIG_SCORE_BLOCK_DELAY="0.2")
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=slow)
    deadline = time.monotonic() + 120
    while _progress_done(killed) < 3:
        assert process.poll() is None, process.communicate()
        assert time.monotonic() < deadline
        time.sleep(0.02)
    os.kill(process.pid, signal.SIGKILL)
    process.wait()
    with h5py.File(killed, "r") as handle:
        done = handle["progress/done"][()]
        assert 3 <= done.sum() < len(done) == 20, "the run should have been killed part-way"
        assert not handle.attrs["complete"]

    resumed = subprocess.run(command, capture_output=True, text=True)
    assert resumed.returncode == 0, resumed.stderr
    assert "resumed" in resumed.stdout
    whole, again = read_scores(tmp_path / "whole.h5"), read_scores(killed)
    for name in ("rank", "true_distance", "true_shift", "topk/index", "topk/distance", "topk/shift",
                 "distance"):
        np.testing.assert_array_equal(again[name], whole[name], err_msg=name)
    assert again["attrs"]["metrics"] == whole["attrs"]["metrics"]
    with h5py.File(killed, "r") as handle:
        assert "progress" not in handle and handle.attrs["complete"]


def test_resume_is_refused_when_inputs_or_options_differ(tmp_path):
    ground, aerial, match, _ = make_problem(7, 12, 9, 13)
    features = write_feature_store(tmp_path / "f.h5", ground_features=ground,
                                   aerial_features=aerial,
                                   match=match)
    score_feature_store(features, tmp_path / "s.h5", topk=3, progress=False)
    result = CliRunner().invoke(main, ["score", "--features", str(features), "-o",
                                       str(tmp_path / "s.h5"),
                                       "--topk", "4", "--no-progress"])
    assert result.exit_code == 2 and "topk: was 3, now 4" in result.output
    ground[0, 0, 0, 0] += 1.0
    write_feature_store(features, ground_features=ground, aerial_features=aerial, match=match)
    result = CliRunner().invoke(main, ["score", "--features", str(features), "-o",
                                       str(tmp_path / "s.h5"),
                                       "--topk", "3", "--no-progress"])
    assert result.exit_code == 2 and "features_sha256" in result.output
    (tmp_path / "other.h5").write_bytes(b"not hdf5")
    result = CliRunner().invoke(main, ["score", "--features", str(features), "-o",
                                       str(tmp_path / "other.h5"),
                                       "--no-progress"])
    assert result.exit_code == 2 and "--overwrite" in result.output
    result = CliRunner().invoke(main, ["score", "--features", str(features), "-o",
                                       str(tmp_path / "other.h5"),
                                       "--no-progress", "--overwrite"])
    assert result.exit_code == 0, result.output


@pytest.mark.parametrize("width", [4, 8, 16, 64, 128])
@pytest.mark.parametrize("per_shift", [False, True])
def test_fft_epilogue_matches_a_float64_sum_over_the_spectrum(width, per_shift):
    """The compiled inverse real FFT against corr[o] = Re sum_f P_f e^{2 pi i f o / W} / W."""
    from cvig_engine.scoring.geometry import SpectralLayout
    from cvig_engine.scoring.inverse_fft import FftEpilogue

    layout = SpectralLayout(width)
    rng = np.random.default_rng(width)
    count, tiles = 7, 300  # 2,100 pairs: several chunks, the last one partial
    products = rng.standard_normal((layout.num_rows, count * tiles)).astype(np.float32)
    # Complex spectrum of each pair from its rows (k1 - k3, k1 + k2), then the Hermitian sum.
    spectrum = np.zeros((width // 2 + 1, count * tiles), complex)
    for row, (frequency, kind) in enumerate(layout.rows):
        value = products[row].astype(np.float64)
        if kind == "real":
            spectrum[frequency] += value
        elif kind == "k1":
            spectrum[frequency] += value + 1j * value
        elif kind == "k2":
            spectrum[frequency] += 1j * value
        else:
            spectrum[frequency] -= value
    full = np.concatenate([spectrum, np.conj(spectrum[1:width // 2][::-1])])  # [W, pairs]
    correlation = np.fft.ifft(full, axis=0).real  # [W, pairs], corr[o] per pair
    shift_expected = correlation.argmax(axis=0).reshape(count, tiles)
    roots = rng.uniform(0.5, 2.0, (tiles, width if per_shift else 1)).astype(np.float32)
    best = correlation.max(axis=0).reshape(count, tiles)
    root = roots[np.arange(tiles)[None, :], shift_expected if per_shift else 0]
    distance = np.empty((count, tiles), np.float32)
    shift = np.empty((count, tiles), np.int16)
    FftEpilogue(layout)(products, count, tiles, roots, distance, shift)
    ordered = np.sort(correlation, axis=0)
    clear = (ordered[-1] - ordered[-2]).reshape(count, tiles) > 1e-4  # no float32 near-tie
    assert clear.mean() > 0.9
    np.testing.assert_array_equal(shift[clear], shift_expected[clear])
    np.testing.assert_allclose(distance, 2 - 2 * best * root, atol=2e-6)


def test_fft_epilogue_takes_the_first_of_tied_shifts():
    from cvig_engine.scoring.geometry import SpectralLayout
    from cvig_engine.scoring.inverse_fft import FftEpilogue

    layout = SpectralLayout(8)
    products = np.zeros((layout.num_rows, 3), np.float32)
    dc = [row for row, (frequency, _) in enumerate(layout.rows) if frequency == 0][0]
    products[dc] = [8.0, 0.0, -8.0]  # constant correlation 1, 0, -1: every shift ties
    distance = np.empty((1, 3), np.float32)
    shift = np.full((1, 3), -1, np.int16)
    FftEpilogue(layout)(products, 1, 3, np.ones((3, 8), np.float32), distance, shift)
    np.testing.assert_array_equal(shift, [[0, 0, 0]])
    np.testing.assert_allclose(distance, [[0.0, 2.0, 4.0]], atol=1e-6)


@pytest.mark.parametrize("ties", ["pessimistic", "optimistic"])
def test_fft_epilogue_counts_ranks_flags_near_ties_and_places_true_distances(ties):
    from cvig_engine.scoring.geometry import SpectralLayout
    from cvig_engine.scoring.inverse_fft import FftEpilogue, TileRanks

    layout = SpectralLayout(16)
    epilogue = FftEpilogue(layout)
    rng = np.random.default_rng(9)
    count, tiles, band = 6, 500, 2e-3
    products = rng.standard_normal((layout.num_rows, count * tiles)).astype(np.float32)
    roots = rng.uniform(0.5, 2.0, (tiles, 16)).astype(np.float32)
    plain = np.empty((count, tiles), np.float32)
    epilogue(products, count, tiles, roots, plain, np.empty((count, tiles), np.int16))
    true_distance = np.quantile(plain, [0.1, 0.3, 0.5, 0.7, 0.9, 0.5], axis=1).diagonal().copy()
    true_distance[5] = np.nan  # unknown true tile: nothing counts
    true_distance[2] = plain[2, 17]  # an exact tie with tile 17
    true_column = np.array([3, -1, 40, 499, 0, -1])
    ranks = TileRanks(true_distance, true_column, ties == "pessimistic", band, tiles)
    distance = np.empty((count, tiles), np.float32)
    epilogue(products, count, tiles, roots, distance, np.empty((count, tiles), np.int16), ranks)
    difference = plain - true_distance.astype(np.float32)[:, None]
    is_true = np.zeros((count, tiles), bool)
    rows = np.flatnonzero(true_column >= 0)
    is_true[rows, true_column[rows]] = True
    near = (np.abs(difference) <= band) & ~is_true
    counted = (difference <= 0) if ties == "pessimistic" else (difference < 0)
    np.testing.assert_array_equal(ranks.near, near)
    np.testing.assert_array_equal(ranks.counts, (counted & ~near & ~is_true).sum(axis=1))
    np.testing.assert_array_equal(distance[~is_true], plain[~is_true])
    np.testing.assert_array_equal(distance[rows, true_column[rows]],
                                  true_distance[rows].astype(np.float32))
    assert ranks.counts[5] == 0 and not ranks.near[5].any() and near[2, 17]
    assert ranks.counts[:5].min() > 0 and near.sum() > count
