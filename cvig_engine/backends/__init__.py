"""Inference backends behind one interface (``cvig_engine.backends.base.Backend``).

    from cvig_engine.backends import open_backend
    with open_backend("model_dir", backend="auto") as backend:
        ground = backend.encode_ground(ground_batch)   # [B, 16, 4, Wg] float32
        aerial = backend.encode_aerial(aerial_batch)   # [B, 16, 4, 64]; polar images or tiles,
        record = backend.describe()                     # as backend.aerial_input_kind says

``backend="auto"`` takes the first of these that opens, and logs which and why:

1. tensorrt (TensorRT installed and a CUDA GPU);
2. onnxruntime with the CUDA execution provider (onnxruntime-gpu; a session that fell back to
   the CPU does not count);
3. torch on CUDA;
4. onnxruntime on CPU: faster than torch on CPU on the 2-core reference machine (a batch of 8
   polar images: tiny 33 ms vs 82 ms, VGG16 12.7 s vs 14.9 s);
5. torch on CPU.
"""
from __future__ import annotations

import importlib.util
import logging
from pathlib import Path

from cvig_engine.backends.base import BACKEND_NAMES, Backend, BackendDowngradeError
from cvig_engine.errors import CvigInputError, CvigMissingDependency
from cvig_engine.export import PRECISIONS, ROLES, read_manifest

__all__ = ["open_backend", "verify_model_dir", "Backend", "BackendDowngradeError", "BACKEND_NAMES"]

LOGGER = logging.getLogger(__name__)
AUTO_CPU_REASON = ("onnxruntime beats torch on CPU (2 cores, batch of 8: tiny 33 vs 82 ms, "
                   "VGG16 12.7 vs 14.9 s)")
_BACKEND_OPTIONS = {"torch": ("cuda_graphs",), "onnxruntime": ("providers", "threads"),
                    "tensorrt": ("progress",)}


def _backend_class(name: str):
    if name == "torch":
        from cvig_engine.backends.torch_backend import TorchBackend

        return TorchBackend
    if name == "onnxruntime":
        from cvig_engine.backends.onnxruntime_backend import OnnxRuntimeBackend

        return OnnxRuntimeBackend
    from cvig_engine.backends.tensorrt_backend import TensorRTBackend

    return TensorRTBackend


def _cuda_available() -> bool:
    import torch

    return torch.cuda.is_available()


def _ort_has_cuda() -> bool:
    import onnxruntime

    return "CUDAExecutionProvider" in onnxruntime.get_available_providers()


def auto_candidates(device: str) -> list[tuple[str, str]]:
    """(backend, device) pairs that ``auto`` tries, fastest first, on this machine."""
    cuda_device = device if str(device).startswith("cuda") else "cuda"
    candidates = []
    if device == "auto" or str(device).startswith("cuda"):
        if _cuda_available():
            if importlib.util.find_spec("tensorrt") is not None:
                candidates.append(("tensorrt", cuda_device))
            if _ort_has_cuda():
                candidates.append(("onnxruntime", cuda_device))
            candidates.append(("torch", cuda_device))
        elif device != "auto":
            raise CvigMissingDependency(f"device {device!r} asked for, but torch sees no CUDA GPU")
    if device in ("auto", "cpu"):
        candidates += [("onnxruntime", "cpu"), ("torch", "cpu")]
    return candidates


