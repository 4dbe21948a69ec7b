"""`cvig-engine bench`: the commands run at tiny sizes and write valid JSON. Nothing is timed.

Each command runs once (module fixtures) and the tests read its JSON: the keys, the counted
FLOPs against the formula by hand, the latency order, the stages. The naive baseline is
checked against the float64 brute force of ``tests/references.py``.
"""
import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from cvig_engine.bench import naive_per_shift_distances
from cvig_engine.cli import main as cli_main
from references import correlated_features, orientation_distance_reference

REPOSITORY = Path(__file__).resolve().parents[1]
# The scoring benchmark's problem: N queries, M tiles, C16 H4 W64 aerial maps, Wg 13.
QUERIES, TILES, GROUND_WIDTH, NAIVE_QUERIES = 64, 48, 13, 16
E2E_PAIRS = 12
TINY_CEILINGS = ["--ceiling-matmul-size", "128", "--ceiling-copy-mib", "4"]


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """A tiny 360 deg model on quarter-size inputs (ground 32 x 128, polar 32 x 128)."""
    from cvig_engine.model import build_model, model_config, save_checkpoint

    folder = tmp_path_factory.mktemp("bench_model")
    torch.manual_seed(0)
    config = model_config("tiny", fov=360.0, ground_height=32, polar_height=32, polar_width=128,
                          aerial_size=48)
    return save_checkpoint(build_model(config=config), folder / "tiny.safetensors")


@pytest.fixture(scope="module")
def model_dir(checkpoint):
    from cvig_engine.export import export_model

    folder = checkpoint.parent / "model_dir"
    export_model(checkpoint, folder, progress=False)
    return folder


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    return tmp_path_factory.mktemp("bench_results")


def _invoke(arguments):
    result = CliRunner().invoke(cli_main, arguments)
    assert result.exit_code == 0, result.output + repr(result.exception)
    return result


