"""Scoring single inputs: prediction, class probabilities, energy and the ``log p(x)`` percentile.

The percentile compares an input's unnormalised ``log p(x) = logsumexp_y f(x)[y]``
(Grathwohl et al. 2019, eq. 5) with the quantiles of the same quantity on the model's test
set, which every checkpoint carries (``metadata["reference"]["logpx_quantiles"]``), so scoring
works offline without the dataset. A low percentile means the input is unusual for the model.

What does not live here: decoding and preprocessing uploads (:mod:`jem_core.images`), computing the
reference quantiles (at training or import: :mod:`jem_core.training`, :mod:`jem_core.official`).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any, Sequence

import numpy as np
import torch
from torch import nn

from .energy import energy

__all__ = ["ScoreResult", "Placement", "logpx_percentile", "place", "score_batch", "UNUSUAL_PERCENTILE"]

UNUSUAL_PERCENTILE = 5.0  # below this percentile of the reference images' log p(x) (checkpoint metadata) an input is "unusual"


@dataclass
class ScoreResult:
    """Score of one image.

    Attributes:
        label: predicted class index.
        label_name: its name.
        probabilities: ``p(y|x)`` for the K classes (sums to 1).
        energy: ``E(x) = -logsumexp f(x)`` (lower = more typical).
        log_px: unnormalised ``log p(x) = -E(x)``.
        percentile: ``log p(x)`` percentile in ``[0, 100]`` against the reference set, or None.
        unusual: percentile below :data:`UNUSUAL_PERCENTILE` (None without a reference).
    """

    label: int
    label_name: str
    probabilities: list[float]
    energy: float
    log_px: float
    percentile: float | None
    unusual: bool | None

    def to_dict(self) -> dict[str, Any]:
        """Plain dict for JSON output."""
        return asdict(self)


def logpx_percentile(log_px: torch.Tensor | np.ndarray | Sequence[float], quantiles: Sequence[float]) -> np.ndarray:
    """Percentile in ``[0, 100]`` of each value among a reference distribution given by its quantiles.

    Args:
        log_px: ``[N]`` values.
        quantiles: ``[Q]`` increasing quantiles at equally spaced levels 0..100 (Q >= 2).

    Returns:
        ``[N]`` float64 percentiles (linear interpolation; 0 below the minimum, 100 above the maximum).

    Raises:
        ValueError: fewer than 2 quantiles.
    """
    q = np.asarray(quantiles, dtype=np.float64)
    if q.ndim != 1 or len(q) < 2:
        raise ValueError(f"need at least 2 reference quantiles; got {q.shape}")
    levels = np.linspace(0.0, 100.0, len(q))
    v = np.asarray(torch.as_tensor(log_px).detach().cpu().double()) if not isinstance(log_px, np.ndarray) else log_px
    # np.interp needs strictly increasing x for a well-defined answer: break ties by tiny offsets.
    q = q + np.arange(len(q)) * 1e-12
    return np.interp(np.asarray(v, dtype=np.float64), q, levels, left=0.0, right=100.0)


@torch.inference_mode()
def score_batch(model: nn.Module, x: torch.Tensor, reference: dict | None = None,
                class_names: Sequence[str] | None = None) -> list[ScoreResult]:
    """Score images with a JEM.

    Args:
        model: logits model (eval mode is the caller's job; cached models already are).
        x: ``[N, C, H, W]`` float32 in ``[-1, 1]`` on the model's device.
        reference: ``{"logpx_quantiles": [...]}`` from the checkpoint metadata, or None.
        class_names: K names (default ``"0".."K-1"``).

    Returns:
        one :class:`ScoreResult` per image.
    """
    logits = model(x).float()
    probs = torch.softmax(logits, 1).cpu()
    e = energy(logits).cpu()
    pct = (logpx_percentile(-e, reference["logpx_quantiles"]) if reference and reference.get("logpx_quantiles")
           else [None] * len(e))
    names = list(class_names) if class_names else [str(i) for i in range(logits.shape[1])]
    out = []
    for i in range(len(e)):
        k = int(probs[i].argmax())
        p = None if pct[i] is None else float(pct[i])
        out.append(ScoreResult(k, names[k] if k < len(names) else str(k), [float(v) for v in probs[i]],
                               float(e[i]), float(-e[i]), p, None if p is None else p < UNUSUAL_PERCENTILE))
    return out


@dataclass(frozen=True)
class Placement:
    """Where one input's score falls among reference (test) scores; higher scores = more typical.

    Attributes:
        value: the input's score.
        percentile: share of reference scores strictly below ``value``, in ``[0, 100]``.
        threshold: the reference's :data:`UNUSUAL_PERCENTILE` th percentile; below it an input is unusual.
        false_alarm_rate: share of the reference scores below the threshold, in ``[0, 1]`` (about
            ``UNUSUAL_PERCENTILE / 100`` by construction; ties make it differ).
        unusual: ``value < threshold``.
    """

    value: float
    percentile: float
    threshold: float
    false_alarm_rate: float
    unusual: bool


def place(value: float, reference: torch.Tensor | np.ndarray | Sequence[float]) -> Placement:
    """Place one score among the reference scores of the test set (any OOD score where higher = more typical).

    Args:
        value: the input's score (e.g. ``log p(x)``, ``max p(y|x)`` or ``-||grad_x log p(x)||``).
        reference: ``[M]`` the same score on M >= 1 test images.

    Returns:
        A :class:`Placement`: percentile, the :data:`UNUSUAL_PERCENTILE` threshold (linear-interpolated
        quantile, numpy's default), the threshold's false-alarm rate on the reference, the verdict.

    Raises:
        ValueError: an empty reference.
    """
    ref = np.asarray(torch.as_tensor(reference).double().cpu() if torch.is_tensor(reference) else reference,
                     dtype=np.float64).ravel()
    if ref.size == 0:
        raise ValueError("the reference scores are empty")
    thr = float(np.quantile(ref, UNUSUAL_PERCENTILE / 100))
    return Placement(float(value), float((ref < value).mean() * 100), thr, float((ref < thr).mean()),
                     bool(value < thr))
