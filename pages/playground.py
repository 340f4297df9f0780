"""2-D playground: a JEM and a baseline trained on the same 2-D points with the same seed, side by side:
decision regions with the data, the density p(x) normalised by quadrature (its log is the energy, shifted;
the energy surface on request), replay-buffer particles and fresh SGLD chains with trails, and exact numbers
over training time. The page opens on its result; the data and training settings wait in a closed expander
whose title states them.

Widgets -> :class:`jem_core.toy.ToyTrainer` (``apply`` settings, ``train`` a few guarded iterations per
tick of an ``st.fragment``, ``advance_chains``, ``measure``) -> plotly figures. The trained pair the page
opens with is trained once per server, in the background from the server's first run on
(:func:`app.registry.toy_pair`, :func:`app.registry.warm_up`), and copied into each session; per-session
memory is bounded by the trainer (capped history and trails).

What does not live here: training and every exact quantity (:mod:`jem_core.toy`).
"""

from __future__ import annotations

import hashlib
import math
import tempfile
import time
from pathlib import Path

import numpy as np
import plotly.graph_objects as go
import streamlit as st
import torch

from app import ui
from jem_core.data import DataUnavailableError
from jem_core.errors import BadInput
from jem_core.toy import (DIVERGE_PRESET, TOY_DATASETS, ToySettings, ToyTrainer, ais_log_z, histogram_distance,
                          load_toy)

STATE = "pg_state"             # session_state: {"jem", "base", "running", "spec", "seed", "grids"}
PROBLEM = "pg_problem"         # session_state: why the last upload, Reset or Trained pair could not be used
DEFAULT_SPEC = "toy:moons"
ITERS_PER_TICK = 10            # training iterations per model per tick (and per Step)
TICK_BUDGET_S = 0.25           # ... or fewer, when they take longer than this
CHAIN_STEPS = 5                # SGLD steps of the display chains per tick
RESOLUTION = 64                # display / measurement grid (the error of log Z is stated)
STEP_SIZES = [1e-4, 3e-4, 1e-3, 3e-3, 1e-2, 3e-2, 0.1, 0.3, 1.0, 3.0, 10.0]
NOISES = [0.0, 0.001, 0.003, 0.01, 0.03, 0.1]
PX_WEIGHTS = [0.0, 0.1, 0.3, 1.0, 3.0, 10.0]
LRS = [1e-4, 3e-4, 1e-3, 3e-3, 1e-2, 3e-2]
DATA_NOISES = sorted({0.0, 0.02, 0.04, 0.08, 0.12, 0.2, *(v[0] for v in TOY_DATASETS.values())})
KEYS = {"sgld_steps": "pg_steps", "step_size": "pg_step_size", "noise": "pg_noise", "exact_langevin": "pg_exact",
        "px_weight": "pg_px", "lr": "pg_lr", "clamp": "pg_clamp"}


# ------------------------------------------------------------------------------------ state
def settings_from_widgets() -> ToySettings:
    ss = st.session_state
    d = ToySettings()
    return ToySettings(**{f: type(getattr(d, f))(ss.get(k, getattr(d, f))) for f, k in KEYS.items()})


def set_widgets(s: ToySettings) -> None:
    for f, k in KEYS.items():
        st.session_state[k] = getattr(s, f)


DATA_OPTIONS = list(TOY_DATASETS) + ["csv"]  # the data picker's choices, labelled by data_label
LABELS_PER_CLASS = ["all", 1, 3, 10, 30]


def data_label(name: str) -> str:
    return "your CSV (upload)" if name == "csv" else f"toy:{name}"


def data_spec() -> str:
    ss = st.session_state
    name = ui.chosen("pg_data", DATA_OPTIONS, data_label)  # read by callbacks too, before the picker is drawn
    if name == "csv":
        return ss.get("pg_csv_spec") or DEFAULT_SPEC
    return ui.toy_spec(name, ss.get("pg_noise_data"), ss.get("pg_n", 2000), ss.get("pg_k", 3))


