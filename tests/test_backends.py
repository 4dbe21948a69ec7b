"""Inference backends: features against the model in float64, input checks, auto choice, strict
provider downgrades, the TensorRT engine cache, and GPU / TensorRT runs where those exist."""
import copy
import importlib.util
import json
import logging
import shutil

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from cvig_engine.backends import BackendDowngradeError, open_backend, verify_model_dir
from cvig_engine.cli import main
from cvig_engine.errors import CvigInputError, CvigMissingDependency
from cvig_engine.export import (EngineCache, engine_cache_key, export_model, read_manifest,
                                tensorrt_onnx_file)
from cvig_engine.model import build_model, save_checkpoint

TOLERANCE = 1e-4
COSINE_MIN = 0.999
_CUDA = torch.cuda.is_available()


def _ort_has_cuda():
    import onnxruntime

    return "CUDAExecutionProvider" in onnxruntime.get_available_providers()


def _unit_maps(features):
    flat = np.asarray(features, dtype=np.float64).reshape(len(features), -1)
    return flat / np.linalg.norm(flat, axis=1, keepdims=True)


def _max_abs(features, reference):
    return float(np.abs(_unit_maps(features) - _unit_maps(reference)).max())


def _min_cosine(features, reference):
    return float((_unit_maps(features) * _unit_maps(reference)).sum(axis=1).min())


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    torch.manual_seed(11)
    model = build_model(backbone="tiny").eval()
    root = tmp_path_factory.mktemp("backends")
    checkpoint = save_checkpoint(model, root / "tiny.safetensors")
    model_dir = root / "model_dir"
    export_model(checkpoint, model_dir, progress=False)
    return model_dir, model


@pytest.fixture(scope="module")
def inputs_and_references(exported):
    _, model = exported
    rng = np.random.default_rng(0)
    inputs = {"ground": rng.standard_normal((3, 3, 128, 512)).astype(np.float32),
              "aerial": rng.standard_normal((3, 3, 128, 512)).astype(np.float32)}
    references = {}
    for role, batch in inputs.items():
        encoder = model.ground_encoder if role == "ground" else model.aerial_encoder
        encoder = copy.deepcopy(encoder).double()
        with torch.no_grad():
            references[role] = encoder(torch.from_numpy(batch).double()).numpy()
    return inputs, references


def _encode(backend, role, batch):
    return backend.encode_ground(batch) if role == "ground" else backend.encode_aerial(batch)


@pytest.mark.parametrize("name", ["torch", "onnxruntime"])
def test_cpu_backends_give_the_models_features(exported, inputs_and_references, name):
    model_dir, _ = exported
    inputs, references = inputs_and_references
    with open_backend(model_dir, backend=name, device="cpu") as backend:
        assert backend.name == name and backend.device == "cpu" and backend.precision == "fp32"
        assert backend.aerial_input_kind == "polar"
        for role in ("ground", "aerial"):
            from_numpy = _encode(backend, role, inputs[role])
            from_torch = _encode(backend, role, torch.from_numpy(inputs[role]).double())
            assert from_numpy.dtype == np.float32 and from_numpy.shape == (3, 16, 4, 64)
            assert _max_abs(from_numpy, references[role]) <= TOLERANCE
            assert np.allclose(from_numpy, from_torch, atol=1e-6)
        assert _encode(backend, "ground", inputs["ground"][:0]).shape == (0, 16, 4, 64)
        description = backend.describe()
        assert description["backend"] == name and description["device"] == "cpu"
        assert description["model_sha256"] == read_manifest(model_dir)["model_sha256"]
        assert description["versions"]["torch"] == torch.__version__
        if name == "onnxruntime":
            import onnxruntime

            assert description["providers"] == ["CPUExecutionProvider"]
            assert description["versions"]["onnxruntime"] == onnxruntime.__version__


def test_batches_are_split_to_batch_size(exported, inputs_and_references):
    model_dir, _ = exported
    inputs, references = inputs_and_references
    with open_backend(model_dir, backend="onnxruntime", device="cpu", batch_size=2) as backend:
        features = backend.encode_aerial(inputs["aerial"])  # 3 images: a batch of 2, then 1
    assert features.shape == (3, 16, 4, 64)
    assert _max_abs(features, references["aerial"]) <= TOLERANCE


def test_wrong_inputs_are_refused_clearly(exported):
    model_dir, _ = exported
    with open_backend(model_dir, backend="onnxruntime", device="cpu") as backend:
        message = r"ground input: expected shape \[B, 3, 128, 512\], got \[2, 3, 128, 500\]"
        with pytest.raises(CvigInputError, match=message):
            backend.encode_ground(np.zeros((2, 3, 128, 500), np.float32))
        with pytest.raises(CvigInputError, match=r"aerial input \(polar images\): expected shape"):
            backend.encode_aerial(np.zeros((3, 128, 512), np.float32))
        with pytest.raises(CvigInputError, match="preprocessed float images.*uint8"):
            backend.encode_ground(np.zeros((1, 3, 128, 512), np.uint8))
        bad = np.zeros((1, 3, 128, 512), np.float32)
        bad[0, 0, 0, 0] = np.nan
        with pytest.raises(CvigInputError, match="NaN"):
            backend.encode_aerial(bad)


