"""Training claims: JEM learns on digits, the divergence guard recovers, resume continues."""

import math

import pytest
import torch

from jem_core.checkpoint import load_checkpoint
from jem_core.data import load_dataset, synthetic_ood
from jem_core.training import TrainConfig, Trainer, TrainingDiverged, resume_path


@pytest.fixture(scope="module")
def digits():
    return load_dataset("digits", "train"), load_dataset("digits", "test")


def _cfg(**kw):
    base = dict(dataset="digits", epochs=1, sgld_steps=5, buffer_size=500, warmup_iters=10, keep_buffer=20,
                n_reference=100, seed=0)
    base.update(kw)
    return TrainConfig(**base)


def test_short_jem_run_lowers_data_energy_relative_to_noise_and_beats_chance(digits):
    tr, te = digits
    t = Trainer(_cfg(epochs=4), train_set=tr, test_set=te)
    model = t.model.eval()
    noise = synthetic_ood("uniform", te.x, 300, torch.Generator().manual_seed(1))
    with torch.no_grad():
        gap_before = (model.energy(noise).mean() - model.energy(te.x).mean()).item()
    hist = t.fit()
    model.eval()
    with torch.no_grad():
        gap_after = (model.energy(noise).mean() - model.energy(te.x).mean()).item()
    assert gap_after > gap_before + 1.0, (gap_before, gap_after)
    assert hist[-1].test_accuracy > 0.5  # chance is 0.1
    assert all(math.isfinite(h.loss) for h in hist)


def test_divergence_guard_recovers_from_injected_nan(digits):
    tr, te = digits
    logs = []
    t = Trainer(_cfg(max_iters_per_epoch=12), train_set=tr, test_set=te, log=logs.append)
    real_step = t.train_step
    calls = {"n": 0}

    def poisoned(idx, lab):
        calls["n"] += 1
        if calls["n"] == 5:  # a NaN batch
            t.train_set.x[idx[0]] = float("nan")
            try:
                return real_step(idx, lab)
            finally:
                t.train_set.x[idx[0]] = 0.0
        return real_step(idx, lab)

    t.train_step = poisoned
    lr0 = t.cfg.lr
    t.fit()
    assert len(t.events) == 1 and "non-finite" in t.events[0]["reason"]
    assert t.lr_scale == pytest.approx(0.5) and t.current_lr() <= lr0 * 0.5
    assert all(torch.isfinite(p).all() for p in t.model.parameters())
    assert torch.isfinite(t.buffer.buffer).all()
    assert any("rolled back" in s for s in logs)


def test_divergence_guard_gives_up_after_retry_limit_and_keeps_last_checkpoint(digits, tmp_path):
    tr, te = digits
    out = tmp_path / "g.pt"
    t = Trainer(_cfg(epochs=2, max_iters_per_epoch=3, max_retries=2), out=out, train_set=tr, test_set=te)
    t.fit()  # two healthy epochs, checkpoint written
    good = out.read_bytes()
    t.cfg.epochs = 3
    t.train_step = lambda idx, lab: {"loss": float("inf"), "ce": 0.0, "px": 0.0, "energy_data": 0.0,
                                     "energy_samples": 0.0, "accuracy": 0.0, "lr": 0.0, "grad_finite": 1.0}
    with pytest.raises(TrainingDiverged, match="diverged 3 times"):
        t.fit()
    assert out.read_bytes() == good
    load_checkpoint(out)


def test_exploding_sgld_energy_triggers_guard(digits):
    tr, te = digits
    t = Trainer(_cfg(max_iters_per_epoch=4, divergence_threshold=1e-3, max_retries=10), train_set=tr, test_set=te)
    t.fit()
    assert t.events and "above" in t.events[0]["reason"]


def test_resume_continues_where_it_stopped(digits, tmp_path):
    tr, te = digits
    out = tmp_path / "r.pt"
    t1 = Trainer(_cfg(epochs=1, max_iters_per_epoch=4), out=out, train_set=tr, test_set=te)
    t1.fit()
    assert resume_path(out).exists()
    t2 = Trainer(_cfg(epochs=2, max_iters_per_epoch=4), out=out, train_set=tr, test_set=te)
    t2.resume(out)
    assert t2.epoch == 1 and t2.iteration == 4
    assert torch.equal(t2.buffer.buffer, t1.buffer.buffer)
    for a, b in zip(t1.model.parameters(), t2.model.parameters()):
        assert torch.equal(a, b)
    t2.fit()
    assert t2.epoch == 2 and t2.iteration == 8
    ck = load_checkpoint(out)
    assert ck.metadata["metrics"]["epochs"] == 2 and len(ck.metadata["reference"]["logpx_quantiles"]) == 101
    assert ck.replay_buffer.shape == (20, 1, 8, 8)


