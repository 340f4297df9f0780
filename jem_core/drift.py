"""Slow-drift detection for JEM training: trends of windowed training statistics.

The divergence guard in :mod:`jem_core.training` catches explosions (non-finite numbers, huge energies).
A JEM can also fail slowly: with a small p(x) weight the sampler falls behind, ``E(data) - E(samples)``
widens over hundreds of iterations, ``E(data)`` races away, and accuracy and samples degrade while every
number stays finite. A roll-back to the last snapshot then returns to a state already drifting.

:class:`DriftMonitor` averages four statistics over windows of ``window`` iterations:

- ``gap``: mean ``E(data) - E(samples)`` (energy units, nats; near 0 while the sampler keeps up);
- ``energy``: mean ``E(data)`` (nats);
- ``logits``: mean over iterations of ``max |f(x)|`` of the batch's logits (nats);
- ``grad``: mean total gradient L2 norm of the loss with respect to the parameters.

A window is *suspect* when a statistic is past half its limit, and a *drift* fires when one is past its
full limit, or when ``sustain`` suspect windows follow each other *and* the statistic grew over them by more
than a fifth of the way from half its limit to its limit (a trend that does not go away; a statistic that
holds still past half its limit is an offset, e.g. a gap of -2.6 that an energy penalty holds, not a drift):

- ``|gap| > gap_limit``;
- ``|energy| - |reference| > energy_shift`` (reference: median ``energy`` of the healthy windows kept;
  energies moving towards 0, as an energy penalty makes them, are not drift);
- ``logits > growth * reference`` and ``grad > growth * reference`` (median of the healthy windows).

The monitor reports *where the drift began*: the iteration at the start of the first suspect window of
the current streak, so the trainer can roll back to a snapshot taken before it. The thresholds are
heuristics calibrated on this project's MNIST and digits runs (healthy runs keep ``|gap|`` below 1-2 and
``E(data)`` within about 15 nats of its level; the drifting runs reached gaps of 13-46 and shifts of
about 200), not values from the literature.
"""

from __future__ import annotations

import math
import statistics
from dataclasses import dataclass, field

__all__ = ["DriftMonitor", "DriftSignal", "WINDOW_KEYS"]

#: The windowed statistics, in the order they are checked.
WINDOW_KEYS = ("gap", "energy", "logits", "grad")


@dataclass
class DriftSignal:
    """One detected drift.

    Attributes:
        signal: which statistic (one of :data:`WINDOW_KEYS`).
        seen: human-readable description of the values that fired.
        began_at: global iteration where the drift began (start of the first suspect window).
        iteration: global iteration where it was detected.
        values: the last window's statistics.
    """

    signal: str
    seen: str
    began_at: int
    iteration: int
    values: dict[str, float] = field(default_factory=dict)


