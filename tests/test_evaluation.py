"""Evaluation: calibration, OOD metrics, attacks, the refined classifier, attributions, samples, the report CLI.

Each test states a claim. Models are tiny digits models (trained here in seconds) or the bundled
digits checkpoints when they are present.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from torch import nn

from jem_core.checkpoint import CheckpointError, load_checkpoint
from jem_core.data import load_dataset
from jem_core.evaluation.attribution import attribution_maps
from jem_core.evaluation.calibration import (TemperatureScaled, calibration_report, fit_temperature, predict_logits,
                                             predict_proba)
from jem_core.evaluation.ood import load_ood_set, match_shape, ood_metrics, ood_score_table, ood_scores, roc_curve_data
from jem_core.evaluation.report import REPORT_KEYS, evaluate_checkpoint, write_report
from jem_core.evaluation.robustness import RefinedClassifier, accuracy, attack, robustness_curve
from jem_core.evaluation.samples import classifier_fid, sample_quality

ROOT = Path(__file__).resolve().parents[1]




def _train(tmp: Path, objective: str) -> Path:
    from jem_core.training import TrainConfig, Trainer

    out = tmp / f"digits_{objective}.pt"
    cfg = TrainConfig(dataset="digits", objective=objective, epochs=2, sgld_steps=3, buffer_size=300, keep_buffer=60,
                      n_reference=100, warmup_iters=10, seed=0)
    Trainer(cfg, out=out).fit()
    return out


def _bundled_or_trained(name: str, objective: str, tmp_path_factory) -> Path:
    p = ROOT / "checkpoints" / f"digits_{name}.pt"
    if p.is_file():
        try:
            load_checkpoint(p)
            return p
        except CheckpointError:
            pass  # an older format while the bundled models are being retrained
    return _train(tmp_path_factory.mktemp(f"eval_{name}"), objective)


@pytest.fixture(scope="module")
def digits_jem_path(tmp_path_factory) -> Path:
    return _bundled_or_trained("jem", "jem", tmp_path_factory)


@pytest.fixture(scope="module")
def digits_baseline_path(tmp_path_factory) -> Path:
    return _bundled_or_trained("baseline", "baseline", tmp_path_factory)


@pytest.fixture(scope="module")
def model(digits_baseline_path) -> nn.Module:
    return load_checkpoint(digits_baseline_path).model


@pytest.fixture(scope="module")
def digits_test():
    return load_dataset("digits", "test")


def _snapshot(m: nn.Module) -> tuple[dict[str, torch.Tensor], list[bool], bool]:
    return ({k: v.clone() for k, v in m.state_dict().items()}, [p.requires_grad for p in m.parameters()], m.training)


def _assert_untouched(m: nn.Module, snap) -> None:
    state, flags, training = snap
    for k, v in m.state_dict().items():
        assert torch.equal(v, state[k]), f"parameter {k} changed"
    assert [p.requires_grad for p in m.parameters()] == flags
    assert m.training == training
    assert all(p.grad is None for p in m.parameters())


# -- calibration ---------------------------------------------------------------------------------------
def _synthetic_probs(conf: torch.Tensor, correct: torch.Tensor, y: torch.Tensor, k: int = 10) -> torch.Tensor:
    """Rows with top probability ``conf`` on ``y`` (if correct) or on another class, the rest spread evenly."""
    n = len(conf)
    top = torch.where(correct, y, (y + 1) % k)
    probs = ((1 - conf) / (k - 1))[:, None].expand(n, k).clone()
    probs[torch.arange(n), top] = conf
    return probs


def test_ece_of_a_perfectly_calibrated_predictor_is_near_zero():
    g = torch.Generator().manual_seed(0)
    n = 40000
    conf = 0.2 + 0.8 * torch.rand(n, generator=g, dtype=torch.float64)
    correct = torch.rand(n, generator=g, dtype=torch.float64) < conf  # right with probability = confidence
    y = torch.randint(0, 10, (n,), generator=g)
    rep = calibration_report(_synthetic_probs(conf, correct, y), y)
    assert rep.ece < 0.01
    assert rep.n_bins == 15 and len(rep.bins) == 15
    assert sum(b.count for b in rep.bins) == n
    assert rep.accuracy == pytest.approx(float(correct.double().mean()), abs=1e-6)


def test_ece_of_an_overconfident_predictor_matches_the_formula():
    # Confidence 0.9 everywhere, 60% right: one non-empty bin, ECE = MCE = |0.6 - 0.9| = 0.3.
    n = 1000
    y = torch.arange(n) % 10
    correct = torch.arange(n) < 600
    probs = _synthetic_probs(torch.full((n,), 0.9, dtype=torch.float64), correct, y)
    rep = calibration_report(probs, y, n_bins=10)
    assert rep.ece == pytest.approx(0.3, abs=1e-5)
    assert rep.mce == pytest.approx(0.3, abs=1e-5)
    assert rep.accuracy == pytest.approx(0.6)
    # NLL and multi-class Brier by their formulas.
    nll = -(0.6 * math.log(0.9) + 0.4 * math.log(0.1 / 9))
    assert rep.nll == pytest.approx(nll, rel=1e-5)
    q = 0.1 / 9  # probability of each other class
    brier = 0.6 * ((0.9 - 1) ** 2 + 9 * q ** 2) + 0.4 * (0.9 ** 2 + (q - 1) ** 2 + 8 * q ** 2)
    assert rep.brier == pytest.approx(brier, rel=1e-5)
    full = [b for b in rep.bins if b.count]
    assert len(full) == 1 and full[0].confidence == pytest.approx(0.9) and full[0].accuracy == pytest.approx(0.6)


def test_confidence_one_falls_in_the_last_bin_and_bad_inputs_are_refused():
    probs = torch.eye(3)[[0, 1, 2, 0]]
    rep = calibration_report(probs, torch.tensor([0, 1, 2, 1]), n_bins=5)
    assert rep.bins[-1].count == 4 and rep.ece == pytest.approx(0.25, abs=1e-6)
    with pytest.raises(ValueError, match="sum to 1"):
        calibration_report(torch.rand(4, 3) + 0.5, torch.zeros(4, dtype=torch.long))
    with pytest.raises(ValueError, match="labels"):
        calibration_report(torch.full((2, 3), 1 / 3), torch.tensor([0, 3]))
    with pytest.raises(ValueError, match="n_bins"):
        calibration_report(torch.full((2, 3), 1 / 3), torch.tensor([0, 1]), n_bins=0)


def test_temperature_scaling_recovers_the_temperature_and_keeps_accuracy():
    g = torch.Generator().manual_seed(1)
    z = 2 * torch.randn(5000, 10, generator=g, dtype=torch.float64)
    y = torch.multinomial(torch.softmax(z, 1), 1, generator=g).squeeze(1)  # calibrated at T = 1
    t = fit_temperature(z * 3.0, y)  # logits 3x too sharp
    assert t == pytest.approx(3.0, rel=0.1)
    lin = nn.Linear(4, 3)
    scaled = TemperatureScaled(lin, 2.0)
    x = torch.randn(5, 4)
    assert torch.allclose(scaled(x), lin(x) / 2.0)
    assert torch.equal(scaled(x).argmax(1), lin(x).argmax(1))
    with pytest.raises(ValueError):
        TemperatureScaled(lin, 0.0)


def test_predict_proba_batches_and_restores_train_mode(model, digits_test):
    model.train()
    p = predict_proba(model, digits_test.x[:70], batch_size=32)
    assert model.training  # restored
    model.eval()
    assert p.shape == (70, 10) and torch.allclose(p.sum(1), torch.ones(70), atol=1e-5)
    with torch.no_grad():
        assert torch.allclose(predict_logits(model, digits_test.x[:70], batch_size=7), model(digits_test.x[:70]), atol=1e-5)


# -- OOD ---------------------------------------------------------------------------------------------------
def test_auroc_is_half_for_identical_and_one_for_separated_distributions():
    g = torch.Generator().manual_seed(0)
    a = torch.randn(3000, generator=g)
    same = ood_metrics(a, a.clone())
    assert same["auroc"] == pytest.approx(0.5) and same["fpr95"] > 0.9
    iid = ood_metrics(a, torch.randn(3000, generator=g))
    assert iid["auroc"] == pytest.approx(0.5, abs=0.03)
    # Large raw scores (like log p(x) ~ 1000) must not saturate: no sigmoid is applied.
    sep = ood_metrics(1000 + a, 900 + a)
    assert sep == pytest.approx({"auroc": 1.0, "aupr": 1.0, "fpr95": 0.0})
    worst = ood_metrics(a - 100, a + 100)
    assert worst["auroc"] == 0.0 and worst["fpr95"] == 1.0
    with pytest.raises(ValueError):
        ood_metrics(torch.zeros(0), a)


def test_fpr95_and_roc_curve_on_a_known_case():
    # 100 in-distribution scores 1..100; OOD scores: 10 at 50.5 and 90 at -1.
    s_in = torch.arange(1, 101, dtype=torch.float64)
    s_out = torch.cat([torch.full((10,), 50.5), torch.full((90,), -1.0)])
    m = ood_metrics(s_in, s_out)
    assert m["fpr95"] == pytest.approx(0.10)  # keeping 95 in-dist images (>= 6) accepts the 10 at 50.5
    assert m["auroc"] == pytest.approx(1 - 0.1 * 0.5)
    roc = roc_curve_data(s_in, s_out, max_points=50)
    assert roc["fpr"][0] == 0 and roc["tpr"][-1] == 1 and len(roc["fpr"]) == len(roc["tpr"]) <= 50


def test_ood_scores_have_the_documented_values_and_leave_the_model_alone(model, digits_test):
    x = digits_test.x[:40]
    snap = _snapshot(model)
    table = ood_score_table(model, x, batch_size=16)
    _assert_untouched(model, snap)
    with torch.no_grad():
        logits = model(x)
    assert torch.allclose(table["log_px"], torch.logsumexp(logits, 1), atol=1e-5)
    assert torch.allclose(table["max_prob"], torch.softmax(logits, 1).max(1).values, atol=1e-6)
    xg = x[:1].clone().requires_grad_(True)
    (gr,) = torch.autograd.grad(torch.logsumexp(model(xg), 1).sum(), xg)
    assert table["neg_grad_norm"][0] == pytest.approx(-float(gr.norm()), rel=1e-4)
    assert (table["neg_grad_norm"] <= 0).all()
    # Different batch sizes (250 vs 16) may take different float32 kernels: equal up to rounding.
    assert torch.allclose(ood_scores(model, x, "max_prob"), table["max_prob"], rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="unknown OOD score"):
        ood_scores(model, x, "entropy")


def test_ood_sets_take_the_reference_shape(digits_test, data_root):
    ref = digits_test.x[:50]
    for kind in ("uniform", "gaussian", "constant", "interp", "inverted"):
        o = load_ood_set(kind, ref, n=30, seed=1)
        assert o.shape == (30, 1, 8, 8) and o.min() >= -1 and o.max() <= 1
        assert torch.equal(o, load_ood_set(kind, ref, n=30, seed=1))
    fm = load_ood_set("fashion_mnist", ref, data_root, n=20)  # 28x28 -> 8x8
    assert fm.shape == (20, 1, 8, 8)
    cifar = load_ood_set("cifar10", torch.zeros(2, 1, 28, 28), data_root, n=5)  # RGB 32x32 -> gray 28x28
    assert cifar.shape == (5, 1, 28, 28) and cifar.min() >= -1 and cifar.max() <= 1
    assert match_shape(torch.zeros(2, 1, 8, 8), 3, 8).shape == (2, 3, 8, 8)
    with pytest.raises(ValueError):
        load_ood_set("not_a_set", ref)


# -- robustness -------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", ["pgd_linf", "pgd_l2", "fgsm"])
def test_attack_at_eps_zero_changes_nothing(model, digits_test, kind):
    x, y = digits_test.x[:30], digits_test.y[:30]
    snap = _snapshot(model)
    xa = attack(model, x, y, kind, eps=0.0, steps=3, random_start=True)
    _assert_untouched(model, snap)
    assert torch.equal(xa, x)


def test_accuracy_does_not_rise_with_eps_and_attacks_stay_in_the_ball(model, digits_test):
    x, y = digits_test.x[:100], digits_test.y[:100]
    eps = [0.0, 0.05, 0.1, 0.2, 0.3]
    curve = robustness_curve(model, x, y, {"pgd_linf": eps, "pgd_l2": [0.0, 0.25, 0.5, 1.0], "fgsm": [0.1]}, steps=10)
    for key in ("linf", "l2"):
        accs = [row["accuracy"] for row in curve[key]]
        assert accs[0] == pytest.approx(accuracy(model, x, y))
        assert all(b <= a for a, b in zip(accs, accs[1:])), f"{key}: {accs}"
        assert all(row["accuracy_refined"] is None for row in curve[key])
    assert curve["linf"][-1]["accuracy"] < curve["linf"][0]["accuracy"] - 0.3  # the attack does something
    xa = attack(model, x, y, "pgd_linf", 0.1, steps=5)
    assert (xa - x).abs().max() <= 0.2 + 1e-5 and xa.min() >= -1 and xa.max() <= 1  # model-space eps = 2 * 0.1
    xa = attack(model, x, y, "pgd_l2", 0.5, steps=5, random_start=True)
    assert (xa - x).flatten(1).norm(dim=1).max() <= 1.0 + 1e-4 and xa.min() >= -1 and xa.max() <= 1
    with pytest.raises(ValueError):
        attack(model, x, y, "pgd_linf", -0.1)
    with pytest.raises(ValueError):
        attack(model, x, y, "cw", 0.1)


class _Sharpened(nn.Module):
    """Logits x1000: the softmax saturates in float32, as with a JEM whose logits reach several hundred."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return 1000.0 * self.model(x)


