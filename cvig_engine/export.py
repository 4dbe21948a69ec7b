"""ONNX export of the twin encoders, the MODEL_DIR manifest, and TensorRT engine builds.

``export_model(checkpoint, model_dir)`` writes a MODEL_DIR::

    manifest.json      config, preprocessing, sha256 of every file, opsets, versions, figures
    model.safetensors  a copy of the checkpoint (the torch backend and load_checkpoint read it)
    model.json
    ground.onnx        fp32 ground encoder, input "input" [batch, C, 128, ground_width]
    aerial.onnx        fp32 aerial encoder, input "input" [batch, C, 128, 512] (polar images),
                       or [batch, C, S, S] (tiles) when the polar transform is in the graph
    ground.fp16.onnx   (--precision fp16 / bf16) the same graphs computing in float16 /
    aerial.fp16.onnx   bfloat16, with float32 inputs and outputs (Casts inside the graph)
    engines/           TensorRT engine cache, created on demand

Every graph has one symbolic batch axis (``dim_param`` "batch") and opset 18: from opset 20 on
GridSample's modes are renamed ("bilinear" -> "linear") and TensorRT silently falls back to
nearest. Opset 18 has no bfloat16 Conv, so the bf16 graphs alone are written at opset 22; they
are refused when the polar transform is in the graph (GridSample at opset 22 has the new names).

Where the polar transform runs (``polar_transform`` in the preset): "preprocess" (the default)
keeps the graphs to plain Conv / Relu / MaxPool / Slice / Concat and the embed workers call
``cvig_engine.polar_transform`` (the function the model was trained with); "graph" puts the same
bilinear GridSample in aerial.onnx so that it takes raw tiles. A 128 x 512 polar image has as
many pixels as a 256 x 256 tile, so moving the transform into the graph saves no host-to-device
traffic, only ~4 ms of CPU per tile, and adds an op that is sensitive to opset, precision (grid
coordinates in fp16 are off by ~0.1 px) and TensorRT version.

Checks (the export fails if one does not pass): the batch axis is symbolic in every file; ONNX
Runtime on CPU runs batch 1 and batch >= 2 from one file; fp32 parity with PyTorch is within
1e-4 (max abs difference of feature maps L2-normalised over C, H, W) on random, image-like and
optionally real images; each lower precision reaches a per-feature-map cosine >= 0.999 against
PyTorch fp32. All figures go to the manifest.
"""
from __future__ import annotations

import contextlib
import copy
import datetime
import hashlib
import importlib
import importlib.util
import json
import logging
import platform
import shutil
import sys
import warnings
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from cvig_engine.errors import CvigInputError, CvigMissingDependency
from cvig_engine.files import atomic_write_json, atomic_write_text, file_sha256

LOGGER = logging.getLogger(__name__)

MANIFEST_NAME = "manifest.json"
MANIFEST_FORMAT = "cvig-model-dir"
MANIFEST_VERSION = 1
PRECISIONS = ("fp32", "fp16", "bf16")
ROLES = ("ground", "aerial")
INPUT_NAME = "input"
OUTPUT_NAME = "features"
BATCH_DIM = "batch"
DEFAULT_OPSET = 18
BF16_OPSET = 22  # the first opset whose Conv accepts bfloat16
POLAR_CHOICES = ("preprocess", "graph")
ENGINE_DIR = "engines"
PRESETS_PATH = Path(__file__).resolve().parents[1] / "export" / "presets.json"
TENSORRT_INSTALL = ("pip install 'cvig-engine[tensorrt]' (TensorRT's libraries come from "
                    "NVIDIA's package index; add --extra-index-url https://pypi.nvidia.com if pip "
                    "cannot find them)")
_TORCH_DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}

# Used when export/presets.json is not there (an installed wheel); tests keep the two equal.
DEFAULT_PRESET = {
    "polar_transform": "preprocess",
    "parity": {"random_batch": 2, "image_batch": 1, "max_abs_tolerance": 1e-4,
               "cosine_min": 0.999, "seed": 0},
    "tensorrt": {"batch": {"min": 1, "opt": 32, "max": 256}, "workspace_mib": 4096,
                 "tf32": False, "timing_cache": True},
}


class ExportCheckError(RuntimeError):
    """An exported graph failed a check (symbolic batch, parity or precision)."""


# -------------------------------------------------------------------------------------------------
# presets and file names


def onnx_file_name(role: str, precision: str) -> str:
    """File name of an encoder's graph in MODEL_DIR: ``ground.onnx``, ``aerial.fp16.onnx``, ..."""
    return f"{role}.onnx" if precision == "fp32" else f"{role}.{precision}.onnx"


def load_preset(preset=None) -> dict:
    """The export preset: a name in export/presets.json, a JSON file or a dict, over 'default'."""
    named = {}
    if PRESETS_PATH.is_file():
        try:
            named = json.loads(PRESETS_PATH.read_text())
        except json.JSONDecodeError as error:
            raise CvigInputError(f"{PRESETS_PATH}: not valid JSON ({error})") from None
    base = named.get("default", DEFAULT_PRESET)
    if preset is None or preset == "default":
        overrides = {}
    elif isinstance(preset, dict):
        overrides = preset
    elif isinstance(preset, str) and preset in named:
        overrides = named[preset]
    elif Path(preset).is_file():
        try:
            overrides = json.loads(Path(preset).read_text())
        except json.JSONDecodeError as error:
            raise CvigInputError(f"{preset}: not valid JSON ({error})") from None
    else:
        choices = sorted(name for name in named if not name.startswith("_"))
        raise CvigInputError(f"unknown export preset {preset!r}: not a file, and {PRESETS_PATH} "
                             f"names {choices}")
    merged = _merge(base, overrides, where="preset")
    _validate_preset(merged)
    return merged


def _merge(base: dict, overrides: dict, where: str) -> dict:
    merged = copy.deepcopy(base)
    for key, value in overrides.items():
        if key.startswith("_"):
            continue
        if key not in merged:
            raise CvigInputError(f"{where}: unknown key {key!r} (known: {sorted(merged)})")
        if isinstance(merged[key], dict):
            if not isinstance(value, dict):
                raise CvigInputError(f"{where}.{key}: expected an object, got {value!r}")
            merged[key] = _merge(merged[key], value, f"{where}.{key}")
        else:
            merged[key] = value
    return merged


