"""Training: soft-margin triplet loss, validation hold-out, early stopping, resumable runs.

A run directory holds:

- ``best.safetensors`` + ``best.json``: the checkpoint with the lowest validation loss (with
  ``--ema-decay``, of the weights' moving average, which is what validation measures then);
- ``last.safetensors`` + ``last.json``: the state after the last finished epoch (model, Adam
  moments, epoch, best so far, options), written atomically, from which a killed run resumes;
- ``metrics.jsonl``: one JSON line per epoch (the training views' field of view, train loss,
  validation loss and top-1 %, seconds).

Randomness is derived from ``(seed, epoch)`` (batch order, panorama crops, tile offsets, dropout),
so a resumed run replays exactly what an uninterrupted run would have done.
"""
from __future__ import annotations

import copy
import json
import logging
import math
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch

from cvig_engine.data import FOV_TOLERANCE, PairDataset, check_images, read_dataset
from cvig_engine.errors import CvigInputError
from cvig_engine.files import atomic_write_text, file_sha256
from cvig_engine.model import (build_model, distance_at_shift, orientation_distance,
                               save_checkpoint, triplet_loss)
from cvig_engine.model.checkpoint import read_checkpoint_document, read_state_dict
from cvig_engine.polar import heading_to_shift

LOGGER = logging.getLogger(__name__)
RUN_STATE_FORMAT = "cvig-train-state"
# Options that may change when a run is resumed (how long and how it runs, not what it learns);
# "num_workers" is an option that older runs saved but that never did anything.
_RESUMABLE_CHANGES = ("max_minutes", "epochs", "num_workers", "patience", "min_delta", "device",
                      "skip_bad", "cache_gb")


