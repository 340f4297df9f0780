"""The training objectives (jem_core.losses) against the formulas written out by hand.

Claims: the JEM loss is CE + px_weight * (E(data) - E(samples)) + pxy_weight * (E(data, y) - E(samples, y))
+ energy_l2 * (mean E(data)^2 + mean E(samples)^2) (Grathwohl et al. 2019, eq. 8-9); semi-supervised, the
p(x) term sees the separate data batch and CE the labelled one; the baseline is CE only.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from jem_core.losses import baseline_loss, jem_loss


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Flatten(), nn.Linear(4, 3))


def test_jem_loss_matches_the_formula_term_by_term():
    f = _model()
    g = torch.Generator().manual_seed(1)
    x_lab, x_data, x_q = (torch.rand(n, 1, 2, 2, generator=g) * 2 - 1 for n in (6, 4, 4))
    y_lab = torch.tensor([0, 1, 2, 0, 1, 2])
    y_cond = y_lab[:4]
    loss, s = jem_loss(f, x_lab, y_lab, x_q, x_data=x_data, y_cond=y_cond, px_weight=0.7, pxy_weight=0.3,
                       energy_l2=0.1)
    e = lambda x: -torch.logsumexp(f(x), 1)  # noqa: E731
    with torch.no_grad():
        ce = F.cross_entropy(f(x_lab), y_lab)
        px = e(x_data).mean() - e(x_q).mean()
        pxy = -f(x_lab[:4]).gather(1, y_cond[:, None]).mean() + f(x_q).gather(1, y_cond[:, None]).mean()
        want = ce + 0.7 * px + 0.3 * pxy + 0.1 * (e(x_data).pow(2).mean() + e(x_q).pow(2).mean())
        logit_absmax = float(f(torch.cat([x_lab, x_data, x_q])).abs().max())
        accuracy = float((f(x_lab).argmax(1) == y_lab).float().mean())
        e_data, e_q = float(e(x_data).mean()), float(e(x_q).mean())
    assert float(loss.detach()) == pytest.approx(float(want), rel=1e-5)
    assert s["ce"] == pytest.approx(float(ce), rel=1e-5) and s["px"] == pytest.approx(float(px), abs=1e-5)
    assert s["energy_data"] == pytest.approx(e_data, rel=1e-5) and s["energy_samples"] == pytest.approx(e_q, rel=1e-5)
    assert s["sample_absmax"] == pytest.approx(float(x_q.abs().max()))
    assert (s["px_weight"], s["energy_l2"]) == (0.7, 0.1)
    assert s["logit_absmax"] == pytest.approx(logit_absmax, rel=1e-5) and s["accuracy"] == pytest.approx(accuracy)
    loss.backward()  # the loss keeps its graph
    assert all(p.grad is not None for p in f.parameters())


def test_jem_loss_without_a_separate_data_batch_uses_the_labelled_images():
    f = _model()
    x_lab, x_q = torch.rand(5, 1, 2, 2) * 2 - 1, torch.rand(5, 1, 2, 2) * 2 - 1
    y = torch.tensor([0, 1, 2, 0, 1])
    loss, s = jem_loss(f, x_lab, y, x_q)  # px_weight 1, no p(x|y), no penalty
    e = lambda x: -torch.logsumexp(f(x), 1)  # noqa: E731
    want = F.cross_entropy(f(x_lab), y) + e(x_lab).mean() - e(x_q).mean()
    assert float(loss.detach()) == pytest.approx(float(want.detach()), rel=1e-5)


def test_jem_loss_p_x_given_y_needs_the_sample_labels():
    f = _model()
    x = torch.zeros(2, 1, 2, 2)
    with pytest.raises(ValueError, match="y_cond"):
        jem_loss(f, x, torch.tensor([0, 1]), x, pxy_weight=1.0)


def test_baseline_loss_is_cross_entropy_only():
    f = _model()
    x, y = torch.rand(4, 1, 2, 2), torch.tensor([0, 1, 2, 0])
    loss, s = baseline_loss(f, x, y)
    with torch.no_grad():
        ce, energy = float(F.cross_entropy(f(x), y)), float(-torch.logsumexp(f(x), 1).mean())
    assert float(loss.detach()) == pytest.approx(ce, rel=1e-6) and s["ce"] == pytest.approx(ce, rel=1e-6)
    assert s["px"] == 0.0 and math.isnan(s["energy_samples"]) and s["energy_data"] == pytest.approx(energy, rel=1e-5)