def test_semi_supervised_uses_only_the_labelled_subset_for_ce(digits):
    tr, te = digits
    t = Trainer(_cfg(labels_per_class=3, max_iters_per_epoch=2), train_set=tr, test_set=te)
    assert len(t.labelled) == 30
    assert torch.equal(torch.bincount(tr.y[t.labelled], minlength=10), torch.full((10,), 3))
    seen = []
    real = t.train_step
    t.train_step = lambda idx, lab: (seen.append(lab), real(idx, lab))[1]
    t.fit()
    assert all(set(l.tolist()) <= set(t.labelled.tolist()) for l in seen)


def test_bad_config_is_refused():
    with pytest.raises(ValueError, match="SGLD steps"):
        _cfg(sgld_steps=-1).validate()
    with pytest.raises(ValueError, match="objective"):
        _cfg(objective="gan").validate()


def test_semi_supervised_pxy_chains_see_only_the_labelled_labels(digits):
    tr, te = digits
    t = Trainer(_cfg(labels_per_class=3, pxy_weight=1.0, max_iters_per_epoch=2), train_set=tr, test_set=te)
    seen, drawn = [], []
    real_step, real_sample = t.train_step, t.buffer.sample
    t.train_step = lambda idx, lab: (seen.append(lab), real_step(idx, lab))[1]
    t.buffer.sample = lambda n, y=None: (drawn.append(y), real_sample(n, y))[1]
    t.fit()
    assert len(drawn) == len(seen) == 2
    for lab, y in zip(seen, drawn):
        assert torch.equal(y, tr.y[lab]), "conditioning labels come from the labelled batch, not the unlabelled one"


@pytest.mark.parametrize("sgld_clamp", [True, False])
def test_jem_data_share_the_chains_domain(digits, sgld_clamp):
    """Clamped chains cannot go below -1, so neither may the noisy data in the p(x) term (the clamp shortcut)."""
    tr, te = digits
    t = Trainer(_cfg(data_noise=0.3, sgld_clamp=sgld_clamp, sgld_steps=1, max_iters_per_epoch=1), train_set=tr, test_set=te)
    inputs = []
    handle = t.model.f.register_forward_pre_hook(lambda mod, args: inputs.append(args[0].detach().clone()))
    t.fit()
    handle.remove()
    batch = [x for x in inputs if x.shape[0] == 2 * t.cfg.batch_size][0]  # data + samples in one forward pass
    data = batch[:t.cfg.batch_size]
    if sgld_clamp:
        assert data.min() >= -1.0 and data.max() <= 1.0
        assert (data == -1.0).float().mean() > 0.2  # the digits' background, clamped, not shifted
    else:
        assert data.min() < -1.0  # the official code's unclamped noise


# -- schedules, validation, drift ------------------------------------------------------------------------
def test_schedules_parse_and_evaluate():
    from jem_core.schedules import lr_factor, parse_schedule, schedule_value

    pairs = parse_schedule("4:0.05, 0:1,0.5:0.1")
    assert pairs == [(0.0, 1.0), (0.5, 0.1), (4.0, 0.05)]
    assert [schedule_value(pairs, t, 9.0) for t in (0, 0.49, 0.5, 3.99, 4, 100)] == [1, 1, 0.1, 0.1, 0.05, 0.05]
    assert schedule_value([], 3.0, 0.7) == 0.7
    assert lr_factor("cosine", 0.0, 10, 10**6, 0, [], 0.3, 0.1) == pytest.approx(1.0)
    assert lr_factor("cosine", 5.0, 10, 10**6, 0, [], 0.3, 0.1) == pytest.approx(0.55)
    assert lr_factor("cosine", 10.0, 10, 10**6, 0, [], 0.3, 0.1) == pytest.approx(0.1)
    assert lr_factor("step", 6.0, 10, 10**6, 0, [5, 7], 0.3, 0.0) == pytest.approx(0.3)
    assert lr_factor("constant", 3.0, 10, 4, 10, [], 0.3, 0.0) == pytest.approx(0.5)  # warm-up: (4 + 1) / 10
    for bad in ("1", "a:1", "0:-1", "0:1,0:2", "0:nan"):
        with pytest.raises(ValueError):
            parse_schedule(bad)
    with pytest.raises(ValueError, match="p\\(x\\) weight schedule|px weight schedule"):
        _cfg(px_weight_schedule="0:1,x").validate()
    with pytest.raises(ValueError, match="lr schedule"):
        _cfg(lr_schedule="linear").validate()


