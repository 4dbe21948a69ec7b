import json
import os
import signal
import subprocess
import sys
import threading
import time

import numpy as np
import pytest
import torch

from cvig_engine.errors import CvigInputError
from cvig_engine.model.checkpoint import read_state_dict
from cvig_engine.train import (TrainOptions, epoch_batches, mine_neighbours, mining_descriptors,
                               split_validation, train)


@pytest.fixture(scope="module")
def small_world(tmp_path_factory):
    from cvig_engine.synth import synthesize

    out = tmp_path_factory.mktemp("world")
    synthesize(out, pairs=48, cities=2, seed=3, tile_size=64, pano_height=32, pano_width=128)
    return out


def _options(**kwargs):
    defaults = dict(backbone="tiny", epochs=2, batch_size=8, learning_rate=1e-3, validation_size=8,
                    seed=1, device="cpu")
    defaults.update(kwargs)
    return TrainOptions(**defaults)


def test_short_run_lowers_the_loss(small_world, tmp_path):
    summary = train(small_world / "train.csv", tmp_path / "run", _options(epochs=4))
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert len(records) == summary["epochs"] == 4
    assert records[-1]["train_loss"] < records[0]["train_loss"]
    assert (tmp_path / "run" / "best.safetensors").exists() and (tmp_path / "run" / "best.json").exists()


def _train_process(csv, run_dir, epochs):
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    command = [sys.executable, "-m", "cvig_engine.cli", "train", "--data", str(csv), "-o", str(run_dir),
               "--epochs", str(epochs), "--batch-size", "8", "--lr", "1e-3", "--validation-size", "8",
               "--seed", "1", "--device", "cpu", "--global-mining", "--tile-offset", "3",
               "--lr-schedule", "cosine", "--colour-jitter", "0.2", "--fov", "180",
               "--warmup-epochs", "2", "--ema-decay", "0.9"]
    return subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)


@pytest.mark.slow
def test_killed_run_resumes_to_the_same_state(small_world, tmp_path):
    csv = small_world / "train.csv"
    uninterrupted = _train_process(csv, tmp_path / "full", 3)
    assert uninterrupted.wait(timeout=300) == 0, uninterrupted.stderr.read().decode()[-2000:]

    victim = _train_process(csv, tmp_path / "killed", 3)
    metrics = tmp_path / "killed" / "metrics.jsonl"
    deadline = time.monotonic() + 300
    while not (metrics.exists() and metrics.read_text().count("\n") >= 1):
        assert victim.poll() is None, "the run ended before it could be killed"
        assert time.monotonic() < deadline
        time.sleep(0.05)
    victim.send_signal(signal.SIGKILL)
    victim.wait()
    finished_before_kill = metrics.read_text().count("\n")
    assert finished_before_kill < 3
    resumed = _train_process(csv, tmp_path / "killed", 3)
    assert resumed.wait(timeout=300) == 0, resumed.stderr.read().decode()[-2000:]

    full = read_state_dict(tmp_path / "full" / "last.safetensors")
    again = read_state_dict(tmp_path / "killed" / "last.safetensors")
    assert full.keys() == again.keys()
    for name in full:
        torch.testing.assert_close(again[name], full[name], rtol=0, atol=0, msg=name)
    full_optimizer = read_state_dict(tmp_path / "full" / "last_optimizer.safetensors")
    again_optimizer = read_state_dict(tmp_path / "killed" / "last_optimizer.safetensors")
    assert any(name.startswith("average.") for name in full_optimizer)
    for name in full_optimizer:
        torch.testing.assert_close(again_optimizer[name], full_optimizer[name], rtol=0, atol=0, msg=name)
    lines_full = [json.loads(line) for line in (tmp_path / "full" / "metrics.jsonl").read_text().splitlines()]
    lines_again = [json.loads(line) for line in metrics.read_text().splitlines()]
    assert [r["validation_loss"] for r in lines_full] == [r["validation_loss"] for r in lines_again]


