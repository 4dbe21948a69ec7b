"""ONNX Runtime backend: CPU, or the CUDA / TensorRT execution providers of onnxruntime-gpu.

ONNX Runtime quietly drops an execution provider it cannot load and runs on the next one. After
the sessions are made this backend compares the providers in effect with the ones asked for: a
missing one is logged as a downgrade, or, with ``strict``, raised as BackendDowngradeError. The
``providers`` attribute (and ``describe()``) always tells the providers really in effect.
"""
from __future__ import annotations

import logging
import warnings

import numpy as np

from cvig_engine.backends.base import Backend, BackendDowngradeError
from cvig_engine.errors import CvigInputError
from cvig_engine.export import ENGINE_DIR, INPUT_NAME, OUTPUT_NAME, ROLES

LOGGER = logging.getLogger(__name__)
CPU = "CPUExecutionProvider"
CUDA = "CUDAExecutionProvider"
TENSORRT = "TensorrtExecutionProvider"
ORT_GPU_INSTALL = ("pip uninstall onnxruntime && pip install 'cvig-engine[ort-gpu]' "
                   "(onnxruntime-gpu, with CUDA and cuDNN libraries it can load)")


def requested_providers(device: str) -> list[str]:
    """Execution providers asked for on a device: "cpu" -> CPU; "cuda" -> CUDA, then CPU."""
    return [CPU] if device == "cpu" else [CUDA, CPU]


class OnnxRuntimeBackend(Backend):
    """Runs the exported graphs with ONNX Runtime."""

    name = "onnxruntime"

    def __init__(self, model_dir, manifest, device="cpu", precision="fp32", batch_size=None,
                 strict=False, providers=None, threads=None):
        import onnxruntime

        super().__init__(model_dir, manifest, device, precision, batch_size)
        if precision not in manifest["precisions"]:
            raise CvigInputError(f"{model_dir}: no {precision} graphs (exported: "
                                 f"{sorted(manifest['precisions'])}); export again with "
                                 f"--precision {precision}")
        requested = list(providers) if providers else requested_providers(str(device).split(":")[0])
        available = onnxruntime.get_available_providers()
        device_id = int(str(device).split(":")[1]) if ":" in str(device) else 0
        options = onnxruntime.SessionOptions()
        options.log_severity_level = 3
        if threads:
            options.intra_op_num_threads = int(threads)
        usable = [name for name in requested if name in available] or [CPU]
        provider_options = [self._provider_options(name, device_id) for name in usable]
        files = manifest["precisions"][precision]["files"]
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # we report the downgrade ourselves, below
            self._sessions = {
                role: onnxruntime.InferenceSession(str(model_dir / files[role]), options,
                                                   providers=usable,
                                                   provider_options=provider_options)
                for role in ROLES}
        in_effect = self._sessions["ground"].get_providers()
        missing = [name for name in requested if name not in in_effect]
        self.providers_requested = requested
        self.providers = in_effect
        self.device = f"cuda:{device_id}" if (CUDA in in_effect or TENSORRT in in_effect) else "cpu"
        self.files = {role: files[role] for role in ROLES}
        if missing:
            message = (f"onnxruntime {onnxruntime.__version__}: asked for {requested}, running on "
                       f"{in_effect} ({', '.join(missing)} not available; this build offers "
                       f"{available}). For CUDA: {ORT_GPU_INSTALL}")
            if strict:
                self.close()
                raise BackendDowngradeError(message)
            LOGGER.warning("%s", message)

    def _provider_options(self, name, device_id):
        if name == CUDA:
            return {"device_id": str(device_id)}
        if name == TENSORRT:
            cache = self.model_dir / ENGINE_DIR / "onnxruntime-tensorrt"
            cache.mkdir(parents=True, exist_ok=True)
            return {"device_id": str(device_id), "trt_engine_cache_enable": "True",
                    "trt_engine_cache_path": str(cache), "trt_timing_cache_enable": "True",
                    "trt_timing_cache_path": str(cache)}
        return {}

    def _run(self, role, batch):
        features = self._sessions[role].run([OUTPUT_NAME], {INPUT_NAME: batch})[0]
        return features.astype(np.float32, copy=False)

    def _describe_extra(self):
        return {"providers_requested": list(self.providers_requested), "files": dict(self.files)}

    def close(self):
        self._sessions = {}