def load_pair(fresh: bool) -> None:
    """The session's pair: trained (a clone of the shared one) or fresh (iteration 0) for the chosen data."""
    ss = st.session_state
    spec, seed = data_spec(), int(ss.get("pg_seed", 0))
    per_class = ui.chosen("pg_labels", LABELS_PER_CLASS)
    labels = None if per_class == "all" else int(per_class)
    if fresh:
        jem = ToyTrainer(spec, "jem", seed, settings_from_widgets(), labels_per_class=labels)
        base = ToyTrainer(spec, "baseline", seed, settings_from_widgets(), labels_per_class=labels,
                          data=(jem.trainer.train_set, jem.trainer.test_set))
        for t in (jem, base):
            t.measure(RESOLUTION)
    else:
        with st.spinner("Training a JEM and a baseline on the 2-D points (a few seconds, once per server)..."):
            shared = ui.toy_pair_for_visit(spec, seed, labels)
        jem, base = shared[0].clone(), shared[1].clone()
        set_widgets(jem.settings)
    ss[STATE] = {"jem": jem, "base": base, "running": False, "spec": spec, "seed": seed, "labels": labels,
                 "grids": {}, "stored": None if fresh else getattr(shared, "stored", None)}


def load_or_explain(fresh: bool) -> None:
    """:func:`load_pair` for Reset and Trained pair; data that cannot be used leaves the pair shown as it was and
    says why (the message is shown under the settings)."""
    ss = st.session_state
    if ss.get("pg_data") == "csv" and not ss.get("pg_csv_spec"):
        ss[PROBLEM] = "No usable CSV is uploaded: upload one (x1, x2, label per row) or choose a toy data set."
        return
    try:
        load_pair(fresh)
    except (BadInput, DataUnavailableError) as e:
        ss[PROBLEM] = f"These data cannot be used, so the pair shown is unchanged: {e}"


def on_reset() -> None:
    load_or_explain(fresh=True)


def on_trained() -> None:
    load_or_explain(fresh=False)


def on_run(running: bool) -> None:
    st.session_state[STATE]["running"] = running


def on_preset(diverge: bool) -> None:
    set_widgets(DIVERGE_PRESET if diverge else ToySettings())


def on_step() -> None:
    s = st.session_state[STATE]
    s["running"] = False
    train_tick(s, budget=math.inf)


def on_ais() -> None:
    s = st.session_state[STATE]
    for name in ("jem", "base"):
        t: ToyTrainer = s[name]
        est = ais_log_z(t.model, n_temps=100, n_chains=64, seed=t.iteration)
        if est is not None and t.history:
            t.history[-1]["ais_log_z"], t.history[-1]["ais_se"] = est


def on_upload() -> None:
    f = st.session_state.get("pg_upload")
    if f is None:
        return
    data = f.getvalue()
    path = Path(tempfile.gettempdir()) / f"jem_toy_{hashlib.sha256(data).hexdigest()[:16]}.csv"
    path.write_bytes(data)
    spec = f"toy:csv:{path}"
    try:  # read it now, so that a file that cannot be used is named at once, not at the next Reset
        load_toy(spec, "train")
    except (BadInput, DataUnavailableError) as e:
        st.session_state.pop("pg_csv_spec", None)
        st.session_state[PROBLEM] = f"{f.name} cannot be used: {str(e).replace(str(path), f.name)}"
        return
    st.session_state["pg_csv_spec"] = spec


# ------------------------------------------------------------------------------------ computing
def train_tick(s: dict, budget: float = TICK_BUDGET_S) -> None:
    """Train both models a few iterations (with the widgets' settings), then measure them."""
    cfg = settings_from_widgets()
    pair = (s["jem"], s["base"])
    for t in pair:
        t.apply(cfg)
    t0 = time.perf_counter()
    for _ in range(ITERS_PER_TICK):  # interleaved, so both models see the same number of iterations
        if sum(t.train(1) for t in pair) == 0 or time.perf_counter() - t0 > budget:
            break
    for name, t in zip(("jem", "base"), pair):
        _, grid = t.measure(RESOLUTION)
        s["grids"][name] = (t.iteration, grid)


def grid_of(s: dict, name: str):
    t: ToyTrainer = s[name]
    hit = s["grids"].get(name)
    if hit is None or hit[0] != t.iteration:
        from jem_core.toy import density_grid

        hit = (t.iteration, density_grid(t.model, RESOLUTION))
        s["grids"][name] = hit
    return hit[1]