def test_global_mining_picks_the_nearest_neighbours():
    rng = np.random.default_rng(0)
    ground_features = torch.from_numpy(rng.standard_normal((30, 16, 4, 64))).float()
    aerial_features = torch.from_numpy(rng.standard_normal((30, 16, 4, 64))).float()
    ground_bank, aerial_bank = mining_descriptors(ground_features), mining_descriptors(aerial_features)
    seen = torch.ones(30, dtype=torch.bool)
    seen[[5, 6]] = False
    anchors = np.array([0, 3, 9, 5])
    chosen = mine_neighbours(anchors, ground_bank, aerial_bank, seen, exclude=anchors)
    # Brute force in float64: width-averaged maps, cosine similarity, skip taken and unseen items.
    ground_mean = ground_features.double().mean(-1).flatten(1).numpy()
    aerial_mean = aerial_features.double().mean(-1).flatten(1).numpy()
    taken, expected = set(anchors.tolist()), []
    for anchor in anchors:
        if anchor in (5, 6):
            continue
        g = ground_mean[anchor] / np.linalg.norm(ground_mean[anchor])
        similarity = {j: aerial_mean[j] @ g / np.linalg.norm(aerial_mean[j]) for j in range(30)
                      if j not in taken and j not in (5, 6)}
        best = max(similarity, key=similarity.get)
        expected.append(best)
        taken.add(best)
    assert chosen == expected


def test_global_mining_breaks_ties_by_index_and_skips_taken_and_unseen_items():
    rng = np.random.default_rng(1)
    # Few distinct descriptors with entries in {0, 0.5, 1}: float32 dot products are exact, so
    # many candidates tie and the rule "most similar, then lowest index" decides.
    distinct = torch.tensor([[1, 0, 0.5, 0], [0, 1, 0, 0.5], [0.5, 0.5, 1, 0], [0, 0, 0, 1]])
    ground_bank = distinct[rng.integers(0, 4, 60)]
    aerial_bank = distinct[rng.integers(0, 4, 60)]
    seen = torch.from_numpy(rng.random(60) < 0.7)
    anchors = rng.permutation(60)[:16]
    exclude = list(anchors) + [int(i) for i in rng.permutation(60)[:10]]
    chosen = mine_neighbours(anchors, ground_bank, aerial_bank, seen, exclude=exclude)
    taken, expected = set(exclude), []
    for anchor in anchors:
        if not seen[anchor]:
            continue
        free = [j for j in range(60) if seen[j] and j not in taken]
        best = min(free, key=lambda j: (-float(aerial_bank[j].double() @ ground_bank[anchor].double()), j))
        expected.append(best)
        taken.add(best)
    assert chosen == expected and len(chosen) == int(seen[anchors].sum())


def test_early_stopping_triggers(small_world, tmp_path):
    summary = train(small_world / "train.csv", tmp_path / "run",
                    _options(epochs=10, patience=2, min_delta=1e6))
    assert summary["stop_reason"] == "early stopping"
    assert summary["epochs"] == 3  # the first epoch sets the best, two more without improvement


def _spy_on_items(monkeypatch) -> list:
    """Record (train?, epoch, index, item) of every item the steps and validation read (not the
    prefetch thread's)."""
    from cvig_engine import data

    seen = []
    item = data._PairDatasetImplementation.item

    def spy(self, index, epoch=0, ground_fov=None):
        found = item(self, index, epoch=epoch, ground_fov=ground_fov)
        if threading.current_thread() is threading.main_thread():
            seen.append((self.train, epoch, index, found))
        return found

    monkeypatch.setattr(data._PairDatasetImplementation, "item", spy)
    return seen


def _widths(seen) -> dict:
    """(train?, epoch) -> the ground input widths seen."""
    widths = {}
    for is_training, epoch, _, found in seen:
        widths.setdefault((is_training, epoch), set()).add(found["ground"].shape[-1])
    return widths


