"""Energies from logits, and the JEM wrapper module.

Grathwohl et al. (2019), "Your classifier is secretly an energy based model and you
should treat it like one", section 2:

- eq. (4): ``p(x, y) = exp(f(x)[y]) / Z``, so the joint energy is ``E(x, y) = -f(x)[y]``;
- eq. (5): ``p(x) = sum_y exp(f(x)[y]) / Z``, so ``E(x) = -logsumexp_y f(x)[y]``;
- ``p(y|x) = softmax(f(x))[y]`` is the usual classifier, independent of ``Z``.

``log p(x)`` and ``log p(x, y)`` are only known up to the constant ``log Z``; the
functions below return the *unnormalised* values (``log p~(x) = -E(x)``; ``log p~(x, y) = -E(x, y)``
is :func:`class_energy` negated), which is what sampling, OOD scores and the JEM loss need.
What does not live here: sampling (:mod:`jem_core.sampling`) and ``log Z`` (:mod:`jem_core.likelihood`).
"""

from __future__ import annotations

import torch
from torch import nn

__all__ = [
    "energy",
    "class_energy",
    "log_px_unnormalized",
    "log_p_y_given_x",
    "JEM",
]


def _check_logits(logits: torch.Tensor) -> None:
    if not torch.is_tensor(logits) or logits.dim() != 2:
        shape = tuple(logits.shape) if torch.is_tensor(logits) else type(logits).__name__
        raise ValueError(f"logits must be a tensor of shape [N, K]; got {shape}")


def energy(logits: torch.Tensor) -> torch.Tensor:
    """Marginal energy ``E(x) = -logsumexp_y f(x)[y]`` (JEM eq. 5).

    Args:
        logits: ``[N, K]`` float tensor, the classifier's logits ``f(x)``.

    Returns:
        ``[N]`` float tensor (same dtype), lower = more likely under ``p(x)``.

    Raises:
        ValueError: if ``logits`` is not 2-D.
    """
    _check_logits(logits)
    return -torch.logsumexp(logits, dim=1)


def class_energy(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Joint energy ``E(x, y) = -f(x)[y]`` (JEM eq. 4).

    Args:
        logits: ``[N, K]`` float tensor.
        y: ``[N]`` int64 labels in ``[0, K)``.

    Returns:
        ``[N]`` float tensor.

    Raises:
        ValueError: if the shapes do not match or a label is out of range.
    """
    _check_logits(logits)
    y = torch.as_tensor(y, device=logits.device).long().reshape(-1)
    if y.shape[0] != logits.shape[0]:
        raise ValueError(f"got {y.shape[0]} labels for {logits.shape[0]} logits rows")
    if y.numel() and (int(y.min()) < 0 or int(y.max()) >= logits.shape[1]):
        raise ValueError(f"labels must lie in [0, {logits.shape[1]}); got min {int(y.min())}, max {int(y.max())}")
    return -logits.gather(1, y[:, None]).squeeze(1)


def log_px_unnormalized(logits: torch.Tensor) -> torch.Tensor:
    """Unnormalised ``log p~(x) = logsumexp_y f(x)[y] = -E(x)``; ``[N, K] -> [N]``."""
    return -energy(logits)


def log_p_y_given_x(logits: torch.Tensor) -> torch.Tensor:
    """Normalised classifier ``log p(y|x) = log_softmax(f(x))``; ``[N, K] -> [N, K]``."""
    _check_logits(logits)
    return torch.log_softmax(logits, dim=1)


class JEM(nn.Module):
    """Wrap any backbone ``f: [N, C, H, W] -> logits [N, K]`` as a Joint Energy-based Model.

    The wrapper adds no parameters; ``state_dict`` keys are the backbone's under ``f.``.

    Args:
        backbone: module returning logits. If it has ``features(x) -> [N, D]`` that is
            exposed as :meth:`features` (used for the classifier-feature Fréchet distance).
    """

    def __init__(self, backbone: nn.Module):
        super().__init__()
        self.f = backbone

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits ``[N, K]`` for images ``[N, C, H, W]`` float32 in ``[-1, 1]``."""
        return self.f(x)

    def energy(self, x: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
        """``E(x)`` (``y`` None) or ``E(x, y)``, shape ``[N]``."""
        logits = self.f(x)
        return energy(logits) if y is None else class_energy(logits, y)

    def log_px(self, x: torch.Tensor) -> torch.Tensor:
        """Unnormalised ``log p~(x)``, shape ``[N]``."""
        return log_px_unnormalized(self.f(x))

    def log_p_y_given_x(self, x: torch.Tensor) -> torch.Tensor:
        """``log p(y|x)``, shape ``[N, K]``."""
        return log_p_y_given_x(self.f(x))

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """Penultimate features ``[N, D]`` of the backbone.

        Raises:
            AttributeError: if the backbone has no ``features`` method.
        """
        if not hasattr(self.f, "features"):
            raise AttributeError(f"{type(self.f).__name__} has no features(x) method")
        return self.f.features(x)
