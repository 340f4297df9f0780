"""Uncertainty of evaluation figures, and verdicts written from the numbers.

Every comparison the dashboard states in words ("the JEM is better calibrated", "the baseline detects
Fashion-MNIST better") is built here from the measured figures and their 95% intervals, so the sentence
follows the numbers whichever way they come out, and says so when the difference is within the noise.

- :func:`wilson_interval`: a binomial proportion's interval (accuracy, robust accuracy) in closed form
  (Wilson 1927; recommended over the normal interval by Brown, Cai and DasGupta 2001).
- :func:`ece_bootstrap`: ECE with a percentile-bootstrap interval, and the paired bootstrap of the ECE
  difference of two classifiers on the same images (Efron and Tibshirani 1993, ch. 13);
  :func:`ece_intervals`: the same for several classifiers from one bootstrap.
- :func:`auroc_bootstrap`: AUROC (the Mann-Whitney statistic) with a percentile-bootstrap interval,
  in-distribution and OOD scores resampled separately.
- :func:`calibration_verdict`, :func:`ood_verdict`, :func:`robustness_verdict`: sentences.

What does not live here: computing the figures themselves (``calibration``, ``ood``, ``robustness``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
from scipy.stats import rankdata

__all__ = ["Interval", "wilson_interval", "ece_bootstrap", "ece_intervals", "auroc_bootstrap", "calibration_verdict",
           "ood_verdict", "robustness_verdict"]

Z95 = 1.959963984540054  # the standard normal's 97.5% quantile


@dataclass(frozen=True)
class Interval:
    """A figure with its 95% interval: ``value`` in ``[lo, hi]`` (the same units as the figure)."""

    value: float
    lo: float
    hi: float

    def excludes(self, x: float) -> bool:
        """True when ``x`` lies outside ``[lo, hi]``."""
        return x < self.lo or x > self.hi

    def text(self, digits: int = 3) -> str:
        """``"0.019 (95% CI 0.015-0.023)"``."""
        return f"{self.value:.{digits}f} (95% CI {self.lo:.{digits}f}-{self.hi:.{digits}f})"


def _np(v) -> np.ndarray:
    return v.detach().cpu().double().numpy() if torch.is_tensor(v) else np.asarray(v, dtype=np.float64)


def wilson_interval(successes: int, n: int) -> Interval:
    """Wilson score 95% interval of a binomial proportion ``successes / n``.

    Args:
        successes: number of successes, ``0 <= successes <= n``.
        n: number of trials (>= 1).

    Returns:
        :class:`Interval` with ``value = successes / n`` and bounds in ``[0, 1]``.

    Raises:
        ValueError: ``n < 1`` or ``successes`` outside ``[0, n]``.

    Source: E. B. Wilson (1927), "Probable inference, the law of succession, and statistical inference", JASA.
    """
    if n < 1 or not 0 <= successes <= n:
        raise ValueError(f"need 0 <= successes <= n and n >= 1; got {successes} of {n}")
    p = successes / n
    z2 = Z95 ** 2
    centre = (p + z2 / (2 * n)) / (1 + z2 / n)
    half = Z95 * math.sqrt(p * (1 - p) / n + z2 / (4 * n * n)) / (1 + z2 / n)
    return Interval(p, max(0.0, centre - half), min(1.0, centre + half))


def _bin_index(conf: np.ndarray, n_bins: int) -> np.ndarray:
    # The same equal-width bins as the calibration module (torchmetrics: bucketize(right=True) - 1, with a
    # confidence of exactly 1 put in the last bin).
    edges = np.linspace(0, 1, n_bins + 1, dtype=np.float32).astype(np.float64)
    return np.clip(np.searchsorted(edges, conf, side="right") - 1, 0, n_bins - 1)


def _ece_resampled(conf: np.ndarray, correct: np.ndarray, idx: np.ndarray, n_bins: int) -> np.ndarray:
    """ECE of each resample: ``idx`` ``[B, N]`` indices -> ``[B]``."""
    b, n = idx.shape
    bins = _bin_index(conf, n_bins)[idx]                       # [B, N]
    gap = (correct.astype(np.float64) - conf)[idx]              # [B, N]
    flat = (np.arange(b)[:, None] * n_bins + bins).ravel()
    per_bin = np.bincount(flat, weights=gap.ravel(), minlength=b * n_bins).reshape(b, n_bins)
    return np.abs(per_bin).sum(1) / n


def _ece_boot(pairs: list[tuple[np.ndarray, np.ndarray]], n_bins: int, n_boot: int, seed: int
              ) -> tuple[list[Interval], list[np.ndarray], list[float]]:
    """The bootstrap shared by :func:`ece_bootstrap` and :func:`ece_intervals`: one set of resampled image
    indices (from ``seed``) for every classifier; returns each one's :class:`Interval`, its ``[n_boot]``
    resampled ECEs and its point ECE."""
    n = pairs[0][0].shape[0]
    if n == 0 or any(c.shape[0] != n or k.shape[0] != n for c, k in pairs):
        raise ValueError("confidences and correct must be non-empty and of one length (the same images for every "
                         f"classifier); got lengths {[(c.shape[0], k.shape[0]) for c, k in pairs]}")
    if n_bins < 1 or n_boot < 100:
        raise ValueError(f"need n_bins >= 1 and n_boot >= 100; got {n_bins} and {n_boot}")
    idx = np.random.default_rng(seed).integers(0, n, size=(n_boot, n))
    full = np.arange(n)[None]
    boots = [_ece_resampled(c, k, idx, n_bins) for c, k in pairs]
    points = [float(_ece_resampled(c, k, full, n_bins)[0]) for c, k in pairs]
    return ([Interval(p, *map(float, np.percentile(e, [2.5, 97.5]))) for p, e in zip(points, boots)], boots, points)


def ece_bootstrap(confidences, correct, n_bins: int = 15, n_boot: int = 1000, seed: int = 0,
                  other: tuple | None = None) -> tuple[Interval, Interval | None]:
    """ECE (equal-width bins) with a 95% percentile-bootstrap interval; optionally the paired difference.

    ``ECE = sum_m |sum_{i in B_m} (correct_i - conf_i)| / N`` (Guo et al. 2017, sec. 2).

    Args:
        confidences: ``[N]`` top-label confidences in ``[0, 1]`` (tensor or array).
        correct: ``[N]`` bool / 0-1, top-1 prediction correct.
        n_bins: number of bins (>= 1).
        n_boot: bootstrap resamples (>= 100).
        seed: fixes the resamples.
        other: ``(confidences, correct)`` of a second classifier *on the same N images*: then the same
            resampled indices give the interval of ``ECE(self) - ECE(other)``.

    Returns:
        ``(ece, difference)``: :class:`Interval` s in ECE units (``[0, 1]``); ``difference`` is None
        without ``other``.

    Raises:
        ValueError: empty input, mismatched lengths, ``n_bins < 1`` or ``n_boot < 100``.
    """
    pairs = [(_np(confidences), _np(correct))] + ([(_np(other[0]), _np(other[1]))] if other is not None else [])
    intervals, boots, points = _ece_boot(pairs, n_bins, n_boot, seed)
    if other is None:
        return intervals[0], None
    d = boots[0] - boots[1]
    return intervals[0], Interval(points[0] - points[1], *map(float, np.percentile(d, [2.5, 97.5])))


def ece_intervals(reports: list, n_boot: int = 1000, seed: int = 0) -> tuple[list[Interval], Interval | None]:
    """Every classifier's ECE interval from one bootstrap, and the paired difference of the first two.

    The numbers equal :func:`ece_bootstrap` on each report (same ``seed``, so the same resampled images) and,
    for the difference, ``ece_bootstrap(first, other=second)``; one call computes each classifier's resampled
    ECEs once (a page showing the intervals and :func:`calibration_verdict` need not repeat the bootstrap).

    Args:
        reports: :class:`~jem_core.evaluation.calibration.CalibrationReport` s on the same images (same order)
            and the same number of bins; at least one.
        n_boot, seed: see :func:`ece_bootstrap`.

    Returns:
        ``(intervals, difference)``: one :class:`Interval` per report (ECE units, ``[0, 1]``), and
        ``ECE(first) - ECE(second)`` with its paired 95% interval (None for a single report).

    Raises:
        ValueError: no reports, reports on different numbers of images or with different bin counts,
            ``n_boot < 100``.
    """
    if not reports or len({r.n_bins for r in reports}) != 1:
        raise ValueError(f"need at least one report, all with the same number of bins; got {[r.n_bins for r in reports]}")
    intervals, boots, points = _ece_boot([(_np(r.confidences), _np(r.correct)) for r in reports],
                                         reports[0].n_bins, n_boot, seed)
    if len(reports) < 2:
        return intervals, None
    d = boots[0] - boots[1]
    return intervals, Interval(points[0] - points[1], *map(float, np.percentile(d, [2.5, 97.5])))


def _auroc_rows(s_in: np.ndarray, s_out: np.ndarray) -> np.ndarray:
    """AUROC of each row (Mann-Whitney U / (n_in n_out), ties count one half): ``[B, n]`` -> ``[B]``."""
    n_in, n_out = s_in.shape[1], s_out.shape[1]
    ranks = rankdata(np.concatenate([s_in, s_out], axis=1), axis=1)
    return (ranks[:, :n_in].sum(1) - n_in * (n_in + 1) / 2) / (n_in * n_out)


def _auroc_resampled(a: np.ndarray, b: np.ndarray, ia: np.ndarray, ib: np.ndarray) -> np.ndarray:
    """AUROC of the resamples ``a[ia[r]]`` against ``b[ib[r]]`` (``[B, n_in]``, ``[B, n_out]`` indices) -> ``[B]``;
    the same values as :func:`_auroc_rows` on the resampled rows, without sorting each resample.

    Each resampled in-distribution score counts the resampled OOD scores below it (ties one half): with ``b``
    sorted once, that count is a difference of cumulative resample counts at the score's two insertion points."""
    order = np.argsort(b, kind="stable")
    position = np.empty_like(order)
    position[order] = np.arange(b.size)
    n_boot = ia.shape[0]
    counts = np.bincount((position[ib] + b.size * np.arange(n_boot)[:, None]).ravel(),
                         minlength=n_boot * b.size).reshape(n_boot, b.size)
    below = np.concatenate([np.zeros((n_boot, 1)), np.cumsum(counts, axis=1)], axis=1)  # [B, n_out + 1]
    lo, hi = np.searchsorted(b[order], a, "left"), np.searchsorted(b[order], a, "right")
    wins = below[:, lo] + 0.5 * (below[:, hi] - below[:, lo])  # [B, n_in]: per score of a, in each resample
    return np.take_along_axis(wins, ia, axis=1).sum(1) / (a.size * b.size)


