"""Score an image: upload PNG/JPEG files and see what the model sees, its class probabilities, the energy,
the ``log p(x)`` percentile against the checkpoint's reference images with an "unusual input" verdict, and captum attributions
for the predicted class and for the energy.

Widgets -> :func:`jem_core.images.prepare_uploads` -> :func:`jem_core.scoring.score_batch` and
:func:`jem_core.evaluation.attribution_maps` -> pictures, plotly charts, a table.
Works offline without the dataset: the percentile uses the checkpoint's reference statistics.

What does not live here: decoding, scoring and attributions (:mod:`jem_core.images`, :mod:`jem_core.scoring`,
:mod:`jem_core.evaluation.attribution`).
"""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import streamlit as st
import torch

from app import ui
from jem_core.data import data_available, synthetic_ood
from jem_core.evaluation import attribution_maps, load_ood_set, ood_score_table
from jem_core.evaluation.ood import OOD_SCORES, SCORE_LABELS
from jem_core.images import MAX_MB, prepare_uploads
from jem_core.scoring import UNUSUAL_PERCENTILE, place, score_batch

INVERT = {"Auto": None, "Invert": True, "Don't invert": False}
METHODS = {"saliency": "saliency |∂/∂x|", "integrated_gradients": "integrated gradients"}
N_EXAMPLES = 2


def inputs(ctx: ui.Context) -> tuple[list[str], torch.Tensor | None, list[list[str]], list[list], list[bool]]:
    """(names, images [N, C, H, W], preprocessing notes, preprocessing pictures, blank flags) from the uploads
    and the example inputs."""
    c, h, _ = ctx.shape
    files = st.file_uploader(f"Upload images (PNG, JPEG, GIF, BMP, WebP or TIFF; up to {MAX_MB} MB each)",
                             type=["png", "jpg", "jpeg", "gif", "bmp", "webp", "tif",
                                                               "tiff"], accept_multiple_files=True, key="score_upload",
                             max_upload_size=MAX_MB,
                             help=f"any size or colour: converted to {c}x{h}x{h} like the model's training data")
    a, b, d = st.columns(3)
    invert = a.radio("Colour inversion", list(INVERT), key="score_invert", horizontal=True,
                     help="the model expects light strokes on a dark background; Auto inverts photos of "
                          "dark-on-light digits", **ui.PERSIST)
    digit_style = a.toggle("Digit-style normalisation", value=True, key="score_digit_style", disabled=c != 1,
                           help="MNIST's own preprocessing for photos of digits: levels stretched (paper to black, "
                                "ink to white), the ink fitted into a 20x20 box and centred by its centre of mass. "
                                "Measured on 300 photo-style MNIST digits (bench/photo_digits.py): the MNIST JEM's "
                                "accuracy goes from 51% to 98% and its unusual-input flags from 100% to 6%",
                           **ui.PERSIST)
    b.radio("Attribution method", list(METHODS), format_func=METHODS.get, key="score_method", horizontal=True,
            **ui.PERSIST)
    examples = d.toggle("Show example inputs", value=True, key="score_examples", disabled=ctx.test_set() is None,
                        help=f"{N_EXAMPLES} test images, a Fashion-MNIST item (when available) and uniform noise, "
                             "scored like uploads", **ui.PERSIST)
    names, tensors, notes, stages, blanks = [], [], [], [], []
    if files:
        prepared, errors = prepare_uploads([(f.name, f.getvalue()) for f in files], c, h, INVERT[invert],
                                           digit_style=digit_style)
        for _, msg in errors:
            st.error(msg)
        for p in prepared:
            names.append(p.name)
            tensors.append(p.tensor)
            notes.append(p.notes)
            stages.append(p.stages)
            blanks.append(p.blank)
    test = ctx.test_set()
    if examples and test is not None:
        for name, x, note in example_inputs(ctx, test):
            names.append(name)
            tensors.append(x)
            notes.append([note])
            stages.append([])
            blanks.append(False)
    return names, (torch.stack(tensors) if tensors else None), notes, stages, blanks