@pytest.fixture(scope="module")
def score_record(results):
    """`bench score` as a real subprocess (its own children measure peak RSS)."""
    out = results / "score.json"
    command = [sys.executable, "-m", "cvig_engine.cli", "bench", "score", "--n", str(QUERIES),
               "--m", str(TILES), "--wg", str(GROUND_WIDTH), "--device", "cpu", "--threads", "1",
               "--naive-queries", str(NAIVE_QUERIES), "--no-progress", "--out", str(out),
               "--tile", "16x24", *TINY_CEILINGS]
    completed = subprocess.run(command, capture_output=True, text=True,
                               env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert completed.returncode == 0, completed.stderr
    assert "speed-up" in completed.stdout
    return json.loads(out.read_text())


@pytest.fixture(scope="module")
def encode_record(model_dir, results):
    out = results / "encode.json"
    _invoke(["bench", "encode", "--model", str(model_dir), "--backend", "onnxruntime",
             "--backend", "torch", "--device", "cpu", "--batch", "2", "--warmup", "1",
             "--repeats", "3", "--threads", "1", "--out", str(out)])
    return json.loads(out.read_text())


@pytest.fixture(scope="module")
def e2e_record(checkpoint, results, tmp_path_factory):
    out = results / "e2e.json"
    work = tmp_path_factory.mktemp("bench_e2e")
    _invoke(["bench", "e2e", "--checkpoint", str(checkpoint), "--work-dir", str(work),
             "--pairs", str(E2E_PAIRS), "--tile-size", "48", "--pano-height", "32",
             "--pano-width", "128", "--backend", "onnxruntime", "--device", "cpu", "--workers", "0",
             "--score-device", "cpu", "--no-progress", "--out", str(out)])
    return json.loads(out.read_text()), work


def _check_machine(record, kind):
    assert record["kind"] == kind
    machine = record["machine"]
    for key in ("hostname", "cpu_model", "logical_cores", "cores_available", "memory", "gpu",
                "versions", "load_average_1min_at_start"):
        assert key in machine
    assert machine["logical_cores"] >= 1 and machine["versions"]["torch"] == torch.__version__
    assert len(record["load_average_end"]) == 3


# -- the naive baseline -----------------------------------------------------------------------


@pytest.mark.parametrize("ground_width", [5, 16])
def test_naive_baseline_matches_float64_reference(ground_width):
    rng = np.random.default_rng(ground_width)
    ground, aerial, _, _ = correlated_features(rng, 5, 4, ground_width, channels=3, height=2,
                                               aerial_width=16)
    # a tile of period 8: its correlation ties exactly at o and o + 8, and the first must win
    aerial[3] = np.tile(aerial[3][:, :, :8], (1, 1, 2))
    distance, shift = naive_per_shift_distances(torch.from_numpy(ground).float(),
                                                torch.from_numpy(aerial).float())
    expected_distance, expected_shift, _ = orientation_distance_reference(ground, aerial)
    np.testing.assert_allclose(distance.numpy(), expected_distance, atol=2e-5)
    np.testing.assert_array_equal(shift.numpy(), expected_shift)
    assert (shift[:, 3] < 8).all()


# -- bench score ------------------------------------------------------------------------------


def test_bench_score_json(score_record):
    record = score_record
    _check_machine(record, "score")
    settings, engine, naive = record["settings"], record["engine"], record["naive"]
    assert (settings["num_queries"], settings["num_tiles"], settings["ground_width"]) == \
        (QUERIES, TILES, GROUND_WIDTH)
    assert settings["device"] == "cpu" and engine["kernel"].startswith("cpu-")
    assert settings["tile"] == [16, 24]  # reaches the scoring child (a JSON list there)
    # direct count by hand: 2 multiply-adds' FLOPs x W shifts x C H Wg per shift
    direct_per_pair = 2 * 64 * 16 * 4 * GROUND_WIDTH
    assert engine["flops_per_pair_direct"] == direct_per_pair
    seconds = engine["seconds"]
    assert engine["tflops_direct_count"] * 1e12 * seconds == \
        pytest.approx(direct_per_pair * QUERIES * TILES)
    assert engine["pairs_per_second"] * seconds == pytest.approx(QUERIES * TILES)
    assert 0 < engine["flops_per_pair_algorithm"] < direct_per_pair  # spectral at Wg 13
    assert engine["metrics"]["num_queries"] == QUERIES
    assert engine["peak_rss_bytes"] > 0 and naive["peak_rss_bytes"] > 0
    assert naive["queries_timed"] == NAIVE_QUERIES and naive["extrapolated"] is True
    assert naive["seconds"] == pytest.approx(naive["seconds_timed"] * QUERIES / NAIVE_QUERIES)
    assert record["speedup_over_naive"] == pytest.approx(naive["seconds"] / seconds)
    assert record["speedup_over_naive"] > 0
    assert naive["rank_agreement"] == 1.0  # float32 baseline and engine rank alike here
    ceilings = record["ceilings"]
    assert ceilings["matmul_size"] == 128 and ceilings["matmul_tflops"] > 0
    assert ceilings["copy_bytes_read_and_written"] == 2 * 4 * 2**20  # read + written
    assert ceilings["copy_gb_per_s"] > 0
    assert engine["fraction_of_matmul_ceiling"] == pytest.approx(
        engine["tflops_algorithm_count"] / ceilings["matmul_tflops"])


@pytest.mark.parametrize("arguments, message", [
    (["--n", "0", "--m", "4"], "--n must be at least 1"),
    (["--n", "4", "--m", "4", "--wg", "65"], "--wg must be in 1..64"),
    (["--n", "4", "--m", "4", "--device", "cpu", "--precision", "bf16"], "needs a CUDA GPU"),
])
def test_bench_score_bad_options_exit_2(arguments, message, tmp_path):
    result = CliRunner().invoke(cli_main, ["bench", "score", *arguments, "--out",
                                           str(tmp_path / "x.json")])
    assert result.exit_code == 2 and message in result.output
    assert not (tmp_path / "x.json").exists()


# -- bench encode -----------------------------------------------------------------------------


def test_bench_encode_json(encode_record):
    record = encode_record
    _check_machine(record, "encode")
    assert record["skipped"] == []
    assert [(run["backend"], run["device"], run["precision"]) for run in record["runs"]] == \
        [("onnxruntime", "cpu", "fp32"), ("torch", "cpu", "fp32")]
    for run in record["runs"]:
        assert run["description"]["backend"] == run["backend"]
        shapes = {role: result["input_shape"] for role, result in run["roles"].items()}
        assert shapes == {"ground": [2, 3, 32, 128], "aerial": [2, 3, 32, 128]}
        for result in run["roles"].values():
            latency = result["latency_ms"]
            assert 0 < latency["min"] <= latency["p50"] <= latency["p95"] <= latency["p99"] \
                <= latency["max"]
            assert result["images_per_second"] == pytest.approx(2 / (latency["p50"] / 1e3))


def test_bench_encode_not_a_model_dir_exit_2(tmp_path):
    result = CliRunner().invoke(cli_main, ["bench", "encode", "--model", str(tmp_path)])
    assert result.exit_code == 2 and "not an exported model directory" in result.output


# -- bench e2e --------------------------------------------------------------------------------


def test_bench_e2e_json(e2e_record):
    record, work = e2e_record
    _check_machine(record, "e2e")
    stages = record["stages"]
    assert list(stages) == ["synth", "export", "embed", "score", "evaluate"]
    assert all(stage["seconds"] > 0 for stage in stages.values())
    assert record["total_seconds"] == pytest.approx(sum(s["seconds"] for s in stages.values()))
    assert stages["synth"]["test_pairs"] == E2E_PAIRS
    with open(work / "data" / "test.csv", newline="") as handle:
        rows = list(csv.DictReader(handle))
    usable = sum(row["usable"] == "1" for row in rows)  # embed leaves out usable = 0 rows
    assert len(rows) == E2E_PAIRS and usable >= E2E_PAIRS - 2
    assert stages["embed"]["ground"] == usable and stages["score"]["num_queries"] == usable
    assert record["metrics"]["num_queries"] == usable
    assert record["model"]["backbone"] == "tiny" and record["work_dir"] == str(work)
    assert (work / "report" / "report.json").is_file() and (work / "scores.h5").is_file()


# -- the summary table ------------------------------------------------------------------------


def test_summarize_keeps_the_newest_result_per_configuration(score_record, encode_record,
                                                             e2e_record, results, tmp_path):
    older = dict(score_record, created="2000-01-01T00:00:00+00:00")
    (results / "score_older.json").write_text(json.dumps(older))
    (results / "notes.json").write_text(json.dumps({"something": "else"}))
    out = tmp_path / "RESULTS.md"
    completed = subprocess.run([sys.executable, str(REPOSITORY / "benchmarks" / "summarize.py"),
                                "--results", str(results), "--out", str(out)],
                               capture_output=True, text=True)
    assert completed.returncode == 0, completed.stderr
    text = out.read_text()
    rows = [line for line in text.splitlines() if line.startswith("| ") and "---" not in line]
    files = [line.rstrip(" |").rsplit("| ", 1)[1] for line in rows if line.endswith(".json |")]
    # one scoring configuration (newest file only), 2 backends x 2 encoders, one e2e run
    assert sorted(files) == ["e2e.json"] + ["encode.json"] * 4 + ["score.json"]
    score_row = next(line for line in rows if line.endswith("score.json |"))
    assert f"{QUERIES:,} × {TILES:,}" in score_row
    assert f"{score_record['speedup_over_naive']:.1f}×" in score_row
    assert "(extrapolated)" in score_row
    assert "`notes.json`" in text


def test_bench_e2e_missing_checkpoint_exit_2(tmp_path):
    result = CliRunner().invoke(cli_main, ["bench", "e2e", "--checkpoint",
                                           str(tmp_path / "missing.safetensors")])
    assert result.exit_code == 2 and "checkpoint not found" in result.output
