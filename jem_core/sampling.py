"""SGLD sampling from a JEM: a one-step sampler, a driver, a persistent replay buffer, masks.

Stochastic gradient Langevin dynamics (Welling & Teh, 2011), as used by JEM
(Grathwohl et al. 2019, eq. 11). Two parameterisations:

- **exact Langevin** (``exact_langevin=True``): ``x <- x - (a/2) dE/dx + eps``, ``eps ~ N(0, a)``,
  i.e. noise std ``sqrt(a)``; for small ``a`` its stationary law is ``p(x) ∝ exp(-E(x))``.
- **JEM's practical setting** (default): ``x <- x - step_size * dE/dx + noise_std * N(0, I)``
  with ``step_size = 1`` and ``noise_std = 0.01``: a biased but much faster sampler.

Optional stabilisers (JEM++, Yang & Ji 2021): ``max_update`` clips each pixel's update
(gradient plus noise) to ``[-max_update, max_update]``; ``clamp`` keeps samples in ``[-1, 1]``.
A ``mask`` (True = pixel is sampled, False = kept fixed) gives in-painting.

The sampler exposes one step (:meth:`SGLDSampler.step`) and a driver (:meth:`SGLDSampler.run`)
that reports every ``k`` steps, so a dashboard can draw live chains without its own loop logic
(the ``scheduler.step`` / ``update_fn`` split of diffusers and score_sde).

What does not live here: samples, in-painting and translation from a checkpoint (:mod:`jem_core.generation`),
chain health checks (:mod:`jem_core.sampler_health`), AIS transitions (:mod:`jem_core.likelihood`).
"""

from __future__ import annotations

import contextlib
import math
import threading
from dataclasses import dataclass, field
from typing import Callable, Iterator

import torch
from torch import nn

from .energy import class_energy, energy
from .errors import BadInput

__all__ = ["SGLDSampler", "SGLDReport", "ReplayBuffer", "ClassGaussians", "ChainState", "init_noise", "half_mask",
           "patch_mask", "MASK_KINDS", "frozen_parameters"]

MASK_KINDS = ("top", "bottom", "left", "right", "patch")


@contextlib.contextmanager
def frozen_parameters(model: nn.Module) -> Iterator[None]:
    """Temporarily set ``requires_grad=False`` on every parameter of ``model``.

    SGLD needs ``dE/dx`` only; without parameter gradients autograd stores less and the
    model cannot be mutated by a sampler. The previous flags are restored on exit.
    """
    params = [p for p in model.parameters() if p.requires_grad]
    for p in params:
        p.requires_grad_(False)
    try:
        yield
    finally:
        for p in params:
            p.requires_grad_(True)


def init_noise(n: int, shape: tuple[int, ...], generator: torch.Generator | None = None,
               device: torch.device | str = "cpu") -> torch.Tensor:
    """Uniform noise ``U[-1, 1]`` of shape ``[n, *shape]`` float32 (JEM's chain initialisation)."""
    return torch.rand((n, *shape), generator=generator, device=device).mul_(2).sub_(1)


@dataclass
class SGLDReport:
    """What the driver reports every ``k`` steps.

    Attributes:
        step: number of SGLD steps done so far (1-based, after the step).
        x: ``[N, C, H, W]`` current samples (a view of the chain state: copy it to keep it).
        energy: ``[N]`` float32, the energy (``E(x)`` or ``E(x, y)``) at the start of the last step.
        logits: ``[N, K]`` float32 logits at the start of the last step (predictions over steps).
        grad_norm: ``[N]`` float32, ``||dE/dx||_2`` of each chain at the start of the last step.
        overshoot: ``[N]`` float32 in ``[0, 1]``, the fraction of each chain's pixels that the last update
            would have carried more than 0.5 beyond ``[-1, 1]`` before clamping (clamping hides such
            blow-ups in the pictures).
    """

    step: int
    x: torch.Tensor
    energy: torch.Tensor
    logits: torch.Tensor
    grad_norm: torch.Tensor | None = None
    overshoot: torch.Tensor | None = None