def test_margin_loss_attacks_a_saturated_classifier_where_cross_entropy_is_masked(model, digits_test):
    x, y = digits_test.x[:60], digits_test.y[:60]
    sharp = _Sharpened(model)
    clean = accuracy(sharp, x, y)
    ce = accuracy(sharp, attack(sharp, x, y, "pgd_linf", 0.2, steps=10, loss="ce"), y)
    margin = accuracy(sharp, attack(sharp, x, y, "pgd_linf", 0.2, steps=10, loss="margin"), y)
    assert margin < 0.2 and ce > margin + 0.3 and clean > 0.8  # CE's gradient underflows for most images


def test_refined_classifier_with_zero_steps_is_the_plain_classifier(model, digits_test):
    x = digits_test.x[:20]
    with torch.no_grad():
        assert torch.equal(RefinedClassifier(model, steps=0, n_chains=3)(x), model(x))


def test_refined_classifier_is_seeded_and_passes_gradients_bpda_and_full(model, digits_test):
    x, y = digits_test.x[:10], digits_test.y[:10]
    snap = _snapshot(model)
    a = RefinedClassifier(model, steps=3, n_chains=2, seed=5)
    b = RefinedClassifier(model, steps=3, n_chains=2, seed=5)
    with torch.no_grad():
        pa, pb = a(x), b(x)
    assert torch.equal(pa, pb)
    assert torch.allclose(pa.exp().sum(1), torch.ones(10), atol=1e-5)  # log of averaged probabilities
    for mode in ("bpda", "full"):
        r = RefinedClassifier(model, steps=2, n_chains=2, gradient=mode)
        xg = x.clone().requires_grad_(True)
        (g,) = torch.autograd.grad(nn.functional.cross_entropy(r(xg), y), xg)
        assert g.abs().sum() > 0 and torch.isfinite(g).all()
    model.zero_grad(set_to_none=True)
    xa = attack(RefinedClassifier(model, steps=2, n_chains=2), x, y, "pgd_linf", 0.1, steps=2)
    assert (xa - x).abs().max() <= 0.2 + 1e-5
    _assert_untouched(model, snap)
    # The refined classifier's robust accuracy is the per-example worst case of adaptive and transfer attacks.
    curve = robustness_curve(model, x, y, {"pgd_linf": [0.0, 0.1]}, steps=3, refined=RefinedClassifier(model, 2, 2))
    clean, attacked = curve["linf"]
    assert clean["accuracy_refined"] == clean["accuracy_refined_adaptive"] == clean["accuracy_refined_transfer"]
    assert attacked["accuracy_refined"] <= min(attacked["accuracy_refined_adaptive"], attacked["accuracy_refined_transfer"])
    _assert_untouched(model, snap)
    with pytest.raises(ValueError):
        RefinedClassifier(model, steps=-1)


