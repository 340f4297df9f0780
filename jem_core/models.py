"""Backbones that return logits, and the factory that rebuilds them from checkpoint metadata.

- :class:`ConvNet`: a small all-convolutional network for 1x8x8 (digits) and 1x28x28
  (MNIST, Fashion-MNIST) inputs; LeakyReLU(0.2) and no batch norm by default, as JEM
  recommends (batch norm makes SGLD depend on the batch; Grathwohl et al. 2019, sec. 5).
- :class:`~jem_core.wideresnet.WideResNet`: the WideResNet of the official JEM code for
  3x32x32 (CIFAR-10/100, SVHN), with the official state-dict key names.
- :class:`MLP`: a small fully connected network for 2-D point data (``toy:`` datasets, stored as
  ``[N, 2, 1, 1]``), with SiLU activations, smooth as the JEM authors advise for stable sampling.

What does not live here: the WideResNet's blocks (:mod:`jem_core.wideresnet`), energies
(:mod:`jem_core.energy`), loading weights into a model (:mod:`jem_core.checkpoint`).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from .wideresnet import WideResNet

__all__ = ["ConvNet", "MLP", "WideResNet", "build_model", "count_parameters", "ARCHITECTURES"]

ARCHITECTURES = ("convnet", "wrn", "mlp")


def _norm(kind: str | None, channels: int) -> nn.Module:
    if kind in (None, "none"):
        return nn.Identity()
    if kind == "batch":
        return nn.BatchNorm2d(channels)
    if kind == "group":
        return nn.GroupNorm(min(8, channels), channels)
    raise ValueError(f"unknown norm {kind!r}; use None, 'batch' or 'group'")


class ConvNet(nn.Module):
    """Small ConvNet classifier: three 3x3 convolutions (stride 1, 2, 2), then a linear layer.

    Channels ``in -> w -> 2w -> 4w`` with ``w = width`` and LeakyReLU(0.2) after each
    convolution; the ``4w x H/4 x W/4`` map is flattened into the linear layer, so the
    energy sees where strokes are (a global average pool would not). With the default width
    32 it has 155k parameters for 28x28 inputs and 98k for 8x8 (the bundled MNIST and digits models).

    Args:
        in_channels: 1 (grayscale) or 3.
        n_classes: number of classes K.
        width: base channel count.
        norm: None (default, JEM's choice), ``"batch"`` or ``"group"``.
        image_size: input side in pixels (>= 4): 8 for digits, 28 for MNIST.

    Input ``[N, in_channels, image_size, image_size]`` float32 in ``[-1, 1]``; output logits
    ``[N, K]`` float32.

    Raises:
        ValueError: for non-positive sizes.
    """

    def __init__(self, in_channels: int = 1, n_classes: int = 10, width: int = 32, norm: str | None = None,
                 image_size: int = 28):
        super().__init__()
        if in_channels < 1 or n_classes < 2 or width < 1 or image_size < 4:
            raise ValueError(f"need in_channels >= 1, n_classes >= 2, width >= 1, image_size >= 4; "
                             f"got {in_channels}, {n_classes}, {width}, {image_size}")
        w = width
        act = lambda: nn.LeakyReLU(0.2)  # noqa: E731
        self.body = nn.Sequential(
            nn.Conv2d(in_channels, w, 3, padding=1), _norm(norm, w), act(),
            nn.Conv2d(w, 2 * w, 3, stride=2, padding=1), _norm(norm, 2 * w), act(),
            nn.Conv2d(2 * w, 4 * w, 3, stride=2, padding=1), _norm(norm, 4 * w), act(),
        )
        side = (image_size + 3) // 4  # two stride-2 convolutions with padding 1
        self.head = nn.Linear(4 * w * side * side, n_classes)
        self.in_channels, self.n_classes, self.image_size = in_channels, n_classes, image_size

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """Penultimate summary features ``[N, 4 * width]``: the last conv map averaged over space.

        Used for the classifier-feature Fréchet distance (a compact 128-d embedding), not by the head.
        """
        return self.body(x).mean(dim=(2, 3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits ``[N, K]`` for ``x`` ``[N, C, image_size, image_size]`` float32 in ``[-1, 1]``."""
        if x.shape[-1] != self.image_size or x.shape[-2] != self.image_size:
            raise ValueError(f"this ConvNet takes {self.image_size}x{self.image_size} images; got "
                             f"{x.shape[-2]}x{x.shape[-1]}")
        return self.head(self.body(x).flatten(1))


class MLP(nn.Module):
    """Fully connected classifier ``D -> hidden -> ... -> hidden -> K`` with SiLU activations.

    Made for 2-D point data (``D = 2``): an input ``[N, C, H, W]`` is flattened to ``[N, C*H*W]``, so
    points stored as ``[N, 2, 1, 1]`` (how :mod:`jem_core.toy` keeps them, so that the image code paths
    of the trainer and sampler apply unchanged) and plain ``[N, 2]`` both work. SiLU (``x * sigmoid(x)``;
    Elfwing et al. 2018) is smooth, so ``dE/dx`` is continuous and SGLD does not stall on kinks
    (Grathwohl et al. 2019, appendix, recommend smooth activations for sampling).

    Args:
        in_channels: input channels ``C`` (2 for points).
        n_classes: number of classes K (>= 2).
        hidden: units per hidden layer (>= 1); 128 trains a 2-D JEM in seconds on one CPU core.
        depth: number of hidden layers (>= 1).
        image_size: input side ``H = W`` (1 for points), so ``D = in_channels * image_size**2``.

    Input ``[N, C, H, W]`` or ``[N, D]`` float32 (points in the box ``[-1, 1]^D``); output logits ``[N, K]``.

    Raises:
        ValueError: for non-positive sizes.
    """

    def __init__(self, in_channels: int = 2, n_classes: int = 2, hidden: int = 128, depth: int = 2,
                 image_size: int = 1):
        super().__init__()
        if in_channels < 1 or n_classes < 2 or hidden < 1 or depth < 1 or image_size < 1:
            raise ValueError(f"need in_channels >= 1, n_classes >= 2, hidden >= 1, depth >= 1, image_size >= 1; "
                             f"got {in_channels}, {n_classes}, {hidden}, {depth}, {image_size}")
        self.in_features = in_channels * image_size * image_size
        layers: list[nn.Module] = []
        width = self.in_features
        for _ in range(depth):
            layers += [nn.Linear(width, hidden), nn.SiLU()]
            width = hidden
        self.body = nn.Sequential(*layers)
        self.head = nn.Linear(hidden, n_classes)
        self.in_channels, self.n_classes, self.image_size = in_channels, n_classes, image_size

    def _flat(self, x: torch.Tensor) -> torch.Tensor:
        x = x.flatten(1)
        if x.shape[1] != self.in_features:
            raise ValueError(f"this MLP takes {self.in_features} input features per example; got {x.shape[1]}")
        return x

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """Last hidden layer ``[N, hidden]`` (after the activation), for feature-space statistics."""
        return self.body(self._flat(x))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits ``[N, K]`` for ``x`` ``[N, C, H, W]`` or ``[N, D]`` float32."""
        return self.head(self.body(self._flat(x)))


def build_model(arch: str, in_channels: int, n_classes: int, arch_kwargs: dict[str, Any] | None = None) -> nn.Module:
    """Build a backbone by name, as recorded in checkpoint metadata.

    Args:
        arch: ``"convnet"``, ``"wrn"`` or ``"mlp"``.
        in_channels: image channels (1 or 3), or point dimensions (2) for ``"mlp"``.
        n_classes: number of classes.
        arch_kwargs: extra constructor arguments (``width``/``norm``/``image_size`` for convnet;
            ``depth``/``widen_factor``/``norm``/``dropout`` for wrn; ``hidden``/``depth``/``image_size`` for mlp).

    Raises:
        ValueError: unknown architecture or bad arguments.
    """
    kw = dict(arch_kwargs or {})
    if arch == "convnet":
        return ConvNet(in_channels=in_channels, n_classes=n_classes, **kw)
    if arch == "wrn":
        return WideResNet(in_channels=in_channels, n_classes=n_classes, **kw)
    if arch == "mlp":
        return MLP(in_channels=in_channels, n_classes=n_classes, **kw)
    raise ValueError(f"unknown architecture {arch!r}; choose one of {ARCHITECTURES}")


def count_parameters(model: nn.Module) -> int:
    """Number of trainable parameters."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)
