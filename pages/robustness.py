"""Robustness: PGD (L∞, L2) and FGSM from captum.robust; accuracy versus eps for the baseline, JEM and JEM
with SGLD refinement before classifying; a gallery of clean / adversarial / difference images.

Widgets -> :func:`jem_core.evaluation.robustness_curve` and :func:`~jem_core.evaluation.attack` -> plotly.
Attack results are per user (``st.session_state``).

What does not live here: the attacks and the refined classifier (:mod:`jem_core.evaluation.robustness`),
the figure builders (``app/figures.py``).
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import streamlit as st

from app import share, ui
from jem_core.evaluation import RefinedClassifier, attack, calibration_report, predict_logits, robustness_curve
from jem_core.evaluation.robustness import default_eps
from jem_core.evaluation.verdicts import robustness_verdict, wilson_interval

ATTACKS = {"pgd_linf": "PGD L∞", "pgd_l2": "PGD L2", "fgsm": "FGSM (L∞)"}
RESULT = "rb_result"
NO_AUTO = "rb_no_auto"  # session_state: the user cancelled the automatic first attack
N_GALLERY = 8


def settings(ctx: ui.Context, total: int) -> dict:
    side = ctx.shape[-1]
    a, b, c, d = st.columns(4)
    kind = a.radio("Attack", list(ATTACKS), format_func=ATTACKS.get, key="rb_attack", **ui.PERSIST)
    norm = "l2" if kind == "pgd_l2" else "linf"
    top = default_eps(norm, side)[-1]
    with b:
        eps_max = st.slider(f"Largest eps ({'L2' if norm == 'l2' else 'L∞'}, [0, 1] pixel scale)", 0.0,
                            round(2 * top, 2), float(top), step=0.01 if norm == "linf" else 0.05, key=f"rb_eps_{norm}",
                            **ui.PERSIST)
        points = st.slider("Eps values on the curve", 2, 8, 4, key="rb_points", **ui.PERSIST)
    with c:
        steps = st.slider("PGD steps", 1, 50, 10, key="rb_steps", disabled=kind == "fgsm", **ui.PERSIST)
        step_size = st.number_input("PGD step size (0 = auto, 2.5·eps/steps)", 0.0, 1.0, 0.0, step=0.005,
                                    format="%.3f", key="rb_step_size", disabled=kind == "fgsm", **ui.PERSIST)
        random_start = st.toggle("Random start", key="rb_random_start", disabled=kind == "fgsm", **ui.PERSIST)
    with d:
        n = ui.n_test_control(total, 100 if side <= 8 else 50, key="rb_n")
        refine = st.toggle("Also JEM with SGLD refinement", value=False, key="rb_refine",
                           help="run SGLD on E(x) from the input before classifying; attacked with BPDA + EOT. "
                                "Each attack step then costs (1 + refinement steps) x chains forward-backward "
                                "passes: 12x with the defaults", **ui.PERSIST)
        r1, r2 = st.columns(2)
        refine_steps = r1.number_input("Refinement steps", 1, 50, 5, key="rb_refine_steps", disabled=not refine,
                                       **ui.PERSIST)
        refine_chains = r2.number_input("Chains", 1, 8, 2, key="rb_refine_chains", disabled=not refine, **ui.PERSIST)
    eps = [0.0] if eps_max == 0 else [round(float(e), 4) for e in np.linspace(0.0, eps_max, points)]
    return {"kind": kind, "eps": eps, "steps": int(steps), "step_size": float(step_size) or None,
            "random_start": bool(random_start), "n": int(n), "refine": bool(refine),
            "refine_steps": int(refine_steps), "refine_chains": int(refine_chains),
            "models": [k for _, _, k in ctx.models()], "dataset": ctx.dataset}


def run_attacks(ctx: ui.Context, s: dict, progress) -> dict:
    """Accuracy-versus-eps curves of every model (and the refined JEM) for settings ``s``."""
    test = ctx.test_set()
    x, y = test.x[: s["n"]], test.y[: s["n"]]
    models = ctx.models()
    curves: dict[str, list[dict]] = {}
    for i, (name, ck, _) in enumerate(models):
        refined = (RefinedClassifier(ck.model, s["refine_steps"], s["refine_chains"], seed=0)
                   if s["refine"] and i == 0 else None)
        out = robustness_curve(ck.model, x, y, {s["kind"]: s["eps"]}, s["steps"], refined,
                               random_start=s["random_start"],
                               progress=lambda f, i=i: progress((i + f) / len(models)), step_size=s["step_size"])
        rows = next(iter(out.values()))
        curves[name] = [r["accuracy"] for r in rows]
        if refined is not None:
            curves[f"{name} + SGLD refinement"] = [r["accuracy_refined"] for r in rows]
    return {"settings": s, "curves": curves}


def default_settings(ctx: ui.Context) -> dict:
    """The page's default attack: PGD L∞ on 50 images (100 for 8x8 digits), 4 eps values, 10 steps, no refinement."""
    return {"kind": "pgd_linf", "eps": [0.0, 0.1, 0.2, 0.3], "steps": 10, "n": 100 if ctx.shape[-1] <= 8 else 50,
            "refine": False, "refine_steps": 5, "refine_chains": 2}