def auroc_bootstrap(scores_in, scores_out, n_boot: int = 1000, seed: int = 0) -> Interval:
    """AUROC (in-distribution = positive, higher score = more in-distribution) with a 95% bootstrap interval.

    AUROC is the probability that a random in-distribution input scores above a random OOD input
    (ties count one half): the Mann-Whitney U statistic divided by ``n_in * n_out`` (Hanley and McNeil
    1982). The two sets are resampled separately; NaN scores rank lowest (as in ``ood.ood_metrics``).

    Args:
        scores_in: ``[n_in]`` scores of in-distribution inputs.
        scores_out: ``[n_out]`` scores of OOD inputs.
        n_boot: bootstrap resamples (>= 100).
        seed: fixes the resamples.

    Returns:
        :class:`Interval` in ``[0, 1]``.

    Raises:
        ValueError: an empty set, or ``n_boot < 100``.
    """
    # NaN ranks lowest, as in ood.ood_metrics, so the point estimate equals the table's AUROC.
    a, b = (np.nan_to_num(_np(v), nan=-np.inf, posinf=np.inf, neginf=-np.inf) for v in (scores_in, scores_out))
    if a.size == 0 or b.size == 0:
        raise ValueError(f"both sets need scores; got {a.size} and {b.size}")
    if n_boot < 100:
        raise ValueError(f"n_boot must be >= 100; got {n_boot}")
    rng = np.random.default_rng(seed)
    point = float(_auroc_rows(a[None], b[None])[0])
    boot = _auroc_resampled(a, b, rng.integers(0, a.size, (n_boot, a.size)), rng.integers(0, b.size, (n_boot, b.size)))
    return Interval(point, *map(float, np.percentile(boot, [2.5, 97.5])))


