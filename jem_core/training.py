"""Training: the JEM objective and the cross-entropy baseline, with a divergence guard and resume.

JEM objective (Grathwohl et al. 2019, eq. 8-9)::

    loss = CE(f(x_l), y_l)                                      # log p(y|x)
         + px_weight  * [mean E(x_data) - mean E(x_sample)]     # contrastive log p(x) (eq. 2-3)
         + pxy_weight * [mean E(x_data, y) - mean E(x_sample_y, y)]   # optional log p(x|y)
         + energy_l2  * mean(E(x_data)^2 + E(x_sample)^2)       # stabiliser (Du & Mordatch 2019)

``x_sample`` come from SGLD chains continued from a persistent replay buffer (PCD) with
``reinit_freq`` restarts from noise; when the chains are clamped to ``[-1, 1]``, so is the noisy data
(else the energy learns to reward pixels outside the range no sample can reach).
``baseline`` is CE only, same architecture. Semi-supervised (``labels_per_class``): CE sees the labelled subset only; the p(x) term sees all
images (the seed's "train on unlabeled data" claim). Both objectives run the same number of
iterations per epoch (one pass of the full training set), so they see the same number of updates.

The divergence guard: after every iteration, a non-finite loss, gradient or energy, an energy
magnitude above ``divergence_threshold``, or SGLD samples that are non-finite or beyond
``SAMPLE_ABS_LIMIT`` (data lie in [-1, 1]) count as divergence; the trainer rolls back to the last
good snapshot (model, optimizer, buffer), multiplies the learning rate by ``lr_backoff`` and goes
on. After ``max_retries`` recoveries it stops with :class:`TrainingDiverged`; the checkpoints on
disk are only ever written from healthy states.
"""

from __future__ import annotations

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

from .checkpoint import CheckpointError, atomic_torch_save, load_checkpoint, read_checkpoint, save_checkpoint
from .data import ImageDataset, augment, labelled_subset, load_dataset
from .energy import JEM, log_px_unnormalized
from .models import build_model, count_parameters
from .sampling import ClassGaussians, ReplayBuffer, SGLDSampler, frozen_parameters

__all__ = ["TrainConfig", "Trainer", "TrainingDiverged", "EpochMetrics", "reference_statistics",
           "evaluate_classifier", "resume_path", "select_device"]


class TrainingDiverged(RuntimeError):
    """Training diverged more often than the guard's retry limit allows."""


#: The divergence guard's bound on SGLD samples: data lie in [-1, 1], so a sample with a pixel beyond
#: +-SAMPLE_ABS_LIMIT (or a non-finite one) means the sampler exploded (e.g. a far too large step size
#: without clamping), even while the energies still look finite.
SAMPLE_ABS_LIMIT = 100.0


def select_device(device: str | None = None) -> torch.device:
    """``device`` if given (``"cpu"``, ``"cuda"``, ``"cuda:1"``), else CUDA when available, else CPU."""
    if device in (None, "", "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {device!r} requested but CUDA is not available; use --device cpu")
    return dev


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

    def validate(self) -> None:
        """Raise ValueError naming the first bad setting."""
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
        ]
        for ok, msg in checks:
            if not ok:
                raise ValueError(msg)


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


