"""Home: what JEM is in a few sentences, a "start here" path through the pages, the loaded models at a
glance (accuracy, ECE with intervals, samples) and a calibration verdict written from those numbers.

What does not live here: the metrics and verdicts (:mod:`jem_core.evaluation`), the sidebar
(``app/registry.py``).
"""

import streamlit as st

from app import ui
from jem_core.evaluation import calibration_report
from jem_core.evaluation.verdicts import calibration_verdict, ece_intervals, wilson_interval

INTRO = r"""
A **Joint Energy-based Model** (Grathwohl et al., 2019, *Your classifier is secretly an energy based
model and you should treat it like one*) reads an ordinary classifier's logits $f_\theta(x)$ as energies:
$E(x, y) = -f_\theta(x)[y]$ and $E(x) = -\log\sum_y \exp f_\theta(x)[y]$. The classifier $p(y|x)$ is unchanged,
and the same network now also gives an unnormalised density $\log p(x) = -E(x) - \log Z$.
Training adds a term $E(x_\text{data}) - E(x_\text{sample})$ to the cross-entropy, with samples drawn by
**SGLD** (Langevin dynamics) from a persistent replay buffer. The paper's claims: samples, in-painting and
class translation from a classifier, better **calibration**, **out-of-distribution** detection by energy,
and more **robustness** to adversarial attacks. Each page tests one claim on the chosen model against its
baseline and says what the numbers show, whichever way they come out.
"""

#: The suggested order through the pages, with what each one shows first.
START_HERE = [
    ("langevin.py", "the classifier draws digits: SGLD chains run by themselves from its replay buffer."),
    ("calibration.py", "is its confidence its accuracy? Reliability diagrams against the baseline."),
    ("ood.py", "does the energy tell the model's own data from other images (Fashion-MNIST, noise, blends)?"),
    ("robustness.py", "a small PGD attack on both models, computed when the page opens."),
    ("score.py", "example inputs scored: prediction, energy, and whether the model finds them unusual."),
    ("likelihood.py", "how good a density is it? log Z by annealed importance sampling, in nats and bits/dim."),
    ("train.py", "the bundled model's own training curves; then train one yourself."),
    ("playground.py", "the whole idea in 2-D: decision regions, the exact density and live SGLD particles."),
]


def start_here() -> None:
    st.subheader("Start here")
    for i, (file, what) in enumerate(START_HERE, start=1):
        ui.page_link(file, number=i, description="")
        st.caption(what)
    for file in [spec[0] for spec in ui.PAGE_SPECS[1:] if spec[0] not in {f for f, _ in START_HERE}]:
        ui.page_link(file, description="")
        st.caption(next(spec[3] for spec in ui.PAGE_SPECS if spec[0] == file))


def main(ctx: ui.Context) -> None:
    left, right = st.columns([3, 2], gap="large")
    left.markdown(INTRO)
    with right:
        start_here()
    test = ctx.test_set()
    n = min(ui.FIRST_VIEW_TEST_IMAGES, len(test)) if test is not None else 0
    models = ctx.models()
    reports, captions = {}, {}
    for col, (name, ck, key) in zip(st.columns(len(models)), models):
        with col:
            m = ck.metadata
            st.subheader(name)
            st.caption(f"dataset `{m.get('dataset')}` · objective `{m.get('objective')}`"
                       + (" (semi-supervised)" if m.get("semi_supervised") else ""))
            a, b = st.columns(2)
            if n:
                rep = calibration_report(ui.test_probabilities(ctx, name, ck, key, n), test.y[:n], 15)
                reports[name] = rep
                acc = wilson_interval(int(rep.correct.sum()), n)
                a.metric(f"Accuracy ({n:,} test images)", f"{acc.value * 100:.2f}%",
                         help="on the first test images; the model card's figure is on the whole test split")
                b.metric(f"ECE ({n:,} {ctx.dataset} test images)", f"{rep.ece:.4f}",
                         help="expected calibration error, 15 equal-width bins (0 = calibrated)")
                captions[name] = (st.empty(), acc)  # filled in below, once the ECE intervals are there
            else:
                card = (m.get("metrics") or {}).get("test_accuracy")
                a.metric("Test accuracy (model card)", f"{card * 100:.2f}%" if isinstance(card, float) else "n/a")
                b.metric("ECE", "needs test data")
            if ck.replay_buffer is not None and len(ck.replay_buffer):
                ui.show_grid(ck.replay_buffer[:36], f"{name}: samples from its replay buffer (SGLD)",
                             key=f"home_grid_{name}", nrow=6, file_name=f"{name}_samples.png")
            else:
                st.info("No replay buffer stored (a baseline classifier is not trained to sample); "
                        "draw chains on the Langevin page.")
    # One bootstrap for every model's ECE interval and the verdict's paired difference (not one per use).
    intervals = ece_intervals(list(reports.values())) if reports else ([], None)
    for (slot, acc), ece in zip(captions.values(), intervals[0]):
        slot.caption(f"95% intervals: accuracy {acc.lo * 100:.2f}-{acc.hi * 100:.2f}% (Wilson), ECE "
                     f"{ece.lo:.4f}-{ece.hi:.4f} (bootstrap) · on the first {n:,} test images, so the accuracy "
                     "differs from the model card's whole-split figure")
    if len(reports) == 2:
        (na, ra), (nb, rb) = reports.items()
        st.markdown("**Calibration, measured here.** " + calibration_verdict(
            na, ra, nb, rb, f"these {n:,} {ctx.dataset} test images", intervals=intervals) + " See the Calibration "
            "page's reliability diagram.")
    if test is None:
        st.info(ctx.data_message + " ECE and the evaluation pages need test images; scoring uploads and "
                "sampling work from the checkpoint alone.")


ui.run_page(main, "JEM Explorer", "Joint Energy-based Models: one network, a classifier and a generative model.")
