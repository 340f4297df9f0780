"""Photos of digits: the digit-style normalisation makes a phone photo of ink on paper look like MNIST's own
images (background black, ink white, the digit fitted into 20x20 and centred), so the MNIST JEM classifies
it and does not call it unusual; without it, the same photos are a domain shift."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from bench.photo_digits import measure, photo_of_digit
from jem_core.images import DIGIT_BOX, prepare_upload

CK = Path(__file__).resolve().parents[1] / "checkpoints"


def _digit() -> np.ndarray:
    x = np.zeros((28, 28), np.uint8)
    x[6:22, 13:16] = 255  # a "1"
    x[6:9, 10:14] = 255
    return x


def test_digit_style_gives_black_background_white_ink_a_20_pixel_box_and_a_centred_mass():
    data = photo_of_digit(_digit(), np.random.default_rng(0))
    p = prepare_upload(data, "one.jpg", 1, 28, digit_style=True)
    t = (p.tensor[0] + 1) / 2  # [0, 1]
    assert p.inverted and t.shape == (28, 28)
    assert float(t[:3].max()) < 0.05 and float(t[:, :3].max()) < 0.05, "the background is black"
    assert float(t.max()) > 0.95, "the ink is white"
    rows, cols = torch.nonzero(t > 0.3, as_tuple=True)
    assert int(rows.max() - rows.min()) + 1 <= round(DIGIT_BOX * 28) + 1
    ys, xs = torch.arange(28.0), torch.arange(28.0)
    cy, cx = float((t.sum(1) * ys).sum() / t.sum()), float((t.sum(0) * xs).sum() / t.sum())
    assert abs(cy - 13.5) < 1.0 and abs(cx - 13.5) < 1.0, (cy, cx)
    assert any("digit-style" in n for n in p.notes) and any("levels" in n for n in p.notes)
    assert [c for c, _ in p.stages][0] == "as decoded" and np.array_equal(p.stages[-1][1], p.display)
    assert max(p.stages[0][1].shape[:2]) <= 112


def test_without_digit_style_the_path_is_unchanged():
    data = photo_of_digit(_digit(), np.random.default_rng(0))
    p = prepare_upload(data, "one.jpg", 1, 28)
    assert not any("digit-style" in n for n in p.notes) and p.stages[-1][0].startswith("model input 28x28")
    q = prepare_upload(data, "one.jpg", 3, 32, digit_style=True)  # ignored for a colour model
    assert q.tensor.shape == (3, 32, 32) and not any("digit-style" in n for n in q.notes)


@pytest.mark.skipif(not (CK / "mnist_jem.pt").is_file(), reason="no bundled MNIST JEM")
def test_photo_style_digits_are_classified_and_typical_with_digit_style_and_a_domain_shift_without():
    plain = measure(str(CK / "mnist_jem.pt"), 60, digit_style=False)
    styled = measure(str(CK / "mnist_jem.pt"), 60, digit_style=True)
    assert styled["accuracy"] >= 0.9 and styled["unusual"] <= 0.2, styled
    assert plain["unusual"] >= 0.5 and plain["accuracy"] < styled["accuracy"], plain
