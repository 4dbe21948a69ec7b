"""The usable-scene filter: an ensemble of support vector machines, stored without pickle.

Training (``train_filter``): the hand-labelled photos are split in two halves, stratified by
label with a seeded shuffle (each class: the first ``ceil(n / 2)`` of its shuffled photos train,
the rest test). Features are standardised with the training half's mean and standard deviation
(a zero deviation counts as 1). Each of the ``members`` (10) scikit-learn ``SVC`` machines (RBF
kernel, C = 1, ``class_weight="balanced"``, gamma = 1 / (D * variance of the standardised
training features), scikit-learn's "scale") trains on its own stratified bootstrap sample of the
training half (each class resampled with replacement to its own size).

Decision rule: a photo's score is the mean of the members' decision values (the signed
distances ``sum_i alpha_i y_i K(sv_i, x) + b``; positive means usable); the photo is kept
(usable) when the score is greater than the threshold (default 0, the rule each SVM uses on its
own). The report gives precision, recall and pass rate on the test half, with usable as the
positive class: precision = kept photos that are usable / kept photos, recall = kept usable
photos / usable photos, pass rate = kept photos / photos (and the same two figures for the
rejected, unusable, class).

Storage (no pickle): ``FILTER.safetensors`` holds the arrays (scaler mean and scale, each
member's support vectors and dual coefficients, float64) and a JSON document in its metadata
(format, rule, threshold, per member kernel, gamma, coef0, degree and intercept, the training
report); ``FILTER.json`` beside it repeats the document for people. Reloading evaluates the
decision function in numpy.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from cvig_engine.errors import CvigInputError
from cvig_engine.files import atomic_write_json

FILTER_FORMAT = "cvig-usable-scene-filter"
FILTER_VERSION = 1
DECISION_RULE = "mean_decision_above_threshold"
_METADATA_KEY = "cvig_filter"
_KERNELS = ("rbf", "linear", "poly", "sigmoid")
_ROW_CHUNK = 4096


@dataclass
class SupportVectorMachine:
    """One binary SVM's decision function ``f(x) = sum_i dual_coef_i K(sv_i, x) + intercept``.

    ``dual_coef`` holds ``alpha_i * y_i`` with y = +1 for usable, so f > 0 means usable (the
    convention of scikit-learn's ``SVC.decision_function`` with classes [0, 1]).
    """

    kernel: str
    support_vectors: np.ndarray
    dual_coef: np.ndarray
    intercept: float
    gamma: float
    coef0: float = 0.0
    degree: int = 3

    @classmethod
    def from_sklearn(cls, estimator) -> "SupportVectorMachine":
        """Copy a fitted binary ``sklearn.svm.SVC`` (classes 0 and 1)."""
        classes = [int(value) for value in estimator.classes_]
        if classes != [0, 1]:
            raise ValueError(f"expected a binary SVC with classes [0, 1], got {classes}")
        if estimator.kernel not in _KERNELS:
            raise ValueError(f"unsupported kernel {estimator.kernel!r}")
        return cls(kernel=estimator.kernel,
                   support_vectors=np.asarray(estimator.support_vectors_, dtype=np.float64).copy(),
                   dual_coef=np.asarray(estimator.dual_coef_, dtype=np.float64)[0].copy(),
                   intercept=float(estimator.intercept_[0]), gamma=float(estimator._gamma),
                   coef0=float(estimator.coef0), degree=int(estimator.degree))

    def kernel_matrix(self, rows: np.ndarray) -> np.ndarray:
        """``K(x, sv)`` for every row x (already standardised) and support vector: [N, S]."""
        dot = rows @ self.support_vectors.T
        if self.kernel == "linear":
            return dot
        if self.kernel == "poly":
            return (self.gamma * dot + self.coef0) ** self.degree
        if self.kernel == "sigmoid":
            return np.tanh(self.gamma * dot + self.coef0)
        row_norms = np.sum(rows ** 2, axis=1)[:, None]
        vector_norms = np.sum(self.support_vectors ** 2, axis=1)[None, :]
        squared = row_norms + vector_norms - 2.0 * dot
        return np.exp(-self.gamma * np.maximum(squared, 0.0))

    def decision_function(self, rows: np.ndarray) -> np.ndarray:
        """Signed decision values of standardised rows [N, D]: [N]."""
        return self.kernel_matrix(rows) @ self.dual_coef + self.intercept


@dataclass
class UsableSceneFilter:
    """Standardisation plus an SVM ensemble; usable where the mean decision > threshold."""

    scaler_mean: np.ndarray
    scaler_scale: np.ndarray
    members: list
    threshold: float = 0.0
    metadata: dict = field(default_factory=dict)

    @property
    def feature_dimension(self) -> int:
        return int(self.scaler_mean.shape[0])

    def standardise(self, features: np.ndarray) -> np.ndarray:
        """Features minus the training mean, divided by the training scale."""
        return (np.asarray(features, dtype=np.float64) - self.scaler_mean) / self.scaler_scale

    def member_decisions(self, features: np.ndarray) -> np.ndarray:
        """Each member's decision value for raw feature rows [N, D]: [N, members]."""
        features = np.asarray(features, dtype=np.float64)
        if features.ndim != 2 or features.shape[1] != self.feature_dimension:
            raise CvigInputError(f"the filter needs {self.feature_dimension} features per photo, "
                                 f"got an array of shape {features.shape}")
        out = np.empty((features.shape[0], len(self.members)))
        for start in range(0, features.shape[0], _ROW_CHUNK):
            rows = self.standardise(features[start:start + _ROW_CHUNK])
            for index, member in enumerate(self.members):
                out[start:start + _ROW_CHUNK, index] = member.decision_function(rows)
        return out

    def decision_function(self, features: np.ndarray) -> np.ndarray:
        """The ensemble score of each photo: the mean of the members' decision values [N]."""
        return self.member_decisions(features).mean(axis=1)

    def predict(self, features: np.ndarray, threshold: float | None = None) -> np.ndarray:
        """Boolean [N]: True where the photo is usable (score > threshold)."""
        threshold = self.threshold if threshold is None else threshold
        return self.decision_function(features) > threshold


def split_labels(labels: np.ndarray, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Stratified half/half split: (train indices, test indices), both sorted.

    Each class's photos are shuffled with ``seed`` and the first ``ceil(n / 2)`` train.
    """
    labels = np.asarray(labels)
    generator = np.random.default_rng(seed)
    train, test = [], []
    for value in (0, 1):
        indices = generator.permutation(np.flatnonzero(labels == value))
        count = (len(indices) + 1) // 2
        train.append(indices[:count])
        test.append(indices[count:])
    return np.sort(np.concatenate(train)), np.sort(np.concatenate(test))


def fit_ensemble(features: np.ndarray, labels: np.ndarray, members: int = 10, seed: int = 0,
                 kernel: str = "rbf", regularisation: float = 1.0, gamma="scale",
                 threshold: float = 0.0):
    """Fit the standardiser and ``members`` SVMs on stratified bootstraps of all given rows.

    Returns ``(UsableSceneFilter, estimators)`` with the fitted scikit-learn SVCs (for checks).
    """
    from sklearn.svm import SVC

    features = np.asarray(features, dtype=np.float64)
    labels = np.asarray(labels, dtype=np.int64)
    if kernel not in _KERNELS:
        raise CvigInputError(f"unknown SVM kernel {kernel!r} (use one of {_KERNELS})")
    if members < 1:
        raise CvigInputError(f"the ensemble needs at least one member, got {members}")
    mean = features.mean(axis=0)
    scale = features.std(axis=0)
    scale[scale == 0.0] = 1.0  # a constant feature carries no information; keep it finite
    standardised = (features - mean) / scale
    if gamma == "scale":
        variance = standardised.var()
        gamma = 1.0 / (features.shape[1] * variance) if variance > 0 else 1.0
    gamma = float(gamma)
    estimators, machines = [], []
    for member in range(members):
        generator = np.random.default_rng([seed, member])
        sample = np.concatenate([
            generator.choice(indices, size=len(indices), replace=True)
            for indices in (np.flatnonzero(labels == 0), np.flatnonzero(labels == 1))])
        estimator = SVC(kernel=kernel, C=regularisation, gamma=gamma, class_weight="balanced")
        estimator.fit(standardised[sample], labels[sample])
        estimators.append(estimator)
        machines.append(SupportVectorMachine.from_sklearn(estimator))
    ensemble = UsableSceneFilter(scaler_mean=mean, scaler_scale=scale, members=machines,
                                 threshold=float(threshold))
    return ensemble, estimators


def classification_report(labels: np.ndarray, kept: np.ndarray) -> dict:
    """Precision, recall and pass rate of a keep/reject decision, usable = positive class."""
    labels = np.asarray(labels).astype(bool)
    kept = np.asarray(kept).astype(bool)
    true_keep = int(np.sum(kept & labels))
    false_keep = int(np.sum(kept & ~labels))
    false_reject = int(np.sum(~kept & labels))
    true_reject = int(np.sum(~kept & ~labels))
    total = len(labels)

    def ratio(numerator, denominator):
        return numerator / denominator if denominator else None

    return {
        "photos": total,
        "usable_photos": int(labels.sum()),
        "kept": true_keep + false_keep,
        "precision": ratio(true_keep, true_keep + false_keep),
        "recall": ratio(true_keep, true_keep + false_reject),
        "pass_rate": ratio(true_keep + false_keep, total),
        "rejection_precision": ratio(true_reject, true_reject + false_reject),
        "rejection_recall": ratio(true_reject, true_reject + false_keep),
        "accuracy": ratio(true_keep + true_reject, total),
        "confusion": {"kept_usable": true_keep, "kept_unusable": false_keep,
                      "rejected_usable": false_reject, "rejected_unusable": true_reject},
    }


def train_filter(features: np.ndarray, labels: np.ndarray, members: int = 10, seed: int = 0,
                 kernel: str = "rbf", regularisation: float = 1.0, gamma="scale",
                 threshold: float = 0.0, source: str = "labels"):
    """Train the usable-scene filter on half of the labelled photos and test it on the other half.

    Args:
        features: [N, D] feature vectors, row i belonging to label i.
        labels: [N] 1 (usable) / 0 (unusable).
        members: SVMs in the ensemble (10).
        seed: seed of the split and the bootstraps.
        kernel, regularisation, gamma: the SVMs' kernel, C and gamma ("scale" or a number).
        threshold: keep a photo when the mean decision value is above this.
        source: name of the labels for messages.
    Returns:
        ``(UsableSceneFilter, report)``; the report (also stored in the filter's metadata) has
        the test-half precision, recall and pass rate (``classification_report``) and the split.
    """
    features = np.asarray(features, dtype=np.float64)
    labels = np.asarray(labels, dtype=np.int64)
    if features.ndim != 2 or len(features) != len(labels):
        raise CvigInputError(f"{source}: {len(labels)} labels for features of shape "
                             f"{features.shape}")
    counts = {value: int(np.sum(labels == value)) for value in (0, 1)}
    if min(counts.values()) < 3:
        raise CvigInputError(f"{source}: {counts[1]} usable and {counts[0]} unusable photos; the "
                             "filter needs at least 3 of each (2 to train, 1 to test)")
    train_indices, test_indices = split_labels(labels, seed)
    ensemble, _ = fit_ensemble(features[train_indices], labels[train_indices], members=members,
                               seed=seed, kernel=kernel, regularisation=regularisation, gamma=gamma,
                               threshold=threshold)
    test_kept = ensemble.predict(features[test_indices])
    report = {
        "rule": DECISION_RULE,
        "threshold": float(threshold),
        "members": members,
        "kernel": kernel,
        "regularisation": float(regularisation),
        "gamma": ensemble.members[0].gamma,
        "seed": seed,
        "feature_dimension": int(features.shape[1]),
        "train_photos": int(len(train_indices)),
        "test_photos": int(len(test_indices)),
        "test": classification_report(labels[test_indices], test_kept),
        "train": classification_report(labels[train_indices],
                                       ensemble.predict(features[train_indices])),
    }
    ensemble.metadata["report"] = report
    return ensemble, report


def filter_paths(path) -> tuple[Path, Path]:
    """(arrays ``.safetensors``, document ``.json``) of a filter given either of them or a stem."""
    path = Path(path)
    if path.suffix in (".safetensors", ".json"):
        path = path.with_suffix("")
    return path.with_name(path.name + ".safetensors"), path.with_name(path.name + ".json")


def save_filter(ensemble: UsableSceneFilter, path) -> Path:
    """Write ``FILTER.safetensors`` (arrays + JSON document) and ``FILTER.json``; return the 1st."""
    from safetensors.numpy import save_file

    arrays_path, document_path = filter_paths(path)
    arrays_path.parent.mkdir(parents=True, exist_ok=True)
    arrays = {"scaler_mean": ensemble.scaler_mean, "scaler_scale": ensemble.scaler_scale}
    members = []
    for index, member in enumerate(ensemble.members):
        arrays[f"member_{index}_support_vectors"] = member.support_vectors
        arrays[f"member_{index}_dual_coef"] = member.dual_coef
        members.append({"kernel": member.kernel, "gamma": member.gamma, "coef0": member.coef0,
                        "degree": member.degree, "intercept": member.intercept,
                        "support_vectors": int(member.support_vectors.shape[0])})
    document = {"format": FILTER_FORMAT, "format_version": FILTER_VERSION, "rule": DECISION_RULE,
                "threshold": ensemble.threshold, "feature_dimension": ensemble.feature_dimension,
                "members": members, "metadata": ensemble.metadata}
    arrays = {name: np.ascontiguousarray(value, dtype=np.float64) for name, value in arrays.items()}
    temporary = arrays_path.with_name(arrays_path.name + ".tmp")
    save_file(arrays, str(temporary), metadata={_METADATA_KEY: json.dumps(document)})
    temporary.replace(arrays_path)
    atomic_write_json(document_path, document)
    return arrays_path


def load_filter(path) -> UsableSceneFilter:
    """Load a filter written by ``save_filter`` (give the .safetensors, the .json or the stem)."""
    from safetensors import SafetensorError, safe_open

    arrays_path, _ = filter_paths(path)
    if not arrays_path.is_file():
        raise CvigInputError(f"{path}: filter not found (expected {arrays_path})")
    try:
        with safe_open(str(arrays_path), framework="numpy") as handle:
            document = json.loads((handle.metadata() or {}).get(_METADATA_KEY, "null"))
            arrays = {name: handle.get_tensor(name) for name in handle.keys()}
    except (SafetensorError, OSError, ValueError) as error:
        raise CvigInputError(f"{arrays_path}: not a readable safetensors file ({error})") from None
    if not isinstance(document, dict) or document.get("format") != FILTER_FORMAT:
        raise CvigInputError(f"{arrays_path}: not a cvig-engine usable-scene filter")
    if document.get("format_version") != FILTER_VERSION or document.get("rule") != DECISION_RULE:
        raise CvigInputError(f"{arrays_path}: filter format version "
                             f"{document.get('format_version')} / rule {document.get('rule')!r} is "
                             "not supported by this cvig-engine")
    try:
        members = [SupportVectorMachine(kernel=entry["kernel"],
                                        support_vectors=arrays[f"member_{index}_support_vectors"],
                                        dual_coef=arrays[f"member_{index}_dual_coef"],
                                        intercept=float(entry["intercept"]),
                                        gamma=float(entry["gamma"]), coef0=float(entry["coef0"]),
                                        degree=int(entry["degree"]))
                   for index, entry in enumerate(document["members"])]
        ensemble = UsableSceneFilter(scaler_mean=arrays["scaler_mean"],
                                     scaler_scale=arrays["scaler_scale"], members=members,
                                     threshold=float(document["threshold"]),
                                     metadata=document.get("metadata", {}))
    except KeyError as error:
        raise CvigInputError(f"{arrays_path}: incomplete filter (missing {error})") from None
    for member in members:
        dimension = member.support_vectors.shape[1:]
        if member.kernel not in _KERNELS or dimension != (ensemble.feature_dimension,):
            raise CvigInputError(f"{arrays_path}: inconsistent filter member ({member.kernel}, "
                                 f"support vectors {member.support_vectors.shape})")
    return ensemble