def test_scores(ctx: ui.Context) -> dict[str, torch.Tensor] | None:
    """The three OOD scores of the first test images under the chosen model (shared cache; read from a stored
    table when there is one: ``StoredScores.stored`` then says which), or None without a test set."""
    test = ctx.test_set()
    if test is None:
        return None
    n = min(ui.SCORE_REFERENCE_IMAGES, len(test))
    model, x = ctx.model.model, test.x[:n]
    return ui.cached(("score_ref", ctx.key, ctx.dataset, str(ctx.data_root), n),
                     lambda p: ood_score_table(model, x, OOD_SCORES, progress=p),
                     f"Scoring {n} test images for the reference histograms...",
                     stored=lambda: ui.stored_ood_scores(model, x, OOD_SCORES))


def why(ctx: ui.Context, i: int, x: torch.Tensor, ref: dict[str, torch.Tensor], key: str) -> None:
    """The image's place on the test images' histogram of every OOD score, with percentiles and thresholds."""
    mine = ood_score_table(ctx.model.model, x[i:i + 1], OOD_SCORES)
    places = {sc: place(float(mine[sc][0]), ref[sc]) for sc in OOD_SCORES}
    rows = [{"score": SCORE_LABELS[sc], "this image": pl.value, "percentile among test images": pl.percentile,
             f"threshold ({UNUSUAL_PERCENTILE:g}th percentile)": pl.threshold,
             "test images flagged by it": f"{pl.false_alarm_rate:.1%}", "verdict": "unusual" if pl.unusual else "typical"}
            for sc, pl in places.items()]
    marks = {SCORE_LABELS[sc]: (ref[sc], pl.value, pl.threshold) for sc, pl in places.items()}
    ui.show_chart(ui.fig_placement(marks, f"Where this image falls among {len(ref[OOD_SCORES[0]])} "
                                   f"{ctx.dataset} test images (higher = more typical)"), key=f"score_why_{key}")
    st.dataframe(pd.DataFrame(rows), hide_index=True)
    stored = getattr(ref, "stored", None)
    if stored:
        st.caption(f"The test images' scores were read from a stored table, computed {stored['computed']} (UTC) "
                   f"with torch {stored['torch']} for these weights and images "
                   f"(`{ui.CHECKPOINT_DIR.name}/{ui.STORED_OOD.name}/{Path(stored['file']).name}`).")
    flagged = [SCORE_LABELS[sc] for sc, pl in places.items() if pl.unusual]
    if len(flagged) == len(places):
        st.caption("All three scores call it unusual: it differs from the test images in every way these scores "
                   "see, as another kind of image (a domain shift) does.")
    elif flagged:
        st.caption(f"Only {', '.join(flagged)} call{'s' if len(flagged) == 1 else ''} it unusual; the other "
                   "score(s) place it among typical test images. Look at the preprocessing pictures above: a grey "
                   "background, a faint or off-centre digit changes some scores more than others.")
    else:
        st.caption("All three scores place it among typical test images.")


def example_inputs(ctx: ui.Context, test) -> list[tuple[str, torch.Tensor, str]]:
    """(name, image [C, H, W], where it came from): test images, one Fashion-MNIST item, uniform noise."""
    out = [(f"test image {i} (label {ctx.class_names[int(test.y[i])]})", test.x[i],
            f"from the {ctx.dataset} test split, as stored") for i in range(min(N_EXAMPLES, len(test)))]
    if ctx.dataset != "fashion_mnist" and data_available("fashion_mnist", ctx.data_root, "test"):
        fm = load_ood_set("fashion_mnist", test.x[:1], ctx.data_root, n=1)
        out.append(("Fashion-MNIST test image 0", fm[0],
                    f"the first Fashion-MNIST test image, converted to {tuple(fm.shape[1:])} like the model's input"))
    noise = synthetic_ood("uniform", test.x[:1], 1, torch.Generator().manual_seed(0))
    out.append(("uniform noise", noise[0], "U[-1, 1] pixels (seed 0)"))
    return out


def reference_images(ck) -> str:
    """The images whose log p(x) the checkpoint's percentiles rank against, as its metadata names them (e.g.
    "mnist validation (first 2000)")."""
    return (ck.metadata.get("reference") or {}).get("split") or f"{ck.metadata.get('dataset')} test images"


def verdict(r, reference: str) -> None:
    if r.percentile is None:
        st.info("This checkpoint carries no reference statistics, so there is no percentile.")
    elif r.unusual:
        st.warning(f"Unusual input: log p(x) is at percentile {r.percentile:.1f} of the checkpoint's reference "
                   f"images, {reference} (below {UNUSUAL_PERCENTILE:g}).")
    else:
        st.success(f"Typical input: log p(x) is at percentile {r.percentile:.1f} of the checkpoint's reference "
                   f"images, {reference}.")


