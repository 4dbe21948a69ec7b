"""The WITW / DSM twin encoders: VGG16 (or a tiny CNN) plus a three-convolution head.

Geometry (VGG16, defaults): ground input 3 x 128 x int(fov/360*512), aerial polar input
3 x 128 x 512; three 2x2 max-pools divide the width by 8 and two stride-(2, 1) head
convolutions divide the height by 32 in all, so the aerial map is 16 x 4 x 64 and the ground map
16 x 4 x Wg. The ground-width rule decides how the pools round odd widths: ``"witw"`` floors
(PyTorch's default; 70 deg gives 99 -> 49 -> 24 -> 12) and ``"dsm"`` rounds up like TensorFlow's
SAME padding (99 -> 50 -> 25 -> 13). At 360 deg both give 64.
"""
from __future__ import annotations

import logging
import math
import os
import warnings
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from cvig_engine.errors import CvigInputError

LOGGER = logging.getLogger(__name__)

IMAGENET_MEAN = [0.485, 0.456, 0.406]
IMAGENET_STD = [0.229, 0.224, 0.225]
VGG_WEIGHTS_ENV = "CVIG_VGG16_WEIGHTS"

# torchvision vgg16.features[:23]: conv1_1 .. conv4_3 (with ReLUs) and three max-pools.
_VGG16_LAYOUT = [64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512]
_VGG16_CONV_INDICES = [0, 2, 5, 7, 10, 12, 14, 17, 19, 21]
# The tiny backbone keeps VGG's pool positions (so the same widths come out) with few channels.
_TINY_DEFAULT_CHANNELS = (8, 16, 32, 64)


