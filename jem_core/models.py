"""Backbones that return logits, and the factory that rebuilds them from checkpoint metadata.

- :class:`ConvNet`: a small all-convolutional network for 1x8x8 (digits) and 1x28x28
  (MNIST, Fashion-MNIST) inputs; LeakyReLU(0.2) and no batch norm by default, as JEM
  recommends (batch norm makes SGLD depend on the batch; Grathwohl et al. 2019, sec. 5).
- :class:`~jem_core.wideresnet.WideResNet`: the WideResNet of the official JEM code for
  3x32x32 (CIFAR-10/100, SVHN), with the official state-dict key names.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from .wideresnet import WideResNet

__all__ = ["ConvNet", "WideResNet", "build_model", "count_parameters", "ARCHITECTURES"]

ARCHITECTURES = ("convnet", "wrn")


def _norm(kind: str | None, channels: int) -> nn.Module:
    if kind in (None, "none"):
        return nn.Identity()
    if kind == "batch":
        return nn.BatchNorm2d(channels)
    if kind == "group":
        return nn.GroupNorm(min(8, channels), channels)
    raise ValueError(f"unknown norm {kind!r}; use None, 'batch' or 'group'")


class ConvNet(nn.Module):
    """Small ConvNet classifier: 4 conv layers (3x3), stride 2 twice, global average pool, linear.

    Channels ``in -> w -> 2w -> 4w -> 4w`` with ``w = width`` (32 by default: 241k
    parameters for 10 classes). Works for any input side >= 4 pixels (8x8 and 28x28 here).

    Args:
        in_channels: 1 (grayscale) or 3.
        n_classes: number of classes K.
        width: base channel count.
        norm: None (default, JEM's choice), ``"batch"`` or ``"group"``.

    Input ``[N, in_channels, H, W]`` float32 in ``[-1, 1]``; output logits ``[N, K]`` float32.
    """

    def __init__(self, in_channels: int = 1, n_classes: int = 10, width: int = 32, norm: str | None = None):
        super().__init__()
        if in_channels < 1 or n_classes < 2 or width < 1:
            raise ValueError(f"need in_channels >= 1, n_classes >= 2, width >= 1; got {in_channels}, {n_classes}, {width}")
        w = width
        act = lambda: nn.LeakyReLU(0.2)  # noqa: E731
        self.body = nn.Sequential(
            nn.Conv2d(in_channels, w, 3, padding=1), _norm(norm, w), act(),
            nn.Conv2d(w, 2 * w, 3, stride=2, padding=1), _norm(norm, 2 * w), act(),
            nn.Conv2d(2 * w, 4 * w, 3, stride=2, padding=1), _norm(norm, 4 * w), act(),
            nn.Conv2d(4 * w, 4 * w, 3, padding=1), _norm(norm, 4 * w), act(),
        )
        self.head = nn.Linear(4 * w, n_classes)
        self.in_channels, self.n_classes = in_channels, n_classes

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """Penultimate features ``[N, 4 * width]`` (global average of the last conv map)."""
        return self.body(x).mean(dim=(2, 3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits ``[N, K]`` for ``x`` ``[N, C, H, W]`` float32 in ``[-1, 1]``."""
        return self.head(self.features(x))


def build_model(arch: str, in_channels: int, n_classes: int, arch_kwargs: dict[str, Any] | None = None) -> nn.Module:
    """Build a backbone by name, as recorded in checkpoint metadata.

    Args:
        arch: ``"convnet"`` or ``"wrn"``.
        in_channels: image channels (1 or 3).
        n_classes: number of classes.
        arch_kwargs: extra constructor arguments (``width``/``norm`` for convnet;
            ``depth``/``widen_factor``/``norm``/``dropout`` for wrn).

    Raises:
        ValueError: unknown architecture or bad arguments.
    """
    kw = dict(arch_kwargs or {})
    if arch == "convnet":
        return ConvNet(in_channels=in_channels, n_classes=n_classes, **kw)
    if arch == "wrn":
        return WideResNet(in_channels=in_channels, n_classes=n_classes, **kw)
    raise ValueError(f"unknown architecture {arch!r}; choose one of {ARCHITECTURES}")


def count_parameters(model: nn.Module) -> int:
    """Number of trainable parameters."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)
