"""Langevin chains: live SGLD chains from the model's energy, in-painting and class translation.

Widgets -> :class:`jem_core.sampling.ChainState` / :class:`~jem_core.sampling.SGLDSampler` -> image grids
and the chains' traces (one picture while they run, plotly figures at rest). The live chains advance ``k``
steps per tick of an ``st.fragment``; the chain state is per user (``st.session_state``).

What does not live here: the sampler, the chains and the health checks (``jem_core.sampling``,
``jem_core.sampler_health``), in-painting and translation (``jem_core.generation``), image grids and figures
(``app/ui.py``, ``app/figures.py``).
"""

from __future__ import annotations

import math
import time
from typing import Any, Callable

import streamlit as st
import torch

from app import share, ui
from jem_core.generation import chain_starts, class_translation, inpaint, source_images
from jem_core.sampler_health import chain_health, sampler_settings_health
from jem_core.sampling import MASK_KINDS, ChainState, SGLDSampler

STEP_SIZES = [0.0001, 0.0003, 0.001, 0.003, 0.01, 0.03, 0.1, 0.3, 1.0, 2.0]
NOISES = [0.0, 0.001, 0.003, 0.005, 0.01, 0.02, 0.05, 0.1]
MAX_UPDATES = ["off", 0.01, 0.02, 0.05, 0.1, 0.2]
INITS = {"noise": "uniform noise", "buffer": "replay buffer", "test": "test data"}
LIVE = "lg_live"          # session_state: the live chains
INPAINT = "lg_inpaint"    # session_state: the last in-painting result
TRANSLATE = "lg_translate"
STEP_BUDGET_S = ui.CHAIN_INTERVAL / 2  # seconds of SGLD per refresh in adaptive mode, one refresh every CHAIN_INTERVAL
HISTORY_POINTS = 400        # energies and predictions kept per chain (older ones thinned)
TRACES_INTERVAL = 1.0       # seconds between redraws of the traces, one live session (more: ui.live_interval)
MAX_STEPS_PER_REFRESH = 50
STARVED_S = 2.0  # every worker busy this long: one SGLD step outside them per STARVED_S, so the view never freezes
#: A view whose last tick found no free worker waits at most this fraction of its refresh interval for one at its
#: next tick: views whose timers tick in step with other sessions' would otherwise lose the race for a worker tick
#: after tick (``bench/load.py`` with 4 chain sessions, ``bench/README.md`` runs 24-25: one at 0.88 refreshes/s, the
#: others at 1.28-1.43, without it; all four at 1.19-1.45 with it).
PATIENCE = 0.5
SETTINGS_CHECKS = {"exact_step"}  # findings about the settings alone, shown under the settings
AUTOSTARTED = "lg_autostarted"  # session_state: the model whose chains started by themselves


def sgld_settings() -> None:
    """The sampler settings shared by the three tools (read back through session_state)."""
    with st.expander("SGLD settings (all tools)", expanded=True):
        a, b, c, d, e = st.columns([1.4, 1, 1, 1.2, 0.9])  # wide enough for the toggle labels at 1280 px
        exact = a.toggle("Exact Langevin", key="lg_exact", help="noise std = sqrt(step size), gradient step "
                         "= step size / 2: the Langevin equation itself (use a small step size, e.g. 0.001)",
                         **ui.PERSIST)
        step = b.select_slider("Step size", STEP_SIZES, value=1.0, key="lg_step_size", **ui.PERSIST)
        if exact:  # the noise is not a free setting then: show the one in use
            c.metric("Noise std (exact Langevin)", f"{math.sqrt(step):.3g}", help="sqrt(step size): the Langevin "
                     "equation ties the noise to the step; turn exact Langevin off to set it", border=False)
        else:
            c.select_slider("Noise std", NOISES, value=0.01, key="lg_noise", **ui.PERSIST)
        d.select_slider("Max update per pixel", MAX_UPDATES, value="off", key="lg_max_update",
                        help="clip every pixel's update (JEM++ stabiliser); samples are always clamped to [-1, 1]",
                        **ui.PERSIST)
        e.number_input("Seed", 0, 10_000, 0, key="lg_seed", **ui.PERSIST)


