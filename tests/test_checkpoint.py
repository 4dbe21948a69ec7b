import json
import os
import pickle

import pytest
import torch

from cvig_engine import build_model, load_checkpoint, save_checkpoint
from cvig_engine.errors import CvigInputError
from cvig_engine.model.checkpoint import read_state_dict


def test_round_trip_gives_identical_features(tmp_path):
    model = build_model("tiny", fov=70.0, ground_width_rule="dsm").eval()
    path = save_checkpoint(model, tmp_path / "run" / "best.safetensors", metadata={"epoch": 3})
    document = json.loads((tmp_path / "run" / "best.json").read_text())
    assert document["config"]["ground_width_rule"] == "dsm" and document["metadata"]["epoch"] == 3
    loaded = load_checkpoint(path)
    ground, aerial = torch.randn(2, 3, 128, 99), torch.randn(2, 3, 128, 512)
    with torch.no_grad():
        for before, after in zip(model(ground, aerial), loaded(ground, aerial)):
            torch.testing.assert_close(before, after, rtol=0, atol=0)
    # The weights file alone carries its config too.
    (tmp_path / "run" / "best.json").unlink()
    assert load_checkpoint(path).config == model.config


class _Payload:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_pickle_that_would_run_code_is_refused_and_does_not_run(tmp_path):
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.pth"
    with open(path, "wb") as handle:
        pickle.dump({"weight": _Payload(marker)}, handle)
    # A valid config beside it, so that loading really reaches the weights.
    save_checkpoint(build_model("tiny"), tmp_path / "evil.safetensors")
    (tmp_path / "evil.safetensors").unlink()
    with pytest.raises(CvigInputError, match="unpickling"):
        load_checkpoint(path)
    with pytest.raises(CvigInputError, match="unpickling"):
        read_state_dict(path)
    assert not marker.exists()
    # A torch.save'd full checkpoint object is refused as well (zip format, same rule).
    torch.save({"weight": _Payload(marker)}, path)
    with pytest.raises(CvigInputError):
        read_state_dict(path)
    assert not marker.exists()


def test_plain_state_dict_pth_with_config_loads(tmp_path):
    model = build_model("tiny").eval()
    save_checkpoint(model, tmp_path / "m.safetensors")
    torch.save(model.state_dict(), tmp_path / "m.pth")
    loaded = load_checkpoint(tmp_path / "m.pth")
    for name, tensor in model.state_dict().items():
        torch.testing.assert_close(loaded.state_dict()[name], tensor, rtol=0, atol=0)


def test_files_that_are_not_checkpoints_are_input_errors(tmp_path):
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(b"not a checkpoint at all")
    with pytest.raises(CvigInputError):
        load_checkpoint(junk)
    with pytest.raises(CvigInputError, match="not found"):
        load_checkpoint(tmp_path / "missing.safetensors")
