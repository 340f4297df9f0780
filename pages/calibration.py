"""Calibration: confidence histograms, reliability diagrams and a table of accuracy, ECE, MCE, NLL, Brier.

Widgets -> :func:`jem_core.evaluation.calibration_report` on ``p(y|x)`` of the test split -> plotly figures.

What does not live here: the metrics and intervals (:mod:`jem_core.evaluation`), the figure builders
(``app/figures.py``).
"""

from __future__ import annotations

import pandas as pd
import streamlit as st

from app import share, ui
from jem_core.evaluation import TemperatureScaled, calibration_report, fit_temperature, predict_logits, predict_proba
from jem_core.evaluation.verdicts import calibration_verdict, ece_intervals, wilson_interval


def main(ctx: ui.Context) -> None:
    test = ui.need_test_set(ctx)
    if test is None:
        return
    publish = share.sync([share.Param("cal_n", share.number(int, 1, len(test))),
                          share.Param("cal_bins", share.number(int, 5, 30)),
                          share.Param("cal_temp", share.flag, share.format_flag)], "calibration")
    a, b, c, d = st.columns(4)
    with d:
        temperature = st.toggle("T-scaled baseline", key="cal_temp", disabled=ctx.baseline is None,
                                help="the stronger standard reference: softmax(f(x) / T), T fitted on the last 20% "
                                     "of the test split (then left out of the evaluation)", **ui.PERSIST)
        log_y = st.toggle("Log scale histograms", value=True, key="cal_log", **ui.PERSIST)
    temperature = temperature and ctx.baseline is not None
    n_cal = max(2, len(test) // 5) if temperature else 0
    with a:
        n = ui.n_test_control(len(test) - n_cal, ui.FIRST_VIEW_TEST_IMAGES, key="cal_n")
    n_bins = b.slider("Number of bins", 5, 30, 15, key="cal_bins", **ui.PERSIST)
    layout = c.radio("Layout", ["Overlaid", "Side by side"], key="cal_layout", horizontal=True, **ui.PERSIST)
    publish()
    y = test.y[:n]
    reports = {name: calibration_report(ui.test_probabilities(ctx, name, ck, key, n), y, n_bins)
               for name, ck, key in ctx.models()}
    if temperature:
        bname, bck, bkey = ctx.models()[1]
        xc, yc = test.x[len(test) - n_cal:], test.y[len(test) - n_cal:]
        t = ui.cached(("temperature", bkey, ctx.dataset, str(ctx.data_root), n_cal),
                      lambda p: fit_temperature(predict_logits(bck.model, xc, progress=p), yc),
                      f"Fitting the temperature on {n_cal} held-out test images...")
        probs = ui.cached(("proba_t", bkey, ctx.dataset, str(ctx.data_root), n, t),
                          lambda p: predict_proba(TemperatureScaled(bck.model, t), test.x[:n], progress=p),
                          "Classifying with the temperature-scaled baseline...")
        reports[f"{bname} + temperature T={t:.2f}"] = calibration_report(probs, y, n_bins)

    # The point figures at once, their intervals once the bootstrap is done (a second under load).
    names = list(reports)
    cols = st.columns(len(reports) + (len(reports) >= 2))
    for col, (name, r) in zip(cols, reports.items()):
        col.metric(f"ECE: {name}", f"{r.ece:.4f}", help=f"expected calibration error, {n_bins} equal-width bins, "
                                                         f"first {n:,} test images (0 = calibrated)")
    if len(reports) >= 2:
        gap = reports[names[0]].ece - reports[names[1]].ece
        cols[-1].metric(f"ECE difference: {names[0]} - {names[1]}", f"{gap:+.4f}",
                        help="paired bootstrap over the same resampled images (below 0: the first is better "
                             "calibrated)")
    captions = [col.empty() for col in cols]
    intervals = ece_intervals(list(reports.values()))  # one bootstrap for the metrics, the verdict and the table
    for caption, ece in zip(captions, intervals[0]):
        caption.caption(f"95% CI {ece.lo:.4f}-{ece.hi:.4f}")
    if intervals[1] is not None:
        d = intervals[1]
        captions[-1].caption(f"95% CI {d.lo:+.4f} to {d.hi:+.4f}" + (" (excludes 0)" if d.excludes(0.0) else
                                                                      " (includes 0)"))
    if len(reports) >= 2:
        (na, ra), (nb, rb) = list(reports.items())[:2]
        st.markdown("**What these numbers show.** " + calibration_verdict(
            na, ra, nb, rb, f"the first {n:,} {ctx.dataset} test images", intervals=intervals) + " The reliability "
            "diagram below shows where: bars below the diagonal are over-confident bins, bars above it "
            "under-confident ones.")
    rows = []
    for (name, r), ece in zip(reports.items(), intervals[0]):
        acc = wilson_interval(int(r.correct.sum()), n)
        rows.append({"model": name, "accuracy": r.accuracy, "accuracy 95% CI": f"{acc.lo:.4f}-{acc.hi:.4f}",
                     "ECE": r.ece, "ECE 95% CI": f"{ece.lo:.4f}-{ece.hi:.4f}", "MCE": r.mce, "NLL": r.nll,
                     "Brier": r.brier, "test images": n, "bins": n_bins})
    table = pd.DataFrame(rows)
    st.subheader(f"Calibration on the first {n} {ctx.dataset} test images")
    st.caption("95% intervals: Wilson for accuracy, percentile bootstrap (1,000 resamples of the images) for ECE.")
    st.dataframe(table, hide_index=True, column_config={k: st.column_config.NumberColumn(format="%.4f")
                                                        for k in ("accuracy", "ECE", "MCE", "NLL", "Brier")})
    ui.download_table(table, f"calibration_{ctx.name}", key="cal_table")

    conf = {name: r.confidences for name, r in reports.items()}
    colors = {name: ui.COLORS[i % len(ui.COLORS)] for i, name in enumerate(reports)}  # one colour per model
    if layout == "Overlaid":
        ui.show_chart(ui.fig_histograms(conf, "Confidence histogram", "confidence max p(y|x)", n_bins,
                                        value_range=(0.0, 1.0), log_y=log_y, colors=list(colors.values())),
                      key="cal_hist")
    else:
        for i, (col, (name, r)) in enumerate(zip(st.columns(len(reports)), reports.items())):
            with col:  # shared x range (0-1) and bins, so the panels compare
                ui.show_chart(ui.fig_histograms({name: r.confidences}, f"Confidence: {name}", "confidence", n_bins,
                                                colors=[colors[name]], value_range=(0.0, 1.0), log_y=log_y),
                              key=f"cal_hist_{i}")
    ui.show_chart(ui.fig_reliability(reports, colors=colors), key="cal_rel")

    bins = pd.DataFrame([{"model": name, **b} for name, r in reports.items() for b in r.bins_as_dicts()])
    with st.expander("Reliability bins (per-bin confidence, accuracy and counts)"):
        st.dataframe(bins, hide_index=True)
        ui.download_table(bins, f"reliability_bins_{ctx.name}", key="cal_bins_table")


ui.run_page(main, "Calibration", "Is the model's confidence its accuracy? JEM versus the standard classifier "
            "on the test split (ECE with equal-width bins, Guo et al. 2017).")
