"""`cvig_engine.evaluate` and `cvig-engine evaluate`: metrics against hand-computed ranks and
headings, the t-test against scipy, reports and plots from SCORES.h5 files written here."""
import json
import math
import statistics
import struct
import subprocess
import sys
import warnings

import h5py
import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

from cvig_engine.cli import main
from cvig_engine.errors import CvigInputError
from cvig_engine.evaluate import (evaluate_scores, heading_metrics, load_scores, parse_groups,
                                  ranks_from_distances, recall_at_k, retrieval_metrics,
                                  two_sample_t_test)
from cvig_engine.evaluate.plots import FIGURE_PIXELS


def write_scores(path, ranks, num_tiles, *, match=None, city=None, true_shift=None, heading=None,
                 tie_rule="pessimistic", distance=None, fov_deg=70.0, aerial_width=64):
    """A SCORES.h5 file in the layout `cvig-engine score` writes."""
    ranks = np.asarray(ranks, dtype=np.int64)
    num_queries = ranks.size
    if match is None:
        match = np.where(ranks >= 1, np.arange(num_queries) % num_tiles, -1)
    if true_shift is None:
        true_shift = np.zeros(num_queries, dtype=np.int32)
    if heading is None:
        heading = np.full(num_queries, np.nan)
    with h5py.File(path, "w") as handle:
        handle["rank"] = ranks
        handle["true_distance"] = np.linspace(0, 1, num_queries).astype(np.float32)
        handle["true_shift"] = np.asarray(true_shift, dtype=np.int32)
        handle["topk/index"] = np.zeros((num_queries, 3), dtype=np.int64)
        handle["topk/distance"] = np.zeros((num_queries, 3), dtype=np.float32)
        handle["topk/shift"] = np.zeros((num_queries, 3), dtype=np.int32)
        handle["query/ids"] = np.array([f"q{row}" for row in range(num_queries)],
                                       dtype=h5py.string_dtype())
        handle["query/heading"] = np.asarray(heading, dtype=np.float32)
        handle["query/match"] = np.asarray(match, dtype=np.int64)
        if distance is not None:
            handle["distance"] = np.asarray(distance, dtype=np.float32)
        handle.attrs.update({
            "metrics": "{}", "tie_rule": tie_rule, "device": "cpu", "kernel": "direct",
            "precision": "fp32", "elapsed_seconds": 0.25, "features_sha256": "0" * 64,
            "fov_deg": fov_deg, "num_tiles": num_tiles, "aerial_width": aerial_width,
            "ground_width": 12})
        if city is not None:
            handle.attrs["city"] = city
    return path


def brute_force_ranks(distance, match, tie_rule):
    """Rank of each true tile by comparing it with every tile, one pair at a time."""
    ranks = []
    for row, true_tile in enumerate(match):
        if true_tile < 0:
            ranks.append(0)
            continue
        true_distance = float(distance[row][true_tile])
        if tie_rule == "pessimistic":
            ranks.append(sum(1 for value in distance[row] if float(value) <= true_distance))
        else:
            ranks.append(1 + sum(1 for value in distance[row] if float(value) < true_distance))
    return np.array(ranks)


def png_size(path):
    """(width, height) read from the PNG signature and IHDR chunk."""
    data = path.read_bytes()[:24]
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and data[12:16] == b"IHDR"
    return struct.unpack(">II", data[16:24])


# ----------------------------------------------------------------------------- metrics


def test_retrieval_metrics_hand_computed():
    # Known ranks 1, 3, 3, 10, 50 of 500 tiles; 0 and -1 are unknown matches.
    metrics = retrieval_metrics(np.array([1, 3, 3, 10, 50, 0, -1]), num_tiles=500)
    assert metrics == pytest.approx({
        "num_queries": 5, "top1": 20.0, "top5": 60.0, "top10": 80.0,
        "top1pct": 60.0,  # rank * 100 <= 500 means rank <= 5
        "mean_rank": 13.4, "median_rank": 3.0})


