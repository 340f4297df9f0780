"""Training: configuration, the loop, the divergence and drift guards, validation and epoch selection, resume.

What lives here: :class:`TrainConfig`, :class:`Trainer` (one guarded step at a time or :meth:`Trainer.fit`),
checkpoint and resume-state writing. What does not: the loss of a batch (:mod:`jem_core.losses`: the JEM
objective of Grathwohl et al. 2019, eq. 8-9, and the cross-entropy baseline), SGLD and the replay buffer
(:mod:`jem_core.sampling`), torch.distributed plumbing (:mod:`jem_core.distributed`), the checkpoint format
(:mod:`jem_core.checkpoint`), schedules (:mod:`jem_core.schedules`) and drift detection (:mod:`jem_core.drift`).

The samples of the p(x) term come from SGLD chains continued from a persistent replay buffer (PCD) with
``reinit_freq`` restarts from noise; when the chains are clamped to ``[-1, 1]``, so is the noisy data
(else the energy learns to reward pixels outside the range no sample can reach).
``baseline`` is CE only, same architecture. Semi-supervised (``labels_per_class``): CE sees the labelled subset only; the p(x) term sees all
images (the paper's "train on unlabelled data" claim). Both objectives run the same number of
iterations per epoch (one pass of the full training set), so they see the same number of updates.

The divergence guard: after every iteration, a non-finite loss, gradient or energy, an energy
magnitude above ``divergence_threshold``, or SGLD samples that are non-finite or beyond
``SAMPLE_ABS_LIMIT`` (data lie in [-1, 1]) count as divergence; the trainer rolls back to the last
good snapshot (model, optimizer, buffer), multiplies the learning rate by ``lr_backoff`` and goes
on. After ``max_retries`` recoveries it stops with :class:`TrainingDiverged`; the checkpoints on
disk are only ever written from healthy states.

Schedules (:mod:`jem_core.schedules`): ``px_weight_schedule`` and ``energy_l2_schedule`` change those
weights by epoch inside one run (one replay buffer, one optimizer state), ``lr_schedule`` shapes the
learning rate (step, cosine, constant; with warm-up). Named recipes: :mod:`jem_core.recipes`.

Validation (``val_split`` > 0): the last ``val_split`` training images are held out; every epoch reports
their accuracy, NLL and ECE, and (JEM) the quality of replay-buffer samples judged by a separate
classifier (``judge``): the classifier-feature Fréchet distance to validation images and the judge's
agreement with the model's own labels. The checkpoint ``out`` holds the epoch chosen on validation; the
test split is touched once, for the final report of that epoch.

Slow drift (``drift_guard``): :class:`jem_core.drift.DriftMonitor` watches windowed trends of
``E(data) - E(samples)``, ``E(data)``, logit magnitudes and gradient norms, and at every epoch's end the
buffer samples' quality on the validation judge (Fréchet distance, judge agreement; signal ``"samples"``,
rolled back to the end of the last healthy epoch); on a drift the trainer rolls
back to a snapshot taken before the drift began, lowers the learning rate, raises the energy penalty
(energy and gap drifts; for a gap also the p(x) weight, when it is below 1) or lowers the
p(x) weight (logit/gradient growth), and refreshes the replay buffer when the same drift comes back;
every event is logged and stored in the checkpoint.
"""

from __future__ import annotations

import collections
import copy
import dataclasses
import math
import os
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import nn

from .checkpoint import CheckpointError, load_checkpoint, read_checkpoint, save_checkpoint
from .data import ImageDataset, augment, labelled_subset, load_dataset
from .distributed import (any_rank, dist_info, evaluate_over_ranks, gather_rank_states, mean_over_ranks,
                          reshard_buffer, unused_parameters)
from .drift import DriftMonitor, DriftSignal
from .energy import JEM, log_px_unnormalized
from .errors import BadInput
from .losses import baseline_loss, jem_loss
from .models import build_model, count_parameters
from .sampling import ClassGaussians, ReplayBuffer, SGLDSampler, frozen_parameters
from .schedules import LR_SCHEDULES, lr_factor, parse_schedule, schedule_value
from .utils import select_device

__all__ = ["TrainConfig", "Trainer", "TrainingDiverged", "EpochMetrics", "reference_statistics",
           "evaluate_classifier", "resume_path", "select_device", "split_validation", "resolve_judge"]


class TrainingDiverged(RuntimeError):
    """Training diverged more often than the guard's retry limit allows."""


#: The divergence guard's bound on SGLD samples: data lie in [-1, 1], so a sample with a pixel beyond
#: +-SAMPLE_ABS_LIMIT (or a non-finite one) means the sampler exploded (e.g. a far too large step size
#: without clamping), even while the energies still look finite.
SAMPLE_ABS_LIMIT = 100.0

#: Buffer samples' classifier Fréchet distance: an epoch stays eligible for the kept checkpoint while its
#: distance is at most 2x, or at most this much more than, the best earlier one; it counts as samples
#: breaking up (a drift) only above both 3x and SAMPLE_FD_DRIFT more than the best. Near the floor of the
#: distance (0.045 between two halves of the MNIST test split) a ratio alone flags noise: 0.036 -> 0.12 with
#: the judge agreeing on 99.8% of the samples is not a break-up; broken runs of this project read 0.25-0.28
#: with 11-22% agreement.
SAMPLE_FD_MARGIN = 0.1
SAMPLE_FD_DRIFT = 0.15


