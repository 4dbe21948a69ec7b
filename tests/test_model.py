import warnings

import pytest
import torch

from cvig_engine import build_model, orientation_distance, triplet_loss
from cvig_engine.errors import CvigInputError
from cvig_engine.model.encoders import PaddedConv2d


def _quiet_build(*args, **kwargs):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return build_model(*args, **kwargs)


@pytest.mark.parametrize("backbone", ["tiny", "vgg16"])
@pytest.mark.parametrize("fov,rule,ground_width,feature_width", [
    (360.0, "witw", 512, 64), (70.0, "witw", 99, 12), (70.0, "dsm", 99, 13)])
def test_output_shapes(backbone, fov, rule, ground_width, feature_width):
    model = _quiet_build(backbone, fov=fov, ground_width_rule=rule).eval()
    assert model.config["ground_width"] == ground_width
    with torch.no_grad():
        ground, aerial = model(torch.randn(1, 3, 128, ground_width), torch.randn(1, 3, 128, 512))
    assert tuple(ground.shape) == (1, 16, 4, feature_width)
    assert tuple(aerial.shape) == (1, 16, 4, 64)
    assert list(ground.shape[1:]) == model.config["ground_feature_shape"]
    assert list(aerial.shape[1:]) == model.config["aerial_feature_shape"]


@pytest.mark.parametrize("image_scale", [1.0, 0.5])
@pytest.mark.parametrize("fov,rule,feature_width", [(360.0, "witw", 64), (70.0, "witw", 12),
                                                    (70.0, "dsm", 13)])
def test_strided_tiny_backbone_keeps_the_pooled_shapes(image_scale, fov, rule, feature_width):
    model = build_model("tiny", fov=fov, ground_width_rule=rule, image_scale=image_scale,
                        downsample="stride").eval()
    config = model.config
    assert not any(isinstance(layer, torch.nn.MaxPool2d) for layer in model.modules())
    strided = [c for c in model.ground_encoder.backbone_convolutions() if c.stride == (2, 2)]
    assert len(strided) == config["pools"]
    with torch.no_grad():
        ground, aerial = model(torch.randn(2, 3, config["ground_height"], config["ground_width"]),
                               torch.randn(2, 3, config["polar_height"], config["polar_width"]))
    assert tuple(ground.shape) == (2, 16, 4, feature_width)
    assert tuple(aerial.shape) == (2, 16, 4, 64)
    assert list(ground.shape[1:]) == config["ground_feature_shape"]


def test_vgg16_without_weights_warns():
    with pytest.warns(UserWarning, match="random weights"):
        build_model("vgg16")


def test_gradients_reach_only_the_last_six_convolutions():
    model = _quiet_build("vgg16").train()
    ground = torch.randn(3, 3, 32, 64)  # small inputs keep the test fast; geometry is not the point
    aerial = torch.randn(3, 3, 32, 128)
    ground_features, aerial_features = model(ground, aerial)
    distance, _ = orientation_distance(ground_features, aerial_features)
    triplet_loss(distance).backward()
    for encoder in (model.ground_encoder, model.aerial_encoder):
        convolutions = encoder.convolutions()
        assert len(convolutions) == 13
        for index, convolution in enumerate(convolutions):
            if index < 7:
                assert convolution.weight.grad is None and not convolution.weight.requires_grad
            else:
                assert convolution.weight.grad is not None
                assert convolution.weight.grad.abs().sum() > 0


@pytest.mark.parametrize("downsample", ["pool", "stride"])
def test_aerial_encoder_is_circular_in_width_and_ground_is_not(downsample):
    model = _quiet_build("tiny", downsample=downsample).eval()
    aerial = torch.randn(1, 3, 64, 128)
    rolled = torch.roll(aerial, shifts=32, dims=-1)  # 32 px = 4 feature columns
    with torch.no_grad():
        features = model.aerial_encoder(aerial)
        rolled_features = model.aerial_encoder(rolled)
        torch.testing.assert_close(torch.roll(features, shifts=4, dims=-1), rolled_features, atol=1e-5, rtol=1e-4)
        ground_features = model.ground_encoder(aerial)
        rolled_ground = model.ground_encoder(rolled)
    assert not torch.allclose(torch.roll(ground_features, 4, -1), rolled_ground, atol=1e-3)


