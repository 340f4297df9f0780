"""The live chains' traces picture (app/figures.py): what it draws, and that one object redraws any chains."""

import io

import numpy as np
import pytest
import torch
from PIL import Image

from app.figures import CLASS_COLORS, ChainTracesPicture


def _rgb(hex_color: str) -> np.ndarray:
    return np.array([int(hex_color[i:i + 2], 16) for i in (1, 3, 5)])


def _share_of(img: np.ndarray, hex_color: str, rows: slice) -> float:
    """Fraction of the pixels in ``rows`` within 3 levels of ``hex_color``."""
    return float((np.abs(img[rows].astype(int) - _rgb(hex_color)).max(-1) <= 3).mean())


def test_the_prediction_panel_is_painted_in_the_predicted_class_colour():
    names = [str(i) for i in range(10)]
    picture = ChainTracesPicture(names, "Energy E(x) of each chain", "Classifier's prediction for each chain",
                                 width_in=4, dpi=100)
    steps = list(range(0, 200, 5))
    energies = torch.linspace(3.0, -2.0, len(steps))[:, None].repeat(1, 8)
    lower = slice(300, 460)  # the prediction panel of a 400 x 520 picture
    for cls, other in ((3, 0), (0, 3)):
        png = picture.png(steps, energies, torch.full((len(steps), 8), cls))
        img = np.asarray(Image.open(io.BytesIO(png)).convert("RGB"))
        assert img.shape == (520, 400, 3)
        assert _share_of(img, CLASS_COLORS[cls], lower) > 0.4  # the heat map fills most of the panel
        # the other class appears only in the colour bar (about a tenth of its height, a sliver of the width)
        assert _share_of(img, CLASS_COLORS[other], lower) < 0.02


def test_unevenly_spaced_steps_of_a_thinned_history_sit_at_their_own_step():
    """Class 3 at step 0, class 0 at steps 90-100: the change sits midway between 0 and 90 (x = 45), not after the
    first of four equal columns, as it would if the reports were drawn evenly spaced."""
    picture = ChainTracesPicture([str(i) for i in range(10)], "E", "p", width_in=4, dpi=100)
    steps = [0, 90, 95, 100]
    preds = torch.tensor([3, 0, 0, 0])[:, None].repeat(1, 4)
    png = picture.png(steps, torch.zeros(4, 4), preds)
    img = np.asarray(Image.open(io.BytesIO(png)).convert("RGB"))
    lower = slice(300, 460)
    three, zero = _share_of(img, CLASS_COLORS[3], lower), _share_of(img, CLASS_COLORS[0], lower)
    # x runs from -2.5 to 102.5: 47.5 units of class 3 against 57.5 of class 0 (the colour bar adds a little of
    # each); evenly spaced columns would give 1 : 3
    assert 0.7 < three / zero < 1.0, (three, zero)


def test_one_picture_redraws_other_chain_counts_one_step_and_non_finite_energies():
    picture = ChainTracesPicture(["a", "b", "c"], "E", "p")  # the default size: 3.3 in at 150 dpi
    for t, n in ((40, 16), (1, 4), (7, 1)):
        e = torch.randn(t, n)
        if t > 1:
            e[1, 0] = float("nan")
        png = picture.png(list(range(t)), e, torch.randint(0, 3, (t, n)))
        assert Image.open(io.BytesIO(png)).size == (495, 643)
    lo, hi = picture.top.get_ylim()
    assert np.isfinite([lo, hi]).all() and lo < float(np.nanmin(e)) <= float(np.nanmax(e)) < hi  # the NaN left out


@pytest.mark.parametrize("energies, preds, steps", [
    (torch.zeros(5, 4), torch.zeros(5, 3, dtype=torch.long), 5),   # preds of another chain count
    (torch.zeros(5, 4), torch.zeros(5, 4, dtype=torch.long), 6),   # one step number too many
    (torch.zeros(0, 4), torch.zeros(0, 4, dtype=torch.long), 0),   # nothing to draw
    (torch.zeros(5), torch.zeros(5, dtype=torch.long), 5),         # not [T, N]
])
def test_shapes_that_do_not_match_are_a_clear_error(energies, preds, steps):
    with pytest.raises(ValueError, match=r"must both be \[T, N\]"):
        ChainTracesPicture(["a", "b"], "E", "p").png(list(range(steps)), energies, preds)
