"""Out-of-distribution (OOD) detection: per-example scores, AUROC / AUPR / FPR@95TPR, OOD sets.

Scores (Grathwohl et al. 2019, sec. 5.3, table 3); for every score, **higher means more
in-distribution**:

- ``log_px``: the unnormalised ``log p(x) = logsumexp_y f(x)[y] = -E(x)`` (JEM eq. 5);
- ``max_prob``: ``max_y p(y|x)``, the usual classifier baseline (Hendrycks & Gimpel 2017);
- ``neg_grad_norm``: ``-||∇_x log p(x)||_2``, JEM's "approximate mass" score: inputs in a region
  of high, flat density have small gradients (Grathwohl et al. 2019, sec. 5.3).

Metrics treat in-distribution as the **positive** class (scikit-learn's ``roc_auc_score``,
``average_precision_score`` and ``roc_curve``): AUROC, AUPR-in, and FPR@95TPR = the fraction of
OOD inputs accepted at the threshold that accepts 95% of in-distribution inputs.

What does not live here: generating the synthetic OOD sets (:mod:`jem_core.data`), AUROC intervals and
verdicts (:mod:`.verdicts`), ROC plots (:mod:`.figures`, ``app/figures.py``).
"""

from __future__ import annotations

import os
from typing import Callable, Sequence

import numpy as np
import torch
from torch import nn

from ..data import SYNTHETIC_OOD, load_dataset, synthetic_ood
from ..energy import energy
from ..sampling import frozen_parameters
from ..utils import device_of, eval_mode

__all__ = ["OOD_SCORES", "SCORE_LABELS", "ood_scores", "ood_score_table", "ood_metrics", "roc_curve_data",
           "load_ood_set", "match_shape", "is_known_ood_spec"]

OOD_SCORES = ("log_px", "max_prob", "neg_grad_norm")
SCORE_LABELS = {"log_px": "log p(x)", "max_prob": "max p(y|x)", "neg_grad_norm": "-||∇x log p(x)||"}


def _batch_scores(model: nn.Module, xb: torch.Tensor, scores: Sequence[str]) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    if "neg_grad_norm" in scores:
        with torch.enable_grad():
            xg = xb.detach().requires_grad_(True)
            logits = model(xg).float()
            lse = -energy(logits)
            # Examples are independent (eval mode, no batch norm statistics), so the gradient of the
            # batch sum gives every example's own gradient.
            (g,) = torch.autograd.grad(lse.sum(), xg)
        out["neg_grad_norm"] = -g.flatten(1).norm(dim=1).detach()
        logits = logits.detach()
    else:
        with torch.no_grad():
            logits = model(xb).float()
    if "log_px" in scores:
        out["log_px"] = -energy(logits)
    if "max_prob" in scores:
        out["max_prob"] = torch.softmax(logits, 1).max(1).values
    return out


def ood_score_table(model: nn.Module, x: torch.Tensor, scores: Sequence[str] = OOD_SCORES, batch_size: int = 250,
                    progress: Callable[[float], None] | None = None) -> dict[str, torch.Tensor]:
    """Several OOD scores in one pass over ``x``.

    Args:
        model: logits model ``[B, C, H, W] -> [B, K]``; put in eval mode for the call, its parameters
            frozen (restored afterwards, never modified).
        x: ``[N, C, H, W]`` float32 in ``[-1, 1]``.
        scores: names from :data:`OOD_SCORES`.
        batch_size: images per pass (>= 1).
        progress: called with the fraction done in ``[0, 1]`` after every batch.

    Returns:
        ``{score: [N] float32 CPU tensor}``, higher = more in-distribution.

    Raises:
        ValueError: unknown score name, ``x`` not 4-D, ``batch_size < 1``.
    """
    bad = [s for s in scores if s not in OOD_SCORES]
    if bad:
        raise ValueError(f"unknown OOD score(s) {bad}; use {', '.join(OOD_SCORES)}")
    if x.dim() != 4:
        raise ValueError(f"x must be [N, C, H, W]; got {tuple(x.shape)}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1; got {batch_size}")
    dev = device_of(model)
    parts: dict[str, list[torch.Tensor]] = {s: [] for s in scores}
    with eval_mode(model), frozen_parameters(model):
        for i in range(0, len(x), batch_size):
            for k, v in _batch_scores(model, x[i:i + batch_size].to(dev), scores).items():
                parts[k].append(v.cpu())
            if progress is not None:
                progress(min(1.0, (i + batch_size) / max(1, len(x))))
    return {k: torch.cat(v) if v else torch.zeros(0) for k, v in parts.items()}


