"""Likelihood: the normalised log p(x) of a model, log Z by annealed importance sampling (AIS).

Widgets -> :func:`app.registry.likelihood_report` (:func:`jem_core.likelihood.estimate_log_likelihood`, shared by
every session per model and settings, the first view's computed ahead of visits) -> the
estimate with its interval, the annealing curve, the convergence sweep, the forward/reverse gap and the
test set's log p(x) in nats.

What does not live here: AIS itself (:mod:`jem_core.likelihood`), the figure builders (``app/figures.py``).
"""

from __future__ import annotations

import math

import pandas as pd
import plotly.graph_objects as go
import streamlit as st
from plotly.subplots import make_subplots

from app import share, ui
from jem_core.likelihood import PUBLISHED_MNIST_BPD, SAMPLERS, SCHEDULES, pixel_levels

TEMPS = [25, 50, 100, 200, 500, 1000, 2000]
CHAINS = [16, 32, 64, 128]


def fig_curve(reports: dict) -> go.Figure:
    """Running log Ẑ_b (top) and the weights' ESS (bottom) over b, forward (solid) and reverse (dotted)."""
    fig = make_subplots(rows=2, cols=1, shared_xaxes=True, row_heights=[0.62, 0.38], vertical_spacing=0.06)
    for i, (name, rep) in enumerate(reports.items()):
        c = ui.COLORS[i % len(ui.COLORS)]
        for run, dash in ((rep.forward, None), (rep.reverse, "dot")):
            if run is None:
                continue
            label = f"{name}: {run.direction}"
            fig.add_scatter(x=run.curve_betas, y=run.curve_log_z, mode="lines", name=label,
                            line=dict(color=c, dash=dash), row=1, col=1)
            fig.add_scatter(x=run.curve_betas, y=run.curve_ess, mode="lines", name=f"{label} ESS", showlegend=False,
                            line=dict(color=c, dash=dash), row=2, col=1)
    fig.update_yaxes(title_text="log Ẑ_b (nats)", row=1, col=1)
    fig.update_yaxes(title_text="ESS of the weights", rangemode="tozero", row=2, col=1)
    fig.update_xaxes(title_text="inverse temperature b (0 = uniform box, 1 = the model)", row=2, col=1)
    fig.update_layout(title="Annealing curve: running estimate of log ∫ exp(-b E(x)) dx and ESS", height=460,
                      margin=dict(l=10, r=10, t=50, b=10), legend=dict(orientation="h", y=-0.2))
    return fig


def fig_sweep(reports: dict) -> go.Figure:
    """log Ẑ (forward and reverse, ±2 SE) against the number of temperatures."""
    fig = go.Figure()
    for i, (name, rep) in enumerate(reports.items()):
        c = ui.COLORS[i % len(ui.COLORS)]
        t = [r["temps"] for r in rep.sweep]
        fig.add_scatter(x=t, y=[r["log_z"] for r in rep.sweep], name=f"{name}: forward (lower in expectation)",
                        mode="lines+markers", line=dict(color=c),
                        error_y=dict(type="data", array=[2 * r["log_z_se"] for r in rep.sweep]))
        if rep.reverse is not None:
            fig.add_scatter(x=t, y=[r["reverse_log_z"] for r in rep.sweep], mode="lines+markers",
                            name=f"{name}: reverse (approximate samples, diagnostic)", line=dict(color=c, dash="dot"),
                            error_y=dict(type="data", array=[2 * r["reverse_log_z_se"] for r in rep.sweep]))
    fig.update_xaxes(type="log")
    fig.update_layout(title="Convergence sweep: the estimate should stop moving and the gap close",
                      xaxis_title="temperatures K", yaxis_title="log Ẑ (nats), ±2 SE", height=380,
                      margin=dict(l=10, r=10, t=50, b=10), legend=dict(orientation="h", y=-0.3))
    return fig


