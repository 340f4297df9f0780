"""The live chains' traces picture (app/figures.py): what it draws, and that one object redraws any chains."""

import io

import numpy as np
import pytest
import torch
from PIL import Image

from app.figures import CLASS_COLORS, ChainTracesPicture, energy_axis, step_axis_end


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
    # the cells run from -2.5 to 102.5 (the axis from -3 to 103): 47.5 units of class 3 against 57.5 of class 0
    # (the colour bar adds a little of each); evenly spaced columns would give 1 : 3
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


def test_a_blitted_redraw_is_the_full_drawing_and_most_redraws_are_blitted():
    """Live chains from one picture (background kept, traces drawn on it) against a picture that draws everything
    at every call: the same PNG bytes through growth, thinning, a restart and another chain count; and the
    background is drawn again only when the frame changes (a few times per decade of steps)."""
    names = [str(i) for i in range(10)]
    blitted, full = ChainTracesPicture(names, "E", "p"), ChainTracesPicture(names, "E", "p", blit=False)
    draws = []
    draw = blitted.canvas.draw
    blitted.canvas.draw = lambda: (draws.append(1), draw())[1]
    g = torch.Generator().manual_seed(0)
    e = torch.cumsum(torch.randn(400, 16, generator=g) * 0.05, 0) - 3
    p = torch.randint(0, 10, (400, 16), generator=g)
    calls = [(list(range(t)), e[:t], p[:t]) for t in range(1, 400, 7)]
    calls.append((list(range(0, 400, 2)), e[::2], p[::2]))            # a thinned history: uneven columns
    calls += [(list(range(t)), e[:t, :4] + 5, p[:t, :4]) for t in (1, 2, 30)]  # new chains: 4, higher energies
    for steps, energies, preds in calls:
        assert blitted.png(steps, energies, preds) == full.png(steps, energies, preds), len(steps)
    assert 3 <= len(draws) <= 20 < len(calls)


@pytest.mark.parametrize("last, end", [(0, 1), (1, 1), (1.2, 1.5), (7.6, 10), (10, 10), (101, 150), (2000, 2000),
                                       (2001, 3000), (7600, 10000)])
def test_the_step_axis_ends_at_the_next_round_number(last, end):
    assert step_axis_end(last) == pytest.approx(end)


def test_the_energy_axis_pads_the_range_and_widens_a_single_value():
    assert energy_axis(-2.0, 2.0) == pytest.approx((-2.6, 2.6))
    assert energy_axis(3.0, 3.0) == pytest.approx((2.5, 3.5))


def test_the_heat_map_stops_at_the_last_step_where_the_axis_goes_on():
    """The step axis runs on past the last step (to 150 here): the heat map must not smear its last column there."""
    picture = ChainTracesPicture([str(i) for i in range(10)], "E", "p", width_in=4, dpi=100)
    lower = slice(300, 460)
    shares = []
    for last in (120, 150):
        steps = list(range(0, last + 1, 5))
        png = picture.png(steps, torch.zeros(len(steps), 4), torch.full((len(steps), 4), 3))
        shares.append(_share_of(np.asarray(Image.open(io.BytesIO(png)).convert("RGB")), CLASS_COLORS[3], lower))
    assert picture.frame[0] == (0.0, 150.0)
    assert 0.7 < shares[0] / shares[1] < 0.9, shares  # about 122.5 / 152.5 of the width (the colour bar aside)