def test_schedules_change_the_weights_inside_one_run_with_one_buffer_and_optimizer(digits):
    tr, te = digits
    seen = []
    t = Trainer(_cfg(epochs=2, max_iters_per_epoch=4, px_weight_schedule="0:1,0.5:0.1,1:0.05",
                     energy_l2_schedule="0:0,1:0.01", lr_schedule="cosine", lr_floor=0.1, warmup_iters=0),
                train_set=tr, test_set=te, on_iteration=seen.append)
    opt, buf = t.optimizer, t.buffer
    t.fit()
    assert [s["px_weight"] for s in seen] == pytest.approx([1, 1, 0.1, 0.1, 0.05, 0.05, 0.05, 0.05])
    assert [s["energy_l2"] for s in seen] == pytest.approx([0] * 4 + [0.01] * 4)
    lrs = [s["lr"] for s in seen]
    assert lrs[0] == pytest.approx(1e-3) and all(a >= b for a, b in zip(lrs, lrs[1:])) and lrs[-1] < 6e-4
    assert t.optimizer is opt and t.buffer is buf
    assert t.history[-1].px_weight == pytest.approx(0.05) and t.history[-1].energy_l2 == pytest.approx(0.01)


def test_validation_split_judges_every_epoch_and_touches_test_once(digits, tmp_path):
    tr, te = digits
    out = tmp_path / "v.pt"
    t = Trainer(_cfg(epochs=3, val_split=300, sample_eval=100), out=out, train_set=tr, test_set=te)
    assert len(t.train_set) == len(tr) - 300 and torch.equal(t.val_set.x, tr.x[-300:])
    t.fit()
    for h in t.history:
        assert math.isnan(h.test_accuracy)  # no per-epoch test evaluation
        assert 0 <= h.val_accuracy <= 1 and 0 <= h.val_ece <= 1 and h.val_nll > 0 and h.sample_fd >= 0
    best = max(t.history, key=lambda h: h.val_accuracy)
    assert t.final["epoch"] == best.epoch and t.final["val_accuracy"] == pytest.approx(best.val_accuracy)
    ck = load_checkpoint(out)
    m = ck.metadata["metrics"]
    assert m["selected_epoch"] == best.epoch and m["test_accuracy"] == pytest.approx(t.final["test_accuracy"])
    assert len(m["history"]) == 3 and "validation" in ck.metadata["reference"]["split"]
    with torch.no_grad():  # the file holds the chosen epoch's weights: its test accuracy is the reported one
        acc = float((ck.model(te.x).argmax(1) == te.y).float().mean())
    assert acc == pytest.approx(t.final["test_accuracy"], abs=1e-6)


def test_bad_validation_split_is_refused(digits):
    tr, te = digits
    with pytest.raises(ValueError, match="validation split"):
        Trainer(_cfg(val_split=len(tr) - 10), train_set=tr, test_set=te)


def test_drift_monitor_fires_on_a_trend_and_names_where_it_began():
    from jem_core.drift import DriftMonitor

    m = DriftMonitor(window=2, gap_limit=4.0, sustain=3)
    sig = None
    gaps = [0.1] * 8 + [2.5] * 6 + [3.0] * 2   # suspect (> 2) from iteration 8 on, never past the limit
    for i, g in enumerate(gaps):
        sig = m.update(i, {"gap": g, "energy": -5.0, "logits": 3.0, "grad": 1.0}) or sig
    # three suspect windows at 2.5 are an offset; the fourth, grown to 3.0 (more than (4 - 2) / 5), a trend
    assert sig is not None and sig.signal == "gap" and sig.began_at == 8 and "4 windows" in sig.seen
    assert "up from 2.5" in sig.seen
    held = DriftMonitor(window=2, gap_limit=4.0, sustain=3)  # a gap held at -2.6: suspect, but not growing
    assert all(held.update(i, {"gap": g, "energy": -1.3}) is None for i, g in enumerate([0.1] * 8 + [-2.6] * 40))
    m2 = DriftMonitor(window=2, energy_shift=10.0)
    for i in range(8):
        assert m2.update(i, {"energy": -5.0 + 0.5 * (i % 2)}) is None
    sig = None
    for i in range(8, 10):
        sig = m2.update(i, {"energy": -30.0}) or sig
    assert sig is not None and sig.signal == "energy"
    for i in range(10, 14):  # energies moving towards 0 (an energy penalty's effect) are no drift
        assert m2.update(i, {"energy": -0.5}) is None
    # a rescue changed the loss: a gradient norm at 10x the old level is its new level, not a drift
    m3 = DriftMonitor(window=2, growth=4.0)
    for i in range(8):
        assert m3.update(i, {"grad": 7.0, "gap": 0.1}) is None
    m3.rebase(8)
    assert all(m3.update(i, {"grad": 75.0, "gap": 0.1}) is None for i in range(8, 20))
    fired = [m3.update(i, {"grad": 750.0, "gap": 0.1}) for i in range(20, 22)]  # 10x the new level
    assert fired[-1] is not None and fired[-1].signal == "grad"