def main(ctx: ui.Context) -> None:
    c, h, w = ctx.shape
    dim = c * h * w
    publish = share.sync([share.Param("lik_temps", share.choice(TEMPS)), share.Param("lik_chains", share.choice(CHAINS)),
                          share.Param("lik_sampler", share.choice(SAMPLERS)),
                          share.Param("lik_schedule", share.choice(SCHEDULES)),
                          share.Param("lik_reverse", share.flag, share.format_flag),
                          share.Param("lik_base", share.flag, share.format_flag)], "likelihood")
    a, b, cc, d = st.columns(4)
    temps = a.select_slider("Temperatures K", TEMPS, value=ui.likelihood_temps(dim), key="lik_temps",
                            help="transitions along b from 0 (uniform on the box) to 1 (the model)", **ui.PERSIST)
    chains = b.select_slider("Chains", CHAINS, value=ui.LIKELIHOOD_CHAINS, key="lik_chains", **ui.PERSIST)
    sampler = cc.selectbox("Transition", SAMPLERS, index=SAMPLERS.index(ui.LIKELIHOOD_SAMPLER), key="lik_sampler",
                           format_func=str.upper,
                           help="Metropolis-corrected: HMC (5 leapfrog steps) or MALA, reflected at the box walls",
                           **ui.PERSIST)
    schedule = d.selectbox("Schedule", SCHEDULES, index=SCHEDULES.index(ui.LIKELIHOOD_SCHEDULE), key="lik_schedule",
                           **ui.PERSIST)
    e, f = st.columns(2)
    reverse = e.toggle("Reverse run (diagnostic)", value=ui.LIKELIHOOD_REVERSE, key="lik_reverse", **ui.PERSIST)
    with_base = f.toggle("Also the baseline", value=False, key="lik_base", disabled=ctx.baseline is None,
                         help="a classifier trained without the p(x) term also defines an energy", **ui.PERSIST)
    publish()
    test = ctx.test_set()
    n_test = 0
    if test is None:
        st.info(f"No `{ctx.dataset}` test set ({ctx.data_message}): log Z is estimated, test log p(x) is not.")
    else:
        n_test = ui.n_test_control(len(test), min(len(test), ui.LIKELIHOOD_TEST_IMAGES), key="lik_n")
    models = ctx.models() if with_base and ctx.baseline is not None else ctx.models()[:1]
    reports = {name: ui.likelihood_report(ctx, name, ck, key, n_test, temps, chains, sampler, schedule, reverse)
               for name, ck, key in models}

    levels = pixel_levels(ctx.dataset)
    st.caption(f"A density on the box [-1, 1]^{dim} at temperature 1, for the model as trained: p(x) = exp(-E(x)) / Z, "
               f"E(x) = -logsumexp_y f(x)[y]. The uniform density on the box has log Z = D log 2 = "
               f"{dim * math.log(2):.1f} nats"
               + (f" and {math.log2(levels):.2f} bits/dim on this data's {levels}-level scale" if levels else "")
               + (" (8x8 digits have 17 levels: not comparable with MNIST's 256)" if levels == 17 else "") + ".")
    for name, rep in reports.items():
        s = rep.summary()
        st.subheader(name)
        if rep.stored:
            st.caption(f"Read from a stored estimate, computed {rep.stored['computed']} (UTC) with torch "
                       f"{rep.stored['torch']} in {rep.seconds:.0f} s, for these weights, test images, settings and "
                       "estimator code (its content address). Any other setting estimates anew on this machine.")
        m1, m2, m3, m4 = st.columns(4)
        m1.metric("log Ẑ (forward AIS)", f"{s['log_z']:.2f}",
                  help="forward AIS under-estimates log Z in expectation")
        m1.caption(f"± {2 * s['log_z_se']:.2f} nats (2 bootstrap standard errors over chains)")
        m2.metric("log Ẑ - D log 2", f"{s['log_z_minus_uniform']:+.2f} nats",
                  help="how far the model's mass is from the uniform box's")
        m3.metric("ESS of the weights", f"{s['ess']:.1f} / {s['chains']}", help=f"log-weight variance {s['log_w_var']:.3g}")
        if s["reverse_log_z"] is not None:
            m4.metric("Reverse log Ẑ (diagnostic)", f"{s['reverse_log_z']:.2f}", f"gap {s['gap']:+.2f} nats",
                      delta_color="off", delta_arrow="off", help="from approximate samples (forward end states resampled by weight, "
                                              "then HMC at b = 1): not a bound")
        if s["test_images"] and s["test_bits_per_dim"] is not None:
            t1, t2, t3, _ = st.columns(4)
            t1.metric("Test log p(x)", f"{s['test_log_px_nats_dequantized']:.1f} nats",
                      help=f"mean over {s['test_images']} {ctx.dataset} test images at dequantised pixels; "
                           f"{s['test_log_px_nats']:.1f} at the stored pixels")
            t2.metric("Test bits/dim", f"{s['test_bits_per_dim']:.3f}",
                      f"{s['test_bits_per_dim'] - s['uniform_bits_per_dim']:+.3f} vs uniform", delta_color="inverse",
                      help="-(log p(u) + D log(2/L)) / (D ln 2) at dequantised pixels u, L levels")
            t3.metric("Uniform bits/dim", f"{s['uniform_bits_per_dim']:.3f}",
                      help="log2 of the pixel levels: the uniform density on the pixel box at the same "
                           "dequantisation, the figure a model of the images must beat")
        if s["agree"] is False:
            st.warning(f"Forward and reverse disagree by {s['gap']:.1f} nats (more than 3 standard errors + 0.5): "
                       "the chains did not reach the model's own density in this budget, so log Ẑ is a lower "
                       "estimate of unknown quality and test log p(x) is over-stated. Add temperatures and watch "
                       "the sweep.")
        elif s["ess"] < 0.1 * s["chains"]:
            st.warning(f"Few effective chains ({s['ess']:.1f}): the standard error understates the error.")

    left, right = st.columns(2)
    with left:
        ui.show_chart(fig_curve(reports), key="lik_curve")
    with right:
        ui.show_chart(fig_sweep(reports), key="lik_sweep")
    rows = [{"model": name, **{k: v for k, v in r.items()}} for name, rep in reports.items() for r in rep.sweep]
    with st.expander("Convergence sweep table"):
        st.dataframe(pd.DataFrame(rows), hide_index=True)
    hist = {name: rep.test_log_px_deq for name, rep in reports.items() if len(rep.test_log_px_deq)}
    if hist:
        ui.show_chart(ui.fig_histograms(hist, f"{ctx.dataset} test images: normalised log p(x) (dequantised)",
                                        "log p(x) (nats)"),
                      key="lik_hist")
        st.caption("These are the OOD page's log p(x) = -E(x) scores shifted by -log Ẑ: normalised nats.")
    cols = st.columns(len(reports))
    for i, (col, (name, rep)) in enumerate(zip(cols, reports.items())):
        with col:
            s = rep.summary()
            ui.show_grid(rep.forward.end_states[:16].cpu(), f"{name}: forward AIS end states at b = 1, approximate "
                         f"draws of the model's own density (mean energy {s['end_state_energy_mean']:.1f}"
                         + (f"; test images: {s['test_energy_mean']:.1f})" if s["test_energy_mean"] is not None
                            else ")"), key=f"lik_end_{i}", nrow=8)
    traces = {name: rep.data_chain_trace for name, rep in reports.items() if rep.data_chain_trace}
    if traces:
        ends = {name: rep.summary()["end_state_energy_mean"] for name, rep in reports.items()}
        fig = ui.fig_lines({n: [10 * i for i in range(len(t))] for n, t in traces.items()}, traces,
                           "Exact HMC at the model's own temperature, started at test images",
                           "HMC transitions at b = 1", "mean energy E(x)")
        for i, (name, e) in enumerate(ends.items()):
            if e is not None:
                fig.add_hline(y=e, line_dash="dot", line_color=ui.COLORS[i % len(ui.COLORS)],
                              annotation_text=f"{name}: forward AIS end states")
        ui.show_chart(fig, key="lik_data_chains")
        st.caption("If the chains climb away from the test images' energy to the AIS end states' level, the data "
                   "are not typical draws of the model's own density: its mass lies where the volume is.")
    if levels == 256 and ctx.dataset.split(":")[0] in ("mnist", "fashion_mnist"):
        with st.expander("Published dequantised-MNIST figures (other model classes, for scale)"):
            st.dataframe(pd.DataFrame([{"model": n, "bits/dim": v, "source": s} for n, v, s in PUBLISHED_MNIST_BPD]),
                         hide_index=True)
    # "stored": where a stored estimate was read from (file, key, torch, time computed), None when estimated here
    ui.download_json({name: {**rep.summary(), "stored": rep.stored or None} for name, rep in reports.items()},
                     f"likelihood_{ctx.name}.json", key="lik_json")


ui.run_page(main, "Likelihood", "How good is the model as a density? log Z by annealed importance sampling from "
            "the uniform box (Neal 2001, HMC with reflection at the walls), a reverse run and a convergence sweep; "
            "test log p(x) in nats and bits/dim.")
