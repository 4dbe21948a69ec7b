"""`cvig-engine export`: ONNX files, symbolic batch, manifest, parity, precisions, polar paths and
bad input.

References: the model itself in float64 (what the graphs must compute), the polar transform by
its documented formula (tests/references.py), hashlib for the hashes, the ONNX reference
evaluator for the bfloat16 graphs (ONNX Runtime has no CPU kernel for them).
"""
import copy
import hashlib
import importlib.util
import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from click.testing import CliRunner
from PIL import Image, ImageDraw

from cvig_engine.cli import main
from cvig_engine.errors import CvigInputError
from cvig_engine.export import (DEFAULT_PRESET, PRESETS_PATH, export_model, load_preset,
                                read_manifest)
from cvig_engine.model import build_model, load_checkpoint, save_checkpoint
from references import polar_reference

TOLERANCE = 1e-4
COSINE_MIN = 0.999


def _sha256(path):
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def _unit_maps(features):
    features = np.asarray(features, dtype=np.float64)
    flat = features.reshape(len(features), -1)
    return (flat / np.linalg.norm(flat, axis=1, keepdims=True)).reshape(features.shape)


def _max_abs(features, reference):
    return float(np.abs(_unit_maps(features) - _unit_maps(reference)).max())


def _cosines(features, reference):
    first = _unit_maps(features).reshape(len(features), -1)
    second = _unit_maps(reference).reshape(len(reference), -1)
    return (first * second).sum(axis=1)


def _float64_features(model, role, batch):
    encoder = model.ground_encoder if role == "ground" else model.aerial_encoder
    encoder = copy.deepcopy(encoder).double().eval()
    with torch.no_grad():
        return encoder(torch.as_tensor(batch, dtype=torch.float64)).numpy()


def _ort(path, batch):
    import onnxruntime

    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return session.run(None, {"input": np.ascontiguousarray(batch, dtype=np.float32)})[0]


def _invoke(*arguments):
    result = CliRunner().invoke(main, [str(argument) for argument in arguments])
    return result


@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory):
    torch.manual_seed(3)
    # fov 70: ground width 99 is odd, so the pools' rounding is exercised too.
    model = build_model(backbone="tiny", fov=70.0)
    return save_checkpoint(model, tmp_path_factory.mktemp("checkpoint") / "tiny.safetensors")


@pytest.fixture(scope="module")
def tiny_export(tiny_checkpoint, tmp_path_factory):
    model_dir = tmp_path_factory.mktemp("export") / "model_dir"
    result = _invoke("export", tiny_checkpoint, "-o", model_dir, "--precision", "fp16",
                     "--precision", "bf16", "--quiet")
    assert result.exit_code == 0, result.output
    return model_dir, json.loads(result.stdout), load_checkpoint(tiny_checkpoint)


def test_model_dir_layout_and_hashes(tiny_export, tiny_checkpoint):
    model_dir, summary, model = tiny_export
    manifest = json.loads((model_dir / "manifest.json").read_text())
    expected = {"ground.onnx", "aerial.onnx", "ground.fp16.onnx", "aerial.fp16.onnx",
                "ground.bf16.onnx", "aerial.bf16.onnx", "model.safetensors", "model.json"}
    assert set(manifest["files"]) == expected
    assert {path.name for path in model_dir.iterdir()} == expected | {"manifest.json"}
    for name, entry in manifest["files"].items():
        assert entry["sha256"] == _sha256(model_dir / name), name
        assert entry["bytes"] == (model_dir / name).stat().st_size
    # The weights are the checkpoint's bytes, and load from MODEL_DIR like any checkpoint.
    assert _sha256(model_dir / "model.safetensors") == _sha256(tiny_checkpoint)
    assert manifest["model_sha256"] == summary["model_sha256"] == _sha256(tiny_checkpoint)
    reloaded = load_checkpoint(model_dir / "model.safetensors")
    for name, tensor in model.state_dict().items():
        assert torch.equal(tensor, reloaded.state_dict()[name]), name
    assert manifest["config"] == model.config
    assert read_manifest(model_dir)["model_sha256"] == manifest["model_sha256"]


