"""`cvig-engine embed`: the feature store, tile de-duplication, resume after SIGKILL, bad input.

One tiny 70 deg model on quarter-size inputs serves every test. Two synthetic worlds: 360 deg
panoramas (cropped to 70 deg at a heading seeded by the CSV row) and 70 deg photos (used as is).
"""
import csv
import json
import math
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
from click.testing import CliRunner
from PIL import Image

from cvig_engine.cli import main as cli_main
from cvig_engine.data import WITW_COLUMNS, load_image, preprocess_aerial, preprocess_ground
from cvig_engine.embed import embed_dataset, embed_tiles
from cvig_engine.errors import CvigInputError
from cvig_engine.store import open_feature_store

PAIRS = 16    # per split of each synthetic world (two cities: train.csv and test.csv)
REPEATS = 6   # copies of each photo in the resume test
FOV = 70.0
SHAPE = (16, 1, 3)  # ground features of the test model: ground input 32 x 24 (70 deg of 128)


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _synthesize(folder, fov):
    from cvig_engine.synth import synthesize

    synthesize(folder, pairs=2 * PAIRS, cities=2, test_cities=1, fov=fov, tile_size=48,
               pano_width=96, pano_height=24, city_size=300, masks=False, progress=False,
               png_level=0, unusable_fraction=0.0)
    return folder


@pytest.fixture(scope="module")
def panoramas(tmp_path_factory):
    return _synthesize(tmp_path_factory.mktemp("panoramas"), 360.0)


@pytest.fixture(scope="module")
def photos(tmp_path_factory):
    return _synthesize(tmp_path_factory.mktemp("photos"), FOV)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    """A tiny 70 deg model on quarter-size inputs (ground 32 x 24, polar 32 x 128)."""
    from cvig_engine.export import export_model
    from cvig_engine.model import build_model, model_config, save_checkpoint

    folder = tmp_path_factory.mktemp("model")
    torch.manual_seed(0)
    config = model_config("tiny", fov=FOV, ground_height=32, polar_height=32, polar_width=128,
                          aerial_size=48)
    save_checkpoint(build_model(config=config), folder / "tiny.safetensors")
    export_model(folder / "tiny.safetensors", folder / "model_dir", progress=False)
    return folder / "model_dir"


@pytest.fixture(scope="module")
def reference(model_dir):
    """Feature maps computed one image at a time with the PyTorch model, straight from the files.

    ``reference("ground", path, row)`` crops a 360 deg panorama by the documented rule: start
    column ``default_rng([0, row]).integers(width)``.
    """
    from cvig_engine.model import load_checkpoint

    model = load_checkpoint(model_dir / "model.safetensors").eval()
    config = model.config
    cache = {}

    def features(kind, path, row=None):
        key = (kind, str(Path(path).resolve()), row)
        if key not in cache:
            image = load_image(path)
            with torch.no_grad():
                if kind == "aerial":
                    cache[key] = model.aerial_encoder(preprocess_aerial(image, config)[None])[0]
                else:
                    if row is not None:
                        start = np.random.default_rng([0, row]).integers(image.shape[1])
                        image = np.roll(image, -start, axis=1)[:, :int(FOV / 360 * image.shape[1])]
                    cache[key] = model.ground_encoder(preprocess_ground(image, config)[None])[0]
        return cache[key].numpy()

    return features


def assert_close(actual, expected):
    np.testing.assert_allclose(actual, expected, rtol=1e-4, atol=1e-5)


