"""The dashboard's plotly figures: builders that turn plain results of ``jem_core`` into figures.

Every builder takes numbers (tensors, arrays, lists, report dataclasses) and returns a ``go.Figure``; none
computes a model output. One exception, for views that redraw live: :class:`ChainTracesPicture` draws the live
chains' traces as one matplotlib picture (a browser redraws a picture for a fraction of what two plotly figures
cost it). One colour per model everywhere (:data:`COLORS`, in the order of ``Context.models()``), one per class
(:data:`CLASS_COLORS`).

What does not live here: static report figures (matplotlib, ``jem_core/evaluation/figures.py``) and showing
a figure in a page (``ui.show_chart``).
"""

from __future__ import annotations

from typing import Any, Sequence

import io
import math
import sys
import threading

import numpy as np
import plotly.graph_objects as go
import torch
from matplotlib.collections import LineCollection
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.colors import ListedColormap, Normalize
from matplotlib.figure import Figure
from matplotlib.image import NonUniformImage
from matplotlib.patches import Rectangle
from matplotlib.ticker import MaxNLocator
from matplotlib.transforms import Bbox
from PIL import Image
from plotly.subplots import make_subplots

#: Colours of the models in every figure: the chosen model, its baseline, extra curves.
COLORS = ["#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f"]
#: Discrete colours for class indices (prediction heat maps).
CLASS_COLORS = ["#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f",
                "#bcbd22", "#17becf"]


def _layout(fig: go.Figure, title: str, xlabel: str, ylabel: str, height: int = 360) -> go.Figure:
    fig.update_layout(title=title, xaxis_title=xlabel, yaxis_title=ylabel, height=height,
                      margin=dict(l=10, r=10, t=50, b=10),
                      legend=dict(orientation="h", yanchor="top", y=-0.28, xanchor="left", x=0))
    return fig


def _np(v: Any) -> np.ndarray:
    return np.asarray(torch.as_tensor(v).detach().cpu().double()) if not isinstance(v, np.ndarray) else v


def fig_histograms(values: dict[str, Any], title: str, xlabel: str, nbins: int = 40, overlay: bool = True,
                   colors: Sequence[str] | None = None, value_range: tuple[float, float] | None = None,
                   log_y: bool = False) -> go.Figure:
    """Histograms (as fractions of each set) of several sets of values, overlaid or grouped.

    All sets share the same ``nbins`` bins over ``value_range`` (default: the range of all values).
    """
    fig = go.Figure()
    colors = colors or COLORS
    arrays = {name: _np(v)[np.isfinite(_np(v))] for name, v in values.items()}
    if value_range is None:
        nonempty = [a for a in arrays.values() if len(a)]
        lo = min((float(a.min()) for a in nonempty), default=0.0)
        hi = max((float(a.max()) for a in nonempty), default=1.0)
        value_range = (lo, hi if hi > lo else lo + 1.0)
    size = (value_range[1] - value_range[0]) / max(1, nbins)
    for i, (name, arr) in enumerate(arrays.items()):
        fig.add_histogram(x=arr, name=name, histnorm="probability", opacity=0.6 if overlay else 0.9,
                          xbins=dict(start=value_range[0], end=value_range[1] + 1e-9, size=size),
                          marker_color=colors[i % len(colors)])
    fig.update_layout(barmode="overlay" if overlay else "group")
    if log_y:
        fig.update_yaxes(type="log")
    return _layout(fig, title, xlabel, "fraction of images")


