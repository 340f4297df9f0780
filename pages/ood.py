"""OOD detection: scores of in-distribution test images against OOD sets (real datasets when present,
synthetic sets, an uploaded folder of images); histograms, ROC curves, AUROC / AUPR / FPR@95TPR.

Widgets -> :func:`jem_core.evaluation.ood_score_table` / :func:`~jem_core.evaluation.ood_metrics` /
:func:`~jem_core.evaluation.roc_curve_data` -> plotly figures and a table.

What does not live here: the scores, metrics and OOD sets (:mod:`jem_core.evaluation.ood`,
:mod:`jem_core.data`), the figure builders (``app/figures.py``).
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import streamlit as st
import torch

from app import share, ui
from jem_core.data import SYNTHETIC_OOD
from jem_core.evaluation import load_ood_set, ood_metrics, ood_score_table, roc_curve_data
from jem_core.evaluation.ood import OOD_SCORES, SCORE_LABELS
from jem_core.evaluation.report import default_ood_sets
from jem_core.evaluation.verdicts import Interval, auroc_bootstrap, ood_verdict
from jem_core.images import MAX_MB, prepare_uploads

UPLOADED = "uploaded images"
SET_LABELS = {"uniform": "uniform noise", "gaussian": "Gaussian (data mean/std)", "constant": "constant images",
              "interp": "interpolations of two images", "inverted": "inverted images"}
SET_HELP = {"uniform": "U[-1, 1] pixels", "gaussian": "per-pixel normal noise with the test set's mean and std",
            "constant": "one random grey level per image", "interp": "the pixel-wise mean of two test images",
            "inverted": "test images with black and white swapped"}


def scores_for(ctx: ui.Context, name: str, ck, key: str, set_name: str, x: torch.Tensor, data_key: str,
               scores: tuple[str, ...]) -> dict[str, torch.Tensor]:
    """OOD scores of one image set under one model (shared cache; read from a stored table when there is one)."""
    return ui.cached(("ood", key, data_key, len(x), scores),
                     lambda p: ood_score_table(ck.model, x, scores, progress=p),
                     f"Scoring {len(x)} images of {set_name} with {name}...",
                     stored=lambda: ui.stored_ood_scores(ck.model, x, scores))


@st.cache_data(max_entries=1024, show_spinner=False)
def auroc_interval(s_in: np.ndarray, s_out: np.ndarray) -> Interval:
    """AUROC with its 95% bootstrap interval (cached by the scores' values)."""
    return auroc_bootstrap(s_in, s_out, n_boot=500)


def uploaded_set(ctx: ui.Context) -> tuple[torch.Tensor | None, str]:
    c, h, _ = ctx.shape
    files = st.file_uploader("An uploaded folder of OOD images", type=["png", "jpg", "jpeg", "gif", "bmp", "webp"],
                             accept_multiple_files="directory", key="ood_upload", max_upload_size=MAX_MB,
                             help="every image of the folder is converted like the model's inputs "
                                  f"({c}x{h}x{h}, inverted when dark-on-light)")
    if not files:
        return None, ""
    invert = st.toggle("Invert dark-on-light images (auto)", value=True, key="ood_invert")
    prepared, errors = prepare_uploads([(f.name, f.getvalue()) for f in files], c, h, None if invert else False)
    for name, msg in errors:
        st.warning(f"Skipped {name}: {msg}")
    if not prepared:
        return None, ""
    return torch.stack([p.tensor for p in prepared]), f"{UPLOADED}:{ui.digest_files(files)}:{invert}"


def main(ctx: ui.Context) -> None:
    test = ui.need_test_set(ctx)
    if test is None:
        return
    available = default_ood_sets(ctx.dataset, ctx.data_root)
    publish = share.sync([share.Param("ood_scores", share.several(list(OOD_SCORES)), share.format_several),
                          share.Param("ood_sets", share.several(available), share.format_several),
                          share.Param("ood_n", share.number(int, 1, len(test)))], "ood")
    sets = st.multiselect("OOD sets", available, default=available, key="ood_sets",
                          format_func=lambda s: s if s in SET_LABELS else f"{s} (test split)",
                          help="; ".join(f"{k}: {v}" for k, v in SET_HELP.items()), **ui.PERSIST)
    a, c = st.columns([3, 2])
    chosen_scores = a.multiselect("Scores", list(OOD_SCORES), default=list(OOD_SCORES), key="ood_scores",
                                  format_func=SCORE_LABELS.get, help="higher = more in-distribution for every score",
                                  **ui.PERSIST)
    with c:
        n = ui.n_test_control(len(test), 500, key="ood_n", label="Number of test images (and per OOD set)")
    publish()
    with st.expander("Upload a folder of images as an extra OOD set"):
        x_up, up_key = uploaded_set(ctx)
    if not chosen_scores:
        st.info("Choose at least one score.")
        return
    scores = tuple(s for s in OOD_SCORES if s in chosen_scores)
    x_in = test.x[:n]
    ood_x: dict[str, tuple[torch.Tensor, str]] = {}
    for i, spec in enumerate(sets):
        x = ui.cached(("ood_set", spec, ctx.dataset, str(ctx.data_root), n, ctx.shape),
                      lambda p, spec=spec, i=i: load_ood_set(spec, x_in, ctx.data_root, n=n, seed=i),
                      f"Loading OOD set {spec}...")
        ood_x[SET_LABELS.get(spec, f"{spec} (test split)")] = (x, f"{spec}:{ctx.dataset}:{ctx.data_root}:{n}")
    if x_up is not None:
        ood_x[UPLOADED] = (x_up, up_key)
    if not ood_x:
        st.info("Choose at least one OOD set or upload images.")
        return

    rows, per_model, intervals = [], {}, {}
    for name, ck, key in ctx.models():
        s_in = scores_for(ctx, name, ck, key, "the test set", x_in, f"in:{ctx.dataset}:{ctx.data_root}", scores)
        s_out = {set_name: scores_for(ctx, name, ck, key, set_name, x, dkey, scores)
                 for set_name, (x, dkey) in ood_x.items()}
        per_model[name] = (s_in, s_out)
        for set_name, so in s_out.items():
            for sc in scores:
                m = ood_metrics(s_in[sc], so[sc])
                ci = intervals[(name, set_name, sc)] = auroc_interval(s_in[sc].numpy(), so[sc].numpy())
                rows.append({"model": name, "OOD set": set_name, "score": SCORE_LABELS[sc], "AUROC": m["auroc"],
                             "AUROC 95% CI": f"{ci.lo:.3f}-{ci.hi:.3f}", "AUPR": m["aupr"],
                             "FPR@95TPR": m["fpr95"], "OOD images": len(so[sc])})
    table = pd.DataFrame(rows)
    st.subheader(f"Detection of OOD images ({n} {ctx.dataset} test images as in-distribution)")
    stored = [t.stored for s_in, s_out in per_model.values() for t in (s_in, *s_out.values())
              if getattr(t, "stored", None)]
    if stored:
        total = len(per_model) * (1 + len(ood_x))
        st.caption(f"{len(stored)} of these {total} score tables were read from stored tables, computed "
                   f"{min(s['computed'] for s in stored)} (UTC) with torch {stored[0]['torch']} for these weights and "
                   f"images (`{ui.CHECKPOINT_DIR.name}/{ui.STORED_OOD.name}`); "
                   + ("the others were computed here." if len(stored) < total else "none was computed here."))
    # At a glance: one row per (OOD set, score), one AUROC column per model, so the table stays narrow.
    glance = table.pivot_table(index=["OOD set", "score"], columns="model", values="AUROC", sort=False)
    glance.columns = [f"AUROC {m}" for m in glance.columns]
    st.dataframe(glance, column_config={c: st.column_config.NumberColumn(format="%.3f") for c in glance.columns})
    st.markdown(f"**What these numbers show** ({SCORE_LABELS[scores[0]]}; 95% bootstrap intervals):")
    st.markdown("\n".join(
        "- " + ood_verdict({name: intervals[(name, set_name, scores[0])] for name in per_model}, set_name,
                           SCORE_LABELS[scores[0]]) for set_name in ood_x))
    st.dataframe(table, hide_index=True, column_config={k: st.column_config.NumberColumn(format="%.4f")
                                                        for k in ("AUROC", "AUPR", "FPR@95TPR")})
    ui.download_table(table, f"ood_{ctx.name}", key="ood_table")

    st.subheader("Score distributions and ROC curves")
    a, b = st.columns(2)
    plot_score = a.selectbox("Score to plot", list(scores), format_func=SCORE_LABELS.get, key="ood_plot_score")
    plot_set = b.selectbox("OOD set to plot", list(ood_x), key="ood_plot_set")
    cols = st.columns(len(per_model))
    for i, (col, (name, (s_in, s_out))) in enumerate(zip(cols, per_model.items())):
        with col:
            hist = {f"{ctx.dataset} test (in-distribution)": s_in[plot_score], plot_set: s_out[plot_set][plot_score]}
            ui.show_chart(ui.fig_histograms(hist, f"{name}: {SCORE_LABELS[plot_score]}", SCORE_LABELS[plot_score],
                                            colors=[ui.COLORS[2], ui.COLORS[3]]), key=f"ood_hist_{i}")
            curves = {set_name: roc_curve_data(s_in[plot_score], so[plot_score]) for set_name, so in s_out.items()}
            ui.show_chart(ui.fig_roc(curves, f"{name}: ROC with {SCORE_LABELS[plot_score]}"), key=f"ood_roc_{i}")
    st.caption("Synthetic sets are made from the in-distribution test images: " +
               "; ".join(f"{SET_LABELS[k]}: {SET_HELP[k]}" for k in SYNTHETIC_OOD) + ".")


ui.run_page(main, "OOD detection", "Does the model tell its own data from other images? log p(x) = -E(x) "
            "(JEM), max p(y|x) (the usual baseline) and -||∇x log p(x)||; AUROC with in-distribution as positive.")