# ------------------------------------------------------------------------------------ figures
def _square(fig: go.Figure, title: str, height: int = 340) -> go.Figure:
    fig.update_layout(title=title, height=height, margin=dict(l=10, r=10, t=40, b=10), showlegend=False)
    fig.update_xaxes(range=[-1, 1], constrain="domain")
    fig.update_yaxes(range=[-1, 1], scaleanchor="x", scaleratio=1)
    return fig


def fig_regions(t: ToyTrainer, grid) -> go.Figure:
    k = grid.probs.shape[-1]
    pred = grid.probs.argmax(-1)
    conf = grid.probs.max(-1)
    colors = ui.CLASS_COLORS
    scale = [[i / max(1, k - 1), colors[i % len(colors)]] for i in range(k)] if k > 1 else [[0, colors[0]], [1, colors[0]]]
    xs = np.asarray(grid.xs, np.float32)  # float32 and int8 arrays: plotly sends them as compact binary
    fig = go.Figure(go.Heatmap(x=xs, y=xs, z=np.asarray(pred, np.int8), zmin=0, zmax=k - 1, colorscale=scale,
                               opacity=0.35, showscale=False, customdata=np.round(np.asarray(conf), 2),
                               hovertemplate="class %{z}, p(y|x) %{customdata:.2f}<extra></extra>"))
    fig.add_contour(x=xs, y=xs, z=np.asarray(conf, np.float32), contours=dict(start=0.6, end=0.9, size=0.3,
                    coloring="none"), line=dict(width=1, color="#444"), showscale=False, hoverinfo="skip")
    test = t.trainer.test_set
    p = test.x.reshape(-1, 2).numpy()
    fig.add_scatter(x=p[:, 0], y=p[:, 1], mode="markers", hoverinfo="skip",
                    marker=dict(size=4, color=[colors[int(c) % len(colors)] for c in test.y], line=dict(width=0.5, color="white")))
    return _square(fig, "p(y|x): regions (lines at 0.6 and 0.9) and test points")


def fig_density(t: ToyTrainer, grid, log_scale: bool) -> go.Figure:
    z = grid.log_p if log_scale else np.exp(grid.log_p)
    zmin = float(np.percentile(z, 2)) if log_scale else 0.0
    xs = np.asarray(grid.xs, np.float32)
    # One trace: the density as a heatmap with its contour lines (one float32 array sent, not two)
    fig = go.Figure(go.Contour(x=xs, y=xs, z=np.asarray(z, np.float32), zmin=zmin, zmax=float(np.max(z)),
                               colorscale="Viridis", showscale=False, ncontours=8,
                               contours=dict(coloring="heatmap"), line=dict(width=1, color="rgba(255,255,255,0.6)"),
                               hovertemplate=("log p(x) %{z:.2f} nats" if log_scale else "p(x) %{z:.3g}")
                               + "<extra></extra>"))
    buf = t.buffer_points(300)
    if buf is not None:
        b = buf.numpy()
        fig.add_scatter(x=b[:, 0], y=b[:, 1], mode="markers", marker=dict(size=3, color="rgba(255,255,255,0.7)"),
                        hoverinfo="skip", name="replay buffer")
    if t.trail:
        trail = torch.stack(list(t.trail))  # [T, n, 2]
        xs, ys = [], []
        for i in range(trail.shape[1]):
            xs += trail[:, i, 0].tolist() + [None]
            ys += trail[:, i, 1].tolist() + [None]
        fig.add_scatter(x=xs, y=ys, mode="lines", line=dict(width=1, color="rgba(255,80,80,0.7)"), hoverinfo="skip")
        last = trail[-1].numpy()
        fig.add_scatter(x=last[:, 0], y=last[:, 1], mode="markers", marker=dict(size=6, color="#ff4b4b"),
                        hoverinfo="skip", name="SGLD chains")
    return _square(fig, f"{'log ' if log_scale else ''}p(x), log Z = {grid.log_z:.3f} ± {grid.log_z_error:.1e}")