def fig_reliability(reports: dict[str, Any], title: str = "Reliability diagram",
                    colors: dict[str, str] | None = None) -> go.Figure:
    """Reliability diagrams in the form of Guo et al. (2017, fig. 1), one panel per model on shared axes.

    Per confidence bin: the accuracy ("outputs", the model's colour), the gap to the diagonal (red, from the
    accuracy to the bin's mean confidence: below the diagonal = over-confident), and the number of images
    (written on the bar, and in the lower row on a log scale). Bins holding fewer than
    ``max(5, 0.5% of the images)`` are drawn faint: their accuracy is too noisy to read.

    ``reports``: name -> :class:`jem_core.evaluation.calibration.CalibrationReport`; ``colors``: name -> colour
    (default: :data:`COLORS` in order).
    """
    names = list(reports)
    fig = make_subplots(rows=2, cols=len(names), shared_xaxes=True, shared_yaxes="rows", row_heights=[0.74, 0.26],
                        vertical_spacing=0.06, horizontal_spacing=0.04,
                        subplot_titles=[f"{n}<br>ECE {reports[n].ece:.3f}" for n in names])
    for i, name in enumerate(names, start=1):
        r = reports[name]
        c = (colors or {}).get(name, COLORS[(i - 1) % len(COLORS)])
        n = int(sum(b.count for b in r.bins))
        few = max(5, int(0.005 * n))
        centers = [(b.lo + b.hi) / 2 for b in r.bins]
        width = [(b.hi - b.lo) * 0.92 for b in r.bins]
        opac = [0.9 if b.count >= few else 0.25 for b in r.bins]
        acc = [b.accuracy if b.count else None for b in r.bins]
        conf = [b.confidence if b.count else None for b in r.bins]
        gap = [(cf - a) if b.count else None for b, a, cf in zip(r.bins, acc, conf)]
        custom = [[b.lo, b.hi, b.confidence if b.count else float("nan"), b.count] for b in r.bins]
        fig.add_scatter(x=[0, 1], y=[0, 1], mode="lines", line=dict(dash="dash", color="gray"),
                        name="perfect calibration", showlegend=i == 1, row=1, col=i)
        fig.add_bar(x=centers, y=acc, width=width, name="outputs (accuracy)", marker=dict(color=c, opacity=opac),
                    text=[str(b.count) if b.count else "" for b in r.bins], textposition="inside",
                    insidetextanchor="start", customdata=custom, showlegend=False, row=1, col=i,
                    hovertemplate="confidence %{customdata[0]:.2f}-%{customdata[1]:.2f}<br>mean confidence "
                                  "%{customdata[2]:.3f}<br>accuracy %{y:.3f}<br>%{customdata[3]} images<extra></extra>")
        fig.add_bar(x=centers, y=gap, base=acc, width=width, name="gap to the diagonal",
                    marker=dict(color="rgba(214,39,40,0.35)", line=dict(color="#d62728", width=1),
                                pattern=dict(shape="/")), showlegend=i == 1, row=1, col=i,
                    hovertemplate="gap %{y:+.3f} (confidence - accuracy)<extra></extra>")
        fig.add_bar(x=centers, y=[b.count for b in r.bins], width=width, marker=dict(color=c, opacity=opac),
                    showlegend=False, row=2, col=i, hovertemplate="%{y} images<extra></extra>")
        fig.update_xaxes(range=[0, 1], row=1, col=i)
        fig.update_xaxes(range=[0, 1], title_text="confidence max p(y|x)", row=2, col=i)
    fig.update_yaxes(title_text="accuracy", range=[0, 1.02], row=1, col=1)
    fig.update_yaxes(title_text="images", type="log", row=2, col=1)
    fig.update_layout(title=title, height=500, barmode="overlay", margin=dict(l=10, r=10, t=70, b=10),
                      legend=dict(orientation="h", y=-0.18))
    return fig


def fig_lines(x: Sequence[float] | dict[str, Sequence[float]], series: dict[str, Sequence[float | None]],
              title: str, xlabel: str, ylabel: str, markers: bool = True, yrange: Sequence[float] | None = None,
              colors: dict[str, str] | None = None, height: int = 360,
              intervals: dict[str, tuple[Sequence[float], Sequence[float]]] | None = None) -> go.Figure:
    """Line plot of several series over a shared x (or one x per series when ``x`` is a dict).

    ``intervals``: name -> (lower bounds, upper bounds) drawn as asymmetric error bars (e.g. 95% intervals).
    """
    fig = go.Figure()
    for i, (name, y) in enumerate(series.items()):
        xs = x[name] if isinstance(x, dict) else x
        err = None
        if intervals and name in intervals:
            lo, hi = intervals[name]
            err = dict(type="data", symmetric=False, array=[h - v for h, v in zip(hi, y)],
                       arrayminus=[v - lo_ for lo_, v in zip(lo, y)], thickness=1.2, width=4)
        fig.add_scatter(x=list(xs), y=list(y), name=name, mode="lines+markers" if markers else "lines",
                        line=dict(color=(colors or {}).get(name, COLORS[i % len(COLORS)])), error_y=err)
    if yrange is not None:
        fig.update_yaxes(range=list(yrange))
    xs_all = [v for xs in (x.values() if isinstance(x, dict) else [x]) for v in xs]
    if xs_all and all(float(v).is_integer() for v in xs_all) and max(xs_all) - min(xs_all) <= 30:
        fig.update_xaxes(dtick=1)  # epochs and other counts: no fractional ticks
    return _layout(fig, title, xlabel, ylabel, height)


