"""Dataset curation: the usable-scene filter, density-limited subsets and photo statistics.

    from cvig_engine.curate import train_filter_files, apply_filter_files, density_limit_csv

The file formats are described in ``curate.features`` (feature and label files),
``curate.ensemble`` (the filter, its rule and its storage) and ``curate.density`` (the grid).
"""
from __future__ import annotations

import csv
from pathlib import Path

import numpy as np

from cvig_engine.curate.density import density_limit, density_limit_indices, grid_cells
from cvig_engine.curate.ensemble import (UsableSceneFilter, classification_report, fit_ensemble,
                                         load_filter, save_filter, train_filter)
from cvig_engine.curate.features import (align_features, image_statistics, image_statistics_names,
                                         photo_id, read_features, read_labels, record_photo_id)
from cvig_engine.errors import CvigInputError

__all__ = ["UsableSceneFilter", "train_filter", "fit_ensemble", "save_filter", "load_filter",
           "classification_report", "read_features", "read_labels", "align_features", "photo_id",
           "record_photo_id", "image_statistics", "image_statistics_names", "density_limit",
           "density_limit_indices", "grid_cells", "train_filter_files", "apply_filter_files",
           "photo_statistics_csv", "density_limit_csv"]


def train_filter_files(features_path, labels_path, output, members: int = 10, kernel: str = "rbf",
                       regularisation: float = 1.0, threshold: float = 0.0, seed: int = 0,
                       store_pooling: str = "mean") -> dict:
    """Train the usable-scene filter from a feature file and a label file; save it to ``output``.

    Every labelled photo needs a feature vector; feature rows without a label are not used (their
    count is in the report as ``unlabelled_feature_rows``). Returns the training report.
    """
    table = read_features(features_path, store_pooling=store_pooling)
    ids, labels = read_labels(labels_path)
    vectors = align_features(table, ids, labels_path,
                             lambda index: f"label row {index + 1} ({ids[index]!r})")
    ensemble, report = train_filter(vectors, labels, members=members, seed=seed, kernel=kernel,
                                    regularisation=regularisation, threshold=threshold,
                                    source=str(labels_path))
    is_hdf5 = Path(features_path).suffix.lower() in (".h5", ".hdf5")
    report["features"] = {"path": str(features_path), "rows": len(table),
                          "store_pooling": store_pooling if is_hdf5 else None}
    report["labels"] = {"path": str(labels_path), "rows": len(ids)}
    report["unlabelled_feature_rows"] = len(table) - len(ids)
    ensemble.metadata["report"] = report
    report["filter"] = str(save_filter(ensemble, output))
    return report


def _dataset(data_csv):
    from cvig_engine.data import read_dataset

    records = read_dataset(data_csv)
    if not records:
        raise CvigInputError(f"{data_csv}: no rows")
    return records


def _write_dataset(path, records) -> None:
    from cvig_engine.data import write_witw_csv

    Path(path).parent.mkdir(parents=True, exist_ok=True)
    write_witw_csv(path, records)


def apply_filter_files(filter_path, features_path, data_csv, output, threshold: float | None = None,
                       scores_path=None, store_pooling: str = "mean") -> dict:
    """Write the rows of ``data_csv`` whose surface photo the filter keeps to ``output``.

    Each row's photo id is its surface path relative to the CSV's folder; every row needs a
    feature vector (a .npy without ids goes by row order). Returns a summary; when the dataset
    has a ``usable`` column, the summary also scores the filter against it.
    """
    ensemble = load_filter(filter_path)
    records = _dataset(data_csv)
    table = read_features(features_path, store_pooling=store_pooling)
    ids = [record_photo_id(record) for record in records]
    vectors = align_features(table, ids, data_csv,
                             lambda index: f"row {records[index].row} ({ids[index]!r})")
    scores = ensemble.decision_function(vectors)
    threshold = ensemble.threshold if threshold is None else float(threshold)
    kept = scores > threshold
    _write_dataset(output, [record for record, keep in zip(records, kept) if keep])
    if scores_path is not None:
        Path(scores_path).parent.mkdir(parents=True, exist_ok=True)
        with open(scores_path, "w", newline="", encoding="utf-8") as handle:
            writer = csv.writer(handle)
            writer.writerow(["id", "score", "usable"])
            for identifier, score, keep in zip(ids, scores, kept):
                writer.writerow([identifier, repr(float(score)), int(keep)])
    summary = {"rows": len(records), "kept": int(kept.sum()), "pass_rate": float(kept.mean()),
               "threshold": threshold, "output": str(output)}
    truth = np.asarray([record.usable for record in records], dtype=bool)
    if not truth.all():  # real usable flags (e.g. the synthetic world's ground truth)
        summary["against_csv_usable"] = classification_report(truth, kept)
    return summary


def photo_statistics_csv(data_csv, output) -> int:
    """Write ``image_statistics`` of each distinct surface photo of ``data_csv`` as features."""
    from tqdm import tqdm

    from cvig_engine.data import load_image

    records = _dataset(data_csv)
    rows, seen = [], set()
    for record in tqdm(records, desc="photo statistics", unit="photo", disable=None):
        identifier = record_photo_id(record)
        if identifier in seen:
            continue
        seen.add(identifier)
        image = load_image(record.surface, csv_path=record.csv_path, row=record.row)
        values = image_statistics(image / 255.0)
        rows.append([identifier] + [repr(float(value)) for value in values])
    Path(output).parent.mkdir(parents=True, exist_ok=True)
    with open(output, "w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow(["id"] + image_statistics_names())
        writer.writerows(rows)
    return len(rows)


def density_limit_csv(data_csv, output, cell_size: float, max_per_cell: int, seed: int = 0) -> dict:
    """Write at most ``max_per_cell`` pairs per ``cell_size``-metre cell of ``data_csv``."""
    records = _dataset(data_csv)
    kept, summary = density_limit(records, cell_size, max_per_cell, seed=seed, source=str(data_csv))
    _write_dataset(output, kept)
    summary["output"] = str(output)
    return summary