def attack_cost(s: dict) -> float:
    """Forward-backward passes of an attack, up to a constant: images x eps values x steps (x the refinement's
    ``(1 + steps) x chains`` when the refined classifier is attacked too)."""
    steps = 1 if s["kind"] == "fgsm" else s["steps"]
    refine = 1 + (1 + s["refine_steps"]) * s["refine_chains"] if s["refine"] else 1
    return s["n"] * max(1, len([e for e in s["eps"] if e > 0])) * steps * refine


def attack_results(ctx: ui.Context, s: dict) -> dict:
    """The curves for settings ``s``, shared by every session (computed once per model pair and settings)."""
    key = ("robustness", tuple(s["models"]), ctx.dataset, str(ctx.data_root),
           tuple((k, tuple(v) if isinstance(v, list) else v) for k, v in sorted(s.items()) if k != "models"))
    return ui.cached(key, lambda p: run_attacks(ctx, s, p),
                     f"Attacking {s['n']} test images with {ATTACKS[s['kind']]} at {len(s['eps'])} eps values...")


def gallery(ctx: ui.Context, r: dict) -> None:
    s = r["settings"]
    test = ctx.test_set()
    x, y = test.x[:N_GALLERY], test.y[:N_GALLERY]
    names = {name: (ck, key) for name, ck, key in ctx.models()}
    a, b = st.columns(2)
    who = a.selectbox("Attacked model", list(names), key="rb_gallery_model")
    eps = b.select_slider("Gallery eps", s["eps"], value=s["eps"][-1], key="rb_gallery_eps")
    ck, key = names[who]
    xa = ui.cached(("adv", key, ctx.dataset, s["kind"], eps, s["steps"], s["step_size"], s["random_start"]),
                   lambda p: attack(ck.model, x, y, s["kind"], eps, s["steps"], s["step_size"], s["random_start"]),
                   f"Attacking {N_GALLERY} images at eps {eps}...")
    labels = ctx.class_names
    clean_pred = predict_logits(ck.model, x).argmax(1).tolist()
    adv_pred = predict_logits(ck.model, xa).argmax(1).tolist()
    refined_note = ""
    if s["refine"] and who == next(iter(names)):
        refined = RefinedClassifier(ck.model, s["refine_steps"], s["refine_chains"], seed=0)
        ref_pred = predict_logits(refined, xa).argmax(1).tolist()
        refined_note = (f" · the SGLD-refined {who} predicts on these adversarial images (transfer): "
                        + " ".join(labels[p] for p in ref_pred) + f" ({sum(p == int(t) for p, t in zip(ref_pred, y))}"
                        f" of {N_GALLERY} right)")
    cols = st.columns(3)
    for col, (imgs, cap, k) in zip(cols, [
            (x, "clean, predicted: " + " ".join(labels[p] for p in clean_pred), "rb_clean"),
            (xa, f"adversarial (eps {eps}), predicted: " + " ".join(labels[p] for p in adv_pred), "rb_adv"),
            (ui.difference_images(xa, x), "difference (scaled to full contrast)", "rb_diff")]):
        with col:
            ui.show_grid(imgs, cap, key=k, nrow=4, file_name=f"{ctx.name}_{k}_eps{eps}.png")
    st.caption(f"True labels: {' '.join(labels[int(v)] for v in y)} · changed by the attack: "
               f"{sum(p != q for p, q in zip(clean_pred, adv_pred))} of {N_GALLERY}" + refined_note)


def url_params(ctx: ui.Context, total: int) -> list[share.Param]:
    """The settings a link reproduces: attack, eps, steps, images, refinement."""
    P = share.Param
    side = ctx.shape[-1]
    return [P("rb_attack", share.choice(list(ATTACKS))),
            P("rb_eps_linf", share.number(float, 0.0, round(2 * default_eps("linf", side)[-1], 2))),
            P("rb_eps_l2", share.number(float, 0.0, round(2 * default_eps("l2", side)[-1], 2))),
            P("rb_points", share.number(int, 2, 8)),
            P("rb_steps", share.number(int, 1, 50)),
            P("rb_n", share.number(int, 1, total)),
            P("rb_refine", share.flag, share.format_flag)]