def make_sampler(ctx: ui.Context, generator: torch.Generator) -> SGLDSampler:
    ss = st.session_state
    mu = ss.get("lg_max_update", "off")
    return SGLDSampler(ctx.model.model, float(ss.get("lg_step_size", 1.0)), float(ss.get("lg_noise", 0.01)),
                       exact_langevin=bool(ss.get("lg_exact", False)), clamp=True,
                       max_update=None if mu == "off" else float(mu), generator=generator)


def show_health(chain: ChainState | None, sampler: SGLDSampler, ctx: ui.Context) -> None:
    """The sampler-health findings for these chains (nothing when they look healthy); the findings about the
    settings alone are shown once, under the settings (:func:`settings_health`)."""
    findings = chain_health(None if chain is None else chain.last_report, sampler.step_size, sampler.noise_std,
                            sampler.exact_langevin, ctx.model.metadata.get("reference"))
    for f in findings:
        if f.check in SETTINGS_CHECKS:
            continue
        (st.error if f.level == "error" else st.warning)(f"**Sampler health ({f.check}).** {f.message}")


def settings_health() -> None:
    """Warnings about the sampler settings themselves, right under them (before any chain runs)."""
    ss = st.session_state
    for f in sampler_settings_health(float(ss.get("lg_step_size", 1.0)), bool(ss.get("lg_exact", False))):
        st.warning(f"**Sampler health ({f.check}).** {f.message}")


def class_options(ctx: ui.Context, unconditional: bool) -> tuple[list[Any], Callable[[Any], str]]:
    """The options of a class picker (``"unconditional"`` first when allowed, then class indices) and their labels."""
    names = ctx.class_names
    return ((["unconditional"] if unconditional else []) + list(range(len(names))),
            lambda o: o if isinstance(o, str) else f"class {names[o]}")


def class_choice(ctx: ui.Context, label: str, key: str, unconditional: bool, default: int = 0) -> int | None:
    options, labels = class_options(ctx, unconditional)
    v = st.selectbox(label, options, index=min(default, len(options) - 1), key=key, format_func=labels, **ui.PERSIST)
    return None if isinstance(v, str) else int(v)


def start_options(ctx: ui.Context) -> list[str]:
    """Where chains may start (keys of :data:`INITS`): the replay buffer first when the model has one (chains
    from it show the model's own samples at once), test images when they load, noise."""
    return (["buffer"] if ctx.model.replay_buffer is not None else []) + \
           (["test"] if ctx.test_set() is not None else []) + ["noise"]


# ------------------------------------------------------------------------------------ live chains
def start_chains() -> None:
    ctx = ui.context()
    if ctx is None:
        return
    ss = st.session_state
    # A callback runs before the widgets are drawn: their values are read as the widgets hold them (ui.chosen).
    n, init = int(ss["lg_n"]), ui.chosen("lg_init", start_options(ctx), INITS.get)
    label = ui.chosen("lg_class", *class_options(ctx, unconditional=True))
    g = torch.Generator().manual_seed(int(ss.get("lg_seed", 0)))
    test = ctx.test_set() if init == "test" else None
    x, _ = chain_starts(ctx.model, n, "data" if init == "test" else init, g, data=None if test is None else test.x)
    y = None if label in (None, "unconditional") else torch.full((n,), int(label), dtype=torch.long)
    ss[LIVE] = {"chain": ChainState(x=x, y=y, max_history=HISTORY_POINTS), "gen": g, "running": True, "model": ctx.key,
                "init": INITS[init], "label": None if y is None else int(label), "advanced": time.monotonic()}


def pause_chains() -> None:
    if LIVE in st.session_state:
        st.session_state[LIVE]["running"] = False


def resume_chains() -> None:
    if LIVE in st.session_state:
        st.session_state[LIVE]["running"] = True
        st.session_state[LIVE]["advanced"] = time.monotonic()


def reset_chains() -> None:
    st.session_state.pop(LIVE, None)


def intervals(s: dict, live: int) -> tuple[float, float]:
    """(seconds between redraws of the traces, seconds between refreshes of the pictures) of the live chains ``s``
    with ``live`` sessions' chains running, given the intervals in use (see ``ui.live_interval`` and
    ``ui.refresh_interval``)."""
    return (ui.live_interval(TRACES_INTERVAL, live, s.get("traces_every")),
            ui.refresh_interval(ui.CHAIN_INTERVAL, live, s.get("every")))


