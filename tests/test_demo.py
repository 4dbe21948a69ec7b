"""The main job end to end (fast settings), the bundled model, and `locate`."""
import json
import struct
import subprocess
import sys

import h5py
import numpy as np
import pytest

from cvig_engine.demo import bundled_checkpoint


def test_bundled_model_is_small_and_loads():
    from cvig_engine import load_checkpoint

    path = bundled_checkpoint()
    assert path.stat().st_size < 2_000_000
    model = load_checkpoint(path)
    assert model.config["backbone"] == "tiny"
    document = json.loads(path.with_suffix(".json").read_text())
    assert "train_options" in document["metadata"]  # trained by this project's own `train`


@pytest.fixture(scope="module")
def demo_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo")
    completed = subprocess.run(
        [sys.executable, "-m", "cvig_engine.cli", "demo", "-o", str(out), "--fast", "--no-progress"],
        capture_output=True, text=True, timeout=600)
    assert completed.returncode == 0, completed.stderr[-3000:]
    return out, completed


def _png_size(path):
    header = path.read_bytes()[:24]
    assert header[:8] == b"\x89PNG\r\n\x1a\n"
    return struct.unpack(">II", header[16:24])


@pytest.mark.slow
def test_demo_runs_end_to_end_and_teaches_the_commands(demo_dir):
    out, completed = demo_dir
    for command in ("cvig-engine synth", "cvig-engine export", "cvig-engine embed", "cvig-engine score",
                    "cvig-engine evaluate"):
        assert command in completed.stderr
    report = json.loads((out / "report.json").read_text())
    assert (out / "report.md").read_text().startswith("#")
    for name in ("recall_at_k.png", "rank_cdf.png"):
        assert _png_size(out / name) == (960, 600)
    # The report's metrics are the scores file's ranks, recounted here by the definitions.
    with h5py.File(out / "scores.h5", "r") as scores:
        ranks = scores["rank"][()]
        num_tiles = int(scores.attrs["num_tiles"])
    known = ranks[ranks >= 1]
    retrieval = report["rows"][0]["retrieval"]
    assert report["rows"][0]["num_queries"] == len(known) > 0
    assert retrieval["top1pct"] == pytest.approx(np.mean(known * 100 <= num_tiles) * 100)
    assert retrieval["top1"] == pytest.approx(np.mean(known == 1) * 100)
    assert retrieval["median_rank"] == pytest.approx(np.median(known))


@pytest.mark.slow
def test_locate_agrees_with_scoring_and_finds_the_true_tile(demo_dir, tmp_path):
    out, _ = demo_dir
    with h5py.File(out / "scores.h5", "r") as scores:
        ranks = scores["rank"][()]
        topk_index = scores["topk/index"][()]
        query_ids = [value.decode() if isinstance(value, bytes) else str(value)
                     for value in scores["query/ids"][()]]
    with h5py.File(out / "features.h5", "r") as features:
        aerial_ids = [value.decode() if isinstance(value, bytes) else str(value)
                      for value in features["aerial/ids"][()]]
        match = features["ground/match"][()]
    found = np.flatnonzero((ranks >= 1) & (ranks <= 5))
    assert found.size, "the bundled model ranks no photo of the demo city in its top 5"
    row = int(found[0])
    photo = out / "data" / query_ids[row]
    plot = tmp_path / "candidates.png"
    completed = subprocess.run(
        [sys.executable, "-m", "cvig_engine.cli", "locate", str(photo), "--tiles", str(out / "features.h5"),
         "--model", str(out / "model"), "--topk", "5", "--backend", "onnxruntime", "--plot", str(plot)],
        capture_output=True, text=True, timeout=300)
    assert completed.returncode == 0, completed.stderr[-3000:]
    result = json.loads(completed.stdout)
    candidates = result["photos"][0]["candidates"]
    assert [c["tile_row"] for c in candidates] == topk_index[row, :5].tolist()
    assert aerial_ids[match[row]] in [c["tile_id"] for c in candidates]
    assert all(0.0 <= c["heading_deg"] < 360.0 for c in candidates)
    assert _png_size(plot) == (960, 720)


def test_locate_refuses_a_store_from_another_model(demo_dir, tmp_path):
    out, _ = demo_dir
    from cvig_engine import build_model, save_checkpoint
    from cvig_engine.export import export_model

    checkpoint = save_checkpoint(build_model("tiny", image_scale=0.5), tmp_path / "other.safetensors")
    export_model(checkpoint, tmp_path / "other", progress=False)
    photo = next((out / "data").rglob("surface/*.jpg"))
    completed = subprocess.run(
        [sys.executable, "-m", "cvig_engine.cli", "locate", str(photo), "--tiles", str(out / "features.h5"),
         "--model", str(tmp_path / "other")], capture_output=True, text=True, timeout=300)
    assert completed.returncode == 2
    assert "another model" in completed.stderr and "Traceback" not in completed.stderr
