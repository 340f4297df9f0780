"""Normalised likelihood: annealed importance sampling (AIS) of ``log Z`` on the box ``[-1, 1]^D``.

The model whose likelihood is estimated is ``p(x) = exp(-E(x)) / Z`` on the box ``[-1, 1]^D`` (the
domain of every image and sampler of this library), at temperature 1, for the model as trained; for a
classifier ``f``, ``E(x) = -logsumexp_y f(x)[y]`` (:func:`jem_core.energy.energy`), and
``log Z = log ∫_box exp(-E(x)) dx``. Nothing is added to the energy.

Method
------
- **Forward AIS** (Neal 2001, "Annealed importance sampling", Statistics and Computing 11):
  chains start from the uniform law on the box (``log Z_0 = D log 2``) and move along the geometric
  path ``pi_b(x) ∝ exp(-b E(x))``, ``0 = b_0 < b_1 < ... < b_K = 1``. The log weight of a chain is
  ``sum_k (b_k - b_{k-1}) (-E(x_{k-1}))`` where ``x_{k-1}`` is its state after the transitions at
  ``b_{k-1}``; ``log Ẑ = log Z_0 + log mean_i exp(log w_i)``. ``Ẑ`` is unbiased, so by Jensen
  ``log Ẑ`` *under*-estimates ``log Z`` in expectation (and a test ``log p(x) = -E(x) - log Ẑ``
  is over-stated).
- **Transitions** leave ``pi_b`` invariant exactly: Hamiltonian Monte Carlo (Neal 2011, "MCMC using
  Hamiltonian dynamics", Handbook of MCMC, ch. 5) with a Metropolis test, or MALA (HMC with one
  leapfrog step, Neal 2011 sec. 5.2). The box is handled by **reflection**: a position that leaves
  ``[-1, 1]`` in a leapfrog step is folded back and that coordinate's momentum negated (Neal 2011,
  sec. 5.5.1.5); the map stays volume-preserving and reversible, so the Metropolis test stays exact.
  The alternative, rejecting any proposal that leaves the box (``boundary="reject"``), freezes
  chains in high dimension near ``b = 0``: all ``D`` coordinates must stay inside at once
  (:func:`boundary_acceptance` measures it).
- **Step sizes** are tuned per temperature in a separate pilot run (a short AIS pass with few
  chains that adapts the step towards a target acceptance rate), then frozen and interpolated in
  ``b`` for the measured run: adapting on the chains' own history inside the run would break the
  estimator.
- **Reverse AIS / BDMC** (Grosse, Ghahramani & Adams 2015, "Sandwiching the marginal likelihood
  using bidirectional Monte Carlo", arXiv:1511.02543): chains start from samples of ``pi_1`` and
  anneal down to ``b = 0``; ``log Z_0 - log mean exp(log w_rev)`` *over*-estimates ``log Z`` in
  expectation **when the start states are exact samples** (closed-form energies: :class:`TruncatedGaussian`,
  :class:`TruncatedGaussianMixture`). For a trained model only approximate samples exist (forward
  end states resampled by their weights, then Metropolis-corrected transitions at ``b = 1``); the
  reverse figure is then a **diagnostic, not a bound**, and the gap between the two figures is
  what it is good for.
- **Uncertainty**: a bootstrap over chains of ``log mean exp(log w)`` (its standard deviation over
  resamples), the effective sample size ``(sum w)^2 / sum w^2`` and the variance of the log weights.
  A small ESS or a large log-weight variance means the bootstrap standard error is itself unreliable.

Units
-----
``log p(x)`` in nats is a density on the box. Bits per dimension use uniform dequantisation on the
data's own pixel grid: with ``L`` levels (256 for 8-bit images, 17 for scikit-learn's 8x8 digits),
the box is cut into ``L`` equal cells of width ``2 / L`` per coordinate; pixel level ``v`` owns cell
``[-1 + 2v/L, -1 + 2(v+1)/L)``. Evaluating the density at ``u = -1 + 2(v + U)/L``, ``U ~ U[0,1)^D``,
gives (Jensen) a lower bound on the log probability of the discrete image,
``log P(v) >= E_U[log p(u)] + D log(2/L)``, i.e.

    bits/dim = -(E_U[log p(u)] + D log(2 / L)) / (D ln 2) = -E_U[log p(u)] / (D ln 2) + log2(L) - 1.

For 8-bit images this is the usual figure on the ``[0, 256)`` scale (``log2(256) - 1 = 7``): the
affine map ``u_256 = 128 (x + 1)`` takes the box onto ``[0, 256)^D`` with Jacobian ``128^-D``. The
uniform density on the box gives exactly ``log2(L)`` bits/dim (8 for MNIST, 4.09 for digits), so
digits' figures are not comparable with MNIST's. The "continuous" figure evaluates the density at
the stored pixel values instead of dequantised ones (same formula, no noise).

What does not live here: the energies (:mod:`jem_core.energy`), exact ``log Z`` by quadrature in 2-D
(:mod:`jem_core.toy`), SGLD (:mod:`jem_core.sampling`; AIS uses its own Metropolis-corrected transitions).
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import torch
from torch import nn

from .energy import energy as _energy_from_logits
from .errors import BadInput
from .utils import predict_logits

__all__ = ["LikelihoodError", "EnergyFn", "SCHEDULES", "SAMPLERS", "BOUNDARIES", "PUBLISHED_MNIST_BPD",
           "beta_schedule", "log_mean_exp", "effective_sample_size", "bootstrap_se", "model_energy_fn",
           "mh_transition", "StepSizes", "tune_step_sizes", "AISResult", "ais", "forward_ais", "reverse_ais",
           "resample_end_states", "mh_chains", "convergence_sweep", "boundary_acceptance", "dequantize", "bits_per_dim",
           "pixel_levels", "TruncatedGaussian", "TruncatedGaussianMixture", "ConstantEnergy",
           "LikelihoodReport", "estimate_log_likelihood", "quick_log_px"]

#: ``x: [N, *shape] float32 in [-1, 1] -> E(x): [N]`` float, differentiable in ``x``.
EnergyFn = Callable[[torch.Tensor], torch.Tensor]
SCHEDULES = ("sigmoid", "linear")
SAMPLERS = ("hmc", "mala")
BOUNDARIES = ("reflect", "reject")
#: Target Metropolis acceptance of the pilot tuning (Neal 2011 sec. 5.4.4 for HMC; Roberts & Rosenthal 1998 for MALA).
TARGET_ACCEPTANCE = {"hmc": 0.65, "mala": 0.57}
MAX_STEP = 2.0  # the box is 2 wide: a longer leapfrog step only folds around it

#: Published test bits/dim on dequantised MNIST (0..255 scale) of *other model classes* (normalising flows),
#: for scale only: (model, bits/dim, source).
PUBLISHED_MNIST_BPD = [
    ("MAF (flow)", 1.89, "Papamakarios, Pavlakou & Murray 2017, as reported by Grathwohl et al. 2019, "
                         "'FFJORD', ICLR, table 2"),
    ("Real NVP (flow)", 1.06, "Dinh, Sohl-Dickstein & Bengio 2017, as reported by Grathwohl et al. 2019, "
                              "'FFJORD', ICLR, table 2"),
    ("Glow (flow)", 1.05, "Kingma & Dhariwal 2018, as reported by Grathwohl et al. 2019, 'FFJORD', ICLR, table 2"),
    ("FFJORD (flow)", 0.99, "Grathwohl, Chen, Bettencourt, Sutskever & Duvenaud 2019, 'FFJORD', ICLR, table 2"),
]


class LikelihoodError(BadInput):
    """Bad input to the likelihood estimators (shapes, ranges, settings); the message says which."""


# ----------------------------------------------------------------------------------- small pieces
def beta_schedule(n_temps: int, kind: str = "sigmoid", sharpness: float = 4.0) -> torch.Tensor:
    """Inverse temperatures ``0 = b_0 < ... < b_K = 1`` of the annealing path.

    Args:
        n_temps: ``K >= 1``, the number of transitions (intermediate distributions plus the target).
        kind: ``"linear"`` (equal steps) or ``"sigmoid"`` (the BDMC paper's, Grosse et al. 2015: ``b_k`` is
            ``sigmoid(sharpness (2k/K - 1))`` rescaled to ``[0, 1]``, denser at both ends).
        sharpness: the sigmoid's ``delta`` (> 0); 4 as in Grosse et al.

    Returns:
        ``[K + 1]`` float64, strictly increasing, first 0 and last 1.

    Raises:
        LikelihoodError: ``n_temps < 1``, unknown ``kind`` or ``sharpness <= 0``.
    """
    if int(n_temps) < 1:
        raise LikelihoodError(f"need at least 1 temperature; got {n_temps}")
    if kind not in SCHEDULES:
        raise LikelihoodError(f"unknown schedule {kind!r}; choose one of {SCHEDULES}")
    t = torch.linspace(0.0, 1.0, int(n_temps) + 1, dtype=torch.float64)
    if kind == "linear":
        return t
    if not sharpness > 0:
        raise LikelihoodError(f"sharpness must be > 0; got {sharpness}")
    s = torch.sigmoid(sharpness * (2 * t - 1))
    b = (s - s[0]) / (s[-1] - s[0])
    b[0], b[-1] = 0.0, 1.0
    return b


def log_mean_exp(log_w: torch.Tensor, dim: int = -1) -> torch.Tensor:
    """``log mean exp(log_w)`` along ``dim``, computed stably (float64 in, float64 out)."""
    return torch.logsumexp(log_w, dim=dim) - math.log(log_w.shape[dim])


def effective_sample_size(log_w: torch.Tensor) -> float:
    """Kish's effective sample size ``(sum w)^2 / sum w^2`` of importance weights, in ``[1, N]``.

    Args:
        log_w: ``[N]`` log weights (any float dtype; non-finite weights count as zero).
    """
    lw = log_w.double()
    lw = torch.where(torch.isfinite(lw), lw, torch.full_like(lw, -math.inf))
    return float(torch.exp(2 * torch.logsumexp(lw, 0) - torch.logsumexp(2 * lw, 0)))


def bootstrap_se(log_w: torch.Tensor, n_boot: int = 1000, seed: int = 0) -> float:
    """Bootstrap standard error (nats) of ``log mean exp(log_w)`` over chains (Efron & Tibshirani 1993).

    Args:
        log_w: ``[N]`` log weights, ``N >= 2``.
        n_boot: number of resamples with replacement.
        seed: seed of the resampling.

    Returns:
        The standard deviation of the resampled estimates (nats). With few effective samples (see
        :func:`effective_sample_size`) it understates the real error: the heaviest weights may not have
        been drawn at all.
    """
    lw = log_w.double().cpu()
    if lw.numel() < 2:
        return math.nan
    g = torch.Generator().manual_seed(seed)
    idx = torch.randint(0, lw.numel(), (n_boot, lw.numel()), generator=g)
    est = log_mean_exp(lw[idx], dim=1)
    return float(est.std())


def model_energy_fn(model: nn.Module) -> EnergyFn:
    """``E(x) = -logsumexp_y f(x)[y]`` of a classifier (JEM eq. 5) as an :data:`EnergyFn`.

    Args:
        model: ``f: [N, C, H, W] float32 in [-1, 1] -> logits [N, K]`` (a :class:`~jem_core.energy.JEM`
            or a bare backbone), in eval mode.

    Returns:
        a function ``x [N, C, H, W] -> E(x) [N]`` float32, differentiable in ``x``.
    """
    def fn(x: torch.Tensor) -> torch.Tensor:
        return _energy_from_logits(model(x).float())
    return fn


def _energy_grad(energy_fn: EnergyFn, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``E(x)`` ``[N]`` (float64) and ``dE/dx`` (x's shape and dtype), both detached."""
    with torch.enable_grad():
        xg = x.detach().requires_grad_(True)
        e = energy_fn(xg)
        (g,) = torch.autograd.grad(e.sum(), xg)
    return e.detach().double(), g.detach()