class DriftMonitor:
    """Windowed trend detector; feed it every iteration's numbers, it answers with a :class:`DriftSignal`.

    Args:
        window: iterations per window (>= 1).
        gap_limit: limit on ``|E(data) - E(samples)|`` in nats (> 0).
        energy_shift: limit on the move of ``E(data)`` away from its reference in nats (> 0).
        growth: limit factor (> 1) on logit magnitudes and gradient norms over their reference.
        sustain: this many suspect windows in a row fire a drift (>= 2).
        start_iter: no drift is judged before this global iteration (the warm-up).
        keep: healthy windows kept as the reference.

    Raises:
        ValueError: a bad setting.
    """

    def __init__(self, window: int = 50, gap_limit: float = 5.0, energy_shift: float = 25.0, growth: float = 4.0,
                 sustain: int = 4, start_iter: int = 0, keep: int = 12):
        if window < 1 or gap_limit <= 0 or energy_shift <= 0 or growth <= 1 or sustain < 2 or keep < 1:
            raise ValueError("drift monitor: need window >= 1, gap_limit > 0, energy_shift > 0, growth > 1, "
                             f"sustain >= 2, keep >= 1; got {window}, {gap_limit}, {energy_shift}, {growth}, "
                             f"{sustain}, {keep}")
        self.window, self.gap_limit, self.energy_shift = window, gap_limit, energy_shift
        self.growth, self.sustain, self.start_iter, self.keep = growth, sustain, start_iter, keep
        self.healthy: list[dict[str, float]] = []   # recent healthy windows (the reference)
        self.windows: list[dict[str, float]] = []   # every closed window (for plots), with "iteration"
        self._sums: dict[str, float] = {}
        self._n = 0
        self._start = 0
        self._streak_start: int | None = None
        self._streak = 0
        self._streak_first: dict[str, float] = {}  # each suspect statistic's value at its first suspect window
        self._rebase_until, self._rebase_keys = -1, ()  # see rebase()

    def state_dict(self) -> dict:
        """Everything needed to continue after a resume (plain Python numbers and lists)."""
        return {"healthy": self.healthy, "windows": self.windows, "streak_start": self._streak_start,
                "streak": self._streak, "streak_first": self._streak_first}

    def load_state_dict(self, state: dict) -> None:
        """Restore :meth:`state_dict`; the partly filled window is dropped."""
        self.healthy = [dict(w) for w in state.get("healthy", [])]
        self.windows = [dict(w) for w in state.get("windows", [])]
        self._streak_start, self._streak = state.get("streak_start"), int(state.get("streak", 0))
        self._streak_first = dict(state.get("streak_first", {}))
        self._sums, self._n = {}, 0

    def rebase(self, iteration: int, keys: tuple[str, ...] = ("logits", "grad"), windows: int = 2) -> None:
        """After the loss itself changed (a drift response raised a penalty or changed a weight), the gradient
        norm and logit levels are not comparable with the old ones: forget their reference and do not judge
        ``keys`` for ``windows`` windows from ``iteration``; the next healthy windows set the new reference.
        The gap and E(data) go on being judged."""
        self._rebase_until = iteration + windows * self.window
        self._rebase_keys = tuple(keys)
        for w in self.healthy:
            for k in keys:
                w.pop(k, None)

    def reset_to(self, iteration: int) -> None:
        """Forget windows after ``iteration`` (after a roll-back to a snapshot taken there) and the streak."""
        self.healthy = [w for w in self.healthy if w["iteration"] <= iteration]
        self._sums, self._n, self._streak_start, self._streak, self._streak_first = {}, 0, None, 0, {}
        self._start = iteration

    def update(self, iteration: int, stats: dict[str, float]) -> DriftSignal | None:
        """Add one iteration's statistics; returns a :class:`DriftSignal` when a window closes drifting.

        Args:
            iteration: the global iteration index of this step (0-based, before the step counts).
            stats: ``{"gap", "energy", "logits", "grad"}`` floats (missing or non-finite ones are skipped).
        """
        if self._n == 0:
            self._start = iteration
        for k in WINDOW_KEYS:
            v = stats.get(k)
            if v is not None and math.isfinite(v):
                self._sums[k] = self._sums.get(k, 0.0) + v
        self._n += 1
        if self._n < self.window:
            return None
        w = {k: self._sums[k] / self._n for k in self._sums}
        w["iteration"] = float(self._start)
        self._sums, self._n = {}, 0
        self.windows.append(w)
        if iteration < self.start_iter or len(self.healthy) < 2:
            if iteration >= self.start_iter or not self.healthy:
                self.healthy = (self.healthy + [w])[-self.keep:]
            return None
        fired, suspect, trend = self._judge(w)
        if suspect or fired:
            if self._streak_start is None:
                self._streak_start = int(w["iteration"])
                self._streak_first = {}
            self._streak += 1
            for key, (value, _, _) in trend.items():
                self._streak_first.setdefault(key, value)
        else:
            self._streak_start, self._streak, self._streak_first = None, 0, {}
            self.healthy = (self.healthy + [w])[-self.keep:]
            return None
        if fired is None and self._streak >= self.sustain:
            grown = [k for k, (value, margin, _) in trend.items() if value - self._streak_first.get(k, value) > margin]
            if grown:
                k = grown[0]
                measure = {"gap": "|gap|", "energy": "the shift", "logits": "the factor", "grad": "the factor"}[k]
                fired = (f"{k}: {trend[k][2]} for {self._streak} windows of {self.window} iterations in a row "
                         f"({measure} up from {self._streak_first[k]:.3g})")
        if fired is None:
            return None
        began = self._streak_start if self._streak_start is not None else int(w["iteration"])
        sig = DriftSignal(fired.split(":", 1)[0], fired, began, iteration, {k: v for k, v in w.items()})
        self._streak_start, self._streak, self._streak_first = None, 0, {}
        return sig

    def _ref(self, key: str) -> float | None:
        vals = [w[key] for w in self.healthy if key in w]
        return statistics.median(vals) if vals else None

    def _judge(self, w: dict[str, float]) -> tuple[str | None, str | None, dict[str, tuple[float, float, str]]]:
        """``(fired description or None, suspect description or None, trend)`` for a closed window; ``trend``
        maps each statistic past half its limit to ``(value, the growth over a streak that counts as a trend,
        description)``."""
        fired = suspect = None
        trend: dict[str, tuple[float, float, str]] = {}
        checks: list[tuple[str, float, float, str]] = []
        if "gap" in w:
            checks.append(("gap", abs(w["gap"]), self.gap_limit,
                           f"E(data) - E(samples) = {w['gap']:.3g} (limit +-{self.gap_limit:g})"))
        ref_e = self._ref("energy")
        if "energy" in w and ref_e is not None:
            checks.append(("energy", abs(w["energy"]) - abs(ref_e), self.energy_shift,
                           f"E(data) = {w['energy']:.4g}, {abs(w['energy']) - abs(ref_e):.3g} further from 0 than "
                           f"its level {ref_e:.4g} (limit {self.energy_shift:g})"))
        for key, name in (("logits", "max |logit|"), ("grad", "gradient norm")):
            if key in self._rebase_keys and w["iteration"] < self._rebase_until:
                continue
            ref = self._ref(key)
            if key in w and ref is not None and ref > 0:
                checks.append((key, w[key] / ref, self.growth,
                               f"{name} = {w[key]:.3g}, {w[key] / ref:.2f}x its level {ref:.3g} "
                               f"(limit {self.growth:g}x)"))
        for key, value, limit, text in checks:
            half = 1 + (limit - 1) / 2 if key in ("logits", "grad") else limit / 2
            if value > limit and fired is None:
                fired = f"{key}: {text}"
            elif value > half and suspect is None:
                suspect = f"{key}: {text}"
            if value > half:
                trend[key] = (value, (limit - half) / 5, text)
        return fired, suspect, trend
