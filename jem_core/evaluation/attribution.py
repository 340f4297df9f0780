"""Attribution maps with captum: which pixels drive a class logit, or the energy.

Targets:

- ``"class"``: the logit ``f(x)[y]`` of a class (the predicted one unless ``label`` is given);
- ``"energy"``: ``-E(x) = logsumexp_y f(x)[y]`` (JEM eq. 5), i.e. which pixels make the input
  likely under the model's ``p(x)``.

Methods (captum): ``saliency`` (|gradient|; Simonyan et al. 2014), ``integrated_gradients``
(Sundararajan et al. 2017; path from a baseline image to the input) and ``noise_tunnel``
(SmoothGrad over Integrated Gradients; Smilkov et al. 2017).

What does not live here: showing the maps (``pages/score.py``), the energy itself (:mod:`jem_core.energy`).
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import nn

from ..energy import energy
from ..utils import device_of
from .robustness import attack_mode

__all__ = ["ATTRIBUTION_METHODS", "ATTRIBUTION_TARGETS", "attribution_maps"]

ATTRIBUTION_METHODS = ("saliency", "integrated_gradients", "noise_tunnel")
ATTRIBUTION_TARGETS = ("class", "energy")


class _NegEnergy(nn.Module):
    """``x -> logsumexp f(x)`` (``[N]``): the unnormalised ``log p(x) = -E(x)``."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return -energy(self.model(x))


def attribution_maps(model: nn.Module, x: torch.Tensor, target: str = "class", method: str = "saliency",
                     label: int | torch.Tensor | None = None, baseline: str | float = "black", n_steps: int = 32,
                     nt_samples: int = 8, nt_stdev: float = 0.2, batch_size: int = 64,
                     progress: Callable[[float], None] | None = None) -> torch.Tensor:
    """Per-pixel attributions ``[N, H, W]`` for a class logit or for the energy ``-E(x)``.

    Args:
        model: logits model ``[N, C, H, W] -> [N, K]``; eval mode and frozen parameters during the
            call (flags restored; weights never modified).
        x: ``[N, C, H, W]`` float32 in ``[-1, 1]``.
        target: ``"class"`` (logit ``f(x)[label]``) or ``"energy"`` (``logsumexp f(x)``).
        method: ``"saliency"``, ``"integrated_gradients"`` or ``"noise_tunnel"``.
        label: class for ``target="class"``: an int, ``[N]`` int64, or None for the predicted class.
        baseline: Integrated-Gradients start image: ``"black"`` (all -1, the blank background of
            MNIST-like data), ``"zero"`` (mid-grey 0) or a constant in ``[-1, 1]``.
        n_steps: Integrated-Gradients path steps.
        nt_samples, nt_stdev: Noise Tunnel (SmoothGrad) samples and noise std (``[-1, 1]`` units).
        batch_size: images per captum call.
        progress: called with the fraction done in ``[0, 1]`` after every batch.

    Returns:
        ``[N, H, W]`` float32 on the CPU. Channels are combined by summing: absolute gradients for
        saliency (>= 0), signed attributions for IG / Noise Tunnel (positive = raises the target).

    Raises:
        ValueError: unknown target, method or baseline; a label out of range; ``x`` not 4-D.
    """
    from captum.attr import IntegratedGradients, NoiseTunnel, Saliency

    if target not in ATTRIBUTION_TARGETS:
        raise ValueError(f"unknown target {target!r}; use one of {', '.join(ATTRIBUTION_TARGETS)}")
    if method not in ATTRIBUTION_METHODS:
        raise ValueError(f"unknown method {method!r}; use one of {', '.join(ATTRIBUTION_METHODS)}")
    if x.dim() != 4:
        raise ValueError(f"x must be [N, C, H, W]; got {tuple(x.shape)}")
    if isinstance(baseline, str):
        if baseline not in ("black", "zero"):
            raise ValueError(f"baseline must be 'black', 'zero' or a number in [-1, 1]; got {baseline!r}")
        base_value = -1.0 if baseline == "black" else 0.0
    else:
        base_value = float(baseline)
        if not -1.0 <= base_value <= 1.0:
            raise ValueError(f"baseline must lie in [-1, 1]; got {baseline}")
    dev = device_of(model)
    n = x.shape[0]
    labels: torch.Tensor | None = None
    if target == "class" and label is not None:
        labels = torch.as_tensor(label, dtype=torch.long).reshape(-1)
        labels = labels.expand(n).clone() if labels.numel() == 1 else labels
        if labels.shape[0] != n:
            raise ValueError(f"label must be an int or [N] tensor with N = {n}; got {tuple(labels.shape)}")
    forward = _NegEnergy(model) if target == "energy" else model
    out = []
    with attack_mode(model):
        if labels is None and target == "class":
            with torch.no_grad():
                labels = torch.cat([model(x[i:i + batch_size].to(dev)).argmax(1).cpu() for i in range(0, n, batch_size)])
        if labels is not None:
            k = None
            with torch.no_grad():
                k = model(x[:1].to(dev)).shape[1]
            if int(labels.min()) < 0 or int(labels.max()) >= k:
                raise ValueError(f"labels must lie in [0, {k}); got {labels.tolist()[:10]}")
        for i in range(0, n, batch_size):
            xb = x[i:i + batch_size].to(dev).detach().clone().requires_grad_(True)
            tb = None if labels is None else labels[i:i + batch_size].to(dev)
            if method == "saliency":
                a = Saliency(forward).attribute(xb, target=tb, abs=True)
            else:
                ig = IntegratedGradients(forward)
                base = torch.full_like(xb, base_value)
                if method == "integrated_gradients":
                    a = ig.attribute(xb, baselines=base, target=tb, n_steps=n_steps)
                else:
                    a = NoiseTunnel(ig).attribute(xb, nt_type="smoothgrad", nt_samples=nt_samples, stdevs=nt_stdev,
                                                  baselines=base, target=tb, n_steps=n_steps)
            out.append(a.detach().float().sum(dim=1).cpu())
            if progress is not None:
                progress(min(1.0, (i + batch_size) / max(1, n)))
    return torch.cat(out) if out else torch.zeros(0, *x.shape[2:])
