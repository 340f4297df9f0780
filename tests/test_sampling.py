"""SGLD and the replay buffer: the sampler reaches known distributions and keeps its promises."""

from pathlib import Path

import pytest
import torch

from jem_core.energy import JEM
from jem_core.models import ConvNet
from jem_core.sampling import ChainState, ReplayBuffer, SGLDSampler, half_mask


class GaussianLogit(torch.nn.Module):
    """A one-logit 'classifier' with E(x) = ||x - mu||^2 / (2 sigma^2): p(x) = N(mu, sigma^2)."""

    def __init__(self, mu, sigma):
        super().__init__()
        self.mu, self.sigma = mu, sigma

    def forward(self, x):
        return (-0.5 * ((x - self.mu) / self.sigma) ** 2).flatten(1).sum(1, keepdim=True)


def test_exact_langevin_reaches_gaussian_mean_and_variance():
    mu, sigma = 0.3, 0.2
    g = torch.Generator().manual_seed(0)
    s = SGLDSampler(GaussianLogit(mu, sigma), step_size=0.002, exact_langevin=True, clamp=False, generator=g)
    x = s.run(torch.full((4000, 1, 1, 2), -0.8), 1500)
    assert abs(x.mean().item() - mu) < 0.01
    assert abs(x.std().item() - sigma) / sigma < 0.05


def test_exact_langevin_ties_noise_to_step_size_and_practical_decouples():
    m = GaussianLogit(0.0, 1.0)
    assert SGLDSampler(m, step_size=0.04, noise_std=0.5, exact_langevin=True).noise_std == pytest.approx(0.2)
    assert SGLDSampler(m, step_size=1.0, noise_std=0.01).noise_std == pytest.approx(0.01)


def test_zero_noise_step_is_gradient_descent_on_energy():
    s = SGLDSampler(GaussianLogit(0.0, 1.0), step_size=0.1, noise_std=0.0, clamp=False)
    x = torch.full((2, 1, 1, 1), 0.5)
    # E = x^2/2, dE/dx = x; x <- x - 0.1 * x
    assert torch.allclose(s.step(x), torch.full_like(x, 0.45))
    assert torch.equal(x, torch.full_like(x, 0.5)), "step() must not modify its input"


def test_clamp_mask_and_max_update():
    s = SGLDSampler(GaussianLogit(5.0, 0.1), step_size=1.0, noise_std=0.0, clamp=True)
    x = torch.zeros(1, 1, 4, 4)
    mask = half_mask("top", (1, 4, 4))
    out = s.step(x, mask=mask)
    assert out[..., :2, :].eq(1.0).all(), "masked-in pixels move and are clamped to 1"
    assert out[..., 2:, :].eq(0.0).all(), "pixels outside the mask stay fixed"
    s2 = SGLDSampler(GaussianLogit(5.0, 0.1), step_size=1.0, noise_std=0.0, clamp=False, max_update=0.05)
    assert torch.allclose(s2.step(x), torch.full_like(x, 0.05))


def test_same_seed_same_chain():
    model = JEM(ConvNet(1, 10, image_size=8)).eval()
    x0 = torch.rand(4, 1, 8, 8) * 2 - 1
    runs = [SGLDSampler(model, generator=torch.Generator().manual_seed(3)).run(x0, 5) for _ in range(2)]
    assert torch.equal(runs[0], runs[1])


def test_sampler_does_not_change_or_accumulate_parameter_gradients():
    model = JEM(ConvNet(1, 10, image_size=8)).eval()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    ChainState(torch.rand(3, 1, 8, 8) * 2 - 1).advance(SGLDSampler(model), 4, every=2)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert all(p.grad is None for p in model.parameters())
    assert all(p.requires_grad for p in model.parameters()), "flags are restored after sampling"


def test_chain_state_records_every_k_steps():
    model = JEM(ConvNet(1, 10, image_size=8)).eval()
    st = ChainState(torch.rand(5, 1, 8, 8) * 2 - 1)
    st.advance(SGLDSampler(model), 10, every=4)
    assert st.steps == 10 and st.step_history == [4, 8, 10]
    assert st.energy_history[0].shape == (5,) and st.pred_history[0].dtype == torch.int64