@dataclass
class TrainConfig:
    """Training settings; defaults train a digits JEM in about a minute on 2 CPU cores.

    Units: learning rates per step; ``sgld_step_size`` and ``sgld_noise`` in ``[-1, 1]`` pixel
    units; ``data_noise`` the std of Gaussian noise added to data (JEM uses 0.03).
    """

    dataset: str = "digits"
    objective: str = "jem"              # "jem" or "baseline"
    epochs: int = 20
    batch_size: int = 64
    lr: float = 1e-3
    optimizer: str = "adam"             # "adam" or "sgd"
    momentum: float = 0.9
    weight_decay: float = 0.0
    warmup_iters: int = 100
    decay_epochs: list[int] = field(default_factory=list)
    decay_rate: float = 0.3
    arch: str = "auto"                  # "auto" -> mlp for 2-D points, convnet for 1-channel data, wrn for 3x32x32
    width: int = 32                     # convnet width
    mlp_hidden: int = 128               # mlp hidden units (two hidden layers)
    depth: int = 28                     # wrn depth
    widen_factor: int = 2               # wrn width
    norm: str | None = None
    px_weight: float = 1.0
    pxy_weight: float = 0.0
    energy_l2: float = 0.0
    sgld_steps: int = 20
    sgld_step_size: float = 1.0
    sgld_noise: float = 0.01
    exact_langevin: bool = False
    sgld_clamp: bool = True
    sgld_max_update: float | None = None
    sgld_bf16: bool = False             # SGLD gradients under bf16 autocast (faster on bf16 CPUs/GPUs)
    sgld_init: str = "uniform"          # chain (re)starts: "uniform" U[-1, 1] (JEM) or "gaussian" (JEM++ class Gaussians)
    channels_last: bool = False         # weights in channels_last layout (faster oneDNN convolutions on CPUs)
    buffer_size: int = 10000
    reinit_freq: float = 0.05
    data_noise: float = 0.03
    crop_padding: int = -1              # -1 = auto (4 for 32x32 data, else 0)
    flip: bool | None = None            # None = auto (on for cifar, off otherwise)
    labels_per_class: int | None = None
    seed: int = 0
    divergence_threshold: float = 1e4
    max_retries: int = 5
    lr_backoff: float = 0.5
    guard_every: int = 50
    keep_buffer: int = 400
    n_reference: int = 2000
    data_root: str | None = None
    device: str | None = None
    init_from: str | None = None        # warm start from a checkpoint's weights
    max_iters_per_epoch: int | None = None  # for smoke runs
    recipe: str | None = None           # the named recipe these settings came from (jem_core.recipes)
    px_weight_schedule: str = ""        # "EPOCH:VALUE,..." piecewise-constant p(x) weight ("" = px_weight throughout)
    energy_l2_schedule: str = ""        # "EPOCH:VALUE,..." piecewise-constant energy L2 penalty ("" = energy_l2)
    lr_schedule: str = "step"           # "step" (decay_epochs, decay_rate), "cosine" or "constant"; after warm-up
    lr_floor: float = 0.0               # the cosine schedule's final factor of lr
    val_split: int = 0                  # hold out the last N training images for validation (0 = none)
    sample_eval: int = 0                # replay-buffer samples judged per epoch (needs val_split; 0 = off)
    judge: str | None = None            # classifier checkpoint judging buffer samples ("bundled:NAME" = checkpoints/NAME)
    ais_temps: int = 0                  # per-epoch AIS estimate of the validation log p(x) with this many temperatures (0 = off)
    ais_chains: int = 16                # its AIS chains
    drift_guard: bool = False           # watch for slow drift and roll back before it (jem_core.drift; single process only)
    drift_gap_limit: float = 5.0        # |E(data) - E(samples)| limit (nats, window mean)
    drift_energy_shift: float = 25.0    # limit on E(data)'s move from its level (nats, window mean)
    drift_growth: float = 4.0           # limit factor on logit magnitude and gradient norm growth
    drift_sustain: int = 4              # suspect windows in a row that count as a drift
    max_drift_events: int = 6           # after this many drift rescues training stops (the chosen epoch is kept)

    def validate(self) -> None:
        """Check every setting.

        Raises:
            BadInput: naming the first bad setting (its range and the value given).
        """
        checks = [
            (self.objective in ("jem", "baseline"), f"objective must be 'jem' or 'baseline'; got {self.objective!r}"),
            (self.epochs >= 1, f"epochs must be >= 1; got {self.epochs}"),
            (self.batch_size >= 2, f"batch size must be >= 2; got {self.batch_size}"),
            (self.lr > 0 and math.isfinite(self.lr), f"learning rate must be > 0; got {self.lr}"),
            (self.optimizer in ("adam", "sgd"), f"optimizer must be 'adam' or 'sgd'; got {self.optimizer!r}"),
            (self.warmup_iters >= 0, f"warm-up iterations must be >= 0; got {self.warmup_iters}"),
            (self.sgld_steps >= 0, f"SGLD steps must be >= 0; got {self.sgld_steps}"),
            (self.sgld_step_size > 0, f"SGLD step size must be > 0; got {self.sgld_step_size}"),
            (self.sgld_noise >= 0, f"SGLD noise std must be >= 0; got {self.sgld_noise}"),
            (self.buffer_size >= 1, f"buffer size must be >= 1; got {self.buffer_size}"),
            (0 <= self.reinit_freq <= 1, f"reinit frequency must lie in [0, 1]; got {self.reinit_freq}"),
            (self.data_noise >= 0, f"data noise must be >= 0; got {self.data_noise}"),
            (self.labels_per_class is None or self.labels_per_class >= 1,
             f"labels per class must be >= 1; got {self.labels_per_class}"),
            (self.max_retries >= 0, f"max retries must be >= 0; got {self.max_retries}"),
            (0 < self.lr_backoff < 1, f"lr backoff must lie in (0, 1); got {self.lr_backoff}"),
            (self.energy_l2 >= 0, f"energy L2 penalty must be >= 0; got {self.energy_l2}"),
            (self.sgld_init in ("uniform", "gaussian"), f"SGLD init must be 'uniform' or 'gaussian'; got {self.sgld_init!r}"),
            (self.mlp_hidden >= 1, f"mlp hidden units must be >= 1; got {self.mlp_hidden}"),
            (self.lr_schedule in LR_SCHEDULES, f"lr schedule must be one of {', '.join(LR_SCHEDULES)}; got {self.lr_schedule!r}"),
            (0 <= self.lr_floor <= 1, f"lr floor must lie in [0, 1]; got {self.lr_floor}"),
            (self.val_split >= 0, f"validation split must be >= 0 images; got {self.val_split}"),
            (self.sample_eval >= 0, f"sample evaluation size must be >= 0; got {self.sample_eval}"),
            (self.ais_temps >= 0 and self.ais_chains >= 2,
             f"AIS temperatures must be >= 0 and AIS chains >= 2; got {self.ais_temps}, {self.ais_chains}"),
            (self.drift_gap_limit > 0, f"drift gap limit must be > 0; got {self.drift_gap_limit}"),
            (self.drift_energy_shift > 0, f"drift energy shift must be > 0; got {self.drift_energy_shift}"),
            (self.drift_growth > 1, f"drift growth must be > 1; got {self.drift_growth}"),
            (self.drift_sustain >= 2, f"drift sustain must be >= 2 windows; got {self.drift_sustain}"),
            (self.max_drift_events >= 0, f"max drift events must be >= 0; got {self.max_drift_events}"),
        ]
        for ok, msg in checks:
            if not ok:
                raise BadInput(msg)
        for name in ("px_weight_schedule", "energy_l2_schedule"):
            try:
                parse_schedule(getattr(self, name))
            except BadInput as e:
                raise BadInput(f"{name.replace('_', ' ')}: {e}") from None


@dataclass
class EpochMetrics:
    """What one epoch measured (averages over its iterations unless said otherwise)."""

    epoch: int
    iterations: int
    loss: float
    ce: float
    px: float                 # mean E(data) - mean E(samples) (the p(x) term before weighting)
    energy_data: float
    energy_samples: float
    train_accuracy: float     # on the labelled training batches
    test_accuracy: float      # on the test split
    test_nll: float
    lr: float
    seconds: float
    divergence_events: int
    val_accuracy: float = float("nan")    # on the validation split (NaN without one)
    val_nll: float = float("nan")         # nats per image
    val_ece: float = float("nan")         # 15 equal-width bins, l1, in [0, 1]
    sample_fd: float = float("nan")       # judge-feature Frechet distance, buffer samples vs validation images
    sample_agreement: float = float("nan")  # fraction of buffer samples the judge labels as the model does
    px_weight: float = float("nan")       # the p(x) weight in force at the epoch's end (after drift responses)
    energy_l2: float = float("nan")       # the energy penalty in force at the epoch's end
    drift_events: int = 0                 # drift rescues during the epoch
    grad_norm: float = float("nan")       # mean total gradient norm
    logit_absmax: float = float("nan")    # mean over iterations of the batch's max |logit|
    val_log_px: float = float("nan")      # mean validation log p(x), nats per image (small-budget forward AIS)
    val_log_z_se: float = float("nan")    # bootstrap SE of that run's log Z (nats)


def resume_path(out: str | os.PathLike) -> Path:
    """Where the full resume state of a run writing ``out`` lives: ``out`` + ``.resume.pt``."""
    return Path(str(out) + ".resume.pt")


def split_validation(train: ImageDataset, n_val: int, batch_size: int = 2) -> tuple[ImageDataset, ImageDataset]:
    """Hold out the last ``n_val`` training images: ``(train without them, validation set)``.

    The split is fixed (no shuffling), as the official JEM code's ``n_valid`` holds out a fixed part of
    the training data; for MNIST ``n_val = 5000`` keeps images 55,000-59,999.

    Raises:
        BadInput: ``n_val`` leaves fewer than ``batch_size`` training images, or is < 1.
    """
    n = len(train)
    if n_val < 1 or n - n_val < max(2, batch_size):
        raise BadInput(f"validation split of {n_val} images leaves {n - n_val} of {n} training images "
                         f"(need at least one batch of {batch_size})")
    keep = n - n_val
    tr = ImageDataset(train.x[:keep], train.y[:keep], train.n_classes, train.name, train.split, train.class_names, train.note)
    va = ImageDataset(train.x[keep:], train.y[keep:], train.n_classes, train.name, "validation", train.class_names,
                      f"the last {n_val} images of the training split")
    return tr, va