# -- attribution ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("method", ["saliency", "integrated_gradients", "noise_tunnel"])
@pytest.mark.parametrize("target", ["class", "energy"])
def test_attribution_maps_have_the_input_spatial_shape(model, digits_test, method, target):
    x = digits_test.x[:4]
    snap = _snapshot(model)
    a = attribution_maps(model, x, target=target, method=method, label=3 if target == "class" else None,
                         n_steps=8, nt_samples=2)
    _assert_untouched(model, snap)
    assert a.shape == (4, 8, 8) and a.dtype == torch.float32 and torch.isfinite(a).all()
    if method == "saliency":
        assert (a >= 0).all()


def test_integrated_gradients_of_the_energy_sum_to_the_energy_difference(model, digits_test):
    # Completeness (Sundararajan et al. 2017): sum of IG = F(x) - F(baseline), F = logsumexp f = -E.
    x = digits_test.x[:3]
    a = attribution_maps(model, x, target="energy", method="integrated_gradients", n_steps=128)
    with torch.no_grad():
        diff = torch.logsumexp(model(x), 1) - torch.logsumexp(model(torch.full_like(x, -1.0)), 1)
    assert torch.allclose(a.sum(dim=(1, 2)), diff, rtol=0.05, atol=0.05)
    with pytest.raises(ValueError):
        attribution_maps(model, x, target="class", method="saliency", label=10)