def fig_roc(curves: dict[str, dict[str, Sequence[float]]], title: str) -> go.Figure:
    """ROC curves: ``name -> {"fpr": [...], "tpr": [...]}`` (in-distribution = positive)."""
    fig = go.Figure()
    fig.add_scatter(x=[0, 1], y=[0, 1], mode="lines", line=dict(dash="dash", color="gray"), name="chance")
    for i, (name, c) in enumerate(curves.items()):
        fig.add_scatter(x=c["fpr"], y=c["tpr"], mode="lines", name=name, line=dict(color=COLORS[i % len(COLORS)]))
    fig.update_xaxes(range=[0, 1])
    fig.update_yaxes(range=[0, 1.02])
    return _layout(fig, title, "false positive rate (OOD accepted)", "true positive rate (in-distribution kept)", 400)


def fig_chain_energy(steps: Sequence[int], energies: torch.Tensor, title: str) -> go.Figure:
    """Energy of every chain over SGLD steps (thin lines) and their mean (thick); ``energies`` ``[T, N]``."""
    e = _np(energies)
    fig = go.Figure()
    n = e.shape[1] if e.ndim == 2 else 0
    for j in range(n):
        fig.add_scatter(x=list(steps), y=e[:, j], mode="lines", line=dict(width=1, color=CLASS_COLORS[j % 10]),
                        opacity=0.45, name=f"chain {j}", showlegend=False)
    if n:
        fig.add_scatter(x=list(steps), y=e.mean(1), mode="lines", line=dict(width=3, color="black"), name="mean")
    return _layout(fig, title, "SGLD step", "energy", 320)


def fig_chain_predictions(steps: Sequence[int], preds: torch.Tensor, names: Sequence[str], title: str) -> go.Figure:
    """The classifier's prediction for every chain over steps, as a heat map (chains x steps)."""
    p = _np(preds).astype(int).T if len(steps) else np.zeros((0, 0), dtype=int)  # [N, T]
    k = len(names)
    scale = []
    for i in range(k):
        c = CLASS_COLORS[i % len(CLASS_COLORS)]
        scale += [[i / k, c], [(i + 1) / k, c]]
    fig = go.Figure(go.Heatmap(z=p, x=list(steps), y=[f"chain {j}" for j in range(p.shape[0])], zmin=-0.5,
                               zmax=k - 0.5, colorscale=scale,
                               colorbar=dict(title="class", tickvals=list(range(k)), ticktext=list(names)),
                               hovertemplate="step %{x}<br>%{y}<br>predicted %{z}<extra></extra>"))
    fig.update_yaxes(autorange="reversed", showticklabels=p.shape[0] <= 16)
    return _layout(fig, title, "SGLD step", "chain", 320)


#: The step axis of :class:`ChainTracesPicture` ends at the first of these (times a power of ten) at or past the
#: last step: the traces fill at least three fifths of its width, and it changes six times per decade of steps.
STEP_AXIS_ENDS = (1.0, 1.5, 2.0, 3.0, 5.0, 7.5)


def step_axis_end(last: float) -> float:
    """The end of the live traces' step axis for a last step ``last`` (>= 0): the smallest ``m * 10**k`` with
    ``m`` in :data:`STEP_AXIS_ENDS` and integer ``k >= 0`` that is at least ``last`` (at least 1)."""
    if last <= 1:
        return 1.0
    k = 10.0 ** math.floor(math.log10(last))
    return next((m * k for m in STEP_AXIS_ENDS if m * k >= last * (1 - 1e-12)), 10 * k)


def energy_axis(lo: float, hi: float) -> tuple[float, float]:
    """The live traces' energy axis for finite energies in ``[lo, hi]``: 15% of their range on each side, or
    ``[v - 0.5, v + 0.5]`` when they are (nearly) one value ``v``."""
    if hi - lo <= 1e-6 * max(1.0, abs(hi)):
        return lo - 0.5, hi + 0.5
    pad = 0.15 * (hi - lo)
    return lo - pad, hi + pad