def test_top1pct_boundary_and_small_databases():
    # 1000 tiles: rank 10 is inside top-1% (10 * 100 <= 1000), rank 11 is not.
    assert retrieval_metrics(np.array([10, 11]), 1000)["top1pct"] == 50.0
    # Fewer than 100 tiles: no rank satisfies rank * 100 <= M.
    assert retrieval_metrics(np.array([1, 1]), 99)["top1pct"] == 0.0
    assert retrieval_metrics(np.array([1, 2, 3, 4]), 8)["median_rank"] == 2.5


def test_retrieval_metrics_without_known_queries_and_bad_ranks():
    empty = retrieval_metrics(np.array([0, -1]), 10)
    assert empty["num_queries"] == 0 and empty["top1"] is None and empty["mean_rank"] is None
    with pytest.raises(CvigInputError, match="row 1: rank 11 exceeds"):
        retrieval_metrics(np.array([2, 11]), 10)


def test_recall_at_k_hand_computed():
    recall = recall_at_k(np.array([1, 2, 2, 5, 0]), [1, 2, 3, 5, 10])
    np.testing.assert_allclose(recall, [25.0, 75.0, 75.0, 100.0, 100.0])


def test_ranks_from_distances_ties_hand_computed():
    distance = np.array([
        [0.5, 0.2, 0.5, 0.9, 0.5],  # true tile 0 ties with tiles 2 and 4
        [0.1, 0.1, 0.1, 0.1, 0.1],  # everything ties
        [0.3, 0.2, 0.1, 0.4, 0.0],  # true tile 3, no tie
        [0.0, 0.0, 0.0, 0.0, 0.0],  # unknown match
    ])
    match = np.array([0, 4, 3, -1])
    np.testing.assert_array_equal(ranks_from_distances(distance, match, "pessimistic"),
                                  [4, 5, 5, 0])
    np.testing.assert_array_equal(ranks_from_distances(distance, match, "optimistic"),
                                  [2, 1, 5, 0])


def test_ranks_from_distances_match_brute_force_in_blocks():
    rng = np.random.default_rng(3)
    # Coarse values so that ties are frequent; blocks of 4 rows exercise the streaming.
    distance = rng.integers(0, 6, size=(23, 17)) / 4.0
    match = rng.integers(-1, 17, size=23)
    for tie_rule in ("pessimistic", "optimistic"):
        np.testing.assert_array_equal(
            ranks_from_distances(distance, match, tie_rule, block_rows=4),
            brute_force_ranks(distance, match, tie_rule))
    distance[5, 2] = np.nan
    match[5] = 1
    with pytest.raises(CvigInputError, match="row 5"):
        ranks_from_distances(distance, match, "pessimistic", block_rows=4)


def test_heading_metrics_hand_computed():
    # fov 70, W 64: bin o faces heading (215 + 5.625 o) mod 360; tolerance 7 degrees.
    true_shift = np.array([0, 1, 2, 63, 26, 5, 9])
    heading = np.array([
        215.0,   # bin 0 exactly: exact, error 0
        215.0,   # bin 1 faces 220.625: error 5.625, within 7
        215.0,   # bin 2 faces 226.25: error 11.25, outside
        215.0,   # bin 63 faces 209.375: error 5.625, within, not exact
        358.0,   # bin 26 faces 1.25: error 3.25 across north; 358 falls in bin 25
        np.nan,  # unknown heading: left out
        100.0,   # masked out below
    ])
    mask = np.array([True] * 6 + [False])
    metrics = heading_metrics(true_shift, heading, 70.0, 64, mask=mask)
    assert metrics == pytest.approx({
        "num_headings": 5, "exact_bin": 20.0, "within_10pct_fov": 80.0, "tolerance_deg": 7.0,
        "median_heading_error_deg": 5.625})
    assert heading_metrics(true_shift, np.full(7, np.nan), 70.0, 64) == {}
    with pytest.raises(CvigInputError, match="row 0: orientation bin 64"):
        heading_metrics(np.array([64]), np.array([10.0]), 70.0, 64)