def resolve_judge(spec: str) -> Path | None:
    """The checkpoint file a ``judge`` setting names: ``"bundled:NAME"`` is ``NAME`` in the project's
    ``checkpoints`` folder; anything else a path. Returns None when the file does not exist."""
    if spec.startswith("bundled:"):
        p = Path(__file__).resolve().parents[1] / "checkpoints" / spec.split(":", 1)[1]
    else:
        p = Path(spec)
    return p if p.is_file() else None


@torch.inference_mode()
def evaluate_classifier(model: nn.Module, x: torch.Tensor, y: torch.Tensor, batch_size: int = 500,
                        device: torch.device | str = "cpu") -> dict[str, float]:
    """Accuracy and NLL (nats) of ``model`` on ``x`` ``[N, C, H, W]``, ``y`` ``[N]``."""
    was = model.training
    model.eval()
    correct, nll = 0, 0.0
    for i in range(0, len(x), batch_size):
        xb, yb = x[i:i + batch_size].to(device), y[i:i + batch_size].to(device)
        logits = model(xb).float()
        correct += int((logits.argmax(1) == yb).sum())
        nll += float(F.cross_entropy(logits, yb, reduction="sum"))
    model.train(was)
    n = max(1, len(x))
    return {"accuracy": correct / n, "nll": nll / n}


@torch.inference_mode()
def reference_statistics(model: nn.Module, x: torch.Tensor, batch_size: int = 500,
                         device: torch.device | str = "cpu") -> dict[str, Any]:
    """Quantiles of the unnormalised ``log p(x)`` on in-distribution images, for offline scoring.

    Returns ``{"logpx_quantiles": [101 floats] (0th..100th percentile), "n": N}``; a new image's
    ``log p(x)`` percentile is found by interpolating in this table
    (:func:`jem_core.scoring.logpx_percentile`).
    """
    was = model.training
    model.eval()
    vals = torch.cat([log_px_unnormalized(model(x[i:i + batch_size].to(device)).float()).cpu()
                      for i in range(0, len(x), batch_size)])
    model.train(was)
    q = torch.quantile(vals.double(), torch.linspace(0, 1, 101, dtype=torch.float64))
    return {"logpx_quantiles": [float(v) for v in q], "n": int(len(vals))}