def test_replay_buffer_reinit_frequency_is_respected():
    buf = ReplayBuffer(1000, (1, 2, 2), reinit_freq=0.2, generator=torch.Generator().manual_seed(0))
    buf.buffer.fill_(5.0)  # anything still 5.0 was not re-initialised
    n_fresh = 0
    for _ in range(50):
        x, _ = buf.sample(200)
        n_fresh += int((x.flatten(1) != 5.0).all(1).sum())
    assert abs(n_fresh / (50 * 200) - 0.2) < 0.02


def test_replay_buffer_update_is_in_place_and_per_class_blocks():
    buf = ReplayBuffer(100, (1, 2, 2), reinit_freq=0.0, n_classes=10, generator=torch.Generator().manual_seed(0))
    storage = buf.buffer.data_ptr()
    x, idx = buf.sample(8, y=torch.full((8,), 3))
    assert ((idx >= 30) & (idx < 40)).all(), "class 3 draws from its own block"
    buf.update(idx, torch.full_like(x, 0.5))
    assert buf.buffer.data_ptr() == storage
    assert torch.equal(buf.buffer[idx], torch.full_like(x, 0.5))


def test_bad_sampler_settings_are_refused():
    m = GaussianLogit(0.0, 1.0)
    with pytest.raises(ValueError, match="step_size"):
        SGLDSampler(m, step_size=0)
    with pytest.raises(ValueError, match="noise_std"):
        SGLDSampler(m, noise_std=-1)
    with pytest.raises(ValueError, match="reinit_freq"):
        ReplayBuffer(10, (1, 2, 2), reinit_freq=1.5)
    with pytest.raises(ValueError, match="n_steps"):
        SGLDSampler(m).run(torch.zeros(1, 1, 1, 1), -1)


def test_inpaint_start_keeps_known_pixels_and_noises_the_rest():
    from jem_core.sampling import inpaint_start

    x = torch.full((2, 1, 4, 4), 0.25)
    mask = half_mask("left", (1, 4, 4))
    out = inpaint_start(x, mask, torch.Generator().manual_seed(0))
    assert torch.equal(out[..., 2:], x[..., 2:])
    assert (out[..., :2] != 0.25).all() and out.abs().max() <= 1


def test_generation_helpers_keep_pixels_and_classes_where_they_belong():
    from jem_core.checkpoint import load_checkpoint
    from jem_core.data import load_dataset
    from jem_core.generation import chain_starts, class_translation, inpaint, source_images

    ck = load_checkpoint(Path(__file__).resolve().parents[1] / "checkpoints" / "digits_jem.pt")
    test = load_dataset("digits", "test")
    g = torch.Generator().manual_seed(0)
    # buffer-only sources are the rows the model classifies as the label asked for
    x, y, where = source_images(ck, 5, g, label=7)
    assert where == "replay-buffer samples" and (y == 7).all()
    assert (ck.model(x).argmax(1) == 7).all()
    x, y, where = source_images(ck, 6, g, label=2, test_set=test)
    assert where == "test images" and (y == 2).all() and len(x) == 6
    # data-initialised chain starts are rows of the data
    s, used = chain_starts(ck, 4, "data", g, data=test.x)
    assert used == "data" and all(any(torch.equal(r, t) for t in test.x) for r in s)
    with pytest.raises(ValueError, match="needs images"):
        chain_starts(ck, 4, "data", g)
    sampler = SGLDSampler(ck.model, 1.0, 0.01, generator=torch.Generator().manual_seed(1))
    # in-painting changes only the masked half
    x0, chain = inpaint(x, "top", sampler, steps=10, generator=g)
    h = x.shape[-2] // 2
    assert torch.equal(chain.x[..., h:, :], x[..., h:, :]) and not torch.equal(chain.x[..., :h, :], x[..., :h, :])
    # translation is conditional SGLD on the target: the target's energy falls along the path
    frames, chain = class_translation(ck, x, 5, sampler, steps=40, n_frames=4)
    assert len(frames) == 4 and chain.steps == 40 and (chain.y == 5).all()
    assert chain.energy_history[-1].mean() < chain.energy_history[0].mean()
    with pytest.raises(ValueError, match=r"target class must lie in \[0, 10\)"):
        class_translation(ck, x, 10, sampler)