def test_heading_metrics_full_panorama():
    # fov 360: bin o faces 5.625 o degrees; tolerance 36 degrees.
    # Bin 0 (0 deg) vs 2: exact, error 2. Bin 8 (45) vs 90: error 45, outside. Bin 32 (180) vs
    # 150: error 30, within, but 150 falls in bin 27.
    metrics = heading_metrics(np.array([0, 8, 32]), np.array([2.0, 90.0, 150.0]), 360.0, 64)
    assert metrics == pytest.approx({
        "num_headings": 3, "exact_bin": 100.0 / 3, "within_10pct_fov": 200.0 / 3,
        "tolerance_deg": 36.0, "median_heading_error_deg": 30.0})


# ----------------------------------------------------------------------------- statistics


@pytest.mark.parametrize("sizes", [(3, 3), (5, 2), (1, 4), (8, 6)])
def test_two_sample_t_test_matches_scipy(sizes):
    from scipy import stats

    rng = np.random.default_rng(sum(sizes))
    sample_a = rng.normal(60, 3, sizes[0])
    sample_b = rng.normal(63, 5, sizes[1])
    ours = two_sample_t_test(sample_a, sample_b)
    theirs = stats.ttest_ind(sample_a, sample_b)
    assert ours["t_statistic"] == pytest.approx(theirs.statistic, rel=1e-12)
    assert ours["p_value"] == pytest.approx(theirs.pvalue, rel=1e-9)
    assert ours["degrees_of_freedom"] == sizes[0] + sizes[1] - 2


def test_two_sample_t_test_degenerate_cases():
    from scipy import stats

    constant = two_sample_t_test([5.0, 5.0], [5.0, 5.0])
    assert math.isnan(constant["p_value"])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # scipy warns about constant samples
        assert math.isnan(stats.ttest_ind([5.0, 5.0], [5.0, 5.0]).pvalue)
    separated = two_sample_t_test([1.0, 1.0], [2.0, 2.0])
    assert separated["t_statistic"] == -math.inf and separated["p_value"] == 0.0
    with pytest.raises(CvigInputError, match="three in all"):
        two_sample_t_test([1.0], [2.0])


# ----------------------------------------------------------------------------- reports


def test_report_cities_trials_headings_and_plots(tmp_path):
    paris = [[1, 2, 5, 40, 0], [1, 1, 3, 12, 0], [2, 2, 9, 200, 0]]
    london = [1, 1, 2, 99, 7, 3]
    # Paris headings: shifts 0 and 2 at headings 215 and 215 (errors 0 and 11.25, fov 70).
    for trial, ranks in enumerate(paris):
        write_scores(tmp_path / f"paris_seed{trial}.h5", ranks, 400, city="paris",
                     true_shift=[0, 2, 0, 0, 0], heading=[215, 215, np.nan, np.nan, np.nan])
    write_scores(tmp_path / "london.h5", london, 300)  # no city attribute: its stem labels it
    paths = [tmp_path / f"paris_seed{trial}.h5" for trial in range(3)] + [tmp_path / "london.h5"]
    report = evaluate_scores(paths, tmp_path / "report")

    rows = {row["label"]: row for row in report["rows"]}
    assert list(rows) == ["paris", "london"]
    top1pct = [100.0 * sum(rank <= 4 for rank in ranks[:4]) / 4 for ranks in paris]  # 400 tiles
    assert top1pct == [50.0, 75.0, 50.0]
    assert rows["paris"]["num_trials"] == 3 and rows["paris"]["num_queries"] == 4
    assert rows["paris"]["retrieval"]["top1pct"] == pytest.approx(statistics.mean(top1pct))
    assert rows["paris"]["retrieval_std"]["top1pct"] == pytest.approx(statistics.stdev(top1pct))
    mean_ranks = [statistics.mean(ranks[:4]) for ranks in paris]
    assert rows["paris"]["retrieval"]["mean_rank"] == pytest.approx(statistics.mean(mean_ranks))
    assert rows["london"]["retrieval"] == pytest.approx({
        "top1": 100 * 2 / 6, "top5": 100 * 4 / 6, "top10": 100 * 5 / 6, "top1pct": 100 * 4 / 6,
        "mean_rank": 113 / 6, "median_rank": 2.5})
    assert rows["london"]["retrieval_std"] is None and rows["london"]["heading"] == {}
    assert rows["paris"]["heading"] == pytest.approx({
        "exact_bin": 50.0, "within_10pct_fov": 50.0, "median_heading_error_deg": 5.625,
        "num_headings": 2, "tolerance_deg": 7.0})
    assert rows["paris"]["heading_std"]["exact_bin"] == 0.0

    out = tmp_path / "report"
    assert json.loads((out / "report.json").read_text()) == report
    markdown = (out / "report.md").read_text()
    assert "| london | 1 | 6 | 300 | 33.33 | 66.67 | 83.33 | 66.67 | 18.8 | 2.5 |" in markdown
    assert "**paris** (mean ± std) | 3 | 4 | 400 |" in markdown
    assert "58.33 ± 14.43" in markdown  # top-1% of paris
    assert "![Recall@k](recall_at_k.png)" in markdown and "rank·100 ≤" in markdown
    for name in ("recall_at_k.png", "rank_cdf.png"):
        assert png_size(out / name) == FIGURE_PIXELS
        with Image.open(out / name) as image:
            image.verify()


