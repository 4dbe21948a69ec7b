"""The interface every inference backend implements.

A backend is opened on an exported MODEL_DIR (see ``cvig_engine.export``) and turns preprocessed
float32 NCHW batches into feature maps:

- ``encode_ground(x)``: x [B, C, ground_height, ground_width] -> float32 numpy [B, 16, 4, Wg];
- ``encode_aerial(x)``: x [B, C, 128, 512] polar images when ``aerial_input_kind == "polar"``
  (the default export), or tiles [B, C, S, S] when it is ``"tile"`` (polar transform in the graph)
  -> float32 numpy [B, 16, 4, 64].

Inputs may be numpy arrays or torch tensors (any device), float16/32/64. Wrong shapes, integer
images (not preprocessed) and non-finite values raise CvigInputError. ``describe()`` is what a
feature store records about how its features were made.
"""
from __future__ import annotations

import logging

import numpy as np

from cvig_engine.errors import CvigInputError, CvigMissingDependency
from cvig_engine.export import ROLES, feature_shape, input_shape, library_versions

LOGGER = logging.getLogger(__name__)
BACKEND_NAMES = ("torch", "onnxruntime", "tensorrt")


class BackendDowngradeError(CvigMissingDependency):
    """The runtime does not run where it was asked to (``strict`` mode)."""


class Backend:
    """Base class: input checks, batching and the description; subclasses run one batch.

    Attributes:
        name: "torch", "onnxruntime" or "tensorrt".
        device: "cpu" or "cuda" (or "cuda:N").
        precision: "fp32", "fp16" or "bf16".
        providers: ONNX Runtime execution providers in effect (empty for the other backends).
        config: the model config from the manifest.
        aerial_input_kind: "polar" or "tile" (what ``encode_aerial`` takes).
        manifest: the MODEL_DIR manifest.
        batch_size: largest batch sent to the runtime at once (None: as given).
        selection: how ``open_backend`` chose this backend (for the log and the feature store).
    """

    name = "base"

    def __init__(self, model_dir, manifest: dict, device: str, precision: str,
                 batch_size: int | None = None):
        self.model_dir = model_dir
        self.manifest = manifest
        self.config = manifest["config"]
        self.device = device
        self.precision = precision
        self.providers: list[str] = []
        self.aerial_input_kind = manifest["aerial_input_kind"]
        self.selection = None  # set by open_backend: how this backend was chosen
        if batch_size is not None and batch_size < 1:
            raise CvigInputError(f"batch size must be positive, got {batch_size}")
        self.batch_size = batch_size
        self._input_shapes = {role: tuple(input_shape(self.config, role, self.aerial_input_kind))
                              for role in ROLES}
        self._output_shapes = {role: tuple(feature_shape(self.config, role)) for role in ROLES}

    # -- public API -----------------------------------------------------------------------

    def encode_ground(self, x) -> np.ndarray:
        """Ground feature maps [B, 16, 4, Wg] (float32) of preprocessed ground images."""
        return self._encode("ground", x)

    def encode_aerial(self, x) -> np.ndarray:
        """Aerial feature maps [B, 16, 4, 64] (float32) of polar images or tiles.

        Which of the two is ``aerial_input_kind`` ("polar" or "tile").
        """
        return self._encode("aerial", x)

    def describe(self) -> dict:
        """What a feature store records: backend, device, precision, providers, versions, model."""
        return {
            "backend": self.name,
            "device": self.device,
            "precision": self.precision,
            "providers": list(self.providers),
            "aerial_input_kind": self.aerial_input_kind,
            "model_sha256": self.manifest["model_sha256"],
            "selection": self.selection,
            "versions": library_versions(tensorrt=self.name == "tensorrt"),
            **self._describe_extra(),
        }

    def close(self) -> None:
        """Release the runtime's resources."""

    def __enter__(self):
        return self

    def __exit__(self, *exc_info):
        self.close()

    def __repr__(self):
        return f"<{type(self).__name__} {self.name} {self.device} {self.precision}>"

    # -- for subclasses ---------------------------------------------------------------------

    def _run(self, role: str, batch):
        """Features of one checked batch (a contiguous float32 numpy array or torch tensor)."""
        raise NotImplementedError

    def _describe_extra(self) -> dict:
        return {}

    def _wants_torch(self) -> bool:
        """True if ``_run`` takes torch tensors (kept on their device), False for numpy."""
        return False

    # -- shared machinery -------------------------------------------------------------------

    def _encode(self, role: str, x) -> np.ndarray:
        batch = self._check_input(role, x)
        if len(batch) == 0:
            return np.zeros((0,) + self._output_shapes[role], dtype=np.float32)
        step = self.batch_size or len(batch)
        outputs = [self._to_numpy(self._run(role, batch[start:start + step]))
                   for start in range(0, len(batch), step)]
        features = outputs[0] if len(outputs) == 1 else np.concatenate(outputs)
        expected = (len(batch),) + self._output_shapes[role]
        if features.shape != expected:
            raise RuntimeError(f"{self.name} backend returned {role} features {features.shape}, "
                               f"expected {expected}")
        return features

    def _check_input(self, role: str, x):
        import torch

        expected = self._input_shapes[role]
        what = f"{role} input"
        if role == "aerial":
            what += (" (polar images)" if self.aerial_input_kind == "polar"
                     else " (tiles; the polar transform is in the graph)")
        if isinstance(x, torch.Tensor):
            dtype_ok = x.dtype in (torch.float16, torch.bfloat16, torch.float32, torch.float64)
        else:
            x = np.asarray(x)
            dtype_ok = x.dtype in (np.float16, np.float32, np.float64)
        if not dtype_ok:
            raise CvigInputError(f"{what}: expected preprocessed float images (mean/std "
                                 f"normalised), got dtype {x.dtype}")
        if x.ndim != 4 or tuple(x.shape[1:]) != expected:
            raise CvigInputError(f"{what}: expected shape [B, {', '.join(map(str, expected))}], "
                                 f"got {list(x.shape)}")
        if isinstance(x, torch.Tensor):
            x = x.detach().to(torch.float32)
            finite = bool(torch.isfinite(x).all())
            if not self._wants_torch():
                x = x.cpu().numpy()
        else:
            x = x.astype(np.float32, copy=False)
            finite = bool(np.isfinite(x).all())
            if self._wants_torch():
                x = torch.from_numpy(np.ascontiguousarray(x))
        if not finite:
            raise CvigInputError(f"{what}: contains NaN or infinite values")
        return x if self._wants_torch() else np.ascontiguousarray(x)

    @staticmethod
    def _to_numpy(features) -> np.ndarray:
        if isinstance(features, np.ndarray):
            return features.astype(np.float32, copy=False)
        return features.detach().float().cpu().numpy()
