"""The training objectives: the JEM loss and the cross-entropy baseline, each with its batch statistics.

What lives here: the loss of one batch given the model, the images, their labels, the SGLD samples and the
weights, and the numbers that describe it (cross-entropy, the p(x) term, energies, the largest logit...).
What does not: drawing the samples (:mod:`jem_core.sampling`: SGLD and the replay buffer), augmentation
(:mod:`jem_core.data`), the optimiser step, schedules of the weights, the divergence guard and checkpoints
(:mod:`jem_core.training`).

JEM objective (Grathwohl et al. 2019, eq. 8-9)::

    loss = CE(f(x_l), y_l)                                      # log p(y|x)
         + px_weight  * [mean E(x_data) - mean E(x_sample)]     # contrastive log p(x) (eq. 2-3)
         + pxy_weight * [mean E(x_data, y) - mean E(x_sample_y, y)]   # optional log p(x|y)
         + energy_l2  * mean(E(x_data)^2 + E(x_sample)^2)       # stabiliser (Du & Mordatch 2019)

with ``E(x) = -logsumexp_y f(x)[y]`` and ``E(x, y) = -f(x)[y]`` (:mod:`jem_core.energy`).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["jem_loss", "baseline_loss"]


def _accuracy(logits: torch.Tensor, y: torch.Tensor) -> float:
    """Fraction in [0, 1] of rows of ``logits`` ``[B, K]`` whose argmax is ``y`` ``[B]``."""
    return float((logits.detach().argmax(1) == y).float().mean())


def baseline_loss(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, dict[str, float]]:
    """The baseline objective: cross-entropy only, ``CE(f(x), y)`` (mean over the batch, nats).

    Args:
        model: ``[B, C, H, W] -> [B, K]`` logits (a plain or DDP-wrapped module).
        x: ``[B, C, H, W]`` float32 labelled images in ``[-1, 1]`` (augmented).
        y: ``[B]`` int64 labels in ``[0, K)``.

    Returns:
        ``(loss, stats)``: the scalar loss with its graph, and ``{"ce" (nats), "px": 0.0, "energy_data"
        (mean E(x) = -logsumexp f(x), nats), "energy_samples": NaN (no samples), "accuracy" (in [0, 1])}``.
    """
    logits = model(x)
    loss = F.cross_entropy(logits, y)
    stats = {"ce": float(loss.detach()), "px": 0.0, "energy_data": float(-torch.logsumexp(logits.detach(), 1).mean()),
             "energy_samples": float("nan"), "accuracy": _accuracy(logits, y)}
    return loss, stats


def jem_loss(model: nn.Module, x_lab: torch.Tensor, y_lab: torch.Tensor, x_samples: torch.Tensor, *,
             x_data: torch.Tensor | None = None, y_cond: torch.Tensor | None = None, px_weight: float = 1.0,
             pxy_weight: float = 0.0, energy_l2: float = 0.0) -> tuple[torch.Tensor, dict[str, float]]:
    """The JEM objective of one batch (Grathwohl et al. 2019, eq. 8-9; the formula in the module docstring).

    All images go through ``model`` in one forward pass (``[x_lab, x_data, x_samples]``), so batch-norm
    layers see data and samples together, as in the official code.

    Args:
        model: ``[B, C, H, W] -> [B, K]`` logits (a plain or DDP-wrapped module).
        x_lab: ``[L, C, H, W]`` float32 labelled images (the cross-entropy batch), in ``[-1, 1]`` plus data noise.
        y_lab: ``[L]`` int64 labels in ``[0, K)``.
        x_samples: ``[N, C, H, W]`` float32 SGLD samples (the replay buffer's chains after this iteration's steps).
        x_data: ``[N, C, H, W]`` images for the p(x) term (semi-supervised: the whole, mostly unlabelled batch);
            None = ``x_lab`` (then ``L == N``).
        y_cond: ``[N]`` int64 labels the samples were conditioned on (needed when ``pxy_weight > 0``); the
            p(x|y) term compares them with the first ``N`` labelled images.
        px_weight: weight (>= 0) of ``mean E(x_data) - mean E(x_samples)``.
        pxy_weight: weight (>= 0) of ``mean E(x_lab[:N], y_cond) - mean E(x_samples, y_cond)``.
        energy_l2: weight (>= 0) of ``mean E(x_data)^2 + mean E(x_samples)^2``.

    Returns:
        ``(loss, stats)``: the scalar loss with its graph, and the batch's numbers: ``"ce"`` (nats), ``"px"``
        (``mean E(data) - mean E(samples)``, nats, before weighting), ``"energy_data"``, ``"energy_samples"``
        (means, nats; lower = more likely), ``"sample_absmax"`` (largest ``|x|`` of a sample, pixel units),
        ``"px_weight"``, ``"energy_l2"`` (the weights used), ``"logit_absmax"`` (largest ``|logit|`` over all
        images) and ``"accuracy"`` (on the labelled images, in [0, 1]).

    Raises:
        ValueError: ``pxy_weight > 0`` without ``y_cond``.
    """
    if pxy_weight > 0 and y_cond is None:
        raise ValueError("the p(x|y) term (pxy_weight > 0) needs y_cond, the labels the samples were drawn for")
    n = x_samples.shape[0]
    parts = [x_lab] + ([x_data] if x_data is not None else []) + [x_samples]
    logits_all = model(torch.cat(parts))
    nl = x_lab.shape[0]
    logits_lab = logits_all[:nl]
    logits_data = logits_all[nl:nl + n] if x_data is not None else logits_lab
    logits_q = logits_all[-n:]
    ce = F.cross_entropy(logits_lab, y_lab)
    lse_d, lse_q = torch.logsumexp(logits_data, 1), torch.logsumexp(logits_q, 1)
    px = lse_q.mean() - lse_d.mean()  # = E(data) - E(samples)
    loss = ce + px_weight * px
    if pxy_weight > 0:
        pxy = logits_q.gather(1, y_cond[:, None]).mean() - logits_lab[:n].gather(1, y_cond[:, None]).mean()
        loss = loss + pxy_weight * pxy
    if energy_l2 > 0:
        loss = loss + energy_l2 * (lse_d.pow(2).mean() + lse_q.pow(2).mean())
    stats = {"ce": float(ce.detach()), "px": float(px.detach()), "energy_data": float(-lse_d.detach().mean()),
             "energy_samples": float(-lse_q.detach().mean()), "sample_absmax": float(x_samples.detach().abs().max()),
             "px_weight": px_weight, "energy_l2": energy_l2, "logit_absmax": float(logits_all.detach().abs().max()),
             "accuracy": _accuracy(logits_lab, y_lab)}
    return loss, stats