@pytest.mark.skipif(_CUDA, reason="this machine has a CUDA GPU, so auto would pick a GPU backend")
def test_auto_picks_onnxruntime_on_cpu_and_says_why(exported, caplog):
    model_dir, _ = exported
    with caplog.at_level(logging.INFO, logger="cvig_engine.backends"):
        backend = open_backend(model_dir)
    assert backend.name == "onnxruntime" and backend.device == "cpu"
    assert "onnxruntime beats torch on CPU" in backend.selection
    assert any("auto: onnxruntime on cpu" in record.getMessage() for record in caplog.records)
    assert backend.describe()["selection"] == backend.selection
    backend.close()


@pytest.mark.skipif(_ort_has_cuda(),
                    reason="onnxruntime here has the CUDA provider, so nothing downgrades")
def test_provider_downgrade_is_reported_and_strict_refuses_it(exported, caplog):
    model_dir, _ = exported
    with pytest.raises(BackendDowngradeError,
                       match="CUDAExecutionProvider not available") as raised:
        open_backend(model_dir, backend="onnxruntime", device="cuda", strict=True)
    assert isinstance(raised.value, CvigMissingDependency)
    assert "cvig-engine[ort-gpu]" in str(raised.value)
    with caplog.at_level(logging.WARNING):
        backend = open_backend(model_dir, backend="onnxruntime", device="cuda")
    # What really runs is recorded, and what was asked for.
    assert backend.providers == ["CPUExecutionProvider"] and backend.device == "cpu"
    assert backend.describe()["providers_requested"][0] == "CUDAExecutionProvider"
    assert any("CUDAExecutionProvider" in record.getMessage() for record in caplog.records)
    backend.close()
    result = CliRunner().invoke(main, ["export", "--verify", str(model_dir), "--backend",
                                       "onnxruntime", "--device", "cuda", "--strict"])
    assert result.exit_code == 2
    assert "CUDAExecutionProvider" in result.output and "Traceback" not in result.output


def test_verify_model_dir(exported):
    model_dir, _ = exported
    summary = verify_model_dir(model_dir, backend="torch", device="cpu")
    assert summary["backend"]["backend"] == "torch"
    assert summary["files_verified"] == ["aerial.onnx", "ground.onnx", "model.json",
                                         "model.safetensors"]
    for figures in summary["checks"].values():
        assert figures["max_abs"] <= TOLERANCE


def test_tampered_model_dir_is_refused(exported, tmp_path):
    model_dir = tmp_path / "copy"
    shutil.copytree(exported[0], model_dir)
    with open(model_dir / "model.safetensors", "r+b") as handle:
        handle.seek(-4, 2)
        handle.write(b"\x00\x01\x02\x03")
    for name in ("torch", "onnxruntime"):
        with pytest.raises(CvigInputError, match="model.safetensors.*does not match"):
            open_backend(model_dir, backend=name, device="cpu")


def test_precisions(exported, inputs_and_references):
    model_dir, _ = exported
    inputs, references = inputs_and_references
    with pytest.raises(CvigInputError, match="--precision fp16"):
        open_backend(model_dir, backend="onnxruntime", device="cpu", precision="fp16")
    with pytest.raises(CvigInputError, match="unknown precision"):
        open_backend(model_dir, backend="torch", precision="fp8")
    # torch autocasts on CPU too; the features move, but stay within the cosine bound.
    for precision in ("fp16", "bf16"):
        with open_backend(model_dir, backend="torch", device="cpu", precision=precision) as backend:
            features = backend.encode_ground(inputs["ground"][:1])
        assert _min_cosine(features, references["ground"][:1]) >= COSINE_MIN
        assert _max_abs(features, references["ground"][:1]) > 1e-6  # really ran in lower precision


@pytest.mark.skipif(importlib.util.find_spec("tensorrt") is not None,
                    reason="TensorRT is installed here")
def test_tensorrt_backend_without_tensorrt_says_what_to_install(exported):
    with pytest.raises(CvigMissingDependency, match=r"pip install 'cvig-engine\[tensorrt\]'"):
        open_backend(exported[0], backend="tensorrt")


def test_unknown_backend_and_options(exported):
    with pytest.raises(CvigInputError, match="unknown backend"):
        open_backend(exported[0], backend="tflite")
    with pytest.raises(CvigInputError, match="takes no option"):
        open_backend(exported[0], backend="torch", device="cpu", providers=["CPUExecutionProvider"])
    with pytest.raises(CvigInputError, match="not an exported model directory"):
        open_backend(exported[0].parent, backend="onnxruntime")


