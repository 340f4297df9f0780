"""Sample quality without downloads: a judge classifier's accuracy on class-conditional samples,
and a Fréchet distance in the judge's penultimate-feature space.

Inception-based scores (IS, FID) need ImageNet weights and 299x299 RGB inputs; for digits and
MNIST we use the baseline classifier instead (the "classifier FID" idea of Heusel et al. 2017,
eq. 6, with a domain-specific feature extractor):

- ``conditional_accuracy``: draw ``n_per_class`` samples of every class ``y`` by SGLD on
  ``E(x, y) = -f(x)[y]`` and report the fraction the judge labels ``y``. A high value alone proves
  little: class-conditional SGLD can fool a classifier the way an adversarial attack does.
- ``classifier_fid``: ``||mu_s - mu_t||^2 + Tr(S_s + S_t - 2 (S_s S_t)^(1/2))`` between the judge's
  features of the samples and of test images (torchmetrics ``FrechetInceptionDistance`` with the
  judge's ``features`` as its feature extractor). ``classifier_fid_floor`` is the same distance
  between two disjoint sets of test images of the samples' size: the value a perfect sampler would
  reach with this many images.

What does not live here: drawing the samples (:mod:`jem_core.generation`), the trainer's per-epoch check
of replay-buffer samples (:mod:`jem_core.training`).
"""

from __future__ import annotations

from typing import Any, Callable

import torch
from torch import nn

from ..checkpoint import LoadedCheckpoint
from ..generation import draw_samples
from ..utils import eval_mode

__all__ = ["conditional_samples", "classifier_fid", "sample_quality", "FeatureExtractor"]


