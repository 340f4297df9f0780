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
