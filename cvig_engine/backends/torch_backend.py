"""PyTorch backend: the checkpoint copy in MODEL_DIR, on CPU or CUDA.

It runs the same modules the ONNX graphs were exported from (``export.ExportedEncoder``; with
the polar transform inside when the export put it in the graph).

fp16 / bf16 run under ``torch.autocast`` (convolutions in the low type, the rest in float32);
fp32 on CUDA keeps cuDNN convolutions in IEEE fp32 (no TF32), so it meets the 1e-4 parity.
On CUDA with a fixed ``batch_size``, full batches replay a captured CUDA graph (one launch per
batch instead of one per layer: it helps most for the tiny backbone and small batches); the
last, partial batch runs eagerly.
"""
from __future__ import annotations

import contextlib
import logging

import torch

from cvig_engine.backends.base import Backend
from cvig_engine.errors import CvigInputError
from cvig_engine.export import ExportedEncoder, require_cuda

LOGGER = logging.getLogger(__name__)
_DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16}
_GRAPH_WARMUP = 3  # eager runs before capture (cuDNN algorithm choice, allocator pools)


@contextlib.contextmanager
def _ieee_convolutions():
    """cuDNN convolutions in full fp32 for a while (the new TF32 API only: mixing APIs raises)."""
    convolution = torch.backends.cudnn.conv
    previous = convolution.fp32_precision
    convolution.fp32_precision = "ieee"
    try:
        yield
    finally:
        convolution.fp32_precision = previous


class TorchBackend(Backend):
    """Runs the model with PyTorch."""

    name = "torch"

    def __init__(self, model_dir, manifest, device="cpu", precision="fp32", batch_size=None,
                 cuda_graphs="auto"):
        from cvig_engine.model import load_checkpoint
        from cvig_engine.polar import polar_sampling_grid

        super().__init__(model_dir, manifest, device, precision, batch_size)
        if precision not in ("fp32", "fp16", "bf16"):
            raise CvigInputError(f"unknown precision {precision!r}")
        if str(device).startswith("cuda"):
            require_cuda("the torch backend on CUDA")
        self.torch_device = torch.device(device)
        model = load_checkpoint(model_dir / "model.safetensors")
        grid = None
        if self.aerial_input_kind == "tile":
            grid = polar_sampling_grid(self.config["aerial_size"], self.config["polar_height"],
                                       self.config["polar_width"])
        # The modules the ONNX graphs were exported from (batch norms folded, polar grid as a
        # buffer on the device, so that a CUDA graph capture has no host copies in it).
        self.encoders = {"ground": ExportedEncoder(model.ground_encoder),
                         "aerial": ExportedEncoder(model.aerial_encoder, polar_grid=grid)}
        for encoder in self.encoders.values():
            encoder.to(self.torch_device).eval()
        self._autocast_dtype = _DTYPES.get(precision)
        on_cuda = self.torch_device.type == "cuda"
        if not on_cuda and self._autocast_dtype is not None:
            LOGGER.warning("torch %s on CPU: without native fp16 / bf16 units (AVX512-FP16, AMX) "
                           "these convolutions run ~100x slower than fp32 (VGG16: ~250 s an image "
                           "on the 2-core reference machine)", precision)
        if cuda_graphs == "auto":
            cuda_graphs = on_cuda and batch_size is not None
        self.cuda_graphs = bool(cuda_graphs)
        if self.cuda_graphs and not (on_cuda and batch_size):
            raise CvigInputError("CUDA graphs need device cuda and a fixed batch size")
        self._graphs = {}

    def _wants_torch(self):
        return True

    def _autocast(self):
        if self._autocast_dtype is None:
            # fp32 means IEEE fp32: cuDNN would otherwise use TF32 (~1e-3 relative error).
            if self.torch_device.type == "cuda":
                return _ieee_convolutions()
            return contextlib.nullcontext()
        # No weight-cast cache: it does not survive CUDA graph capture; inference gains nothing.
        return torch.autocast(self.torch_device.type, dtype=self._autocast_dtype,
                              cache_enabled=False)

    def _forward(self, role, batch):
        with torch.inference_mode(), self._autocast():
            return self.encoders[role](batch).float()

    def _run(self, role, batch):
        batch = batch.to(self.torch_device, non_blocking=True)
        if self.cuda_graphs and len(batch) == self.batch_size:
            return self._replay(role, batch)
        return self._forward(role, batch)

    def _replay(self, role, batch):
        if role not in self._graphs:
            static_input = torch.zeros_like(batch)
            side_stream = torch.cuda.Stream(self.torch_device)
            side_stream.wait_stream(torch.cuda.current_stream(self.torch_device))
            with torch.cuda.stream(side_stream):
                for _ in range(_GRAPH_WARMUP):
                    self._forward(role, static_input)
            torch.cuda.current_stream(self.torch_device).wait_stream(side_stream)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                static_output = self._forward(role, static_input)
            self._graphs[role] = (graph, static_input, static_output)
        graph, static_input, static_output = self._graphs[role]
        static_input.copy_(batch)
        graph.replay()
        return static_output.clone()

    def _describe_extra(self):
        autocast = str(self._autocast_dtype).replace("torch.", "") if self._autocast_dtype else None
        extra = {"autocast": autocast, "cuda_graphs": self.cuda_graphs}
        if self.torch_device.type == "cuda":
            extra["gpu"] = torch.cuda.get_device_name(self.torch_device)
        return extra

    def close(self):
        self._graphs.clear()
        self.encoders = {}