class FeatureExtractor(nn.Module):
    """Wrap a classifier's ``features(x) -> [N, D]`` as a torchmetrics feature extractor.

    Args:
        model: a :class:`~jem_core.energy.JEM` or a backbone with a ``features`` method.
        example: ``[1, C, H, W]`` (or more) input images, used once to find the feature size ``D``.

    Raises:
        AttributeError: the model has no ``features`` method.
    """

    def __init__(self, model: nn.Module, example: torch.Tensor):
        super().__init__()
        if not hasattr(model, "features"):
            raise AttributeError(f"{type(model).__name__} has no features(x) method")
        self.model = model
        self.num_features = int(self.forward(example[:1]).shape[1])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``[N, C, H, W]`` in ``[-1, 1]`` -> ``[N, D]`` float features."""
        with torch.no_grad():
            p = next(self.model.parameters(), None)
            return self.model.features(x.to(p.device if p is not None else "cpu")).float()


def conditional_samples(ck: LoadedCheckpoint, n_per_class: int = 20, steps: int | None = None, seed: int = 0,
                        init: str = "auto", progress: Callable[[float], None] | None = None
                        ) -> tuple[torch.Tensor, torch.Tensor, dict[str, Any]]:
    """Class-conditional SGLD samples, ``n_per_class`` of every class, via :func:`jem_core.generation.draw_samples`.

    Args:
        ck: a loaded checkpoint (its JEM is sampled on ``E(x, y)``).
        n_per_class: samples per class (>= 1).
        steps: SGLD steps (default: 100 from the replay buffer, 500 from noise).
        seed: the same seed gives the same samples.
        init: ``"auto"`` (the stored replay buffer when present), ``"buffer"`` or ``"noise"``.
        progress: called with the fraction done in ``[0, 1]`` after every class.

    Returns:
        ``(x [K * n_per_class, C, H, W]`` float32 in ``[-1, 1]``, ``y [K * n_per_class]`` int64
        (class-major order), ``info`` dict from ``draw_samples`` (init, steps, sampler)).

    Raises:
        ValueError: ``n_per_class < 1`` or a bad init.
    """
    if n_per_class < 1:
        raise ValueError(f"n_per_class must be >= 1; got {n_per_class}")
    k = int(ck.metadata["n_classes"])
    xs, ys, info = [], [], {}
    for c in range(k):
        y = torch.full((n_per_class,), c, dtype=torch.long)
        x, info = draw_samples(ck, n_per_class, steps=steps, label=y, init=init, seed=seed * 1000 + c)
        xs.append(x)
        ys.append(y)
        if progress is not None:
            progress((c + 1) / k)
    info = {**info, "label": "per-class"}
    return torch.cat(xs), torch.cat(ys), info


def classifier_fid(judge: nn.Module, x_a: torch.Tensor, x_b: torch.Tensor, batch_size: int = 500) -> float:
    """Fréchet distance (Heusel et al. 2017, eq. 6) between two image sets in ``judge``'s feature space.

    Args:
        judge: model with ``features(x) -> [N, D]``.
        x_a, x_b: ``[N_a, C, H, W]`` and ``[N_b, C, H, W]`` float32 in ``[-1, 1]`` (N >= 2 each).
        batch_size: images per feature pass.

    Returns:
        the distance (>= 0; 0 for identical feature statistics), a float.

    Raises:
        ValueError: fewer than 2 images in a set; AttributeError: no ``features`` method.
    """
    from torchmetrics.image.fid import FrechetInceptionDistance

    if len(x_a) < 2 or len(x_b) < 2:
        raise ValueError(f"need at least 2 images per set; got {len(x_a)} and {len(x_b)}")
    with eval_mode(judge):
        fid = FrechetInceptionDistance(feature=FeatureExtractor(judge, x_b), reset_real_features=True)
        for i in range(0, len(x_b), batch_size):
            fid.update(x_b[i:i + batch_size], real=True)
        for i in range(0, len(x_a), batch_size):
            fid.update(x_a[i:i + batch_size], real=False)
        return max(0.0, float(fid.compute()))


@torch.no_grad()
def _judge_accuracy(judge: nn.Module, x: torch.Tensor, y: torch.Tensor, batch_size: int = 500) -> float:
    p = next(judge.parameters(), None)
    dev = p.device if p is not None else torch.device("cpu")
    with eval_mode(judge):
        pred = torch.cat([judge(x[i:i + batch_size].to(dev)).argmax(1).cpu() for i in range(0, len(x), batch_size)])
    return float((pred == y).float().mean())


def sample_quality(ck: LoadedCheckpoint, judge: nn.Module, test_x: torch.Tensor, n_per_class: int = 20,
                   steps: int | None = None, seed: int = 0, init: str = "auto",
                   progress: Callable[[float], None] | None = None, keep_samples: bool = False) -> dict[str, Any]:
    """Judge-classifier accuracy on class-conditional samples and the classifier-feature Fréchet distance.

    Args:
        ck: checkpoint to sample from.
        judge: classifier with ``features`` (the baseline classifier; it should not be ``ck``'s own
            model, or the accuracy only says the sampler fools its own classifier).
        test_x: ``[M, C, H, W]`` test images in ``[-1, 1]``; the first half (at most ``K * n_per_class``
            images) is the reference set, a disjoint slice of the same size gives the floor.
        n_per_class, steps, seed, init, progress: see :func:`conditional_samples`.
        keep_samples: add the samples under ``"_samples"`` (``x``, ``y`` tensors; not JSON).

    Returns:
        ``{"conditional_accuracy": float in [0, 1], "classifier_fid": float, "classifier_fid_floor":
        float or None (when ``test_x`` is too small), "n_samples": int, "n_reference": int,
        "steps": int, "init": str}``.

    Raises:
        ValueError: ``n_per_class < 1``, fewer than 4 test images.
    """
    if len(test_x) < 4:
        raise ValueError(f"need at least 4 test images; got {len(test_x)}")
    xs, ys, info = conditional_samples(ck, n_per_class, steps, seed, init, progress)
    n_ref = min(len(xs), len(test_x) // 2)
    ref = test_x[:n_ref]
    other = test_x[n_ref:2 * n_ref]
    out: dict[str, Any] = {
        "conditional_accuracy": _judge_accuracy(judge, xs, ys),
        "classifier_fid": classifier_fid(judge, xs, ref),
        "classifier_fid_floor": classifier_fid(judge, other, ref) if len(other) >= 2 else None,
        "n_samples": int(len(xs)), "n_reference": int(n_ref), "steps": int(info["steps"]), "init": info["init"],
    }
    if keep_samples:
        out["_samples"] = {"x": xs, "y": ys}
    return out
