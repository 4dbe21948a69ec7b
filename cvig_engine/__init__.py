"""cvig-engine: a batch scoring engine for cross-view image geolocalization (DSM / WITW).

The public API is imported lazily so that the command line starts fast:

    from cvig_engine import build_model, polar_transform, orientation_distance, triplet_loss
    from cvig_engine import save_checkpoint, load_checkpoint
"""
import importlib

__version__ = "0.1.0"

_LAZY = {
    "build_model": "cvig_engine.model",
    "orientation_distance": "cvig_engine.model",
    "triplet_loss": "cvig_engine.model",
    "save_checkpoint": "cvig_engine.model",
    "load_checkpoint": "cvig_engine.model",
    "polar_transform": "cvig_engine.polar",
}

__all__ = sorted(_LAZY)


def __getattr__(name):
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'cvig_engine' has no attribute {name!r}")