def main(ctx: ui.Context) -> None:
    names, x, notes, stages, blanks = inputs(ctx)
    if x is None:
        st.info("Upload one or more images (a photo of a handwritten digit works; so does anything else, which "
                "the energy should flag as unusual).")
        return
    ck = ctx.model
    method = st.session_state.get("score_method", "saliency")
    results = score_batch(ck.model, x, ck.metadata.get("reference"), ctx.class_names)
    base = (score_batch(ctx.baseline.model, x, ctx.baseline.metadata.get("reference"), ctx.class_names)
            if ctx.baseline is not None else None)
    cls_maps = attribution_maps(ck.model, x, "class", method)
    energy_maps = attribution_maps(ck.model, x, "energy", method)
    reference = reference_images(ck)
    ref = test_scores(ctx)
    first_unusual = next((i for i, r in enumerate(results) if r.unusual), -1)
    rows = []
    for i, (name, r) in enumerate(zip(names, results)):
        row = {"image": name, "predicted label": r.label, "class": r.label_name,
               "p(predicted)": r.probabilities[r.label], "energy E(x)": r.energy, "-E(x) (unnormalised log p(x))": r.log_px,
               "log p(x) percentile": r.percentile, "unusual": r.unusual}
        if base is not None:
            row["baseline predicted label"] = base[i].label
        rows.append(row)
    table = pd.DataFrame(rows)
    st.subheader("All images")
    st.dataframe(table, hide_index=True)
    ui.download_table(table, f"scores_{ctx.name}", key="score_table")
    for i, (name, r) in enumerate(zip(names, results)):
        with st.container(border=True):
            st.markdown(f"#### {name}")
            left, mid, right = st.columns([1, 2, 3])
            with left:
                st.image(ui.grid(x[i:i + 1]), caption="as the model sees it")
                st.markdown(f"Predicted label: **{r.label}**" + (f" ({r.label_name})" if r.label_name != str(r.label)
                                                                   else ""))
                if base is not None:
                    st.caption(f"baseline {ctx.baseline_entry.name} predicts {base[i].label} "
                               f"(p = {base[i].probabilities[base[i].label]:.3f})")
            with mid:
                ui.show_chart(ui.fig_probabilities(r.probabilities, ctx.class_names, "class probabilities p(y|x)"),
                              key=f"score_probs_{i}")
            with right:
                maps = {"input": ui.image_map(x[i]), f"class {r.label_name}": cls_maps[i],
                        "energy -E(x)": energy_maps[i]}
                signed = {f"class {r.label_name}": method != "saliency", "energy -E(x)": method != "saliency"}
                ui.show_chart(ui.fig_maps(maps, f"Attributions ({METHODS[method]})", signed, fixed={"input": (0, 1)}),
                              key=f"score_maps_{i}")
            m1, m2, m3, v = st.columns([1, 1, 1, 3])
            m1.metric("Energy E(x)", f"{r.energy:.3f}")
            m2.metric("-E(x)", f"{r.log_px:.3f}", help="the unnormalised log p(x) (logsumexp of the logits): "
                      "log p(x) = -E(x) - log Z; the Likelihood page estimates log Z")
            m3.metric("Percentile", "n/a" if r.percentile is None else f"{r.percentile:.1f}",
                      help=f"of log p(x) among the checkpoint's reference images, {reference}")
            with v:
                if blanks[i]:
                    st.warning("No visible content: after preprocessing this image is one flat grey level, so the "
                               "prediction and the energy shown for it are the model's answer to a blank picture "
                               "and say little about the upload. See the preprocessing steps.")
                verdict(r, reference)
            with st.expander("Preprocessing steps"):
                if stages[i]:
                    cols = st.columns(len(stages[i]))
                    for col, (cap, pic) in zip(cols, stages[i]):
                        col.image(pic, caption=cap, width=112)
                st.write("\n".join(f"- {n}" for n in notes[i]) or "none")
            with st.expander("Why this verdict: the image on the test set's score histograms",
                             expanded=bool(r.unusual) and i == first_unusual):
                if ref is None:
                    st.info("Needs the test set (see the sidebar) for the histograms.")
                else:
                    why(ctx, i, x, ref, str(i))


ui.run_page(main, "Score an image", "Upload images (or look at the examples) and see the prediction, the energy "
            "and whether the model finds the input unusual; works offline from the checkpoint alone.")