def resume_path(out: str | os.PathLike) -> Path:
    """Where the full resume state of a run writing ``out`` lives: ``out`` + ``.resume.pt``."""
    return Path(str(out) + ".resume.pt")


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
        out: checkpoint path written after every epoch (atomically); the resume state goes to
            :func:`resume_path` ``(out)``. None = write nothing.
        train_set, test_set: optional preloaded datasets (else loaded from ``config.dataset``).
        on_iteration: called with a dict (iteration, loss terms, lr) after every iteration.
        on_epoch: called with :class:`EpochMetrics` after every epoch.
        on_epoch_start: called with ``(epoch index, iterations planned)`` before every epoch (progress bars).
        log: called with human-readable lines (divergence events, checkpoints).

    Raises:
        ValueError: bad config; :class:`~jem_core.data.DataUnavailableError`: data missing.
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
        self.rank, self.world_size = _dist_info()
        torch.manual_seed(config.seed + self.rank)
        self.gen = torch.Generator().manual_seed(config.seed + 1000 * self.rank)
        self.train_set = train_set or load_dataset(config.dataset, "train", config.data_root)
        self.test_set = test_set or load_dataset(config.dataset, "test", config.data_root)
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
            unused = _unused_parameters(self.model, (c, h, h), self.device)
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

    # -- helpers -------------------------------------------------------------------------------
    def _make_optimizer(self) -> torch.optim.Optimizer:
        c = self.cfg
        if c.optimizer == "adam":
            return torch.optim.Adam(self.model.parameters(), lr=c.lr, betas=(0.9, 0.999), weight_decay=c.weight_decay)
        return torch.optim.SGD(self.model.parameters(), lr=c.lr, momentum=c.momentum, weight_decay=c.weight_decay)

    def current_lr(self) -> float:
        """Learning rate for the current iteration: warm-up, step decay, guard back-off."""
        c = self.cfg
        lr = c.lr * self.lr_scale * (c.decay_rate ** sum(self.epoch >= e for e in c.decay_epochs))
        if c.warmup_iters > 0 and self.iteration < c.warmup_iters:
            lr *= (self.iteration + 1) / c.warmup_iters
        return lr

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
        }

    def _rollback(self, reason: str) -> None:
        self.retries += 1
        self.lr_scale *= self.cfg.lr_backoff
        event = {"epoch": self.epoch, "iteration": self.iteration, "reason": reason,
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
            self.model.load_state_dict(self._snapshot["model"])
            self.optimizer.load_state_dict(self._snapshot["optimizer"])
            if self.buffer is not None and self._snapshot["buffer"] is not None:
                self.buffer.buffer.copy_(self._snapshot["buffer"])
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
        out: dict[str, float] = {}
        if c.objective == "baseline":
            logits = self.ddp_model(x_lab if lab_idx is not None else x)
            loss = F.cross_entropy(logits, y_lab)
            out.update(ce=float(loss.detach()), px=0.0, energy_data=float(-torch.logsumexp(logits.detach(), 1).mean()),
                       energy_samples=float("nan"))
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
            parts = [x_lab] + ([x] if lab_idx is not None else []) + [x_q]
            logits_all = self.ddp_model(torch.cat(parts))
            nl = x_lab.shape[0]
            logits_lab = logits_all[:nl]
            logits_data = logits_all[nl:nl + n] if lab_idx is not None else logits_lab
            logits_q = logits_all[-n:]
            ce = F.cross_entropy(logits_lab, y_lab)
            lse_d, lse_q = torch.logsumexp(logits_data, 1), torch.logsumexp(logits_q, 1)
            px = lse_q.mean() - lse_d.mean()  # = E(data) - E(samples)
            loss = ce + c.px_weight * px
            if c.pxy_weight > 0:
                pxy = logits_q.gather(1, y_cond[:, None]).mean() - logits_lab[:n].gather(1, y_cond[:, None]).mean()
                loss = loss + c.pxy_weight * pxy
            if c.energy_l2 > 0:
                loss = loss + c.energy_l2 * (lse_d.pow(2).mean() + lse_q.pow(2).mean())
            out.update(ce=float(ce.detach()), px=float(px.detach()), energy_data=float(-lse_d.detach().mean()),
                       energy_samples=float(-lse_q.detach().mean()), sample_absmax=float(x_q.detach().abs().max()))
            logits = logits_lab
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        grad_ok = all(p.grad is None or bool(torch.isfinite(p.grad).all()) for p in self.model.parameters())
        out.update(loss=float(loss.detach()), lr=lr, grad_finite=float(grad_ok),
                   accuracy=float((logits.detach().argmax(1) == y_lab).float().mean()))
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
            reason, self._agreed_stop = _any_rank(reason, self.stopped, self.device)
        if reason:
            self._rollback(reason)
            return None
        self.optimizer.step()
        self.iteration += 1
        if self.iteration % self.cfg.guard_every == 0:
            self._take_snapshot()
        return s

    def take_snapshot(self) -> None:
        """Remember the current model, optimizer and buffer as the state a divergence rolls back to."""
        self._take_snapshot()

    # -- the loop --------------------------------------------------------------------------------
    def fit(self) -> list[EpochMetrics]:
        """Train for ``config.epochs`` epochs (continuing from a resumed state); returns per-epoch metrics.

        Raises:
            TrainingDiverged: after ``max_retries`` recoveries.
        """
        self.model.train()
        if self._snapshot is None:
            self._take_snapshot()
        while self.epoch < self.cfg.epochs and not self._halting():
            t0 = time.perf_counter()
            sums: dict[str, float] = {}
            count, events0 = 0, len(self.events)
            batches = self._batches()
            if self.cfg.max_iters_per_epoch:
                batches = batches[: self.cfg.max_iters_per_epoch]
            if self.on_epoch_start:
                self.on_epoch_start(self.epoch, len(batches))
            for idx, lab in batches:
                if self._halting():
                    break
                s = self.guarded_step(idx, lab)
                if s is None:
                    continue
                count += 1
                for k in ("loss", "ce", "px", "energy_data", "energy_samples", "accuracy"):
                    sums[k] = sums.get(k, 0.0) + s[k]
                if self.on_iteration:
                    self.on_iteration({"epoch": self.epoch, "iteration": self.iteration, **s})
            if self._halting() and count < len(batches):
                break
            self.epoch += 1
            if self.world_size > 1:  # each rank scores every W-th test image; sums are combined
                ev = _evaluate_over_ranks(self.model, self.test_set.x, self.test_set.y, self.device)
            else:
                ev = evaluate_classifier(self.model, self.test_set.x, self.test_set.y, device=self.device)
            avg = {k: v / max(1, count) for k, v in sums.items()}
            if self.world_size > 1:
                avg = _mean_over_ranks(avg, self.device)
            m = EpochMetrics(self.epoch, count, avg.get("loss", float("nan")), avg.get("ce", float("nan")),
                             avg.get("px", float("nan")), avg.get("energy_data", float("nan")),
                             avg.get("energy_samples", float("nan")), avg.get("accuracy", float("nan")),
                             ev["accuracy"], ev["nll"], self.current_lr(), time.perf_counter() - t0,
                             len(self.events) - events0)
            self.history.append(m)
            self._take_snapshot()
            if self.out is not None:
                self.save(self.out)  # under DDP every rank takes part (buffer gather); rank 0 writes
            if self.on_epoch:
                self.on_epoch(m)
        return self.history

    # -- checkpoints -----------------------------------------------------------------------------
    def metadata(self) -> dict[str, Any]:
        """Checkpoint metadata for the current state (see :mod:`jem_core.checkpoint`)."""
        c, h = self.train_set.shape[0], self.train_set.shape[1]
        last = self.history[-1] if self.history else None
        metrics: dict[str, Any] = {}
        if last is not None:
            metrics = {"test_accuracy": last.test_accuracy, "test_nll": last.test_nll, "epochs": self.epoch,
                       "iterations": self.iteration, "history": [dataclasses.asdict(h_) for h_ in self.history]}
        return {
            "arch": self.arch, "arch_kwargs": self.arch_kwargs, "in_channels": c, "image_size": h,
            "n_classes": self.train_set.n_classes, "class_names": self.train_set.class_names,
            "dataset": self.cfg.dataset, "objective": self.cfg.objective,
            "semi_supervised": self.cfg.labels_per_class is not None,
            "normalization": "[-1, 1]", "train_args": dataclasses.asdict(self.cfg),
            "sgld": self.sampler.describe() if self.sampler else None,
            "parameters": count_parameters(self.model), "metrics": metrics,
            "divergence_events": self.events, "test_set_note": self.test_set.note,
        }

    def save(self, out: str | os.PathLike) -> None:
        """Write the small checkpoint ``out`` (weights, metadata with reference statistics, a few
        hundred buffer samples) and the full resume state ``out.resume.pt`` (optimizer, counters,
        whole buffer, RNG), both atomically. Only rank 0 writes; under DDP every rank must call this
        (it gathers each rank's buffer slice and RNG state into rank 0's resume file)."""
        buf_state = None if self.buffer is None else self.buffer.state_dict()
        rng = {"torch": torch.get_rng_state(), "gen": self.gen.get_state()}
        rng_per_rank = None
        if self.world_size > 1:
            full, rng_per_rank = _gather_rank_states(None if self.buffer is None else self.buffer.buffer, rng)
            if buf_state is not None:
                buf_state["buffer"] = full  # rank slices in rank order; resume() re-slices it
        if self.rank != 0:
            return
        meta = self.metadata()
        if self.world_size > 1:
            meta["distributed"] = {"world_size": self.world_size, "batch_size_per_rank": self.cfg.batch_size,
                                   "global_batch_size": self.cfg.batch_size * self.world_size,
                                   "buffer_per_rank": len(self.buffer) if self.buffer is not None else 0}
        ref = self.test_set.subset(self.cfg.n_reference)
        meta["reference"] = reference_statistics(self.model, ref.x, device=self.device)
        meta["reference"]["split"] = f"{self.cfg.dataset} test (first {len(ref)})"
        small_buf = self.buffer.subset(self.cfg.keep_buffer) if self.buffer is not None and self.cfg.keep_buffer else None
        trainer_state = {
            "optimizer": self.optimizer.state_dict(), "epoch": self.epoch, "iteration": self.iteration,
            "retries": self.retries, "lr_scale": self.lr_scale, "events": self.events,
            "history": [dataclasses.asdict(h) for h in self.history],
            "buffer": buf_state, "rng": rng, "world_size": self.world_size, "rng_per_rank": rng_per_rank,
        }
        # The checkpoint first, the resume state second: a kill between the two leaves the resume state
        # one epoch behind, so `--resume` redoes that epoch and rewrites both (the other order could
        # leave a finished run whose checkpoint lacks its last epoch, with nothing left to rewrite it).
        save_checkpoint(out, self.model, meta, small_buf)
        save_checkpoint(resume_path(out), self.model, meta, None, trainer=trainer_state)
        self.log(f"saved {out} (epoch {self.epoch})")

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
        saved_world = int(t.get("world_size", 1))
        if self.buffer is not None and t.get("buffer") is not None:
            state = dict(t["buffer"])
            if saved_world > 1 or self.world_size > 1:  # this rank's share of all ranks' chains
                state["buffer"] = _reshard_buffer(state["buffer"], saved_world, self.world_size, self.rank,
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


# -- torch.distributed helpers (active only when launched by torchrun) --------------------------------
# Every helper below except _dist_info/_unused_parameters/_reshard_buffer is a collective: all ranks must
# call it the same number of times, in the same order (the trainer makes every decision that could
# break this -- roll back, stop -- the same on all ranks).
def _dist_info() -> tuple[int, int]:
    """``(rank, world size)``; ``(0, 1)`` unless a process group is initialised."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _unused_parameters(model: nn.Module, shape: tuple[int, int, int], device: torch.device) -> list[str]:
    """Names of trainable parameters that get no gradient from the logits (one tiny forward/backward)."""
    was = model.training
    model.eval()  # no batch-norm statistics updates from the probe
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    try:
        out = model(torch.zeros(2, *shape, device=device)).float().sum()
        grads = torch.autograd.grad(out, [p for _, p in named], allow_unused=True)
    finally:
        model.train(was)
    return [n for (n, _), g in zip(named, grads) if g is None]


def _any_rank(reason: str | None, stop: bool, device: torch.device) -> tuple[str | None, bool]:
    """The decision after an iteration, the same on all ranks: ``(divergence reason or None, stop)``,
    where any rank's divergence or stop request counts for all."""
    import torch.distributed as dist

    flags = torch.tensor([1.0 if reason else 0.0, 1.0 if stop else 0.0], device=device)
    dist.all_reduce(flags, op=dist.ReduceOp.MAX)
    diverged, stop_any = bool(flags[0] > 0), bool(flags[1] > 0)
    return ((reason or "divergence on another rank") if diverged else None), stop_any


def _mean_over_ranks(d: dict[str, float], device: torch.device) -> dict[str, float]:
    """Average each value over ranks (every rank ran the same number of iterations)."""
    import torch.distributed as dist

    keys = sorted(d)
    t = torch.tensor([d[k] for k in keys], dtype=torch.float64, device=device)
    dist.all_reduce(t)
    t /= dist.get_world_size()
    return {k: float(v) for k, v in zip(keys, t)}


def _evaluate_over_ranks(model: nn.Module, x: torch.Tensor, y: torch.Tensor, device: torch.device) -> dict[str, float]:
    """:func:`evaluate_classifier` on the whole test set, each rank scoring every W-th image."""
    import torch.distributed as dist

    rank, world = dist.get_rank(), dist.get_world_size()
    xs, ys = x[rank::world], y[rank::world]
    part = evaluate_classifier(model, xs, ys, device=device)
    n = len(xs)
    t = torch.tensor([part["accuracy"] * n, part["nll"] * n, float(n)], dtype=torch.float64, device=device)
    dist.all_reduce(t)
    total = max(1.0, float(t[2]))
    return {"accuracy": float(t[0]) / total, "nll": float(t[1]) / total}


def _gather_rank_states(buffer: torch.Tensor | None, rng: dict) -> tuple[torch.Tensor | None, list[dict]]:
    """Every rank's replay buffer (concatenated in rank order, on the CPU; None without one) and RNG states."""
    import torch.distributed as dist

    world = dist.get_world_size()
    rngs: list[Any] = [None] * world
    dist.all_gather_object(rngs, rng)
    if buffer is None:
        return None, rngs
    parts = [torch.empty_like(buffer) for _ in range(world)]
    dist.all_gather(parts, buffer.contiguous())
    return torch.cat([p.cpu() for p in parts]), rngs


def _reshard_buffer(full: torch.Tensor, saved_world: int, world: int, rank: int, rows: int,
                    n_classes: int | None) -> torch.Tensor:
    """This rank's ``rows`` rows of a replay buffer saved by ``saved_world`` ranks (slices concatenated
    in rank order), for a run of ``world`` ranks.

    With the same world size each rank gets back exactly its own chains. Otherwise each rank takes
    an even contiguous share (per class for a class-conditional buffer, whose slices are laid out
    as ``n_classes`` blocks), cut to ``rows`` or topped up with fresh U[-1, 1] noise (from the
    global torch RNG, seeded per rank).

    Returns:
        ``[rows, C, H, W]`` float32 on the CPU.

    Raises:
        CheckpointError: a class-conditional buffer whose size does not split into the saved layout.
    """
    from .sampling import init_noise

    full = full.detach().cpu().float()
    shape = tuple(full.shape[1:])

    def share(pool: torch.Tensor, want: int) -> torch.Tensor:
        p = pool.shape[0]
        out = pool[rank * p // world:(rank + 1) * p // world][:want]
        if out.shape[0] < want:
            out = torch.cat([out, init_noise(want - out.shape[0], shape, None).cpu()])
        return out

    if not n_classes:
        return share(full, rows)
    if full.shape[0] % (saved_world * n_classes):
        raise CheckpointError(f"class-conditional replay buffer of {full.shape[0]} rows does not split into "
                              f"{saved_world} rank(s) x {n_classes} classes")
    block = full.shape[0] // (saved_world * n_classes)
    pools = full.view(saved_world, n_classes, block, *shape).transpose(0, 1).reshape(n_classes, saved_world * block, *shape)
    return torch.cat([share(pools[k], rows // n_classes) for k in range(n_classes)])