@dataclass
class TrainOptions:
    """Everything that defines a training run (saved in the run directory)."""

    backbone: str = "tiny"
    fov: float = 360.0
    ground_width_rule: str = "witw"
    in_channels: int = 3
    orientation_search: bool = True
    vertical_search: bool = False
    epochs: int = 100
    batch_size: int = 16
    learning_rate: float = 1e-5
    alpha: float = 10.0
    validation_size: int = 1000
    patience: int = 5
    min_delta: float = 0.0
    seed: int = 0
    max_minutes: float | None = None
    global_mining: bool = False
    init_from: str | None = None
    tile_offset_px: float = 0.0
    aerial_crop: float = 1.0
    vgg_weights: str | None = None
    device: str = "auto"
    skip_bad: bool = False
    tiny_channels: list = field(default_factory=lambda: [8, 16, 32, 64])
    image_scale: float = 1.0
    #: "pool" or "stride" (tiny backbone: stride-2 convolutions instead of max-pools).
    downsample: str = "pool"
    #: Memory (GB) for decoded images and for inputs without random crops or offsets, kept after
    #: the first epoch (about 0.4 MB per pair at the synthetic world's sizes); 0 turns it off.
    cache_gb: float = 4.0
    #: "constant", or "cosine": the learning rate falls along a half cosine from ``learning_rate``
    #: to zero over ``epochs`` (per batch), which helps short runs settle.
    lr_schedule: str = "constant"
    #: Strength of the random per-channel contrast and brightness of training views (0: none).
    colour_jitter: float = 0.0
    #: The first ``warmup_epochs`` epochs train on ``warmup_fov``-wide ground views (cut from 360
    #: deg panoramas) before ``fov``: a limited-view model learns faster from wider views first.
    #: Validation and checkpoints always use ``fov``.
    warmup_epochs: int = 0
    warmup_fov: float = 360.0
    #: Further fields of view (deg) trained at every step beside the epoch's: each batch's
    #: panoramas are also cut to these widths (same heading, same tiles) and the loss is the mean
    #: of the views' triplet losses. A limited-view model keeps learning from full panoramas.
    extra_fovs: list = field(default_factory=list)
    #: Score each training pair's positive at its known heading (the CSV's heading plus the
    #: crop's offset) instead of the searched one; negatives keep the search. Narrow views
    #: otherwise reward whatever shift the untrained features happen to pick.
    supervise_heading: bool = False
    #: Probability that Dropout2d zeroes a channel after the backbone's last dropout points
    #: (VGG16: the last three convolutions, tiny: the last one); training only.
    dropout: float = 0.2
    #: Decay per batch of an exponential moving average of the weights (0: off). Validation and
    #: ``best.safetensors`` use the average: it settles the noise of a high constant rate without
    #: lowering the rate itself.
    ema_decay: float = 0.0

    def validate(self):
        if self.batch_size < 2:
            raise CvigInputError("--batch-size must be at least 2 (the triplet loss needs "
                                 f"negatives), got {self.batch_size}")
        if self.epochs < 1:
            raise CvigInputError(f"--epochs must be positive, got {self.epochs}")
        if self.learning_rate <= 0:
            raise CvigInputError(f"--lr must be positive, got {self.learning_rate}")
        if self.validation_size < 2:
            raise CvigInputError("--validation-size must be at least 2, "
                                 f"got {self.validation_size}")
        if self.max_minutes is not None and self.max_minutes <= 0:
            raise CvigInputError(f"--max-minutes must be positive, got {self.max_minutes}")
        if not 0.0 < self.aerial_crop <= 1.0:
            raise CvigInputError(f"--aerial-crop must be in (0, 1], got {self.aerial_crop}")
        if self.cache_gb < 0:
            raise CvigInputError(f"--cache-gb must be >= 0, got {self.cache_gb}")
        if self.lr_schedule not in ("constant", "cosine"):
            raise CvigInputError("--lr-schedule must be 'constant' or 'cosine', "
                                 f"got {self.lr_schedule!r}")
        if self.tile_offset_px < 0:
            raise CvigInputError(f"--tile-offset must be >= 0, got {self.tile_offset_px}")
        if self.colour_jitter < 0:
            raise CvigInputError(f"--colour-jitter must be >= 0, got {self.colour_jitter}")
        if self.supervise_heading and self.vertical_search:
            raise CvigInputError("--supervise-heading knows each pair's horizontal shift only; "
                                 "it does not combine with --vertical-search")
        if not 0.0 <= self.dropout < 1.0:
            raise CvigInputError(f"--dropout must be in [0, 1), got {self.dropout}")
        if not 0.0 <= self.ema_decay < 1.0:
            raise CvigInputError(f"--ema-decay must be in [0, 1), got {self.ema_decay}")
        if self.warmup_epochs < 0:
            raise CvigInputError(f"--warmup-epochs must be >= 0, got {self.warmup_epochs}")
        for extra in self.extra_fovs:
            if not 0.0 < extra <= 360.0:
                raise CvigInputError(f"--extra-fov must be in (0, 360] degrees, got {extra:g}")
        if self.warmup_epochs and not self.fov <= self.warmup_fov <= 360.0:
            raise CvigInputError(f"--warmup-fov must be between --fov ({self.fov:g}) and 360 "
                                 f"degrees, got {self.warmup_fov:g}")

    def epoch_fov(self, epoch: int) -> float:
        """The ground views' field of view in (0-based) ``epoch``."""
        return self.warmup_fov if epoch < self.warmup_epochs else self.fov

    def epoch_fovs(self, epoch: int) -> list[float]:
        """Every field of view trained in ``epoch``: the epoch's, then the extra ones."""
        fovs = [self.epoch_fov(epoch)]
        for extra in self.extra_fovs:
            if all(abs(extra - fov) > FOV_TOLERANCE for fov in fovs):
                fovs.append(float(extra))
        return fovs

    def cuts_panoramas(self) -> bool:
        """Whether training cuts views of another width than ``fov`` (needs 360 deg photos)."""
        return self.epoch_fovs(0) != [self.fov] or self.epoch_fovs(self.epochs) != [self.fov]