def live_view(ctx: ui.Context) -> None:
    """One tick: advance the running chains by k steps, then draw grid, energies and predictions."""
    ss = st.session_state
    s = ss.get(LIVE)
    if s is None:
        st.info("Press **Start** to run SGLD chains again; the grid and the traces update live.")
        show_health(None, make_sampler(ctx, torch.Generator()), ctx)
        return
    chain: ChainState = s["chain"]
    target = int(ss.get("lg_steps", 200))
    if s["running"]:
        auto = bool(ss.get("lg_auto_k", True))
        k = min(int(s.get("k_auto") or ss.get("lg_every", 10)) if auto else int(ss.get("lg_every", 10)),
                target - chain.steps)
        share, live = ui.live_share(ui.current_session_id(), STEP_BUDGET_S / ui.CHAIN_INTERVAL)
        s["share"], s["live"] = share, live
        if intervals(s, live) != (s.get("traces_every", TRACES_INTERVAL), s.get("every", ui.CHAIN_INTERVAL)):
            st.rerun()  # a full rerun gives the fragments' timers their new intervals
        # A longer interval between refreshes (more sessions live): as many more steps per refresh.
        budget = STEP_BUDGET_S * s.get("every", ui.CHAIN_INTERVAL) / ui.CHAIN_INTERVAL
        if k > 0:
            patience = PATIENCE * s.get("every", ui.CHAIN_INTERVAL) if s.get("waited") else False
            with ui.worker("live chains", wait=patience) as free:
                # When every worker is busy, a refresh only redraws; after STARVED_S of that, one step outside the
                # workers (a few ms of a core per STARVED_S): the view slows, never freezes.
                if free or time.monotonic() - s.get("advanced", 0.0) >= STARVED_S:
                    t0 = time.perf_counter()
                    chain.advance(make_sampler(ctx, s["gen"]), k if free else 1, every=1)
                    s["advanced"] = time.monotonic()
                    if free:
                        per_step = (time.perf_counter() - t0) / k
                        s["per_step"] = per_step if "per_step" not in s else 0.7 * s["per_step"] + 0.3 * per_step
                        # Next refresh: as many steps as fit in this session's share of the compute budget.
                        s["k_auto"] = max(1, min(MAX_STEPS_PER_REFRESH, int(share * budget / s["per_step"])))
                s["waited"] = not free
        if chain.steps >= target:
            s["running"] = False
            st.rerun()  # a full rerun stops the timer and updates the buttons
    what = "E(x)" if s["label"] is None else f"E(x, y={ctx.class_names[s['label']]})"
    a, b, c = st.columns(3)
    if chain.steps <= target:  # the target in the label: "1160 / 2000" did not fit the column at 1280 px
        a.metric(f"SGLD steps done (of {target})", f"{chain.steps}")
    else:  # the target was lowered below the steps already done
        a.metric("SGLD steps done", f"{chain.steps}", help=f"past the target of {target} steps set since")
    mean_e = float(chain.energy_history[-1].mean()) if chain.energy_history else float("nan")
    b.metric(f"Mean energy {what}", f"{mean_e:.3f}")
    c.metric("Status", "running" if s["running"] else ("finished" if chain.steps >= target else "paused"))
    n = chain.x.shape[0]
    caption = f"{n} chain{'s' if n != 1 else ''} from {s['init']}, {what}, after {chain.steps} steps"
    if s["running"]:  # one picture per refresh; the PNG download is offered once the chains rest
        st.image(ui.grid(chain.x), caption=caption)
    else:
        ui.show_grid(chain.x, caption, key="lg_grid", file_name=f"{ctx.name}_chains_step{chain.steps}.png")
    sampler = make_sampler(ctx, s["gen"])
    show_health(chain, sampler, ctx)
    every = s.get("every", ui.CHAIN_INTERVAL)
    steps_per_refresh = s.get("k_auto", 1) if ss.get("lg_auto_k", True) else int(ss.get("lg_every", 10))
    speed = (f" Measured here: {s['per_step'] * 1000:.0f} ms per SGLD step of {chain.x.shape[0]} chains, so "
             f"{steps_per_refresh} step{'s' if steps_per_refresh != 1 else ''} per "
             f"refresh (one refresh every {every:g} s)." if "per_step" in s else "")
    shared = []  # what this view gives up while other sessions' chains run too
    if every > ui.CHAIN_INTERVAL:
        shared.append(f"refreshes every {every:g} s instead of every {ui.CHAIN_INTERVAL:g} s")
    if s.get("share", 1.0) < 1.0 and ss.get("lg_auto_k", True):
        duty = STEP_BUDGET_S / ui.CHAIN_INTERVAL
        shared.append(f"runs SGLD {s['share'] * duty * 1000:.0f} ms of each second instead of {duty * 1000:.0f} ms")
    if shared and s["running"]:
        st.caption(f":hourglass: {s.get('live', 1)} sessions run live chains on this server: each "
                   + " and ".join(shared) + ", so that pages and other computations still find a free core.")
    if s.get("waited"):
        st.caption(f":hourglass: At this refresh every worker of this server was busy with other computations: "
                   f"while they all stay busy, the chains take one SGLD step every {STARVED_S:g} s, and they go on at "
                   "their full speed by themselves once one is free.")
    st.caption(sampler.describe() + "." + speed + " The chains advance only while this browser tab is visible: "
               "browsers slow down the timers of background tabs, and the chains wait with them (nothing runs on "
               "the server meanwhile).")