def fig_energy_surface(grid) -> go.Figure:
    fig = go.Figure(go.Surface(x=grid.xs, y=grid.xs, z=grid.energy, colorscale="RdBu_r", showscale=False))
    fig.update_layout(title="E(x) = -logsumexp f(x), surface", height=340, margin=dict(l=0, r=0, t=40, b=0),
                      scene=dict(xaxis_title="x1", yaxis_title="x2", zaxis_title="E"))
    return fig


#: The training histories, one panel each: (history key, panel title).
HISTORY_PANELS = [("accuracy", "Test accuracy"), ("test_log_px", "Exact test log p(x) (nats)"),
                  ("log_z", "log Z: quadrature (line), AIS ± 2 SE (x)"), ("ece", "ECE (15 bins)"),
                  ("gap", "E(data) - E(samples), JEM")]


def fig_histories(jem: ToyTrainer, base: ToyTrainer) -> go.Figure:
    """Every training history of the pair in one figure, one panel per quantity (one chart for the browser to
    draw instead of five), against the iteration."""
    from plotly.subplots import make_subplots

    fig = make_subplots(rows=1, cols=len(HISTORY_PANELS), subplot_titles=[t for _, t in HISTORY_PANELS],
                        horizontal_spacing=0.05)
    for col, (key, _) in enumerate(HISTORY_PANELS, start=1):
        for i, (name, t) in enumerate((("JEM", jem), ("baseline", base))):
            h = t.history
            fig.add_scatter(x=[r["iteration"] for r in h], y=[r[key] for r in h], name=name, mode="lines",
                            line=dict(color=ui.COLORS[i]), legendgroup=name, showlegend=col == 1, row=1, col=col)
            pts = [r for r in h if "ais_log_z" in r] if key == "log_z" else []
            if pts:
                fig.add_scatter(x=[r["iteration"] for r in pts], y=[r["ais_log_z"] for r in pts], mode="markers",
                                name=f"{name} AIS ± 2 SE", marker=dict(color=ui.COLORS[i], symbol="x", size=9),
                                error_y=dict(type="data", array=[2 * r["ais_se"] for r in pts]), row=1, col=col)
        fig.update_xaxes(title_text="iteration", row=1, col=col)
    fig.update_layout(height=300, margin=dict(l=10, r=10, t=40, b=10), legend=dict(orientation="h", y=-0.35))
    fig.update_annotations(font_size=12)
    return fig


# ------------------------------------------------------------------------------------ page
def settings_label(cfg: ToySettings) -> str:
    """The settings expander's title: what the sliders inside are set to, readable while it is closed."""
    noise = "exact Langevin" if cfg.exact_langevin else f"noise std {cfg.noise:g}"
    return (f"Data and settings: {cfg.sgld_steps} SGLD steps of size {cfg.step_size:g} ({noise}), p(x) weight "
            f"{cfg.px_weight:g}, learning rate {cfg.lr:g}, {'clamped to the box' if cfg.clamp else 'not clamped'}")


def controls(s: dict) -> None:
    """The data and training settings, in an expander that opens on a click: closed, it costs a browser little
    to lay out, while these twelve sliders and boxes on show delayed the page's first metric from 3.2 to 10.3 s
    in a Chromium slowed 4x (``bench/page_cost.py``, medians of three loads)."""
    semi = "all labels" if s.get("labels") is None else f"{s['labels']} labels per class (semi-supervised)"
    st.caption(f"Showing `{s['spec']}`, seed {s['seed']}, {semi}: points in the box [-1, 1]^2 (20% held out as the "
               "test set). New data, seed or labels apply on **Reset** (untrained) or **Trained pair** (trained once "
               "per server).")
    with st.expander(settings_label(settings_from_widgets()), key="pg_settings", icon=":material/tune:"):
        data_controls()
        sampler_controls()
    if PROBLEM in st.session_state:  # outside the expander: seen even when it is closed
        st.error(st.session_state.pop(PROBLEM))