def resolve_device(device: str) -> torch.device:
    """``auto`` -> CUDA when available, else CPU."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        raise CvigInputError("--device cuda was asked for but no CUDA GPU is available")
    return torch.device(device)


def split_validation(num_records: int, validation_size: int, seed: int):
    """Seeded hold-out: (train indices, validation indices)."""
    if validation_size >= num_records:
        raise CvigInputError(f"the validation hold-out ({validation_size}) must be smaller than "
                             f"the dataset ({num_records} pairs): lower --validation-size")
    order = np.random.default_rng([seed, 7919]).permutation(num_records)
    return np.sort(order[validation_size:]), np.sort(order[:validation_size])


def mining_descriptors(features: torch.Tensor) -> torch.Tensor:
    """Rotation-invariant descriptor for global mining: the map averaged over width, normalised.

    Averaging over the (circular) width makes the descriptor independent of the heading, so
    nearest neighbours need no orientation search (a cheap proxy for the full distance).
    """
    pooled = features.float().mean(dim=-1).flatten(1)
    return pooled / pooled.norm(dim=1, keepdim=True).clamp_min(1e-12)


def mine_neighbours(anchor_indices, ground_bank: torch.Tensor, aerial_bank: torch.Tensor,
                    seen: torch.Tensor, exclude) -> list[int]:
    """For each anchor, the nearest other tile in feature space (by the mining descriptors).

    ``ground_bank`` / ``aerial_bank`` hold the last-seen descriptors of every training item and
    ``seen`` marks the items that have them. Items in ``exclude`` (the batch so far) are skipped.
    """
    chosen: list[int] = []
    taken = set(int(i) for i in exclude)
    candidates = torch.nonzero(seen).flatten()
    anchors = [int(anchor) for anchor in anchor_indices if bool(seen[int(anchor)])]
    if not anchors or len(candidates) == 0:
        return chosen
    # One matmul for all anchors. Each anchor needs only its `enough` nearest (the taken items
    # can fill no more places than that): those at least as similar as its enough-th, ranked by
    # similarity and then by index.
    similarity = aerial_bank[candidates] @ ground_bank[anchors].T
    enough = min(len(candidates), len(taken) + len(anchors) + 1)
    thresholds = torch.topk(similarity, enough, dim=0).values[-1]
    for column, threshold in enumerate(thresholds.tolist()):
        near = torch.nonzero(similarity[:, column] >= threshold).flatten()
        ranked = near[torch.sort(similarity[near, column], descending=True, stable=True).indices]
        for candidate in candidates[ranked].tolist():
            if candidate not in taken:
                chosen.append(candidate)
                taken.add(candidate)
                break
    return chosen


def epoch_batches(train_indices: np.ndarray, batch_size: int, seed: int, epoch: int):
    """Shuffled batches of one epoch (the last partial batch is dropped if smaller than 2)."""
    order = np.random.default_rng([seed, epoch]).permutation(train_indices)
    batches = [order[start: start + batch_size] for start in range(0, len(order), batch_size)]
    return [batch for batch in batches if len(batch) >= 2]


class _Trainer:
    def __init__(self, records, run_dir: Path, options: TrainOptions):
        self.options = options
        self.run_dir = run_dir
        self.device = resolve_device(options.device)
        torch.manual_seed(options.seed)  # the initial weights too must not depend on the process
        self.model = build_model(
            options.backbone, fov=options.fov, in_channels=options.in_channels,
            ground_width_rule=options.ground_width_rule,
            orientation_search=options.orientation_search,
            vertical_search=options.vertical_search, vgg_weights=options.vgg_weights,
            tiny_channels=options.tiny_channels, image_scale=options.image_scale,
            downsample=options.downsample)
        if options.init_from:
            self._initialise_from(options.init_from)
        for encoder in (self.model.ground_encoder, self.model.aerial_encoder):
            encoder.dropout.p = options.dropout
        self.model.to(self.device)
        self.records = records
        self.train_indices, self.validation_indices = split_validation(
            len(records), options.validation_size, options.seed)
        self.dataset = PairDataset(records, self.model.config, train=True, seed=options.seed,
                                   tile_offset_px=options.tile_offset_px,
                                   aerial_crop=options.aerial_crop,
                                   cache_bytes=int(options.cache_gb * 0.8e9),
                                   colour_jitter=options.colour_jitter)
        self.validation_dataset = PairDataset(records, self.model.config, train=False,
                                              seed=options.seed,
                                              aerial_crop=options.aerial_crop,
                                              cache_bytes=int(options.cache_gb * 0.2e9))
        # The moving average of the weights (and of batch norm's statistics) when asked for.
        self.averaged_model = None
        self.average_updates = 0
        self.prefetch_started = False
        if options.ema_decay > 0:
            self.averaged_model = copy.deepcopy(self.model).requires_grad_(False)
        parameters = [p for p in self.model.parameters() if p.requires_grad]
        self.optimizer = torch.optim.Adam(parameters, lr=options.learning_rate)
        self.epoch = 0
        self.best_loss = math.inf
        self.best_epoch = -1
        self.epochs_without_improvement = 0
        descriptor_size = (self.model.config["ground_feature_shape"][0]
                           * self.model.config["ground_feature_shape"][1])
        self.ground_bank = torch.zeros(len(records), descriptor_size)
        self.aerial_bank = torch.zeros(len(records), descriptor_size)
        self.seen = torch.zeros(len(records), dtype=torch.bool)

    # -- state -----------------------------------------------------------------------------
    def _initialise_from(self, path):
        document = read_checkpoint_document(path)
        state = read_state_dict(Path(path))
        own = self.model.state_dict()
        loaded = {k: v for k, v in state.items() if k in own and own[k].shape == v.shape}
        if not loaded:
            raise CvigInputError(f"{path}: no weights fit this model "
                                 f"(config {document['config']['backbone']})")
        self.model.load_state_dict(loaded, strict=False)
        LOGGER.info("initialised %d of %d tensors from %s", len(loaded), len(own), path)

    def save_state(self):
        optimizer_state = self.optimizer.state_dict()
        tensors = {}
        for parameter_id, moments in optimizer_state["state"].items():
            for key, value in moments.items():
                tensors[f"optimizer.{parameter_id}.{key}"] = value.detach().cpu().contiguous()
        tensors.update({"bank.ground": self.ground_bank, "bank.aerial": self.aerial_bank,
                        "bank.seen": self.seen.to(torch.uint8)})
        if self.averaged_model is not None:
            for name, value in self.averaged_model.state_dict().items():
                tensors[f"average.{name}"] = value.detach().cpu().contiguous()
        state_path = self.run_dir / "last_optimizer.safetensors"
        from safetensors.torch import save_file

        temporary = state_path.with_suffix(".tmp")
        save_file(tensors, str(temporary))
        temporary.replace(state_path)
        metadata = {"format": RUN_STATE_FORMAT, "epoch": self.epoch, "best_loss": self.best_loss,
                    "best_epoch": self.best_epoch,
                    "epochs_without_improvement": self.epochs_without_improvement,
                    "average_updates": self.average_updates,
                    "param_groups": optimizer_state["param_groups"],
                    "optimizer_sha256": file_sha256(state_path), "options": asdict(self.options)}
        # The model file goes last: its metadata names the optimiser file it belongs with.
        save_checkpoint(self.model, self.run_dir / "last.safetensors", metadata=metadata)

    def load_state(self) -> bool:
        last = self.run_dir / "last.safetensors"
        if not last.exists():
            return False
        document = read_checkpoint_document(last)
        metadata = document.get("metadata", {})
        if metadata.get("format") != RUN_STATE_FORMAT:
            raise CvigInputError(f"{last}: not a training state")
        # Options added since a run was saved count as their defaults.
        saved = _comparable({**asdict(TrainOptions()), **metadata["options"]})
        current = _comparable(asdict(self.options))
        changed = sorted(key for key in set(saved) | set(current)
                         if saved.get(key) != current.get(key))
        if changed:
            raise CvigInputError(f"{self.run_dir}: the run was started with different options "
                                 f"({', '.join(changed)}); use a new run directory")
        state_path = self.run_dir / "last_optimizer.safetensors"
        if file_sha256(state_path) != metadata["optimizer_sha256"]:
            raise CvigInputError(f"{state_path}: does not belong to {last} (hash mismatch)")
        self.model.load_state_dict(read_state_dict(last, map_location=self.device))
        tensors = read_state_dict(state_path, map_location=self.device)
        optimizer_state = {"state": {}, "param_groups": metadata["param_groups"]}
        for name, value in tensors.items():
            if name.startswith("optimizer."):
                _, parameter_id, key = name.split(".", 2)
                optimizer_state["state"].setdefault(int(parameter_id), {})[key] = value
        self.optimizer.load_state_dict(optimizer_state)
        self.ground_bank = tensors["bank.ground"].cpu()
        self.aerial_bank = tensors["bank.aerial"].cpu()
        self.seen = tensors["bank.seen"].cpu().bool()
        if self.averaged_model is not None:
            self.averaged_model.load_state_dict({name[len("average."):]: value
                                                 for name, value in tensors.items()
                                                 if name.startswith("average.")})
            self.average_updates = metadata["average_updates"]
        self.epoch = metadata["epoch"]
        self.best_loss = metadata["best_loss"]
        self.best_epoch = metadata["best_epoch"]
        self.epochs_without_improvement = metadata["epochs_without_improvement"]
        # Lines of an epoch that was logged but not saved (killed in between) are dropped: the
        # resumed run logs that epoch again.
        metrics = self.run_dir / "metrics.jsonl"
        if metrics.exists():
            lines = [line for line in metrics.read_text().splitlines()
                     if line.strip() and json.loads(line)["epoch"] <= self.epoch]
            atomic_write_text(metrics, "".join(line + "\n" for line in lines))
        LOGGER.info("resumed %s after epoch %d", self.run_dir, self.epoch)
        return True

    # -- steps -----------------------------------------------------------------------------
    def _batch(self, dataset, indices, epoch, ground_fovs=(None,)):
        """([ground views of each field of view], aerial inputs, [each view's compass headings])
        of the pairs ``indices``."""
        views = [[dataset.item(int(i), epoch=epoch, ground_fov=fov) for i in indices]
                 for fov in ground_fovs]
        grounds = [torch.stack([item["ground"] for item in items]).to(self.device)
                   for items in views]
        aerial = torch.stack([item["aerial"] for item in views[0]]).to(self.device)
        headings = [np.array([item["heading"] for item in items]) for items in views]
        return grounds, aerial, headings

    def _forward(self, grounds, aerial, model=None):
        """Features of the first ground views and the tiles, then of any further ground views."""
        model = model or self.model
        use_autocast = self.device.type == "cuda"
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=use_autocast):
            ground_features, aerial_features = model(grounds[0], aerial)
            extra = [model.ground_encoder(ground) for ground in grounds[1:]]
        return [ground_features.float(), aerial_features.float()] + [f.float() for f in extra]

    @staticmethod
    def _positives_at_heading(distance, ground_features, aerial_features, fov, heading):
        """``distance`` with its diagonal (the true pairs) taken at the known headings' shifts."""
        shift = torch.as_tensor(heading_to_shift(heading, fov, aerial_features.shape[-1]),
                                device=distance.device).reshape(-1)
        positive = distance_at_shift(ground_features, aerial_features, shift)
        return distance + torch.diag(positive - distance.diagonal())

    def _with_mining(self, batch):
        if not self.options.global_mining:
            return batch
        half = max(len(batch) // 2, 1)
        anchors = batch[:half]
        neighbours = mine_neighbours(anchors, self.ground_bank, self.aerial_bank, self.seen,
                                     exclude=anchors)
        chosen = set(neighbours) | set(anchors.tolist())
        rest = [i for i in batch[half:] if i not in chosen]
        return np.array(list(anchors) + neighbours + rest)[: len(batch)]

    def _set_learning_rate(self, step: int, steps_per_epoch: int) -> None:
        """The schedule's rate for batch ``step`` of the current epoch (a function of the two)."""
        rate = self.options.learning_rate
        if self.options.lr_schedule == "cosine":
            progress = ((self.epoch * steps_per_epoch + step)
                        / (self.options.epochs * steps_per_epoch))
            rate *= 0.5 * (1.0 + math.cos(math.pi * min(progress, 1.0)))
        for group in self.optimizer.param_groups:
            group["lr"] = rate

    @torch.no_grad()
    def _update_average(self):
        """One step of the weights' moving average: its decay ramps up from 0 (a copy) over the
        first updates, so the random initial weights do not linger in it."""
        if self.averaged_model is None:
            return
        updates = self.average_updates
        decay = min(self.options.ema_decay, updates / (10 + updates))
        averaged = self.averaged_model.state_dict()
        for name, value in self.model.state_dict().items():
            if value.is_floating_point():
                averaged[name].lerp_(value, 1.0 - decay)
            else:
                averaged[name].copy_(value)
        self.average_updates += 1

    @property
    def validated_model(self):
        """The model that validation measures and ``best.safetensors`` keeps."""
        return self.model if self.averaged_model is None else self.averaged_model

    def train_epoch(self, deadline):
        self.model.train()
        torch.manual_seed(self.options.seed * 100003 + self.epoch)
        batches = epoch_batches(self.train_indices, self.options.batch_size, self.options.seed,
                                self.epoch)
        from tqdm import tqdm

        progress = tqdm(batches, desc=f"epoch {self.epoch + 1}", unit="batch", disable=None,
                        leave=False)
        stop_prefetch = self._start_prefetch(batches)
        try:
            return self._run_batches(progress, batches, deadline)
        finally:
            stop_prefetch.set()

    def _start_prefetch(self, batches) -> threading.Event:
        """Decode this process's first epoch ahead of the steps, in a thread (both release the
        GIL in their heavy parts); later epochs read the cache. Returns the thread's stop flag."""
        stop = threading.Event()
        if self.prefetch_started or self.dataset.cache is None:
            return stop
        self.prefetch_started = True
        # Each batch's first half comes first: with global mining the rest are mostly replaced.
        half = [max(len(batch) // 2, 1) for batch in batches]
        order = ([int(i) for batch, h in zip(batches, half) for i in batch[:h]]
                 + [int(i) for batch, h in zip(batches, half) for i in batch[h:]])
        threading.Thread(target=self.dataset.prefetch, args=(order, self.epoch, stop),
                         daemon=True, name="cvig-prefetch").start()
        return stop

    def _run_batches(self, progress, batches, deadline):
        losses = []
        for step, batch in enumerate(progress):
            self._set_learning_rate(step, len(batches))
            batch = self._with_mining(batch)
            fovs = self.options.epoch_fovs(self.epoch)
            grounds, aerial, headings = self._batch(self.dataset, batch, self.epoch,
                                                    ground_fovs=fovs)
            ground_features, aerial_features, *extra_features = self._forward(grounds, aerial)
            loss = 0.0
            for features, fov, heading in zip([ground_features] + extra_features, fovs,
                                              headings):
                distance, _ = orientation_distance(features, aerial_features)
                if self.options.supervise_heading:
                    distance = self._positives_at_heading(distance, features, aerial_features,
                                                          fov, heading)
                loss = loss + triplet_loss(distance, alpha=self.options.alpha)
            loss = loss / (1 + len(extra_features))
            self.optimizer.zero_grad(set_to_none=True)
            loss.backward()
            self.optimizer.step()
            self._update_average()
            losses.append(loss.item())
            with torch.no_grad():
                index = torch.as_tensor(batch)
                self.ground_bank[index] = mining_descriptors(ground_features.detach()).cpu()
                self.aerial_bank[index] = mining_descriptors(aerial_features.detach()).cpu()
                self.seen[index] = True
            progress.set_postfix(loss=f"{loss.item():.4f}")
            if deadline is not None and time.monotonic() > deadline:
                break
        return float(np.mean(losses)) if losses else math.nan

    @torch.no_grad()
    def validate(self):
        """Validation loss (mean triplet loss over fixed batches) and top-1 % over the hold-out."""
        model = self.validated_model
        model.eval()
        ground_features, aerial_features = [], []
        indices = self.validation_indices
        step = max(self.options.batch_size, 32)
        for start in range(0, len(indices), step):
            grounds, aerial, _ = self._batch(self.validation_dataset,
                                             indices[start: start + step], 0)
            g, a = self._forward(grounds, aerial, model)
            ground_features.append(g.cpu())
            aerial_features.append(a.cpu())
        ground_features = torch.cat(ground_features)
        aerial_features = torch.cat(aerial_features)
        losses = []
        for start in range(0, len(indices) - 1, self.options.batch_size):
            stop = min(start + self.options.batch_size, len(indices))
            if stop - start < 2:
                continue
            distance, _ = orientation_distance(ground_features[start:stop],
                                               aerial_features[start:stop])
            losses.append(triplet_loss(distance, alpha=self.options.alpha).item())
        ranks = []
        for start in range(0, len(indices), 256):
            distance, _ = orientation_distance(ground_features[start:start + 256], aerial_features)
            true = distance[torch.arange(len(distance)), torch.arange(start, start + len(distance))]
            ranks.append((distance <= true[:, None]).sum(dim=1))
        ranks = torch.cat(ranks).numpy()
        top1_percent = float(np.mean(ranks * 100 <= len(indices)) * 100)
        return float(np.mean(losses)), top1_percent, float(np.mean(ranks == 1) * 100)


def train(data_csv, run_dir, options: TrainOptions | None = None, *, cities=None,
          exclude_cities=None, progress_callback=None) -> dict:
    """Train a model on a dataset CSV (WITW or CVUSA layout) into ``run_dir``; resume if possible.

    Returns a summary dict (epochs run, best validation loss and top-1 %, stop reason).
    """
    options = options or TrainOptions()
    options.validate()
    run_dir = Path(run_dir)
    records = read_dataset(data_csv)
    if cities:
        records = [r for r in records if r.city in set(cities)]
    if exclude_cities:
        records = [r for r in records if r.city not in set(exclude_cities)]
    if not records:
        raise CvigInputError(f"{data_csv}: no pairs left after the city filter")
    if options.cuts_panoramas():
        narrow = next((r for r in records if not r.is_panorama), None)
        if narrow is not None:
            raise CvigInputError(f"{narrow.where()}: --warmup-epochs / --extra-fov cut other "
                                 f"views out of 360 deg panoramas, but this photo covers "
                                 f"{narrow.fov:g} deg")
    if options.supervise_heading:
        unknown = next((r for r in records if not math.isfinite(r.heading)), None)
        if unknown is not None:
            raise CvigInputError(f"{unknown.where()}: --supervise-heading needs every photo's "
                                 "heading, and this row has none")
    records, bad = check_images(records, skip_bad=options.skip_bad)
    run_dir.mkdir(parents=True, exist_ok=True)
    if bad:
        with open(run_dir / "skipped.jsonl", "a") as handle:
            for record, reason in bad:
                handle.write(json.dumps({"csv": str(record.csv_path), "row": record.row,
                                         "reason": reason}) + "\n")
        LOGGER.warning("skipped %d bad pairs (listed in %s)", len(bad), run_dir / "skipped.jsonl")
    trainer = _Trainer(records, run_dir, options)
    resumed = trainer.load_state()
    if not resumed and (run_dir / "metrics.jsonl").exists():
        (run_dir / "metrics.jsonl").unlink()  # logged by a run killed before its first saved state
    start = time.monotonic()
    deadline = start + options.max_minutes * 60 if options.max_minutes else None
    stop_reason = "epochs"
    metrics_path = run_dir / "metrics.jsonl"
    while trainer.epoch < options.epochs:
        if trainer.epochs_without_improvement >= options.patience:
            stop_reason = "early stopping"
            break
        epoch_start = time.monotonic()
        ground_fov = options.epoch_fov(trainer.epoch)
        train_loss = trainer.train_epoch(deadline)
        validation_loss, top1_percent, top1 = trainer.validate()
        trainer.epoch += 1
        improved = validation_loss < trainer.best_loss - options.min_delta
        if improved:
            trainer.best_loss, trainer.best_epoch = validation_loss, trainer.epoch
            trainer.epochs_without_improvement = 0
            save_checkpoint(trainer.validated_model, run_dir / "best.safetensors", metadata={
                "epoch": trainer.epoch, "validation_loss": validation_loss,
                "validation_top1_percent": top1_percent, "train_options": asdict(options),
                "train_csv": str(data_csv)})
        else:
            trainer.epochs_without_improvement += 1
        record = {"epoch": trainer.epoch, "ground_fov": ground_fov, "train_loss": train_loss,
                  "validation_loss": validation_loss,
                  "validation_top1pct": top1_percent, "validation_top1": top1, "improved": improved,
                  "seconds": time.monotonic() - epoch_start}
        with open(metrics_path, "a") as handle:
            handle.write(json.dumps(record) + "\n")
        _tensorboard(run_dir, record)
        LOGGER.info("epoch %d: train loss %.4f, validation loss %.4f, top-1%% %.1f%%",
                    trainer.epoch, train_loss, validation_loss, top1_percent)
        if progress_callback:
            progress_callback(record)
        trainer.save_state()
        if deadline is not None and time.monotonic() > deadline:
            stop_reason = "time limit"
            break
    else:
        stop_reason = "epochs"
    return {"run_dir": str(run_dir), "epochs": trainer.epoch, "best_epoch": trainer.best_epoch,
            "best_validation_loss": trainer.best_loss, "stop_reason": stop_reason,
            "resumed": resumed, "train_pairs": len(trainer.train_indices),
            "validation_pairs": len(trainer.validation_indices),
            "skipped": len(bad), "device": str(trainer.device)}


def _comparable(options: dict) -> dict:
    return {k: v for k, v in options.items() if k not in _RESUMABLE_CHANGES}


def _tensorboard(run_dir: Path, record: dict) -> None:
    """Mirror the metrics to TensorBoard when it is installed (optional)."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        return
    with SummaryWriter(str(run_dir / "tensorboard")) as writer:
        for key, value in record.items():
            if isinstance(value, float):
                writer.add_scalar(key, value, record["epoch"])