def ood_scores(model: nn.Module, x: torch.Tensor, score: str = "log_px", batch_size: int = 250,
               progress: Callable[[float], None] | None = None) -> torch.Tensor:
    """One OOD score per example: ``[N, C, H, W]`` in ``[-1, 1]`` -> ``[N]`` float32 (CPU), higher = more in-distribution.

    ``score`` is ``"log_px"`` (``logsumexp f(x)``), ``"max_prob"`` (``max p(y|x)``) or
    ``"neg_grad_norm"`` (``-||∇_x logsumexp f(x)||_2`` per example; one backward pass per batch).
    See :func:`ood_score_table` for the other arguments and errors.
    """
    return ood_score_table(model, x, (score,), batch_size, progress)[score]


def _labels_and_scores(scores_in, scores_out) -> tuple[np.ndarray, np.ndarray]:
    a = np.asarray(torch.as_tensor(scores_in).detach().cpu().double()).reshape(-1)
    b = np.asarray(torch.as_tensor(scores_out).detach().cpu().double()).reshape(-1)
    if len(a) == 0 or len(b) == 0:
        raise ValueError(f"need at least one in-distribution and one OOD score; got {len(a)} and {len(b)}")
    s = np.concatenate([a, b])
    # NaN means "no evidence of being in-distribution": rank it lowest. Infinities keep their order.
    big = np.finfo(np.float64).max
    s = np.nan_to_num(s, nan=-big, posinf=big, neginf=-big)
    labels = np.concatenate([np.ones(len(a)), np.zeros(len(b))])
    return labels, s


def ood_metrics(scores_in: torch.Tensor | np.ndarray, scores_out: torch.Tensor | np.ndarray) -> dict[str, float]:
    """AUROC, AUPR and FPR@95TPR of a score separating in-distribution (positive) from OOD inputs.

    Library metrics (scikit-learn ``roc_auc_score``, ``average_precision_score``, ``roc_curve``);
    raw scores are used as they are (no sigmoid), ties count half in AUROC.

    Args:
        scores_in: ``[N_in]`` scores of in-distribution inputs (higher = more in-distribution).
        scores_out: ``[N_out]`` scores of OOD inputs. NaN scores are ranked lowest.

    Returns:
        ``{"auroc": float in [0, 1], "aupr": float in [0, 1] (AUPR-in: precision of detecting
        in-distribution), "fpr95": float in [0, 1]}`` where ``fpr95`` is the fraction of OOD inputs
        scored at or above the highest threshold that keeps >= 95% of in-distribution inputs.
        Identical distributions give AUROC 0.5; perfectly separated ones 1.0 (and fpr95 0).

    Raises:
        ValueError: an empty set.
    """
    from sklearn.metrics import average_precision_score, roc_auc_score, roc_curve

    labels, s = _labels_and_scores(scores_in, scores_out)
    fpr, tpr, _ = roc_curve(labels, s, drop_intermediate=False)
    i = int(np.searchsorted(tpr, 0.95, side="left"))
    return {"auroc": float(roc_auc_score(labels, s)), "aupr": float(average_precision_score(labels, s)),
            "fpr95": float(fpr[min(i, len(fpr) - 1)])}