def test_imagenet_weights_come_from_a_local_file_and_extra_bands_start_at_zero(tmp_path):
    layout = [(0, 3, 64), (2, 64, 64), (5, 64, 128), (7, 128, 128), (10, 128, 256), (12, 256, 256),
              (14, 256, 256), (17, 256, 512), (19, 512, 512), (21, 512, 512)]
    state = {}
    for index, cin, cout in layout:
        state[f"features.{index}.weight"] = torch.randn(cout, cin, 3, 3)
        state[f"features.{index}.bias"] = torch.randn(cout)
    path = tmp_path / "vgg16.pth"
    torch.save(state, path)
    model = build_model("vgg16", in_channels=5, vgg_weights=path)
    for encoder in (model.ground_encoder, model.aerial_encoder):
        first = encoder.convolutions()[0]
        torch.testing.assert_close(first.weight[:, :3], state["features.0.weight"])
        assert first.weight[:, 3:].abs().sum() == 0
        torch.testing.assert_close(encoder.convolutions()[9].weight, state["features.21.weight"])
    # Extra bands must be able to learn: every convolution trains with 5 input channels.
    assert all(p.requires_grad for p in model.parameters())
    assert model.config["mean"][3:] == [0.0, 0.0] and model.config["std"][3:] == [1.0, 1.0]


def test_baseline_without_orientation_search_gives_global_descriptors():
    model = _quiet_build("tiny", fov=70.0, orientation_search=False).eval()
    with torch.no_grad():
        ground, aerial = model(torch.randn(2, 3, 128, 99), torch.randn(2, 3, 128, 512))
    assert ground.shape == aerial.shape == (2, 512, 1, 1)


def test_vertical_search_makes_a_taller_aerial_map():
    model = _quiet_build("tiny", vertical_search=True).eval()
    with torch.no_grad():
        ground, aerial = model(torch.randn(1, 3, 128, 512), torch.randn(1, 3, 128, 512))
    assert tuple(aerial.shape) == (1, 16, 8, 64) and tuple(ground.shape) == (1, 16, 4, 64)
    _, _, vertical = orientation_distance(ground, aerial, return_vertical=True)
    assert 0 <= int(vertical) <= 4


@pytest.mark.parametrize("kwargs", [dict(fov=0), dict(fov=400), dict(backbone="resnet"),
                                    dict(ground_width_rule="round"), dict(tiny_channels=(8, 16, 32)),
                                    dict(tiny_channels=(8, 16, 0, 32)), dict(downsample="avg"),
                                    dict(backbone="vgg16", downsample="stride")])
def test_bad_model_options_are_input_errors(kwargs):
    with pytest.raises(CvigInputError):
        build_model(**{"backbone": "tiny", **kwargs})


@pytest.mark.parametrize("height,width", [(9, 11), (8, 12), (9, 12)])
def test_strided_padded_convolution_rounds_odd_sizes_up_or_down(height, width):
    ceil = PaddedConv2d(3, 5, stride=(2, 2))
    floor = PaddedConv2d(3, 5, stride=(2, 2), floor_size=True)
    floor.load_state_dict(ceil.state_dict())
    x = torch.randn(2, 3, height, width)
    # Zero padding of one on every side: output (n + 1) // 2, i.e. rounded up.
    expected = torch.nn.functional.conv2d(x, ceil.weight, ceil.bias, stride=2, padding=1)
    assert expected.shape[-2:] == ((height + 1) // 2, (width + 1) // 2)
    torch.testing.assert_close(ceil(x), expected)
    torch.testing.assert_close(floor(x), expected[..., : height // 2, : width // 2])


def test_padded_convolution_matches_conv2d_with_zero_padding():
    convolution = PaddedConv2d(3, 5, stride=(2, 1))
    x = torch.randn(2, 3, 9, 11)
    expected = torch.nn.functional.conv2d(x, convolution.weight, convolution.bias, stride=(2, 1), padding=1)
    torch.testing.assert_close(convolution(x), expected)