def _validate_preset(preset: dict) -> None:
    if preset["polar_transform"] not in POLAR_CHOICES:
        raise CvigInputError(f"preset.polar_transform must be one of {POLAR_CHOICES}, "
                             f"got {preset['polar_transform']!r}")
    batch = preset["tensorrt"]["batch"]
    sizes = [batch.get(key) for key in ("min", "opt", "max")]
    if not all(isinstance(size, int) and size >= 1 for size in sizes) \
            or not sizes[0] <= sizes[1] <= sizes[2]:
        raise CvigInputError("preset.tensorrt.batch needs integers 1 <= min <= opt <= max, "
                             f"got {batch}")
    parity = preset["parity"]
    if parity["random_batch"] < 2 or parity["image_batch"] < 1:
        raise CvigInputError("preset.parity: random_batch must be >= 2 (the batch-axis check runs "
                             f"batch 1 and a larger batch) and image_batch >= 1, got {parity}")


def _normalise_precisions(precision) -> list[str]:
    requested = [precision] if isinstance(precision, str) else list(precision)
    for item in requested:
        if item not in PRECISIONS:
            raise CvigInputError(f"unknown precision {item!r}: use one of {PRECISIONS}")
    # fp32 is always exported: it is the reference and what ONNX Runtime on CPU runs.
    return [name for name in PRECISIONS if name == "fp32" or name in requested]


# -------------------------------------------------------------------------------------------------
# the exported modules


def _fuse_batch_norms(module: nn.Module) -> nn.Module:
    """Fold each eval-mode BatchNorm2d into the convolution before it, in float32, in place.

    Left to the exporter, the folding happens after the cast and leaves float32 weights on
    bfloat16 convolutions (an invalid graph); folded here, every precision casts the same weights.
    """
    from torch.nn.utils.fusion import fuse_conv_bn_eval

    for child in module.children():
        _fuse_batch_norms(child)
    if isinstance(module, nn.Sequential):
        for index in range(len(module) - 1):
            convolution, batch_norm = module[index], module[index + 1]
            if isinstance(convolution, nn.Conv2d) and isinstance(batch_norm, nn.BatchNorm2d):
                module[index] = fuse_conv_bn_eval(convolution, batch_norm)
                module[index + 1] = nn.Identity()  # keeps the indices the forward pass counts on
    return module


class ExportedEncoder(nn.Module):
    """What one ONNX file computes: float32 in, float32 out.

    Optionally the polar transform first (the same grid and GridSample as
    ``cvig_engine.polar_transform``, computed in float32), then the encoder in ``dtype``.
    """

    def __init__(self, encoder: nn.Module, dtype=torch.float32, polar_grid=None):
        super().__init__()
        self.encoder = _fuse_batch_norms(copy.deepcopy(encoder).eval()).to(dtype)
        self.dtype = dtype
        if polar_grid is not None:
            # float32 like polar_transform's grid.to(dtype=float32): identical sample positions.
            self.register_buffer("polar_grid", polar_grid.to(torch.float32).clone())
        else:
            self.polar_grid = None

    def forward(self, x):
        if self.polar_grid is not None:
            grid = self.polar_grid.expand(x.shape[0], -1, -1, -1)
            x = F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=True)
        if self.dtype != torch.float32:
            return self.encoder(x.to(self.dtype)).to(torch.float32)
        return self.encoder(x)


def _exported_module(model, role: str, precision: str, polar: str) -> ExportedEncoder:
    from cvig_engine.polar import polar_sampling_grid

    config = model.config
    if role == "ground":
        return ExportedEncoder(model.ground_encoder, _TORCH_DTYPES[precision])
    grid = None
    if polar == "graph":
        grid = polar_sampling_grid(config["aerial_size"], config["polar_height"],
                                   config["polar_width"])
    return ExportedEncoder(model.aerial_encoder, _TORCH_DTYPES[precision], grid)


def input_shape(config: dict, role: str, aerial_input_kind: str) -> list[int]:
    """Per-image input shape [C, H, W] of an encoder in MODEL_DIR."""
    channels = config["in_channels"]
    if role == "ground":
        return [channels, config["ground_height"], config["ground_width"]]
    if aerial_input_kind == "tile":
        return [channels, config["aerial_size"], config["aerial_size"]]
    return [channels, config["polar_height"], config["polar_width"]]


def feature_shape(config: dict, role: str) -> list[int]:
    """Per-image feature map shape [C, H, W] of an encoder."""
    return list(config["ground_feature_shape" if role == "ground" else "aerial_feature_shape"])


@contextlib.contextmanager
def _quiet_loggers(*names):
    """Raise some libraries' loggers to WARNING for a while (the exporter logs each pass)."""
    loggers = [logging.getLogger(name) for name in names]
    levels = [logger.level for logger in loggers]
    for logger in loggers:
        logger.setLevel(max(logger.getEffectiveLevel(), logging.WARNING))
    try:
        yield
    finally:
        for logger, level in zip(loggers, levels):
            logger.setLevel(level)


class _AllEncoders(nn.Module):
    """Several ExportedEncoders behind two inputs, so that one export call traces them all.

    Each torch.onnx.export call pays seconds of fixed cost (op registry, decompositions); the
    per-file graphs are cut out of the joint graph afterwards.
    """

    def __init__(self, modules: dict):
        super().__init__()
        self.parts = nn.ModuleDict(modules)

    def forward(self, ground, aerial):
        return tuple(part(ground if key.startswith("ground") else aerial)
                     for key, part in self.parts.items())


def _rename_value(graph, old: str, new: str) -> None:
    for node in graph.node:
        node.input[:] = [new if name == old else name for name in node.input]
        node.output[:] = [new if name == old else name for name in node.output]
    for value in list(graph.input) + list(graph.output) + list(graph.value_info):
        if value.name == old:
            value.name = new


def _rename_dim(graph, old: str, new: str) -> None:
    for value in list(graph.input) + list(graph.output) + list(graph.value_info):
        for dim in value.type.tensor_type.shape.dim:
            if dim.dim_param == old:
                dim.dim_param = new