def test_preprocess_and_versions_recorded(tiny_export):
    model_dir, _, model = tiny_export
    manifest = read_manifest(model_dir)
    preprocess = manifest["preprocess"]
    assert preprocess["mean"] == [0.485, 0.456, 0.406]
    assert preprocess["std"] == [0.229, 0.224, 0.225]
    assert preprocess["ground"]["input_shape"] == [3, 128, 99]
    assert preprocess["aerial"]["input"] == manifest["aerial_input_kind"] == "polar"
    assert preprocess["aerial"]["input_shape"] == [3, 128, 512]
    assert preprocess["aerial"]["tile_size"] == 256
    polar = preprocess["aerial"]["polar"]
    assert (polar["height"], polar["width"]) == (128, 512)
    import onnxruntime

    assert manifest["versions"]["torch"] == torch.__version__
    assert manifest["versions"]["onnxruntime"] == onnxruntime.__version__
    assert manifest["versions"]["onnx"] == onnx.__version__
    for name in ("fp32", "fp16"):
        for role in ("ground", "aerial"):
            graph = onnx.load(str(model_dir / manifest["precisions"][name]["files"][role]))
            assert [entry.version for entry in graph.opset_import if entry.domain == ""] == [18]
            assert manifest["precisions"][name]["opset"] == 18


def test_batch_axis_is_symbolic_and_one_file_runs_any_batch(tiny_export):
    model_dir, _, model = tiny_export
    rng = np.random.default_rng(0)
    names = ("ground.onnx", "aerial.onnx", "ground.fp16.onnx", "aerial.fp16.onnx",
             "ground.bf16.onnx")
    for name in names:
        graph = onnx.load(str(model_dir / name)).graph
        for value in list(graph.input) + list(graph.output):
            first = value.type.tensor_type.shape.dim[0]
            assert not first.HasField("dim_value") and first.dim_param, (name, value.name)
    shapes = {"ground": (3, 128, 99), "aerial": (3, 128, 512)}
    widths = {"ground": 12, "aerial": 64}  # 99 -> 49 -> 24 -> 12 (witw) ; 512 -> 64
    for role, shape in shapes.items():
        for batch_size in (1, 5):
            batch = rng.standard_normal((batch_size,) + shape).astype(np.float32)
            outputs = _ort(model_dir / f"{role}.onnx", batch)
            assert outputs.shape == (batch_size, 16, 4, widths[role])
            assert _max_abs(outputs, _float64_features(model, role, batch)) <= TOLERANCE


def test_parity_figures_in_manifest(tiny_export):
    model_dir, summary, _ = tiny_export
    manifest = read_manifest(model_dir)
    parity = manifest["parity"]
    assert parity["tolerance"] == TOLERANCE
    for role in ("ground", "aerial"):
        assert set(parity[role]) == {"random", "image_like"}
        assert parity[role]["random"]["batch"] == 2 and parity[role]["image_like"]["batch"] == 1
        for entry in parity[role].values():
            assert 0.0 <= entry["max_abs"] <= TOLERANCE
    assert summary["parity_max_abs"] <= TOLERANCE


def _initializer_types(path):
    graph = onnx.load(str(path)).graph
    floats = (onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16, onnx.TensorProto.BFLOAT16)
    return {onnx.helper.tensor_dtype_to_np_dtype(initializer.data_type).name
            for initializer in graph.initializer if initializer.data_type in floats}


def _io_types(path):
    graph = onnx.load(str(path)).graph
    return {value.type.tensor_type.elem_type for value in list(graph.input) + list(graph.output)}


def test_fp16_graphs_compute_in_fp16_and_stay_close(tiny_export):
    model_dir, _, model = tiny_export
    manifest = read_manifest(model_dir)
    rng = np.random.default_rng(1)
    for role, shape in (("ground", (3, 128, 99)), ("aerial", (3, 128, 512))):
        path = model_dir / f"{role}.fp16.onnx"
        # Really converted (else the cosine below would pass trivially), with float32 I/O.
        assert _initializer_types(path) == {"float16"}
        assert _io_types(path) == {onnx.TensorProto.FLOAT}
        batch = rng.standard_normal((3,) + shape).astype(np.float32)
        reference = _float64_features(model, role, batch)
        cosines = _cosines(_ort(path, batch), reference)
        assert cosines.min() >= COSINE_MIN
        assert _max_abs(_ort(path, batch), reference) > 1e-7  # not the fp32 graph renamed
    figures = manifest["precisions"]["fp16"]["cosine"]
    assert figures["checked_with"] == "ONNX Runtime CPUExecutionProvider"
    assert COSINE_MIN <= figures["cosine_min"] <= 1.0 + 1e-9


