"""Home: what JEM is in a few sentences, the loaded models at a glance, links to the pages."""

import streamlit as st

from app import ui
from jem_core.evaluation import calibration_report

INTRO = r"""
A **Joint Energy-based Model** (Grathwohl et al., 2019, *Your classifier is secretly an energy based
model and you should treat it like one*) reads an ordinary classifier's logits $f_\theta(x)$ as energies:
$E(x, y) = -f_\theta(x)[y]$ and $E(x) = -\log\sum_y \exp f_\theta(x)[y]$. The classifier $p(y|x)$ is unchanged,
and the same network now also gives an unnormalised density $\log p(x) = -E(x) - \log Z$.
Training adds a term $E(x_\text{data}) - E(x_\text{sample})$ to the cross-entropy, with samples drawn by
**SGLD** (Langevin dynamics) from a persistent replay buffer. The payoff: samples, in-painting and class
translation from a classifier, better **calibration**, **out-of-distribution** detection by energy, and
more **robustness** to adversarial attacks. Each page below compares the chosen model with its baseline.
"""

N_HOME = 2000  # test images for the at-a-glance ECE


def main(ctx: ui.Context) -> None:
    st.markdown(INTRO)
    test = ctx.test_set()
    n = min(N_HOME, len(test)) if test is not None else 0
    models = ctx.models()
    for col, (name, ck, key) in zip(st.columns(len(models)), models):
        with col:
            m = ck.metadata
            st.subheader(name)
            st.caption(f"dataset `{m.get('dataset')}` · objective `{m.get('objective')}`"
                       + (" (semi-supervised)" if m.get("semi_supervised") else ""))
            acc = (m.get("metrics") or {}).get("test_accuracy")
            a, b = st.columns(2)
            a.metric("Test accuracy (model card)", f"{acc * 100:.2f}%" if isinstance(acc, float) else "n/a")
            if n:
                rep = calibration_report(ui.test_probabilities(ctx, name, ck, key, n), test.y[:n], 15)
                b.metric(f"ECE ({n} {ctx.dataset} test images)", f"{rep.ece:.4f}")
            else:
                b.metric("ECE", "needs test data")
            if ck.replay_buffer is not None and len(ck.replay_buffer):
                ui.show_grid(ck.replay_buffer[:36], f"{name}: samples from its replay buffer (SGLD)",
                             key=f"home_grid_{name}", nrow=6, file_name=f"{name}_samples.png")
            else:
                st.info("No replay buffer stored (a baseline classifier is not trained to sample); "
                        "draw chains on the Langevin page.")
    if test is None:
        st.info(ctx.data_message + " ECE and the evaluation pages need test images; scoring uploads and "
                "sampling work from the checkpoint alone.")
    st.subheader("Pages")
    for file, *_ in ui.PAGE_SPECS[1:]:
        ui.page_link(file)


ui.run_page(main, "JEM Explorer", "Joint Energy-based Models: one network, a classifier and a generative model.")
