"""Sampler health: plain checks that say when SGLD chains are not doing what their pictures suggest.

Clamping to ``[-1, 1]`` hides a sampler that blows up, and a sampler whose noise swamps the gradient
gives pictures that look like noise for a reason that is not the model's. These checks read what the
driver measures at every report (:class:`jem_core.sampling.SGLDReport`: energies, ``||dE/dx||``, the
pixels an update would have carried past the clamp) and return findings with the setting to change.

Checks (thresholds measured on the bundled MNIST JEM: its default, step size 1 and noise std 0.01, passes
all of them from noise, the replay buffer and test images):

- ``nonfinite``: NaN or inf in the samples or energies (error).
- ``exact_step``: exact Langevin with a step size above 0.01: its noise std ``sqrt(step)`` is then at least
  0.1 per pixel per step, and chains become noise (the bundled MNIST JEM at step 1: energies near 125,
  against about -2 from its replay buffer).
- ``noise_dominates``: in the practical (decoupled) form, the noise moves a chain farther than the gradient
  step: ``noise_std * sqrt(D) / (step_size * ||dE/dx||) > 3`` (median over chains). The chains then walk at
  random; the default's ratio is about 0.3. (Under exact Langevin the ratio is always large per step,
  ``~ 1/sqrt(step)``, and is not checked.)
- ``overshoot``: more than 1% of pixels would have jumped more than 0.5 beyond ``[-1, 1]`` in the last
  update: the clamp is cutting a blow-up (step size 2: about 2%; the default: 0).
- ``above_data``: the chains' median energy is above the highest energy of the model's test images (from
  the checkpoint's reference statistics): the model sees them as unlike anything in its data.

What does not live here: running chains (:mod:`jem_core.sampling`) and showing the findings (the app).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

__all__ = ["HealthFinding", "sampler_settings_health", "chain_health"]

EXACT_MAX_STEP = 0.01
NOISE_RATIO_MAX = 3.0
OVERSHOOT_MAX = 0.01


@dataclass(frozen=True)
class HealthFinding:
    """One finding.

    Attributes:
        level: ``"error"`` (the chains are broken) or ``"warning"`` (they are not sampling as they look).
        check: the check's name (see the module docstring).
        message: a plain sentence: what was measured, what it means, and the setting to change.
        value: the measured figure (units in the message).
    """

    level: str
    check: str
    message: str
    value: float


def sampler_settings_health(step_size: float, exact_langevin: bool) -> list[HealthFinding]:
    """Findings about the settings alone (before any chain runs).

    Args:
        step_size: the sampler's step size (> 0).
        exact_langevin: True for the exact form (noise std ``sqrt(step_size)``, gradient step ``step_size / 2``).

    Returns:
        A list with the ``exact_step`` finding when it applies, else empty.
    """
    if exact_langevin and step_size > EXACT_MAX_STEP:
        return [HealthFinding(
            "warning", "exact_step",
            f"Exact Langevin with step size {step_size:g} adds noise of std sqrt({step_size:g}) = "
            f"{math.sqrt(step_size):.3g} per pixel at every step, so the chains turn into noise. Use a step size "
            f"of {EXACT_MAX_STEP:g} or below (0.001 is a good start), or turn exact Langevin off for JEM's "
            "practical sampler (step size 1, noise std 0.01).", step_size)]
    return []


def chain_health(report, step_size: float, noise_std: float, exact_langevin: bool,
                 reference: dict | None = None) -> list[HealthFinding]:
    """Findings about running chains, from the driver's latest report.

    Args:
        report: the latest :class:`jem_core.sampling.SGLDReport` (``x`` ``[N, C, H, W]``, ``energy`` ``[N]``,
            ``grad_norm`` ``[N]``, ``overshoot`` ``[N]``), e.g. ``ChainState.last_report``; None gives the
            settings' findings only.
        step_size, noise_std, exact_langevin: the sampler's settings (``noise_std`` as used: ``sqrt(step)``
            under exact Langevin).
        reference: the checkpoint's reference statistics (``{"logpx_quantiles": [101 floats], ...}`` with
            ``log p(x) = -E(x)`` of its test images), or None to skip ``above_data``.

    Returns:
        Findings, errors first; empty when the chains look healthy.
    """
    out = sampler_settings_health(step_size, exact_langevin)
    if report is None:
        return out
    x, e = report.x, report.energy
    if not (torch.isfinite(x).all() and torch.isfinite(e).all()):
        return [HealthFinding("error", "nonfinite", "The samples or energies hold NaN or inf: the chains "
                              "diverged. Lower the step size or set a max update per pixel, then restart them.",
                              float("nan"))] + out
    d = x[0].numel()
    if not exact_langevin and report.grad_norm is not None and noise_std > 0:
        ratio = float((noise_std * math.sqrt(d) / (step_size * report.grad_norm.clamp_min(1e-12))).median())
        if ratio > NOISE_RATIO_MAX:
            out.append(HealthFinding(
                "warning", "noise_dominates",
                f"The noise moves the chains {ratio:.1f}x farther than the gradient step (noise std x sqrt(D) "
                f"over step size x ||dE/dx||, median over chains): they walk at random instead of following the "
                f"energy. Raise the step size or lower the noise std.", ratio))
    if report.overshoot is not None:
        over = float(report.overshoot.mean())
        if over > OVERSHOOT_MAX:
            out.append(HealthFinding(
                "warning", "overshoot",
                f"{over:.1%} of the pixels would have jumped more than 0.5 beyond [-1, 1] in the last update; "
                "the clamp hides this in the pictures (saturated, flat images). Lower the step size or set a "
                "max update per pixel.", over))
    q = (reference or {}).get("logpx_quantiles")
    if q:
        e_max = -float(min(q))  # the highest energy among the test images
        med = float(e.median())
        if med > e_max:
            exact_ok = exact_langevin and not any(f.check == "exact_step" for f in out)
            why = ("Exact Langevin with a small step samples the model's own density p(x), so this says that much of "
                   "p(x)'s mass lies away from the data: short-run SGLD pictures are not draws from p(x)."
                   if exact_ok else "Run more steps, or check the settings.")
            out.append(HealthFinding(
                "warning", "above_data",
                f"The chains' median energy {med:.3g} is above the highest energy of the model's test images "
                f"({e_max:.3g}): the model sees them as unlike its data. {why}", med))
    return sorted(out, key=lambda f: f.level != "error")