def test_engine_cache_key_changes_with_every_part():
    base = dict(onnx_sha256="a" * 64, precision="fp16", profile={"min": 1, "opt": 32, "max": 256},
                tensorrt_version="10.13.0", compute_capability=(9, 0))
    key = engine_cache_key(**base)
    assert key == engine_cache_key(**copy.deepcopy(base))
    changes = [("onnx_sha256", "b" * 64), ("precision", "bf16"),
               ("profile", {"min": 1, "opt": 64, "max": 256}), ("tensorrt_version", "11.0.0"),
               ("compute_capability", (8, 9))]
    keys = {key}
    for field, value in changes:
        keys.add(engine_cache_key(**{**base, field: value}))
    assert len(keys) == len(changes) + 1


def test_engine_cache_treats_undeserializable_engines_as_misses(tmp_path):
    cache = EngineCache(tmp_path / "engines")
    builds = []

    def build():
        builds.append(1)
        return b"ENGINE-%d" % len(builds)

    def deserialize(data):
        if not data.startswith(b"ENGINE"):
            return None  # what TensorRT returns for bytes it cannot use
        return data.decode()

    key = "k" * 64

    def load(deserializer=deserialize, describe=None):
        return cache.load_or_build("ground", "fp16", key, deserialize=deserializer, build=build,
                                   describe=describe)

    assert load(describe={"key": key}) == ("ENGINE-1", False) and len(builds) == 1
    path = cache.path_for("ground", "fp16", key)
    assert path.read_bytes() == b"ENGINE-1"
    assert json.loads(path.with_suffix(".json").read_text())["key"] == key
    assert load() == ("ENGINE-1", True) and len(builds) == 1
    path.write_bytes(b"truncated")  # e.g. a killed build or another TensorRT version
    assert load() == ("ENGINE-2", False)
    assert path.read_bytes() == b"ENGINE-2"

    path.write_bytes(b"foreign")

    def raising(data):
        if data == b"foreign":
            raise RuntimeError("engine plan file is incompatible with this version of TensorRT")
        return deserialize(data)

    assert load(raising) == ("ENGINE-3", False)


def test_tensorrt_builds_from_the_right_onnx(exported):
    manifest = read_manifest(exported[0])
    # TensorRT 10: precision flags on the fp32 graph; 11: strongly typed, needs the converted graph.
    assert tensorrt_onnx_file(manifest, "aerial", "fp16", "10.13.0.35") == "aerial.onnx"
    assert tensorrt_onnx_file(manifest, "aerial", "fp32", "11.1.0") == "aerial.onnx"
    with pytest.raises(CvigInputError, match="--precision fp16"):
        tensorrt_onnx_file(manifest, "aerial", "fp16", "11.1.0")


@pytest.mark.requires_cuda
@pytest.mark.parametrize("precision", ["fp32", "fp16", "bf16"])
def test_torch_cuda(exported, inputs_and_references, precision):
    model_dir, _ = exported
    inputs, references = inputs_and_references
    with open_backend(model_dir, backend="torch", device="cuda", precision=precision) as eager, \
            open_backend(model_dir, backend="torch", device="cuda", precision=precision,
                         batch_size=3) as graphed:
        assert graphed.cuda_graphs and not eager.cuda_graphs
        for role in ("ground", "aerial"):
            features = _encode(eager, role, inputs[role])
            if precision == "fp32":
                assert _max_abs(features, references[role]) <= TOLERANCE
            else:
                assert _min_cosine(features, references[role]) >= COSINE_MIN
            replayed = _encode(graphed, role, inputs[role])
            replayed_again = _encode(graphed, role, inputs[role][::-1].copy())[::-1]
            assert np.allclose(replayed, features, atol=1e-5)
            assert np.allclose(replayed_again, features, atol=1e-5)


@pytest.mark.requires_cuda
@pytest.mark.skipif(not _ort_has_cuda(),
                    reason="onnxruntime here has no CUDAExecutionProvider (onnxruntime-gpu)")
def test_onnxruntime_cuda(exported, inputs_and_references):
    model_dir, _ = exported
    inputs, references = inputs_and_references
    with open_backend(model_dir, backend="onnxruntime", device="cuda", strict=True) as backend:
        assert backend.providers[0] == "CUDAExecutionProvider"
        assert _max_abs(backend.encode_aerial(inputs["aerial"]), references["aerial"]) <= 1e-3


@pytest.mark.requires_tensorrt
def test_tensorrt_engines_build_run_and_cache(exported, inputs_and_references, tmp_path):
    model_dir = tmp_path / "copy"
    shutil.copytree(exported[0], model_dir)
    inputs, references = inputs_and_references
    with open_backend(model_dir, backend="tensorrt", progress=False) as backend:
        assert not backend.engine_descriptions["ground"]["cache_hit"]
        for role in ("ground", "aerial"):
            assert _max_abs(_encode(backend, role, inputs[role]), references[role]) <= TOLERANCE
    assert len(list((model_dir / "engines").glob("*.engine"))) == 2  # ground and aerial
    with open_backend(model_dir, backend="tensorrt", progress=False) as backend:
        assert backend.engine_descriptions["ground"]["cache_hit"]
        assert _max_abs(backend.encode_ground(inputs["ground"]), references["ground"]) <= TOLERANCE