def _reflect(x: torch.Tensor, p: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Fold positions into ``[-1, 1]`` by reflection at the walls, negating momenta an odd number of times folded."""
    k = torch.floor((x + 1) / 2)               # how many walls were crossed (signed)
    odd = torch.remainder(k, 2) == 1
    y = x - 2 * k                              # in [-1, 1) after an even fold
    y = torch.where(odd, -y, y)                # an odd fold mirrors
    return y.clamp_(-1.0, 1.0), torch.where(odd, -p, p)


def _outside(x: torch.Tensor) -> torch.Tensor:
    return (x.flatten(1).abs() > 1).any(1)


def _sq(p: torch.Tensor) -> torch.Tensor:
    return p.flatten(1).double().pow(2).sum(1)


def mh_transition(energy_fn: EnergyFn, x: torch.Tensor, e: torch.Tensor, g: torch.Tensor, beta: float,
                  step: float, n_leapfrog: int = 5, boundary: str = "reflect",
                  generator: torch.Generator | None = None
                  ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """One Metropolis-corrected HMC transition per chain, leaving ``pi_b ∝ exp(-b E(x))`` on the box invariant.

    Leapfrog integration of ``H(x, p) = b E(x) + |p|^2 / 2`` with ``n_leapfrog`` steps of size ``step``,
    then a Metropolis test on ``H`` (Neal 2011, "MCMC using Hamiltonian dynamics", sec. 5.3.2). With
    ``n_leapfrog = 1`` this is MALA with step ``step`` (Neal 2011, sec. 5.2). ``boundary="reflect"``
    folds a position that leaves ``[-1, 1]`` back in and negates that momentum (Neal 2011, sec.
    5.5.1.5; exact); ``"reject"`` rejects any trajectory that left the box (exact, but freezes in high
    dimension).

    Args:
        energy_fn: ``[N, *shape] -> [N]``.
        x: ``[N, *shape]`` float32 states in ``[-1, 1]``.
        e: ``[N]`` float64, ``E(x)``.
        g: ``dE/dx`` at ``x``, ``x``'s shape.
        beta: inverse temperature ``b`` in ``[0, 1]``.
        step: leapfrog step size (> 0), in box units.
        n_leapfrog: leapfrog steps per transition (>= 1).
        boundary: ``"reflect"`` or ``"reject"``.
        generator: random generator on ``x``'s device.

    Returns:
        ``(x, e, g, accept_prob)``: the new states, their energies and gradients, and the ``[N]``
        float64 Metropolis acceptance probabilities ``min(1, exp(-ΔH))`` of the proposals.
    """
    p0 = torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)
    h0 = beta * e + 0.5 * _sq(p0)
    xn, p = x, p0 - (0.5 * step * beta) * g
    left = torch.zeros(x.shape[0], dtype=torch.bool, device=x.device)
    en, gn = e, g
    for i in range(n_leapfrog):
        xn = xn + step * p
        if boundary == "reflect":
            xn, p = _reflect(xn, p)
        else:
            left |= _outside(xn)
        en, gn = _energy_grad(energy_fn, xn)
        p = p - (step * beta if i < n_leapfrog - 1 else 0.5 * step * beta) * gn
    h1 = beta * en + 0.5 * _sq(p)
    log_a = (h0 - h1).nan_to_num(nan=-math.inf)
    log_a = torch.where(left, torch.full_like(log_a, -math.inf), log_a)
    acc_prob = log_a.clamp(max=0).exp()
    u = torch.rand(x.shape[0], generator=generator, device=x.device, dtype=torch.float64)
    take = torch.log(u) < log_a
    view = (-1,) + (1,) * (x.dim() - 1)
    x = torch.where(take.view(view), xn, x)
    g = torch.where(take.view(view), gn, g)
    e = torch.where(take, en, e)
    return x, e, g, acc_prob


def _check_sampler(sampler: str, boundary: str, n_leapfrog: int) -> int:
    if sampler not in SAMPLERS:
        raise LikelihoodError(f"unknown sampler {sampler!r}; choose one of {SAMPLERS}")
    if boundary not in BOUNDARIES:
        raise LikelihoodError(f"unknown boundary {boundary!r}; choose one of {BOUNDARIES}")
    if int(n_leapfrog) < 1:
        raise LikelihoodError(f"need at least 1 leapfrog step; got {n_leapfrog}")
    return 1 if sampler == "mala" else int(n_leapfrog)


# -------------------------------------------------------------------------------- step-size pilot
@dataclass
class StepSizes:
    """Frozen leapfrog step sizes as a function of ``b``, from a pilot run.

    Attributes:
        betas: ``[P]`` float64 pilot temperatures, increasing from 0 to 1.
        steps: ``[P]`` float64 step sizes tuned at those temperatures (box units).
        acceptance: ``[P]`` mean acceptance probability reached in the pilot.
    """

    betas: torch.Tensor
    steps: torch.Tensor
    acceptance: torch.Tensor

    def at(self, betas: torch.Tensor) -> torch.Tensor:
        """Step sizes ``[M]`` float64 at ``betas`` ``[M]``, interpolated linearly in ``log step``."""
        b = betas.double().cpu().clamp(0, 1)
        idx = torch.searchsorted(self.betas, b).clamp(1, len(self.betas) - 1)
        b0, b1 = self.betas[idx - 1], self.betas[idx]
        w = ((b - b0) / (b1 - b0).clamp_min(1e-300)).clamp(0, 1)
        ls = self.steps.log()
        return torch.exp(ls[idx - 1] * (1 - w) + ls[idx] * w)

    def to_dict(self) -> dict[str, list[float]]:
        return {"betas": [round(float(v), 6) for v in self.betas], "steps": [float(f"{v:.4g}") for v in self.steps],
                "acceptance": [round(float(v), 3) for v in self.acceptance]}


def tune_step_sizes(energy_fn: EnergyFn, shape: Sequence[int], sampler: str = "hmc", n_leapfrog: int = 5,
                    boundary: str = "reflect", n_pilot_temps: int = 50, n_chains: int = 16, adapt_iters: int = 3,
                    schedule: str = "sigmoid", seed: int = 0, device: torch.device | str = "cpu",
                    progress: Callable[[float], None] | None = None) -> StepSizes:
    """Pilot run: a short forward anneal with few chains that tunes the step size at each pilot temperature.

    At every pilot temperature the step is multiplied by ``exp(2 (a - a*))`` after each of
    ``adapt_iters`` transitions, ``a`` the chains' mean acceptance probability and ``a*`` the target
    (0.65 for HMC, Neal 2011 sec. 5.4.4; 0.57 for MALA, Roberts & Rosenthal 1998); steps stay in
    ``[1e-4, 2]``. The measured AIS run then uses these steps frozen (:meth:`StepSizes.at`), so its
    transitions do not depend on its own history.

    Args:
        energy_fn: ``[N, *shape] -> [N]``.
        shape: one state's shape, e.g. ``(1, 28, 28)``.
        sampler, n_leapfrog, boundary: as in :func:`ais`.
        n_pilot_temps: pilot temperatures (>= 1) on the ``schedule``.
        n_chains: pilot chains (>= 1).
        adapt_iters: transitions per pilot temperature (>= 1).
        schedule: ``"sigmoid"`` or ``"linear"``.
        seed: seed of the pilot's generator.
        device: where the chains live.
        progress: called with the fraction done.

    Returns:
        :class:`StepSizes`.

    Raises:
        LikelihoodError: bad settings.
    """
    n_leapfrog = _check_sampler(sampler, boundary, n_leapfrog)
    if int(n_chains) < 1 or int(adapt_iters) < 1:
        raise LikelihoodError(f"need n_chains >= 1 and adapt_iters >= 1; got {n_chains}, {adapt_iters}")
    betas = beta_schedule(n_pilot_temps, schedule)
    target = TARGET_ACCEPTANCE[sampler]
    g = torch.Generator(device).manual_seed(seed)
    x = torch.rand((int(n_chains), *shape), generator=g, device=device).mul_(2).sub_(1)
    e, gr = _energy_grad(energy_fn, x)
    step, steps, accs = 0.5, [], []
    for k, b in enumerate(betas.tolist()):
        a = 0.0
        for _ in range(int(adapt_iters) * (3 if k == 0 else 1)):
            x, e, gr, acc = mh_transition(energy_fn, x, e, gr, b, step, n_leapfrog, boundary, g)
            a = float(acc.mean())
            step = float(min(MAX_STEP, max(1e-4, step * math.exp(2.0 * (a - target)))))
        steps.append(step)
        accs.append(a)
        if progress is not None:
            progress((k + 1) / len(betas))
    return StepSizes(betas, torch.tensor(steps, dtype=torch.float64), torch.tensor(accs, dtype=torch.float64))


# ------------------------------------------------------------------------------------------- AIS
@dataclass
class AISResult:
    """One annealing run.

    Attributes:
        log_z: ``log Ẑ`` (nats) of ``Z = ∫_box exp(-E(x)) dx``; forward runs under-estimate ``log Z`` in
            expectation, reverse runs from exact samples over-estimate it.
        log_z_se: bootstrap standard error of ``log_z`` (nats).
        ess: effective sample size of the weights, in ``[1, n_chains]``.
        log_w_var: variance of the log weights (nats^2).
        log_w: ``[N]`` float64 log weights (relative to the base, without ``log Z_0``).
        direction: ``"forward"`` (uniform -> model) or ``"reverse"`` (model -> uniform).
        start: what the chains started from: ``"uniform"``, ``"exact samples"`` or ``"approximate samples"``.
        n_temps, n_chains, sampler, n_leapfrog, boundary, schedule: the settings.
        log_z0: ``D log 2``, the uniform box's log volume.
        dim: ``D``.
        curve_betas, curve_log_z, curve_ess: the running estimate over ``b`` (forward: ``log Ẑ_b`` of
            ``∫ exp(-b E)``; reverse: the same quantity read from the reverse weights accumulated so far),
            at most 201 points.
        acceptance: mean acceptance probability per temperature ``[K]``.
        end_states: ``[N, *shape]`` float32 final states (forward: approximate samples of the model).
        end_energies: ``[N]`` float64 ``E`` of the end states.
        seconds: wall time of the run (without the pilot).
        energy_evals: gradient evaluations per chain.
    """

    log_z: float
    log_z_se: float
    ess: float
    log_w_var: float
    log_w: torch.Tensor
    direction: str
    start: str
    n_temps: int
    n_chains: int
    sampler: str
    n_leapfrog: int
    boundary: str
    schedule: str
    log_z0: float
    dim: int
    curve_betas: list[float] = field(default_factory=list)
    curve_log_z: list[float] = field(default_factory=list)
    curve_ess: list[float] = field(default_factory=list)
    acceptance: list[float] = field(default_factory=list)
    end_states: torch.Tensor | None = None
    end_energies: torch.Tensor | None = None
    seconds: float = 0.0
    energy_evals: int = 0

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready summary (no tensors except the curve as lists)."""
        acc = self.acceptance
        return {"direction": self.direction, "start": self.start, "log_z": self.log_z, "log_z_se": self.log_z_se,
                "ess": self.ess, "log_w_var": self.log_w_var, "temps": self.n_temps, "chains": self.n_chains,
                "sampler": self.sampler, "n_leapfrog": self.n_leapfrog, "boundary": self.boundary,
                "schedule": self.schedule, "log_z0": self.log_z0, "dim": self.dim,
                "mean_acceptance": float(sum(acc) / len(acc)) if acc else None,
                "min_acceptance": float(min(acc)) if acc else None, "seconds": self.seconds,
                "energy_evals_per_chain": self.energy_evals,
                "curve": {"beta": self.curve_betas, "log_z": self.curve_log_z, "ess": self.curve_ess}}


def _curve_points(n_temps: int, max_points: int = 201) -> set[int]:
    if n_temps + 1 <= max_points:
        return set(range(n_temps + 1))
    return {round(i * n_temps / (max_points - 1)) for i in range(max_points)}


def ais(energy_fn: EnergyFn, shape: Sequence[int], n_temps: int = 200, n_chains: int = 64,
        schedule: str = "sigmoid", sampler: str = "hmc", n_leapfrog: int = 5, boundary: str = "reflect",
        step_sizes: StepSizes | None = None, init: torch.Tensor | None = None, reverse: bool = False,
        start: str | None = None, n_boot: int = 1000, seed: int = 0, device: torch.device | str = "cpu",
        progress: Callable[[float], None] | None = None) -> AISResult:
    """Annealed importance sampling of ``log Z = log ∫_[-1,1]^D exp(-E(x)) dx`` (Neal 2001).

    Forward (``reverse=False``): chains start uniform on the box (or at ``init``, which must then be
    uniform draws) and anneal ``b: 0 -> 1``; ``log Ẑ = D log 2 + log mean exp(log w)``, ``log w =
    sum_k (b_k - b_{k-1}) (-E(x_{k-1}))``. Reverse (``reverse=True``, Grosse et al. 2015): chains start
    at ``init`` (samples of ``exp(-E)`` on the box) and anneal ``b: 1 -> 0`` with the same transitions;
    ``log Ẑ_rev = D log 2 - log mean exp(log w_rev)``, an over-estimate in expectation when ``init``
    holds exact samples, a diagnostic otherwise.

    Args:
        energy_fn: ``x [N, *shape] float32 in [-1, 1] -> E(x) [N]``, differentiable in ``x``.
        shape: one state's shape (``D`` = its product).
        n_temps: ``K >= 1`` transitions along the path.
        n_chains: ``N >= 2`` chains (ignored when ``init`` is given: its length).
        schedule: ``"sigmoid"`` (default) or ``"linear"``, see :func:`beta_schedule`.
        sampler: ``"hmc"`` (default) or ``"mala"`` (one leapfrog step).
        n_leapfrog: leapfrog steps per HMC transition.
        boundary: ``"reflect"`` (default) or ``"reject"``.
        step_sizes: frozen steps from :func:`tune_step_sizes`; None runs a pilot first (16 chains,
            ``min(K, 50)`` temperatures, not counted in ``seconds``).
        init: ``[N, *shape]`` float32 start states in ``[-1, 1]`` (required for reverse runs).
        reverse: anneal from the model down to the uniform base.
        start: label of ``init`` for the result (``"exact samples"`` or ``"approximate samples"``).
        n_boot: bootstrap resamples for the standard error.
        seed: seed of the run's generator.
        device: where the chains live (the model must be there too).
        progress: called with the fraction done in ``[0, 1]``.

    Returns:
        :class:`AISResult`.

    Raises:
        LikelihoodError: bad settings, ``init`` of the wrong shape or outside the box, or a reverse run
            without ``init``.
    """
    shape = tuple(int(s) for s in shape)
    n_leapfrog = _check_sampler(sampler, boundary, n_leapfrog)
    if init is None:
        if reverse:
            raise LikelihoodError("a reverse run needs start states (init) sampled from the model")
        if int(n_chains) < 2:
            raise LikelihoodError(f"need at least 2 chains; got {n_chains}")
    else:
        if tuple(init.shape[1:]) != shape or init.shape[0] < 2:
            raise LikelihoodError(f"init must be [N >= 2, {', '.join(map(str, shape))}]; got {tuple(init.shape)}")
        if not torch.isfinite(init).all() or float(init.abs().max()) > 1 + 1e-6:
            raise LikelihoodError("init states must be finite and lie in [-1, 1]")
    betas = beta_schedule(n_temps, schedule)
    if step_sizes is None:
        step_sizes = tune_step_sizes(energy_fn, shape, sampler, n_leapfrog, boundary, min(int(n_temps), 50), 16,
                                     schedule=schedule, seed=seed + 1, device=device)
    steps = step_sizes.at(betas)
    if reverse:
        betas, steps = betas.flip(0), steps.flip(0)
    dim = math.prod(shape)
    log_z0 = dim * math.log(2.0)
    g = torch.Generator(device).manual_seed(seed)
    if init is None:
        x = torch.rand((int(n_chains), *shape), generator=g, device=device).mul_(2).sub_(1)
        start = "uniform"
    else:
        x = init.detach().to(device=device, dtype=torch.float32).clamp(-1, 1)
        start = start or "given states"
    n = x.shape[0]
    t0 = time.perf_counter()
    e, gr = _energy_grad(energy_fn, x)
    log_w = torch.zeros(n, dtype=torch.float64, device=device)
    keep = _curve_points(int(n_temps))
    curve_b, curve_z, curve_ess = [float(betas[0])], [0.0], [float(n)]
    accs: list[float] = []
    bl, sl = betas.tolist(), steps.tolist()
    for k in range(1, len(bl)):
        log_w += (bl[k] - bl[k - 1]) * (-e)
        x, e, gr, acc = mh_transition(energy_fn, x, e, gr, bl[k], sl[k], n_leapfrog, boundary, g)
        accs.append(float(acc.mean()))
        if k in keep:
            lme = float(log_mean_exp(log_w))
            curve_b.append(bl[k])
            curve_z.append(lme)
            curve_ess.append(effective_sample_size(log_w))
        if progress is not None:
            progress(k / (len(bl) - 1))
    seconds = time.perf_counter() - t0
    if not torch.isfinite(log_w).all():
        raise LikelihoodError("non-finite log weights: the energy returned NaN or infinity on the box")
    lw = log_w.cpu()
    est = float(log_mean_exp(lw))
    # Forward partial weights estimate log(Z_b / Z_0); reverse ones log(Z_b / Z_1): both curves are log Ẑ_b.
    log_z = log_z0 - est if reverse else log_z0 + est
    curve_z = [(log_z if reverse else log_z0) + v for v in curve_z]
    return AISResult(log_z=log_z, log_z_se=bootstrap_se(lw, n_boot, seed), ess=effective_sample_size(lw),
                     log_w_var=float(lw.var()), log_w=lw, direction="reverse" if reverse else "forward",
                     start=start, n_temps=int(n_temps), n_chains=n, sampler=sampler, n_leapfrog=n_leapfrog,
                     boundary=boundary, schedule=schedule, log_z0=log_z0, dim=dim, curve_betas=curve_b,
                     curve_log_z=curve_z, curve_ess=curve_ess, acceptance=accs, end_states=x.detach().float(),
                     end_energies=e.detach().cpu(), seconds=seconds, energy_evals=1 + n_leapfrog * int(n_temps))


def forward_ais(energy_fn: EnergyFn, shape: Sequence[int], **kw: Any) -> AISResult:
    """Forward AIS from the uniform law on the box to ``exp(-E)``; see :func:`ais` (same arguments)."""
    return ais(energy_fn, shape, reverse=False, **kw)


def reverse_ais(energy_fn: EnergyFn, samples: torch.Tensor, exact: bool, **kw: Any) -> AISResult:
    """Reverse AIS from ``samples`` of ``exp(-E)`` on the box down to the uniform law (Grosse et al. 2015).

    Args:
        energy_fn: ``[N, *shape] -> [N]``.
        samples: ``[N, *shape]`` float32 in ``[-1, 1]``, the start states.
        exact: True when ``samples`` are exact draws of the model (then ``log_z`` over-estimates
            ``log Z`` in expectation and brackets it with forward AIS); False for approximate draws (a
            diagnostic, not a bound).
        **kw: the other arguments of :func:`ais`.

    Returns:
        :class:`AISResult` with ``direction="reverse"``.
    """
    return ais(energy_fn, tuple(samples.shape[1:]), init=samples, reverse=True,
               start="exact samples" if exact else "approximate samples", **kw)


def resample_end_states(result: AISResult, energy_fn: EnergyFn, n: int | None = None, n_steps: int = 20,
                        step: float = 0.05, n_leapfrog: int = 5, boundary: str = "reflect", seed: int = 0
                        ) -> torch.Tensor:
    """Approximate samples of the model: forward end states resampled by their AIS weights, then moved.

    Multinomial resampling by ``w_i / sum w`` (the weighted end states of forward AIS are consistent
    for expectations under the model as ``N`` grows; Neal 2001, sec. 3), then ``n_steps`` exact
    Metropolis-corrected HMC transitions at ``b = 1`` to separate duplicates. The result is *not* an
    exact sample for finite ``N``: a reverse run from it is a diagnostic, not an upper bound.

    Args:
        result: a forward :class:`AISResult` (with ``end_states``).
        energy_fn: the same energy.
        n: number of samples (default: the number of chains).
        n_steps: HMC transitions at ``b = 1`` after resampling (>= 0).
        step: their leapfrog step size (box units).
        n_leapfrog, boundary: as in :func:`mh_transition`.
        seed: seed of the resampling and the transitions.

    Returns:
        ``[n, *shape]`` float32 in ``[-1, 1]``.

    Raises:
        LikelihoodError: ``result`` is not a forward run or holds no end states.
    """
    if result.direction != "forward" or result.end_states is None:
        raise LikelihoodError("resampling needs a forward AIS result with end states")
    x = result.end_states
    n = int(n or x.shape[0])
    g = torch.Generator(x.device).manual_seed(seed)
    w = torch.softmax(result.log_w.double(), 0).to(x.device)
    idx = torch.multinomial(w, n, replacement=True, generator=g)
    x = x[idx].clone()
    e, gr = _energy_grad(energy_fn, x)
    for _ in range(int(n_steps)):
        x, e, gr, _ = mh_transition(energy_fn, x, e, gr, 1.0, step, n_leapfrog, boundary, g)
    return x


def mh_chains(energy_fn: EnergyFn, x0: torch.Tensor, n_steps: int, step: float, n_leapfrog: int = 5,
              boundary: str = "reflect", every: int = 10, seed: int = 0) -> tuple[torch.Tensor, list[float]]:
    """Metropolis-corrected HMC chains at the model's own temperature (``b = 1``) from given states.

    Started at data, they show where the model's own density puts its mass: if the chains drift away
    from the data to other states (higher energy, far larger volume), the data are not typical draws
    of ``p(x)``. Their end states are approximate samples (a reverse run from them is a diagnostic).

    Args:
        energy_fn: ``[N, *shape] -> [N]``.
        x0: ``[N, *shape]`` float32 start states in ``[-1, 1]``.
        n_steps: transitions (>= 0).
        step: leapfrog step size (box units), e.g. ``tune_step_sizes(...).at(torch.ones(1))``.
        n_leapfrog, boundary: as in :func:`mh_transition`.
        every: record the mean energy every this many transitions.
        seed: seed.

    Returns:
        ``(x, trace)``: the end states ``[N, *shape]`` float32 and the chains' mean energy at transitions
        ``0, every, 2 every, ...`` (floats).

    Raises:
        LikelihoodError: start states outside the box.
    """
    if not torch.isfinite(x0).all() or float(x0.abs().max()) > 1 + 1e-6:
        raise LikelihoodError("start states must be finite and lie in [-1, 1]")
    g = torch.Generator(x0.device).manual_seed(seed)
    x = x0.detach().float().clamp(-1, 1)
    e, gr = _energy_grad(energy_fn, x)
    trace = [float(e.mean())]
    for i in range(1, int(n_steps) + 1):
        x, e, gr, _ = mh_transition(energy_fn, x, e, gr, 1.0, step, n_leapfrog, boundary, g)
        if i % max(1, int(every)) == 0:
            trace.append(float(e.mean()))
    return x, trace


def convergence_sweep(energy_fn: EnergyFn, shape: Sequence[int], temps: Sequence[int],
                      reverse_from: torch.Tensor | None = None, exact: bool = False,
                      progress: Callable[[float], None] | None = None, **kw: Any) -> list[dict[str, Any]]:
    """Forward (and, given start states, reverse) AIS for each number of temperatures in ``temps``.

    The estimate has converged when more temperatures stop moving it beyond its error and the
    forward/reverse gap closes within the error (Grosse et al. 2015, sec. 5).

    Args:
        energy_fn: ``[N, *shape] -> [N]``.
        shape: one state's shape.
        temps: numbers of temperatures, each >= 1.
        reverse_from: ``[N, *shape]`` start states of the reverse runs (None: forward only).
        exact: whether ``reverse_from`` holds exact samples (see :func:`reverse_ais`).
        progress: called with the fraction done.
        **kw: the other arguments of :func:`ais` (pass ``step_sizes`` to share one pilot).

    Returns:
        One dict per entry of ``temps``: ``temps``, ``log_z``, ``log_z_se``, ``ess``, ``log_w_var``,
        ``reverse_log_z``, ``reverse_log_z_se`` (None without reverse), ``gap`` (reverse - forward),
        ``seconds``.
    """
    temps = [int(t) for t in temps]
    total = sum(temps) * (2 if reverse_from is not None else 1)
    done, rows = 0, []
    kw.setdefault("step_sizes", None)
    if kw["step_sizes"] is None:
        kw["step_sizes"] = tune_step_sizes(energy_fn, shape, kw.get("sampler", "hmc"), kw.get("n_leapfrog", 5),
                                           kw.get("boundary", "reflect"), min(max(temps), 50), 16,
                                           schedule=kw.get("schedule", "sigmoid"), seed=kw.get("seed", 0) + 1,
                                           device=kw.get("device", "cpu"))

    def sub(k: int) -> Callable[[float], None] | None:
        return None if progress is None else (lambda f: progress((done + f * k) / total))

    for k in temps:
        f = ais(energy_fn, shape, n_temps=k, progress=sub(k), **kw)
        done += k
        row = {"temps": k, "log_z": f.log_z, "log_z_se": f.log_z_se, "ess": f.ess, "log_w_var": f.log_w_var,
               "reverse_log_z": None, "reverse_log_z_se": None, "gap": None, "seconds": f.seconds}
        if reverse_from is not None:
            r = reverse_ais(energy_fn, reverse_from, exact, n_temps=k, progress=sub(k), **kw)
            done += k
            row.update(reverse_log_z=r.log_z, reverse_log_z_se=r.log_z_se, gap=r.log_z - f.log_z,
                       seconds=f.seconds + r.seconds)
        rows.append(row)
    return rows


def boundary_acceptance(dim: int, boundary: str, step: float = 0.5, n_leapfrog: int = 5, n_chains: int = 256,
                        seed: int = 0) -> float:
    """Mean HMC acceptance at ``b = 0`` (the uniform law on ``[-1, 1]^dim``) with a given wall handling.

    With ``"reflect"`` the Hamiltonian is conserved exactly (zero gradient, reflection keeps ``|p|``), so
    every proposal is accepted; with ``"reject"`` a proposal survives only if all ``dim`` coordinates
    stay inside, which vanishes as ``dim`` grows: the reason reflection is the default.

    Args:
        dim: ``D >= 1``.
        boundary: ``"reflect"`` or ``"reject"``.
        step, n_leapfrog: the leapfrog settings.
        n_chains: chains averaged over.
        seed: seed.

    Returns:
        The acceptance rate in ``[0, 1]``.
    """
    _check_sampler("hmc", boundary, n_leapfrog)
    g = torch.Generator().manual_seed(seed)
    x = torch.rand((n_chains, int(dim)), generator=g).mul_(2).sub_(1)

    def zero(z: torch.Tensor) -> torch.Tensor:
        return z.sum(1) * 0.0

    e, gr = _energy_grad(zero, x)
    _, _, _, acc = mh_transition(zero, x, e, gr, 0.0, step, n_leapfrog, boundary, g)
    return float(acc.mean())


# ------------------------------------------------------------------------------------------- units
def pixel_levels(dataset: str) -> int | None:
    """Number of pixel levels of a dataset's images: 17 for scikit-learn's digits (0..16), None for
    continuous 2-D ``toy:`` points (no dequantisation, no bits/dim), else 256."""
    name = str(dataset).split(":")[0]
    return 17 if name == "digits" else None if name == "toy" else 256


def dequantize(x: torch.Tensor, levels: int = 256, generator: torch.Generator | None = None) -> torch.Tensor:
    """Uniform dequantisation of images stored on an ``levels``-level grid in ``[-1, 1]``.

    A stored pixel ``x = -1 + 2 v / (levels - 1)`` (level ``v``) is replaced by ``-1 + 2 (v + U) / levels``,
    ``U ~ U[0, 1)``: a uniform draw in the ``v``-th of ``levels`` equal cells that tile ``[-1, 1]``.

    Args:
        x: ``[N, C, H, W]`` float32 in ``[-1, 1]`` on the grid (off-grid values are rounded to it).
        levels: number of pixel levels (>= 2): 256 for 8-bit images, 17 for digits.
        generator: random generator.

    Returns:
        ``[N, C, H, W]`` float32 in ``[-1, 1)``.

    Raises:
        LikelihoodError: ``levels < 2``.
    """
    if int(levels) < 2:
        raise LikelihoodError(f"need at least 2 pixel levels; got {levels}")
    v = torch.round((x.clamp(-1, 1) + 1) * (levels - 1) / 2)
    u = torch.rand(x.shape, generator=generator, device=x.device, dtype=x.dtype)
    return (-1 + 2 * (v + u) / levels).to(x.dtype)


def bits_per_dim(log_px_nats: float | torch.Tensor, dim: int, levels: int = 256) -> float | torch.Tensor:
    """Bits per dimension of a density on the box, on the ``levels``-level pixel scale.

    ``bits/dim = -(log p(x) + D log(2 / L)) / (D ln 2) = -log p(x) / (D ln 2) + log2(L) - 1``: the box
    ``[-1, 1]^D`` is mapped affinely onto ``[0, L)^D`` (``u = L (x + 1) / 2``, Jacobian ``(2 / L)^D``).
    For ``L = 256`` this is the usual dequantised figure on the 0..255 scale (``+ 7``); the uniform density
    on the box (``log p = -D log 2``) gives ``log2(L)`` (8 for 8-bit images, 4.09 for digits' 17 levels).

    Args:
        log_px_nats: ``log p(x)`` in nats (a density on the box), a float or a tensor.
        dim: ``D``.
        levels: ``L``.

    Returns:
        Same type as ``log_px_nats``.
    """
    return -log_px_nats / (dim * math.log(2.0)) + math.log2(levels) - 1.0


# --------------------------------------------------------------------------- closed-form energies
def _log_ndtr_diff(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``log(Φ(b) - Φ(a))`` for ``a < b`` (float64), stable in either tail."""
    flip = (a + b) > 0  # use the symmetric side where the probabilities are not close to 1
    a2, b2 = torch.where(flip, -b, a), torch.where(flip, -a, b)
    lb, la = torch.special.log_ndtr(b2), torch.special.log_ndtr(a2)
    return lb + torch.log1p(-torch.exp(la - lb))


class TruncatedGaussian:
    """``E(x) = sum_i (x_i - mu_i)^2 / (2 s_i^2)`` on the box: a Gaussian truncated to ``[-1, 1]^D``.

    ``log Z = sum_i [log s_i + log(2 pi) / 2 + log(Φ((1 - mu_i) / s_i) - Φ((-1 - mu_i) / s_i))]`` (a
    product of one-dimensional truncated integrals). Exact samples by the inverse CDF.

    Args:
        mean: scalar or ``[*shape]`` means (inside or outside the box).
        std: scalar or ``[*shape]`` standard deviations (> 0).
        shape: one state's shape.

    Raises:
        LikelihoodError: a non-positive standard deviation.
    """

    def __init__(self, mean: float | torch.Tensor, std: float | torch.Tensor, shape: Sequence[int]):
        self.shape = tuple(int(s) for s in shape)
        self.mean = torch.as_tensor(mean, dtype=torch.float64).expand(self.shape).clone()
        self.std = torch.as_tensor(std, dtype=torch.float64).expand(self.shape).clone()
        if not bool((self.std > 0).all()):
            raise LikelihoodError("standard deviations must be > 0")

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        """``E(x)`` ``[N]`` (x's dtype) for ``x`` ``[N, *shape]``."""
        m, s = self.mean.to(x), self.std.to(x)
        return (((x - m) / s) ** 2 / 2).flatten(1).sum(1)

    def log_z(self) -> float:
        """The exact ``log ∫_box exp(-E(x)) dx`` (nats)."""
        a, b = (-1 - self.mean) / self.std, (1 - self.mean) / self.std
        return float((self.std.log() + 0.5 * math.log(2 * math.pi) + _log_ndtr_diff(a, b)).sum())

    def sample(self, n: int, generator: torch.Generator | None = None) -> torch.Tensor:
        """``n`` exact samples ``[n, *shape]`` float32 in ``[-1, 1]`` (inverse CDF)."""
        a, b = (-1 - self.mean) / self.std, (1 - self.mean) / self.std
        fa, fb = torch.special.ndtr(a), torch.special.ndtr(b)
        u = torch.rand((int(n), *self.shape), generator=generator, dtype=torch.float64)
        z = torch.special.ndtri((fa + u * (fb - fa)).clamp(1e-300, 1 - 1e-16))
        return (self.mean + self.std * z).clamp(-1, 1).float()


class TruncatedGaussianMixture:
    """``exp(-E(x)) = sum_j w_j exp(-E_j(x))`` with :class:`TruncatedGaussian` components, on the box.

    ``log Z = logsumexp_j (log w_j + log Z_j)``; exact samples by picking component ``j`` with
    probability ``w_j Z_j / Z`` and sampling it.

    Args:
        components: the :class:`TruncatedGaussian` terms (same shape).
        weights: positive weights ``w_j`` (default all 1).

    Raises:
        LikelihoodError: no components, shapes differ, or a weight is not positive.
    """

    def __init__(self, components: Sequence[TruncatedGaussian], weights: Sequence[float] | None = None):
        if not components or len({c.shape for c in components}) != 1:
            raise LikelihoodError("need at least one component, all of the same shape")
        self.components = list(components)
        self.shape = components[0].shape
        self.log_weights = torch.tensor([math.log(w) if w > 0 else math.nan for w in (weights or [1.0] * len(components))],
                                        dtype=torch.float64)
        if len(self.log_weights) != len(self.components) or torch.isnan(self.log_weights).any():
            raise LikelihoodError("need one positive weight per component")

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        """``E(x)`` ``[N]`` for ``x`` ``[N, *shape]``."""
        terms = torch.stack([lw.to(x) - c(x) for lw, c in zip(self.log_weights, self.components)], 1)
        return -torch.logsumexp(terms, 1)

    def log_z(self) -> float:
        """The exact ``log Z`` (nats)."""
        return float(torch.logsumexp(self.log_weights + torch.tensor([c.log_z() for c in self.components]), 0))

    def sample(self, n: int, generator: torch.Generator | None = None) -> torch.Tensor:
        """``n`` exact samples ``[n, *shape]`` float32."""
        logits = self.log_weights + torch.tensor([c.log_z() for c in self.components])
        j = torch.multinomial(torch.softmax(logits, 0), int(n), replacement=True, generator=generator)
        out = torch.empty((int(n), *self.shape))
        for i, c in enumerate(self.components):
            sel = j == i
            if sel.any():
                out[sel] = c.sample(int(sel.sum()), generator)
        return out


class ConstantEnergy:
    """``E(x) = c`` on the box: ``log Z = D log 2 - c``; exact samples are uniform.

    Args:
        value: the constant ``c``.
        shape: one state's shape.
    """

    def __init__(self, value: float, shape: Sequence[int]):
        self.value, self.shape = float(value), tuple(int(s) for s in shape)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        """``E(x) = c`` ``[N]`` (kept differentiable in ``x``)."""
        return x.flatten(1).sum(1) * 0.0 + self.value

    def log_z(self) -> float:
        """``D log 2 - c`` (nats)."""
        return math.prod(self.shape) * math.log(2.0) - self.value

    def sample(self, n: int, generator: torch.Generator | None = None) -> torch.Tensor:
        """``n`` uniform samples ``[n, *shape]`` float32 in ``[-1, 1]``."""
        return torch.rand((int(n), *self.shape), generator=generator).mul_(2).sub_(1)


# ------------------------------------------------------------------------------ the model's report
@dataclass
class LikelihoodReport:
    """Normalised likelihood of a model: ``log Z`` by AIS, both directions, a sweep, test ``log p(x)``.

    Every figure is for the density ``p(x) = exp(-E(x)) / Z`` on the box ``[-1, 1]^D`` at temperature 1,
    for the model as trained.

    Attributes:
        forward: the main forward :class:`AISResult` (``log_z`` under-estimates ``log Z`` in expectation).
        reverse: the reverse :class:`AISResult` from approximate samples (a diagnostic, not a bound), or None.
        sweep: rows of :func:`convergence_sweep` (fewer temperatures first, the main run last).
        step_sizes: the pilot's :class:`StepSizes`.
        test_log_px: ``[M]`` float64 ``-E(x) - log Ẑ`` (nats) of the test images at their stored pixels.
        test_log_px_deq: ``[M]`` float64, the same at dequantised pixels (see :func:`dequantize`).
        test_energy: ``[M]`` float64 ``E(x)`` of the test images at their stored pixels.
        data_chain_trace: mean energy of :func:`mh_chains` started at the first test images, every 10
            transitions at ``b = 1`` (empty when not run): where the model's own density takes data.
        levels: pixel levels used for bits/dim (256 or 17), or None for continuous data (no bits/dim).
        dim: ``D``.
        seconds: wall time of everything.
        stored: empty for an estimate computed in this process; for one read back from a file
            (:func:`jem_core.report_store.load_report`): the file, its key, and the torch version, Python version
            and UTC time it was computed with.
    """

    forward: AISResult
    reverse: AISResult | None
    sweep: list[dict[str, Any]]
    step_sizes: StepSizes
    test_log_px: torch.Tensor
    test_log_px_deq: torch.Tensor
    test_energy: torch.Tensor
    levels: int | None
    dim: int
    seconds: float
    data_chain_trace: list[float] = field(default_factory=list)
    stored: dict[str, Any] = field(default_factory=dict)

    @property
    def gap(self) -> float | None:
        """``reverse log Ẑ - forward log Ẑ`` (nats), or None without a reverse run."""
        return None if self.reverse is None else self.reverse.log_z - self.forward.log_z

    def agree(self, tolerance: float = 0.5) -> bool | None:
        """Whether ``|gap| <= 3 sqrt(se_f^2 + se_r^2) + tolerance`` (nats); None without a reverse run."""
        if self.reverse is None:
            return None
        se = math.hypot(self.forward.log_z_se, self.reverse.log_z_se)
        return abs(self.gap) <= 3 * se + tolerance  # type: ignore[arg-type]

    def summary(self) -> dict[str, Any]:
        """The figures as a flat JSON-ready dict (nats, bits/dim, the uniform box for reference)."""
        f, r, d = self.forward, self.reverse, self.dim
        lp, lpd = float(self.test_log_px.mean()), float(self.test_log_px_deq.mean())
        n = max(1, len(self.test_log_px))
        lp_se = float(self.test_log_px.std() / math.sqrt(n)) if n > 1 else math.nan
        return {
            "log_z": f.log_z, "log_z_se": f.log_z_se, "ess": f.ess, "log_w_var": f.log_w_var,
            "reverse_log_z": None if r is None else r.log_z, "reverse_log_z_se": None if r is None else r.log_z_se,
            "reverse_ess": None if r is None else r.ess, "reverse_start": None if r is None else r.start,
            "gap": self.gap, "agree": self.agree(),
            "log_z_uniform_box": f.log_z0, "log_z_minus_uniform": f.log_z - f.log_z0,
            "temps": f.n_temps, "chains": f.n_chains, "sampler": f.sampler, "n_leapfrog": f.n_leapfrog,
            "boundary": f.boundary, "schedule": f.schedule, "dim": d, "levels": self.levels,
            "test_images": len(self.test_log_px),
            "end_state_energy_mean": float(f.end_energies.mean()) if f.end_energies is not None else None,
            "test_energy_mean": float(self.test_energy.mean()) if len(self.test_energy) else None,
            "test_log_px_nats": lp, "test_log_px_nats_se_images": lp_se,
            "test_log_px_nats_dequantized": lpd,
            "test_bits_per_dim": bits_per_dim(lpd, d, self.levels) if self.levels else None,
            "test_bits_per_dim_continuous": bits_per_dim(lp, d, self.levels) if self.levels else None,
            "uniform_bits_per_dim": math.log2(self.levels) if self.levels else None,
            "data_chain_energy": self.data_chain_trace,
            "sweep": self.sweep, "seconds": self.seconds,
        }


def estimate_log_likelihood(model: nn.Module | EnergyFn, shape: Sequence[int], test_x: torch.Tensor | None = None,
                            levels: int | None = 256, n_temps: int = 500, n_chains: int = 64, schedule: str = "sigmoid",
                            sampler: str = "hmc", n_leapfrog: int = 5, boundary: str = "reflect",
                            sweep: Sequence[int] | None = None, reverse: bool = True, reverse_steps: int = 20,
                            data_chains: int = 16, data_chain_steps: int = 100, seed: int = 0, device: torch.device | str = "cpu", batch_size: int = 500,
                            progress: Callable[[float], None] | None = None) -> LikelihoodReport:
    """``log Z`` by forward AIS, a reverse diagnostic, a convergence sweep, and the test set's ``log p(x)``.

    Steps: a pilot tunes the step sizes (:func:`tune_step_sizes`); forward AIS with ``n_temps``
    temperatures (:func:`forward_ais`); approximate samples of the model from its end states
    (:func:`resample_end_states`) start a reverse run (:func:`reverse_ais`, a diagnostic, not a bound);
    the sweep repeats both with fewer temperatures (the main run is its last row); finally
    ``log p(x) = -E(x) - log Ẑ`` of the test images, at their stored pixels and dequantised.

    Args:
        model: a classifier ``[N, C, H, W] -> logits [N, K]`` (its energy ``-logsumexp_y f(x)[y]``) in
            eval mode, or an :data:`EnergyFn`.
        shape: one image's shape ``(C, H, W)``.
        test_x: ``[M, C, H, W]`` float32 test images in ``[-1, 1]`` (None: no test figures).
        levels: pixel levels for bits/dim and dequantisation (256; 17 for digits, :func:`pixel_levels`);
            None for continuous data: the "dequantised" figures are then those at the points themselves.
        n_temps: temperatures of the main run (``K >= 1``).
        n_chains: AIS chains (``>= 2``).
        schedule, sampler, n_leapfrog, boundary: see :func:`ais`.
        sweep: smaller numbers of temperatures for the sweep (default ``K // 4, K // 2``; empty: none).
        reverse: run the reverse diagnostic.
        reverse_steps: HMC transitions at ``b = 1`` after resampling the end states.
        data_chains, data_chain_steps: :func:`mh_chains` from the first ``data_chains`` test images for
            ``data_chain_steps`` transitions at ``b = 1`` (0: not run).
        seed: seed of every random choice.
        device: where chains and model live.
        batch_size: test images per energy evaluation.
        progress: called with the fraction done in ``[0, 1]``.

    Returns:
        :class:`LikelihoodReport`.

    Raises:
        LikelihoodError: bad settings or test images of the wrong shape / outside the box.
    """
    t0 = time.perf_counter()
    shape = tuple(int(s) for s in shape)
    energy_fn = model_energy_fn(model) if isinstance(model, nn.Module) else model
    if int(n_temps) < 1 or int(n_chains) < 2:
        raise LikelihoodError(f"need n_temps >= 1 and n_chains >= 2; got {n_temps}, {n_chains}")
    if test_x is not None:
        if test_x.dim() != len(shape) + 1 or tuple(test_x.shape[1:]) != shape:
            raise LikelihoodError(f"test images must be [M, {', '.join(map(str, shape))}]; got {tuple(test_x.shape)}")
        if len(test_x) and float(test_x.abs().max()) > 1 + 1e-6:
            raise LikelihoodError("test images must lie in [-1, 1]")
    sweep = [int(n_temps) // 4, int(n_temps) // 2] if sweep is None else [int(s) for s in sweep]
    sweep = sorted({s for s in sweep if 1 <= s < int(n_temps)})
    n_data = 0 if test_x is None else min(int(data_chains), len(test_x))
    cost = {"pilot": 0.6 * min(int(n_temps), 50), "forward": float(n_temps),
            "data": 0.25 * data_chain_steps if n_data and data_chain_steps else 0.0,
            "reverse": (float(n_temps) + reverse_steps) if reverse else 0.0,
            "sweep": float(sum(sweep)) * (2 if reverse else 1)}
    total, done = sum(cost.values()), [0.0]

    def stage(name: str) -> Callable[[float], None] | None:
        base = done[0]
        done[0] += cost[name]
        return None if progress is None else (lambda f: progress(min(1.0, (base + f * cost[name]) / total)))

    params = [p for p in model.parameters() if p.requires_grad] if isinstance(model, nn.Module) else []
    for p in params:
        p.requires_grad_(False)
    try:
        kw = dict(schedule=schedule, sampler=sampler, n_leapfrog=n_leapfrog, boundary=boundary, device=device)
        steps = tune_step_sizes(energy_fn, shape, sampler, n_leapfrog, boundary, min(int(n_temps), 50), 16,
                                schedule=schedule, seed=seed + 1, device=device, progress=stage("pilot"))
        fwd = ais(energy_fn, shape, n_temps, n_chains, step_sizes=steps, seed=seed, progress=stage("forward"), **kw)
        rev, start = None, None
        p_rev = stage("reverse")
        if reverse:
            start = resample_end_states(fwd, energy_fn, n_chains, reverse_steps, float(steps.at(torch.ones(1))[0]),
                                        1 if sampler == "mala" else n_leapfrog, boundary, seed + 2)
            rev = reverse_ais(energy_fn, start, False, n_temps=n_temps, step_sizes=steps, seed=seed + 3,
                              progress=p_rev, **kw)
        rows = convergence_sweep(energy_fn, shape, sweep, reverse_from=start, exact=False, step_sizes=steps,
                                 n_chains=n_chains, seed=seed, progress=stage("sweep"), **kw) if sweep else []
        rows.append({"temps": int(n_temps), "log_z": fwd.log_z, "log_z_se": fwd.log_z_se, "ess": fwd.ess,
                     "log_w_var": fwd.log_w_var, "reverse_log_z": None if rev is None else rev.log_z,
                     "reverse_log_z_se": None if rev is None else rev.log_z_se,
                     "gap": None if rev is None else rev.log_z - fwd.log_z,
                     "seconds": fwd.seconds + (rev.seconds if rev is not None else 0.0)})
        lp = torch.empty(0, dtype=torch.float64)
        lpd = torch.empty(0, dtype=torch.float64)
        if test_x is not None and len(test_x):
            g = torch.Generator().manual_seed(seed + 4)
            out, out_d = [], []
            with torch.no_grad():
                for i in range(0, len(test_x), batch_size):
                    xb = test_x[i:i + batch_size]
                    out.append(energy_fn(xb.to(device)).double().cpu())
                    xd = dequantize(xb, levels, g) if levels else xb
                    out_d.append(energy_fn(xd.to(device)).double().cpu())
            lp, lpd = -torch.cat(out) - fwd.log_z, -torch.cat(out_d) - fwd.log_z
        trace: list[float] = []
        p_data = stage("data")
        if n_data and data_chain_steps:
            _, trace = mh_chains(energy_fn, test_x[:n_data].to(device), data_chain_steps,
                                 float(steps.at(torch.ones(1))[0]), 1 if sampler == "mala" else n_leapfrog, boundary,
                                 seed=seed + 5)
            if p_data is not None:
                p_data(1.0)
    finally:
        for p in params:
            p.requires_grad_(True)
    if progress is not None:
        progress(1.0)
    return LikelihoodReport(fwd, rev, rows, steps, lp, lpd, -lp - fwd.log_z, int(levels) if levels else None,
                            math.prod(shape),
                            time.perf_counter() - t0, trace)


def quick_log_px(model: nn.Module, x: torch.Tensor, n_temps: int = 100, n_chains: int = 32, seed: int = 0,
                 device: torch.device | str = "cpu", batch_size: int = 500) -> dict[str, float]:
    """A small-budget estimate of the mean ``log p(x)`` of images ``x`` (for judging training as it goes).

    One pilot (:func:`tune_step_sizes`, ``min(n_temps, 50)`` temperatures, 16 chains) and one forward AIS
    run (:func:`forward_ais`, HMC reflected at the walls); then ``log p(x) = -E(x) - log Ẑ`` at the stored
    pixels (no dequantisation). Forward AIS under-estimates ``log Z`` in expectation, so the figure
    over-states ``log p(x)``, and more so with fewer temperatures: compare runs at the same budget, and use
    :func:`estimate_log_likelihood` for a reported number.

    Args:
        model: classifier ``[N, C, H, W] -> logits [N, K]``; its parameters are frozen during the
            estimate and restored afterwards; it is put in eval mode and restored.
        x: ``[M, C, H, W]`` float32 images in ``[-1, 1]`` (M >= 1).
        n_temps: AIS temperatures (>= 1); n_chains: AIS chains (>= 2).
        seed: seed of the pilot and the run.
        device: where the chains run (the model's device).
        batch_size: images per energy evaluation.

    Returns:
        ``{"log_px": mean log p(x) in nats per image, "log_z": log Ẑ (nats), "log_z_se": its bootstrap SE
        (nats), "ess": effective sample size, "seconds": wall time}``.

    Raises:
        LikelihoodError: bad settings, or ``x`` empty, of the wrong rank or outside ``[-1, 1]``.
    """
    t0 = time.perf_counter()
    if int(n_temps) < 1 or int(n_chains) < 2:
        raise LikelihoodError(f"need n_temps >= 1 and n_chains >= 2; got {n_temps}, {n_chains}")
    if x.dim() < 2 or not len(x) or float(x.abs().max()) > 1 + 1e-6:
        raise LikelihoodError(f"need a non-empty batch of images in [-1, 1]; got shape {tuple(x.shape)}")
    shape = tuple(x.shape[1:])
    energy_fn = model_energy_fn(model)
    was = model.training
    frozen = [p for p in model.parameters() if p.requires_grad]
    model.eval()
    for p in frozen:
        p.requires_grad_(False)
    try:
        steps = tune_step_sizes(energy_fn, shape, n_pilot_temps=min(int(n_temps), 50), n_chains=16,
                                seed=seed + 1, device=device)
        fwd = forward_ais(energy_fn, shape, n_temps=int(n_temps), n_chains=int(n_chains), step_sizes=steps,
                          seed=seed, device=device)
        e = _energy_from_logits(predict_logits(model, x, batch_size)).double()
    finally:
        for p in frozen:
            p.requires_grad_(True)
        model.train(was)
    return {"log_px": float(-e.mean() - fwd.log_z), "log_z": float(fwd.log_z), "log_z_se": float(fwd.log_z_se),
            "ess": float(fwd.ess), "seconds": time.perf_counter() - t0}
