"""Intervals and verdicts (jem_core.evaluation.verdicts): the intervals cover the truth at about their nominal
rate, the point estimates equal the library metrics, and a verdict follows the numbers in either direction."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from sklearn.metrics import roc_auc_score

from jem_core.evaluation.calibration import calibration_report
from jem_core.evaluation.verdicts import (auroc_bootstrap, calibration_verdict, ece_bootstrap, ece_intervals,
                                         ood_verdict, robustness_verdict, wilson_interval)


def test_wilson_interval_matches_a_textbook_value_and_covers_at_its_nominal_rate():
    iv = wilson_interval(8, 10)  # Brown, Cai and DasGupta (2001): 8 of 10 -> [0.490, 0.943]
    assert iv.value == 0.8 and iv.lo == pytest.approx(0.4902, abs=1e-3) and iv.hi == pytest.approx(0.9433, abs=1e-3)
    assert wilson_interval(0, 50).lo == pytest.approx(0.0, abs=1e-12) and wilson_interval(50, 50).hi == pytest.approx(1.0)
    rng = np.random.default_rng(0)
    for p, n in [(0.5, 50), (0.9, 200), (0.98, 100)]:
        hits = rng.binomial(n, p, size=2000)
        cover = np.mean([(lambda i: i.lo <= p <= i.hi)(wilson_interval(int(k), n)) for k in hits])
        assert 0.92 <= cover <= 0.985, (p, n, cover)
    with pytest.raises(ValueError):
        wilson_interval(3, 2)


def _classifier(n: int, accuracy: float, confidence: float, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Probabilities [n, 10] whose top class has the given confidence and is right with the given rate."""
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, 10, (n,), generator=g)
    right = torch.rand(n, generator=g) < accuracy
    top = torch.where(right, y, (y + 1) % 10)
    p = torch.full((n, 10), (1 - confidence) / 9)
    p[torch.arange(n), top] = confidence
    return p, y


def test_ece_bootstrap_point_is_the_calibration_reports_ece_and_the_interval_covers_it():
    p, y = _classifier(1000, 0.9, 0.7, seed=1)
    rep = calibration_report(p, y, 15)
    ece, diff = ece_bootstrap(rep.confidences, rep.correct, 15)
    assert ece.value == pytest.approx(rep.ece, abs=1e-4) and ece.lo <= ece.value <= ece.hi and diff is None
    assert ece.value == pytest.approx(0.2, abs=0.03)  # accuracy 0.9 at confidence 0.7


def test_ece_interval_covers_the_population_ece_at_about_its_nominal_rate():
    # A classifier whose true ECE is 0.1: confidence 0.8 everywhere, accuracy 0.9.
    covered = 0
    for seed in range(60):
        p, y = _classifier(800, 0.9, 0.8, seed=seed)
        rep = calibration_report(p, y, 15)
        ece, _ = ece_bootstrap(rep.confidences, rep.correct, 15, n_boot=300, seed=seed)
        covered += ece.lo <= 0.1 <= ece.hi
    assert covered / 60 >= 0.85, covered


def test_calibration_verdict_names_the_better_model_whichever_it_is_and_says_when_it_cannot_tell():
    over, y = _classifier(2000, 0.8, 0.99, seed=2)      # over-confident: ECE ~0.19
    good, _ = _classifier(2000, 0.8, 0.8, seed=2)       # calibrated (same labels and hits)
    r_over, r_good = calibration_report(over, y, 15), calibration_report(good, y, 15)
    text = calibration_verdict("A", r_over, "B", r_good, "these images")
    assert "**B** is better calibrated" in text and "A is over-confident" in text
    text = calibration_verdict("B", r_good, "A", r_over, "these images")
    assert "**B** is better calibrated" in text
    twin, _ = _classifier(2000, 0.8, 0.8, seed=2)
    text = calibration_verdict("B", r_good, "C", calibration_report(twin, y, 15), "these images")
    assert "within the uncertainty" in text and "better calibrated here" not in text


