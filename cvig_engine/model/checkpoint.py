"""Checkpoints: safetensors weights plus a JSON config. Nothing is ever unpickled unsafely.

``save_checkpoint(model, "run/best.safetensors")`` writes ``run/best.safetensors`` (the weights,
with the config also embedded in the safetensors metadata so a lone file still loads) and
``run/best.json`` (the config and any extra metadata, for people and tools to read).
"""
from __future__ import annotations

import json
import pickle
from pathlib import Path

import torch

from cvig_engine.errors import CvigInputError

CHECKPOINT_FORMAT = "cvig-checkpoint"
CHECKPOINT_VERSION = 1
_METADATA_KEY = "cvig_config"


def sidecar_path(path) -> Path:
    """The JSON file that goes with a checkpoint's weights."""
    return Path(path).with_suffix(".json")


def save_checkpoint(model, path, metadata: dict | None = None) -> Path:
    """Save ``model`` (a TwinModel) as safetensors + JSON; returns the weights path."""
    from safetensors.torch import save_file

    path = Path(path)
    if path.suffix != ".safetensors":
        raise CvigInputError(f"{path}: checkpoints are saved as .safetensors")
    path.parent.mkdir(parents=True, exist_ok=True)
    state = {name: tensor.detach().cpu().contiguous()
             for name, tensor in model.state_dict().items()}
    document = {"format": CHECKPOINT_FORMAT, "format_version": CHECKPOINT_VERSION,
                "config": model.config, "metadata": metadata or {}}
    temporary = path.with_suffix(".safetensors.tmp")
    save_file(state, str(temporary), metadata={_METADATA_KEY: json.dumps(document)})
    temporary.replace(path)  # atomic: a killed save never leaves a half-written checkpoint
    sidecar = sidecar_path(path)
    sidecar.with_suffix(".json.tmp").write_text(json.dumps(document, indent=2) + "\n")
    sidecar.with_suffix(".json.tmp").replace(sidecar)
    return path


def read_checkpoint_document(path) -> dict:
    """The checkpoint's JSON document (format, config, metadata), from the sidecar or the
    weights."""
    path = Path(path)
    sidecar = sidecar_path(path)
    if sidecar.exists() and sidecar != path:
        try:
            document = json.loads(sidecar.read_text())
        except json.JSONDecodeError as error:
            raise CvigInputError(f"{sidecar}: not valid JSON ({error})") from None
    elif path.suffix == ".safetensors":
        document = json.loads(_safetensors_metadata(path).get(_METADATA_KEY, "null"))
    else:
        raise CvigInputError(f"{path}: no config found (expected {sidecar})")
    if (not isinstance(document, dict) or document.get("format") != CHECKPOINT_FORMAT
            or "config" not in document):
        raise CvigInputError(f"{path}: not a cvig-engine checkpoint "
                             f"(no '{CHECKPOINT_FORMAT}' config)")
    return document


def load_checkpoint(path, map_location="cpu"):
    """Load a checkpoint saved by ``save_checkpoint`` and return the TwinModel in eval mode.

    ``.pth`` / ``.pt`` weights are read only with ``torch.load(weights_only=True)`` and need the
    JSON config beside them; anything that would need full unpickling is refused.
    """
    from cvig_engine.model.encoders import build_model

    path = Path(path)
    if not path.is_file():
        raise CvigInputError(f"{path}: checkpoint not found")
    document = read_checkpoint_document(path)
    model = build_model(config=document["config"], vgg_weights=False)
    state = read_state_dict(path, map_location=map_location)
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise CvigInputError(f"{path}: weights do not fit the config "
                             f"(missing {missing[:3]}, unexpected {unexpected[:3]})")
    return model.eval()


def read_state_dict(path: Path, map_location="cpu") -> dict:
    """A flat name -> tensor dict from a .safetensors file, or a .pth read with
    weights_only=True."""
    path = Path(path)
    if not path.is_file():
        raise CvigInputError(f"{path}: weights file not found")
    if path.suffix == ".safetensors":
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            return load_file(str(path), device=str(map_location))
        except (SafetensorError, OSError, ValueError) as error:
            raise CvigInputError(f"{path}: not a readable safetensors file ({error})") from None
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, AttributeError, TypeError) as error:
        raise CvigInputError(
            f"{path}: refused: this file needs unpickling arbitrary objects, which could run code. "
            "Convert it to a plain state dict or safetensors in a trusted environment. "
            f"({error})") from None
    except (EOFError, OSError, ValueError) as error:
        raise CvigInputError(f"{path}: not a readable weights file ({error})") from None
    if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
        state = state["state_dict"]
    if not isinstance(state, dict) or not all(isinstance(value, torch.Tensor)
                                              for value in state.values()):
        raise CvigInputError(f"{path}: not a state dict of tensors")
    return state


def _safetensors_metadata(path: Path) -> dict:
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), framework="pt") as handle:
            return handle.metadata() or {}
    except (SafetensorError, OSError, ValueError) as error:
        raise CvigInputError(f"{path}: not a readable safetensors file ({error})") from None