def main(ctx: ui.Context) -> None:
    test = ui.need_test_set(ctx)
    if test is None:
        return
    publish = share.sync(url_params(ctx, len(test)), "robustness")
    # Closed until clicked: these ten widgets on show delayed the results from 3.3 to 8.6 s in a Chromium slowed
    # 4x (bench/page_cost.py); the chart title and the table below say what ran.
    with st.expander("Attack settings: attack, eps, PGD steps, test images, SGLD refinement", key="rb_settings",
                     icon=":material/tune:"):
        s = settings(ctx, len(test))
    publish()
    clicked = st.button("Run attacks", key="rb_run", type="primary")
    ss = st.session_state
    r = ss.get(RESULT)
    first = r is None or r["settings"]["models"] != s["models"] or r["settings"]["dataset"] != ctx.dataset
    size = attack_cost(s) / attack_cost(default_settings(ctx))
    if first and not clicked and size > 1.5 and not ss.get(NO_AUTO):
        st.info(f"These settings ask for an attack about {size:.0f}x the size of the default one, so it does not start "
                "by itself: press **Run attacks** to start it.")
        return
    if clicked or (first and not ss.get(NO_AUTO)):
        # The first visit computes the attack with the settings shown (no larger than the default), so the page
        # makes its point at once (unless the user cancelled that once: then only the button starts an attack).
        try:
            r = ss[RESULT] = attack_results(ctx, s)
        except ui.Cancelled:
            ss[NO_AUTO] = True
            raise
    elif first:
        st.info("Press **Run attacks** to attack the models with the settings above.")
        return
    if r["settings"] != s:
        st.warning("The settings changed since the last run: press **Run attacks** to update the results below.")
    rs = r["settings"]
    clean = {name: calibration_report(ui.test_probabilities(ctx, name, ck, key, rs["n"]), test.y[: rs["n"]], 15)
             .accuracy for name, ck, key in ctx.models()}
    cols = st.columns(len(clean))
    for col, (name, acc) in zip(cols, clean.items()):
        iv = wilson_interval(int(round(acc * rs["n"])), rs["n"])
        col.metric(f"Clean accuracy: {name}", f"{acc:.4f}")
        col.caption(f"95% interval {iv.lo:.3f}-{iv.hi:.3f} (Wilson, {rs['n']} images)")
    colors = {name: ui.COLORS[i % len(ui.COLORS)] for i, name in enumerate(r["curves"])}
    ci = {name: [wilson_interval(int(round(a * rs["n"])), rs["n"]) for a in accs] for name, accs in r["curves"].items()}
    ui.show_chart(ui.fig_lines(rs["eps"], r["curves"], f"{ATTACKS[rs['kind']]}: accuracy under attack "
                               f"({rs['n']} test images, {rs['steps']} steps; bars: 95% Wilson intervals)",
                               "eps ([0, 1] pixel scale)", "accuracy", yrange=(0, 1.02), colors=colors,
                               intervals={k: ([i.lo for i in v], [i.hi for i in v]) for k, v in ci.items()}),
                  key="rb_curve")
    st.markdown("**What these numbers show.**")
    st.markdown("\n".join(
        "- " + robustness_verdict({k: v[j] for k, v in r["curves"].items()}, rs["n"], e, ATTACKS[rs["kind"]])
        for j, e in enumerate(rs["eps"]) if e > 0) or "- eps 0 only: no attack ran.")
    if not rs["refine"]:
        st.caption("Turn on **Also JEM with SGLD refinement** to attack the JEM that first moves its input "
                   "towards low energy (the paper's robustness claim is about this refined classifier).")
    table = pd.DataFrame({"eps": rs["eps"], **{f"accuracy: {k}": v for k, v in r["curves"].items()},
                          **{f"95% CI: {k}": [f"{i.lo:.2f}-{i.hi:.2f}" for i in v] for k, v in ci.items()}})
    st.subheader("Accuracy under attack")
    st.dataframe(table, hide_index=True)
    ui.download_table(table, f"robustness_{ctx.name}_{rs['kind']}", key="rb_table")
    st.subheader("Gallery")
    gallery(ctx, r)


ui.run_page(main, "Robustness", "Adversarial attacks from captum.robust; eps in the [0, 1] pixel scale "
            "(MNIST eps 0.3 = 30% of the pixel range). SGLD refinement is attacked with BPDA + EOT.")