class ChainTracesPicture:
    """The two traces of :func:`fig_chain_energy` and :func:`fig_chain_predictions` as one static PNG (energies
    above, predictions below), for a view that redraws while chains run.

    Redrawing two plotly figures of 16 chains cost a Chromium tab more main-thread time than all its refreshes of
    the chains' picture in between (``bench/README.md``). One object per view: each :meth:`png` updates the same
    matplotlib figure (object API, no pyplot, so the server's threads may each draw their own; one thread at a time
    per object). The axes, their ticks and labels, the titles and the colour bar are drawn once per *frame* and
    kept as a background; a redraw within the frame pastes it back and draws only the traces and the heat map on
    it (blitting: ``python bench/traces_picture.py`` measures it against drawing everything). The frame changes,
    and everything is drawn again, when the traces leave it or fill too little of it: the step axis runs from the
    first step to :func:`step_axis_end` of the last one, the energy axis is :func:`energy_axis` of the energies and
    is kept while they stay inside it and span at least half of what it would be for them now. The interactive
    plotly figures are for chains at rest.

    Args:
        names: the class names (the colour bar's labels; :data:`CLASS_COLORS` in order, cycled).
        energy_title, preds_title: the panels' titles.
        width_in, dpi: the picture is ``width_in * dpi`` pixels wide and ``1.3`` times that high; the default
            (3.3 in at 150 dpi) is sharp at the width of the Langevin page's traces column (about 320 px at a
            1280 px window) and on screens of two pixels per point.
        blit: False draws everything at every :meth:`png` (the same picture; for tests and the benchmark).
    """

    def __init__(self, names: Sequence[str], energy_title: str, preds_title: str, width_in: float = 3.3,
                 dpi: int = 150, blit: bool = True) -> None:
        self.names, self.titles, self.blit = list(names), (energy_title, preds_title), blit
        k = len(self.names)
        if "IPython" in sys.modules:
            # Another thread may be importing it (captum does, in the server's warm-up): matplotlib's first canvas
            # reads IPython.version_info, so wait for that import to finish (the import lock) instead of failing.
            import IPython  # noqa: F401
        self.fig = Figure(figsize=(width_in, 1.3 * width_in), dpi=dpi)
        self.canvas = FigureCanvasAgg(self.fig)
        # Room on the right for the colour bar's longest class name (about 0.55 em per character at 7 pt).
        label_pt = 7 * 0.55 * max((len(n) for n in self.names), default=1) + 22
        self.fig.subplots_adjust(left=0.17, right=max(0.5, 0.97 - label_pt / (72 * width_in)), top=0.95,
                                 bottom=0.1, hspace=0.52)
        self.top, self.bottom = self.fig.subplots(2, 1)
        self.lines = self.top.add_collection(LineCollection([], linewidths=0.8, alpha=0.45))
        (self.mean,) = self.top.plot([], [], lw=2, color="black", label="mean")
        self.legend = self.top.legend(loc="upper right", fontsize=7)
        cmap = ListedColormap([CLASS_COLORS[i % len(CLASS_COLORS)] for i in range(k)])
        # Step numbers are unevenly spaced once a chain's history is thinned: each column sits at its own step.
        self.image = NonUniformImage(self.bottom, interpolation="nearest", cmap=cmap, norm=Normalize(-0.5, k - 0.5))
        self.bottom.add_image(self.image)
        bar = self.fig.colorbar(self.image, ax=self.bottom, ticks=range(k), fraction=0.08, pad=0.03)
        bar.ax.set_yticklabels(self.names, fontsize=6 if k > 10 else 7)
        bar.set_label("class", fontsize=8)
        for ax, title, ylabel in ((self.top, energy_title, "energy"), (self.bottom, preds_title, "chain")):
            ax.set_title(title, fontsize=8.5)
            ax.set_xlabel("SGLD step", fontsize=8)
            ax.set_ylabel(ylabel, fontsize=8)
            ax.tick_params(labelsize=7)
        self.bottom.yaxis.set_major_locator(MaxNLocator(nbins=8, integer=True, min_n_ticks=1))
        for ax in (self.top, self.bottom):
            ax.xaxis.set_major_locator(MaxNLocator(nbins=5, integer=True, min_n_ticks=1))
        # The energy panel as wide as the heat map beside its colour bar, so that a step sits at the same x in both.
        top, bottom = self.top.get_position(), self.bottom.get_position()
        self.top.set_position([top.x0, top.y0, bottom.width, top.height])
        for artist in (self.lines, self.mean, self.image):  # left out of the background, drawn at every png()
            artist.set_animated(True)
        self.frame: tuple | None = None  # (step axis, energy axis, chain count) of the background below
        self._background = self._legend = None
        self._lock = threading.Lock()

    def _frame_for(self, x: np.ndarray, lo: float, hi: float, n: int) -> tuple:
        """The frame for these traces: the current one while they fit it (see the class docstring), else a new one."""
        steps = (float(x[0]), step_axis_end(float(x[-1])))
        ideal = energy_axis(lo, hi)
        if self.frame is not None and self.frame[0] == steps and self.frame[2] == n:
            e_lo, e_hi = self.frame[1]
            if e_lo <= lo and hi <= e_hi and e_hi - e_lo <= 2 * (ideal[1] - ideal[0]):
                return self.frame
        return steps, ideal, n

    def png(self, steps: Sequence[int], energies: torch.Tensor, preds: torch.Tensor) -> bytes:
        """The picture of these traces, as PNG bytes (``width_in * dpi`` by ``1.3 * width_in * dpi`` pixels, 256
        colours).

        Args:
            steps: the ``T`` SGLD step numbers, increasing, >= 0.
            energies: ``[T, N]`` float energies (drawn as given; non-finite values are left out of the axis range),
                one column per chain.
            preds: ``[T, N]`` integer predicted classes in ``[0, len(names))``.

        Raises:
            ValueError: when ``energies`` and ``preds`` are not both ``[T, N]`` with ``T = len(steps) >= 1``.
        """
        x = np.asarray(list(steps), dtype=float)
        e, p = _np(energies), _np(preds).astype(int)
        if e.ndim != 2 or p.shape != e.shape or e.shape[0] != len(x) or len(x) == 0:
            raise ValueError(f"energies and preds must both be [T, N] with T = len(steps) >= 1; got energies "
                             f"{tuple(e.shape)}, preds {tuple(p.shape)} and {len(x)} steps")
        t, n = e.shape
        finite = e[np.isfinite(e)]
        lo, hi = (float(finite.min()), float(finite.max())) if finite.size else (-1.0, 1.0)
        with self._lock:
            self.lines.set_segments(list(np.stack([np.broadcast_to(x[:, None], e.shape), e], -1).transpose(1, 0, 2)))
            self.lines.set_color([CLASS_COLORS[j % len(CLASS_COLORS)] for j in range(n)])
            self.mean.set_data(x, e.mean(1))
            # Centres of the cells: one column per report at its step, one row per chain (a single one is widened
            # to a cell of width 1, which the image needs).
            cx, z = (x, p.T) if t > 1 else (np.array([x[0] - 0.5, x[0] + 0.5]), np.repeat(p.T, 2, axis=1))
            cy, z = (np.arange(n, dtype=float), z) if n > 1 else (np.array([-0.5, 0.5]), np.repeat(z, 2, axis=0))
            self.image.set_data(cx, cy, z.astype(float))
            half = np.diff(cx).min() / 2  # the outer cells reach half the finest spacing past their step
            # A NonUniformImage fills its whole axes with its edge cells: clip it to its own cells.
            self.image.set_clip_path(Rectangle((cx[0] - half, -0.5), cx[-1] - cx[0] + 2 * half, n,
                                               transform=self.bottom.transData))
            frame = self._frame_for(x, lo, hi, n)
            if frame != self.frame or not self.blit:
                (first, end), (e_lo, e_hi), _ = frame
                pad = 0.03 * (end - first)
                for ax in (self.top, self.bottom):
                    ax.set_xlim(first - max(pad, 0.5), end + pad)
                self.top.set_ylim(e_lo, e_hi)
                self.bottom.set_ylim(n - 0.5, -0.5)
                self.canvas.draw()  # everything but the animated traces and heat map
                self._background = self.canvas.copy_from_bbox(self.fig.bbox)
                x0, y0, x1, y1 = self.legend.get_window_extent().extents
                self._legend = self.canvas.copy_from_bbox(Bbox.from_extents(x0 - 1, y0 - 1, x1 + 1, y1 + 1))
                self.frame = frame
            else:
                self.canvas.restore_region(self._background)
            self.bottom.draw_artist(self.image)
            self.top.draw_artist(self.lines)
            self.top.draw_artist(self.mean)
            self.canvas.restore_region(self._legend)  # the legend's box above the traces
            w, h = self.canvas.get_width_height()
            rgb = Image.frombuffer("RGBA", (w, h), self.canvas.buffer_rgba(), "raw", "RGBA", 0, 1).convert("RGB")
            buf = io.BytesIO()
            # 256 colours: a third of the bytes and of the encoding time of the RGBA picture; the class colours,
            # black and white stay within one level of 255, anti-aliased edges move by a few levels.
            rgb.quantize(256, method=Image.Quantize.FASTOCTREE).save(buf, format="png", compress_level=1)
        return buf.getvalue()