def test_warmup_epochs_train_on_wider_views_and_validate_at_the_model_fov(small_world, tmp_path,
                                                                          monkeypatch):
    seen = _spy_on_items(monkeypatch)
    train(small_world / "train.csv", tmp_path / "run", _options(fov=90.0, warmup_epochs=2,
                                                                 epochs=3))
    # Polar width 512 (the default size): 360 deg views are 512 wide, 90 deg ones 128.
    assert _widths(seen) == {(True, 0): {512}, (True, 1): {512}, (True, 2): {128},
                             (False, 0): {128}}
    records = [json.loads(line)
               for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [record["ground_fov"] for record in records] == [360.0, 360.0, 90.0]
    config = json.loads((tmp_path / "run" / "best.json").read_text())["config"]
    assert config["fov"] == 90.0 and config["ground_width"] == 128


def test_extra_fovs_train_every_step_on_both_widths_with_the_mean_loss(small_world, tmp_path,
                                                                       monkeypatch):
    from cvig_engine import train as train_module

    seen = _spy_on_items(monkeypatch)
    training_losses = []  # every triplet loss computed with gradients, in order
    triplet_loss = train_module.triplet_loss

    def loss_spy(distance, alpha):
        value = triplet_loss(distance, alpha=alpha)
        if torch.is_grad_enabled():
            training_losses.append(value.item())
        return value

    monkeypatch.setattr(train_module, "triplet_loss", loss_spy)
    summary = train(small_world / "train.csv", tmp_path / "run",
                    _options(fov=90.0, extra_fovs=[360.0, 90.0], epochs=2))
    assert _widths(seen) == {(True, 0): {128, 512}, (True, 1): {128, 512}, (False, 0): {128}}
    records = [json.loads(line)
               for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    # Each step: a 90 deg loss, then a 360 deg one (90 is the model's own and is not repeated);
    # the logged loss is the mean of the two.
    steps = len(epoch_batches(np.arange(summary["train_pairs"]), 8, 1, 0))
    assert len(training_losses) == 2 * steps * 2
    for epoch, record in enumerate(records):
        losses = training_losses[epoch * 2 * steps: (epoch + 1) * 2 * steps]
        means = [(losses[k] + losses[k + 1]) / 2 for k in range(0, 2 * steps, 2)]
        assert record["train_loss"] == pytest.approx(np.mean(means), rel=1e-6)
    config = json.loads((tmp_path / "run" / "best.json").read_text())["config"]
    assert config["fov"] == 90.0 and config["ground_width"] == 128


def _with_cell(world, name, line, column, value):
    """A copy of the world's train.csv, named ``name``, with one cell of file line ``line``
    (1-based, the header being line 1) changed."""
    lines = (world / "train.csv").read_text().splitlines()
    row = lines[line - 1].split(",")
    row[lines[0].split(",").index(column)] = value
    lines[line - 1] = ",".join(row)
    (world / name).write_text("\n".join(lines) + "\n")
    return world / name


def test_warmup_needs_panoramas_and_a_wider_view(small_world, tmp_path):
    narrow = _with_cell(small_world, "narrow.csv", 4, "fov", "90")
    with pytest.raises(CvigInputError, match=r"narrow.csv: row 4: --warmup-epochs .* covers 90"):
        train(narrow, tmp_path / "run", _options(fov=90.0, warmup_epochs=1))
    assert not (tmp_path / "run").exists()
    with pytest.raises(CvigInputError, match="--warmup-fov must be between"):
        train(small_world / "train.csv", tmp_path / "run",
              _options(fov=90.0, warmup_epochs=1, warmup_fov=60.0))
    with pytest.raises(CvigInputError, match="--warmup-epochs must be >= 0"):
        _options(warmup_epochs=-1).validate()
    with pytest.raises(CvigInputError, match=r"narrow.csv: row 4: .*--extra-fov .* covers 90"):
        train(narrow, tmp_path / "run", _options(fov=90.0, extra_fovs=[360.0]))
    assert not (tmp_path / "run").exists()
    with pytest.raises(CvigInputError, match=r"--extra-fov must be in \(0, 360\]"):
        _options(extra_fovs=[400.0]).validate()


def test_ema_keeps_the_moving_average_of_every_step_and_validates_it(small_world, tmp_path,
                                                                     monkeypatch):
    from cvig_engine import train as train_module

    steps = []  # the trained weights after each optimiser step, in float64
    update = train_module._Trainer._update_average

    def spy(self):
        steps.append({name: value.double().clone()
                      for name, value in self.model.state_dict().items()})
        update(self)

    monkeypatch.setattr(train_module._Trainer, "_update_average", spy)
    train(small_world / "train.csv", tmp_path / "run", _options(epochs=1, batch_size=4,
                                                                 ema_decay=0.4))
    # Reference: a_0 = w_0, a_t = d_t a_(t-1) + (1 - d_t) w_t, d_t = min(0.4, t / (10 + t)).
    reference = dict(steps[0])
    for t, weights in enumerate(steps[1:], start=1):
        decay = min(0.4, t / (10 + t))
        for name, value in weights.items():
            if value.dtype.is_floating_point and "num_batches" not in name:
                reference[name] = decay * reference[name] + (1 - decay) * value
            else:
                reference[name] = value
    assert len(steps) > 2
    state = read_state_dict(tmp_path / "run" / "last_optimizer.safetensors")
    trained = read_state_dict(tmp_path / "run" / "last.safetensors")
    for name, value in reference.items():
        torch.testing.assert_close(state[f"average.{name}"].double(), value, rtol=0, atol=1e-6,
                                   msg=name)
    assert not all(torch.equal(state[f"average.{name}"], trained[name]) for name in trained)
    # Validation measured the average, so the (first, hence best) epoch's checkpoint holds it.
    best = read_state_dict(tmp_path / "run" / "best.safetensors")
    for name in best:
        assert torch.equal(best[name], state[f"average.{name}"]), name
    with pytest.raises(CvigInputError, match="--ema-decay"):
        _options(ema_decay=1.0).validate()


def test_validation_split_is_seeded_and_disjoint():
    train_a, validation_a = split_validation(100, 10, seed=4)
    train_b, validation_b = split_validation(100, 10, seed=4)
    np.testing.assert_array_equal(validation_a, validation_b)
    assert len(set(train_a) & set(validation_a)) == 0 and len(train_a) + len(validation_a) == 100
    assert not np.array_equal(split_validation(100, 10, seed=5)[1], validation_a)
    with pytest.raises(CvigInputError):
        split_validation(10, 10, seed=0)


def test_epoch_batches_cover_the_training_set_once():
    batches = epoch_batches(np.arange(10, 31), 4, seed=0, epoch=2)
    flat = np.concatenate(batches)
    # 21 pairs in batches of 4: five full batches; the last single pair cannot form a triplet.
    assert len(flat) == 20 and len(set(flat.tolist())) == 20 and set(flat.tolist()) <= set(range(10, 31))
    assert [len(batch) for batch in batches] == [4] * 5
    again = epoch_batches(np.arange(10, 31), 4, seed=0, epoch=2)
    assert all(np.array_equal(a, b) for a, b in zip(batches, again))
    other_epoch = np.concatenate(epoch_batches(np.arange(10, 31), 4, seed=0, epoch=3))
    assert not np.array_equal(other_epoch, flat)


@pytest.mark.parametrize("kwargs", [dict(batch_size=1), dict(learning_rate=0), dict(aerial_crop=1.5)])
def test_bad_options_are_input_errors(kwargs):
    with pytest.raises(CvigInputError):
        _options(**kwargs).validate()


def test_cosine_schedule_falls_from_the_rate_to_zero_over_the_epochs():
    from types import SimpleNamespace

    from cvig_engine.train import _Trainer

    parameter = torch.nn.Parameter(torch.zeros(1))
    trainer = SimpleNamespace(options=_options(epochs=4, learning_rate=0.02, lr_schedule="cosine"),
                              optimizer=torch.optim.Adam([parameter], lr=1.0), epoch=0)
    rates = []
    for epoch in range(4):
        trainer.epoch = epoch
        for step in range(5):
            _Trainer._set_learning_rate(trainer, step, 5)
            rates.append(trainer.optimizer.param_groups[0]["lr"])
    expected = [0.01 * (1 + np.cos(np.pi * t / 20)) for t in range(20)]
    np.testing.assert_allclose(rates, expected, rtol=1e-12)
    trainer.options = _options(learning_rate=0.02)
    _Trainer._set_learning_rate(trainer, 3, 5)
    assert trainer.optimizer.param_groups[0]["lr"] == 0.02
    with pytest.raises(CvigInputError, match="lr-schedule"):
        _options(lr_schedule="linear").validate()
    with pytest.raises(CvigInputError, match="cache-gb"):
        _options(cache_gb=-1.0).validate()
    with pytest.raises(CvigInputError, match="colour-jitter"):
        _options(colour_jitter=-0.1).validate()


@pytest.mark.parametrize("channels", ["8,16,x,32", "8,16,32"])
def test_bad_tiny_channels_exit_2_without_traceback(small_world, tmp_path, channels):
    completed = subprocess.run(
        [sys.executable, "-m", "cvig_engine.cli", "train", "--data", str(small_world / "train.csv"),
         "-o", str(tmp_path / "run"), "--tiny-channels", channels, "--device", "cpu"],
        capture_output=True, text=True)
    assert completed.returncode == 2 and "Traceback" not in completed.stderr
    assert "channels" in completed.stderr


def test_resume_refuses_changed_options_and_takes_new_options_as_their_defaults(small_world,
                                                                                 tmp_path):
    run = tmp_path / "run"
    train(small_world / "train.csv", run, _options(epochs=1))
    with pytest.raises(CvigInputError, match="colour_jitter"):
        train(small_world / "train.csv", run, _options(epochs=2, colour_jitter=0.2))
    # A run saved before an option existed: its absence reads as the option's default.
    sidecar = run / "last.json"
    document = json.loads(sidecar.read_text())
    del document["metadata"]["options"]["colour_jitter"]
    sidecar.write_text(json.dumps(document))
    summary = train(small_world / "train.csv", run, _options(epochs=2))
    assert summary["resumed"] and summary["epochs"] == 2


@pytest.mark.parametrize("rate", [0.0, 0.5])
def test_dropout_option_sets_the_training_noise_of_both_encoders(small_world, tmp_path, rate):
    from cvig_engine.data import read_dataset
    from cvig_engine.train import _Trainer

    trainer = _Trainer(read_dataset(small_world / "train.csv"), tmp_path, _options(dropout=rate))
    model = trainer.model.train()
    config = model.config
    torch.manual_seed(0)
    ground = torch.rand(4, 3, config["ground_height"], config["ground_width"])
    aerial = torch.rand(4, 3, config["polar_height"], config["polar_width"])
    first, second = model(ground, aerial), model(ground, aerial)
    for one, two in zip(first, second):  # batch norm uses the batch's statistics both times
        assert torch.equal(one, two) == (rate == 0.0)
    with pytest.raises(CvigInputError, match=r"--dropout must be in \[0, 1\)"):
        _options(dropout=1.0).validate()


def test_supervise_heading_scores_true_pairs_at_their_known_shift(small_world, tmp_path,
                                                                   monkeypatch):
    from cvig_engine import train as train_module
    from cvig_engine.model import distance_at_shift
    from cvig_engine.polar import heading_to_shift

    seen_items = _spy_on_items(monkeypatch)
    positives, diagonals = [], []

    def shift_spy(ground, aerial, shift):
        positives.append((shift.clone(), distance_at_shift(ground, aerial, shift).detach()))
        return distance_at_shift(ground, aerial, shift)

    triplet_loss = train_module.triplet_loss

    def loss_spy(distance, alpha):
        if torch.is_grad_enabled():
            diagonals.append(distance.diagonal().detach().clone())
        return triplet_loss(distance, alpha=alpha)

    monkeypatch.setattr(train_module, "distance_at_shift", shift_spy)
    monkeypatch.setattr(train_module, "triplet_loss", loss_spy)
    summary = train(small_world / "train.csv", tmp_path / "run",
                    _options(fov=90.0, supervise_heading=True, epochs=1))
    batches = epoch_batches(np.arange(summary["train_pairs"]), 8, 1, 0)
    assert len(positives) == len(diagonals) == len(batches) > 0
    for (shift, positive), diagonal in zip(positives, diagonals):
        torch.testing.assert_close(diagonal, positive)  # the loss saw the known-shift positives
    # Each shift is the orientation bin of the view's heading (aerial map 64 columns wide).
    headings = np.array([found["heading"] for is_training, _, _, found in seen_items
                         if is_training])
    shifts = torch.cat([shift for shift, _ in positives]).tolist()
    assert shifts == heading_to_shift(headings, 90.0, 64).tolist()

    unknown = _with_cell(small_world, "unknown_heading.csv", 3, "heading", "")
    with pytest.raises(CvigInputError, match=r"unknown_heading.csv: row 3: --supervise-heading"):
        train(unknown, tmp_path / "run2", _options(supervise_heading=True))
    with pytest.raises(CvigInputError, match="does not combine with --vertical-search"):
        _options(supervise_heading=True, vertical_search=True).validate()