def write_csv(path, rows, extra_columns=()):
    """A WITW-layout CSV from dicts (missing cells empty)."""
    columns = list(WITW_COLUMNS) + list(extra_columns)
    with open(path, "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(columns)
        for row in rows:
            writer.writerow([row.get(name, "") for name in columns])
    return path


def csv_rows(path):
    with open(path, newline="") as handle:
        return list(csv.DictReader(handle))


def absolute_rows(world, count, split="test"):
    """The first rows of a split with absolute image paths (to write CSVs elsewhere)."""
    rows = csv_rows(world / f"{split}.csv")[:count]
    for row in rows:
        row["surface"] = str(world / row["surface"])
        row["overhead"] = str(world / row["overhead"])
    return rows


def read_store(path):
    """Every dataset and attribute of a store as numpy / Python values."""
    arrays = {}
    with h5py.File(path, "r") as handle:
        def visit(name, item):
            if isinstance(item, h5py.Dataset):
                arrays[name] = item.asstr()[:] if item.dtype.kind == "O" else item[:]
        handle.visititems(visit)
        attributes = dict(handle.attrs)
    return arrays, attributes


def truncated_jpeg(source, path):
    """A JPEG cut to 2/3 of its length: it passes Pillow's quick check, then fails to decode."""
    image = Image.open(source).convert("RGB")
    image.resize((image.width * 4, image.height * 4)).save(path, quality=90)  # past the headers
    data = path.read_bytes()
    path.write_bytes(data[: len(data) * 2 // 3])
    return path


def embed(model_dir, csv_path, out, **options):
    options.setdefault("backend", "torch")
    options.setdefault("batch_size", 8)
    options.setdefault("progress", False)
    return embed_dataset(model_dir, csv_path, out, **options)


def run_cli(model_dir, csv_path, out, *extra):
    return CliRunner().invoke(cli_main, ["embed", str(model_dir), "--data", str(csv_path), "-o",
                                         str(out), "--backend", "torch", "--workers", "0",
                                         "--no-progress", *extra])


# -- schema ---------------------------------------------------------------------------------------

def test_schema_and_features_match_the_model(photos, model_dir, reference, tmp_path):
    csv_path = photos / "test.csv"
    out = tmp_path / "features.h5"
    summary = embed(model_dir, csv_path, out, workers=1)
    assert (summary["ground"], summary["aerial"], summary["skipped_rows"]) == (PAIRS, PAIRS, 0)
    arrays, attributes = read_store(out)
    rows = csv_rows(csv_path)
    manifest = json.loads((model_dir / "manifest.json").read_text())

    assert attributes["format"] == "cvig-features" and attributes["format_version"] == 1
    assert attributes["model_sha256"] == manifest["model_sha256"]
    assert json.loads(attributes["model_config"]) == manifest["config"]
    assert attributes["fov_deg"] == FOV
    assert attributes["backend"] == "torch" and attributes["precision"] == "fp32"
    assert attributes["complete"]
    assert attributes["city"] == rows[0]["city"]
    assert Path(attributes["dataset_csv"]) == csv_path
    description = json.loads(attributes["backend_description"])
    assert description["model_sha256"] == manifest["model_sha256"]
    assert json.loads(attributes["preprocessing"])["aerial_input_kind"] == "polar"

    assert arrays["ground/features"].shape == (PAIRS, *SHAPE)
    assert arrays["aerial/features"].shape == (PAIRS, *manifest["config"]["aerial_feature_shape"])
    assert arrays["ground/features"].dtype == arrays["aerial/features"].dtype == np.float32
    assert arrays["ground/match"].dtype == np.int64
    assert arrays["ground/lat"].dtype == arrays["aerial/lon"].dtype == np.float64
    assert arrays["ground/heading"].dtype == np.float32
    assert list(arrays["ground/ids"]) == [row["surface"] for row in rows]
    assert list(arrays["aerial/ids"]) == [row["overhead"] for row in rows]
    np.testing.assert_array_equal(arrays["ground/match"], np.arange(PAIRS))
    np.testing.assert_array_equal(arrays["ground/lat"], [float(row["lat"]) for row in rows])
    np.testing.assert_array_equal(arrays["aerial/lon"], [float(row["lon"]) for row in rows])
    np.testing.assert_array_equal(arrays["ground/heading"],
                                  np.float32([float(row["heading"]) for row in rows]))
    assert arrays["ground/done"].all() and arrays["aerial/done"].all()
    assert arrays["skipped/row"].size == 0
    for index, row in enumerate(rows):
        assert_close(arrays["ground/features"][index], reference("ground", photos / row["surface"]))
        assert_close(arrays["aerial/features"][index],
                     reference("aerial", photos / row["overhead"]))
    with open_feature_store(out) as store:  # the scorer's reader accepts it
        assert (store.num_ground, store.num_aerial) == (PAIRS, PAIRS)
        np.testing.assert_array_equal(store.ground_features(), arrays["ground/features"])

    # A rerun finds the complete store and does nothing.
    again = embed(model_dir, csv_path, out, workers=0)
    assert again["already_complete"] and again["encoded"] == {"ground": 0, "aerial": 0}


def test_panoramas_are_cropped_at_a_heading_seeded_by_the_row(panoramas, model_dir, reference,
                                                               tmp_path):
    csv_path = panoramas / "test.csv"
    embed(model_dir, csv_path, tmp_path / "crops.h5", workers=1)
    arrays, attributes = read_store(tmp_path / "crops.h5")
    assert json.loads(attributes["preprocessing"])["panorama_crop"]["seed"] == 0
    width = load_image(panoramas / csv_rows(csv_path)[0]["surface"]).shape[1]
    for index, row in enumerate(csv_rows(csv_path)):
        line = index + 2  # the header is line 1
        start = np.random.default_rng([0, line]).integers(width)
        # Column j of an aligned panorama faces heading + 180 + j * 360 / W; a crop's heading is
        # its left column's azimuth + fov / 2 (cvig_engine.polar's convention).
        expected = (float(row["heading"]) + 180.0 + start * 360.0 / width + FOV / 2) % 360.0
        assert math.isclose(arrays["ground/heading"][index], expected, abs_tol=1e-4)
        assert_close(arrays["ground/features"][index],
                     reference("ground", panoramas / row["surface"], row=line))
    assert len(set(np.round(arrays["ground/heading"], 3))) > PAIRS // 2  # not one fixed crop


def test_float16_storage_is_the_float32_features_rounded(panoramas, model_dir, tmp_path):
    csv_path = panoramas / "train.csv"
    embed(model_dir, csv_path, tmp_path / "f32.h5", workers=0)
    embed(model_dir, csv_path, tmp_path / "f16.h5", workers=0, storage_dtype="float16")
    full, _ = read_store(tmp_path / "f32.h5")
    half, attributes = read_store(tmp_path / "f16.h5")
    assert attributes["storage_dtype"] == "float16"
    for role in ("ground", "aerial"):
        assert half[f"{role}/features"].dtype == np.float16
        np.testing.assert_array_equal(half[f"{role}/features"],
                                      full[f"{role}/features"].astype(np.float16))
    open_feature_store(tmp_path / "f16.h5").close()
    # A store of another storage type is not resumed or reused.
    with pytest.raises(CvigInputError, match="storage"):
        embed(model_dir, csv_path, tmp_path / "f16.h5", workers=0)


# -- tiles ----------------------------------------------------------------------------------------

def test_shared_tiles_are_stored_once(photos, model_dir, reference, tmp_path):
    rows = csv_rows(photos / "test.csv")[:10]
    first, second = rows[0]["overhead"], rows[5]["overhead"]
    # Rows 0-4 share tile 0 (spelled with "..", and absolute), rows 5-9 share tile 5.
    rows[1]["overhead"] = first
    folder, name = Path(first).parent, Path(first).name
    rows[2]["overhead"] = str(folder / ".." / folder.name / name)
    rows[3]["overhead"] = str(photos / first)
    rows[4]["overhead"] = first
    for index in range(6, 10):
        rows[index]["overhead"] = second
    csv_path = write_csv(photos / "shared_tiles.csv", rows)
    embed(model_dir, csv_path, tmp_path / "shared.h5", workers=0, batch_size=3)
    arrays, _ = read_store(tmp_path / "shared.h5")
    assert list(arrays["aerial/ids"]) == [first, second]
    np.testing.assert_array_equal(arrays["ground/match"], [0] * 5 + [1] * 5)
    assert_close(arrays["aerial/features"][0], reference("aerial", photos / first))
    assert_close(arrays["aerial/features"][1], reference("aerial", photos / second))
    assert arrays["ground/features"].shape[0] == 10


def test_reference_gallery_of_tiles(photos, model_dir, reference, tmp_path):
    rows = absolute_rows(photos, 7, split="train")
    gallery = tmp_path / "gallery.csv"
    with open(gallery, "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["overhead", "lat", "lon"])
        writer.writerows([row["overhead"], row["lat"], row["lon"]] for row in rows)
    summary = embed(model_dir, gallery, tmp_path / "gallery.h5", workers=0, batch_size=4)
    assert summary["ground"] == 0 and summary["aerial"] == 7
    arrays, _ = read_store(tmp_path / "gallery.h5")
    with open_feature_store(tmp_path / "gallery.h5") as store:
        assert (store.num_ground, store.num_aerial) == (0, 7)
    assert arrays["ground/features"].shape == (0, *SHAPE) and arrays["ground/match"].shape == (0,)
    np.testing.assert_array_equal(arrays["aerial/lat"], [float(row["lat"]) for row in rows])
    for index, row in enumerate(rows):
        assert_close(arrays["aerial/features"][index], reference("aerial", row["overhead"]))
    # The same gallery from a list of paths.
    listed = embed_tiles(model_dir, [row["overhead"] for row in rows], tmp_path / "listed.h5",
                         backend="torch", batch_size=4, workers=0, progress=False)
    assert listed["aerial"] == 7
    np.testing.assert_array_equal(read_store(tmp_path / "listed.h5")[0]["aerial/features"],
                                  arrays["aerial/features"])


# -- resume ---------------------------------------------------------------------------------------

def _done_count(path):
    """Rows marked done, read without locking while another process writes (None: unreadable)."""
    try:
        with h5py.File(path, "r", locking=False) as handle:
            return int(handle["ground/done"][:].sum() + handle["aerial/done"][:].sum())
    except (OSError, KeyError, ValueError, RuntimeError):
        return None


@pytest.mark.slow
def test_resume_after_sigkill_gives_identical_features(panoramas, model_dir, tmp_path):
    # Each panorama listed REPEATS times under its own id (and so its own seeded crop): a run
    # long enough to kill in the middle.
    rows = [{**row, "id": f"{copy}/{row['surface']}"}
            for copy in range(REPEATS) for row in absolute_rows(panoramas, PAIRS, split="train")]
    csv_path = write_csv(tmp_path / "repeated.csv", rows, extra_columns=["id"])
    total = len(rows) + PAIRS
    out = tmp_path / "killed.h5"
    command = [sys.executable, "-m", "cvig_engine.cli", "embed", str(model_dir), "--data",
               str(csv_path), "-o", str(out), "--backend", "torch", "--batch", "2", "--workers",
               "1", "--no-progress"]
    environment = {**os.environ, "OMP_NUM_THREADS": "1"}  # as in this process (one_torch_thread)
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                               env=environment)
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and process.poll() is None:
            if out.exists() and _done_count(out):
                break
            time.sleep(0.01)
        assert process.poll() is None, f"embed ended before the kill: {process.stderr.read()}"
        process.send_signal(signal.SIGKILL)
        process.wait(timeout=30)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    assert process.returncode == -signal.SIGKILL
    done_after_kill = _done_count(out)
    assert 0 < done_after_kill < total, done_after_kill
    with h5py.File(out, "r") as handle:
        assert not handle.attrs["complete"]
    with pytest.raises(CvigInputError, match="incomplete"):
        open_feature_store(out)  # the scorer refuses a store that is not finished

    resumed = embed(model_dir, csv_path, out, batch_size=32, workers=1)  # the store's 2 wins
    assert resumed["resumed"] and not resumed["already_complete"]
    encoded = sum(resumed["encoded"].values())
    assert total - done_after_kill <= encoded <= total - done_after_kill + 1  # done rows stay

    embed(model_dir, csv_path, tmp_path / "straight.h5", batch_size=2, workers=1)
    killed, killed_attributes = read_store(out)
    straight, straight_attributes = read_store(tmp_path / "straight.h5")
    assert killed["ground/features"].shape[0] == len(rows)
    assert killed["aerial/features"].shape[0] == PAIRS
    assert sorted(killed) == sorted(straight)
    for name in straight:
        assert np.array_equal(killed[name], straight[name]), name
    assert killed_attributes["complete"]
    assert killed_attributes["plan_sha256"] == straight_attributes["plan_sha256"]


def test_resume_is_refused_with_another_model_or_preprocessing(photos, model_dir, tmp_path):
    csv_path = photos / "train.csv"
    out = tmp_path / "store.h5"
    embed(model_dir, csv_path, out, workers=0)
    with h5py.File(out, "r+") as handle:
        handle.attrs["model_sha256"] = "0" * 64  # as if another checkpoint had made it
    with pytest.raises(CvigInputError, match="model_sha256"):
        embed(model_dir, csv_path, out, workers=0)
    result = run_cli(model_dir, csv_path, out)
    assert result.exit_code == 2 and "model_sha256" in result.output, result.output
    assert "Traceback" not in result.output

    out = tmp_path / "partial.h5"
    embed(model_dir, csv_path, out, workers=0)
    with h5py.File(out, "r+") as handle:  # an unfinished store made with another crop seed
        handle.attrs["complete"] = False
        handle["ground/done"][:] = 0
    with pytest.raises(CvigInputError, match="preprocessing"):
        embed(model_dir, csv_path, out, workers=0, crop_seed=1)
    fewer = write_csv(tmp_path / "fewer.csv", absolute_rows(photos, PAIRS - 1, split="train"))
    with pytest.raises(CvigInputError, match="dataset rows"):
        embed(model_dir, fewer, out, workers=0)


# -- bad input ------------------------------------------------------------------------------------

def test_bad_files_are_named_with_their_row(photos, model_dir, tmp_path):
    rows = absolute_rows(photos, 6)
    garbage = tmp_path / "garbage.png"
    garbage.write_bytes(b"this is not a PNG file")
    cases = {
        "missing": (str(tmp_path / "nowhere.png"), "not found"),
        "corrupt": (str(garbage), "cannot decode"),
        "folder": (str(tmp_path), "folder"),
    }
    for name, (path, reason) in cases.items():
        broken = [dict(row) for row in rows]
        broken[3]["surface"] = path
        csv_path = write_csv(tmp_path / f"{name}.csv", broken)
        result = run_cli(model_dir, csv_path, tmp_path / f"{name}.h5")
        assert result.exit_code == 2, (name, result.output)
        assert path in result.output and "row 5" in result.output, result.output
        assert reason in result.output and "Traceback" not in result.output, result.output
        assert not (tmp_path / f"{name}.h5").exists()  # refused before anything was written

    # A truncated JPEG passes the quick check and fails in a decoding worker: still named, exit 2.
    truncated = truncated_jpeg(rows[2]["surface"], tmp_path / "truncated.jpg")
    broken = [dict(row) for row in rows]
    broken[2]["surface"] = str(truncated)
    csv_path = write_csv(tmp_path / "truncated.csv", broken)
    result = run_cli(model_dir, csv_path, tmp_path / "truncated.h5", "--batch", "2")
    assert result.exit_code == 2, result.output
    assert str(truncated) in result.output and "row 4" in result.output, result.output
    with h5py.File(tmp_path / "truncated.h5", "r") as handle:
        assert not handle.attrs["complete"]
        assert np.isnan(handle["ground/features"][2]).all()  # never zero-filled


@pytest.mark.parametrize("text, message", [
    ("", "empty CSV"),
    (",".join(WITW_COLUMNS) + "\n", "empty CSV"),
    ("surface,overhead,lat,lon\na.png,b.png,1,2\n", "missing column(s) heading, fov, city, usable"),
])
def test_bad_csv_exits_with_code_2(model_dir, tmp_path, text, message):
    csv_path = tmp_path / "bad.csv"
    csv_path.write_text(text)
    result = run_cli(model_dir, csv_path, tmp_path / "bad.h5")
    assert result.exit_code == 2, result.output
    assert message in result.output and str(csv_path) in result.output, result.output


def test_skip_bad_records_rows_and_leaves_them_out(photos, model_dir, reference, tmp_path):
    rows = absolute_rows(photos, 11)
    garbage = tmp_path / "broken_tile.png"
    garbage.write_bytes(b"\x89PNG\r\n\x1a\n broken")
    truncated_photo = truncated_jpeg(rows[4]["surface"], tmp_path / "truncated.jpg")
    truncated_tile = truncated_jpeg(rows[9]["overhead"], tmp_path / "truncated_tile.jpg")
    # Found by the check up front: a missing photo (CSV row 3) and a corrupt tile (row 5).
    rows[1]["surface"] = str(tmp_path / "missing.png")
    rows[3]["overhead"] = str(garbage)
    # Found only when a worker decodes them: a photo (row 6) and a tile shared by rows 9-11.
    rows[4]["surface"] = str(truncated_photo)
    for index in (7, 8, 9):
        rows[index]["overhead"] = str(truncated_tile)
    csv_path = write_csv(tmp_path / "bad.csv", rows)
    out = tmp_path / "skipped.h5"
    summary = embed(model_dir, csv_path, out, workers=1, batch_size=2, skip_bad=True)
    kept = [0, 2, 5, 6, 10]
    assert summary["ground"] == summary["aerial"] == len(kept) and summary["skipped_rows"] == 6
    assert summary["encoded"]["ground"] == len(kept)  # photos of the failed tile: not encoded
    arrays, attributes = read_store(out)
    assert attributes["complete"]
    open_feature_store(out).close()
    assert sorted(arrays["skipped/row"].tolist()) == [3, 5, 6, 9, 10, 11]
    reasons = dict(zip(arrays["skipped/row"].tolist(), arrays["skipped/reason"]))
    assert "not found" in reasons[3] and str(garbage) in reasons[5]
    assert "image file is truncated" in reasons[6]  # Pillow's decoding error, not the quick check
    assert all(str(truncated_tile) in reasons[row] for row in (9, 10, 11))
    assert list(arrays["ground/ids"]) == [Path(rows[index]["surface"]).as_posix() for index in kept]
    np.testing.assert_array_equal(arrays["ground/match"], np.arange(len(kept)))
    for position, index in enumerate(kept):
        row = rows[index]
        assert_close(arrays["ground/features"][position], reference("ground", row["surface"]))
        assert_close(arrays["aerial/features"][position], reference("aerial", row["overhead"]))


def test_grayscale_rgba_and_16_bit_photos_are_converted(photos, model_dir, reference, tmp_path):
    rows = absolute_rows(photos, 3)
    original = np.asarray(Image.open(rows[0]["surface"]).convert("RGB"))
    gray = original.mean(axis=2).round().astype(np.uint8)
    alpha = np.where(np.arange(gray.shape[1]) % 2 == 0, 255, 100).astype(np.uint8)
    alpha = np.broadcast_to(alpha, gray.shape)
    Image.fromarray(gray).save(tmp_path / "gray.png")
    Image.fromarray(gray.astype(np.uint16) * 257).save(tmp_path / "gray16.png")
    Image.fromarray(np.dstack([original, alpha])).save(tmp_path / "rgba.png")
    for row, name in zip(rows, ["gray.png", "gray16.png", "rgba.png"]):
        row["surface"] = str(tmp_path / name)
    embed(model_dir, write_csv(tmp_path / "modes.csv", rows), tmp_path / "modes.h5", workers=0)
    arrays, _ = read_store(tmp_path / "modes.h5")
    # What the README promises: grey replicated to RGB, 16 bits scaled by 1/257, alpha composited
    # on black; written out as plain RGB files for the reference.
    Image.fromarray(np.repeat(gray[..., None], 3, axis=2)).save(tmp_path / "gray_rgb.png")
    on_black = np.rint(original * (alpha[..., None] / 255.0)).astype(np.uint8)
    Image.fromarray(on_black).save(tmp_path / "on_black.png")
    expected = [tmp_path / "gray_rgb.png", tmp_path / "gray_rgb.png", tmp_path / "on_black.png"]
    for position, path in enumerate(expected):
        assert_close(arrays["ground/features"][position], reference("ground", path))


@pytest.mark.requires_cuda
def test_gpu_jpeg_decoding_matches_pillow_closely(photos, model_dir, tmp_path):
    rows = absolute_rows(photos, 6)
    for index, row in enumerate(rows):
        for column in ("surface", "overhead"):
            path = tmp_path / f"{column}{index}.jpg"
            Image.open(row[column]).convert("RGB").save(path, quality=92)
            row[column] = str(path)
    csv_path = write_csv(tmp_path / "jpeg.csv", rows)
    embed(model_dir, csv_path, tmp_path / "gpu.h5", device="cuda", workers=1, jpeg_decoder="gpu")
    embed(model_dir, csv_path, tmp_path / "cpu.h5", device="cuda", workers=1, jpeg_decoder="cpu")
    gpu, gpu_attributes = read_store(tmp_path / "gpu.h5")
    cpu, cpu_attributes = read_store(tmp_path / "cpu.h5")
    assert "nvjpeg" in json.loads(gpu_attributes["preprocessing"])["image_decoding"]["jpeg"]
    assert gpu_attributes["preprocessing"] != cpu_attributes["preprocessing"]  # never mixed
    for role in ("ground", "aerial"):
        # nvjpeg and libjpeg-turbo differ by a grey level here and there; features barely move.
        scale = np.abs(cpu[f"{role}/features"]).max()
        np.testing.assert_allclose(gpu[f"{role}/features"], cpu[f"{role}/features"],
                                   atol=0.05 * scale)