def traces_view(ctx: ui.Context) -> None:
    """The chains' energies and predictions over steps: while the chains run, one picture redrawn every few
    seconds (redrawing two plotly figures cost a browser more than all its picture refreshes in between:
    ``bench/README.md``); at rest, the interactive plotly figures."""
    s = st.session_state.get(LIVE)
    if s is None or not s["chain"].step_history:
        return
    chain: ChainState = s["chain"]
    what = "E(x)" if s["label"] is None else f"E(x, y={ctx.class_names[s['label']]})"
    energy_title, preds_title = f"Energy {what} of each chain", "Classifier's prediction for each chain"
    steps, energies, preds = chain.history()  # consistent even while a rerun's old thread still advances the chain
    if s["running"]:
        picture = s.get("traces_picture")  # one per chains: each redraw updates the same figure
        if picture is None or picture.titles != (energy_title, preds_title) or picture.names != ctx.class_names:
            picture = s["traces_picture"] = ui.ChainTracesPicture(ctx.class_names, energy_title, preds_title)
        every = s.get("traces_every", TRACES_INTERVAL)
        st.image(picture.png(steps, energies, preds), caption=f"Traces up to step {steps[-1]}, redrawn every "
                 f"{every:g} s while the chains run; pause them for the interactive charts.")
        return
    ui.show_chart(ui.fig_chain_energy(steps, energies, energy_title), key="lg_energy")
    ui.show_chart(ui.fig_chain_predictions(steps, preds, ctx.class_names, preds_title), key="lg_preds")