# -- samples ----------------------------------------------------------------------------------------------
def test_classifier_fid_is_zero_for_identical_sets_and_sample_quality_reports(model, digits_jem_path, digits_test):
    x = digits_test.x[:100]
    assert classifier_fid(model, x, x) == pytest.approx(0.0, abs=1e-2)
    assert classifier_fid(model, torch.rand_like(x) * 2 - 1, x) > 1.0
    ck = load_checkpoint(digits_jem_path)
    q = sample_quality(ck, model, digits_test.x, n_per_class=3, steps=5, keep_samples=True)
    xs, ys = q["_samples"]["x"], q["_samples"]["y"]
    assert q["n_samples"] == 30 and q["n_reference"] == 30
    assert xs.shape == (30, 1, 8, 8) and ys.tolist() == sum(([c] * 3 for c in range(10)), [])
    # the judge's accuracy on these samples, their distance to the first 30 test images, the floor: the next 30
    with torch.no_grad():
        judged = float((model(xs).argmax(1) == ys).float().mean())
    assert q["conditional_accuracy"] == pytest.approx(judged, abs=1e-6)
    assert q["classifier_fid"] == pytest.approx(classifier_fid(model, xs, digits_test.x[:30]), rel=1e-4, abs=1e-4)
    floor = classifier_fid(model, digits_test.x[30:60], digits_test.x[:30])
    assert q["classifier_fid_floor"] == pytest.approx(floor, rel=1e-4, abs=1e-4)