class PaddedConv2d(nn.Conv2d):
    """3x3 convolution with explicit padding: circular in width (aerial) or zeros (ground).

    The padding is done with ``torch.cat`` slices rather than ``padding_mode="circular"`` so that
    the circular width and zero height padding differ and the ONNX graph stays plain. A strided
    convolution rounds odd sizes up, like a ceil-mode pool; ``floor_size`` rounds them down like
    PyTorch's default pool (dropping the last output row or column of an odd size).
    """

    def __init__(self, in_channels, out_channels, stride=(1, 1), circular_width=False,
                 floor_size=False):
        super().__init__(in_channels, out_channels, kernel_size=3, stride=stride, padding=0)
        self.circular_width = circular_width
        self.floor_size = floor_size

    def forward(self, x):
        height, width = x.shape[-2:]
        if self.circular_width:
            x = torch.cat([x[..., -1:], x, x[..., :1]], dim=-1)
            x = F.pad(x, (0, 0, 1, 1))
        else:
            x = F.pad(x, (1, 1, 1, 1))
        x = F.conv2d(x, self.weight, self.bias, self.stride)
        if self.floor_size:
            x = x[..., : height // self.stride[0], : width // self.stride[1]]
        return x


class Encoder(nn.Module):
    """One view's encoder: backbone convolutions and pools, then the 3-convolution head.

    Args:
        layout: channel counts and "M" (max-pool) markers of the backbone; ``("S", channels)``
            is a stride-2 convolution that halves the size in place of a pool.
        in_channels: input bands (3 = RGB, 5 = RGB + building + road).
        circular_width: pad circularly in width (the aerial polar encoder).
        ceil_pools: round pooled widths up (DSM) instead of down (WITW).
        dropout_last: the last this many backbone convolutions get Dropout2d(0.2) after their ReLU.
        head_strides: strides of the first two head convolutions.
        feature_channels: channels of the output map (16).
        global_descriptor: pool the map to one descriptor [B, D, 1, 1] (the no-orientation
            baseline).
    """

    def __init__(self, layout, in_channels=3, circular_width=False, ceil_pools=False,
                 dropout_last=3, head_strides=((2, 1), (2, 1)), feature_channels=16,
                 global_descriptor=False, batch_norm=False):
        super().__init__()
        layers = []
        conv_positions = []  # index of each convolution's ReLU in `layers`
        channels = in_channels
        for item in layout:
            if item == "M":
                layers.append(nn.MaxPool2d(2, 2, ceil_mode=ceil_pools))
                continue
            if isinstance(item, (tuple, list)):
                _, item = item
                layers.append(PaddedConv2d(channels, item, stride=(2, 2),
                                           circular_width=circular_width,
                                           floor_size=not ceil_pools))
            else:
                layers.append(PaddedConv2d(channels, item, circular_width=circular_width))
            if batch_norm:
                layers.append(nn.BatchNorm2d(item))
            conv_positions.append(len(layers))
            layers.append(nn.ReLU(inplace=True))
            channels = item
        self.features = nn.Sequential(*layers)
        # Dropout after the ReLU of each of the last `dropout_last` backbone convolutions.
        self._dropout_after = set(conv_positions[len(conv_positions) - dropout_last:])
        self.dropout = nn.Dropout2d(0.2)
        head_channels = [channels, max(channels // 2, feature_channels),
                         max(channels // 8, feature_channels)]
        self.head = nn.ModuleList([
            PaddedConv2d(head_channels[0], head_channels[1], stride=head_strides[0],
                         circular_width=circular_width),
            PaddedConv2d(head_channels[1], head_channels[2], stride=head_strides[1],
                         circular_width=circular_width),
            PaddedConv2d(head_channels[2], feature_channels, circular_width=circular_width),
        ])
        self.global_descriptor = global_descriptor

    def backbone_convolutions(self):
        return [layer for layer in self.features if isinstance(layer, nn.Conv2d)]

    def convolutions(self):
        """All convolutions in forward order (backbone, then head)."""
        return self.backbone_convolutions() + list(self.head)

    def forward(self, x):
        for index, layer in enumerate(self.features):
            x = layer(x)
            if index in self._dropout_after:
                x = self.dropout(x)
        x = F.relu(self.head[0](x))
        x = F.relu(self.head[1](x))
        x = self.head[2](x)
        if self.global_descriptor:
            # Liu & Li style: one descriptor per image, kept 4-D so W = 1 scoring is plain cosine.
            x = F.adaptive_avg_pool2d(x, (x.shape[2], 8)).flatten(1)[:, :, None, None]
        return x


class TwinModel(nn.Module):
    """Ground and aerial encoders with the same architecture and separate weights."""

    def __init__(self, config: dict):
        super().__init__()
        self.config = dict(config)
        layout = _backbone_layout(config)
        common = dict(
            layout=layout,
            in_channels=config["in_channels"],
            ceil_pools=config["ground_width_rule"] == "dsm",
            dropout_last=3 if config["backbone"] == "vgg16" else 1,
            feature_channels=config["feature_channels"],
            global_descriptor=not config["orientation_search"],
            batch_norm=config.get("batch_norm", False),
        )
        self.ground_encoder = Encoder(circular_width=False, **common)
        # Vertical search: the aerial map keeps twice the height so the ground map can slide
        # up/down.
        aerial_strides = ((2, 1), (1, 1)) if config["vertical_search"] else ((2, 1), (2, 1))
        self.aerial_encoder = Encoder(circular_width=True, head_strides=aerial_strides, **common)
        self.set_trainable(config["trainable_convolutions"])

    def set_trainable(self, count):
        """Freeze all but the last ``count`` convolutions of each encoder (None: train all)."""
        for encoder in (self.ground_encoder, self.aerial_encoder):
            convolutions = encoder.convolutions()
            first_trainable = 0 if count is None else max(len(convolutions) - count, 0)
            for index, convolution in enumerate(convolutions):
                for parameter in convolution.parameters():
                    parameter.requires_grad_(index >= first_trainable)

    def forward(self, ground, aerial_polar):
        return self.ground_encoder(ground), self.aerial_encoder(aerial_polar)


def _backbone_layout(config):
    if config["backbone"] == "vgg16":
        return _VGG16_LAYOUT
    c1, c2, c3, c4 = config.get("tiny_channels", _TINY_DEFAULT_CHANNELS)
    pools = config.get("pools", 3)  # half-size inputs: one pool fewer keeps the 16x4x64 output
    if config.get("downsample", "pool") == "stride":
        # Each convolution before a pool halves the size itself instead: the same output sizes
        # for a third less time per training step (no full-size activations to normalise and
        # pool).
        if pools == 2:
            return [("S", c1), ("S", c2), c3, c4]
        return [("S", c1), ("S", c2), ("S", c3), c4]
    if pools == 2:
        return [c1, "M", c2, "M", c3, c4]
    return [c1, "M", c2, "M", c3, "M", c4]


def ground_feature_width(ground_width: int, rule: str, pools: int = 3) -> int:
    """Width of the ground feature map after the 2x2 pools under the given rounding rule."""
    width = ground_width
    for _ in range(pools):
        width = math.ceil(width / 2) if rule == "dsm" else width // 2
    return width


def model_config(backbone="vgg16", fov=360.0, in_channels=3, ground_width_rule="witw",
                 orientation_search=True, vertical_search=False, trainable_convolutions="default",
                 aerial_size=256, ground_height=128, polar_height=128, polar_width=512,
                 tiny_channels=_TINY_DEFAULT_CHANNELS, batch_norm=None, image_scale=1.0,
                 downsample="pool") -> dict:
    """Validated, JSON-able model configuration (see ``build_model``)."""
    if downsample not in ("pool", "stride"):
        raise CvigInputError(f"downsample must be 'pool' or 'stride', got {downsample!r}")
    if downsample == "stride" and backbone != "tiny":
        raise CvigInputError("strided downsampling exists for the tiny backbone only (VGG16 keeps "
                             "its pretrained pools)")
    if image_scale not in (1.0, 0.5):
        raise CvigInputError(f"image_scale must be 1 or 0.5, got {image_scale}")
    if image_scale != 1.0:
        if backbone != "tiny":
            raise CvigInputError("half-size inputs (image_scale 0.5) exist for the tiny backbone "
                                 "only")
        aerial_size, ground_height = (int(aerial_size * image_scale),
                                      int(ground_height * image_scale))
        polar_height, polar_width = int(polar_height * image_scale), int(polar_width * image_scale)
    pools = 3 if image_scale == 1.0 else 2
    if backbone not in ("vgg16", "tiny"):
        raise CvigInputError(f"unknown backbone {backbone!r}: use 'vgg16' or 'tiny'")
    if len(tiny_channels) != 4 or any(int(channels) < 1 for channels in tiny_channels):
        raise CvigInputError("tiny_channels must be four positive channel counts, "
                             f"got {list(tiny_channels)}")
    fov = float(fov)
    if not 0.0 < fov <= 360.0:
        raise CvigInputError(f"field of view must be in (0, 360] degrees, got {fov}")
    if ground_width_rule not in ("witw", "dsm"):
        raise CvigInputError("ground_width_rule must be 'witw' or 'dsm', "
                             f"got {ground_width_rule!r}")
    if in_channels < 1:
        raise CvigInputError(f"in_channels must be positive, got {in_channels}")
    if vertical_search and not orientation_search:
        raise CvigInputError("vertical search needs orientation search (the baseline has no map "
                             "to slide)")
    if trainable_convolutions == "default":
        # The paper trains the last six convolutions of VGG16; extra input bands need the first
        # convolution to learn too, and the tiny net has no pretrained weights to keep.
        trainable_convolutions = 6 if backbone == "vgg16" and in_channels == 3 else None
    ground_width = int(fov / 360.0 * polar_width)
    if ground_width < 8:
        raise CvigInputError(f"field of view {fov} deg gives a ground image {ground_width} px "
                             "wide: too narrow")
    feature_channels = 16
    # The pools halve both sides; the two stride-(2, 1) head convolutions halve the height twice.
    aerial_height = polar_height // (4 << pools) * (2 if vertical_search else 1)
    ground_height_features = ground_height // (4 << pools)
    if orientation_search:
        aerial_shape = [feature_channels, aerial_height, polar_width >> pools]
        ground_shape = [feature_channels, ground_height_features,
                        ground_feature_width(ground_width, ground_width_rule, pools)]
    else:
        descriptor = feature_channels * ground_height_features * 8
        aerial_shape = ground_shape = [descriptor, 1, 1]
    mean = IMAGENET_MEAN + [0.0] * (in_channels - 3)
    std = IMAGENET_STD + [1.0] * (in_channels - 3)
    return {
        "architecture": "cvig-twin",
        "backbone": backbone,
        "fov": fov,
        "in_channels": int(in_channels),
        "ground_height": int(ground_height),
        "ground_width": ground_width,
        "aerial_size": int(aerial_size),
        "polar_height": int(polar_height),
        "polar_width": int(polar_width),
        "ground_width_rule": ground_width_rule,
        "orientation_search": bool(orientation_search),
        "vertical_search": bool(vertical_search),
        "trainable_convolutions": trainable_convolutions,
        "tiny_channels": list(tiny_channels),
        "image_scale": float(image_scale),
        "pools": pools,
        "downsample": downsample,
        # The tiny net trains from scratch: batch norm after its convolutions makes that converge in
        # minutes on a CPU (without it the triplet loss sits near log 2 for hundreds of steps).
        "batch_norm": backbone == "tiny" if batch_norm is None else bool(batch_norm),
        "mean": mean[:in_channels],
        "std": std[:in_channels],
        "feature_channels": feature_channels,
        "aerial_feature_shape": aerial_shape,
        "ground_feature_shape": ground_shape,
    }


def build_model(backbone="vgg16", fov=360.0, in_channels=3, ground_width_rule="witw",
                orientation_search=True, vertical_search=False, trainable_convolutions="default",
                vgg_weights=None, aerial_size=256, tiny_channels=_TINY_DEFAULT_CHANNELS,
                batch_norm=None, image_scale=1.0, downsample="pool", config=None) -> TwinModel:
    """Build the twin model.

    Args:
        backbone: ``"vgg16"`` (the paper's) or ``"tiny"`` (same output geometry, ~200x less
            compute).
        fov: ground photo field of view in degrees, (0, 360].
        in_channels: 3 for RGB; 5 adds building and road bands (their filters start at zero).
        ground_width_rule: ``"witw"`` (floor, Wg = 12 at 70 deg) or ``"dsm"`` (ceil, Wg = 13).
        orientation_search: False builds the Liu & Li style baseline (one global descriptor).
        vertical_search: a twice-as-tall aerial map so the ground map also slides vertically.
        trainable_convolutions: how many of the last convolutions train (None: all); "default" is
            6 for VGG16 with RGB input and all otherwise.
        vgg_weights: a local torchvision VGG16 state dict (.pth or .safetensors); defaults to the
            ``CVIG_VGG16_WEIGHTS`` environment variable. Never downloaded. Without it, VGG16 starts
            from random weights with a warning.
        aerial_size: side of the raw overhead tile fed to the polar transform.
        tiny_channels: channels of the tiny backbone's four convolutions.
        batch_norm: batch norm after each backbone convolution (default: tiny only).
        image_scale: 0.5 halves every input image (tiny only; one pool fewer keeps the
            16 x 4 x 64 aerial map): four times less compute, for CPU demos.
        downsample: ``"pool"`` (VGG's 2x2 max-pools) or ``"stride"`` (tiny only: the convolution
            before each pool has stride 2 instead; same output sizes and rounding rule).
        config: a full config dict (as saved in checkpoints) instead of the keywords above.
    """
    if config is None:
        config = model_config(backbone=backbone, fov=fov, in_channels=in_channels,
                              ground_width_rule=ground_width_rule,
                              orientation_search=orientation_search,
                              vertical_search=vertical_search,
                              trainable_convolutions=trainable_convolutions,
                              aerial_size=aerial_size, tiny_channels=tiny_channels,
                              batch_norm=batch_norm, image_scale=image_scale,
                              downsample=downsample)
    model = TwinModel(config)
    if config["backbone"] == "vgg16" and vgg_weights is not False:
        vgg_weights = vgg_weights or os.environ.get(VGG_WEIGHTS_ENV)
        if vgg_weights:
            load_vgg16_weights(model, vgg_weights)
        else:
            warnings.warn(
                f"no ImageNet VGG16 weights given (vgg_weights= or ${VGG_WEIGHTS_ENV}): "
                "the VGG16 backbone starts from random weights", stacklevel=2)
    return model


def load_vgg16_weights(model: TwinModel, path) -> None:
    """Copy conv1_1..conv4_3 of a local torchvision VGG16 state dict into both encoders.

    Extra input bands (beyond RGB) of the first convolution start at zero.
    """
    from cvig_engine.model.checkpoint import read_state_dict

    state = read_state_dict(Path(path))
    for encoder in (model.ground_encoder, model.aerial_encoder):
        for convolution, index in zip(encoder.backbone_convolutions(), _VGG16_CONV_INDICES):
            weight_key, bias_key = f"features.{index}.weight", f"features.{index}.bias"
            if weight_key not in state or bias_key not in state:
                raise CvigInputError(f"{path}: not a torchvision VGG16 state dict "
                                     f"(no {weight_key!r})")
            weight = state[weight_key]
            expected = convolution.weight.shape
            if (weight.shape[0] != expected[0] or weight.shape[2:] != expected[2:]
                    or weight.shape[1] > expected[1]):
                raise CvigInputError(f"{path}: {weight_key} has shape {tuple(weight.shape)}, "
                                     f"expected {tuple(expected)}")
            with torch.no_grad():
                convolution.weight.zero_()
                convolution.weight[:, : weight.shape[1]].copy_(weight)
                convolution.bias.copy_(state[bias_key])
    LOGGER.info("loaded ImageNet VGG16 weights from %s", path)