def chains_tab(ctx: ui.Context) -> None:
    ss = st.session_state
    inits = start_options(ctx)
    if ss.get("lg_init") not in inits:
        ss.pop("lg_init", None)
    a, b, c, d, e = st.columns([1, 1, 1.5, 1, 1])
    a.slider("SGLD steps", 10, 2000, 200, step=10, key="lg_steps", **ui.PERSIST)
    b.slider("Number of chains", 1, 64, 16, key="lg_n", **ui.PERSIST)
    with c:
        auto = st.toggle("Adaptive steps", value=True, key="lg_auto_k",
                         help=f"as many SGLD steps per refresh as fit in {STEP_BUDGET_S:g} s at this machine's "
                              "measured speed, so the view keeps refreshing on slow or busy machines", **ui.PERSIST)
        st.slider("Steps per refresh", 1, MAX_STEPS_PER_REFRESH, 10, key="lg_every", disabled=auto,
                  help="fixed number of SGLD steps between two refreshes (adaptive mode off)", **ui.PERSIST)
    d.radio("Start from", inits, format_func=INITS.get, key="lg_init", **ui.PERSIST)
    with e:
        class_choice(ctx, "Sample", "lg_class", unconditional=True)
    s = ss.get(LIVE)
    if s is not None and s["model"] != ctx.key:
        reset_chains()
        s = None
        st.info("The model changed: the chains were restarted.")
    if s is None and ss.get(AUTOSTARTED) != ctx.key:
        # The page's point before any click: chains start by themselves once per model and session.
        ss[AUTOSTARTED] = ctx.key
        start_chains()
        s = ss.get(LIVE)
    running = bool(s and s["running"])
    if s is not None:
        # The pictures refresh and the traces redraw less often when more sessions' chains run (each refresh costs
        # the server a rerun and a browser a re-render; each traces redraw as much as 1.5 refreshes of the pictures,
        # and the server a figure build); running chains go by the count their last
        # tick saw (the one that asked for this rerun), so that the two never disagree back and forth.
        live = s.get("live") if running and s.get("live") else ui.live_sessions(besides=ui.current_session_id()) + 1
        s["traces_every"], s["every"] = intervals(s, live)
    can_resume = bool(s and not running and s["chain"].steps < int(ss.get("lg_steps", 200)))
    cols = st.columns(4)
    cols[0].button("Start", key="lg_start", on_click=start_chains, type="primary",
                   help="new chains with the settings above (restarts running chains)")
    cols[1].button("Pause", key="lg_pause", on_click=pause_chains, disabled=not running)
    cols[2].button("Resume", key="lg_resume", on_click=resume_chains, disabled=not can_resume)
    cols[3].button("Reset", key="lg_reset", on_click=reset_chains, disabled=s is None)

    left, right = st.columns([3, 2])
    with left:
        @st.fragment(run_every=s["every"] if running else None)
        def live() -> None:
            live_view(ctx)

        live()
    with right:
        @st.fragment(run_every=s["traces_every"] if running else None)
        def traces() -> None:
            traces_view(ctx)

        traces()


# ------------------------------------------------------------------------------------ in-painting
def sources(ctx: ui.Context, n: int, g: torch.Generator, label: int | None = None):
    """Start images: test images when the test set loads, else replay-buffer rows (jem_core.generation)."""
    return source_images(ctx.model, n, g, label=label, test_set=ctx.test_set())


def inpaint_tab(ctx: ui.Context) -> None:
    a, b, c, d = st.columns(4)
    n = a.slider("Images", 1, 16, 8, key="lp_n", **ui.PERSIST)
    kind = b.selectbox("Missing part", MASK_KINDS, key="lp_mask", format_func=lambda k: f"{k} half" if k != "patch"
                       else "random patch", **ui.PERSIST)
    steps = c.slider("In-painting steps", 10, 1000, 100, step=10, key="lp_steps", **ui.PERSIST)
    cond = d.toggle("Condition on the label", key="lp_cond", help="sample E(x, y) with the image's label "
                    "(or its predicted class) instead of E(x)", **ui.PERSIST)
    if st.button("Run in-painting", key="lp_run", type="primary"):
        g = torch.Generator().manual_seed(int(st.session_state.get("lg_seed", 0)))
        x, y, src = sources(ctx, n, g)
        with ui.progress_box(f"In-painting {n} images, {steps} steps...") as progress:
            x0, chain = inpaint(x, kind, make_sampler(ctx, g), steps, y if cond else None, g,
                                lambda i, done: progress(done / steps))
        st.session_state[INPAINT] = {"x": x, "x0": x0, "chain": chain, "src": src, "kind": kind, "model": ctx.key}
    r = st.session_state.get(INPAINT)
    if r is None or r["model"] != ctx.key:
        st.info("Choose what is missing and press **Run in-painting**: SGLD then samples only the masked pixels.")
        return
    chain = r["chain"]
    cols = st.columns(3)
    for col, (x, cap, key) in zip(cols, [(r["x"], f"original {r['src']}", "lp_orig"),
                                         (r["x0"], f"{r['kind']} replaced by noise", "lp_masked"),
                                         (chain.x, f"in-painted after {chain.steps} steps", "lp_result")]):
        with col:
            ui.show_grid(x, cap, key=key, nrow=4, file_name=f"{ctx.name}_inpaint_{key}.png")
    show_health(chain, make_sampler(ctx, torch.Generator()), ctx)
    if chain.step_history:
        ui.show_chart(ui.fig_chain_energy(chain.step_history, torch.stack(chain.energy_history),
                                          "Energy while in-painting"), key="lp_energy")