def data_controls() -> None:
    a, b, c, e, l = st.columns(5)
    name = a.selectbox("Data", DATA_OPTIONS, key="pg_data", **ui.PERSIST, format_func=data_label,
                       help="applies on Reset or Trained pair")
    if name == "csv":
        b.file_uploader("CSV: x1, x2, label per row", type=["csv", "txt"], key="pg_upload", on_change=on_upload)
    else:
        b.select_slider("Data noise (box units)", DATA_NOISES, value=TOY_DATASETS[name][0],
                        key="pg_noise_data", **ui.PERSIST)
        if name == "spirals":
            b.slider("Arms", 2, 8, 3, key="pg_k", **ui.PERSIST)
    c.select_slider("Points", [200, 500, 1000, 2000, 5000], value=2000, key="pg_n", **ui.PERSIST)
    e.number_input("Seed (both models)", 0, 10_000, 0, key="pg_seed", **ui.PERSIST)
    l.selectbox("Labels per class", LABELS_PER_CLASS, key="pg_labels", **ui.PERSIST,
                help="semi-supervised: cross-entropy sees this many labelled points per class (both models); "
                     "JEM's p(x) term sees every point")


def sampler_controls() -> None:
    f, g, h, j, k = st.columns(5)
    i, m, _ = st.columns(3)
    f.slider("SGLD steps / iteration", 0, 60, key=KEYS["sgld_steps"], **ui.PERSIST)
    exact = i.toggle("Exact Langevin", key=KEYS["exact_langevin"], **ui.PERSIST,
                     help="noise std = sqrt(step size), gradient step = step size / 2: samples p(x) for small steps")
    g.select_slider("SGLD step size", STEP_SIZES, key=KEYS["step_size"], **ui.PERSIST)
    h.select_slider("SGLD noise std", NOISES, key=KEYS["noise"], disabled=exact, **ui.PERSIST)
    j.select_slider("p(x) weight", PX_WEIGHTS, key=KEYS["px_weight"], **ui.PERSIST)
    k.select_slider("Learning rate", LRS, key=KEYS["lr"], **ui.PERSIST)
    m.toggle("Clamp to box", key=KEYS["clamp"], **ui.PERSIST,
             help="clamp chains (and noisy data) to [-1, 1]^2 after every step")


def buttons(s: dict) -> None:
    cols = [*st.columns(4), *st.columns(4)]  # two rows: every label stays whole at 1280 px
    running = s["running"]
    if running:
        cols[0].button("Pause", key="pg_pause", on_click=on_run, args=(False,), type="primary")
    else:
        cols[0].button("Train", key="pg_train", on_click=on_run, args=(True,), type="primary")
    cols[1].button("Step", key="pg_step", on_click=on_step, help=f"{ITERS_PER_TICK} iterations of both models")
    cols[2].button("Reset", key="pg_reset", on_click=on_reset, help="untrained models on the chosen data and seed")
    cols[3].button("Trained pair", key="pg_trained", on_click=on_trained,
                   help=f"{ui.TOY_PRETRAIN_ITERS} iterations on the chosen data and seed, computed once per server")
    cols[4].button("Make it diverge", key="pg_diverge", on_click=on_preset, args=(True,),
                   help="p(x) weight 10, JEM's image sampler (step 1, noise 0.01), no clamping")
    cols[5].button("Stable defaults", key="pg_defaults", on_click=on_preset, args=(False,))
    cols[6].button("AIS estimate", key="pg_ais", on_click=on_ais,
                   help="log Z by annealed importance sampling (100 temperatures, 64 chains) beside the quadrature")
    cols[7].toggle("log p(x)", key="pg_log", **ui.PERSIST)
    st.toggle("Energy surface (3-D)", key="pg_3d", **ui.PERSIST,
              help="log p(x) = -E(x) - log Z, so the log p(x) map already shows the energy, shifted and "
                   "with its sign flipped; this adds E(x) as a 3-D surface per model")


