"""The WideResNet backbone of the official JEM code, with the official state-dict key names.

Wide residual networks (Zagoruyko & Komodakis, 2016, "Wide Residual Networks", BMVC) in the
variant used by JEM (Grathwohl et al., 2019, github.com/wgrathwohl/JEM, ``wideresnet.py`` and
``train_wrn_ebm.py``):

- pre-activation blocks (norm -> LeakyReLU -> conv), LeakyReLU with slope 0.2 instead of ReLU;
- every convolution has a bias (the official code uses ``bias=True`` everywhere);
- no normalisation by default (``norm=None``: JEM's choice, since batch norm makes SGLD
  depend on the batch); ``"batch"``, ``"instance"`` and ``"layer"`` are also supported;
- the downsampling stride sits in the block's *second* convolution, the shortcut is a biased
  1x1 convolution whenever the shape changes;
- 16 channels after the stem, then three stages of ``n = (depth - 4) / 6`` blocks with
  ``16k, 32k, 64k`` channels (``k = widen_factor``), strides 1, 2, 2; a final norm + LeakyReLU
  and global average pooling give ``64k`` features (640 for WRN-28-10, 128 for WRN-28-2).

Key layout (equal to the official ``F``/``CCF`` module, so official checkpoints load as-is)::

    f.conv1.{weight,bias}
    f.layer{1,2,3}.{i}.{bn1,conv1,bn2,conv2}.*, f.layer{s}.0.shortcut.0.{weight,bias}
    f.bn1.*                 (only when norm is not None)
    f.linear.{weight,bias}  (the trunk's own classifier: UNUSED, kept for key compatibility)
    energy_output.{weight,bias}  (UNUSED, kept for key compatibility)
    class_output.{weight,bias}   (the classifier head: logits = class_output(f(x)))

What does not live here: the other backbones and the factory (:mod:`jem_core.models`), reading official
checkpoint files (:mod:`jem_core.official`).
"""

from __future__ import annotations

import torch
import torch.nn.functional as tnf
from torch import nn

__all__ = ["WideResNet", "WideResNetTrunk", "WideBasicBlock", "NORMS"]

#: Normalisations that this module can build (``None`` = no normalisation, JEM's default).
NORMS = (None, "batch", "instance", "layer")


def _check_norm(norm: str | None) -> str | None:
    if norm in (None, "none"):
        return None
    if norm in NORMS:
        return norm
    if norm == "act":
        raise ValueError(
            "norm='act' (ActNorm) of the official JEM code is not supported; "
            "use None, 'batch', 'instance' or 'layer'"
        )
    raise ValueError(f"unknown norm {norm!r}; use None, 'batch', 'instance' or 'layer'")


def _make_norm(channels: int, norm: str | None) -> nn.Module:
    """The official ``get_norm``: Identity / BatchNorm2d(momentum=0.9) / InstanceNorm2d(affine) / GroupNorm(1)."""
    if norm is None:
        return nn.Identity()  # no parameters, no state-dict keys
    if norm == "batch":
        # momentum=0.9 as in the official code (PyTorch's convention: weight of the NEW batch).
        return nn.BatchNorm2d(channels, momentum=0.9)
    if norm == "instance":
        return nn.InstanceNorm2d(channels, affine=True)  # keys weight/bias, no running stats
    if norm == "layer":
        return nn.GroupNorm(1, channels)  # keys weight/bias, like "instance"
    raise AssertionError(norm)  # unreachable after _check_norm


class WideBasicBlock(nn.Module):
    """Pre-activation wide block: ``conv2(act(bn2(dropout(conv1(act(bn1(x))))))) + shortcut(x)``.

    ``[N, in_planes, H, W] -> [N, planes, H / stride, W / stride]``. Attribute names
    (``bn1, conv1, dropout, bn2, conv2, shortcut``) match the official ``wide_basic``.
    """

    def __init__(self, in_planes: int, planes: int, dropout: float = 0.0, stride: int = 1,
                 norm: str | None = None, leak: float = 0.2):
        super().__init__()
        self.lrelu = nn.LeakyReLU(leak)
        self.bn1 = _make_norm(in_planes, norm)
        self.conv1 = nn.Conv2d(in_planes, planes, kernel_size=3, padding=1, bias=True)
        self.dropout = nn.Dropout(p=dropout) if dropout > 0 else nn.Identity()
        self.bn2 = _make_norm(planes, norm)
        self.conv2 = nn.Conv2d(planes, planes, kernel_size=3, stride=stride, padding=1, bias=True)
        if stride != 1 or in_planes != planes:
            self.shortcut = nn.Sequential(nn.Conv2d(in_planes, planes, kernel_size=1, stride=stride, bias=True))
        else:
            self.shortcut = nn.Sequential()  # identity, no keys

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.dropout(self.conv1(self.lrelu(self.bn1(x))))
        out = self.conv2(self.lrelu(self.bn2(out)))
        return out + self.shortcut(x)