def test_bf16_graphs_with_the_onnx_reference_evaluator(tiny_export):
    from onnx.reference import ReferenceEvaluator

    model_dir, _, model = tiny_export
    manifest = read_manifest(model_dir)
    entry = manifest["precisions"]["bf16"]
    assert entry["opset"] == 22  # opset 18's Conv has no bfloat16
    path = model_dir / entry["files"]["ground"]
    assert _initializer_types(path) == {"bfloat16"}
    assert _io_types(path) == {onnx.TensorProto.FLOAT}
    onnx.checker.check_model(onnx.load(str(path)), full_check=True)
    batch = np.random.default_rng(2).standard_normal((2, 3, 128, 99)).astype(np.float32)
    outputs = ReferenceEvaluator(str(path)).run(None, {"input": batch})[0]
    assert _cosines(outputs, _float64_features(model, "ground", batch)).min() >= COSINE_MIN
    # The manifest tells which runtime produced the figure instead of inventing an ORT one.
    figures = entry["cosine"]
    if "onnxruntime_cpu" in figures:
        assert figures["onnxruntime_cpu"].startswith("not run")
        assert figures["checked_with"].startswith("PyTorch")
    assert COSINE_MIN <= figures["cosine_min"] <= 1.0 + 1e-9


def test_tampered_file_is_named(tiny_export, tmp_path):
    model_dir = tmp_path / "copy"
    shutil.copytree(tiny_export[0], model_dir)
    data = bytearray((model_dir / "aerial.onnx").read_bytes())
    data[len(data) // 2] ^= 0xFF
    (model_dir / "aerial.onnx").write_bytes(bytes(data))
    with pytest.raises(CvigInputError, match="aerial.onnx"):
        read_manifest(model_dir)
    read_manifest(model_dir, verify=False)  # reading without checking still works
    result = _invoke("export", "--verify", model_dir, "--backend", "onnxruntime")
    assert result.exit_code == 2
    assert "aerial.onnx" in result.output and "sha256" in result.output
    assert "Traceback" not in result.output
    (model_dir / "model.json").unlink()
    shutil.copyfile(tiny_export[0] / "aerial.onnx", model_dir / "aerial.onnx")
    with pytest.raises(CvigInputError, match="model.json.*missing"):
        read_manifest(model_dir)


def test_bad_checkpoints_exit_2_without_traceback(tmp_path):
    garbage = tmp_path / "weights.safetensors"
    garbage.write_bytes(b"this is not a safetensors file")
    notes = tmp_path / "notes.txt"
    notes.write_text("hello")
    for checkpoint in (garbage, notes, tmp_path / "missing.safetensors"):
        model_dir = tmp_path / f"out-{checkpoint.stem}"
        result = _invoke("export", checkpoint, "-o", model_dir, "--quiet")
        assert result.exit_code == 2, result.output
        assert result.output.startswith("error: ") and checkpoint.name in result.output
        assert "Traceback" not in result.output
        assert not model_dir.exists()  # nothing half-made


def test_refuses_a_non_empty_directory_that_is_not_an_export(tiny_checkpoint, tmp_path):
    (tmp_path / "important.txt").write_text("keep me")
    result = _invoke("export", tiny_checkpoint, "-o", tmp_path, "--quiet")
    assert result.exit_code == 2 and "not empty" in result.output
    assert (tmp_path / "important.txt").read_text() == "keep me"
    shutil.copyfile(tiny_checkpoint, tmp_path / "inside.safetensors")
    shutil.copyfile(tiny_checkpoint.with_suffix(".json"), tmp_path / "inside.json")
    result = _invoke("export", tmp_path / "inside.safetensors", "-o", tmp_path, "--quiet")
    assert result.exit_code == 2 and "inside" in result.output


def test_bad_input_from_a_real_subprocess(tmp_path):
    garbage = tmp_path / "broken.safetensors"
    garbage.write_bytes(b"\x00" * 16)
    command = [sys.executable, "-m", "cvig_engine.cli", "export", str(garbage), "-o",
               str(tmp_path / "out")]
    completed = subprocess.run(command, capture_output=True, text=True, timeout=120)
    assert completed.returncode == 2
    assert "broken.safetensors" in completed.stderr and "Traceback" not in completed.stderr


@pytest.mark.skipif(importlib.util.find_spec("tensorrt") is not None,
                    reason="TensorRT is installed here")
def test_tensorrt_flag_without_tensorrt_says_what_to_install(tiny_checkpoint, tmp_path):
    result = _invoke("export", tiny_checkpoint, "-o", tmp_path / "out", "--tensorrt", "--quiet")
    assert result.exit_code == 2
    assert "pip install 'cvig-engine[tensorrt]'" in result.output
    assert not (tmp_path / "out").exists()  # checked before any work


def test_presets_file_and_validation(tmp_path):
    named = json.loads(PRESETS_PATH.read_text())
    assert named["default"] == DEFAULT_PRESET  # the built-in fallback matches the file users edit
    small = load_preset("small-gpu")
    assert small["tensorrt"]["batch"] == {"min": 1, "opt": 16, "max": 64}
    assert small["parity"] == DEFAULT_PRESET["parity"]  # merged over default
    assert load_preset({"polar_transform": "graph"})["polar_transform"] == "graph"
    with pytest.raises(CvigInputError, match="unknown key 'batchsize'"):
        load_preset({"tensorrt": {"batchsize": 3}})
    with pytest.raises(CvigInputError, match="min <= opt <= max"):
        load_preset({"tensorrt": {"batch": {"min": 8, "opt": 4, "max": 16}}})
    custom = tmp_path / "mine.json"
    custom.write_text(json.dumps({"tensorrt": {"workspace_mib": 512}}))
    assert load_preset(str(custom))["tensorrt"]["workspace_mib"] == 512
    with pytest.raises(CvigInputError, match="unknown export preset"):
        load_preset("no-such-preset")


def _scene(path, width, height, seed):
    """A small synthetic photo-like PNG: sky/ground gradient, buildings, a road."""
    rng = np.random.default_rng(seed)
    rows = np.linspace(0, 1, height)[:, None, None]
    array = (255 * np.concatenate([0.4 + 0.5 * rows, 0.5 + 0.3 * rows, 0.9 - 0.6 * rows], axis=2)
             * np.ones((1, width, 1))).astype(np.uint8)
    image = Image.fromarray(array)
    draw = ImageDraw.Draw(image)
    for _ in range(6):
        left, top = rng.integers(0, width - 10), rng.integers(0, height - 10)
        right, bottom = left + rng.integers(5, width // 3), top + rng.integers(5, height // 2)
        draw.rectangle([left, top, right, bottom],
                       fill=tuple(int(value) for value in rng.integers(0, 255, 3)))
    draw.line([0, height - 5, width, height // 2], fill=(60, 60, 60), width=4)
    image.save(path)
    return path


def test_polar_in_graph_and_in_preprocessing_give_the_models_features(tiny_export, tiny_checkpoint,
                                                                      tmp_path):
    """Both paths against the model in float64 on the polar transform's documented formula."""
    preprocess_dir, _, model = tiny_export
    graph_dir = tmp_path / "polar_in_graph"
    shutil.copytree(preprocess_dir, graph_dir)  # so this is also a re-export over a previous one
    samples = {"ground": [_scene(tmp_path / "photo.png", 200, 90, 0)],
               "aerial": [_scene(tmp_path / "tile.png", 300, 300, 1),
                          _scene(tmp_path / "tile2.jpg", 180, 180, 2)]}
    manifest = export_model(tiny_checkpoint, graph_dir, polar_transform="graph", progress=False,
                            sample_images=samples)
    assert manifest["aerial_input_kind"] == "tile"
    # The previous export's fp16 / bf16 graphs are gone with it; nothing stale is listed or left.
    left = {path.name for path in graph_dir.iterdir()}
    assert left == set(manifest["files"]) | {"manifest.json"}
    assert left == {"ground.onnx", "aerial.onnx", "model.safetensors", "model.json",
                    "manifest.json"}
    assert manifest["onnx"]["inputs"]["aerial"] == ["batch", 3, 256, 256]
    graph = onnx.load(str(graph_dir / "aerial.onnx")).graph
    grid_samples = [node for node in graph.node if node.op_type == "GridSample"]
    assert len(grid_samples) == 1
    attributes = {attribute.name: onnx.helper.get_attribute_value(attribute)
                  for attribute in grid_samples[0].attribute}
    assert attributes == {"mode": b"bilinear", "padding_mode": b"zeros", "align_corners": 1}
    plain = onnx.load(str(preprocess_dir / "aerial.onnx")).graph
    assert {node.op_type for node in plain.node} == {"Conv", "Relu", "MaxPool", "Slice", "Concat"}
    # Real images went through the parity check too, and are named in the manifest.
    assert manifest["parity"]["aerial"]["images"]["batch"] == 2
    assert manifest["parity"]["ground"]["images"]["max_abs"] <= TOLERANCE
    assert [entry["sha256"] for entry in manifest["parity"]["sample_images"]["aerial"]] == \
        [_sha256(path) for path in samples["aerial"]]

    tiles = np.random.default_rng(4).standard_normal((2, 3, 256, 256)).astype(np.float32)
    polar = np.stack([polar_reference(tile, 128, 512) for tile in tiles])
    reference = _float64_features(model, "aerial", polar)
    from_graph = _ort(graph_dir / "aerial.onnx", tiles)
    from_preprocessing = _ort(preprocess_dir / "aerial.onnx", polar.astype(np.float32))
    assert _max_abs(from_graph, reference) <= TOLERANCE
    assert _max_abs(from_preprocessing, reference) <= TOLERANCE

    from cvig_engine.backends import open_backend

    for backend in ("torch", "onnxruntime"):
        with open_backend(graph_dir, backend=backend, device="cpu") as opened:
            assert opened.aerial_input_kind == "tile"
            assert _max_abs(opened.encode_aerial(tiles), reference) <= TOLERANCE
            with pytest.raises(CvigInputError, match=r"tiles.*\[B, 3, 256, 256\]"):
                opened.encode_aerial(polar.astype(np.float32))


def test_polar_in_graph_refuses_opsets_where_gridsample_changed(tiny_checkpoint, tmp_path):
    with pytest.raises(CvigInputError, match="opset"):
        export_model(tiny_checkpoint, tmp_path / "x", polar_transform="graph", opset=20,
                     progress=False)
    with pytest.raises(CvigInputError, match="bf16"):
        export_model(tiny_checkpoint, tmp_path / "y", polar_transform="graph", precision="bf16",
                     progress=False)


def test_strided_tiny_model_round_trip_at_an_odd_ground_width(tmp_path):
    torch.manual_seed(8)
    # 70 deg, half size: ground width 49 rounds down twice (49 -> 24 -> 12) under WITW's rule.
    model = build_model(backbone="tiny", fov=70.0, image_scale=0.5, downsample="stride")
    model_dir = tmp_path / "strided"
    manifest = export_model(save_checkpoint(model, tmp_path / "strided.safetensors"), model_dir,
                            progress=False)
    assert manifest["config"]["downsample"] == "stride"
    rng = np.random.default_rng(9)
    for role, shape, width in (("ground", (3, 64, 49), 12), ("aerial", (3, 64, 256), 64)):
        graph = onnx.load(str(model_dir / f"{role}.onnx")).graph
        assert not any(node.op_type == "MaxPool" for node in graph.node)
        batch = rng.standard_normal((3,) + shape).astype(np.float32)
        outputs = _ort(model_dir / f"{role}.onnx", batch)
        assert outputs.shape == (3, 16, 4, width)
        assert _max_abs(outputs, _float64_features(model, role, batch)) <= TOLERANCE


@pytest.mark.slow
def test_vgg16_round_trip(tmp_path):
    torch.manual_seed(5)
    model = build_model(backbone="vgg16", fov=70.0, vgg_weights=False)
    checkpoint = save_checkpoint(model, tmp_path / "vgg16.safetensors")
    model_dir = tmp_path / "vgg16_dir"
    manifest = export_model(checkpoint, model_dir, progress=False)
    for name, entry in manifest["files"].items():
        assert entry["sha256"] == _sha256(model_dir / name)
    for role in ("ground", "aerial"):
        for entry in manifest["parity"][role].values():
            assert entry["max_abs"] <= TOLERANCE
        graph = onnx.load(str(model_dir / f"{role}.onnx")).graph
        assert sum(node.op_type == "Conv" for node in graph.node) == 13  # 10 VGG16 + 3 head
        assert graph.input[0].type.tensor_type.shape.dim[0].dim_param == "batch"
    # An independent look at the ground graph (5x cheaper than the aerial one at 70 deg).
    batch = np.random.default_rng(6).standard_normal((2, 3, 128, 99)).astype(np.float32)
    with torch.no_grad():
        reference = model.eval().ground_encoder(torch.from_numpy(batch)).numpy()
    assert _max_abs(_ort(model_dir / "ground.onnx", batch), reference) <= TOLERANCE