def test_injected_drift_is_caught_rolled_back_and_recorded(digits, tmp_path):
    """A p(x) weight of 0.02 on digits lets the samples run below the data's energy (E(data) - E(samples)
    climbs past +5 within 30 iterations): the guard rolls back, responds, and the run ends usable."""
    tr, te = digits
    out = tmp_path / "d.pt"
    logs = []
    cfg = _cfg(epochs=4, px_weight=0.02, lr=3e-3, guard_every=10, drift_guard=True, val_split=300, sample_eval=100)
    t = Trainer(cfg, out=out, train_set=tr, test_set=te, log=logs.append)
    t.fit()
    drifts = [e for e in t.events if e["kind"] == "drift"]
    assert drifts, [w["gap"] for w in t.monitor.windows]
    e = drifts[0]
    assert e["signal"] == "gap" and e["rolled_back_to"] <= e["began_at"] < e["iteration"]
    assert any("energy penalty" in a for a in e["actions"]) and any("p(x) weight 0.02 -> 0.04" in a for a in e["actions"])
    assert e["new_lr_scale"] == pytest.approx(0.5) and e["energy_l2"] >= 1e-3
    assert any(s.startswith("drift at iteration") for s in logs)
    assert sum(h.drift_events for h in t.history) == len(drifts)
    ck = load_checkpoint(out)
    assert len(ck.metadata["drift_events"]) == len(drifts) and ck.metadata["drift_events"][0]["seen"] == e["seen"]
    assert t.final["test_accuracy"] > 0.8  # a usable model (chance: 0.1)
    assert all(torch.isfinite(p).all() for p in ck.model.parameters())


def test_a_drift_with_samples_above_the_data_raises_the_penalty_and_keeps_the_rate_weight_and_buffer(digits, tmp_path):
    """Samples stuck above the data's energy (a negative gap): the contrastive term outruns the chains. The
    response raises the energy penalty fourfold (which holds the gap at -px / l2), keeps the learning rate
    and the p(x) weight, and never refreshes the buffer, even when the same drift comes back (a positive gap
    gets the rate lowered and the weight raised)."""
    from jem_core.drift import DriftSignal

    tr, te = digits
    t = Trainer(_cfg(epochs=1, max_iters_per_epoch=4, val_split=300, drift_guard=True, guard_every=2, px_weight=0.1,
                     drift_gap_limit=5.0), out=tmp_path / "lag.pt", train_set=tr, test_set=te)
    t.fit()
    lr, px = t.current_lr(), t.current_px_weight()
    for k in range(2):
        snap = next(s_ for s_ in reversed(t._snapshots) if s_["iteration"] <= t.iteration)["buffer"].clone()
        t._drift_rescue(DriftSignal("gap", "gap: E(data) - E(samples) = -9 (limit +-5)", t.iteration, t.iteration,
                                    {"gap": -9.0}))
        assert torch.equal(t.buffer.buffer, snap)  # the snapshot's chains, not fresh noise
    ev = [e for e in t.events if e["kind"] == "drift"]
    assert len(ev) == 2 and not any(e["refreshed"] for e in ev)
    assert t.current_px_weight() == pytest.approx(px) and t.current_lr() == pytest.approx(lr)
    assert ev[0]["energy_l2"] == pytest.approx(1e-3) and ev[1]["energy_l2"] == pytest.approx(4e-3)
    # the loss changed: gradient norms and logits get a new reference; the gap is judged on at once
    assert t.monitor._rebase_until == t.iteration + 2 * t.monitor.window
    assert not any("grad" in w for w in t.monitor.healthy) and t.monitor.start_iter == t.cfg.warmup_iters
    assert not any("learning rate" in a or "p(x) weight" in a for e in ev for a in e["actions"])
    t._drift_rescue(DriftSignal("gap", "gap: E(data) - E(samples) = 9 (limit +-5)", t.iteration, t.iteration,
                                {"gap": 9.0}))  # the other direction: the rate is lowered, the weight raised
    assert t.current_lr() == pytest.approx(lr * t.cfg.lr_backoff) and t.current_px_weight() == pytest.approx(2 * px)


