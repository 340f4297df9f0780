"""2-D toy data, exact quantities and the 2-D playground: specs and CSV errors, quadrature against a
closed form, a trained toy JEM (accuracy, normalisation, AIS vs quadrature, SGLD vs p(x)), the CLI on
``toy:moons``, the step-by-step trainer's guard and copies, and the playground page under AppTest.
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from jem_core.data import DataUnavailableError, data_available, dataset_shape, load_dataset
from jem_core.toy import (DIVERGE_PRESET, ToyTrainer, density_grid, exact_log_likelihood, grid_points,
                          histogram_distance, histogram_distance_floor, load_toy, log_z_quadrature, parse_toy_spec,
                          ToySettings, pretrained_pair, sample_grid, sampler_fidelity)

ROOT = Path(__file__).resolve().parents[1]
#: The CLI recipe of the README: exact Langevin (a = 1e-3), learning rate 0.01, 12 epochs of 25 iterations.
CLI_TRAIN = ["--dataset", "toy:moons", "--objective", "jem", "--epochs", "12", "--lr", "0.01", "--exact-langevin",
             "--sgld-step-size", "0.001", "--quiet"]


# ------------------------------------------------------------------------------------------ data
@pytest.mark.parametrize("spec, k", [("toy:moons", 2), ("toy:circles", 2), ("toy:gaussians8", 8),
                                     ("toy:spirals", 3), ("toy:spirals?k=5&noise=0.02&n=500", 5)])
def test_toy_sets_lie_in_the_box_with_their_classes(spec, k):
    train, test = load_dataset(spec, "train"), load_dataset(spec, "test")
    n = parse_toy_spec(spec).n
    assert len(train) + len(test) == n and len(test) == round(0.2 * n)
    assert train.x.shape[1:] == (2, 1, 1) and train.x.dtype == torch.float32
    assert float(train.x.abs().max()) < 1.0 and float(test.x.abs().max()) < 1.0
    assert dataset_shape(spec) == (2, 1, k) and train.n_classes == k
    assert set(train.y.tolist()) == set(range(k))
    assert data_available(spec)
    assert torch.equal(load_dataset(spec, "train").x, train.x)  # deterministic


def test_noise_and_seed_options_change_the_points():
    a = load_toy("toy:moons?noise=0&seed=0", "all")
    b = load_toy("toy:moons?noise=0.1&seed=0", "all")
    c = load_toy("toy:moons?noise=0.1&seed=1", "all")
    pa = a.x.reshape(-1, 2).double()
    # noise-free moons: every point on a half circle of radius 0.5 (box units) around (0, 0.125) or (0.5, -0.125)
    r0 = (pa - torch.tensor([-0.25, -0.125], dtype=torch.float64)).norm(dim=1)
    r1 = (pa - torch.tensor([0.25, 0.125], dtype=torch.float64)).norm(dim=1)
    assert float(torch.minimum((r0 - 0.5).abs(), (r1 - 0.5).abs()).max()) < 1e-6
    assert float(pa.abs().max()) <= 0.75 + 1e-6
    assert not torch.equal(b.x, c.x)
    spread = (b.x.reshape(-1, 2).double() - a.x.reshape(-1, 2).double()).std()
    assert 0.03 < float(spread) < 0.3


@pytest.mark.parametrize("spec, words", [
    ("toy:banana", "unknown toy dataset"), ("toy:moons?noise=abc", "must be a number"),
    ("toy:moons?k=3", "unknown option 'k'"), ("toy:moons?n=5", "n must lie in"),
    ("toy:spirals?k=12", "k (spiral arms)"), ("toy:moons?noise=2", "noise must lie in"),
    ("toy:moons?n", "key=value"), ("toy:csv:", "needs a file path")])
def test_malformed_specs_say_what_is_wrong(spec, words):
    with pytest.raises(ValueError, match=None) as e:
        load_dataset(spec)
    assert words in str(e.value)
    assert not data_available(spec)


def test_csv_points_are_scaled_into_the_box(tmp_path):
    f = tmp_path / "pts.csv"
    rng = np.random.default_rng(0)
    pts = rng.normal(size=(60, 2)) * [10, 2] + [100, -50]
    labels = np.where(pts[:, 0] > 100, "right", "left")
    f.write_text("x1,x2,label\n" + "\n".join(f"{a},{b},{c}" for (a, b), c in zip(pts, labels)) + "\n")
    spec = f"toy:csv:{f}"
    assert dataset_shape(spec) is None and data_available(spec)
    ds = load_toy(spec, "all")
    assert len(ds) == 60 and ds.class_names == ["left", "right"] and ds.n_classes == 2
    p = ds.x.reshape(-1, 2).double()
    assert float((p.max(0).values - p.min(0).values).max()) == pytest.approx(1.5, abs=1e-5)  # longer side -> 1.5
    assert float(p.abs().max()) <= 0.75 + 1e-5
    assert int((ds.y == 1).sum()) == int((labels == "right").sum())
    assert "mapped into the box" in ds.note


def test_csv_errors_name_the_row_and_the_fix(tmp_path):
    bad = tmp_path / "bad.csv"
    bad.write_text("0.1,0.2,0\n0.3,0.4\n")
    with pytest.raises(DataUnavailableError, match=r"row 2: expected 3 columns \(x1, x2, label\); got 2"):
        load_toy(f"toy:csv:{bad}")
    one = tmp_path / "one.csv"
    one.write_text("\n".join(f"{i},{i},a" for i in range(20)))
    with pytest.raises(DataUnavailableError, match="need 2 to 10 classes"):
        load_toy(f"toy:csv:{one}")
    word = tmp_path / "word.csv"
    word.write_text("x,y,label\n1,2,0\n" + "\n".join(f"{i},{i},{i % 2}" for i in range(12)) + "\nfoo,1,0\n")
    with pytest.raises(DataUnavailableError, match="row 15: coordinates must be numbers"):
        load_toy(f"toy:csv:{word}")
    with pytest.raises(DataUnavailableError, match="does not exist"):
        load_toy(f"toy:csv:{tmp_path / 'missing.csv'}")
    assert not data_available(f"toy:csv:{tmp_path / 'missing.csv'}")


# ------------------------------------------------------------------------------------ quadrature
def _truncated_gaussian_log_z(mu, sigma) -> float:
    """Closed form of log ∫_[-1,1]^2 exp(-|x - mu|^2 / (2 sigma^2)) dx (diagonal, per-axis sigma)."""
    out = 0.0
    for m, s in zip(mu, sigma):
        phi = lambda z: 0.5 * (1 + math.erf(z / math.sqrt(2)))  # noqa: E731
        out += math.log(s * math.sqrt(2 * math.pi) * (phi((1 - m) / s) - phi((-1 - m) / s)))
    return out


@pytest.mark.parametrize("mu, sigma", [((0.1, -0.2), (0.3, 0.25)), ((0.8, 0.0), (0.5, 0.7)), ((0.0, 0.0), (0.1, 0.1))])
def test_quadrature_log_z_of_a_gaussian_matches_the_closed_form(mu, sigma):
    m, s = torch.tensor(mu), torch.tensor(sigma)
    q = log_z_quadrature(lambda p: (((p - m) / s) ** 2 / 2).sum(1), resolution=256)
    exact = _truncated_gaussian_log_z(mu, sigma)
    assert q.log_z == pytest.approx(exact, abs=1e-3)
    assert abs(q.log_z - exact) < 1e-4          # in fact far better than the required 1e-3
    assert q.error < 1e-4 and q.resolution == 256
    assert abs(q.log_z - exact) <= 3 * q.error + 1e-6  # the stated grid error bounds the real one


def test_grid_points_are_cell_centres_in_heatmap_order():
    xs, pts = grid_points(4)
    assert xs.tolist() == pytest.approx([-0.75, -0.25, 0.25, 0.75])
    assert pts[1].tolist() == pytest.approx([-0.25, -0.75]) and pts[4].tolist() == pytest.approx([-0.75, -0.25])


# ---------------------------------------------------------------------------------- trained pair
@pytest.fixture(scope="module")
def pair() -> tuple[ToyTrainer, ToyTrainer]:
    """A toy-moons JEM and baseline, 300 iterations each with the same seed (about 6 s on one core)."""
    return pretrained_pair("toy:moons", seed=0, iterations=300, measure_every=100)


def test_trained_toy_jem_classifies_and_its_density_integrates_to_one(pair):
    jem, base = pair
    assert jem.history[-1]["accuracy"] >= 0.95 and base.history[-1]["accuracy"] >= 0.95
    g = density_grid(jem.model, 128)
    assert g.integral() == pytest.approx(1.0, abs=1e-9)
    assert g.log_z_error < 1e-3
    # normalised with the 128-grid log Z, the density integrates to 1 on an independent 512 grid too
    _, pts = grid_points(512)
    fine = exact_log_likelihood(jem.model, pts, g.log_z).exp().sum() * (2 / 512) ** 2
    assert float(fine) == pytest.approx(1.0, abs=1e-3)
    assert float(g.probs.sum(-1).min()) == pytest.approx(1.0, abs=1e-5)


def test_jem_density_fits_the_data_far_better_than_the_baseline(pair):
    jem, base = pair
    lj, lb = jem.history[-1]["test_log_px"], base.history[-1]["test_log_px"]
    assert lj > -2.0          # nats per point; the uniform density on the box is log(1/4) = -1.39
    assert lb < lj - 10.0     # the baseline's logsumexp is not a density model of the data
    assert math.isfinite(jem.history[-1]["gap"]) and math.isnan(base.history[-1]["gap"])
    assert 0.0 <= jem.history[-1]["ece"] <= 0.1


def test_ais_estimate_is_within_three_standard_errors_of_quadrature(pair):
    pytest.importorskip("jem_core.likelihood")
    from jem_core.toy import ais_log_z

    jem, _ = pair
    q = log_z_quadrature(jem.model, 256)
    est = ais_log_z(jem.model, n_temps=200, n_chains=64, seed=0)
    assert est is not None
    log_z, se = est
    assert 0 < se < 0.5
    assert abs(log_z - q.log_z) <= 3 * se + 3 * q.error


def test_exact_langevin_samples_the_model_and_practical_sgld_does_not(pair):
    jem, _ = pair
    g = density_grid(jem.model, 128)
    f = sampler_fidelity(jem.model, g, n=1000, bins=16, exact_step=2e-3, exact_steps=1500, practical_steps=100)
    assert f["floor"] == pytest.approx(0.10, abs=0.03)            # 1000 exact draws, 16 x 16 bins
    assert f["exact"] < f["floor"] + 0.05                          # measured 0.117 vs floor 0.103
    assert f["practical"] > 0.8                                    # measured 1.00: particles overshoot to the walls
    assert f["practical"] > f["exact"] + 0.5


def test_histogram_distance_of_exact_draws_and_of_a_point_mass():
    g = density_grid(torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(2, 3)), 64)
    draws = sample_grid(g, 20000, torch.Generator().manual_seed(0))
    assert float(draws.abs().max()) <= 1.0
    assert histogram_distance(draws, g, 8) < 0.03
    assert histogram_distance_floor(g, 20000, 8)[0] < 0.03
    far = torch.full((100, 2), 5.0)
    assert histogram_distance(far, g, 8) == pytest.approx(1.0)


# ------------------------------------------------------------------------------------ step driver
def test_diverge_preset_trips_the_guard_and_a_clone_is_untouched(pair):
    jem, _ = pair
    twin = jem.clone()
    before = [p.clone() for p in jem.model.parameters()]
    wild = jem.clone()
    wild.apply(DIVERGE_PRESET)
    for _ in range(30):
        wild.train(10)
        if wild.diverged:
            break
    assert len(wild.events) >= 1
    assert any("SGLD samples left the data range" in e["reason"] or "energy" in e["reason"] for e in wild.events)
    assert wild.trainer.lr_scale < 1.0
    assert all(torch.equal(a, b) for a, b in zip(before, jem.model.parameters()))
    # a clone continues exactly like the original
    twin2 = twin.clone()
    twin.train(5)
    twin2.train(5)
    assert all(torch.equal(a, b) for a, b in zip(twin.model.parameters(), twin2.model.parameters()))


def test_history_and_trails_stay_bounded():
    t = ToyTrainer("toy:gaussians8?n=400", "baseline", history_limit=8, trail_length=3, n_chains=5, restart_every=4)
    for _ in range(30):
        t.train(1)
        t.measure(resolution=16)
        t.advance_chains(2)
    assert len(t.history) <= 8 and t.history[-1]["iteration"] == 30.0 and t.history[0]["iteration"] == 1.0
    assert len(t.trail) <= 3 and t.trail[-1].shape == (5, 2)
    assert t.buffer_points() is None


# ------------------------------------------------------------------------------------------- CLI
@pytest.fixture(scope="module")
def moons_checkpoint(tmp_path_factory) -> tuple[Path, list[dict], float]:
    from jem_core.cli import main

    import contextlib
    import io

    out = tmp_path_factory.mktemp("toy") / "moons_jem.pt"
    buf = io.StringIO()
    t0 = time.perf_counter()
    with contextlib.redirect_stdout(buf):
        assert main(["train", *CLI_TRAIN, "--out", str(out)]) == 0
    seconds = time.perf_counter() - t0
    lines = [json.loads(s) for s in buf.getvalue().splitlines() if s.startswith("{")]
    return out, lines, seconds


def test_cli_trains_toy_moons_to_95_percent_in_seconds(moons_checkpoint):
    from jem_core.checkpoint import load_checkpoint

    out, lines, seconds = moons_checkpoint
    assert lines[-1]["test_accuracy"] >= 0.95 and lines[-1]["epochs"] == 12
    assert seconds < 60
    ck = load_checkpoint(out)
    assert ck.metadata["arch"] == "mlp" and ck.metadata["in_channels"] == 2 and ck.metadata["image_size"] == 1
    assert ck.replay_buffer is not None and ck.replay_buffer.shape[1:] == (2, 1, 1)
    test = load_toy("toy:moons", "test")
    acc = float((ck.model(test.x).argmax(1) == test.y).float().mean())
    assert acc == pytest.approx(lines[-1]["test_accuracy"], abs=1e-6)


def test_likelihood_cli_adds_the_exact_log_z_for_2d_checkpoints(moons_checkpoint, capsys):
    pytest.importorskip("jem_core.likelihood")
    from jem_core.cli import main

    out, _, _ = moons_checkpoint
    assert main(["likelihood", "--checkpoint", str(out), "--temps", "100", "--chains", "64", "--no-reverse",
                 "--sweep", "--quiet"]) == 0
    d = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert d["exact_log_z_grid_error"] < 1e-3
    assert abs(d["log_z"] - d["exact_log_z"]) <= 3 * d["log_z_se"] + 0.05
    assert d["exact_test_log_px_nats"] == pytest.approx(d["test_log_px_nats"] + d["log_z"] - d["exact_log_z"], abs=1e-6)


def test_arch_auto_picks_the_mlp_and_bad_arch_input_is_refused():
    from jem_core.models import MLP, build_model

    m = build_model("mlp", 2, 3, {"hidden": 16, "depth": 2, "image_size": 1})
    assert isinstance(m, MLP) and m(torch.zeros(4, 2, 1, 1)).shape == (4, 3) and m(torch.zeros(4, 2)).shape == (4, 3)
    with pytest.raises(ValueError, match="takes 2 input features"):
        m(torch.zeros(4, 3))
    with pytest.raises(ValueError, match="hidden >= 1"):
        build_model("mlp", 2, 3, {"hidden": 0})


# ------------------------------------------------------------------------------------------- page
def test_playground_page_renders_a_trained_pair(monkeypatch):
    from streamlit.testing.v1 import AppTest

    monkeypatch.setenv("JEM_EXPLORER_DEFAULT", "digits")
    at = AppTest.from_file(str(ROOT / "app" / "Home.py"), default_timeout=180).run()
    assert not at.exception, at.exception
    assert not any("does not use the models" in c.value for c in at.sidebar.caption)  # Home uses them
    at.switch_page("../pages/playground.py").run()
    assert not at.exception, at.exception
    assert not [e.value for e in at.error], [e.value for e in at.error]
    # the sidebar's model picker (and its "Opened on the ... pair" note) is not what this page uses, and says so
    assert any("does not use the models and the dataset chosen above" in c.value for c in at.sidebar.caption)
    labels = {m.label: m.value for m in at.metric}
    assert float(labels["JEM test accuracy"]) >= 0.9
    assert "Baseline test log p(x)" in labels
    # Step trains one batch of iterations
    before = int(labels["Iteration"])
    at.button(key="pg_step").click().run()
    assert not at.exception, at.exception
    after = int({m.label: m.value for m in at.metric}["Iteration"])
    assert after > before
    # the diverge preset shows the guard's roll-backs after a few steps
    at.button(key="pg_diverge").click().run()
    for _ in range(4):
        at.button(key="pg_step").click().run()
    assert not at.exception, at.exception
    assert int({m.label: m.value for m in at.metric}["Guard roll-backs"]) >= 1


def test_playground_settings_wait_in_a_closed_expander_whose_title_states_them(monkeypatch):
    """The playground opens on its result: its twelve settings sit in a closed expander (cheap for a browser to
    lay out) whose title says what the sampler and training are set to, and follows a change."""
    from streamlit.testing.v1 import AppTest

    monkeypatch.setenv("JEM_EXPLORER_DEFAULT", "digits")
    at = AppTest.from_file(str(ROOT / "app" / "Home.py"), default_timeout=180).run()
    at.switch_page("../pages/playground.py").run()
    assert not at.exception, at.exception
    box = [e for e in at.expander if e.label.startswith("Data and settings")]
    assert len(box) == 1 and not box[0].proto.expanded
    d = ToySettings()
    assert (f"{d.sgld_steps} SGLD steps of size {d.step_size:g} (exact Langevin), p(x) weight {d.px_weight:g}, "
            f"learning rate {d.lr:g}, clamped to the box") in box[0].label
    inside = {w.key for w in box[0].select_slider} | {w.key for w in box[0].slider} | {w.key for w in box[0].toggle}
    assert {"pg_step_size", "pg_noise", "pg_px", "pg_lr", "pg_steps", "pg_exact", "pg_clamp"} <= inside
    at.select_slider(key="pg_lr").set_value(1e-3)
    at.toggle(key="pg_exact").set_value(False).run()  # the noise slider is enabled without exact Langevin
    at.select_slider(key="pg_noise").set_value(0.03)
    at.toggle(key="pg_clamp").set_value(False).run()
    label = next(e.label for e in at.expander if e.label.startswith("Data and settings"))
    assert "(noise std 0.03)" in label and "learning rate 0.001" in label and label.endswith("not clamped")


def test_playground_says_why_a_csv_cannot_be_used_and_keeps_the_pair_shown(monkeypatch, tmp_path):
    """Reset or Trained pair with unusable data (a CSV of the wrong shape, too few points, or none uploaded) shows
    an error box and keeps the pair on screen: no traceback, nothing lost."""
    from streamlit.testing.v1 import AppTest

    from app import registry

    monkeypatch.setenv("JEM_EXPLORER_DEFAULT", "digits")
    at = AppTest.from_file(str(ROOT / "app" / "Home.py"), default_timeout=180).run()
    at.switch_page("../pages/playground.py").run()
    before = {m.label: m.value for m in at.metric}["Iteration"]
    at.selectbox(key="pg_data").set_value("csv").run()
    at.button(key="pg_reset").click().run()  # nothing uploaded yet
    assert not at.exception, at.exception
    assert any("No usable CSV is uploaded" in e.value for e in at.error), [e.value for e in at.error]
    bad, few = tmp_path / "bad.csv", tmp_path / "few.csv"
    bad.write_text("a,b\nc,d\n")
    few.write_text("0.1,0.2,0\n0.3,0.4,1\n")
    for path, key, why in ((bad, "pg_reset", "expected 3 columns"), (few, "pg_trained", "need at least 10")):
        at.session_state["pg_csv_spec"] = f"toy:csv:{path}"
        at.button(key=key).click().run()
        assert not at.exception, at.exception
        errors = [e.value for e in at.error]
        assert any(why in e and "pair shown is unchanged" in e for e in errors), errors
        assert {m.label: m.value for m in at.metric}["Iteration"] == before
        assert at.session_state["pg_state"]["spec"] == registry.toy_spec()


def test_sample_and_evaluate_cli_work_on_a_2d_checkpoint(moons_checkpoint, tmp_path, capsys):
    from PIL import Image

    from jem_core.cli import main

    out, _, _ = moons_checkpoint
    png = tmp_path / "s.png"
    assert main(["sample", "--checkpoint", str(out), "--out", str(png), "--n", "50", "--steps", "20",
                 "--exact-langevin", "--step-size", "0.001"]) == 0
    img = Image.open(png)
    assert img.size == (400, 400)
    assert (np.asarray(img.convert("L")) < 200).sum() > 50 * 5  # the dots are drawn
    assert main(["evaluate", "--checkpoint", str(out), "--n-test", "100", "--out", str(tmp_path / "eval")]) == 0
    rep = json.loads((tmp_path / "eval" / "report.json").read_text())
    assert (tmp_path / "eval" / "samples_moons_jem.png").is_file()
    from jem_core.checkpoint import load_checkpoint

    test = load_toy("toy:moons", "test")
    assert rep["n_test"] == 100
    with torch.no_grad():
        acc = float((load_checkpoint(out).model(test.x[:100]).argmax(1) == test.y[:100]).float().mean())
    assert rep["accuracy"] == pytest.approx(acc, abs=1e-6)


def test_semi_supervised_toy_jem_uses_only_the_labelled_points():
    jem = ToyTrainer("toy:moons", "jem", seed=0, labels_per_class=3)
    lab = jem.trainer.labelled
    assert lab is not None and len(lab) == 6
    assert jem.trainer.train_set.y[lab].bincount().tolist() == [3, 3]
    jem.train(60)
    row, _ = jem.measure(32)
    assert 0.5 <= row["accuracy"] <= 1.0 and jem.iteration == 60
    assert jem.clone().trainer.cfg.labels_per_class == 3


def test_playground_page_works_with_no_model_loaded(monkeypatch):
    from streamlit.testing.v1 import AppTest

    from app import ui

    monkeypatch.setenv("JEM_EXPLORER_DEFAULT", "digits")
    monkeypatch.setattr(ui, "context", lambda: None)  # as when no checkpoint could be loaded
    at = AppTest.from_file(str(ROOT / "app" / "Home.py"), default_timeout=180).run()
    at.switch_page("../pages/playground.py").run()
    assert not at.exception, at.exception
    assert not [e.value for e in at.error], [e.value for e in at.error]
    assert "JEM test accuracy" in {m.label for m in at.metric}