def _confidence_side(accuracy: float, mean_conf: float) -> str:
    side = "over-confident" if mean_conf > accuracy else "under-confident"
    return f"{side} (mean confidence {mean_conf:.3f} against accuracy {accuracy:.3f})"


def calibration_verdict(name_a: str, report_a, name_b: str, report_b, where: str, n_boot: int = 1000,
                        intervals: tuple[list[Interval], Interval | None] | None = None) -> str:
    """A sentence comparing two classifiers' ECE on the same images, with 95% intervals.

    Args:
        name_a, name_b: model names as shown on screen.
        report_a, report_b: :class:`~jem_core.evaluation.calibration.CalibrationReport` on the same images
            (same order) and the same number of bins.
        where: what the images are, e.g. ``"these 2,000 MNIST test images"``.
        n_boot: bootstrap resamples.
        intervals: :func:`ece_intervals` of ``[report_a, report_b, ...]`` when the caller has them already
            (then no bootstrap runs here); None computes them.

    Returns:
        Markdown text: both ECEs with intervals, which is better calibrated (or that the difference is
        within the uncertainty, when the paired interval of the difference contains 0), and whether
        each model is over- or under-confident.
    """
    (ea, eb, *_), diff = intervals if intervals is not None else ece_intervals([report_a, report_b], n_boot)
    head = (f"On {where} the ECE of **{name_a}** is {ea.text()} and that of **{name_b}** is {eb.text()}")
    if diff is not None and diff.excludes(0.0):
        better, worse = (name_a, name_b) if diff.value < 0 else (name_b, name_a)
        verdict = (f": **{better}** is better calibrated here (ECE difference {abs(diff.value):.3f}, "
                   f"95% CI {min(abs(diff.lo), abs(diff.hi)):.3f}-{max(abs(diff.lo), abs(diff.hi)):.3f}).")
    else:
        verdict = (f": the difference ({diff.value:+.3f}, 95% CI {diff.lo:+.3f} to {diff.hi:+.3f}) is within the "
                   "uncertainty, so neither is measurably better calibrated on these images.")
    sides = (f" {name_a} is {_confidence_side(report_a.accuracy, float(report_a.confidences.mean()))}; "
             f"{name_b} is {_confidence_side(report_b.accuracy, float(report_b.confidences.mean()))}.")
    return head + verdict + sides