def open_backend(model_dir, backend: str = "auto", device: str = "auto", precision: str = "fp32",
                 strict: bool = False, batch_size: int | None = None, **options) -> Backend:
    """Open an inference backend on an exported MODEL_DIR (its files' hashes are checked first).

    Args:
        model_dir: directory written by ``cvig-engine export``.
        backend: "auto", "torch", "onnxruntime" or "tensorrt".
        device: "auto", "cpu", "cuda" or "cuda:N".
        precision: "fp32", "fp16" or "bf16" (onnxruntime and TensorRT 11 need that export).
        strict: make an onnxruntime provider downgrade an error (BackendDowngradeError).
        batch_size: largest batch sent to the runtime at once (TensorRT: at most the profile max).
        options: backend-specific keywords (torch: cuda_graphs; onnxruntime: providers, threads;
            tensorrt: progress).

    Returns:
        The backend; ``backend.selection`` says how it was chosen.
    """
    model_dir = Path(model_dir)
    if backend != "auto" and backend not in BACKEND_NAMES:
        raise CvigInputError(f"unknown backend {backend!r}: use auto or one of {BACKEND_NAMES}")
    if precision not in PRECISIONS:
        raise CvigInputError(f"unknown precision {precision!r}: use one of {PRECISIONS}")
    if device not in ("auto", "cpu") and not str(device).startswith("cuda"):
        raise CvigInputError(f"unknown device {device!r}: use auto, cpu, cuda or cuda:N")
    manifest = read_manifest(model_dir, verify=True)
    if backend != "auto":
        if device == "auto":
            on_cuda = _cuda_available() and (backend == "torch" or
                                             (backend == "onnxruntime" and _ort_has_cuda()))
            device = "cuda" if backend == "tensorrt" or on_cuda else "cpu"
        opened = _open(backend, model_dir, manifest, device, precision, strict, batch_size, options)
        opened.selection = f"asked for {backend} on {device}"
        return opened
    failures = []
    for name, candidate_device in auto_candidates(device):
        # onnxruntime on CUDA always opens strictly here: a session that fell back to the CPU is
        # not what this rung of the order means, and the CPU rungs come later anyway.
        candidate_strict = strict or (name == "onnxruntime" and candidate_device != "cpu")
        candidate_options = {key: value for key, value in options.items()
                             if key in _BACKEND_OPTIONS[name]}
        try:
            opened = _open(name, model_dir, manifest, candidate_device, precision, candidate_strict,
                           batch_size, candidate_options)
        except (CvigMissingDependency, CvigInputError, RuntimeError) as error:
            failures.append(f"{name} on {candidate_device}: {error}")
            LOGGER.info("backend auto: %s on %s unavailable (%s)", name, candidate_device, error)
            continue
        cpu_onnxruntime = (name, candidate_device) == ("onnxruntime", "cpu")
        reason = AUTO_CPU_REASON if cpu_onnxruntime else "the fastest one available"
        skipped = f"; skipped: {' | '.join(failures)}" if failures else ""
        opened.selection = f"auto: {name} on {opened.device}: {reason}{skipped}"
        LOGGER.info("backend %s", opened.selection)
        return opened
    raise CvigMissingDependency("no backend could be opened: " + " | ".join(failures))


def _open(name, model_dir, manifest, device, precision, strict, batch_size, options) -> Backend:
    unknown = sorted(set(options) - set(_BACKEND_OPTIONS[name]))
    if unknown:
        raise CvigInputError(f"the {name} backend takes no option {unknown} "
                             f"(it takes {_BACKEND_OPTIONS[name]})")
    keywords = dict(device=device, precision=precision, batch_size=batch_size, **options)
    if name == "onnxruntime":
        keywords["strict"] = strict
    return _backend_class(name)(model_dir, manifest, **keywords)


def verify_model_dir(model_dir, backend: str = "auto", device: str = "auto",
                     precision: str = "fp32", strict: bool = False, batch_size: int | None = None,
                     seed: int = 0, **options) -> dict:
    """Check an exported MODEL_DIR on this machine: file hashes, then a batch through a backend.

    The backend's features of a random batch (2 images per encoder) are compared with PyTorch
    fp32 on CPU: fp32 by the max abs difference of normalised maps (the manifest's tolerance),
    fp16 and bf16 by the per-map cosine (the manifest's threshold). Raises ExportCheckError if
    one fails.
    """
    import numpy as np
    import torch

    from cvig_engine.export import (ExportCheckError, compare_features, input_shape,
                                    torch_reference_features)
    from cvig_engine.model import load_checkpoint

    model_dir = Path(model_dir)
    with open_backend(model_dir, backend, device, precision, strict, batch_size,
                      **options) as opened:
        manifest = opened.manifest
        limits = manifest["preset"]["parity"]
        model = load_checkpoint(model_dir / "model.safetensors")
        rng = np.random.default_rng(seed)
        checks, failures = {}, []
        for role in ROLES:
            shape = [2] + input_shape(opened.config, role, opened.aerial_input_kind)
            batch = torch.from_numpy(rng.standard_normal(shape)).float()
            encode = opened.encode_ground if role == "ground" else opened.encode_aerial
            features = encode(batch)
            reference = torch_reference_features(model, role, batch, opened.aerial_input_kind)
            checks[role], passed = compare_features(features, reference, precision, limits)
            if not passed:
                failures.append(f"{role}: {checks[role]}")
        if failures:
            raise ExportCheckError(f"{opened.name} {precision} on {opened.device} disagrees with "
                                   f"PyTorch fp32: {'; '.join(failures)}")
        return {"model_dir": str(model_dir), "model_sha256": manifest["model_sha256"],
                "files_verified": sorted(manifest["files"]), "backend": opened.describe(),
                "checks": checks}