# ------------------------------------------------------------------------------ class translation
def translate_tab(ctx: ui.Context) -> None:
    names = ctx.class_names
    a, b, c, d, e = st.columns(5)
    with a:
        src = class_choice(ctx, "From class", "ct_from", unconditional=False)
    with b:
        dst = class_choice(ctx, "To class", "ct_to", unconditional=False, default=1)
    n = c.slider("Images", 1, 8, 4, key="ct_n", **ui.PERSIST)
    steps = d.slider("Translation steps", 10, 1000, 200, step=10, key="ct_steps", **ui.PERSIST)
    frames = e.slider("Frames on the path", 2, 12, 8, key="ct_frames", **ui.PERSIST)
    if st.button("Run class translation", key="ct_run", type="primary"):
        g = torch.Generator().manual_seed(int(st.session_state.get("lg_seed", 0)))
        x, _, where = sources(ctx, n, g, label=src)
        with ui.progress_box(f"Translating {n} images, {steps} steps...") as progress:
            path, chain = class_translation(ctx.model, x, int(dst), make_sampler(ctx, g), steps, frames,
                                            lambda i, done: progress(done / steps))
        st.session_state[TRANSLATE] = {"x": x, "path": path, "chain": chain, "src": src, "dst": dst,
                                       "where": where, "model": ctx.key}
    r = st.session_state.get(TRANSLATE)
    if r is None or r["model"] != ctx.key:
        st.info("Pick a source and a target class and press **Run class translation**: conditional SGLD on "
                "E(x, y=target) starts from images of the source class.")
        return
    chain = r["chain"]
    show_health(chain, make_sampler(ctx, torch.Generator()), ctx)
    k = len(r["path"]) + 1
    tiles = torch.stack([r["x"]] + r["path"], dim=1).flatten(0, 1)  # row = one image's path
    ui.show_grid(tiles, f"{names[r['src']]} -> {names[r['dst']]}: each row starts from one of the {r['where']} "
                 f"(left), then {k - 1} snapshots spread over its {chain.steps} SGLD steps", key="ct_path", nrow=k,
                 file_name=f"{ctx.name}_translate_{r['src']}_to_{r['dst']}.png")
    left, right = st.columns(2)
    with left:
        ui.show_chart(ui.fig_chain_energy(chain.step_history, torch.stack(chain.energy_history),
                                          f"Energy E(x, y={names[r['dst']]})"), key="ct_energy")
    with right:
        ui.show_chart(ui.fig_chain_predictions(chain.step_history, torch.stack(chain.pred_history), names,
                                               "Classifier's prediction along the path"), key="ct_preds")


def url_params(ctx: ui.Context) -> list[share.Param]:
    """The settings a link reproduces: sampler, chains, start and class."""
    P = share.Param
    return [P("lg_seed", share.number(int, 0, 10_000)),
            P("lg_step_size", share.choice(STEP_SIZES)),
            P("lg_noise", share.choice(NOISES)),
            P("lg_exact", share.flag, share.format_flag),
            P("lg_max_update", share.choice(MAX_UPDATES)),
            P("lg_steps", share.number(int, 10, 2000)),
            P("lg_n", share.number(int, 1, 64)),
            P("lg_init", share.choice(list(INITS))),
            P("lg_class", share.choice(["unconditional", *range(len(ctx.class_names))]))]


TAB = "lg_tab"  # session_state: the open tab
TABS = {"Chains": chains_tab, "In-painting": inpaint_tab, "Class translation": translate_tab}


def main(ctx: ui.Context) -> None:
    publish = share.sync(url_params(ctx), "langevin")
    sgld_settings()
    settings_health()
    # Only the open tab is drawn: every refresh of the live chains re-renders the whole page in the browser,
    # hidden tabs included (``bench/README.md``, "Only the open tab is drawn"), and chains whose tab is hidden
    # need not run. A click on a tab reruns the page.
    tabs = st.tabs(list(TABS), key=TAB, on_change="rerun")
    for tab, draw in zip(tabs, TABS.values()):
        if tab.open:
            with tab:
                draw(ctx)
    publish()


ui.run_page(main, "Langevin chains", "SGLD on the model's energy: x <- x - step * dE/dx + noise. "
            "Chains from noise, the replay buffer or test images; in-painting; class translation.")