def test_resume_keeps_schedule_drift_and_selection_state(digits, tmp_path):
    tr, te = digits
    out = tmp_path / "rs.pt"
    kw = dict(max_iters_per_epoch=4, val_split=300, drift_guard=True, guard_every=2, px_weight_schedule="0:1,1:0.5")
    t1 = Trainer(_cfg(epochs=1, **kw), out=out, train_set=tr, test_set=te)
    t1.fit()
    t1.px_scale, t1.l2_floor = 0.5, 0.002  # as if a drift response had happened
    t1.save(out)
    t2 = Trainer(_cfg(epochs=2, **kw), out=out, train_set=tr, test_set=te)
    t2.resume(out)
    assert t2.px_scale == 0.5 and t2.l2_floor == 0.002 and t2.best["epoch"] == 1
    assert t2.current_px_weight() == pytest.approx(0.25)
    assert len(t2.monitor.windows) == len(t1.monitor.windows) == 2
    t2.fit()
    assert t2.epoch == 2 and t2.final is not None


def test_samples_breaking_up_at_an_epoch_end_roll_back_to_the_last_healthy_epoch(digits, tmp_path):
    tr, te = digits
    t = Trainer(_cfg(epochs=3, max_iters_per_epoch=4, val_split=300, sample_eval=100, drift_guard=True,
                     guard_every=2, drift_growth=1e9, drift_gap_limit=1e9, drift_energy_shift=1e9,
                     judge="bundled:digits_baseline.pt"),
                out=tmp_path / "s.pt", train_set=tr, test_set=te)  # only the epoch-end sample check can fire
    real = t.validate

    def judged():
        out = real()
        if t.epoch == 3:
            out["sample_fd"] = 100 * min(h.sample_fd for h in t.history)  # the samples broke up
        return out

    t.validate = judged
    t.fit()
    ev = [e for e in t.events if e["kind"] == "drift"]
    assert len(ev) == 1 and ev[0]["signal"] == "samples" and "FD" in ev[0]["seen"], [e["seen"] for e in ev]
    assert ev[0]["rolled_back_to"] == 8  # the end of epoch 2, the last healthy one
    assert t.history[-1].drift_events == 1 and t.final["epoch"] in (1, 2)  # epoch 3 is never chosen
    assert any("energy penalty" in a for a in ev[0]["actions"])
    healthy = t._epoch_good["model"]  # the state the run ended in is epoch 2's, not epoch 3's
    assert all(torch.equal(v, healthy[k]) for k, v in t.model.state_dict().items())


def test_an_epoch_whose_buffer_the_guard_refreshed_is_not_judged_by_its_samples(digits, tmp_path):
    tr, te = digits
    t = Trainer(_cfg(epochs=3, max_iters_per_epoch=4, val_split=300, sample_eval=100, drift_guard=True,
                     guard_every=2, drift_growth=1e9, drift_gap_limit=1e9, drift_energy_shift=1e9,
                     judge="bundled:digits_baseline.pt", ais_temps=10, ais_chains=4),
                out=tmp_path / "s.pt", train_set=tr, test_set=te)
    real, logs = t.validate, []

    def judged():
        out = real()
        if t.epoch == 3:
            out["sample_fd"] = 100 * min(h.sample_fd for h in t.history)  # as far as fresh noise chains are
        return out

    def refresh_during_epoch_3(s):
        if t.epoch == 2 and not any(e.get("refreshed") for e in t.events):  # as the guard does on a repeated drift
            t.events.append({"kind": "drift", "signal": "gap", "seen": "injected", "refreshed": True,
                             "epoch": t.epoch, "iteration": t.iteration})

    t.validate, t.on_iteration, t.log = judged, refresh_during_epoch_3, logs.append
    t.fit()
    assert not [e for e in t.events if e.get("signal") == "samples"]  # no roll-back to epoch 2 for it
    assert any(line.startswith("epoch 3: buffer samples not judged") for line in logs), logs
    assert t.final["epoch"] in (1, 2)  # its distance still keeps epoch 3 from being chosen
    # the per-epoch likelihood estimate (ais_temps) is recorded for every epoch
    assert all(math.isfinite(h.val_log_px) and math.isfinite(h.val_log_z_se) for h in t.history)