def _export_graphs(modules: dict, examples: dict, model_dir: Path, opset: int) -> dict:
    """Export {(role, precision): module} with a symbolic batch axis, one ONNX file each.

    Returns {(role, precision): path}. Node metadata (stack traces with this machine's paths) is
    dropped so that the files are reproducible.
    """
    import onnx
    from onnx.utils import Extractor

    keys = {f"{role}_{precision}": (role, precision) for role, precision in modules}
    joint = _AllEncoders({key: modules[keys[key]] for key in keys}).eval()
    # One batch symbol per input: a shared one would let the aerial graph take its batch size
    # from the ground input (GridSample's grid is expanded to the batch).
    batches = {role: torch.export.Dim(f"{role}_{BATCH_DIM}", min=1) for role in ROLES}
    temporary = model_dir / f"joint-opset{opset}.onnx.tmp"
    quiet = _quiet_loggers("onnxscript", "onnx_ir", "torch.onnx", "torch.export")
    with warnings.catch_warnings(), quiet:
        warnings.simplefilter("ignore")  # the exporter's deprecation chatter, not about our graphs
        try:
            torch.onnx.export(joint, (examples["ground"], examples["aerial"]), str(temporary),
                              dynamo=True, opset_version=opset, external_data=False, verbose=False,
                              report=False, input_names=list(ROLES), output_names=list(keys),
                              dynamic_shapes=({0: batches["ground"]}, {0: batches["aerial"]}))
        except Exception as error:  # the exporter raises many types; say which graphs failed
            raise ExportCheckError(f"ONNX export (opset {opset}) of {sorted(keys)} failed: "
                                   f"{error}") from error
    joint_model = onnx.load(str(temporary))
    temporary.unlink()
    for node in joint_model.graph.node:
        del node.metadata_props[:]
    extractor = Extractor(joint_model)
    paths = {}
    for key, (role, precision) in keys.items():
        graph = extractor.extract_model([role], [key])
        _rename_value(graph.graph, role, INPUT_NAME)
        _rename_value(graph.graph, key, OUTPUT_NAME)
        _rename_dim(graph.graph, f"{role}_{BATCH_DIM}", BATCH_DIM)
        graph.graph.name = f"cvig-{role}-{precision}"
        graph.doc_string = f"cvig-engine {role} encoder, {precision}"
        onnx.checker.check_model(graph, full_check=True)  # strict type inference: no mixed types
        path = model_dir / onnx_file_name(role, precision)
        partial = path.with_name(path.name + ".tmp")
        onnx.save(graph, str(partial))
        partial.replace(path)
        paths[(role, precision)] = path
    return paths


def check_symbolic_batch(path) -> str:
    """Return the batch dim_param shared by every input and output of an ONNX file, or raise."""
    import onnx

    graph = onnx.load(str(path), load_external_data=False).graph
    names = set()
    for value in list(graph.input) + list(graph.output):
        dims = value.type.tensor_type.shape.dim
        if not dims or dims[0].HasField("dim_value") or not dims[0].dim_param:
            found = dims[0].dim_value if dims and dims[0].HasField("dim_value") else None
            raise ExportCheckError(f"{path}: {value.name!r} has a fixed batch dimension "
                                   f"({found}), expected a symbolic one")
        names.add(dims[0].dim_param)
    if len(names) != 1:
        raise ExportCheckError(f"{path}: inputs and outputs use different batch names "
                               f"{sorted(names)}")
    return names.pop()


# -------------------------------------------------------------------------------------------------
# check inputs and figures


def normalise_maps(features) -> np.ndarray:
    """Each feature map L2-normalised over (C, H, W), in float64."""
    features = np.asarray(features, dtype=np.float64)
    norms = np.linalg.norm(features.reshape(len(features), -1), axis=1)
    return features / np.maximum(norms, 1e-12)[:, None, None, None]


def map_cosines(features, reference) -> np.ndarray:
    """Cosine between corresponding feature maps (each flattened) of two batches."""
    first = normalise_maps(features).reshape(len(features), -1)
    second = normalise_maps(reference).reshape(len(reference), -1)
    return (first * second).sum(axis=1)


def max_abs_difference(features, reference) -> float:
    """Largest absolute difference between corresponding normalised feature maps."""
    return float(np.abs(normalise_maps(features) - normalise_maps(reference)).max())


def compare_features(features, reference, precision: str, limits: dict) -> tuple[dict, bool]:
    """Figures of features against a PyTorch fp32 reference, and whether they pass the limits.

    fp32 passes on the max abs difference of normalised maps (``limits["max_abs_tolerance"]``),
    fp16 / bf16 on the lowest per-map cosine (``limits["cosine_min"]``).
    """
    figures = {"max_abs": max_abs_difference(features, reference),
               "cosine_min": float(map_cosines(features, reference).min())}
    if precision == "fp32":
        return figures, figures["max_abs"] <= limits["max_abs_tolerance"]
    return figures, figures["cosine_min"] >= limits["cosine_min"]


def _normalise_images(images: torch.Tensor, config: dict) -> torch.Tensor:
    mean = torch.tensor(config["mean"], dtype=torch.float32)[None, :, None, None]
    std = torch.tensor(config["std"], dtype=torch.float32)[None, :, None, None]
    return (images - mean) / std