def test_labels_group_trials_and_mismatched_trials(tmp_path):
    first = write_scores(tmp_path / "a.h5", [1, 3], 10)
    second = write_scores(tmp_path / "b.h5", [2, 2], 10)
    report = evaluate_scores([first, second], tmp_path / "out", labels=["rome", "rome"])
    (row,) = report["rows"]
    assert row["label"] == "rome" and row["retrieval"]["top1"] == 25.0
    other = write_scores(tmp_path / "c.h5", [2, 2], 20)
    with pytest.raises(CvigInputError, match="trials must score the same city"):
        evaluate_scores([first, other], tmp_path / "out", labels=["rome", "rome"])
    with pytest.raises(CvigInputError, match="one label per file"):
        evaluate_scores([first, second], tmp_path / "out", labels=["rome"])
    with pytest.raises(CvigInputError, match="given twice"):
        evaluate_scores([first, tmp_path / "." / "a.h5"], tmp_path / "out")


def test_report_without_known_matches_has_no_plots(tmp_path):
    unknown = write_scores(tmp_path / "unknown.h5", [0, 0], 5)
    report = evaluate_scores([unknown], tmp_path / "out")
    assert report["rows"][0]["retrieval"]["top1"] is None and report["files"]["plots"] == {}
    assert not (tmp_path / "out" / "recall_at_k.png").exists()
    assert "| unknown | 1 | 0 | 5 | — |" in (tmp_path / "out" / "report.md").read_text()


def test_compare_groups_by_t_test_on_the_command_line(tmp_path):
    from scipy import stats

    base = [[1, 2, 30, 30], [1, 1, 30, 30], [3, 30, 30, 30]]  # 100 tiles: top-1% is rank 1
    masks = [[1, 1, 1, 30], [1, 1, 1, 1], [1, 1, 30, 30]]
    for name, trials in (("base", base), ("mask", masks)):
        for trial, ranks in enumerate(trials):
            write_scores(tmp_path / f"{name}_{trial}.h5", ranks, 100, city="oslo")
    result = CliRunner().invoke(main, [
        "evaluate", "--group", f"base={tmp_path}/base_*.h5",
        "--group", f"mask={tmp_path}/mask_0.h5,{tmp_path}/mask_[12].h5", "-o", str(tmp_path / "r")])
    assert result.exit_code == 0, result.output
    report = json.loads((tmp_path / "r" / "report.json").read_text())
    (comparison,) = report["comparisons"]
    top1pct_base, top1pct_masks = [25.0, 50.0, 0.0], [75.0, 100.0, 50.0]
    expected = stats.ttest_ind(top1pct_base, top1pct_masks)
    assert comparison["values_a"] == top1pct_base and comparison["values_b"] == top1pct_masks
    assert comparison["p_value"] == pytest.approx(expected.pvalue, rel=1e-9)
    assert comparison["t_statistic"] == pytest.approx(expected.statistic, rel=1e-12)
    assert [row["label"] for row in report["rows"]] == ["base / oslo", "mask / oslo"]
    markdown = (tmp_path / "r" / "report.md").read_text()
    assert "## Comparison" in markdown and f"{expected.pvalue:.3f}" in markdown
    assert f"mask vs base on oslo (top1pct): t = {expected.statistic:.3f}" in result.output