def test_ece_intervals_of_several_models_from_one_bootstrap_equal_the_single_ones():
    over, y = _classifier(500, 0.8, 0.99, seed=3)
    good, _ = _classifier(500, 0.8, 0.8, seed=4)
    r_over, r_good = calibration_report(over, y, 15), calibration_report(good, y, 15)
    (e_over, e_good), diff = ece_intervals([r_over, r_good])
    assert e_over == ece_bootstrap(r_over.confidences, r_over.correct, 15)[0]
    assert e_good == ece_bootstrap(r_good.confidences, r_good.correct, 15)[0]
    assert diff == ece_bootstrap(r_over.confidences, r_over.correct, 15, other=(r_good.confidences, r_good.correct))[1]
    assert ece_intervals([r_good]) == ([e_good], None)
    # the verdict given these intervals says exactly what it says when it computes them itself
    assert (calibration_verdict("A", r_over, "B", r_good, "x", intervals=((e_over, e_good), diff))
            == calibration_verdict("A", r_over, "B", r_good, "x"))
    with pytest.raises(ValueError, match="same number of bins"):
        ece_intervals([r_over, calibration_report(good, y, 10)])


def test_auroc_bootstrap_equals_scikit_learn_and_ties_count_half():
    g = torch.Generator().manual_seed(0)
    s_in, s_out = torch.randn(300, generator=g) + 1.0, torch.randn(200, generator=g)
    s_out[:20] = s_in[:20]  # ties
    auroc = auroc_bootstrap(s_in, s_out)
    ref = roc_auc_score(np.r_[np.ones(300), np.zeros(200)], np.r_[s_in.numpy(), s_out.numpy()])
    assert auroc.value == pytest.approx(ref, abs=1e-9) and auroc.lo < auroc.value < auroc.hi
    assert auroc_bootstrap(torch.ones(10), torch.ones(10)).value == 0.5


def test_the_bootstrap_resamples_score_as_scikit_learn_scores_each_resample():
    """The resampled AUROCs (counted from one sort of the OOD scores) are each resample's own AUROC, ties and
    infinities included."""
    from jem_core.evaluation.verdicts import _auroc_resampled

    rng = np.random.default_rng(0)
    a, b = np.round(rng.normal(0.5, 1, 120), 1), np.round(rng.normal(0, 1, 80), 1)  # rounded: many ties
    a[:3], b[:2] = -np.inf, np.inf
    ia, ib = rng.integers(0, a.size, (40, a.size)), rng.integers(0, b.size, (40, b.size))
    boot = _auroc_resampled(a, b, ia, ib)
    labels = np.r_[np.ones(a.size), np.zeros(b.size)]
    ref = [roc_auc_score(labels, np.nan_to_num(np.r_[a[i], b[j]], posinf=1e300, neginf=-1e300))
           for i, j in zip(ia, ib)]
    assert np.allclose(boot, ref, rtol=0, atol=1e-12)


def test_ood_and_robustness_verdicts_claim_a_lead_only_beyond_the_intervals():
    clear = ood_verdict({"jem": auroc_bootstrap(torch.arange(100.) + 60, torch.arange(100.)),
                         "base": auroc_bootstrap(torch.arange(100.), torch.arange(100.))}, "noise", "log p(x)")
    assert "**jem** separates noise best" in clear
    close = ood_verdict({"jem": auroc_bootstrap(torch.arange(50.) + 1, torch.arange(50.)),
                         "base": auroc_bootstrap(torch.arange(50.), torch.arange(50.))}, "noise", "log p(x)")
    assert "within the uncertainty" in close and "best" not in close
    assert "**a** is the most robust" in robustness_verdict({"a": 0.9, "b": 0.3}, 200, 0.1, "PGD")
    text = robustness_verdict({"a": 0.52, "b": 0.50}, 50, 0.1, "PGD")
    assert "within the uncertainty" in text and "most robust" not in text


def test_place_gives_percentile_threshold_and_the_thresholds_false_alarm_rate():
    from jem_core.scoring import UNUSUAL_PERCENTILE, place

    ref = torch.arange(1000, dtype=torch.float64)  # 0..999
    typical = place(500.0, ref)
    assert typical.percentile == pytest.approx(50.0) and not typical.unusual
    assert typical.threshold == pytest.approx(np.quantile(ref.numpy(), UNUSUAL_PERCENTILE / 100))
    assert typical.false_alarm_rate == pytest.approx(UNUSUAL_PERCENTILE / 100, abs=0.002)
    low = place(10.0, ref)
    assert low.unusual and low.percentile == pytest.approx(1.0)
    with pytest.raises(ValueError):
        place(1.0, [])