def _image_like(rng: np.random.Generator, batch: int, channels: int, height: int,
                width: int) -> torch.Tensor:
    """Smooth random colour fields with hard-edged rectangles, in [0, 1]: the statistics of
    images (bounded, spatially correlated, with edges) that Gaussian noise lacks."""
    coarse = rng.random((batch, channels, max(height // 16, 2), max(width // 16, 2)))
    images = F.interpolate(torch.from_numpy(coarse).float(), size=(height, width), mode="bilinear",
                           align_corners=False)
    for index in range(batch):
        for _ in range(8):
            top, left = rng.integers(0, height - 2), rng.integers(0, width - 2)
            bottom = top + rng.integers(2, max(height // 3, 3))
            right = left + rng.integers(2, max(width // 3, 3))
            colour = torch.from_numpy(rng.random(channels)).float()[:, None, None]
            images[index, :, top:bottom, left:right] = colour
    return images.clamp(0.0, 1.0)


def _load_image(path, height: int, width: int) -> torch.Tensor:
    """An RGB image file as a float tensor [3, height, width] in [0, 1] (bilinear resize)."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as image:
            image = image.convert("RGB").resize((width, height), Image.BILINEAR)
            array = np.asarray(image, dtype=np.float32) / 255.0
    except (OSError, UnidentifiedImageError) as error:
        raise CvigInputError(f"{path}: not a readable image ({error})") from None
    return torch.from_numpy(array.transpose(2, 0, 1).copy())


def _parity_inputs(config: dict, preset: dict, aerial_kind: str, sample_images) -> dict:
    """Per role, named input batches in the exported graph's input space (float32 tensors)."""
    from cvig_engine.polar import polar_transform

    parity = preset["parity"]
    rng = np.random.default_rng(parity["seed"])
    channels, size = config["in_channels"], config["aerial_size"]
    shapes = {role: input_shape(config, role, aerial_kind) for role in ROLES}

    def random(role):
        shape = [parity["random_batch"]] + shapes[role]
        return torch.from_numpy(rng.standard_normal(shape)).float()

    def aerial_from_tiles(tiles):
        tiles = _normalise_images(tiles, config)
        if aerial_kind == "tile":
            return tiles
        return polar_transform(tiles, config["polar_height"], config["polar_width"])

    ground_images = _image_like(rng, parity["image_batch"], channels, *shapes["ground"][1:])
    inputs = {
        "ground": {"random": random("ground"),
                   "image_like": _normalise_images(ground_images, config)},
        "aerial": {"random": random("aerial"),
                   "image_like": aerial_from_tiles(
                       _image_like(rng, parity["image_batch"], channels, size, size))},
    }
    for role, paths in (sample_images or {}).items():
        if role not in ROLES:
            raise CvigInputError(f"sample images: unknown role {role!r} (use 'ground' or 'aerial')")
        if not paths:
            continue
        if channels != 3:
            raise CvigInputError(f"sample images are RGB but this model takes {channels} bands; "
                                 "leave them out (random and image-like inputs are still checked)")
        height, width = shapes["ground"][1:] if role == "ground" else (size, size)
        images = torch.stack([_load_image(path, height, width) for path in paths])
        inputs[role]["images"] = (_normalise_images(images, config) if role == "ground"
                                  else aerial_from_tiles(images))
    return inputs


def torch_reference_features(model, role: str, batch: torch.Tensor, aerial_kind: str) -> np.ndarray:
    """PyTorch fp32 features (numpy) of a batch given in the exported graph's input space."""
    from cvig_engine.polar import polar_transform

    config = model.config
    with torch.inference_mode():
        if role == "ground":
            return model.ground_encoder(batch).numpy()
        if aerial_kind == "tile":
            batch = polar_transform(batch, config["polar_height"], config["polar_width"])
        return model.aerial_encoder(batch).numpy()


def _cpu_session(path):
    import onnxruntime

    options = onnxruntime.SessionOptions()
    options.log_severity_level = 3
    return onnxruntime.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def _run_session(session, batch: torch.Tensor) -> np.ndarray:
    feed = {INPUT_NAME: np.ascontiguousarray(batch.numpy(), dtype=np.float32)}
    return session.run([OUTPUT_NAME], feed)[0]


def _check_fp32(paths: dict, references: dict, inputs: dict, tolerance: float) -> dict:
    """ONNX Runtime CPU vs PyTorch fp32: max abs difference of normalised maps, per input."""
    figures = {"metric": "max |a/|a| - b/|b||, maps L2-normalised over (C, H, W)",
               "reference": "PyTorch fp32 on CPU", "runtime": "ONNX Runtime CPUExecutionProvider",
               "tolerance": tolerance}
    failures = []
    for role in ROLES:
        session = _cpu_session(paths[role])
        figures[role] = {}
        for name, batch in inputs[role].items():
            outputs = _run_session(session, batch)
            reference = references[role][name]
            if outputs.shape != reference.shape:
                raise ExportCheckError(f"{paths[role]}: output shape {outputs.shape} for input "
                                       f"{name}, PyTorch gives {reference.shape}")
            difference = max_abs_difference(outputs, reference)
            figures[role][name] = {"batch": len(batch), "max_abs": difference,
                                   "cosine_min": float(map_cosines(outputs, reference).min())}
            if not difference <= tolerance:
                failures.append(f"{role}/{name}: {difference:.3g}")
    if failures:
        raise ExportCheckError(f"ONNX Runtime and PyTorch disagree beyond {tolerance}: "
                               f"{', '.join(failures)}")
    return figures


def _emulated_precision(module: ExportedEncoder, dtype):
    """A function running a lower-precision module as float32 arithmetic with ``dtype`` rounding.

    The weights are already rounded (the module holds them in ``dtype``); the input and every
    layer's output are rounded too, which is what a GPU's low-precision kernels (accumulating in
    float32) do. PyTorch's own CPU float16 / bfloat16 convolutions would do the same work a
    hundred times slower where the CPU lacks native support (~250 s per VGG16 image here).
    """
    emulated = copy.deepcopy(module).float()
    emulated.dtype = torch.float32
    # Where the graph casts to the low type: the encoder's input (after any polar transform).
    emulated.encoder.register_forward_pre_hook(lambda _, inputs: (inputs[0].to(dtype).float(),))
    for layer in emulated.encoder.modules():
        if not list(layer.children()):
            layer.register_forward_hook(lambda _, __, output: output.to(dtype).float())

    def run(batch):
        with torch.inference_mode():
            return emulated(batch).numpy()

    return run


def _check_precision(precision: str, paths: dict, modules: dict, references: dict, inputs: dict,
                     cosine_min: float) -> dict:
    """Per-feature-map cosine of a lower-precision graph against PyTorch fp32.

    Run with ONNX Runtime on CPU where it has kernels for the type; otherwise (bfloat16 Conv) the
    precision is emulated in PyTorch on CPU (``_emulated_precision``), and the manifest says so.
    """
    import onnxruntime
    from onnxruntime.capi import onnxruntime_pybind11_state as ort_errors

    figures = {"threshold": cosine_min, "reference": "PyTorch fp32 on CPU"}
    failures = []
    for role in ROLES:
        try:
            session = _cpu_session(paths[role])
            figures["checked_with"] = "ONNX Runtime CPUExecutionProvider"

            def run(batch, session=session):
                return _run_session(session, batch)
        except ort_errors.NotImplemented as error:  # no kernel for the type; broken graphs fail
            reason = str(error).splitlines()[0][:200]
            figures["checked_with"] = (f"PyTorch on CPU, {precision} emulated: float32 arithmetic "
                                       "with the weights, the input and every layer's output "
                                       f"rounded to {str(_TORCH_DTYPES[precision])[6:]}")
            figures["onnxruntime_cpu"] = (f"not run: ONNX Runtime {onnxruntime.__version__} on "
                                          f"CPU cannot: {reason}")
            run = _emulated_precision(modules[role], _TORCH_DTYPES[precision])
        figures[role] = {}
        for name, batch in inputs[role].items():
            cosines = map_cosines(run(batch), references[role][name])
            figures[role][name] = {"batch": len(batch), "cosine_min": float(cosines.min())}
            if not cosines.min() >= cosine_min:
                failures.append(f"{role}/{name}: {cosines.min():.6f}")
    if failures:
        raise ExportCheckError(f"{precision} features drift from fp32 (cosine < {cosine_min}): "
                               f"{', '.join(failures)}")
    figures["cosine_min"] = min(entry["cosine_min"] for role in ROLES
                                for entry in figures[role].values())
    return figures


# -------------------------------------------------------------------------------------------------
# versions and the manifest


def library_versions(tensorrt: bool = False) -> dict:
    """Versions of Python and of the libraries that produce or run the features."""
    from cvig_engine import __version__

    versions = {"python": platform.python_version(), "cvig_engine": __version__}
    modules = ["torch", "numpy", "onnx", "onnxscript", "onnxruntime"]
    for module_name in modules + (["tensorrt"] if tensorrt else []):
        if module_name in sys.modules or importlib.util.find_spec(module_name) is not None:
            try:
                module = importlib.import_module(module_name)
            except ImportError as error:
                versions[module_name] = f"not importable ({error})"
            else:
                versions[module_name] = getattr(module, "__version__", "unknown")
    return versions


def _file_entry(path: Path) -> dict:
    return {"sha256": file_sha256(path), "bytes": path.stat().st_size}


def read_manifest(model_dir, *, verify: bool = True) -> dict:
    """Read MODEL_DIR/manifest.json; with ``verify`` check the sha256 of every listed file.

    Raises CvigInputError naming the missing or changed file.
    """
    model_dir = Path(model_dir)
    path = model_dir / MANIFEST_NAME
    if not path.is_file():
        raise CvigInputError(f"{model_dir}: not an exported model directory (no {MANIFEST_NAME}; "
                             "create one with `cvig-engine export CHECKPOINT -o MODEL_DIR`)")
    try:
        manifest = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise CvigInputError(f"{path}: not valid JSON ({error})") from None
    if not isinstance(manifest, dict) or manifest.get("format") != MANIFEST_FORMAT:
        raise CvigInputError(f"{path}: not a cvig-engine model manifest "
                             f"(format != {MANIFEST_FORMAT!r})")
    if manifest.get("format_version", 0) > MANIFEST_VERSION:
        raise CvigInputError(f"{path}: manifest version {manifest['format_version']} is newer than "
                             f"this cvig-engine understands ({MANIFEST_VERSION}); upgrade it")
    if verify:
        for name, entry in manifest.get("files", {}).items():
            file_path = model_dir / name
            if Path(name).name != name:
                raise CvigInputError(f"{path}: file entry {name!r} is not a plain file name")
            if not file_path.is_file():
                raise CvigInputError(f"{file_path}: listed in {path} but missing")
            actual = file_sha256(file_path)
            if actual != entry["sha256"]:
                raise CvigInputError(f"{file_path}: sha256 {actual[:16]}... does not match the "
                                     f"manifest ({entry['sha256'][:16]}...): the file changed "
                                     "after export; export the checkpoint again")
    return manifest


def _preprocess_description(config: dict, aerial_kind: str) -> dict:
    return {
        "layout": "NCHW float32",
        "bands": ["red", "green", "blue", "building", "road"][: config["in_channels"]],
        "scale": "8-bit image values divided by 255 (to [0, 1]) before mean/std",
        "mean": config["mean"],
        "std": config["std"],
        "ground": {"height": config["ground_height"], "width": config["ground_width"],
                   "input_shape": input_shape(config, "ground", aerial_kind)},
        "aerial": {
            "input": aerial_kind,
            "input_shape": input_shape(config, "aerial", aerial_kind),
            "tile_size": config["aerial_size"],
            "polar": {"height": config["polar_height"], "width": config["polar_width"],
                      "function": "cvig_engine.polar.polar_transform",
                      "where": "in aerial.onnx" if aerial_kind == "tile" else "in preprocessing",
                      "sampling": "bilinear, zeros outside the tile, align_corners=True; every "
                                  "sample lies inside the tile, so normalising before or after "
                                  "the transform gives the same"},
        },
    }


def _copy_checkpoint(checkpoint: Path, model, model_dir: Path) -> None:
    """model.safetensors + model.json: the checkpoint's bytes, or a conversion of a .pth."""
    from cvig_engine.model import save_checkpoint
    from cvig_engine.model.checkpoint import read_checkpoint_document, sidecar_path

    document = read_checkpoint_document(checkpoint)
    weights = model_dir / "model.safetensors"
    if checkpoint.suffix == ".safetensors":
        temporary = weights.with_name(weights.name + ".tmp")
        shutil.copyfile(checkpoint, temporary)
        temporary.replace(weights)
        sidecar = sidecar_path(checkpoint)
        text = sidecar.read_text() if sidecar.is_file() else json.dumps(document, indent=2) + "\n"
        atomic_write_text(model_dir / "model.json", text)
    else:
        save_checkpoint(model, weights, metadata=document.get("metadata"))


def _prepare_model_dir(model_dir: Path) -> None:
    if model_dir.exists() and not model_dir.is_dir():
        raise CvigInputError(f"{model_dir}: exists and is not a directory")
    manifest_path = model_dir / MANIFEST_NAME
    if model_dir.is_dir() and any(model_dir.iterdir()) and not manifest_path.is_file():
        raise CvigInputError(f"{model_dir}: exists, is not empty and holds no {MANIFEST_NAME}; "
                             "choose a new or empty directory")
    model_dir.mkdir(parents=True, exist_ok=True)
    if manifest_path.is_file():
        # A re-export. The old manifest goes first, so that a half-finished export is never
        # taken as valid, then the files it listed (a precision not exported again must go).
        previous = read_manifest(model_dir, verify=False)
        manifest_path.unlink()
        for name in previous.get("files", {}):
            if Path(name).name == name:
                (model_dir / name).unlink(missing_ok=True)


def _export_precisions(model, model_dir: Path, precisions: list, opset: int, polar: str,
                       inputs: dict, references: dict, preset: dict, step) -> tuple[dict, dict]:
    """Export every precision's graphs and check them; returns (precision entries, parity)."""
    limits = preset["parity"]
    entries, parity = {}, None
    groups = {}  # one export call per opset: fp32 and fp16 at `opset`, bf16 at 22
    for name in precisions:
        groups.setdefault(BF16_OPSET if name == "bf16" else opset, []).append(name)
    examples = {role: inputs[role]["random"] for role in ROLES}
    for graph_opset, names in groups.items():
        modules = {(role, name): _exported_module(model, role, name, polar)
                   for name in names for role in ROLES}
        exported = _export_graphs(modules, examples, model_dir, graph_opset)
        step(f"opset {graph_opset}: {', '.join(names)} exported")
        for name in names:
            paths = {role: exported[(role, name)] for role in ROLES}
            for path in paths.values():
                check_symbolic_batch(path)
            if name == "fp32":
                parity = _check_fp32(paths, references, inputs, limits["max_abs_tolerance"])
                lowest = min(entry["cosine_min"] for role in ROLES
                             for entry in parity[role].values())
                cosine = {"threshold": limits["cosine_min"], "checked_with": parity["runtime"],
                          "cosine_min": lowest}
                if not lowest >= limits["cosine_min"]:
                    raise ExportCheckError(f"fp32 cosine {lowest} below {limits['cosine_min']}")
            else:
                role_modules = {role: modules[(role, name)] for role in ROLES}
                cosine = _check_precision(name, paths, role_modules, references, inputs,
                                          limits["cosine_min"])
            step(f"{name} checked")
            entries[name] = {"files": {role: paths[role].name for role in ROLES},
                             "opset": graph_opset,
                             "compute_dtype": str(_TORCH_DTYPES[name]).replace("torch.", ""),
                             "io_dtype": "float32", "cosine": cosine}
    return {name: entries[name] for name in precisions}, parity


def export_model(checkpoint, model_dir, *, precision="fp32", tensorrt=False, opset=DEFAULT_OPSET,
                 preset=None, progress=True, polar_transform=None, sample_images=None) -> dict:
    """Export a checkpoint's two encoders to ONNX in ``model_dir``, check them, write the manifest.

    Args:
        checkpoint: a cvig-engine checkpoint (.safetensors + .json, or .pth with its .json).
        model_dir: output directory (new, empty, or a previous export, which is replaced).
        precision: "fp32", "fp16", "bf16" or a list of them; fp32 is always exported.
        tensorrt: also build TensorRT engines (needs TensorRT and a CUDA GPU) in model_dir/engines.
        opset: ONNX opset of the fp32 / fp16 graphs (18; see the module doc).
        preset: export preset name in export/presets.json, a JSON path, or a dict.
        progress: show a progress bar on stderr.
        polar_transform: "preprocess" or "graph" (default: the preset's).
        sample_images: optional ``{"ground": [paths], "aerial": [paths]}`` of real RGB images
            that the parity checks also run on.

    Returns:
        The manifest (also written to model_dir/manifest.json).
    """
    from tqdm import tqdm

    from cvig_engine.model import load_checkpoint

    checkpoint, model_dir = Path(checkpoint), Path(model_dir)
    preset = load_preset(preset)
    precisions = _normalise_precisions(precision)
    polar = polar_transform or preset["polar_transform"]
    if polar not in POLAR_CHOICES:
        raise CvigInputError(f"polar_transform must be one of {POLAR_CHOICES}, got {polar!r}")
    aerial_kind = "tile" if polar == "graph" else "polar"
    if aerial_kind == "tile" and (opset >= 20 or "bf16" in precisions):
        raise CvigInputError(
            "the polar transform in the graph needs GridSample at opset < 20 (from opset 20 its "
            "mode is renamed and TensorRT silently samples nearest), and bf16 needs opset 22: "
            "use opset 18 and fp32 / fp16, or keep the polar transform in preprocessing")
    if tensorrt:
        import_tensorrt()
        require_cuda()
    model = load_checkpoint(checkpoint)  # CvigInputError for anything that is not a checkpoint
    config = model.config
    if model_dir.resolve() in checkpoint.resolve().parents:
        raise CvigInputError(f"{checkpoint} is inside {model_dir}, which the export replaces; "
                             "export to another directory")
    export_calls = len({name == "bf16" for name in precisions})
    steps = 3 + export_calls + len(precisions) + (2 * len(precisions) if tensorrt else 0)
    bar = tqdm(total=steps, desc="export", disable=None if progress else True, file=sys.stderr)

    def step(description):
        bar.set_postfix_str(description)
        bar.update(1)

    try:
        _prepare_model_dir(model_dir)
        _copy_checkpoint(checkpoint, model, model_dir)
        step("checkpoint copied")
        inputs = _parity_inputs(config, preset, aerial_kind, sample_images)
        references = {role: {name: torch_reference_features(model, role, batch, aerial_kind)
                             for name, batch in inputs[role].items()} for role in ROLES}
        step("PyTorch reference features")
        precision_entries, parity = _export_precisions(model, model_dir, precisions, opset, polar,
                                                       inputs, references, preset, step)
        names = ["model.safetensors", "model.json"] + [
            entry["files"][role] for entry in precision_entries.values() for role in ROLES]
        files = {name: _file_entry(model_dir / name) for name in sorted(names)}
        if sample_images:
            parity["sample_images"] = {
                role: [{"path": str(path), "sha256": file_sha256(path)} for path in paths]
                for role, paths in sample_images.items() if paths}
        manifest = {
            "format": MANIFEST_FORMAT,
            "format_version": MANIFEST_VERSION,
            "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "model_sha256": files["model.safetensors"]["sha256"],
            "checkpoint": {"source": str(checkpoint), "sha256": file_sha256(checkpoint)},
            "config": config,
            "preprocess": _preprocess_description(config, aerial_kind),
            "aerial_input_kind": aerial_kind,
            "onnx": {
                "exporter": f"torch.onnx.export(dynamo=True), torch {torch.__version__}",
                "opset": opset,
                "input_name": INPUT_NAME,
                "output_name": OUTPUT_NAME,
                "batch_dimension": BATCH_DIM,
                "inputs": {role: [BATCH_DIM] + input_shape(config, role, aerial_kind)
                           for role in ROLES},
                "outputs": {role: [BATCH_DIM] + feature_shape(config, role) for role in ROLES},
            },
            "precisions": precision_entries,
            "parity": parity,
            "preset": preset,
            "files": files,
            "versions": library_versions(tensorrt=tensorrt),
        }
        atomic_write_json(model_dir / MANIFEST_NAME, manifest)
        step("manifest written")
        if tensorrt:
            manifest["tensorrt"] = _build_tensorrt_engines(model_dir, manifest, inputs, references,
                                                           preset, progress, step)
            atomic_write_json(model_dir / MANIFEST_NAME, manifest)
    finally:
        bar.close()
    LOGGER.info("exported %s to %s (%s)", checkpoint, model_dir, ", ".join(precisions))
    return manifest


# -------------------------------------------------------------------------------------------------
# TensorRT: engine cache, builds, and execution on torch CUDA tensors


def import_tensorrt():
    """The tensorrt module, or CvigMissingDependency saying what to install."""
    try:
        import tensorrt
    except ImportError as error:
        raise CvigMissingDependency(f"TensorRT is not installed ({error}). Install it with: "
                                    f"{TENSORRT_INSTALL}") from None
    return tensorrt


def require_cuda(what: str = "TensorRT") -> None:
    """Raise CvigMissingDependency unless torch sees a CUDA GPU."""
    if not torch.cuda.is_available():
        raise CvigMissingDependency(f"{what} needs a CUDA GPU, and torch sees none "
                                    "(torch.cuda.is_available() is False)")


def tensorrt_major(version: str) -> int:
    """Major version number of a TensorRT version string ("10.13.0.35" -> 10)."""
    return int(str(version).split(".")[0])


def tensorrt_onnx_file(manifest: dict, role: str, precision: str, version: str) -> str:
    """The ONNX file a TensorRT engine is built from.

    TensorRT 10 builds every precision from the fp32 graph with precision flags (weak typing);
    TensorRT 11 networks are strongly typed, so fp16 / bf16 come from the converted graphs.
    """
    source = precision if tensorrt_major(version) >= 11 else "fp32"
    if source not in manifest["precisions"]:
        raise CvigInputError(f"TensorRT {version} builds {precision} engines from the {precision} "
                             "ONNX graphs, which this MODEL_DIR lacks; export again with "
                             f"--precision {precision}")
    return manifest["precisions"][source]["files"][role]


def engine_cache_key(onnx_sha256: str, precision: str, profile: dict, tensorrt_version: str,
                     compute_capability, tf32: bool = False) -> str:
    """Hex key of a TensorRT engine: everything that makes a serialized engine (in)valid."""
    fields = {"onnx_sha256": onnx_sha256, "precision": precision,
              "profile": [int(profile["min"]), int(profile["opt"]), int(profile["max"])],
              "tensorrt": str(tensorrt_version), "compute_capability": list(compute_capability),
              "tf32": bool(tf32)}
    return hashlib.sha256(json.dumps(fields, sort_keys=True).encode()).hexdigest()


class EngineCache:
    """Serialized TensorRT engines in MODEL_DIR/engines, named by role, precision and key.

    A cached file that does not deserialize (truncated, other TensorRT, other GPU) is a miss:
    the engine is rebuilt and the file replaced.
    """

    def __init__(self, directory):
        self.directory = Path(directory)

    def path_for(self, role: str, precision: str, key: str) -> Path:
        """Where the engine with this key lives."""
        return self.directory / f"{role}-{precision}-{key[:20]}.engine"

    def load_or_build(self, role: str, precision: str, key: str, *, deserialize, build,
                      describe=None):
        """Return ``(engine, hit)``: the cached engine if it deserializes, else a fresh build.

        Args:
            deserialize: bytes -> engine (None or an exception means unusable).
            build: () -> serialized engine bytes.
            describe: JSON-able dict written beside the engine (what the key was made of).
        """
        path = self.path_for(role, precision, key)
        if path.is_file():
            try:
                engine = deserialize(path.read_bytes())
            except Exception as error:  # TensorRT raises several types on foreign bytes
                LOGGER.warning("cached engine %s could not be deserialized (%s): rebuilding",
                               path, error)
                engine = None
            if engine is not None:
                return engine, True
            LOGGER.warning("cached engine %s is unusable: rebuilding", path)
        self.directory.mkdir(parents=True, exist_ok=True)
        data = bytes(build())
        temporary = path.with_name(path.name + ".tmp")
        temporary.write_bytes(data)
        temporary.replace(path)
        if describe is not None:
            atomic_write_json(path.with_suffix(".json"), describe)
        engine = deserialize(data)
        if engine is None:
            raise RuntimeError(f"{path}: TensorRT could not deserialize the engine it just built")
        return engine, False


def _progress_monitor(trt):
    """A trt.IProgressMonitor drawing one tqdm bar per build phase."""
    from tqdm import tqdm

    class _Monitor(trt.IProgressMonitor):
        def __init__(self):
            trt.IProgressMonitor.__init__(self)
            self.bars = {}

        def phase_start(self, phase_name, parent_phase, num_steps):
            self.bars[phase_name] = tqdm(total=num_steps, desc=f"TensorRT {phase_name}",
                                         leave=False, position=len(self.bars), disable=None,
                                         file=sys.stderr)

        def step_complete(self, phase_name, step):
            bar = self.bars.get(phase_name)
            if bar is not None:
                bar.update(step + 1 - bar.n)
            return True  # False would cancel the build

        def phase_finish(self, phase_name):
            bar = self.bars.pop(phase_name, None)
            if bar is not None:
                bar.close()

    return _Monitor()


def build_tensorrt_engine(onnx_path, *, precision: str, profile: dict, workspace_mib: int,
                          timing_cache_path=None, tf32: bool = False,
                          progress: bool = True) -> bytes:
    """Build a serialized TensorRT engine from an ONNX file (TensorRT 10 or 11 Python API).

    TensorRT 10: weakly typed network, precision from BuilderFlag.FP16 / BF16 on the fp32 graph.
    TensorRT 11: strongly typed network (the flag is accepted and ignored), types from the graph.
    TF32 is off unless asked for, so that fp32 engines stay within the fp32 parity tolerance.
    """
    trt = import_tensorrt()
    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    strongly_typed = tensorrt_major(trt.__version__) >= 11
    flags = 1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED) if strongly_typed else 0
    network = builder.create_network(flags)
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)):
        errors = "; ".join(str(parser.get_error(index)) for index in range(parser.num_errors))
        raise RuntimeError(f"{onnx_path}: TensorRT could not parse the ONNX graph: {errors}")
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(workspace_mib) << 20)
    if not strongly_typed and precision != "fp32":
        config.set_flag(trt.BuilderFlag.FP16 if precision == "fp16" else trt.BuilderFlag.BF16)
    if not tf32 and hasattr(trt.BuilderFlag, "TF32"):
        config.clear_flag(trt.BuilderFlag.TF32)
    optimisation_profile = builder.create_optimization_profile()
    for index in range(network.num_inputs):
        tensor = network.get_input(index)
        per_image = tuple(tensor.shape)[1:]
        optimisation_profile.set_shape(tensor.name, (profile["min"],) + per_image,
                                       (profile["opt"],) + per_image, (profile["max"],) + per_image)
    config.add_optimization_profile(optimisation_profile)
    timing_cache = None
    if timing_cache_path is not None:
        timing_cache_path = Path(timing_cache_path)
        data = timing_cache_path.read_bytes() if timing_cache_path.is_file() else b""
        timing_cache = config.create_timing_cache(data)
        config.set_timing_cache(timing_cache, ignore_mismatch=False)
    monitor = _progress_monitor(trt) if progress else None
    if monitor is not None:
        config.progress_monitor = monitor  # `monitor` stays referenced until the build returns
    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise RuntimeError(f"{onnx_path}: TensorRT engine build failed (see the TensorRT log)")
    if timing_cache is not None:
        timing_cache_path.parent.mkdir(parents=True, exist_ok=True)
        temporary = timing_cache_path.with_name(timing_cache_path.name + ".tmp")
        temporary.write_bytes(bytes(config.get_timing_cache().serialize()))
        temporary.replace(timing_cache_path)
    return bytes(serialized)


class TensorRTEngine:
    """One deserialized engine and its context, run with execute_async_v3 on torch tensors."""

    def __init__(self, engine, trt, runtime=None):
        self.runtime = runtime  # the runtime that deserialized the engine must outlive it
        self.engine = engine
        self.context = engine.create_execution_context()
        names = [engine.get_tensor_name(index) for index in range(engine.num_io_tensors)]
        modes = {name: engine.get_tensor_mode(name) for name in names}
        self.input_name = next(name for name in names if modes[name] == trt.TensorIOMode.INPUT)
        self.output_name = next(name for name in names if modes[name] == trt.TensorIOMode.OUTPUT)
        for name in (self.input_name, self.output_name):
            if engine.get_tensor_dtype(name) != trt.DataType.FLOAT:
                raise RuntimeError(f"engine tensor {name!r} is {engine.get_tensor_dtype(name)}, "
                                   "expected FLOAT")
        self.max_batch = engine.get_tensor_profile_shape(self.input_name, 0)[2][0]

    def run(self, batch: torch.Tensor) -> torch.Tensor:
        """Features of a float32 CUDA batch, as a float32 CUDA tensor (ordered on the stream)."""
        batch = batch.contiguous()
        if not self.context.set_input_shape(self.input_name, tuple(batch.shape)):
            raise CvigInputError(f"the TensorRT engine rejects input shape {tuple(batch.shape)} "
                                 "(outside its optimisation profile?)")
        output = torch.empty(tuple(self.context.get_tensor_shape(self.output_name)),
                             dtype=torch.float32, device=batch.device)
        self.context.set_tensor_address(self.input_name, batch.data_ptr())
        self.context.set_tensor_address(self.output_name, output.data_ptr())
        stream = torch.cuda.current_stream(batch.device)
        if not self.context.execute_async_v3(stream.cuda_stream):
            raise RuntimeError("TensorRT execute_async_v3 failed (see the TensorRT log)")
        return output


def open_tensorrt_engine(model_dir, manifest: dict, role: str, precision: str, preset=None,
                         progress: bool = True) -> tuple[TensorRTEngine, dict]:
    """The engine for (role, precision) from MODEL_DIR/engines, built on a miss.

    Returns the engine and a description (key, file, source ONNX, profile, cache hit).
    """
    trt = import_tensorrt()
    require_cuda()
    model_dir = Path(model_dir)
    settings = (preset or manifest.get("preset") or DEFAULT_PRESET)["tensorrt"]
    version = trt.__version__
    capability = torch.cuda.get_device_capability()
    onnx_name = tensorrt_onnx_file(manifest, role, precision, version)
    onnx_sha256 = manifest["files"][onnx_name]["sha256"]
    profile = settings["batch"]
    key = engine_cache_key(onnx_sha256, precision, profile, version, capability, settings["tf32"])
    cache = EngineCache(model_dir / ENGINE_DIR)
    timing = None
    if settings["timing_cache"]:
        name = f"timing-trt{version}-sm{capability[0]}{capability[1]}.cache"
        timing = model_dir / ENGINE_DIR / name
    runtime = trt.Runtime(trt.Logger(trt.Logger.WARNING))
    description = {"key": key, "role": role, "precision": precision, "onnx": onnx_name,
                   "onnx_sha256": onnx_sha256, "profile": profile, "tensorrt": version,
                   "compute_capability": list(capability), "tf32": settings["tf32"],
                   "strongly_typed": tensorrt_major(version) >= 11}

    def build():
        LOGGER.info("building a TensorRT %s engine for %s %s from %s", version, role, precision,
                    onnx_name)
        return build_tensorrt_engine(model_dir / onnx_name, precision=precision, profile=profile,
                                     workspace_mib=settings["workspace_mib"],
                                     timing_cache_path=timing, tf32=settings["tf32"],
                                     progress=progress)

    engine, hit = cache.load_or_build(role, precision, key, build=build, describe=description,
                                      deserialize=runtime.deserialize_cuda_engine)
    description.update(file=cache.path_for(role, precision, key).name, cache_hit=hit)
    return TensorRTEngine(engine, trt, runtime), description


def _build_tensorrt_engines(model_dir, manifest, inputs, references, preset, progress,
                            step) -> dict:
    """Build (or reuse) every engine of the export and check it like the ONNX graphs."""
    trt = import_tensorrt()
    limits = preset["parity"]
    section = {"version": trt.__version__,
               "compute_capability": list(torch.cuda.get_device_capability()), "engines": {}}
    for precision in manifest["precisions"]:
        for role in ROLES:
            engine, description = open_tensorrt_engine(model_dir, manifest, role, precision, preset,
                                                       progress)
            figures = {}
            for name, batch in inputs[role].items():
                chunks = torch.split(batch, engine.max_batch)
                outputs = np.concatenate([engine.run(chunk.cuda()).cpu().numpy()
                                          for chunk in chunks])
                figures[name], passed = compare_features(outputs, references[role][name],
                                                         precision, limits)
                if not passed:
                    raise ExportCheckError(f"TensorRT {precision} {role} engine disagrees with "
                                           f"PyTorch fp32 on {name} inputs: {figures[name]}")
            description["check"] = figures
            section["engines"][f"{role}-{precision}"] = description
            step(f"TensorRT {role} {precision}")
    return section