# -- report and CLI -----------------------------------------------------------------------------------------
_FAST = ["--n-test", "120", "--n-calib", "60", "--n-ood", "60", "--n-attack", "20", "--attack-steps", "2",
         "--refine-steps", "2", "--refine-chains", "2", "--n-per-class", "2", "--sample-steps", "3",
         "--eps", "0", "0.1", "--eps-l2", "0", "0.5", "--eps-fgsm", "0.1", "--quiet"]


def test_evaluate_cli_on_digits_writes_every_report_key(digits_jem_path, digits_baseline_path, tmp_path, capsys):
    from jem_core.cli import main

    out = tmp_path / "rep"
    rc = main(["evaluate", "--checkpoint", str(digits_jem_path), "--compare", str(digits_baseline_path),
               "--ood", "uniform", "constant", "inverted", "--out", str(out), *_FAST])
    assert rc == 0
    printed = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert printed["report"] == str(out / "report.json")
    rep = json.loads((out / "report.json").read_text())
    test = load_dataset("digits", "test")
    for r, path in ((rep, digits_jem_path), (rep["compare"], digits_baseline_path)):
        for k in REPORT_KEYS:
            assert k in r, k
        assert r["dataset"] == "digits" and r["n_test"] == 120
        net = load_checkpoint(path).model
        want = calibration_report(predict_proba(net, test.x[:120]), test.y[:120], 15).summary()
        for k in ("accuracy", "nll", "ece", "mce", "brier"):
            assert r[k] == pytest.approx(want[k], abs=1e-5), k
        assert set(r["ood"]) == {"uniform", "constant", "inverted"}
        for scores in r["ood"].values():
            assert set(scores) == {"log_px", "max_prob", "neg_grad_norm"}
            for m in scores.values():
                assert set(m) == {"auroc", "aupr", "fpr95"} and all(0 <= v <= 1 for v in m.values())
        for key in ("linf", "l2"):
            rows = r["robustness"][key]
            assert [row["eps"] for row in rows] == [0.0, 0.1 if key == "linf" else 0.5]
            assert rows[0]["accuracy"] == pytest.approx(accuracy(net, test.x[:20], test.y[:20]), abs=1e-6)  # eps 0
            assert rows[1]["accuracy"] <= rows[0]["accuracy"]
            assert all(0 <= row["accuracy_refined"] <= 1 for row in rows)
        assert set(r["samples"]) >= {"conditional_accuracy", "classifier_fid"}
    assert rep["checkpoint"] == str(digits_jem_path) and rep["compare"]["checkpoint"] == str(digits_baseline_path)
    md = (out / "report.md").read_text()
    assert "[0, 1] pixel scale" in md and "first 20 test images" in md
    for png in ("reliability.png", "ood_roc.png", "robustness.png"):
        assert (out / png).stat().st_size > 1000 and png in md


