"""Calibration: confidences, ECE / MCE, NLL, Brier score, reliability diagrams, temperature scaling.

A classifier is *calibrated* when, among the inputs it labels with confidence ``c``, a fraction
``c`` is right. With top-label confidence ``conf_i = max_k p(k|x_i)`` and equal-width bins
``B_m`` over ``[0, 1]`` (Guo et al. 2017, "On calibration of modern neural networks", sec. 2)::

    ECE = sum_m |B_m| / N * |acc(B_m) - conf(B_m)|        MCE = max_m |acc(B_m) - conf(B_m)|

JEM's claim (Grathwohl et al. 2019, sec. 5.2) is that the p(x) term makes the classifier better
calibrated than a standard one. Temperature scaling (Guo et al. 2017, sec. 4.2) is the stronger
"standard classifier" reference: one scalar ``T`` fitted on held-out data, ``p = softmax(f(x) / T)``.

ECE and MCE come from torchmetrics, the Brier score from scikit-learn.

What does not live here: intervals and verdict sentences (:mod:`.verdicts`), reliability plots
(:mod:`.figures`, ``app/figures.py``).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ..utils import eval_mode, predict_logits

__all__ = ["eval_mode", "ReliabilityBin", "CalibrationReport", "predict_logits", "predict_proba", "calibration_report",
           "fit_temperature", "TemperatureScaled"]

# The largest float32 below 1. torchmetrics bins with ``bucketize(right=True)``, which would give a
# confidence of exactly 1.0 a bin of its own; clamping puts it in the last bin [1 - 1/M, 1].
_BELOW_ONE = float(np.nextafter(np.float32(1.0), np.float32(0.0)))


@dataclass
class ReliabilityBin:
    """One bin of a reliability diagram.

    Attributes:
        lo, hi: confidence range ``[lo, hi)`` (the last bin includes 1).
        confidence: mean top-label confidence in the bin (NaN when empty).
        accuracy: fraction correct in the bin (NaN when empty).
        count: number of examples in the bin.
    """

    lo: float
    hi: float
    confidence: float
    accuracy: float
    count: int


@dataclass
class CalibrationReport:
    """Calibration of one classifier on one labelled set.

    Attributes:
        accuracy: top-1 accuracy in ``[0, 1]``.
        ece: expected calibration error in ``[0, 1]`` (l1, equal-width bins).
        mce: maximum calibration error in ``[0, 1]`` over non-empty bins.
        nll: mean negative log-likelihood ``-log p(y|x)`` in nats.
        brier: multi-class Brier score ``mean_i sum_k (p_ik - 1[y_i = k])^2`` in ``[0, 2]``.
        n_bins: number of equal-width bins.
        confidences: ``[N]`` float32 top-label confidences.
        correct: ``[N]`` bool, top-1 prediction correct.
        bins: ``n_bins`` :class:`ReliabilityBin` (the reliability-diagram data).
    """

    accuracy: float
    ece: float
    mce: float
    nll: float
    brier: float
    n_bins: int
    confidences: torch.Tensor = field(repr=False)
    correct: torch.Tensor = field(repr=False)
    bins: list[ReliabilityBin] = field(repr=False)

    def summary(self) -> dict[str, float]:
        """``{"accuracy", "nll", "ece", "mce", "brier"}`` as floats (for JSON)."""
        return {"accuracy": self.accuracy, "nll": self.nll, "ece": self.ece, "mce": self.mce, "brier": self.brier}

    def bins_as_dicts(self) -> list[dict]:
        """The reliability bins as plain dicts (NaN for empty bins' confidence/accuracy)."""
        return [asdict(b) for b in self.bins]


def predict_proba(model: nn.Module, x: torch.Tensor, batch_size: int = 500,
                  progress: Callable[[float], None] | None = None) -> torch.Tensor:
    """``p(y|x) = softmax(f(x))``: ``[N, C, H, W]`` in ``[-1, 1]`` -> ``[N, K]`` float32 (CPU), rows sum to 1.

    See :func:`predict_logits` for arguments and errors.
    """
    return torch.softmax(predict_logits(model, x, batch_size, progress), dim=1)


def _check_probs(probs: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    probs = torch.as_tensor(probs)
    y = torch.as_tensor(y).long().reshape(-1).cpu()
    if probs.dim() != 2 or probs.shape[0] == 0:
        raise ValueError(f"probs must be a non-empty [N, K] tensor; got {tuple(probs.shape)}")
    if probs.shape[0] != y.shape[0]:
        raise ValueError(f"got {y.shape[0]} labels for {probs.shape[0]} rows of probabilities")
    probs = probs.detach().cpu().double()
    if not torch.isfinite(probs).all() or probs.min() < 0:
        raise ValueError("probs must be finite and non-negative")
    if (probs.sum(1) - 1).abs().max() > 1e-3:
        raise ValueError("each row of probs must sum to 1 (pass softmax outputs, not logits)")
    if int(y.min()) < 0 or int(y.max()) >= probs.shape[1]:
        raise ValueError(f"labels must lie in [0, {probs.shape[1]}); got min {int(y.min())}, max {int(y.max())}")
    return probs / probs.sum(1, keepdim=True), y  # float32 softmax rows sum to 1 only within ~1e-7


def calibration_report(probs: torch.Tensor, y: torch.Tensor, n_bins: int = 15) -> CalibrationReport:
    """Accuracy, ECE, MCE, NLL, Brier score and reliability bins of predicted probabilities.

    ECE / MCE: Guo et al. (2017), eq. (3) and (5), on top-label confidence with ``n_bins``
    equal-width bins (torchmetrics ``binary_calibration_error`` on (confidence, correct), which is
    the multi-class top-label definition). Brier: Brier (1950), the multi-class sum over classes
    (scikit-learn ``brier_score_loss`` with ``scale_by_half=False``), so it lies in ``[0, 2]``.

    Args:
        probs: ``[N, K]`` probabilities (rows sum to 1), any float dtype.
        y: ``[N]`` int labels in ``[0, K)``.
        n_bins: number of equal-width confidence bins (>= 1; default 15, as Guo et al.).

    Returns:
        :class:`CalibrationReport`.

    Raises:
        ValueError: shapes disagree, rows do not sum to 1, labels out of range, ``n_bins < 1``.
    """
    from sklearn.metrics import brier_score_loss
    from torchmetrics.functional.classification import binary_calibration_error

    if int(n_bins) < 1:
        raise ValueError(f"n_bins must be >= 1; got {n_bins}")
    n_bins = int(n_bins)
    probs, y = _check_probs(probs, y)
    conf64, pred = probs.max(dim=1)
    correct = pred.eq(y)
    conf = conf64.float().clamp(0.0, _BELOW_ONE)
    acc_f = correct.float()
    ece = float(binary_calibration_error(conf, correct.long(), n_bins=n_bins, norm="l1"))
    mce = float(binary_calibration_error(conf, correct.long(), n_bins=n_bins, norm="max"))
    nll = float(-torch.log(probs.gather(1, y[:, None]).squeeze(1).clamp_min(1e-300)).mean())
    brier = float(brier_score_loss(y.numpy(), probs.numpy(), labels=list(range(probs.shape[1])), scale_by_half=False))
    # Reliability bins with the same rule as torchmetrics (bucketize right=True on linspace edges).
    edges = torch.linspace(0, 1, n_bins + 1, dtype=conf.dtype)
    idx = (torch.bucketize(conf, edges, right=True) - 1).clamp(0, n_bins - 1)
    bins = []
    for m in range(n_bins):
        sel = idx == m
        c = int(sel.sum())
        bins.append(ReliabilityBin(float(edges[m]), float(edges[m + 1]),
                                   float(conf[sel].double().mean()) if c else math.nan,
                                   float(acc_f[sel].double().mean()) if c else math.nan, c))
    return CalibrationReport(float(acc_f.mean()), ece, mce, nll, brier, n_bins, conf, correct, bins)


def fit_temperature(logits: torch.Tensor, y: torch.Tensor, max_iter: int = 200) -> float:
    """Temperature ``T > 0`` minimising the NLL of ``softmax(logits / T)`` (Guo et al. 2017, sec. 4.2).

    Fit it on a held-out split that the evaluation does not use. ``log T`` is optimised with
    L-BFGS (so ``T`` stays positive), starting from ``T = 1``; accuracy is unchanged by ``T``.

    Args:
        logits: ``[N, K]`` float logits of the held-out images.
        y: ``[N]`` int labels in ``[0, K)``.
        max_iter: L-BFGS iterations.

    Returns:
        the temperature as a Python float (``> 1`` softens over-confident predictions).

    Raises:
        ValueError: empty or mismatched inputs, non-finite logits.
    """
    logits = torch.as_tensor(logits).detach().cpu().double()
    y = torch.as_tensor(y).long().reshape(-1).cpu()
    if logits.dim() != 2 or logits.shape[0] == 0 or logits.shape[0] != y.shape[0]:
        raise ValueError(f"need logits [N, K] and labels [N] with N >= 1; got {tuple(logits.shape)} and {tuple(y.shape)}")
    if not torch.isfinite(logits).all():
        raise ValueError("logits must be finite")
    log_t = torch.zeros(1, dtype=torch.float64, requires_grad=True)
    opt = torch.optim.LBFGS([log_t], lr=0.1, max_iter=max_iter, line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        opt.zero_grad()
        loss = F.cross_entropy(logits / log_t.exp(), y)
        loss.backward()
        return loss

    with torch.enable_grad():
        opt.step(closure)
    t = float(log_t.detach().exp())
    if not math.isfinite(t) or t <= 0:  # a degenerate split (e.g. all correct with huge margins)
        return 1.0
    return t


class TemperatureScaled(nn.Module):
    """A classifier whose logits are divided by a fixed temperature: ``f(x) / T``.

    Args:
        model: module ``[N, C, H, W] -> [N, K]`` logits.
        temperature: ``T > 0`` (from :func:`fit_temperature`).

    Raises:
        ValueError: ``temperature`` not positive and finite.
    """

    def __init__(self, model: nn.Module, temperature: float):
        super().__init__()
        if not (temperature > 0 and math.isfinite(temperature)):
            raise ValueError(f"temperature must be a positive number; got {temperature}")
        self.model = model
        self.temperature = float(temperature)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Scaled logits ``[N, K]`` for ``x`` ``[N, C, H, W]`` in ``[-1, 1]``."""
        return self.model(x) / self.temperature