class SGLDSampler:
    """SGLD on the energy of a classifier's logits.

    Args:
        model: module ``[N, C, H, W] -> logits [N, K]``; its parameters are not changed.
        step_size: ``a`` (exact Langevin) or the gradient step (practical setting); > 0.
        noise_std: std of the added Gaussian noise in ``[-1, 1]`` pixel units, >= 0; ignored
            when ``exact_langevin`` (then it is ``sqrt(step_size)``).
        exact_langevin: use the Langevin equation itself (see the module docstring).
        clamp: clamp samples to ``[-1, 1]`` after every step.
        max_update: if set (> 0), clip each pixel's update to ``[-max_update, max_update]``.
        generator: random source for the noise (must live on the samples' device).
        bf16: compute the energy and ``dE/dx`` under bfloat16 autocast (energies and logits are
            returned as float32). About 1.7x faster per step on CPUs with AVX512-BF16/AMX and on
            recent GPUs; ``dE/dx`` is then about 2% off in relative terms (cosine > 0.999 on the
            MNIST ConvNet), well below the SGLD noise. Off by default: the exact float32 sampler.

    Raises:
        ValueError: for a non-positive step size, negative noise std or max_update <= 0.
    """

    def __init__(self, model: nn.Module, step_size: float = 1.0, noise_std: float = 0.01,
                 exact_langevin: bool = False, clamp: bool = True, max_update: float | None = None,
                 generator: torch.Generator | None = None, bf16: bool = False):
        if not (step_size > 0 and math.isfinite(step_size)):
            raise ValueError(f"step_size must be a positive number; got {step_size}")
        if not (noise_std >= 0 and math.isfinite(noise_std)):
            raise ValueError(f"noise_std must be >= 0; got {noise_std}")
        if max_update is not None and not max_update > 0:
            raise ValueError(f"max_update must be > 0 or None; got {max_update}")
        self.model = model
        self.step_size = float(step_size)
        self.exact_langevin = bool(exact_langevin)
        self.noise_std = math.sqrt(step_size) if exact_langevin else float(noise_std)
        self.grad_coef = step_size / 2 if exact_langevin else float(step_size)
        self.clamp = clamp
        self.max_update = max_update
        self.generator = generator
        self.bf16 = bool(bf16)
        self._noise: torch.Tensor | None = None

    def configure(self, step_size: float | None = None, noise_std: float | None = None,
                  exact_langevin: bool | None = None, clamp: bool | None = None) -> None:
        """Change settings between steps (live sliders); None keeps a setting.

        Keeps the constructor's invariants: with ``exact_langevin`` the noise std is ``sqrt(step_size)``
        and the gradient step ``step_size / 2``; otherwise the gradient step is ``step_size``.

        Raises:
            ValueError: for a non-positive step size or a negative noise std.
        """
        step = self.step_size if step_size is None else float(step_size)
        noise = self.noise_std if noise_std is None else float(noise_std)
        exact = self.exact_langevin if exact_langevin is None else bool(exact_langevin)
        if not (step > 0 and math.isfinite(step)):
            raise ValueError(f"step_size must be a positive number; got {step}")
        if not (noise >= 0 and math.isfinite(noise)):
            raise ValueError(f"noise_std must be >= 0; got {noise}")
        self.step_size, self.exact_langevin = step, exact
        self.noise_std = math.sqrt(step) if exact else noise
        self.grad_coef = step / 2 if exact else step
        if clamp is not None:
            self.clamp = bool(clamp)

    def describe(self) -> str:
        """One line saying which SGLD form and settings are used (for logs and model cards)."""
        form = "exact Langevin (noise std = sqrt(step size))" if self.exact_langevin else "JEM practical (decoupled)"
        return (f"SGLD {form}: step size {self.step_size:g}, noise std {self.noise_std:g}, "
                f"clamp {'on' if self.clamp else 'off'}, max update per pixel "
                f"{'off' if self.max_update is None else f'{self.max_update:g}'}"
                + (", bf16 autocast" if self.bf16 else ""))

    def energy_and_grad(self, x: torch.Tensor, y: torch.Tensor | None = None, create_graph: bool = False
                        ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Energy ``[N]``, its gradient ``dE/dx`` ``[N, C, H, W]`` and the logits ``[N, K]`` at ``x``.

        ``y`` (``[N]`` int64) selects the class-conditional energy ``E(x, y)``; None gives ``E(x)``.
        The returned tensors are detached, unless ``create_graph``: then they keep their graph back to ``x``
        (when ``x`` requires grad; else to a fresh leaf copy of it), ``dE/dx`` included, so that a loss of a
        later sample can be back-propagated through the step (``torch.autograd.grad(create_graph=True)``).
        """
        amp = (torch.autocast(x.device.type, dtype=torch.bfloat16) if self.bf16 else contextlib.nullcontext())
        with torch.enable_grad():
            xg = x if create_graph and x.requires_grad else x.detach().requires_grad_(True)
            with amp:
                logits = self.model(xg)
            logits = logits.float()  # energies in float32 whatever the network computed in
            e = energy(logits) if y is None else class_energy(logits, y)
            (grad,) = torch.autograd.grad(e.sum(), xg, create_graph=create_graph)
        if create_graph:
            return e, grad, logits
        return e.detach(), grad, logits.detach()

    def step_(self, x: torch.Tensor, y: torch.Tensor | None = None, mask: torch.Tensor | None = None
              ) -> tuple[torch.Tensor, torch.Tensor]:
        """One SGLD step **in place** on ``x``; returns ``(energy [N], logits [N, K])`` at the old ``x``.

        Args:
            x: ``[N, C, H, W]`` float tensor, modified in place.
            y: optional ``[N]`` int64 labels for class-conditional sampling.
            mask: optional bool tensor broadcastable to ``x``; True = pixel is sampled,
                False = pixel kept as it is (in-painting).
        """
        _, e, logits, _ = self._step(x, y, mask, measure=False)
        return e, logits

    def _step(self, x: torch.Tensor, y: torch.Tensor | None, mask: torch.Tensor | None, measure: bool,
              differentiable: bool = False
              ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, tuple[torch.Tensor, torch.Tensor] | None]:
        """The SGLD update (formula in the module docstring); returns ``(new x, energy, logits, stats)``.

        Without ``differentiable`` ``x`` is updated in place and returned. With it, ``x`` is left alone and the
        new samples are a differentiable function of it (``dE/dx`` with ``create_graph``). ``measure``: also
        return (||dE/dx|| [N], overshoot fraction [N]) for the health checks; only on the steps that are
        reported, so the other steps cost nothing extra.
        """
        e, grad, logits = self.energy_and_grad(x, y, create_graph=differentiable)
        gnorm = grad.detach().flatten(1).norm(dim=1) if measure else None
        # (the in-place operations below act on tensors made in this step only, so the graph stays valid)
        upd = grad * (-self.grad_coef) if differentiable else grad.mul_(-self.grad_coef)
        if self.noise_std > 0:
            if self._noise is None or self._noise.shape != x.shape or self._noise.device != x.device:
                self._noise = torch.empty_like(x)
            self._noise.normal_(generator=self.generator)
            upd.add_(self._noise, alpha=self.noise_std)
        if self.max_update is not None:
            upd.clamp_(-self.max_update, self.max_update)
        if mask is not None:
            upd.mul_(mask)
        x = x + upd if differentiable else x.add_(upd)
        stats = None
        if measure:
            stats = (gnorm, (x.detach().abs() > 1.5).flatten(1).float().mean(1))
        if self.clamp:
            x = x.clamp(-1.0, 1.0) if differentiable else x.clamp_(-1.0, 1.0)
        return x, e, logits, stats

    def step(self, x: torch.Tensor, y: torch.Tensor | None = None, mask: torch.Tensor | None = None,
             differentiable: bool = False) -> torch.Tensor:
        """One SGLD step; returns the new samples ``[N, C, H, W]`` (``x`` is not modified).

        Args:
            x, y, mask: see :meth:`step_`.
            differentiable: keep the autograd graph: the new samples are a differentiable function of ``x``
                (through ``dE/dx``, computed with ``create_graph=True``), for attacks that back-propagate
                through the sampler. Costs a second-order backward pass.
        """
        if differentiable:
            return self._step(x, y, mask, measure=False, differentiable=True)[0]
        out = x.detach().clone()
        self.step_(out, y, mask)
        return out

    def run(self, x: torch.Tensor, n_steps: int, y: torch.Tensor | None = None, mask: torch.Tensor | None = None,
            every: int = 0, callback: Callable[[SGLDReport], bool | None] | None = None,
            differentiable: bool = False) -> torch.Tensor:
        """Run ``n_steps`` SGLD steps from ``x`` (not modified); returns the final samples.

        Args:
            x: ``[N, C, H, W]`` start points.
            n_steps: number of steps, >= 0.
            y, mask: see :meth:`step_`.
            every: call ``callback`` every ``every`` steps (and after the last); 0 = never.
            callback: receives an :class:`SGLDReport`; returning ``False`` stops the run early.
            differentiable: see :meth:`step`; the result keeps its graph back to ``x`` through every step.

        Raises:
            ValueError: if ``n_steps < 0`` or ``every < 0``.
        """
        if n_steps < 0 or every < 0:
            raise ValueError(f"n_steps and every must be >= 0; got {n_steps}, {every}")
        out = x if differentiable else x.detach().clone()
        for t in range(1, n_steps + 1):
            report = callback is not None and every and (t % every == 0 or t == n_steps)
            out, e, logits, stats = self._step(out, y, mask, measure=bool(report), differentiable=differentiable)
            if report:
                if callback(SGLDReport(t, out, e, logits, *stats)) is False:
                    break
        return out


def _ppca(x: torch.Tensor, r: int, min_var: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Probabilistic PCA of rows ``x`` ``[n, D]`` (n >= 2): mean ``[D]``, factor ``[D, r]``, residual std ``[]``.

    The maximum-likelihood solution (Tipping & Bishop 1999): the residual variance is the mean of the
    discarded eigenvalues, and the kept directions carry the rest of their variance.
    """
    n, d = x.shape
    mu = x.mean(0)
    xc = x - mu
    total = xc.pow(2).sum() / (n - 1)  # the covariance's trace
    if d <= 1024:  # exact eigen-decomposition of the D x D covariance
        evals, evecs = torch.linalg.eigh(xc.T @ xc / (n - 1))
        evals, evecs = evals.flip(0)[:r].clamp_min(0), evecs.flip(1)[:, :r]
    else:  # randomised SVD: the top directions without a D x D eigenproblem
        q = min(r, n)
        _, sv, evecs = torch.svd_lowrank(xc, q=q)
        evals = torch.nn.functional.pad(sv.pow(2) / (n - 1), (0, r - q))
        evecs = torch.nn.functional.pad(evecs, (0, r - q))
    resid = ((total - evals.sum()) / max(1, d - r)).clamp_min(0)
    return mu, evecs * (evals - resid).clamp_min(0).sqrt(), resid.clamp_min(min_var).sqrt()


class ClassGaussians:
    """Per-class Gaussians fitted to training images: JEM++'s informative start for SGLD chains.

    JEM++ (Yang & Ji 2021, sec. 3.3) starts chains from ``N(mu_y, Sigma_y)`` of the training images
    of a class ``y`` instead of ``U[-1, 1]`` noise: chains start near the data, so 5-10 clipped SGLD
    steps do the work of 20 and training stays stable. Each covariance is kept as probabilistic PCA
    (Tipping & Bishop 1999): the top ``rank`` principal directions plus one variance for the rest,
    exact when ``rank >= C*H*W`` and ``K * rank * C*H*W`` floats otherwise.

    Args:
        mean: ``[K, D]`` class means (``D = C*H*W``).
        factor: ``[K, D, R]``, so that ``Sigma_k ~= factor_k factor_k^T + residual_std_k^2 I``.
        residual_std: ``[K]``.
        shape: ``(C, H, W)``.
    """

    def __init__(self, mean: torch.Tensor, factor: torch.Tensor, residual_std: torch.Tensor,
                 shape: tuple[int, int, int]):
        self.mean, self.factor, self.residual_std, self.shape = mean, factor, residual_std, tuple(shape)

    @classmethod
    def fit(cls, x: torch.Tensor, y: torch.Tensor, n_classes: int, rank: int = 64,
            min_var: float = 1e-4) -> "ClassGaussians":
        """Fit to images ``x`` ``[N, C, H, W]`` in ``[-1, 1]`` with labels ``y`` ``[N]`` int64.

        ``min_var`` floors the residual variance (JEM++ adds ``1e-4 I``); a class with fewer than
        two images gets the Gaussian of all images.
        """
        flat = x.detach().flatten(1)
        r = max(1, min(rank, flat.shape[1]))
        y = y.to(flat.device)
        everything = None
        parts = []
        for k in range(n_classes):
            xk = flat[y == k]
            if len(xk) < 2:
                if everything is None:
                    everything = _ppca(flat.double(), r, min_var)
                parts.append(everything)
            else:
                parts.append(_ppca(xk.double(), r, min_var))
        mean, factor, std = (torch.stack([p[i] for p in parts]).float() for i in range(3))
        return cls(mean, factor, std, tuple(x.shape[1:]))

    @property
    def n_classes(self) -> int:
        return self.mean.shape[0]

    def to(self, device: torch.device | str) -> "ClassGaussians":
        """The same Gaussians on ``device``."""
        return ClassGaussians(self.mean.to(device), self.factor.to(device), self.residual_std.to(device), self.shape)

    def sample(self, n: int, y: torch.Tensor | None = None, generator: torch.Generator | None = None) -> torch.Tensor:
        """``n`` draws ``[n, C, H, W]`` clamped to ``[-1, 1]``, from classes ``y`` ``[n]`` (None: random classes)."""
        dev = self.mean.device
        if y is None:
            y = torch.randint(0, self.n_classes, (n,), generator=generator, device=dev)
        y = y.to(dev).long()
        out = torch.randn((n, self.mean.shape[1]), generator=generator, device=dev)
        z = torch.randn((n, self.factor.shape[2]), generator=generator, device=dev)
        for k in y.unique().tolist():  # one matmul per class present, not a [n, D, R] gather
            rows = y == k
            out[rows] = torch.addmm(torch.addcmul(self.mean[k], out[rows], self.residual_std[k]), z[rows],
                                    self.factor[k].T)
        return out.clamp_(-1.0, 1.0).view(n, *self.shape)


class ReplayBuffer:
    """Persistent replay buffer of SGLD samples (PCD; Tieleman 2008; JEM sec. 4).

    Each draw takes random stored samples and, with probability ``reinit_freq``, replaces a
    sample by fresh ``U[-1, 1]`` noise. With ``n_classes`` set, the buffer is split into
    equal per-class blocks so that class-conditional chains continue from their own class.

    Args:
        size: number of stored samples (>= 1; rounded down to a multiple of ``n_classes``).
        shape: ``(C, H, W)`` of one sample.
        reinit_freq: probability in ``[0, 1]`` of restarting a drawn sample from noise.
        n_classes: None for one shared block, else K per-class blocks.
        generator: random source (on ``device``).
        device: where the buffer lives (the model's device: no host copies per step).
        init: None for ``U[-1, 1]`` noise (JEM), or :class:`ClassGaussians` to start and restart
            chains from the data's class Gaussians (JEM++; per-class blocks from their own class).

    Raises:
        BadInput: a size below 1 (or, class-conditional, below ``n_classes``): the size is a user's setting.
        ValueError: reinit frequency outside [0, 1].
    """

    def __init__(self, size: int, shape: tuple[int, int, int], reinit_freq: float = 0.05,
                 n_classes: int | None = None, generator: torch.Generator | None = None,
                 device: torch.device | str = "cpu", init: ClassGaussians | None = None):
        if not 0.0 <= reinit_freq <= 1.0:
            raise ValueError(f"reinit_freq must lie in [0, 1]; got {reinit_freq}")
        if n_classes is not None:
            size = (size // n_classes) * n_classes
        if size < 1:
            raise BadInput(f"buffer size must be >= 1 (and >= n_classes); got {size}")
        self.shape = tuple(shape)
        self.reinit_freq = float(reinit_freq)
        self.n_classes = n_classes
        self.generator = generator
        self.device = torch.device(device)
        if init is not None and init.shape != self.shape:
            raise ValueError(f"class Gaussians of shape {init.shape} for a buffer of shape {self.shape}")
        self.init = None if init is None else init.to(self.device)
        rows = torch.arange(size, device=self.device)
        self.buffer = self._fresh(rows, None if n_classes is None else rows // (size // n_classes))

    def _fresh(self, rows: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
        """New chain starts for buffer ``rows``: U[-1, 1] noise, or draws from the class Gaussians
        (of classes ``y``; else of the rows' blocks when per-class; else of random classes)."""
        if self.init is None:
            return init_noise(len(rows), self.shape, self.generator, self.device)
        if y is None and self.n_classes is not None:
            y = rows // (len(self) // self.n_classes)
        return self.init.sample(len(rows), y, self.generator)

    def __len__(self) -> int:
        return self.buffer.shape[0]

    def _indices(self, n: int, y: torch.Tensor | None) -> torch.Tensor:
        size = len(self)
        if y is None or self.n_classes is None:
            return torch.randint(0, size, (n,), generator=self.generator, device=self.device)
        block = size // self.n_classes
        off = torch.randint(0, block, (n,), generator=self.generator, device=self.device)
        return y.to(self.device).long() * block + off

    def sample(self, n: int, y: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Draw ``n`` chain starts.

        Args:
            n: batch size.
            y: optional ``[n]`` int64 labels: draw from those classes' blocks.

        Returns:
            ``(x [n, C, H, W]`` float32 (a copy, with ~``reinit_freq`` of rows reset to noise),
            ``idx [n]`` int64 buffer rows to pass to :meth:`update`).
        """
        idx = self._indices(n, y)
        x = self.buffer[idx]
        if self.reinit_freq > 0:
            fresh = torch.rand(n, generator=self.generator, device=self.device) < self.reinit_freq
            if bool(fresh.any()):
                x[fresh] = self._fresh(idx[fresh], None if y is None else y.to(self.device)[fresh])
        return x, idx

    def update(self, idx: torch.Tensor, x: torch.Tensor) -> None:
        """Write samples ``x`` ``[n, C, H, W]`` back into rows ``idx`` ``[n]`` (in place)."""
        self.buffer[idx.to(self.device)] = x.detach().to(self.device, self.buffer.dtype)

    def reset_nonfinite(self) -> int:
        """Replace rows holding NaN/Inf by fresh noise; returns how many were replaced."""
        bad = ~torch.isfinite(self.buffer.flatten(1)).all(dim=1)
        k = int(bad.sum())
        if k:
            self.buffer[bad] = self._fresh(bad.nonzero().squeeze(1))
        return k

    def subset(self, n: int) -> torch.Tensor:
        """``n`` evenly spaced rows (all classes represented when per-class), float32 on the CPU."""
        n = min(n, len(self))
        idx = torch.linspace(0, len(self) - 1, n).long()
        return self.buffer[idx.to(self.device)].detach().cpu().clone()

    def state_dict(self) -> dict:
        """Serializable state: the buffer tensor and settings."""
        return {"buffer": self.buffer.detach().cpu(), "reinit_freq": self.reinit_freq, "n_classes": self.n_classes}

    def load_state_dict(self, state: dict) -> None:
        """Restore from :meth:`state_dict`; the stored tensor must match ``(C, H, W)``."""
        buf = state["buffer"]
        if tuple(buf.shape[1:]) != self.shape:
            raise ValueError(f"replay buffer shape {tuple(buf.shape[1:])} does not match {self.shape}")
        self.buffer = buf.to(self.device, torch.float32).clone()
        self.reinit_freq = float(state.get("reinit_freq", self.reinit_freq))
        self.n_classes = state.get("n_classes", self.n_classes)


def half_mask(kind: str, shape: tuple[int, int, int], generator: torch.Generator | None = None,
              patch_frac: float = 0.5) -> torch.Tensor:
    """In-painting mask ``[1, C, H, W]`` bool; True marks the pixels to *fill in* (sampled).

    Args:
        kind: ``"top"``, ``"bottom"``, ``"left"``, ``"right"`` (that half is missing) or
            ``"patch"`` (a random square of side ``patch_frac * H``).
        shape: ``(C, H, W)``.

    Raises:
        ValueError: unknown kind.
    """
    c, h, w = shape
    m = torch.zeros(1, c, h, w, dtype=torch.bool)
    if kind == "top":
        m[..., : h // 2, :] = True
    elif kind == "bottom":
        m[..., h // 2:, :] = True
    elif kind == "left":
        m[..., :, : w // 2] = True
    elif kind == "right":
        m[..., :, w // 2:] = True
    elif kind == "patch":
        return patch_mask(shape, patch_frac, generator)
    else:
        raise ValueError(f"unknown mask {kind!r}; use one of {', '.join(MASK_KINDS)}")
    return m


def inpaint_start(x: torch.Tensor, mask: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """In-painting chain start: the pixels to fill in (``mask`` True) become U[-1, 1] noise, the rest is ``x``.

    Args:
        x: ``[N, C, H, W]`` float32 in ``[-1, 1]``.
        mask: bool, broadcastable to ``x`` (e.g. from :func:`half_mask`); True = fill in.
        generator: random source for the noise.

    Returns:
        ``[N, C, H, W]`` float32, a new tensor.
    """
    noise = init_noise(x.shape[0], tuple(x.shape[1:]), generator, x.device)
    return torch.where(mask.to(x.device), noise, x)


def patch_mask(shape: tuple[int, int, int], frac: float = 0.5, generator: torch.Generator | None = None) -> torch.Tensor:
    """A random square patch mask ``[1, C, H, W]`` bool (True = fill in), side ``round(frac * H)``."""
    c, h, w = shape
    s = max(1, min(h, int(round(frac * h))))
    top = int(torch.randint(0, h - s + 1, (1,), generator=generator))
    left = int(torch.randint(0, w - s + 1, (1,), generator=generator))
    m = torch.zeros(1, c, h, w, dtype=torch.bool)
    m[..., top: top + s, left: left + s] = True
    return m


@dataclass
class ChainState:
    """Per-user state of live SGLD chains (kept in ``st.session_state`` by the dashboard).

    Attributes:
        x: ``[N, C, H, W]`` current samples.
        y: optional ``[N]`` labels (class-conditional chains).
        mask: optional in-painting mask (True = sampled).
        steps: SGLD steps done so far.
        energy_history: one ``[N]`` tensor per report.
        pred_history: one ``[N]`` int64 tensor of predicted classes per report.
        step_history: the step number of each report.
        frames: optional snapshots ``[N, C, H, W]`` (e.g. a class-translation path).
        last_report: the latest :class:`SGLDReport` (its ``x`` is a copy), for the health checks
            of :mod:`jem_core.sampler_health`; None before any step.
        max_history: the most reports kept in ``energy_history`` / ``pred_history`` / ``step_history``
            (None = all). Past it, the older half is thinned to every other report, so memory stays bounded
            for chains that run for hours while the recent past stays at full resolution.

    Another thread may read the histories while :meth:`advance` runs (a dashboard redraws them while a
    rerun's new script thread starts and the old one finishes its steps): :meth:`history` gives one
    consistent snapshot of the three.
    """

    x: torch.Tensor
    y: torch.Tensor | None = None
    mask: torch.Tensor | None = None
    steps: int = 0
    energy_history: list[torch.Tensor] = field(default_factory=list)
    pred_history: list[torch.Tensor] = field(default_factory=list)
    step_history: list[int] = field(default_factory=list)
    frames: list[torch.Tensor] = field(default_factory=list)
    last_report: SGLDReport | None = None
    max_history: int | None = None
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False, compare=False)

    def history(self) -> tuple[list[int], torch.Tensor, torch.Tensor]:
        """One consistent snapshot of the recorded reports: ``(steps, energies, preds)`` with ``steps`` the
        ``T`` step numbers (increasing; unevenly spaced once thinned), ``energies`` ``[T, N]`` float32 and
        ``preds`` ``[T, N]`` int64; ``T`` may be 0 (then both tensors are ``[0, N]``)."""
        with self._lock:
            steps, energies, preds = list(self.step_history), list(self.energy_history), list(self.pred_history)
        n = self.x.shape[0]
        return (steps, torch.stack(energies) if energies else torch.zeros(0, n),
                torch.stack(preds) if preds else torch.zeros(0, n, dtype=torch.long))

    def _thin(self) -> None:
        # Keep the newer half as it is and every other report of the older half.
        n = len(self.step_history)
        if self.max_history is None or n <= self.max_history:
            return
        half = n // 2
        keep = list(range(0, half, 2)) + list(range(half, n))
        self.step_history = [self.step_history[i] for i in keep]
        self.energy_history = [self.energy_history[i] for i in keep]
        self.pred_history = [self.pred_history[i] for i in keep]

    def advance(self, sampler: SGLDSampler, n_steps: int, every: int = 1, keep_frames: bool = False) -> None:
        """Run ``n_steps`` more steps, recording energies and predictions every ``every`` steps.

        The model's parameters are frozen during the run (cached models are never changed).
        """
        def record(r: SGLDReport) -> None:
            energy, pred = r.energy.cpu(), r.logits.argmax(1).cpu()
            with self._lock:
                self.step_history.append(self.steps + r.step)
                self.energy_history.append(energy)
                self.pred_history.append(pred)
                self._thin()
            if keep_frames:
                self.frames.append(r.x.detach().cpu().clone())
            self.last_report = SGLDReport(self.steps + r.step, r.x.detach().cpu().clone(), r.energy.cpu(),
                                          r.logits.cpu(), r.grad_norm, r.overshoot)

        with frozen_parameters(sampler.model):
            self.x = sampler.run(self.x, n_steps, self.y, self.mask, every=max(1, every), callback=record)
        self.steps += n_steps