def test_tie_rule_recount_needs_the_distance_matrix(tmp_path):
    distance = np.array([[0.5, 0.2, 0.5], [0.4, 0.4, 0.1], [0.0, 0.0, 0.0]])
    match = np.array([0, 1, -1])
    stored = write_scores(tmp_path / "matrix.h5", [3, 3, 0], 3, match=match, distance=distance)
    assert load_scores(stored).ranks.tolist() == [3, 3, 0]  # the file's own ranks are kept
    assert load_scores(stored, "optimistic").ranks.tolist() == [2, 2, 0]
    report = evaluate_scores([stored], tmp_path / "out", tie_rule="optimistic")
    assert report["conventions"]["tie_rule"] == "optimistic"
    assert report["runs"][0]["tie_rule_scored"] == "pessimistic"
    assert report["rows"][0]["retrieval"]["mean_rank"] == 2.0
    bare = write_scores(tmp_path / "bare.h5", [3, 3, 0], 3, match=match)
    with pytest.raises(CvigInputError, match="holds no /distance matrix"):
        load_scores(bare, "optimistic")
    dsm = write_scores(tmp_path / "dsm.h5", [2, 2, 0], 3, match=match, tie_rule="optimistic")
    with pytest.raises(CvigInputError, match="different tie rules"):
        evaluate_scores([bare, dsm], tmp_path / "out")


def test_bad_scores_files(tmp_path):
    (tmp_path / "text.h5").write_text("not hdf5")
    with h5py.File(tmp_path / "features.h5", "w") as handle:
        handle["features"] = np.zeros(3)
    write_scores(tmp_path / "high.h5", [1, 12], 10)
    write_scores(tmp_path / "lost.h5", [1, 0], 10, match=[0, 4])
    cases = [("missing.h5", "no such scores file"), ("text.h5", "not an HDF5 file"),
             ("features.h5", "no /rank dataset"),
             ("high.h5", "row 1 \\(query 'q1'\\): rank 12 exceeds"),
             ("lost.h5", "row 1 \\(query 'q1'\\): its match is known but its rank is below 1")]
    for name, message in cases:
        with pytest.raises(CvigInputError, match=message):
            load_scores(tmp_path / name)
    with pytest.raises(CvigInputError, match="matches no file"):
        parse_groups([f"x={tmp_path}/nothing_*.h5"])
    with pytest.raises(CvigInputError, match="NAME=PATTERN"):
        parse_groups(["just_a_path.h5"])
    with pytest.raises(CvigInputError, match="given twice"):
        parse_groups(["x=a.h5", "x=b.h5"])


def test_command_line_exit_codes(tmp_path):
    good = write_scores(tmp_path / "good.h5", [1, 2, 3], 10)
    completed = subprocess.run(
        [sys.executable, "-m", "cvig_engine.cli", "evaluate", str(good), str(tmp_path / "no.h5"),
         "-o", str(tmp_path / "out")], capture_output=True, text=True, timeout=120)
    assert completed.returncode == 2
    assert "no such scores file" in completed.stderr and "Traceback" not in completed.stderr
    result = CliRunner().invoke(main, ["evaluate", str(good), "--ties", "optimistic",
                                       "-o", str(tmp_path / "out")])
    assert result.exit_code == 2 and "holds no /distance matrix" in result.output
    result = CliRunner().invoke(main, ["evaluate", str(good), "-o", str(tmp_path / "out")])
    assert result.exit_code == 0 and "| good | 1 | 3 | 10 |" in result.output
