"""Dataset curation: usable-scene filter, density-limited subsets, semantic bands (synthetic)."""
import csv
import math
import pickle
import subprocess
import sys
from pathlib import Path

import h5py
import numpy as np
import pytest

from cvig_engine.curate.density import density_limit_indices, local_projection
from cvig_engine.curate.ensemble import (classification_report, fit_ensemble, load_filter,
                                         save_filter, train_filter)
from cvig_engine.curate.features import align_features, read_features, read_labels
from cvig_engine.errors import CvigInputError
from tests.references import density_cells_reference, haversine_metres


def _blobs(rng, count, dimension=6, unusable_fraction=0.3):
    """Labelled vectors: unusable photos sit around a shifted centre in the first two features."""
    labels = (rng.random(count) >= unusable_fraction).astype(np.int64)
    features = rng.standard_normal((count, dimension)) + 5.0
    features[labels == 0, :2] += 4.0
    return features, labels


def _write_feature_csv(path, ids, vectors):
    with open(path, "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["id"] + [f"f{index}" for index in range(vectors.shape[1])])
        for identifier, row in zip(ids, vectors):
            writer.writerow([identifier] + [repr(float(value)) for value in row])


def _write_labels(path, ids, labels):
    with open(path, "w", newline="") as handle:
        handle.write("id,usable\n")
        for identifier, label in zip(ids, labels):
            handle.write(f"{identifier},{int(label)}\n")


# --- the SVM ensemble ---------------------------------------------------------------------------

@pytest.mark.parametrize("kernel", ["rbf", "linear", "poly", "sigmoid"])
def test_reloaded_filter_reproduces_sklearn_decision_function(tmp_path, kernel):
    rng = np.random.default_rng(1)
    features, labels = _blobs(rng, 120)
    ensemble, estimators = fit_ensemble(features, labels, members=3, seed=4, kernel=kernel)
    save_filter(ensemble, tmp_path / "usable")
    reloaded = load_filter(tmp_path / "usable.json")
    queries = rng.standard_normal((50, 6)) * 3.0 + 6.0
    # sklearn sees standardised features; the standardisation is recomputed here independently.
    standardised = (queries - features.mean(axis=0)) / features.std(axis=0)
    expected = np.stack([estimator.decision_function(standardised) for estimator in estimators],
                        axis=1)
    np.testing.assert_allclose(reloaded.member_decisions(queries), expected, rtol=0, atol=1e-9)
    np.testing.assert_allclose(reloaded.decision_function(queries), expected.mean(axis=1),
                               rtol=0, atol=1e-9)
    assert np.array_equal(reloaded.predict(queries), expected.mean(axis=1) > 0.0)
    # Each member agrees with its own sklearn predict (decision > 0 means class 1, usable).
    for index, estimator in enumerate(estimators):
        assert np.array_equal(reloaded.member_decisions(queries)[:, index] > 0,
                              estimator.predict(standardised) == 1)


def test_filter_file_refuses_a_pickle(tmp_path):
    evil = pickle.dumps({"format": "cvig-usable-scene-filter"})
    (tmp_path / "evil.safetensors").write_bytes(evil)
    with pytest.raises(CvigInputError, match="not a readable safetensors"):
        load_filter(tmp_path / "evil.safetensors")
    with pytest.raises(CvigInputError, match="not found"):
        load_filter(tmp_path / "missing")


def test_classification_report_by_hand():
    labels = np.array([1, 1, 1, 1, 0, 0, 0, 1])
    kept = np.array([1, 1, 0, 1, 1, 0, 0, 1], dtype=bool)
    # kept usable 4, kept unusable 1, rejected usable 1, rejected unusable 2
    report = classification_report(labels, kept)
    assert report["precision"] == pytest.approx(4 / 5)
    assert report["recall"] == pytest.approx(4 / 5)
    assert report["pass_rate"] == pytest.approx(5 / 8)
    assert report["rejection_precision"] == pytest.approx(2 / 3)
    assert report["rejection_recall"] == pytest.approx(2 / 3)


def test_train_filter_uses_half_of_the_labels_and_separates_blobs():
    rng = np.random.default_rng(7)
    features, labels = _blobs(rng, 201)
    ensemble, report = train_filter(features, labels, members=10, seed=3)
    usable, unusable = int(labels.sum()), int((labels == 0).sum())
    assert len(ensemble.members) == 10
    assert report["train_photos"] == (usable + 1) // 2 + (unusable + 1) // 2
    assert report["test_photos"] == usable // 2 + unusable // 2
    assert report["test"]["usable_photos"] == usable // 2
    # The blobs are 4 standard deviations apart in two features: nearly perfectly separable.
    assert report["test"]["precision"] > 0.9 and report["test"]["recall"] > 0.9
    # Same seed, same filter; the filter's metadata keeps the report.
    again, _ = train_filter(features, labels, members=10, seed=3)
    np.testing.assert_array_equal(again.decision_function(features),
                                  ensemble.decision_function(features))
    assert ensemble.metadata["report"] == report


def test_train_filter_needs_both_classes():
    features = np.arange(20, dtype=float).reshape(10, 2)
    labels = np.array([1] * 8 + [0] * 2)
    with pytest.raises(CvigInputError, match="at least 3 of each"):
        train_filter(features, labels, source="labels.csv")


# --- feature and label files --------------------------------------------------------------------

def test_feature_formats_agree(tmp_path):
    rng = np.random.default_rng(2)
    ids = [f"photos/{index:03d}.png" for index in range(9)]
    vectors = rng.standard_normal((9, 4))
    _write_feature_csv(tmp_path / "f.csv", ids, vectors)
    np.save(tmp_path / "f.npy", vectors)
    (tmp_path / "f.ids.txt").write_text("\n".join(ids) + "\n")
    np.save(tmp_path / "plain.npy", vectors)
    with h5py.File(tmp_path / "f.h5", "w") as handle:
        handle["features"] = vectors
        handle["ids"] = np.array(ids, dtype=h5py.string_dtype())
    maps = rng.standard_normal((9, 3, 2, 5))
    with h5py.File(tmp_path / "store.h5", "w") as handle:
        handle["ground/features"] = maps.astype(np.float32)
        handle["ground/ids"] = np.array(ids, dtype=h5py.string_dtype())
    for name in ("f.csv", "f.npy", "f.h5"):
        table = read_features(tmp_path / name)
        assert table.ids == ids
        np.testing.assert_array_equal(table.vectors, vectors)
    plain = read_features(tmp_path / "plain.npy")
    assert plain.ids is None
    # Without ids, rows go by order and the counts must agree.
    np.testing.assert_array_equal(align_features(plain, ids[::-1], "labels.csv"), vectors)
    with pytest.raises(CvigInputError, match="matched by order"):
        align_features(plain, ids[:5], "labels.csv")
    shuffled = align_features(read_features(tmp_path / "f.csv"), ids[::-1], "labels.csv")
    np.testing.assert_array_equal(shuffled, vectors[::-1])
    mean_pooled = read_features(tmp_path / "store.h5")
    expected = np.array([[maps[n, c].astype(np.float32).astype(np.float64).mean() for c in range(3)]
                         for n in range(9)])
    np.testing.assert_allclose(mean_pooled.vectors, expected, rtol=0, atol=1e-12)
    flat = read_features(tmp_path / "store.h5", store_pooling="flatten")
    np.testing.assert_array_equal(flat.vectors, maps.astype(np.float32).reshape(9, -1))


def _bad_input_cases(tmp_path):
    """(callable, text the message must contain) for each kind of bad input."""
    good_ids = ["a.png", "b.png", "c.png"]
    good = np.ones((3, 2))
    cases = []

    nan_csv = tmp_path / "nan.csv"
    _write_feature_csv(nan_csv, good_ids, np.array([[1.0, 2.0], [np.nan, 1.0], [0.0, 0.0]]))
    cases.append((lambda: read_features(nan_csv), ["nan.csv", "line 3", "b.png", "NaN"]))

    inf_npy = tmp_path / "inf.npy"
    np.save(inf_npy, np.array([[1.0, 2.0], [1.0, np.inf]]))
    cases.append((lambda: read_features(inf_npy), ["inf.npy", "row 1", "NaN or Inf"]))

    text_csv = tmp_path / "text.csv"
    text_csv.write_text("id,f0\na.png,1.5\nb.png,abc\n")
    cases.append((lambda: read_features(text_csv), ["text.csv", "line 3", "'abc'"]))

    duplicate_csv = tmp_path / "dup.csv"
    _write_feature_csv(duplicate_csv, ["a.png", "b.png", "a.png"], good)
    cases.append((lambda: read_features(duplicate_csv),
                  ["dup.csv", "line 4", "duplicate id 'a.png'"]))

    unknown = tmp_path / "features.parquet"
    unknown.write_bytes(b"PAR1")
    cases.append((lambda: read_features(unknown),
                  ["features.parquet", "unknown feature file format"]))

    short_sidecar = tmp_path / "short.npy"
    np.save(short_sidecar, good)
    (tmp_path / "short.ids.txt").write_text("a.png\nb.png\n")
    cases.append((lambda: read_features(short_sidecar), ["short.ids.txt", "2 ids", "3 rows"]))

    labels_three = tmp_path / "three.csv"
    labels_three.write_text("id,usable\na.png,1\nb.png,2\n")
    cases.append((lambda: read_labels(labels_three), ["three.csv", "line 3", "'2'"]))

    labels_duplicate = tmp_path / "labels_dup.csv"
    labels_duplicate.write_text("id,usable\na.png,1\na.png,0\n")
    cases.append((lambda: read_labels(labels_duplicate), ["labels_dup.csv", "line 3", "duplicate"]))

    labels_columns = tmp_path / "labels_columns.csv"
    labels_columns.write_text("name,ok\na.png,1\n")
    cases.append((lambda: read_labels(labels_columns), ["labels_columns.csv", "id,usable"]))

    features_csv = tmp_path / "good.csv"
    _write_feature_csv(features_csv, good_ids, good)
    cases.append((lambda: align_features(read_features(features_csv), ["a.png", "zzz.png"],
                                         "labels.csv", lambda index: f"line {index + 2}"),
                  ["labels.csv", "line 3", "'zzz.png'", "good.csv"]))
    return cases


def test_bad_feature_and_label_files_name_the_file_and_row(tmp_path):
    for function, fragments in _bad_input_cases(tmp_path):
        with pytest.raises(CvigInputError) as caught:
            function()
        for fragment in fragments:
            assert fragment in str(caught.value), (fragment, str(caught.value))


def test_cli_bad_input_exits_2_without_traceback(tmp_path):
    ids = [f"p{index}.png" for index in range(8)]
    vectors = np.random.default_rng(0).standard_normal((8, 3))
    vectors[5, 1] = np.nan
    _write_feature_csv(tmp_path / "features.csv", ids, vectors)
    _write_labels(tmp_path / "labels.csv", ids, [1, 0] * 4)
    command = [sys.executable, "-m", "cvig_engine.cli", "filter", "train",
               "--features", str(tmp_path / "features.csv"),
               "--labels", str(tmp_path / "labels.csv"), "-o", str(tmp_path / "filter")]
    result = subprocess.run(command, capture_output=True, text=True)
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    for fragment in ("features.csv", "line 7", "p5.png"):
        assert fragment in result.stderr
    assert not (tmp_path / "filter.safetensors").exists()


# --- density-limited subsets --------------------------------------------------------------------

def _hot_spot_positions(rng, count):
    """Two cities; a third of the pairs crowd around one hot spot per city."""
    # "fiji" straddles the antimeridian.
    centres = {"paris": (48.8566, 2.3522), "fiji": (-17.8, 179.999)}
    cities = [("paris", "fiji")[index % 2] for index in range(count)]
    latitudes, longitudes = [], []
    for city in cities:
        latitude, longitude = centres[city]
        spread = 0.0003 if rng.random() < 0.33 else 0.006  # ~30 m hot spot vs ~600 m city
        latitudes.append(latitude + spread * rng.standard_normal())
        longitudes.append((longitude + spread * rng.standard_normal() + 180.0) % 360.0 - 180.0)
    return latitudes, longitudes, cities


def test_density_limit_against_brute_force_counts():
    rng = np.random.default_rng(11)
    latitudes, longitudes, cities = _hot_spot_positions(rng, 600)
    cell_size, cap = 100.0, 4
    kept, summary = density_limit_indices(latitudes, longitudes, cities, cell_size, cap, seed=5)
    cells = density_cells_reference(latitudes, longitudes, cities, cell_size)
    before, after = {}, {}
    for index, cell in enumerate(cells):
        before[cell] = before.get(cell, 0) + 1
    for index in kept:
        after[cells[index]] = after.get(cells[index], 0) + 1
    assert max(before.values()) > cap  # the hot spots really exceed the cap
    for cell, count in before.items():
        assert after.get(cell, 0) == min(count, cap), cell
    assert list(kept) == sorted(set(kept.tolist()))  # input order, no repeats
    assert summary["pairs_out"] == sum(min(count, cap) for count in before.values())
    assert summary["cells"] == len(before)
    assert summary["cells_capped"] == sum(count > cap for count in before.values())
    # Seeded: the same seed keeps the same pairs, another seed chooses differently in the hot spots.
    again, _ = density_limit_indices(latitudes, longitudes, cities, cell_size, cap, seed=5)
    other, _ = density_limit_indices(latitudes, longitudes, cities, cell_size, cap, seed=6)
    assert np.array_equal(kept, again) and not np.array_equal(kept, other)


def test_local_projection_matches_great_circle_distances():
    rng = np.random.default_rng(3)
    for latitude, longitude in ((48.8566, 2.3522), (-17.8, 179.999), (64.1, -21.9)):
        latitudes = latitude + 0.01 * rng.standard_normal(50)
        longitudes = (longitude + 0.01 * rng.standard_normal(50) + 180.0) % 360.0 - 180.0
        east, north = local_projection(latitudes, longitudes)
        for first, second in ((0, 1), (2, 3), (4, 5)):
            planar = math.hypot(east[first] - east[second], north[first] - north[second])
            true = haversine_metres(latitudes[first], longitudes[first],
                                    latitudes[second], longitudes[second])
            assert planar == pytest.approx(true, rel=2e-3)


# --- the synthetic world: filter verification, density on a real CSV, semantic bands -------------

@pytest.fixture(scope="module")
def synthetic_world(tmp_path_factory):
    """Two small cities (one to train, one held out) with 30 % close-up (unusable) photos."""
    from cvig_engine.synth import SynthSettings, synthesize

    folder = tmp_path_factory.mktemp("world")
    settings = SynthSettings(pairs=160, cities=2, test_cities=1, seed=0, tile_size=64,
                             pano_height=32, pano_width=128, unusable_fraction=0.3)
    synthesize(folder, settings, progress=False)
    return folder


def _csv_rows(path):
    with open(path, newline="") as handle:
        return list(csv.DictReader(handle))


def _surfaces(csv_path):
    """Resolved surface paths of a dataset CSV (relative paths are relative to its folder)."""
    return [str((csv_path.parent / row["surface"]).resolve()) for row in _csv_rows(csv_path)]


def test_filter_finds_the_synthetic_close_ups(synthetic_world, tmp_path):
    from cvig_engine.curate import apply_filter_files, photo_statistics_csv, train_filter_files

    train_csv, test_csv = synthetic_world / "train.csv", synthetic_world / "test.csv"
    assert photo_statistics_csv(train_csv, tmp_path / "train_features.csv") == 80
    photo_statistics_csv(test_csv, tmp_path / "test_features.csv")
    # The dataset CSV itself is the label file: its usable column is the ground truth.
    report = train_filter_files(tmp_path / "train_features.csv", train_csv, tmp_path / "usable",
                                seed=0)
    truth = {row["surface"]: row["usable"] == "1" for row in _csv_rows(train_csv)}
    assert 0 < sum(not value for value in truth.values()) < len(truth)
    assert report["train_photos"] + report["test_photos"] == len(truth)
    assert report["test"]["usable_photos"] == sum(truth.values()) // 2
    assert report["test"]["precision"] >= 0.9 and report["test"]["recall"] >= 0.9

    summary = apply_filter_files(tmp_path / "usable.json", tmp_path / "test_features.csv", test_csv,
                                 tmp_path / "filtered.csv", scores_path=tmp_path / "scores.csv")
    # Score the held-out city against its ground truth (close_up column), apart from the summary.
    rows = _csv_rows(test_csv)
    scores = {row["id"]: float(row["score"]) for row in _csv_rows(tmp_path / "scores.csv")}
    kept = [row for row in rows if scores[row["surface"]] > 0.0]
    kept_usable = sum(row["close_up"] == "" for row in kept)
    usable = sum(row["close_up"] == "" for row in rows)
    precision, recall = kept_usable / len(kept), kept_usable / usable
    assert precision >= usable / len(rows) + 0.1 and recall >= 0.8, (precision, recall)
    assert summary["against_csv_usable"]["precision"] == pytest.approx(precision)
    assert summary["against_csv_usable"]["recall"] == pytest.approx(recall)
    # The filtered CSV holds exactly the kept rows, in input order, with paths still resolving.
    kept_surfaces = [str((synthetic_world / row["surface"]).resolve()) for row in kept]
    assert _surfaces(tmp_path / "filtered.csv") == kept_surfaces


def test_apply_needs_a_feature_vector_for_every_row(synthetic_world, tmp_path):
    from cvig_engine.curate import apply_filter_files, photo_statistics_csv, train_filter_files

    test_csv = synthetic_world / "test.csv"
    photo_statistics_csv(test_csv, tmp_path / "features.csv")
    train_filter_files(tmp_path / "features.csv", test_csv, tmp_path / "usable", members=2)
    lines = (tmp_path / "features.csv").read_text().splitlines()
    missing_id = lines[5].split(",")[0]
    (tmp_path / "partial.csv").write_text("\n".join(lines[:5] + lines[6:]) + "\n")
    with pytest.raises(CvigInputError) as caught:
        apply_filter_files(tmp_path / "usable", tmp_path / "partial.csv", test_csv,
                           tmp_path / "out.csv")
    message = str(caught.value)
    assert "test.csv" in message and missing_id in message and "partial.csv" in message
    assert not (tmp_path / "out.csv").exists()
    np.save(tmp_path / "narrow.npy", np.ones((80, 3)))
    with pytest.raises(CvigInputError, match="needs 25 features"):
        apply_filter_files(tmp_path / "usable", tmp_path / "narrow.npy", test_csv,
                           tmp_path / "out.csv")


def test_density_subset_of_the_synthetic_hot_spots(synthetic_world, tmp_path):
    from cvig_engine.curate import density_limit_csv

    train_csv = synthetic_world / "train.csv"
    output = tmp_path / "sub" / "thinned.csv"
    summary = density_limit_csv(train_csv, output, cell_size=100.0, max_per_cell=2, seed=1)
    rows, kept = _csv_rows(train_csv), _surfaces(output)
    # Brute force on the CSVs' own numbers.
    cells = density_cells_reference([float(row["lat"]) for row in rows],
                                    [float(row["lon"]) for row in rows],
                                    [row["city"] for row in rows], 100.0)
    order = _surfaces(train_csv)
    cell_of = dict(zip(order, cells))
    before, after = {}, {}
    for cell in cells:
        before[cell] = before.get(cell, 0) + 1
    for surface in kept:
        after[cell_of[surface]] = after.get(cell_of[surface], 0) + 1
    assert max(before.values()) > 2  # the synthetic hot spots crowd some cells
    assert all(after.get(cell, 0) == min(count, 2) for cell, count in before.items())
    assert summary["pairs_out"] == len(kept) < len(rows)
    positions = [order.index(surface) for surface in kept]
    assert positions == sorted(positions)
    # Paths are rewritten for the new CSV's folder: every kept surface still exists.
    assert all(Path(surface).is_file() for surface in kept)


@pytest.mark.slow
def test_five_channel_model_reads_the_masks(synthetic_world):
    import torch

    from cvig_engine.data import PairDataset, load_mask, read_dataset
    from cvig_engine.model import build_model
    from tests.references import bilinear_resize_reference, polar_reference

    # A photo whose overhead masks both have content, so that a swapped or blank band shows.
    record = next(record for record in read_dataset(synthetic_world / "train.csv")
                  if load_mask(record.masks["overhead_building"]).max() == 1.0
                  and load_mask(record.masks["overhead_road"]).max() == 1.0
                  and load_mask(record.masks["surface_road"]).max() > 0.0)
    model = build_model(backbone="tiny", in_channels=5).eval()
    item = PairDataset([record], model.config, train=False).item(0)
    ground, aerial = item["ground"], item["aerial"]
    config = model.config
    assert ground.shape == (5, config["ground_height"], config["ground_width"])
    assert aerial.shape == (5, config["polar_height"], config["polar_width"])
    # Channels 3-4 are the building and road masks, resized (masks use mean 0, std 1).
    for channel, name in ((3, "surface_building"), (4, "surface_road")):
        mask = load_mask(record.masks[name])
        expected = bilinear_resize_reference(mask, config["ground_height"], config["ground_width"])
        np.testing.assert_allclose(ground[channel].numpy(), expected, rtol=0, atol=1e-5)
    size = config["aerial_size"]
    tiles = np.stack([bilinear_resize_reference(load_mask(record.masks[name]), size, size)
                      for name in ("overhead_building", "overhead_road")])
    expected = polar_reference(tiles, config["polar_height"], config["polar_width"])
    np.testing.assert_allclose(aerial[3:].numpy(), expected, rtol=0, atol=1e-4)
    # End to end through the 5-channel model; the mask channels change the features.
    with torch.no_grad():
        ground_features, aerial_features = model(ground[None], aerial[None])
        blanked = ground.clone()
        blanked[3:] = 0.0
        blanked_features, _ = model(blanked[None], aerial[None])
    assert list(ground_features.shape[1:]) == config["ground_feature_shape"]
    assert list(aerial_features.shape[1:]) == config["aerial_feature_shape"]
    assert torch.isfinite(ground_features).all() and torch.isfinite(aerial_features).all()
    assert not torch.allclose(ground_features, blanked_features)


def test_cli_filter_commands_on_the_synthetic_world(synthetic_world, tmp_path):
    from click.testing import CliRunner

    from cvig_engine.cli import main

    runner = CliRunner()
    train_csv = str(synthetic_world / "train.csv")
    commands = [
        ["filter", "features", "--data", train_csv, "-o", str(tmp_path / "features.csv")],
        ["filter", "train", "--features", str(tmp_path / "features.csv"), "--labels", train_csv,
         "-o", str(tmp_path / "usable"), "--members", "3"],
        ["filter", "apply", str(tmp_path / "usable.safetensors"),
         "--features", str(tmp_path / "features.csv"), "--data", train_csv,
         "-o", str(tmp_path / "kept.csv")],
        ["filter", "density", "--data", str(tmp_path / "kept.csv"), "--cell-size", "100",
         "--max-per-cell", "1", "-o", str(tmp_path / "thinned.csv")],
    ]
    for command in commands:
        result = runner.invoke(main, command)
        assert result.exit_code == 0, (command, result.output)
    kept, thinned = _surfaces(tmp_path / "kept.csv"), _surfaces(tmp_path / "thinned.csv")
    assert 0 < len(thinned) < len(kept) < len(_surfaces(synthetic_world / "train.csv"))
    assert set(thinned) <= set(kept)
    (tmp_path / "features.txt").write_text("id,f0\n")
    result = runner.invoke(main, ["filter", "apply", str(tmp_path / "usable"),
                                  "--features", str(tmp_path / "features.txt"), "--data", train_csv,
                                  "-o", str(tmp_path / "x.csv")])
    assert result.exit_code == 2 and "unknown feature file format" in result.output


def test_photo_ids_follow_the_csv_folder_and_id_column(tmp_path):
    from cvig_engine.curate import record_photo_id
    from cvig_engine.data import read_dataset

    folder = tmp_path / "data"
    folder.mkdir()
    (folder / "pairs.csv").write_text(
        "surface,overhead,lat,lon,heading,fov,city,usable,id\n"
        "photos/a.jpg,tiles/a.png,48.85,2.35,,360,paris,1,\n"
        f"{tmp_path}/elsewhere/b.jpg,tiles/b.png,48.85,2.35,,360,paris,1,\n"
        "photos/c.jpg,tiles/c.png,48.85,2.35,,360,paris,0,my-own-id\n")
    records = read_dataset(folder / "pairs.csv")
    assert [record_photo_id(record) for record in records] == [
        "photos/a.jpg", f"{tmp_path.as_posix()}/elsewhere/b.jpg", "my-own-id"]
    ids, labels = read_labels(folder / "pairs.csv")
    assert ids == ["photos/a.jpg", f"{tmp_path.as_posix()}/elsewhere/b.jpg", "my-own-id"]
    assert labels.tolist() == [1, 1, 0]