class Trainer:
    """Trains a JEM or baseline classifier; call :meth:`fit`.

    Args:
        config: :class:`TrainConfig`.
        out: checkpoint path written after every epoch (atomically; with a validation split only after
            an epoch chosen on validation, and once more with the final test report); the resume state
            goes to :func:`resume_path` ``(out)`` after every epoch. None = write nothing.
        train_set, test_set: optional preloaded datasets (else loaded from ``config.dataset``); with
            ``config.val_split`` the last images of ``train_set`` become :attr:`val_set`.
        on_iteration: called with a dict (iteration, loss terms, lr) after every iteration.
        on_epoch: called with :class:`EpochMetrics` after every epoch.
        on_epoch_start: called with ``(epoch index, iterations planned)`` before every epoch (progress bars).
        log: called with human-readable lines (divergence events, checkpoints).

    Raises:
        BadInput: bad config (or a bad dataset spec, device, validation split, ``init_from`` checkpoint:
        :class:`~jem_core.checkpoint.CheckpointError`); :class:`~jem_core.data.DataUnavailableError`: data missing.
    """

    def __init__(self, config: TrainConfig, out: str | os.PathLike | None = None,
                 train_set: ImageDataset | None = None, test_set: ImageDataset | None = None,
                 on_iteration: Callable[[dict], None] | None = None,
                 on_epoch: Callable[[EpochMetrics], None] | None = None,
                 on_epoch_start: Callable[[int, int], None] | None = None,
                 log: Callable[[str], None] | None = None):
        config.validate()
        self.cfg = config
        self.out = Path(out) if out else None
        self.on_iteration, self.on_epoch, self.on_epoch_start = on_iteration, on_epoch, on_epoch_start
        self.log = log or (lambda s: None)
        self._stop = threading.Event()
        self.device = select_device(config.device)
        self.rank, self.world_size = dist_info()
        torch.manual_seed(config.seed + self.rank)
        self.gen = torch.Generator().manual_seed(config.seed + 1000 * self.rank)
        self.train_set = train_set or load_dataset(config.dataset, "train", config.data_root)
        self.test_set = test_set or load_dataset(config.dataset, "test", config.data_root)
        self.val_set: ImageDataset | None = None
        if config.val_split:
            self.train_set, self.val_set = split_validation(self.train_set, config.val_split, config.batch_size)
        c, h, _ = self.train_set.shape
        k = self.train_set.n_classes
        arch = config.arch if config.arch != "auto" else ("mlp" if h == 1 else "wrn" if c == 3 and h == 32 else "convnet")
        arch_kwargs = ({"width": config.width, "norm": config.norm, "image_size": h} if arch == "convnet" else
                       {"hidden": config.mlp_hidden, "depth": 2, "image_size": h} if arch == "mlp" else
                       {"depth": config.depth, "widen_factor": config.widen_factor, "norm": config.norm})
        self.arch, self.arch_kwargs = arch, arch_kwargs
        backbone = build_model(arch, c, k, arch_kwargs)
        if config.init_from:
            src = load_checkpoint(config.init_from)
            backbone.load_state_dict(src.model.f.state_dict())
            self.log(f"initialised weights from {config.init_from}")
        self.model = JEM(backbone).to(self.device,
                                      memory_format=torch.channels_last if config.channels_last else torch.preserve_format)
        self.ddp_model: nn.Module = self.model
        if self.world_size > 1:
            # DDP broadcasts rank 0's weights here, so the per-rank seeds above do not matter for them.
            # The WRN's f.linear / energy_output exist for key compatibility only and get no gradient:
            # DDP must be told, or it fails on the second iteration.
            unused = unused_parameters(self.model, (c, h, h), self.device)
            if unused:
                self.log(f"DDP: {len(unused)} parameters never reach the loss ({', '.join(unused[:4])}"
                         f"{' ...' if len(unused) > 4 else ''}); find_unused_parameters=True")
            self.ddp_model = nn.parallel.DistributedDataParallel(
                self.model, device_ids=[self.device.index] if self.device.type == "cuda" else None,
                find_unused_parameters=bool(unused))
        self._agreed_stop = False
        self.optimizer = self._make_optimizer()
        self.labelled = (labelled_subset(self.train_set.y, config.labels_per_class, k, seed=config.seed)
                         if config.labels_per_class else None)
        self.crop = config.crop_padding if config.crop_padding >= 0 else (4 if h == 32 else 0)
        self.flip = config.flip if config.flip is not None else config.dataset.startswith("cifar")
        if config.objective == "jem":
            per_rank = max(1, config.buffer_size // self.world_size)
            init = None
            if config.sgld_init == "gaussian":  # fitted to the labelled images only (semi-supervised)
                lab = self.labelled if self.labelled is not None else slice(None)
                init = ClassGaussians.fit(self.train_set.x[lab], self.train_set.y[lab], k)
            self.buffer: ReplayBuffer | None = ReplayBuffer(
                per_rank, (c, h, h), config.reinit_freq, n_classes=k if config.pxy_weight > 0 else None,
                generator=torch.Generator(self.device).manual_seed(config.seed + 7 + self.rank), device=self.device,
                init=init)
            self.sampler: SGLDSampler | None = SGLDSampler(
                self.model, config.sgld_step_size, config.sgld_noise, config.exact_langevin, config.sgld_clamp,
                config.sgld_max_update, generator=torch.Generator(self.device).manual_seed(config.seed + 11 + self.rank),
                bf16=config.sgld_bf16)
        else:
            self.buffer, self.sampler = None, None
        self._has_train_mode_layers = any(isinstance(m, (nn.BatchNorm2d, nn.Dropout)) for m in self.model.modules())
        self.epoch, self.iteration, self.retries = 0, 0, 0
        self.lr_scale = 1.0
        self.history: list[EpochMetrics] = []
        self.events: list[dict] = []
        self._snapshot: dict | None = None
        self.progress = 0.0                 # epochs done, fractional (drives the schedules)
        self._px_sched = parse_schedule(config.px_weight_schedule)
        self._l2_sched = parse_schedule(config.energy_l2_schedule)
        self.px_scale = 1.0                 # drift responses multiply the scheduled p(x) weight by this
        self.l2_floor = 0.0                 # drift responses raise the energy penalty to at least this
        self.drift_count = 0
        self._drift_stop = False
        self._snapshots: collections.deque = collections.deque(maxlen=config.drift_sustain + 4)
        self._epoch_good: dict | None = None  # state at the end of the last epoch whose samples were healthy
        self.monitor: DriftMonitor | None = None
        if config.drift_guard and config.objective == "jem":
            self.monitor = DriftMonitor(window=config.guard_every, gap_limit=config.drift_gap_limit,
                                        energy_shift=config.drift_energy_shift, growth=config.drift_growth,
                                        sustain=config.drift_sustain, start_iter=config.warmup_iters)
        self.judge: nn.Module | None = None
        self.judge_name = None
        if config.judge and self.val_set is not None and config.sample_eval and config.objective == "jem":
            jp = resolve_judge(config.judge)
            if jp is None:
                self.log(f"judge {config.judge} not found; buffer samples are judged by the model itself "
                         "(weak: the agreement is then not reported)")
            else:
                self.judge = load_checkpoint(jp, device=self.device).model.eval()
                self.judge_name = config.judge  # as given ("bundled:NAME" or a path), not this machine's path
        self.best: dict | None = None       # the epoch chosen on validation: {"epoch", "score", "model", "buffer"}
        self.final: dict | None = None      # the chosen epoch's test report (written when fit ends)

    # -- helpers -------------------------------------------------------------------------------
    def _make_optimizer(self) -> torch.optim.Optimizer:
        c = self.cfg
        if c.optimizer == "adam":
            return torch.optim.Adam(self.model.parameters(), lr=c.lr, betas=(0.9, 0.999), weight_decay=c.weight_decay)
        return torch.optim.SGD(self.model.parameters(), lr=c.lr, momentum=c.momentum, weight_decay=c.weight_decay)

    def current_lr(self) -> float:
        """Learning rate for the current iteration (per step, > 0): ``lr`` x the schedule's factor
        (:func:`jem_core.schedules.lr_factor`: warm-up, then step, cosine or constant) x the back-off of
        divergence and drift responses."""
        c = self.cfg
        progress = max(self.progress, float(self.epoch))
        return c.lr * self.lr_scale * lr_factor(c.lr_schedule, progress, c.epochs, self.iteration, c.warmup_iters,
                                                c.decay_epochs, c.decay_rate, c.lr_floor)

    def current_px_weight(self) -> float:
        """The p(x) weight now: the schedule's value (or ``px_weight``) times the drift responses' scale."""
        return schedule_value(self._px_sched, max(self.progress, float(self.epoch)), self.cfg.px_weight) * self.px_scale

    def current_energy_l2(self) -> float:
        """The energy L2 penalty now: the schedule's value (or ``energy_l2``), at least the drift responses' floor."""
        return max(schedule_value(self._l2_sched, max(self.progress, float(self.epoch)), self.cfg.energy_l2),
                   self.l2_floor)

    def request_stop(self) -> None:
        """Ask :meth:`fit` to stop after the current iteration (thread-safe)."""
        self._stop.set()

    @property
    def stopped(self) -> bool:
        """True once a stop was requested."""
        return self._stop.is_set()

    def _halting(self) -> bool:
        # Under DDP a stop request counts only once all ranks agreed on it after an iteration
        # (a rank leaving alone would leave the others waiting in a collective).
        return self._agreed_stop if self.world_size > 1 else self.stopped

    def _take_snapshot(self) -> None:
        self._snapshot = {
            "model": copy.deepcopy(self.model.state_dict()),
            "optimizer": copy.deepcopy(self.optimizer.state_dict()),
            "buffer": None if self.buffer is None else self.buffer.buffer.clone(),
            "iteration": self.iteration,
        }
        if self.monitor is not None:
            if self._snapshots and self._snapshots[-1]["iteration"] == self.iteration:
                self._snapshots.pop()
            self._snapshots.append(self._snapshot)

    def _restore(self, snap: dict) -> None:
        self.model.load_state_dict(snap["model"])
        self.optimizer.load_state_dict(snap["optimizer"])
        if self.buffer is not None and snap["buffer"] is not None:
            self.buffer.buffer.copy_(snap["buffer"])

    def _drift_rescue(self, sig: DriftSignal) -> None:
        """Respond to a drift: roll back to the last snapshot taken at or before ``sig.began_at``, then by
        the drift's kind:

        - samples *above* the data's energy (gap ``E(data) - E(samples)`` below ``-drift_gap_limit``, or a
          growing negative gap): the contrastive term pushes the data down and the samples up faster than the
          chains follow; the energy penalty ``l2 * (E(data)^2 + E(samples)^2)`` against the term
          ``px_weight * (E(data) - E(samples))`` holds the energies at most at ``-+px_weight / (2 l2)``, the gap
          at ``-px_weight / l2``, so the penalty is raised fourfold (at least to 1e-3) until the gap holds
          (a held gap past half its limit is not a drift; a jump of the penalty from 5e-4 to 0.04 at once
          made the gradient norm 10x its level in this project's MNIST runs); the
          learning rate and the p(x) weight are kept (cross-entropy learns on at full rate; a weaker p(x)
          term let the samples' FD climb from 0.04 to 0.18 in this project's MNIST runs) and the buffer is
          never refreshed (fresh clipped JEM++ chains sat further still above the data's energy: a refresh
          turned a gap of -9 into -73 and -153; 40 SGLD steps instead of 10 did not stop the gap growing);
        - every other drift: the learning rate is lowered by ``lr_backoff``; for a positive gap, an energy
          or a samples drift the energy penalty is raised as above and, under a p(x) weight below 1, the
          weight doubled (at most to 1: the samples run below the data under a weak contrastive term in
          this project's digits runs); for logit or gradient growth the p(x) weight is halved; the buffer is
          refreshed when the previous drift had the same signal.

        Records the event in :attr:`events` and the log; sets the stop flag after ``max_drift_events``."""
        c = self.cfg
        self.drift_count += 1
        before = [s_ for s_ in self._snapshots if s_["iteration"] <= sig.began_at]
        snap = before[-1] if before else (self._snapshots[0] if self._snapshots else self._snapshot)
        actions = []
        if snap is not None:
            self._restore(snap)
            while self._snapshots and self._snapshots[-1]["iteration"] > snap["iteration"]:
                self._snapshots.pop()
            self._snapshot = snap
            actions.append(f"rolled back to iteration {snap['iteration']}")
        lagging = sig.signal == "gap" and sig.values.get("gap", 0.0) < 0
        if not lagging:
            old_lr = self.current_lr()
            self.lr_scale *= c.lr_backoff
            actions.append(f"learning rate {old_lr:.3g} -> {self.current_lr():.3g}")
        if sig.signal in ("gap", "energy", "samples"):
            old = self.current_energy_l2()
            self.l2_floor = max((4 if lagging else 2) * old, 1e-3)
            actions.append(f"energy penalty {old:.3g} -> {self.current_energy_l2():.3g}")
        old = self.current_px_weight()  # (kept when the samples lag: see above)
        if sig.signal in ("logits", "grad"):
            self.px_scale *= 0.5
        elif sig.signal in ("gap", "samples") and 0 < old < 1 and not lagging:
            # a p(x) term weaker than JEM's lets the samples run below the data: give it back weight
            self.px_scale *= min(2.0, 1.0 / old)
        if self.current_px_weight() != old:
            actions.append(f"p(x) weight {old:.3g} -> {self.current_px_weight():.3g}")
        last = next((e for e in reversed(self.events) if e.get("kind") == "drift"), None)
        refresh = (last is not None and last.get("signal") == sig.signal and self.buffer is not None
                   and not lagging)
        if refresh:
            rows = torch.arange(len(self.buffer), device=self.buffer.device)
            n_cls = self.buffer.n_classes
            self.buffer.buffer = self.buffer._fresh(rows, None if n_cls is None else rows // (len(self.buffer) // n_cls))
            actions.append("replay buffer refreshed (the same drift came back)")
        if self.monitor is not None:
            self.monitor.reset_to(snap["iteration"] if snap is not None else self.iteration)
            if refresh:  # fresh chains start far from the data's energy: give them time before judging
                self.monitor.start_iter = self.iteration + 4 * self.monitor.window
            # the loss changed (a penalty or a weight): its gradient norm and logits have another level
            self.monitor.rebase(self.iteration)
        event = {"kind": "drift", "epoch": self.epoch, "iteration": self.iteration, "signal": sig.signal,
                 "seen": sig.seen, "began_at": sig.began_at, "refreshed": refresh,
                 "rolled_back_to": snap["iteration"] if snap is not None else None, "actions": actions,
                 "reason": f"drift: {sig.seen}", "new_lr_scale": self.lr_scale, "px_weight": self.current_px_weight(),
                 "energy_l2": self.current_energy_l2(), "drift": self.drift_count}
        self.events.append(event)
        self.log(f"drift at iteration {self.iteration} ({sig.seen}; began at iteration {sig.began_at}): "
                 + "; ".join(actions) + f" (drift {self.drift_count}/{c.max_drift_events})")
        if self.drift_count >= c.max_drift_events:
            self._drift_stop = True
            self.log(f"{self.drift_count} drift rescues: training stops here; the epoch chosen on validation is kept")

    def _rollback(self, reason: str) -> None:
        self.retries += 1
        self.lr_scale *= self.cfg.lr_backoff
        event = {"kind": "divergence", "epoch": self.epoch, "iteration": self.iteration, "reason": reason,
                 "new_lr_scale": self.lr_scale, "retry": self.retries}
        self.events.append(event)
        self.log(f"divergence at iteration {self.iteration} ({reason}); rolled back to the last good state, "
                 f"learning rate x{self.cfg.lr_backoff} -> {self.current_lr():.3g} (retry {self.retries}/{self.cfg.max_retries})")
        if self.retries > self.cfg.max_retries:
            where = f" The last good checkpoint is {self.out}." if self.out and self.out.exists() else ""
            raise TrainingDiverged(
                f"training diverged {self.retries} times (last: {reason} at iteration {self.iteration}); giving up.{where} "
                "Try a lower --lr, fewer or smaller SGLD steps (--sgld-step-size), --sgld-max-update 0.05, "
                "or an energy penalty (--energy-l2 0.01).")
        if self._snapshot is not None:
            self._restore(self._snapshot)
            if self.monitor is not None:
                self.monitor.reset_to(self._snapshot["iteration"])
        if self.buffer is not None:
            self.buffer.reset_nonfinite()

    def _batches(self) -> list[tuple[torch.Tensor, torch.Tensor | None]]:
        """Index batches for one epoch: (indices for the p(x)/CE batch, labelled indices or None)."""
        n = len(self.train_set)
        if self.world_size > 1:
            # One permutation per (seed, epoch), the same on every rank; each rank takes every W-th index
            # (disjoint shares of n // W, so all ranks run the same number of iterations).
            from torch.utils.data import DistributedSampler

            ds = DistributedSampler(range(n), self.world_size, self.rank, shuffle=True, seed=self.cfg.seed, drop_last=True)
            ds.set_epoch(self.epoch)
            perm = torch.tensor(list(ds), dtype=torch.long)
        else:
            perm = torch.randperm(n, generator=self.gen)
        bs = self.cfg.batch_size
        idx = [perm[i:i + bs] for i in range(0, len(perm) - bs + 1, bs)] or [perm]
        if self.labelled is None:
            return [(b, None) for b in idx]
        lab = self.labelled[torch.randint(len(self.labelled), (len(idx), bs), generator=self.gen)]
        return [(b, lab[i]) for i, b in enumerate(idx)]

    # -- one iteration ---------------------------------------------------------------------------
    def train_step(self, idx: torch.Tensor, lab_idx: torch.Tensor | None) -> dict[str, float]:
        """One optimisation step on the batch ``idx`` (and labelled batch ``lab_idx``); returns its numbers."""
        c = self.cfg
        ds = self.train_set
        # With clamped chains the samples can never leave [-1, 1], so noisy data must not either: MNIST's
        # background sits at -1 and unclamped N(0, 0.03^2) noise puts half of it below -1, a feature the
        # energy learns to reward ("pixels below -1 = data") and the sampler can never reproduce; E(data)
        # then drifts without bound and classification suffers (checkpoints/README.md, "The clamp shortcut").
        lo_hi = (-1.0, 1.0) if c.objective == "jem" and c.sgld_clamp else None
        x = augment(ds.x[idx], self.crop, self.flip, c.data_noise, self.gen, clamp=lo_hi).to(self.device, non_blocking=True)
        if lab_idx is None:
            x_lab, y_lab = x, ds.y[idx].to(self.device)
        else:
            x_lab = augment(ds.x[lab_idx], self.crop, self.flip, c.data_noise, self.gen, clamp=lo_hi).to(self.device)
            y_lab = ds.y[lab_idx].to(self.device)
        lr = self.current_lr()
        for g in self.optimizer.param_groups:
            g["lr"] = lr
        if c.objective == "baseline":
            loss, out = baseline_loss(self.ddp_model, x_lab, y_lab)
        else:
            assert self.buffer is not None and self.sampler is not None
            n = x.shape[0]
            # p(x|y) chains are conditioned on the labelled batch's labels: in semi-supervised mode the
            # labels of the unlabelled images must never be seen.
            y_cond = y_lab[:n] if c.pxy_weight > 0 else None
            x_q, buf_idx = self.buffer.sample(n, y_cond)
            if self._has_train_mode_layers:
                self.model.eval()
            try:
                with frozen_parameters(self.model):  # SGLD needs dE/dx only
                    x_q = self.sampler.run(x_q, c.sgld_steps, y=y_cond)
            finally:
                if self._has_train_mode_layers:
                    self.model.train()
            self.buffer.update(buf_idx, x_q)
            loss, out = jem_loss(self.ddp_model, x_lab, y_lab, x_q, x_data=x if lab_idx is not None else None,
                                 y_cond=y_cond, px_weight=self.current_px_weight(), pxy_weight=c.pxy_weight,
                                 energy_l2=self.current_energy_l2())
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        norms = [p.grad.detach().norm() for p in self.model.parameters() if p.grad is not None]
        gnorm = float(torch.stack(norms).norm()) if norms else 0.0
        grad_ok = math.isfinite(gnorm)
        out["grad_norm"] = gnorm
        out.update(loss=float(loss.detach()), lr=lr, grad_finite=float(grad_ok))
        return out

    def _diverged(self, s: dict[str, float]) -> str | None:
        if not math.isfinite(s["loss"]) or not s["grad_finite"]:
            return "non-finite loss or gradient"
        for k in ("energy_data", "energy_samples"):
            v = s[k]
            if k == "energy_samples" and math.isnan(v) and self.cfg.objective == "baseline":
                continue
            if not math.isfinite(v):
                return f"non-finite {k.replace('_', ' ')}"
            if abs(v) > self.cfg.divergence_threshold:
                return f"|{k.replace('_', ' ')}| = {abs(v):.3g} above {self.cfg.divergence_threshold:g}"
        m = s.get("sample_absmax")
        if m is not None and not m <= SAMPLE_ABS_LIMIT:  # (NaN fails the comparison too)
            return (f"SGLD samples left the data range (max |x| = {m:.3g}, limit {SAMPLE_ABS_LIMIT:g}; data lie in "
                    "[-1, 1]): the SGLD step size is too large")
        return None

    def guarded_step(self, idx: torch.Tensor, lab_idx: torch.Tensor | None) -> dict[str, float] | None:
        """One iteration under the divergence guard: :meth:`train_step`, then either the optimizer step
        (returns the step's numbers) or, on divergence, a roll-back to the last good snapshot (returns None).

        Takes a snapshot every ``guard_every`` iterations. :meth:`fit` calls this for every batch;
        a caller driving training step by step (the 2-D playground) calls it directly, after taking
        a first snapshot with :meth:`take_snapshot`.

        Raises:
            TrainingDiverged: after ``max_retries`` recoveries.
        """
        s = self.train_step(idx, lab_idx)
        reason = self._diverged(s)
        if self.world_size > 1:  # all ranks roll back / stop together, so collectives stay in step
            reason, self._agreed_stop = any_rank(reason, self.stopped, self.device)
        if reason:
            self._rollback(reason)
            return None
        self.optimizer.step()
        sig = None
        if self.monitor is not None and self.world_size == 1:
            sig = self.monitor.update(self.iteration, {"gap": s.get("px"), "energy": s.get("energy_data"),
                                                       "logits": s.get("logit_absmax"), "grad": s.get("grad_norm")})
        self.iteration += 1
        if sig is not None:
            self._drift_rescue(sig)
            return None
        if self.iteration % self.cfg.guard_every == 0:
            self._take_snapshot()
        return s

    def take_snapshot(self) -> None:
        """Remember the current model, optimizer and buffer as the state a divergence rolls back to."""
        self._take_snapshot()

    # -- the loop --------------------------------------------------------------------------------
    def fit(self) -> list[EpochMetrics]:
        """Train for ``config.epochs`` epochs (continuing from a resumed state); returns per-epoch metrics.

        With a validation split, every epoch is judged on it (:meth:`validate`), the checkpoint ``out``
        holds the epoch chosen on validation (:meth:`_selection_score`), and when training ends (all
        epochs, a stop request, too many drift rescues, or divergence) that epoch is evaluated once on the
        test split (:attr:`final`) and ``out`` is rewritten with the report.

        Raises:
            TrainingDiverged: after ``max_retries`` recoveries (the chosen epoch is still finalised first).
        """
        self.model.train()
        if self._snapshot is None:
            self._take_snapshot()
        if self._epoch_good is None:
            self._epoch_good = self._snapshot
        try:
            self._fit_loop()
        except TrainingDiverged:
            self.finish()
            raise
        self.finish()
        return self.history

    def _fit_loop(self) -> None:
        keys = ("loss", "ce", "px", "energy_data", "energy_samples", "accuracy", "grad_norm", "logit_absmax")
        while self.epoch < self.cfg.epochs and not self._halting() and not self._drift_stop:
            t0 = time.perf_counter()
            sums: dict[str, float] = {}
            count, events0 = 0, len(self.events)
            batches = self._batches()
            if self.cfg.max_iters_per_epoch:
                batches = batches[: self.cfg.max_iters_per_epoch]
            if self.on_epoch_start:
                self.on_epoch_start(self.epoch, len(batches))
            for i, (idx, lab) in enumerate(batches):
                if self._halting() or self._drift_stop:
                    break
                self.progress = self.epoch + i / max(1, len(batches))
                s = self.guarded_step(idx, lab)
                if s is None:
                    continue
                count += 1
                for k in keys:
                    if k in s:
                        sums[k] = sums.get(k, 0.0) + s[k]
                if self.on_iteration:
                    self.on_iteration({"epoch": self.epoch, "iteration": self.iteration, **s})
            if self._halting() and count < len(batches):
                break
            self.epoch += 1
            self.progress = float(self.epoch)
            if self.val_set is not None:
                ev = {"accuracy": float("nan"), "nll": float("nan")}  # the test split waits for the final report
            elif self.world_size > 1:  # each rank scores every W-th test image; sums are combined
                ev = evaluate_over_ranks(evaluate_classifier, self.model, self.test_set.x, self.test_set.y, self.device)
            else:
                ev = evaluate_classifier(self.model, self.test_set.x, self.test_set.y, device=self.device)
            avg = {k: v / max(1, count) for k, v in sums.items()}
            if self.world_size > 1:
                avg = mean_over_ranks(avg, self.device)
            new = self.events[events0:]
            nan = float("nan")
            val = self.validate() if self.val_set is not None else {}
            m = EpochMetrics(self.epoch, count, avg.get("loss", nan), avg.get("ce", nan),
                             avg.get("px", nan), avg.get("energy_data", nan),
                             avg.get("energy_samples", nan), avg.get("accuracy", nan),
                             ev["accuracy"], ev["nll"], self.current_lr(), time.perf_counter() - t0,
                             sum(e.get("kind") != "drift" for e in new),
                             val_accuracy=val.get("accuracy", nan), val_nll=val.get("nll", nan),
                             val_ece=val.get("ece", nan), sample_fd=val.get("sample_fd", nan),
                             sample_agreement=val.get("sample_agreement", nan),
                             px_weight=self.current_px_weight() if self.cfg.objective == "jem" else nan,
                             energy_l2=self.current_energy_l2() if self.cfg.objective == "jem" else nan,
                             drift_events=sum(e.get("kind") == "drift" for e in new),
                             grad_norm=avg.get("grad_norm", nan), logit_absmax=avg.get("logit_absmax", nan),
                             val_log_px=val.get("log_px", nan), val_log_z_se=val.get("log_z_se", nan))
            self.history.append(m)
            seen = self._sample_drift(m)
            if seen is not None and any(e.get("refreshed") for e in new):
                # The guard itself restarted the chains (from their start law) during this epoch: their distance says
                # nothing about the model yet. Not judged (and not eligible for selection, by that distance).
                self.log(f"epoch {self.epoch}: buffer samples not judged ({seen}), the replay buffer was "
                         "refreshed during this epoch")
                seen = None
            if seen is not None:
                self._sample_rescue(m, seen)
                chosen = False
            else:
                self._take_snapshot()
                self._epoch_good = self._snapshot
                chosen = self._consider(m)
            if self.out is not None:
                self.save(self.out, write_checkpoint=self.val_set is None or chosen)
            if self.on_epoch:
                self.on_epoch(m)

    def time_iterations(self, n: int = 3) -> float:
        """Seconds per training iteration on this machine, from ``n`` timed iterations after one untimed
        warm-up; the model, optimizer, replay buffer and random state are left as they were.

        Used for a run's time estimate before it starts (iterations per epoch x epochs x this, plus the
        per-epoch evaluation). Raises ValueError for ``n < 1``.
        """
        if n < 1:
            raise ValueError(f"n must be >= 1; got {n}")
        model = copy.deepcopy(self.model.state_dict())
        buf = None if self.buffer is None else self.buffer.buffer.clone()
        rng, gen = torch.get_rng_state(), self.gen.get_state()
        buf_gen = self.buffer.generator.get_state() if self.buffer is not None and self.buffer.generator is not None else None
        try:
            batches = self._batches()
            batches = (batches * (n + 1))[: n + 1]
            self.train_step(*batches[0])
            t0 = time.perf_counter()
            for idx, lab in batches[1:]:
                self.train_step(idx, lab)
            return (time.perf_counter() - t0) / n
        finally:
            self.model.load_state_dict(model)
            self.optimizer.zero_grad(set_to_none=True)
            if buf is not None:
                self.buffer.buffer.copy_(buf)
                if buf_gen is not None:
                    self.buffer.generator.set_state(buf_gen)
            torch.set_rng_state(rng)
            self.gen.set_state(gen)

    def iterations_per_epoch(self) -> int:
        """Optimiser steps in one epoch (one pass of the training images, or ``max_iters_per_epoch``)."""
        n = max(1, len(self.train_set) // self.world_size // self.cfg.batch_size)
        return min(n, self.cfg.max_iters_per_epoch) if self.cfg.max_iters_per_epoch else n

    # -- validation, selection, the final report -----------------------------------------------
    @torch.no_grad()
    def validate(self) -> dict[str, float]:
        """Judge the current model on the validation split.

        Returns:
            ``{"accuracy", "nll" (nats per image), "ece" (15 bins, in [0, 1])}`` and, for a JEM with
            ``sample_eval`` > 0, ``"sample_fd"`` (classifier-feature Fréchet distance, Heusel et al. 2017
            eq. 6, between ``sample_eval`` replay-buffer samples and as many validation images, in the
            judge's feature space; >= 0) and ``"sample_agreement"`` (fraction in [0, 1] of those samples the
            judge labels as the model does; NaN without a separate judge); with ``ais_temps`` > 0, ``"log_px"``
            (mean ``log p(x)`` of the validation images in nats, :func:`jem_core.likelihood.quick_log_px`:
            forward AIS with ``ais_temps`` temperatures and ``ais_chains`` chains, an over-statement that
            shrinks with more temperatures) and ``"log_z_se"`` (nats).

        Raises:
            RuntimeError: no validation split.
        """
        from .evaluation.calibration import calibration_report
        from .evaluation.samples import classifier_fid

        if self.val_set is None:
            raise RuntimeError("no validation split (val_split = 0)")
        was = self.model.training
        self.model.eval()
        try:
            xv, yv = self.val_set.x, self.val_set.y
            logits = torch.cat([self.model(xv[i:i + 500].to(self.device)).float().cpu() for i in range(0, len(xv), 500)])
            rep = calibration_report(logits.softmax(1), yv)
            out = {"accuracy": rep.accuracy, "nll": float(F.cross_entropy(logits, yv)), "ece": rep.ece}
            if self.buffer is not None and self.cfg.sample_eval:
                n = min(self.cfg.sample_eval, len(self.buffer), len(xv))
                xs = self.buffer.subset(n)
                judge = self.judge if self.judge is not None else self.model.f
                if n >= 2:
                    out["sample_fd"] = classifier_fid(judge, xs.to(self.device), xv[:n].to(self.device))
                if self.judge is not None:
                    own = self.model(xs.to(self.device)).argmax(1)
                    out["sample_agreement"] = float((self.judge(xs.to(self.device)).argmax(1) == own).float().mean())
        finally:
            self.model.train(was)
        if self.cfg.ais_temps:
            from .likelihood import quick_log_px

            with torch.enable_grad():
                lp = quick_log_px(self.model, xv[:1000], self.cfg.ais_temps, self.cfg.ais_chains,
                                  seed=self.cfg.seed + self.epoch, device=self.device)
            out["log_px"], out["log_z_se"] = lp["log_px"], lp["log_z_se"]
        return out

    def _sample_drift(self, m: EpochMetrics) -> str | None:
        """What makes epoch ``m``'s buffer samples a drift, or None: with the drift guard and a separate judge
        on, a Fréchet distance above both 3x and :data:`SAMPLE_FD_DRIFT` more than the best of the earlier
        epochs, or a judge agreement more than 0.25 below the best earlier one (the samples broke up while
        the training statistics may look calm)."""
        if self.monitor is None or self.judge is None or not math.isfinite(m.sample_fd):
            return None  # (distances in the model's own, changing feature space are not comparable over epochs)
        earlier = self.history[:-1]
        fds = [h.sample_fd for h in earlier if math.isfinite(h.sample_fd)]
        if fds and m.sample_fd > max(3 * min(fds), min(fds) + SAMPLE_FD_DRIFT):
            return (f"buffer samples' FD = {m.sample_fd:.3g}, above 3x and {SAMPLE_FD_DRIFT:g} more than the best "
                    f"earlier {min(fds):.3g}")
        agree = [h.sample_agreement for h in earlier if math.isfinite(h.sample_agreement)]
        if agree and math.isfinite(m.sample_agreement) and m.sample_agreement < max(agree) - 0.25:
            return (f"judge agrees on {100 * m.sample_agreement:.1f}% of buffer samples, down from "
                    f"{100 * max(agree):.1f}%")
        return None

    def _sample_rescue(self, m: EpochMetrics, seen: str) -> None:
        """Respond to broken samples at an epoch's end: a drift of signal ``"samples"`` that began during the
        epoch, handled by :meth:`_drift_rescue` from the state at the end of the last healthy epoch."""
        began = self._epoch_good["iteration"] if self._epoch_good is not None else 0
        if self._epoch_good is not None:  # the ring may no longer hold a snapshot that old
            self._snapshots.clear()
            self._snapshots.append(self._epoch_good)
        self._drift_rescue(DriftSignal("samples", f"samples: {seen}", began, self.iteration, {}))
        m.drift_events += 1

    def _selection_score(self, m: EpochMetrics) -> tuple[int, float]:
        """Rank of an epoch for the kept checkpoint: ``(eligible, validation accuracy)``, compared as a tuple.

        Eligible (1): sample quality not judged by a separate judge, or the buffer samples' Fréchet distance
        at most twice, or at most :data:`SAMPLE_FD_MARGIN` more than, the best distance seen in earlier epochs:
        an epoch whose samples broke up is kept only when no epoch is eligible."""
        if math.isnan(m.val_accuracy):
            return (1, -float(m.epoch))
        if self.judge is None:  # the model's own features change every epoch: their distances do not compare
            return (1, m.val_accuracy)
        fds = [h.sample_fd for h in self.history[:-1] if math.isfinite(h.sample_fd)]
        ok = (not math.isfinite(m.sample_fd) or m.sample_fd <= max(2 * min(fds), min(fds) + SAMPLE_FD_MARGIN)) if fds else True
        return (int(ok), m.val_accuracy)

    def _consider(self, m: EpochMetrics) -> bool:
        """Keep ``m``'s state as the chosen epoch when it ranks above the current choice; True if it did."""
        if self.val_set is None:
            return False
        score = self._selection_score(m)
        if self.best is not None and tuple(self.best["score"]) >= score:
            return False
        self.best = {"epoch": m.epoch, "score": list(score),
                     "model": {k: v.detach().cpu().clone() for k, v in self.model.state_dict().items()},
                     "buffer": self.buffer.subset(self.cfg.keep_buffer) if self.buffer is not None and self.cfg.keep_buffer else None}
        self.log(f"epoch {m.epoch}: validation accuracy {m.val_accuracy:.4f} - chosen so far")
        return True

    def finish(self) -> dict | None:
        """Evaluate the epoch chosen on validation once on the test split and rewrite ``out`` with the report.

        Returns:
            :attr:`final` ``{"epoch", "test_accuracy", "test_nll" (nats), "test_ece", "val_accuracy"}``, or
            None without a validation split or chosen epoch.
        """
        if self.val_set is None or self.best is None or self.rank != 0:
            return None
        from .evaluation.calibration import calibration_report

        current = {k: v.detach().clone() for k, v in self.model.state_dict().items()}
        self.model.load_state_dict(self.best["model"])
        was = self.model.training
        self.model.eval()
        try:
            with torch.no_grad():
                xt, yt = self.test_set.x, self.test_set.y
                logits = torch.cat([self.model(xt[i:i + 500].to(self.device)).float().cpu()
                                    for i in range(0, len(xt), 500)])
            rep = calibration_report(logits.softmax(1), yt)
            h = next(h_ for h_ in self.history if h_.epoch == self.best["epoch"])
            self.final = {"epoch": self.best["epoch"], "test_accuracy": rep.accuracy,
                          "test_nll": float(F.cross_entropy(logits, yt)), "test_ece": rep.ece,
                          "val_accuracy": h.val_accuracy, "sample_fd": h.sample_fd,
                          "sample_agreement": h.sample_agreement, "n_test": int(len(yt))}
            self.log(f"chosen epoch {self.best['epoch']} (validation accuracy {h.val_accuracy:.4f}): "
                     f"test accuracy {rep.accuracy:.4f}")
            if self.out is not None:
                self._write_checkpoint(self.out, self.best["buffer"])
        finally:
            self.model.load_state_dict(current)
            self.model.train(was)
        return self.final

    # -- checkpoints -----------------------------------------------------------------------------
    def metadata(self) -> dict[str, Any]:
        """Checkpoint metadata for the current state (see :mod:`jem_core.checkpoint`)."""
        c, h = self.train_set.shape[0], self.train_set.shape[1]
        last = self.history[-1] if self.history else None
        metrics: dict[str, Any] = {}
        if last is not None:
            metrics = {"test_accuracy": last.test_accuracy, "test_nll": last.test_nll, "epochs": self.epoch,
                       "iterations": self.iteration, "history": [dataclasses.asdict(h_) for h_ in self.history]}
        if self.val_set is not None:
            chosen = next((h_ for h_ in self.history if self.best and h_.epoch == self.best["epoch"]), None)
            metrics.update({
                "test_accuracy": self.final["test_accuracy"] if self.final else None,
                "test_nll": self.final["test_nll"] if self.final else None,
                "test_ece": self.final["test_ece"] if self.final else None,
                "selected_epoch": self.best["epoch"] if self.best else None,
                "val_accuracy": chosen.val_accuracy if chosen else None,
                "val_ece": chosen.val_ece if chosen else None,
                "sample_fd": chosen.sample_fd if chosen else None,
                "sample_agreement": chosen.sample_agreement if chosen else None,
                "selection": "highest validation accuracy among epochs whose buffer samples' Frechet distance is "
                             f"at most 2x, or {SAMPLE_FD_MARGIN:g} more than, the best earlier one; test split evaluated "
                             "once, for the chosen epoch",
                "validation_split": f"last {len(self.val_set)} of the {self.cfg.dataset} training images",
                "judge": self.judge_name or "the model itself",
                "final": self.final})
        recipe = None
        if self.cfg.recipe:
            from .recipes import RECIPES
            r = RECIPES.get(self.cfg.recipe)
            recipe = {"name": self.cfg.recipe, **({"description": r["description"], "target": r["target"]} if r else {})}
        return {
            "arch": self.arch, "arch_kwargs": self.arch_kwargs, "in_channels": c, "image_size": h,
            "n_classes": self.train_set.n_classes, "class_names": self.train_set.class_names,
            "dataset": self.cfg.dataset, "objective": self.cfg.objective,
            "semi_supervised": self.cfg.labels_per_class is not None,
            "normalization": "[-1, 1]", "train_args": dataclasses.asdict(self.cfg),
            "sgld": self.sampler.describe() if self.sampler else None,
            "parameters": count_parameters(self.model), "metrics": metrics,
            "divergence_events": self.events, "test_set_note": self.test_set.note,
            "drift_events": [e for e in self.events if e.get("kind") == "drift"], "recipe": recipe,
        }

    def save(self, out: str | os.PathLike, write_checkpoint: bool = True) -> None:
        """Write the small checkpoint ``out`` (weights, metadata with reference statistics, a few
        hundred buffer samples) and the full resume state ``out.resume.pt`` (optimizer, counters,
        whole buffer, RNG), both atomically. Only rank 0 writes; under DDP every rank must call this
        (it gathers each rank's buffer slice and RNG state into rank 0's resume file).
        ``write_checkpoint=False`` writes the resume state only (an epoch not chosen on validation)."""
        buf_state = None if self.buffer is None else self.buffer.state_dict()
        rng = {"torch": torch.get_rng_state(), "gen": self.gen.get_state()}
        rng_per_rank = None
        if self.world_size > 1:
            full, rng_per_rank = gather_rank_states(None if self.buffer is None else self.buffer.buffer, rng)
            if buf_state is not None:
                buf_state["buffer"] = full  # rank slices in rank order; resume() re-slices it
        if self.rank != 0:
            return
        meta = self._full_metadata()
        trainer_state = {
            "optimizer": self.optimizer.state_dict(), "epoch": self.epoch, "iteration": self.iteration,
            "retries": self.retries, "lr_scale": self.lr_scale, "events": self.events,
            "history": [dataclasses.asdict(h) for h in self.history],
            "buffer": buf_state, "rng": rng, "world_size": self.world_size, "rng_per_rank": rng_per_rank,
            "px_scale": self.px_scale, "l2_floor": self.l2_floor, "drift_count": self.drift_count,
            "monitor": self.monitor.state_dict() if self.monitor is not None else None, "best": self.best,
        }
        # The checkpoint first, the resume state second: a kill between the two leaves the resume state
        # one epoch behind, so `--resume` redoes that epoch and rewrites both (the other order could
        # leave a finished run whose checkpoint lacks its last epoch, with nothing left to rewrite it).
        if write_checkpoint:
            small_buf = self.buffer.subset(self.cfg.keep_buffer) if self.buffer is not None and self.cfg.keep_buffer else None
            save_checkpoint(out, self.model, meta, small_buf)
        save_checkpoint(resume_path(out), self.model, meta, None, trainer=trainer_state)
        self.log(f"saved {out if write_checkpoint else resume_path(out)} (epoch {self.epoch})")

    def _write_checkpoint(self, out: str | os.PathLike, small_buf: torch.Tensor | None) -> None:
        """Write the small checkpoint ``out`` from the current model with ``small_buf`` (rank 0 only)."""
        save_checkpoint(out, self.model, self._full_metadata(), small_buf)

    def _full_metadata(self) -> dict[str, Any]:
        """:meth:`metadata` plus the reference ``log p(x)`` statistics of the current model."""
        meta = self.metadata()
        if self.world_size > 1:
            meta["distributed"] = {"world_size": self.world_size, "batch_size_per_rank": self.cfg.batch_size,
                                   "global_batch_size": self.cfg.batch_size * self.world_size,
                                   "buffer_per_rank": len(self.buffer) if self.buffer is not None else 0}
        ref_set = self.val_set if self.val_set is not None else self.test_set
        ref = ref_set.subset(self.cfg.n_reference)
        meta["reference"] = reference_statistics(self.model, ref.x, device=self.device)
        meta["reference"]["split"] = (f"{self.cfg.dataset} validation (first {len(ref)})" if self.val_set is not None
                                      else f"{self.cfg.dataset} test (first {len(ref)})")
        return meta

    def resume(self, path: str | os.PathLike) -> None:
        """Continue from the resume state written next to ``path`` (or ``path`` itself if it is one).

        Raises:
            CheckpointError: missing or corrupt state, or one from another architecture.
        """
        p = Path(path)
        src = resume_path(p) if resume_path(p).exists() else p
        obj = read_checkpoint(src)
        if "trainer" not in obj:
            raise CheckpointError(f"{src} holds no trainer state; resume needs the {resume_path(p).name} file "
                                  "written next to the checkpoint during training")
        ckpt = load_checkpoint(src, device=self.device)
        self.model.f.load_state_dict(ckpt.model.f.state_dict())
        t = obj["trainer"]
        self.optimizer.load_state_dict(t["optimizer"])
        self.epoch, self.iteration = int(t["epoch"]), int(t["iteration"])
        self.retries, self.lr_scale = int(t["retries"]), float(t["lr_scale"])
        self.events = list(t.get("events", []))
        self.history = [EpochMetrics(**h) for h in t.get("history", [])]
        self.px_scale, self.l2_floor = float(t.get("px_scale", 1.0)), float(t.get("l2_floor", 0.0))
        self.drift_count = int(t.get("drift_count", 0))
        if self.monitor is not None and t.get("monitor"):
            self.monitor.load_state_dict(t["monitor"])
        self.best = t.get("best")
        self.progress = float(self.epoch)
        saved_world = int(t.get("world_size", 1))
        if self.buffer is not None and t.get("buffer") is not None:
            state = dict(t["buffer"])
            if saved_world > 1 or self.world_size > 1:  # this rank's share of all ranks' chains
                state["buffer"] = reshard_buffer(state["buffer"], saved_world, self.world_size, self.rank,
                                                 len(self.buffer), state.get("n_classes"))
            self.buffer.load_state_dict(state)
        rng = t.get("rng") if saved_world == self.world_size == 1 else None
        if saved_world == self.world_size > 1 and t.get("rng_per_rank"):
            rng = t["rng_per_rank"][self.rank]
        if rng is not None:  # (with another world size the ranks keep their fresh per-rank seeds)
            torch.set_rng_state(rng["torch"])
            self.gen.set_state(rng["gen"])
        self._take_snapshot()
        self.log(f"resumed from {src} at epoch {self.epoch}, iteration {self.iteration}")