def fig_probabilities(probs: Sequence[float], names: Sequence[str], title: str = "p(y|x)") -> go.Figure:
    """Bar chart of class probabilities, the top class highlighted."""
    top = int(np.argmax(probs))
    colors = [COLORS[0] if i == top else "#9fbfdf" for i in range(len(probs))]
    fig = go.Figure(go.Bar(x=list(names), y=list(probs), marker_color=colors,
                           hovertemplate="%{x}: %{y:.4f}<extra></extra>"))
    fig.update_yaxes(range=[0, 1])
    fig.update_xaxes(type="category")
    return _layout(fig, title, "class", "probability", 260)


def fig_maps(maps: dict[str, Any], title: str, signed: dict[str, bool] | None = None, height: int = 260,
             fixed: dict[str, tuple[float, float]] | None = None) -> go.Figure:
    """Side-by-side heat maps of 2-D arrays (attribution maps, differences), image orientation, no axes.

    Signed maps use a diverging scale centred on 0 (red = raises the target, blue = lowers it); unsigned
    attributions a sequential scale from 0 (black) to their maximum (yellow), so they never look like the
    grey input; ``fixed[name]`` (e.g. ``(0, 1)`` for a picture) draws a map in grey over that range.
    """
    names = list(maps)
    fig = make_subplots(rows=1, cols=len(names), subplot_titles=names, horizontal_spacing=0.04)
    for i, name in enumerate(names, start=1):
        z = _np(maps[name])
        is_signed = (signed or {}).get(name, bool(np.nanmin(z) < 0))
        lim = float(np.nanmax(np.abs(z))) or 1.0
        if fixed and name in fixed:
            (lo, hi), scale = fixed[name], "Gray"
        elif is_signed:
            (lo, hi), scale = (-lim, lim), "RdBu_r"
        else:
            (lo, hi), scale = (0.0, lim), "Inferno"
        fig.add_heatmap(z=z, row=1, col=i, colorscale=scale, zmin=lo, zmax=hi, showscale=False,
                        hovertemplate="row %{y}, col %{x}: %{z:.3g}<extra></extra>")
        fig.update_yaxes(autorange="reversed", scaleanchor=f"x{i if i > 1 else ''}", visible=False, row=1, col=i)
        fig.update_xaxes(visible=False, row=1, col=i)
    fig.update_layout(title=title, height=height, margin=dict(l=10, r=10, t=60, b=10),
                      plot_bgcolor="rgba(0,0,0,0)")
    return fig