def _ranking(intervals: dict[str, Interval], head: str, best: str, digits: int, n_desc: str) -> str:
    """``head: **a** v (CI), **b** ...`` then who leads: a model is named only when its interval lies above
    every other one; otherwise the overlapping leaders are named, with the models all of them beat."""
    ranked = sorted(intervals.items(), key=lambda kv: -kv[1].value)
    text = f"{head}: " + "; ".join(f"**{name}** {iv.text(digits)}" for name, iv in ranked)
    if len(ranked) < 2:
        return text + "."
    (n1, i1), rest = ranked[0], ranked[1:]
    if all(i1.lo > iv.hi for _, iv in rest):
        return text + f". **{n1}** {best} (its interval lies above the others')."
    close = [name for name, iv in rest if iv.hi >= i1.lo]
    text += (f". The intervals of {n1} and {', '.join(close)} overlap: {n_desc} their difference is within the "
             "uncertainty")
    low = min(intervals[name].lo for name in [n1, *close])
    below = [name for name, iv in rest if name not in close and iv.hi < low]
    if below:
        text += f"; {'both' if len(close) == 1 else 'all'} lie above {', '.join(below)}"
    return text + "."


def ood_verdict(aurocs: dict[str, Interval], ood_set: str, score: str) -> str:
    """A sentence comparing models' AUROC for one OOD set and one score.

    Args:
        aurocs: model name -> AUROC :class:`Interval` (same in-distribution images and OOD set).
        ood_set: the OOD set's name as shown.
        score: the score's name as shown.

    Returns:
        Markdown text with every AUROC and its interval; the best model is named only when its interval
        lies above every other one, otherwise the difference is called within the uncertainty.
    """
    if not aurocs:
        return ""
    return _ranking(aurocs, f"AUROC with {score} against {ood_set}", f"separates {ood_set} best", 3,
                    "on these images")


def robustness_verdict(accuracies: dict[str, float], n: int, eps: float, attack: str) -> str:
    """A sentence comparing models' accuracy under one attack at one eps, on the same ``n`` images.

    Args:
        accuracies: model name (as shown) -> accuracy in ``[0, 1]`` on its own adversarial images.
        n: number of attacked images (>= 1).
        eps: the attack's radius ([0, 1] pixel scale).
        attack: the attack's name as shown.

    Returns:
        Markdown text with every accuracy and its Wilson 95% interval; the most robust model is
        named only when its interval lies above every other one (a conservative test: overlapping
        intervals are reported as no measurable difference).

    Raises:
        ValueError: ``n < 1`` or an accuracy outside ``[0, 1]``.
    """
    if not accuracies:
        return ""
    iv = {name: wilson_interval(int(round(a * n)), n) for name, a in accuracies.items()}
    return _ranking(iv, f"Accuracy under {attack} at eps {eps:g} on {n} test images", "is the most robust here", 2,
                    f"with {n} images")