class WideResNetTrunk(nn.Module):
    """The official ``Wide_ResNet`` trunk: images -> penultimate features ``[N, 64 * widen_factor]``.

    ``linear`` (``Linear(64k, trunk_linear_out)``) is never used in :meth:`forward`; it exists
    only because the official trunk has it, so its keys are in every official checkpoint. The
    official ``F`` never passes its class count to the trunk, so it always has 10 outputs,
    also for CIFAR-100 models.
    """

    def __init__(self, depth: int, widen_factor: int, in_channels: int = 3, norm: str | None = None,
                 dropout: float = 0.0, leak: float = 0.2, trunk_linear_out: int = 10):
        super().__init__()
        n = (depth - 4) // 6
        k = widen_factor
        stages = [16, 16 * k, 32 * k, 64 * k]
        self.depth, self.widen_factor, self.norm = depth, widen_factor, norm
        self.lrelu = nn.LeakyReLU(leak)
        self.conv1 = nn.Conv2d(in_channels, stages[0], kernel_size=3, stride=1, padding=1, bias=True)
        in_planes = stages[0]
        layers = []
        for planes, stride in zip(stages[1:], (1, 2, 2)):
            blocks = []
            for s in [stride] + [1] * (n - 1):
                blocks.append(WideBasicBlock(in_planes, planes, dropout, s, norm=norm, leak=leak))
                in_planes = planes
            layers.append(nn.Sequential(*blocks))
        self.layer1, self.layer2, self.layer3 = layers
        self.bn1 = _make_norm(stages[3], norm)
        self.last_dim = stages[3]
        self.linear = nn.Linear(stages[3], trunk_linear_out)  # unused; official key compatibility

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.conv1(x)
        out = self.layer3(self.layer2(self.layer1(out)))
        out = self.lrelu(self.bn1(out))
        # The official code uses avg_pool2d(out, 8), which for 32x32 inputs (8x8 final maps)
        # is exactly this global average; the adaptive form also accepts other input sizes.
        out = tnf.adaptive_avg_pool2d(out, 1)
        return out.flatten(1)


class WideResNet(nn.Module):
    """JEM's WideResNet classifier (WRN-depth-k, Zagoruyko & Komodakis 2016; JEM's variant).

    ``logits = class_output(f(x))``, exactly the official ``F.classify`` (Grathwohl et al.
    2019, ``train_wrn_ebm.py``) except that the result is never squeezed: a batch of one
    gives ``[1, K]``. ``state_dict()`` keys and shapes equal the official module's, so an
    official checkpoint loads with ``strict=True`` (see :mod:`jem_core.official`).

    Args:
        depth: total depth ``6n + 4`` (n >= 1 blocks per stage): 10, 16, 22, 28 (JEM), 34, 40, ...
        widen_factor: ``k``; stage widths ``16k, 32k, 64k``. JEM's CIFAR models use 10.
        n_classes: number of classes K (>= 2).
        in_channels: image channels (3 for CIFAR/SVHN).
        norm: None (default, JEM's choice), ``"batch"``, ``"instance"`` or ``"layer"``
            (``"none"`` is accepted for None). The official ``"act"`` (ActNorm) is not supported.
        dropout: dropout probability between the two convolutions of each block.
        leak: LeakyReLU slope (0.2 in JEM). The official code hard-wires 0.2 inside the
            blocks and uses ``leak`` only after the last norm; here one value is used everywhere
            (identical for the official default).
        trunk_linear_out: output size of the unused ``f.linear`` (10 in every official checkpoint).

    Attributes:
        f: the trunk (:class:`WideResNetTrunk`); ``f.linear`` is unused.
        energy_output: ``Linear(last_dim, 1)``, unused (official key compatibility).
        class_output: ``Linear(last_dim, n_classes)``, the classifier head.
        last_dim: feature size ``64 * widen_factor``.

    Input ``x``: ``[N, in_channels, 32, 32]`` float32 in ``[-1, 1]`` (other sizes divisible by 4
    work too). Output: logits ``[N, n_classes]`` float32.

    Raises:
        ValueError: ``(depth - 4) % 6 != 0``, depth < 10, or other bad arguments.
    """

    def __init__(self, depth: int = 28, widen_factor: int = 2, n_classes: int = 10, in_channels: int = 3,
                 norm: str | None = None, dropout: float = 0.0, leak: float = 0.2, trunk_linear_out: int = 10):
        super().__init__()
        if not isinstance(depth, int) or (depth - 4) % 6 != 0 or depth < 10:
            raise ValueError(
                f"WideResNet depth must be 6n + 4 with n >= 1 blocks per stage (10, 16, 22, 28, ...); got {depth!r}"
            )
        if not isinstance(widen_factor, int) or widen_factor < 1:
            raise ValueError(f"widen_factor must be a positive integer; got {widen_factor!r}")
        if n_classes < 2 or in_channels < 1 or trunk_linear_out < 1:
            raise ValueError(
                f"need n_classes >= 2, in_channels >= 1, trunk_linear_out >= 1; "
                f"got {n_classes}, {in_channels}, {trunk_linear_out}"
            )
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1); got {dropout}")
        norm = _check_norm(norm)
        self.f = WideResNetTrunk(depth, widen_factor, in_channels=in_channels, norm=norm, dropout=dropout,
                                 leak=leak, trunk_linear_out=trunk_linear_out)
        self.last_dim = self.f.last_dim
        self.energy_output = nn.Linear(self.last_dim, 1)  # unused; official key compatibility
        self.class_output = nn.Linear(self.last_dim, n_classes)
        self.depth, self.widen_factor, self.norm = depth, widen_factor, norm
        self.n_classes, self.in_channels = n_classes, in_channels

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """Penultimate features ``[N, 64 * widen_factor]`` float32 for ``x`` ``[N, C, 32, 32]`` in ``[-1, 1]``."""
        return self.f(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits ``[N, n_classes]`` float32 for ``x`` ``[N, C, 32, 32]`` float32 in ``[-1, 1]``."""
        return self.class_output(self.f(x))

    def extra_repr(self) -> str:
        return f"WRN-{self.depth}-{self.widen_factor}, n_classes={self.n_classes}, norm={self.norm}"