def test_chain_history_stays_bounded_and_keeps_the_recent_past_at_full_resolution():
    from jem_core.sampling import ChainState, SGLDSampler

    class Quadratic(torch.nn.Module):
        def forward(self, x):
            return -(x.flatten(1) ** 2).sum(1, keepdim=True).repeat(1, 3)

    s = SGLDSampler(Quadratic(), step_size=0.01, noise_std=0.01, generator=torch.Generator().manual_seed(0))
    chain = ChainState(x=torch.zeros(2, 1, 4, 4), max_history=50)
    for _ in range(20):
        chain.advance(s, 25, every=1)
    assert chain.steps == 500 and 25 <= len(chain.step_history) <= 50
    assert len(chain.energy_history) == len(chain.pred_history) == len(chain.step_history)
    assert chain.step_history == sorted(chain.step_history) and chain.step_history[-1] == 500
    recent = chain.step_history[-20:]
    assert recent == list(range(481, 501)), "the last steps are all kept"


def test_history_and_recording_exclude_each_other_so_a_snapshot_is_consistent():
    """A dashboard redraws the traces while a rerun's old thread may still be advancing the same chains: a
    report's three appends (and any thinning) and a snapshot's three copies hold the same lock, so a snapshot
    never sees a report half recorded."""
    import threading

    from torch import nn

    class Quadratic(nn.Module):
        def forward(self, x):
            return -(x.flatten(1) ** 2).sum(1, keepdim=True).repeat(1, 3)

    chain = ChainState(x=torch.zeros(3, 1, 4, 4), max_history=40)
    steps, energies, preds = chain.history()
    assert steps == [] and energies.shape == preds.shape == (0, 3)  # nothing recorded yet
    s = SGLDSampler(Quadratic(), step_size=0.01, noise_std=0.01, generator=torch.Generator().manual_seed(0))
    out = {}
    with chain._lock:  # a snapshot in progress: a step's report waits for it
        worker = threading.Thread(target=lambda: chain.advance(s, 1))
        worker.start()
        worker.join(timeout=0.3)
        assert worker.is_alive() and chain.step_history == []
    worker.join()
    assert chain.step_history == [1]
    with chain._lock:  # a report in progress: a snapshot waits for it
        reader = threading.Thread(target=lambda: out.update(snapshot=chain.history()))
        reader.start()
        reader.join(timeout=0.3)
        assert reader.is_alive() and not out
    reader.join()
    for _ in range(12):
        chain.advance(s, 5)
    steps, energies, preds = chain.history()
    assert energies.shape == preds.shape == (len(steps), 3) and preds.dtype == torch.int64
    assert steps == chain.step_history and len(steps) <= 40 and steps[-1] == 61


def test_differentiable_steps_are_the_same_update_and_carry_the_gradient():
    """``run(differentiable=True)`` (the refined classifier's full back-propagation) makes the same moves as the
    plain sampler and is differentiable in its start point (checked against central differences)."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(8, 16), torch.nn.Tanh(), torch.nn.Linear(16, 3))
    x0 = torch.rand(2, 2, 2, 2) * 0.6 - 0.3  # far from the clamp at +-1

    def sampler(seed=1):
        return SGLDSampler(model, step_size=0.5, noise_std=0.01, max_update=0.5,
                           generator=torch.Generator().manual_seed(seed))

    plain = sampler().run(x0, 3)
    x = x0.clone().requires_grad_(True)
    moved = sampler().run(x, 3, differentiable=True)
    assert moved.requires_grad and torch.allclose(moved.detach(), plain, atol=1e-6)
    assert torch.allclose(sampler().step(x0, differentiable=True).detach(), sampler().step(x0), atol=1e-6)
    w = torch.randn(x0.shape, generator=torch.Generator().manual_seed(2))
    (grad,) = torch.autograd.grad((moved * w).sum(), x)
    v, h = torch.randn(x0.shape, generator=torch.Generator().manual_seed(3)), 1e-2
    f = lambda z: float((sampler().run(z, 3) * w).sum())  # noqa: E731 (the same noise every call)
    along_v = float((grad * v).sum())
    assert along_v == pytest.approx((f(x0 + h * v) - f(x0 - h * v)) / (2 * h), rel=1e-4)
    assert abs(along_v - float((v * w).sum())) > 1e-3  # not the identity: the gradient goes through dE/dx
