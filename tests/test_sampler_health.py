"""Sampler health: the checks stay quiet on the bundled JEMs' default sampler and fire on a diverging, a
noise-dominated and a saturating configuration (jem_core.sampler_health)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn

from jem_core.checkpoint import load_checkpoint
from jem_core.data import load_dataset
from jem_core.sampler_health import chain_health, sampler_settings_health
from jem_core.sampling import ChainState, SGLDSampler, init_noise

CK = Path(__file__).resolve().parents[1] / "checkpoints"


def _run(ck, start: torch.Tensor, steps: int = 60, **settings) -> list[str]:
    model = ck.model.eval().requires_grad_(False)
    s = SGLDSampler(model, clamp=True, generator=torch.Generator().manual_seed(0), **settings)
    chain = ChainState(x=start.clone())
    chain.advance(s, steps, every=10)
    return [f.check for f in chain_health(chain.last_report, s.step_size, s.noise_std, s.exact_langevin,
                                          ck.metadata.get("reference"))]


@pytest.fixture(scope="module")
def mnist():
    ck = load_checkpoint(CK / "mnist_jem.pt")
    return ck, load_dataset("mnist", "test", download=False).x[:8]  # the data root or the demo pack


def test_the_default_sampler_is_healthy_from_noise_buffer_and_test_images(mnist):
    ck, test = mnist
    g = torch.Generator().manual_seed(1)
    for start in (init_noise(8, (1, 28, 28), g), ck.replay_buffer[:8], test):
        assert _run(ck, start, step_size=1.0, noise_std=0.01) == []


def test_exact_langevin_at_step_one_is_flagged_as_noise(mnist):
    ck, _ = mnist
    found = _run(ck, ck.replay_buffer[:8], step_size=1.0, exact_langevin=True)
    assert {"exact_step", "overshoot", "above_data"} <= set(found)
    assert [f.check for f in sampler_settings_health(1.0, True)] == ["exact_step"]
    assert sampler_settings_health(0.001, True) == [] and sampler_settings_health(1.0, False) == []


def test_a_large_step_is_flagged_even_though_the_clamp_hides_it(mnist):
    ck, _ = mnist
    assert "overshoot" in _run(ck, ck.replay_buffer[:8], step_size=10.0, noise_std=0.1)  # 8-15% of the pixels


def test_noise_that_swamps_the_gradient_is_flagged():
    ck = load_checkpoint(CK / "digits_jem.pt")
    found = _run(ck, ck.replay_buffer[:8], steps=20, step_size=0.001, noise_std=0.05)
    assert "noise_dominates" in found


class _NaNModel(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.flatten(1)[:, :10] * float("nan")


def test_nonfinite_chains_are_an_error_listed_first():
    s = SGLDSampler(_NaNModel(), step_size=1.0, noise_std=0.01, generator=torch.Generator().manual_seed(0))
    chain = ChainState(x=torch.zeros(4, 1, 8, 8))
    chain.advance(s, 3, every=1)
    found = chain_health(chain.last_report, 1.0, 0.01, False)
    assert found and found[0].level == "error" and found[0].check == "nonfinite"