def fig_placement(scores: dict[str, tuple[Any, float, float]], title: str) -> go.Figure:
    """One panel per score: the reference set's histogram, the value of one input (solid line) and the
    threshold below which an input is called unusual (dashed). ``scores``: name -> (reference values, value,
    threshold)."""
    names = list(scores)
    fig = make_subplots(rows=1, cols=len(names), subplot_titles=names, horizontal_spacing=0.06)
    for i, name in enumerate(names, start=1):
        ref, v, thr = scores[name]
        ref = _np(ref)
        fig.add_histogram(x=ref, nbinsx=40, marker_color=COLORS[2], opacity=0.7, showlegend=i == 1,
                          name="test images", row=1, col=i)
        fig.add_vline(x=thr, line=dict(color="#7f7f7f", dash="dash"), row=1, col=i)
        fig.add_vline(x=v, line=dict(color=COLORS[3], width=3), row=1, col=i)
        lo, hi = float(min(ref.min(), v, thr)), float(max(ref.max(), v, thr))
        pad = 0.05 * (hi - lo or 1.0)
        fig.update_xaxes(range=[lo - pad, hi + pad], row=1, col=i)
    fig.add_scatter(x=[None], y=[None], mode="lines", line=dict(color=COLORS[3], width=3), name="this image")
    fig.add_scatter(x=[None], y=[None], mode="lines", line=dict(color="#7f7f7f", dash="dash"),
                    name="unusual below this line")
    return _layout(fig, title, "", "test images", 300)


def image_map(x: torch.Tensor) -> np.ndarray:
    """One image ``[C, H, W]`` in ``[-1, 1]`` as a 2-D array in ``[0, 1]`` for :func:`fig_maps` (grey)."""
    a = (x.detach().cpu().float().clamp(-1, 1) + 1) / 2
    return a.mean(0).numpy()


def difference_images(x_adv: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """``x_adv - x`` for display in ``[-1, 1]``, scaled so the largest change in the batch is full contrast."""
    d = (x_adv - x).detach().cpu()
    m = float(d.abs().max())
    return d / m if m > 0 else d