def roc_curve_data(scores_in: torch.Tensor | np.ndarray, scores_out: torch.Tensor | np.ndarray,
                   max_points: int = 200) -> dict[str, list[float]]:
    """ROC curve points for plotting (in-distribution positive), thinned to about ``max_points``.

    Returns:
        ``{"fpr": [...], "tpr": [...], "threshold": [...]}`` lists of floats of equal length, from
        (0, 0) to (1, 1) (the first threshold is +inf).

    Raises:
        ValueError: an empty set.
    """
    from sklearn.metrics import roc_curve

    labels, s = _labels_and_scores(scores_in, scores_out)
    fpr, tpr, thr = roc_curve(labels, s)
    if len(fpr) > max_points > 2:
        keep = np.unique(np.round(np.linspace(0, len(fpr) - 1, max_points)).astype(int))
        fpr, tpr, thr = fpr[keep], tpr[keep], thr[keep]
    return {"fpr": fpr.tolist(), "tpr": tpr.tolist(), "threshold": [float(t) for t in thr]}


def match_shape(x: torch.Tensor, channels: int, size: int) -> torch.Tensor:
    """Convert images to ``channels`` channels and ``size x size`` pixels (for OOD sets of another shape).

    RGB -> grayscale uses ITU-R 601 luma weights (``torchvision.transforms.functional.rgb_to_grayscale``);
    grayscale -> RGB repeats the channel; resizing is bilinear with antialiasing. Values stay in ``[-1, 1]``.

    Args:
        x: ``[N, C, H, W]`` float32 in ``[-1, 1]`` with ``C`` in (1, 3).
        channels: 1 or 3.
        size: target side in pixels.

    Returns:
        ``[N, channels, size, size]`` float32 (``x`` itself when it already fits).

    Raises:
        ValueError: unsupported channel counts.
    """
    from torchvision.transforms import functional as TF

    if x.shape[1] not in (1, 3) or channels not in (1, 3):
        raise ValueError(f"can only convert between 1 and 3 channels; got {x.shape[1]} -> {channels}")
    if x.shape[1] != channels:
        x = TF.rgb_to_grayscale(x, 1) if channels == 1 else x.repeat(1, 3, 1, 1)
    if tuple(x.shape[2:]) != (size, size):
        x = TF.resize(x, [size, size], antialias=True).clamp_(-1.0, 1.0)
    return x.contiguous()


def is_known_ood_spec(spec: str) -> bool:
    """True for a synthetic set name or a well-formed dataset spec (without checking the files)."""
    from ..data import dataset_shape

    if spec in SYNTHETIC_OOD:
        return True
    try:
        dataset_shape(spec)
    except ValueError:
        return False
    return True


def load_ood_set(spec: str, reference: torch.Tensor, data_root: str | os.PathLike | None = None,
                 n: int | None = None, seed: int = 0) -> torch.Tensor:
    """OOD images shaped like ``reference``: a synthetic set or a dataset spec.

    Args:
        spec: one of :data:`jem_core.data.SYNTHETIC_OOD` (``uniform``, ``gaussian``, ``constant``,
            ``interp``, ``inverted``; made from ``reference``) or a dataset spec (``fashion_mnist``,
            ``cifar10``, ``npz:PATH``, ``folder:PATH``, ...). Built-in datasets use their test split,
            ``npz:``/``folder:`` all their images. Images of another shape are converted with
            :func:`match_shape` (e.g. CIFAR-10 -> grayscale 28x28 for an MNIST model).
        reference: ``[M, C, H, W]`` float32 in ``[-1, 1]`` in-distribution images.
        data_root: torchvision data root (see :func:`jem_core.data.load_dataset`); nothing is downloaded.
        n: number of images (default: M for synthetic sets, all for datasets; fewer when the dataset is smaller).
        seed: fixes the synthetic images.

    Returns:
        ``[n', C, H, W]`` float32 in ``[-1, 1]``.

    Raises:
        ValueError: unknown spec.
        DataUnavailableError: the dataset's files are missing.
    """
    if spec in SYNTHETIC_OOD:
        return synthetic_ood(spec, reference, n, torch.Generator().manual_seed(seed))
    split = "all" if spec.startswith(("npz:", "folder:")) else "test"
    c, h = reference.shape[1], reference.shape[2]
    ds = load_dataset(spec, split, data_root, download=False, channels=c, size=h)
    x = ds.x if n is None else ds.x[:n]
    return match_shape(x, c, h)
