"""Annealed importance sampling of log Z: closed-form energies, quadrature, bidirectional bracket, units, CLI.

Claims: on energies whose log Z on the box is known the estimate lies within 3 standard errors of the
truth; more temperatures never make it worse beyond its error; forward and reverse AIS from exact
samples bracket the truth and their gap shrinks with more temperatures; the bundled digits JEM's
log Z is within a nat of the uniform box's.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from torch import nn

from jem_core.likelihood import (ConstantEnergy, LikelihoodError, TruncatedGaussian, TruncatedGaussianMixture, ais,
                                 beta_schedule, bits_per_dim, bootstrap_se, boundary_acceptance, convergence_sweep,
                                 dequantize, effective_sample_size, estimate_log_likelihood, forward_ais,
                                 mh_chains, mh_transition, model_energy_fn, pixel_levels, quick_log_px,
                                 reverse_ais, tune_step_sizes)
from jem_core.likelihood import _reflect  # the wall reflection itself

CHECKPOINTS = Path(__file__).resolve().parents[1] / "checkpoints"


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _aniso(d: int, seed: int, lo: float, hi: float, spread: float) -> TruncatedGaussian:
    g = _gen(seed)
    return TruncatedGaussian(torch.rand(d, generator=g) * 2 * spread - spread, torch.rand(d, generator=g) * (hi - lo) + lo,
                             (d,))


def _within(res, truth: float, k: float = 3.0) -> None:
    assert math.isfinite(res.log_z_se) and res.log_z_se > 0
    assert abs(res.log_z - truth) <= k * res.log_z_se, (res.log_z, truth, res.log_z_se, res.ess)


# ------------------------------------------------------------------------------------- pieces
def test_schedules_run_from_zero_to_one_and_increase():
    for kind in ("linear", "sigmoid"):
        b = beta_schedule(100, kind)
        assert b.dtype == torch.float64 and b.shape == (101,)
        assert b[0] == 0.0 and b[-1] == 1.0 and bool((b.diff() > 0).all())
    s = beta_schedule(100, "sigmoid")
    assert s[1] < 0.01 and 1 - s[-2] < 0.01  # the sigmoid is denser at both ends than the linear 0.01 step
    with pytest.raises(LikelihoodError):
        beta_schedule(0)
    with pytest.raises(LikelihoodError):
        beta_schedule(10, "cosine")


def test_reflection_folds_into_the_box_and_flips_momentum_per_wall():
    x = torch.tensor([[1.3, -1.5, 0.2, 3.5, -3.2]])
    p = torch.ones_like(x)
    y, q = _reflect(x, p)
    assert torch.allclose(y, torch.tensor([[0.7, -0.5, 0.2, -0.5, 0.8]]), atol=1e-6)
    assert q.tolist() == [[-1.0, -1.0, 1.0, 1.0, 1.0]]  # one wall: flipped; none or two walls: kept


def test_ess_and_bootstrap_se_on_known_weights():
    assert effective_sample_size(torch.zeros(50)) == pytest.approx(50.0)
    lw = torch.full((50,), -math.inf)
    lw[0] = 0.0
    assert effective_sample_size(lw) == pytest.approx(1.0)
    assert bootstrap_se(torch.zeros(50)) == pytest.approx(0.0, abs=1e-12)
    # Gaussian log weights with small spread: SE of log-mean-exp ~ sd / sqrt(N).
    lw = 0.1 * torch.randn(400, generator=_gen(0), dtype=torch.float64)
    assert bootstrap_se(lw) == pytest.approx(0.1 / 20, rel=0.25)


def test_reflection_keeps_hmc_moving_where_rejection_freezes():
    assert boundary_acceptance(784, "reflect") == pytest.approx(1.0)
    assert boundary_acceptance(784, "reject", step=0.1) < 0.01
    assert boundary_acceptance(2, "reject", step=0.1) > 0.5


def test_hmc_with_reflection_samples_a_truncated_gaussian():
    tg = TruncatedGaussian(0.8, 0.5, (4,))  # mass piled against the upper wall
    g = _gen(3)
    x = torch.rand((2000, 4), generator=g) * 2 - 1
    from jem_core.likelihood import _energy_grad
    e, gr = _energy_grad(tg, x)
    for _ in range(60):
        x, e, gr, acc = mh_transition(tg, x, e, gr, 1.0, 0.3, 5, "reflect", g)
    exact = tg.sample(20000, _gen(4))
    assert float(x.mean()) == pytest.approx(float(exact.mean()), abs=0.02)
    assert float(x.std()) == pytest.approx(float(exact.std()), abs=0.02)
    assert float(x.abs().max()) <= 1.0


# ------------------------------------------------------------------------ closed-form log Z
def test_constant_energy_is_exact_with_zero_spread():
    ce = ConstantEnergy(3.0, (1, 8, 8))
    r = forward_ais(ce, (1, 8, 8), n_temps=20, n_chains=8)
    assert r.log_z == pytest.approx(64 * math.log(2) - 3.0, abs=1e-9)
    assert r.log_z_se == pytest.approx(0.0, abs=1e-9) and r.ess == pytest.approx(8.0)


# D = 784 needs about 600 temperatures even for these broad Gaussians (log-weight variance ~2 at 600).
@pytest.mark.parametrize("d,temps", [(2, 200), (64, 400), (784, 600)])
def test_isotropic_gaussian_within_three_se(d, temps):
    tg = TruncatedGaussian(0.2, 0.3 if d <= 64 else 0.6, (d,))
    r = forward_ais(tg, (d,), n_temps=temps, n_chains=64, seed=1)
    assert r.ess >= 8  # the standard error means something
    _within(r, tg.log_z())


@pytest.mark.parametrize("d,temps", [(2, 200), (64, 500), (784, 600)])
def test_anisotropic_gaussian_within_three_se(d, temps):
    tg = _aniso(d, 0, 0.15, 0.65, 0.6) if d <= 64 else _aniso(d, 0, 0.4, 1.0, 0.5)
    r = forward_ais(tg, (d,), n_temps=temps, n_chains=64, seed=1)
    assert r.ess >= 8
    _within(r, tg.log_z())


def test_truncated_gaussian_log_z_matches_quadrature():
    tg = TruncatedGaussian(torch.tensor([0.9, -0.3]), torch.tensor([0.2, 1.5]), (2,))
    n = 2001
    t = torch.linspace(-1, 1, n, dtype=torch.float64)
    xx = torch.stack(torch.meshgrid(t, t, indexing="ij"), -1).reshape(-1, 2)
    w = torch.full((n,), 2 / (n - 1), dtype=torch.float64)
    w[0] = w[-1] = 1 / (n - 1)
    quad = float(torch.log((torch.exp(-tg(xx)) * (w[:, None] * w[None, :]).reshape(-1)).sum()))
    assert tg.log_z() == pytest.approx(quad, abs=1e-5)


def test_mixture_of_far_apart_gaussians_within_three_se():
    d = 8
    mix = TruncatedGaussianMixture([TruncatedGaussian(-0.6, 0.1, (d,)), TruncatedGaussian(0.6, 0.15, (d,))],
                                   [1.0, 0.3])
    r = forward_ais(mix, (d,), n_temps=400, n_chains=128, seed=4)
    assert r.ess >= 8
    _within(r, mix.log_z())
    # Both modes are populated by the weighted end states in about the exact proportion.
    w = torch.softmax(r.log_w, 0)
    upper = float(w[(r.end_states.mean(1) > 0)].sum())
    exact_upper = float(torch.softmax(mix.log_weights + torch.tensor([c.log_z() for c in mix.components]), 0)[1])
    assert upper == pytest.approx(exact_upper, abs=0.15)


def test_mala_also_within_three_se():
    tg = TruncatedGaussian(0.2, 0.3, (16,))
    r = forward_ais(tg, (16,), n_temps=300, n_chains=64, sampler="mala", seed=5)
    _within(r, tg.log_z())


def test_more_temperatures_never_worse_beyond_error():
    tg = _aniso(64, 7, 0.15, 0.65, 0.6)
    truth = tg.log_z()
    rows = convergence_sweep(tg, (64,), [25, 100, 400], n_chains=64, seed=6)
    errs = [abs(r["log_z"] - truth) for r in rows]
    for a, b in zip(rows, rows[1:]):
        assert abs(b["log_z"] - truth) <= abs(a["log_z"] - truth) + 3 * math.hypot(a["log_z_se"], b["log_z_se"])
    assert errs[-1] <= 3 * rows[-1]["log_z_se"]
    assert rows[0]["log_z"] < truth  # few temperatures: the forward under-estimate shows


def test_forward_and_reverse_from_exact_samples_bracket_the_truth_and_close():
    tg = TruncatedGaussian(0.2, 0.25, (64,))
    truth = tg.log_z()
    exact = tg.sample(64, _gen(8))
    steps = tune_step_sizes(tg, (64,), n_pilot_temps=50, seed=9)
    rows = convergence_sweep(tg, (64,), [10, 40, 300], reverse_from=exact, exact=True, n_chains=64,
                             step_sizes=steps, seed=10)
    for r in rows:
        assert r["log_z"] - 2 * r["log_z_se"] <= truth <= r["reverse_log_z"] + 2 * r["reverse_log_z_se"]
    assert rows[0]["log_z"] < truth < rows[0]["reverse_log_z"]  # clearly bracketed where the bias is large
    gaps = [r["gap"] for r in rows]
    assert gaps[0] > gaps[1] > gaps[2] >= -3 * math.hypot(rows[2]["log_z_se"], rows[2]["reverse_log_z_se"])
    assert gaps[-1] < 0.25 * gaps[0]


def test_frozen_step_sizes_make_runs_reproducible():
    tg = TruncatedGaussian(0.0, 0.3, (8,))
    steps = tune_step_sizes(tg, (8,), n_pilot_temps=20, seed=1)
    assert steps.steps.shape == (21,) and bool((steps.steps > 0).all())
    assert float(steps.at(torch.tensor([0.0]))[0]) == pytest.approx(float(steps.steps[0]))
    a = ais(tg, (8,), n_temps=30, n_chains=8, step_sizes=steps, seed=3)
    b = ais(tg, (8,), n_temps=30, n_chains=8, step_sizes=steps, seed=3)
    assert a.log_z == b.log_z and torch.equal(a.log_w, b.log_w)
    # the running curve starts at the uniform box and ends at the estimate
    assert a.curve_log_z[0] == pytest.approx(8 * math.log(2)) and a.curve_log_z[-1] == pytest.approx(a.log_z)


# ------------------------------------------------------------------------ D = 2 network vs quadrature
def _small_trained_net() -> nn.Module:
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(2, 32), nn.Tanh(), nn.Linear(32, 32), nn.Tanh(), nn.Linear(32, 3))
    g = _gen(11)
    centers = torch.tensor([[-0.5, -0.5], [0.5, -0.3], [0.0, 0.6]])
    y = torch.randint(0, 3, (600,), generator=g)
    x = (centers[y] + 0.15 * torch.randn(600, 2, generator=g)).clamp(-1, 1)
    opt = torch.optim.Adam(net.parameters(), lr=0.02)
    for _ in range(150):
        opt.zero_grad()
        nn.functional.cross_entropy(net(x), y).backward()
        opt.step()
    return net.eval().requires_grad_(False)


def test_two_d_network_matches_numerical_quadrature():
    net = _small_trained_net()
    efn = model_energy_fn(net)
    n = 801
    t = torch.linspace(-1, 1, n)
    xx = torch.stack(torch.meshgrid(t, t, indexing="ij"), -1).reshape(-1, 2)
    with torch.no_grad():
        e = efn(xx).double()
    w = torch.full((n,), 2 / (n - 1), dtype=torch.float64)
    w[0] = w[-1] = 1 / (n - 1)
    quad = float(torch.logsumexp(-e + torch.log((w[:, None] * w[None, :]).reshape(-1)), 0))
    assert float(e.max() - e.min()) > 3  # a non-trivial energy
    r = forward_ais(efn, (2,), n_temps=200, n_chains=128, seed=12)
    _within(r, quad)


# ---------------------------------------------------------------------------------------- units
def test_bits_per_dim_formula_and_dequantisation():
    d = 784
    assert bits_per_dim(-d * math.log(2), d, 256) == pytest.approx(8.0)  # uniform on the box: 8 bits
    assert bits_per_dim(-64 * math.log(2), 64, 17) == pytest.approx(math.log2(17))
    # a density twice the uniform one in every coordinate: one bit per dimension less
    assert bits_per_dim(0.0, d, 256) == pytest.approx(7.0)
    assert pixel_levels("digits") == 17 and pixel_levels("mnist") == 256
    v = torch.arange(256, dtype=torch.float32)
    x = (v / 127.5 - 1).reshape(1, 1, 16, 16)
    u = dequantize(x, 256, _gen(0))
    cells = torch.floor((u + 1) * 128)
    assert torch.equal(cells.flatten(), v) and float(u.min()) >= -1 and float(u.max()) < 1
    xd = (torch.arange(17, dtype=torch.float32) / 8 - 1).reshape(1, 1, 1, 17)
    assert torch.equal(torch.floor((dequantize(xd, 17, _gen(1)) + 1) * 17 / 2).flatten(), torch.arange(17.0))


def test_report_recovers_a_known_density():
    tg = TruncatedGaussian(0.1, 0.4, (1, 4, 4))
    test_x = tg.sample(300, _gen(13))
    rep = estimate_log_likelihood(tg, (1, 4, 4), test_x, levels=256, n_temps=200, n_chains=64, seed=14)
    s = rep.summary()
    exact = float((-tg(test_x).double() - tg.log_z()).mean())
    assert s["test_log_px_nats"] == pytest.approx(exact, abs=3 * s["log_z_se"] + 1e-6)
    assert s["log_z"] == pytest.approx(tg.log_z(), abs=3 * s["log_z_se"])
    assert s["reverse_start"] == "approximate samples" and s["agree"] is True
    assert [r["temps"] for r in s["sweep"]] == [50, 100, 200]
    assert s["uniform_bits_per_dim"] == pytest.approx(8.0)
    json.dumps(s, default=float)


class _OneLogit(nn.Module):
    """A "classifier" with one logit ``-E(x)``, so that its JEM energy is ``E`` (here a known density)."""

    def __init__(self, energy):
        super().__init__()
        self.energy, self.scale = energy, nn.Parameter(torch.ones(()))

    def forward(self, x):
        return -self.scale * self.energy(x)[:, None]


def test_quick_log_px_recovers_a_known_density_and_restores_the_model():
    tg = TruncatedGaussian(0.1, 0.4, (1, 4, 4))
    x = tg.sample(200, _gen(21))
    model = _OneLogit(tg).train()
    r = quick_log_px(model, x, n_temps=100, n_chains=64, seed=3)
    exact = float((-tg(x).double() - tg.log_z()).mean())
    assert r["log_z_se"] > 0
    assert r["log_px"] == pytest.approx(exact, abs=3 * r["log_z_se"] + 1e-6)
    assert r["log_px"] == pytest.approx(-float(tg(x).double().mean()) - r["log_z"], abs=1e-9)
    assert model.training and model.scale.requires_grad  # eval mode and frozen weights only for the estimate
    with pytest.raises(LikelihoodError, match="in \\[-1, 1\\]"):
        quick_log_px(model, 2 * torch.ones(3, 1, 4, 4))


def test_bad_inputs_raise_our_error():
    tg = TruncatedGaussian(0.0, 0.3, (4,))
    with pytest.raises(LikelihoodError, match="reverse run needs"):
        ais(tg, (4,), n_temps=5, reverse=True)
    with pytest.raises(LikelihoodError, match="lie in"):
        reverse_ais(tg, torch.full((8, 4), 2.0), exact=True, n_temps=5)
    with pytest.raises(LikelihoodError, match="sampler"):
        forward_ais(tg, (4,), n_temps=5, sampler="ula")
    with pytest.raises(LikelihoodError, match="chains"):
        forward_ais(tg, (4,), n_temps=5, n_chains=1)
    with pytest.raises(LikelihoodError, match="test images"):
        estimate_log_likelihood(tg, (4,), torch.zeros(3, 5), n_temps=5, n_chains=4)
    with pytest.raises(LikelihoodError):
        TruncatedGaussian(0.0, 0.0, (4,))


# ------------------------------------------------------------------------------ bundled models
def test_bundled_digits_jem_is_barely_better_than_uniform_as_a_density():
    from jem_core.checkpoint import load_checkpoint
    from jem_core.data import load_dataset

    ck = load_checkpoint(CHECKPOINTS / "digits_jem.pt")
    test = load_dataset("digits", "test")
    rep = estimate_log_likelihood(ck.model, (1, 8, 8), test.x, levels=17, n_temps=60, n_chains=32, sweep=[],
                                  reverse_steps=5, seed=0)
    s = rep.summary()
    # log Z a few nats from the uniform box's D log 2 = 44.4 (measured: -0.6 for the first bundled digits JEM,
    # -2.0 for the retrained one), forward and reverse agreeing to a fraction of a nat.
    assert s["log_z_se"] < 0.1 and abs(s["log_z_minus_uniform"]) < 5.0
    assert s["log_z_uniform_box"] == pytest.approx(64 * math.log(2))
    assert abs(s["gap"]) < 0.2
    # As a density it is barely better than uniform: 4.09 bits/dim for digits' 17 levels.
    assert math.log2(17) - 0.25 < s["test_bits_per_dim"] < math.log2(17)


def test_cli_likelihood_json_and_errors(capsys):
    from jem_core.cli import main

    assert main(["likelihood", "--checkpoint", str(CHECKPOINTS / "digits_jem.pt"), "--temps", "8", "--chains", "4",
                 "--n-test", "20", "--sweep", "4", "--quiet"]) == 0
    out = json.loads(capsys.readouterr().out)
    for k in ("log_z", "log_z_se", "ess", "test_log_px_nats", "test_bits_per_dim", "reverse_log_z", "temps",
              "chains", "seconds", "sweep"):
        assert k in out
    assert out["temps"] == 8 and out["chains"] == 4 and out["levels"] == 17 and out["test_images"] == 20
    assert [r["temps"] for r in out["sweep"]] == [4, 8]
    for bad in (["--chains", "1"], ["--temps", "0"], ["--sampler", "ula"]):
        with pytest.raises(SystemExit) as e:
            main(["likelihood", "--checkpoint", str(CHECKPOINTS / "digits_jem.pt"), "--quiet", *bad])
        assert e.value.code == 2
        assert "error:" in capsys.readouterr().err


def test_cli_likelihood_on_mnist_runs_end_to_end(data_root, tmp_path, capsys):
    from jem_core.cli import main

    out = tmp_path / "mnist.json"
    assert main(["likelihood", "--checkpoint", str(CHECKPOINTS / "mnist_jem.pt"), "--data-root", str(data_root),
                 "--temps", "4", "--chains", "4", "--n-test", "50", "--sweep", "--no-reverse", "--quiet",
                 "--out", str(out)]) == 0
    s = json.loads(out.read_text())
    assert s["dim"] == 784 and s["levels"] == 256 and s["reverse_log_z"] is None
    assert s["uniform_bits_per_dim"] == pytest.approx(8.0)
    assert len(s["published_mnist_bits_per_dim_other_model_classes"]) >= 2
    capsys.readouterr()


def test_likelihood_page_shows_the_estimate_on_first_load(monkeypatch):
    from streamlit.testing.v1 import AppTest

    if not (CHECKPOINTS / "digits_jem.pt").is_file():
        pytest.skip("the bundled digits checkpoints are not in checkpoints/")
    monkeypatch.setenv("JEM_EXPLORER_DEFAULT", "digits")
    home = str(Path(__file__).resolve().parents[1] / "app" / "Home.py")
    at = AppTest.from_file(home, default_timeout=180).run()
    at.switch_page("../pages/likelihood.py").run()
    assert not at.exception, at.exception
    assert not [e.value for e in at.error]
    values = {m.label: m.value for m in at.metric}
    log_z = float(values["log Ẑ (forward AIS)"].split(" ± ")[0])
    assert abs(log_z - 64 * math.log(2)) < 5.0  # the digits JEM: a few nats from the uniform box
    assert float(values["Test bits/dim"]) < math.log2(17)
    assert "Reverse log Ẑ (diagnostic)" in values


def test_mh_chains_from_far_states_reach_the_target():
    tg = TruncatedGaussian(0.5, 0.1, (16,))
    x, trace = mh_chains(tg, torch.zeros(64, 16), 200, 0.03, every=50)
    assert len(trace) == 5 and trace[0] == pytest.approx(200.0) and trace[-1] < 16  # typical set: E ~ D / 2 = 8
    assert float(x.mean()) == pytest.approx(0.5, abs=0.03)
    with pytest.raises(LikelihoodError):
        mh_chains(tg, torch.full((4, 16), 1.5), 1, 0.05)


def test_continuous_toy_data_are_not_dequantised():
    assert pixel_levels("toy:moons") is None
    tg = TruncatedGaussian(0.0, 0.5, (2, 1, 1))
    x = tg.sample(50, _gen(20))
    rep = estimate_log_likelihood(tg, (2, 1, 1), x, levels=None, n_temps=20, n_chains=16, sweep=[], reverse=False,
                                  data_chains=0)
    s = rep.summary()
    assert torch.equal(rep.test_log_px, rep.test_log_px_deq)
    assert s["test_bits_per_dim"] is None and s["levels"] is None and s["data_chain_energy"] == []
