"""Claims of JEM's energy view of a classifier (Grathwohl et al. 2019, eq. 4-5)."""

import pytest
import torch

from jem_core.energy import JEM, class_energy, energy, log_p_y_given_x, log_px_unnormalized
from jem_core.models import ConvNet, count_parameters


def test_softmax_of_logits_is_p_y_given_x_and_energies_match_definitions():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(7, 5, generator=g) * 3
    y = torch.randint(0, 5, (7,), generator=g)
    # p(y|x) = exp(-E(x, y)) / sum_y' exp(-E(x, y')) = exp(E(x) - E(x, y))
    p_from_energies = torch.exp(energy(logits) - class_energy(logits, y))
    assert torch.allclose(p_from_energies, torch.softmax(logits, 1)[torch.arange(7), y], atol=1e-6)
    assert torch.allclose(log_p_y_given_x(logits).exp(), torch.softmax(logits, 1), atol=1e-6)
    assert torch.allclose(energy(logits), -torch.log(torch.exp(logits).sum(1)), atol=1e-5)
    assert torch.allclose(log_px_unnormalized(logits), torch.log(torch.exp(logits).sum(1)), atol=1e-5)


def test_shifting_logits_shifts_energy_and_keeps_classifier():
    logits = torch.randn(4, 10)
    c = 3.7
    assert torch.allclose(energy(logits + c), energy(logits) - c, atol=1e-5)
    assert torch.allclose(log_p_y_given_x(logits + c), log_p_y_given_x(logits), atol=1e-5)


def test_bad_shapes_and_labels_are_refused():
    with pytest.raises(ValueError, match="N, K"):
        energy(torch.randn(3))
    with pytest.raises(ValueError, match="labels must lie"):
        class_energy(torch.randn(2, 3), torch.tensor([0, 3]))
    with pytest.raises(ValueError, match="2 labels for 3"):
        class_energy(torch.randn(3, 3), torch.tensor([0, 1]))


@pytest.mark.parametrize("side", [8, 28])
def test_convnet_serves_digits_and_mnist_sizes(side):
    jem = JEM(ConvNet(1, 10, image_size=side))
    x = torch.rand(3, 1, side, side) * 2 - 1
    assert jem(x).shape == (3, 10)
    assert jem.energy(x).shape == (3,)
    assert jem.energy(x, torch.tensor([0, 1, 2])).shape == (3,)
    assert jem.features(x).shape == (3, 128)
    assert 50_000 < count_parameters(jem) < 500_000