@pytest.mark.parametrize("args, message", [
    (["--eps", "-0.1"], "must be a number >= 0"),
    (["--n-test", "0"], "must be >= 1"),
    (["--ood", "imagenet"], "unknown set 'imagenet'"),
    (["--ood", "npz:/nonexistent/x.npz"], "not in the data root"),
])
def test_evaluate_cli_rejects_bad_arguments_argparse_style(digits_baseline_path, tmp_path, capsys, args, message):
    from jem_core.cli import main

    with pytest.raises(SystemExit) as e:
        main(["evaluate", "--checkpoint", str(digits_baseline_path), "--out", str(tmp_path / "r"), *args])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err


def test_evaluate_cli_reports_a_missing_checkpoint_as_an_error(tmp_path, capsys):
    from jem_core.cli import main

    with pytest.raises(SystemExit) as e:
        main(["evaluate", "--checkpoint", str(tmp_path / "none.pt"), "--out", str(tmp_path / "r")])
    assert e.value.code == 2 and "does not exist" in capsys.readouterr().err


def test_evaluate_checkpoint_api_skips_parts_and_reports_progress(digits_baseline_path, tmp_path):
    seen: list[float] = []
    stages: list[str] = []
    res = evaluate_checkpoint(digits_baseline_path, ood_sets=["uniform"], n_test=50, n_calib=0, n_ood=40,
                              skip=["robustness", "samples"], progress=seen.append, log=stages.append)
    assert res["robustness"] is None and res["samples"] is None and "temperature_scaled" not in res
    assert res["n_test"] == 50 and set(res["ood"]) == {"uniform"}
    assert seen and seen[-1] == pytest.approx(1.0) and all(b >= a - 1e-9 for a, b in zip(seen, seen[1:]))
    assert any("calibration" in s for s in stages)
    paths = write_report(res, tmp_path / "r", plots=False)
    assert json.loads(paths["json"].read_text())["robustness"] is None
    with pytest.raises(ValueError, match="unknown OOD"):
        evaluate_checkpoint(digits_baseline_path, ood_sets=["bogus"], n_test=10)


def test_robustness_curve_uses_the_given_pgd_step_size(model, digits_test):
    x, y = digits_test.x[:30], digits_test.y[:30]
    tiny = robustness_curve(model, x, y, {"pgd_linf": [0.2]}, steps=5, step_size=1e-4)["linf"][0]["accuracy"]
    auto = robustness_curve(model, x, y, {"pgd_linf": [0.2]}, steps=5)["linf"][0]["accuracy"]
    clean = robustness_curve(model, x, y, {"pgd_linf": [0.0]})["linf"][0]["accuracy"]
    assert tiny == pytest.approx(clean, abs=1 / 30), "5 steps of 1e-4 barely move the images"
    assert auto < tiny, "the default step size (2.5 eps / steps) reaches the eps ball"
