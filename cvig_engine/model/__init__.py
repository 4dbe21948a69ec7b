"""The WITW / DSM twin model: encoders, orientation-searched distance, loss and checkpoints."""
from cvig_engine.model.checkpoint import load_checkpoint, save_checkpoint
from cvig_engine.model.distance import (distance_at_shift, normalize_ground, orientation_distance,
                                        window_energy)
from cvig_engine.model.encoders import TwinModel, build_model, ground_feature_width, model_config
from cvig_engine.model.loss import triplet_loss

__all__ = ["TwinModel", "build_model", "model_config", "ground_feature_width",
           "orientation_distance", "distance_at_shift", "normalize_ground", "window_energy",
           "triplet_loss", "save_checkpoint", "load_checkpoint"]
