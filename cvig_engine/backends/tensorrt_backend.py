"""TensorRT backend: engines from MODEL_DIR/engines (built on a miss), run on torch CUDA tensors.

Inputs go to the GPU as torch tensors and ``execute_async_v3`` runs on torch's current stream, so
no pycuda context is involved. Batches larger than the optimisation profile's max are split.
"""
from __future__ import annotations

import torch

from cvig_engine.backends.base import Backend
from cvig_engine.errors import CvigInputError
from cvig_engine.export import ROLES, import_tensorrt, open_tensorrt_engine, require_cuda


class TensorRTBackend(Backend):
    """Runs TensorRT engines built from the exported graphs."""

    name = "tensorrt"

    def __init__(self, model_dir, manifest, device="cuda", precision="fp32", batch_size=None,
                 progress=True):
        trt = import_tensorrt()
        require_cuda()
        if not str(device).startswith("cuda"):
            raise CvigInputError(f"the tensorrt backend runs on CUDA only, not on {device!r}")
        profile = manifest["preset"]["tensorrt"]["batch"]
        if batch_size is not None and batch_size > profile["max"]:
            raise CvigInputError(f"batch size {batch_size} is above the TensorRT profile's max "
                                 f"{profile['max']} (export with a preset whose "
                                 "tensorrt.batch.max is larger)")
        super().__init__(model_dir, manifest, device, precision, batch_size or profile["max"])
        self.torch_device = torch.device(device)
        self.tensorrt_version = trt.__version__
        self.engines = {}
        self.engine_descriptions = {}
        with torch.cuda.device(self.torch_device):
            for role in ROLES:
                self.engines[role], self.engine_descriptions[role] = open_tensorrt_engine(
                    model_dir, manifest, role, precision, progress=progress)

    def _wants_torch(self):
        return True

    def _run(self, role, batch):
        batch = batch.to(self.torch_device, dtype=torch.float32, non_blocking=True).contiguous()
        with torch.cuda.device(self.torch_device):
            return self.engines[role].run(batch)

    def _describe_extra(self):
        return {"tensorrt": self.tensorrt_version,
                "gpu": torch.cuda.get_device_name(self.torch_device),
                "engines": self.engine_descriptions}

    def close(self):
        self.engines = {}