def live_view(s: dict) -> None:
    jem, base = s["jem"], s["base"]
    if s["running"]:
        train_tick(s)
        if jem.diverged or base.diverged:  # the pair stops together, so both stay at the same iteration
            s["running"] = False
    for t in (jem, base):
        t.advance_chains(CHAIN_STEPS)
    hj, hb = jem.history[-1], base.history[-1]
    cols = [*st.columns(4), *st.columns(4)]  # two rows of figures: every value stays whole at 1280 px
    cols[0].metric("Iteration", jem.iteration)
    cols[1].metric("JEM test accuracy", f"{hj['accuracy']:.3f}")
    cols[2].metric("Baseline test accuracy", f"{hb['accuracy']:.3f}")
    cols[3].metric("JEM test log p(x)", f"{hj['test_log_px']:.3f}", help="exact, nats per point; uniform on the box: -1.386")
    cols[4].metric("Baseline test log p(x)", f"{hb['test_log_px']:.3f}")
    cols[5].metric("JEM ECE", f"{hj['ece']:.3f}")
    cols[6].metric("E(data) - E(samples)", "n/a" if math.isnan(hj["gap"]) else f"{hj['gap']:.3f}")
    cols[7].metric("Guard roll-backs", len(jem.events))
    if jem.diverged:
        st.error(f"JEM: the divergence guard gave up: {jem.diverged} Press **Reset** or **Trained pair**.")
    elif jem.events:
        st.warning(f"JEM: {len(jem.events)} divergence roll-back(s); last: {jem.events[-1]['reason']} (learning rate "
                   f"now x{jem.trainer.lr_scale:g}). The guard restored the last good state each time.")
    log_scale, surface = bool(st.session_state.get("pg_log", True)), bool(st.session_state.get("pg_3d", False))
    left, right = st.columns(2)
    for col, (title, t, key) in zip((left, right), (("JEM", jem, "jem"), ("Baseline (cross-entropy only)", base, "base"))):
        grid = grid_of(s, key)
        with col:
            st.markdown(f"**{title}**")
            ui.show_chart(fig_regions(t, grid), key=f"pg_regions_{key}")
            ui.show_chart(fig_density(t, grid, log_scale), key=f"pg_density_{key}")
            if surface:
                ui.show_chart(fig_energy_surface(grid), key=f"pg_energy_{key}")
            buf = t.buffer_points(2000)
            tv = histogram_distance(torch.stack(list(t.trail))[-1], grid, 8) if t.trail else math.nan
            st.caption(f"Histogram distance (TV, 8x8 bins) to p(x): live chains {tv:.2f}"
                       + (f", replay buffer {histogram_distance(buf, grid, 8):.2f}" if buf is not None else
                          " (no replay buffer: the baseline never samples)")
                       + f". Grid {RESOLUTION}x{RESOLUTION}; log Z error {grid.log_z_error:.1e} nats.")
    ui.show_chart(fig_histories(jem, base), key="pg_histories")
    stored = s.get("stored")
    st.caption("E(data) - E(samples) is the JEM's mean over its last 25 iterations (the baseline draws no samples)."
               + (f" The trained pair's first {ui.TOY_PRETRAIN_ITERS} iterations were read from a stored file "
                  f"(`{Path(stored['file']).name}`, trained {stored['computed']} with torch {stored['torch']}) "
                  "instead of trained on this server: the same code, data and seed." if stored else ""))


def main(ctx: ui.Context | None) -> None:
    """The page under :func:`app.ui.run_page`. ``ctx`` (the sidebar's models) is not used: the playground trains
    its own pair of 2-D models, and works with no model loaded."""
    ss = st.session_state
    for k, v in [*((KEYS[f], getattr(ToySettings(), f)) for f in KEYS), ("pg_log", True), ("pg_3d", False)]:
        ss.setdefault(k, v)
    if STATE not in ss:
        load_pair(fresh=False)
    s = ss[STATE]
    controls(s)
    buttons(s)
    st.caption("What to watch: the JEM's p(x) (second row) follows the data while the baseline's logsumexp "
               "spreads mass where there is none (compare the exact test log p(x)); red dots are fresh SGLD chains "
               "with trails, white dots the replay buffer; the log p(x) map is the energy map, since log p(x) = "
               "-E(x) - log Z. Exact Langevin with a small step samples p(x); JEM's image "
               "setting (step 1, noise 0.01) overshoots in 2-D and piles particles on the walls. **Make it diverge** "
               "then **Train**: the guard rolls back and halves the learning rate, then gives up.")

    @st.fragment(run_every=ui.LIVE_INTERVAL if s["running"] else None)
    def live() -> None:
        was = s["running"]
        live_view(s)
        if was and not s["running"]:
            st.rerun()

    live()


ui.run_page(main, "2-D playground", "One network is both a classifier and a density: in two dimensions both fit "
            "on one screen and p(x) is exact (log Z by quadrature on a grid over the box).", needs_model=False)
