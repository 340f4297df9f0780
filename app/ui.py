"""Page plumbing of the dashboard, and the one import surface of the pages (``from app import ui``).

Here: the page runner (title, intro, errors kept inside the page, a cancelled computation), the test-set
guard and slider, pictures and downloads, showing a chart, and the navigation (:data:`PAGE_SPECS`). The
rest is re-exported from the modules that own it, so a page reads ``ui.cached``, ``ui.fig_lines``,
``ui.Context``:

- ``app/registry.py``: models, data, the sidebar and its :class:`Context`;
- ``app/compute.py``: the shared result cache, progress boxes, the worker limit;
- ``app/figures.py``: plotly figure builders;
- ``app/share.py``: page settings in the URL.

Caching (docs/ARCHITECTURE.md): checkpoints and datasets are ``st.cache_resource`` (shared, never mutated);
evaluation results go through :func:`cached`; per-user state lives in ``st.session_state``.

What does not live here: the logic of the re-exported pieces (the modules above) and anything computed
(``jem_core``).
"""

from __future__ import annotations

import json
import os
import math
import traceback
from typing import Any, Callable, Sequence

import pandas as pd
import plotly.graph_objects as go
import streamlit as st
import torch
from PIL import Image

from app.compute import (N_WORKERS, Cancelled, _workers, cached, current_session_id, digest_files, live_interval,
                         live_sessions, live_share, progress_box, refresh_interval, session_alive, start_memory_keeper,
                         worker, workers_busy)
from app.figures import (CLASS_COLORS, COLORS, ChainTracesPicture, difference_images, fig_chain_energy, fig_chain_predictions, fig_histograms, fig_lines, fig_maps, fig_placement,
                         fig_probabilities, fig_reliability, fig_roc, image_map)
from app.registry import (CHECKPOINT_DIR, FIRST_VIEW_TEST_IMAGES, LIKELIHOOD_CHAINS, LIKELIHOOD_REVERSE,
                          LIKELIHOOD_SAMPLER, LIKELIHOOD_SCHEDULE, LIKELIHOOD_TEST_IMAGES, ROOT,
                          SCORE_REFERENCE_IMAGES, STORED_OOD, TOY_PRETRAIN_ITERS,
                          TRAIN_RUN, Context, ModelEntry, _default_pair, context, likelihood_report, likelihood_temps,
                          shape_of, sidebar, stored_ood_scores, test_probabilities, toy_pair_for_visit, toy_spec,
                          warm_up)
from jem_core.data import ImageDataset
from jem_core.images import make_grid_image, png_bytes
from jem_core.perf import SERVER_MMAP_THRESHOLD, tune_malloc

__all__ = [
    "CHAIN_INTERVAL", "CHECKPOINT_DIR", "CLASS_COLORS", "COLORS", "Cancelled", "Context", "FIRST_VIEW_TEST_IMAGES",
    "LIKELIHOOD_CHAINS",
    "LIKELIHOOD_REVERSE", "LIKELIHOOD_SAMPLER", "LIKELIHOOD_SCHEDULE", "LIKELIHOOD_TEST_IMAGES", "LIVE_INTERVAL",
    "ModelEntry", "N_WORKERS", "PAGES_DIR", "PAGE_SPECS", "PERSIST", "ROOT", "SCORE_REFERENCE_IMAGES", "STORED_OOD", "TRAIN_RUN", "_default_pair",
    "_workers", "cached", "ChainTracesPicture", "chosen", "context", "current_session_id", "difference_images", "digest_files", "display_scale",
    "download_json", "download_png", "download_table", "fig_chain_energy", "fig_chain_predictions",
    "fig_histograms", "fig_lines", "fig_maps", "fig_placement", "fig_probabilities", "fig_reliability",
    "fig_roc", "grid", "image_map", "likelihood_report", "likelihood_temps", "live_interval", "live_sessions",
    "live_share", "make_pages", "n_test_control", "need_test_set", "page_link",
    "progress_box", "refresh_interval", "run_page", "session_alive", "shape_of",
    "show_chart", "show_grid", "sidebar", "stored_ood_scores", "test_probabilities", "TOY_PRETRAIN_ITERS", "toy_pair_for_visit", "toy_spec", "warm_up",
    "worker", "workers_busy",
]

# Once per server process: SGLD's blocks stay in the heap (fast steps), blocks over 4 MiB are mapped on their
# own (the heap does not fragment), every session's threads share N_WORKERS malloc arenas, and the free heap
# goes back to the system every MEMORY_RELEASE_S seconds (jem_core.perf, app/compute.py, bench/README.md).
tune_malloc(arena_max=N_WORKERS, mmap_threshold=SERVER_MMAP_THRESHOLD)
if current_session_id() is not None:  # a server's (or AppTest's) script run, not a bare import of the app
    start_memory_keeper()

PAGES_DIR = ROOT / "pages"
#: Seconds between ticks of live parts (training curves, the playground).
LIVE_INTERVAL = 0.5
#: Seconds between refreshes of the live Langevin chains with one session live (more sessions:
#: :func:`refresh_interval`); each refresh spends at most about half of its interval on SGLD.
CHAIN_INTERVAL = float(os.environ.get("JEM_CHAIN_INTERVAL", 0.15))
PERSIST = {"persist_state": "session"}  # page widgets keep their value across page switches


# ------------------------------------------------------------------------------------ page runner
def run_page(body: Callable[[Context | None], None], title: str, intro: str | None = None,
             needs_model: bool = True) -> None:
    """Title, intro, then ``body(ctx)``; any failure is shown in the page and the app keeps working.

    ``needs_model=False`` for a page that does not use the sidebar's models (``body`` may get None); the sidebar
    then says so, under the pickers."""
    st.title(title)
    if not needs_model:
        st.sidebar.caption("This page does not use the models and the dataset chosen above: they are for the other "
                           "pages.")
    if intro:
        st.caption(intro)
    ctx = context()
    if ctx is None and needs_model:
        st.error("No model is loaded: choose or upload one in the sidebar.")
        return
    try:
        body(ctx)
    except Cancelled as c:
        st.info(f"Cancelled: {str(c).rstrip('.')}. Nothing was kept; change the settings or run it again.")
    except Exception as e:  # noqa: BLE001 - show any failure in the page, keep the app alive
        st.error(f"This page hit an error: {type(e).__name__}: {e}")
        with st.expander("Details"):
            st.code("".join(traceback.format_exception(e)))


def chosen(key: str, options: Sequence[Any], format_func: Callable[[Any], Any] = str) -> Any:
    """The option that the choice widget ``key`` (a radio or a selectbox over ``options`` drawn with
    ``format_func``) holds in ``st.session_state``, for code that reads it before the widget is drawn in this run
    (a button's callback).

    Streamlit keeps a choice as its label and, when that label is not among the options the widget last drew
    with, hands back the label string itself instead of an option (``RadioSerde.deserialize`` in Streamlit
    1.67); a live chain session once got ``'replay buffer'`` for its start. A label is mapped back to its option
    here; a value that is neither an option nor a label, or a missing one, gives the first option.

    Raises:
        ValueError: ``options`` is empty.
    """
    if not options:
        raise ValueError(f"the choice widget {key!r} has no options")
    v = st.session_state.get(key, options[0])
    if any(v is o or (type(v) is type(o) and v == o) for o in options):
        return v
    labels = {str(format_func(o)): o for o in options}
    return labels.get(v, options[0]) if isinstance(v, str) else options[0]


def need_test_set(ctx: Context) -> ImageDataset | None:
    """The test set, or an info box saying why it is missing (then None)."""
    test = ctx.test_set()
    if test is None:
        st.info(f"This part needs the `{ctx.dataset}` test set. {ctx.data_message} Put the data in the data root "
                "(sidebar) or choose the digits models, whose data ships with scikit-learn.")
    return test


def n_test_control(total: int, default: int, key: str, label: str = "Number of test images",
                   minimum: int = 10) -> int:
    """Slider for how many test images a computation uses (the first ones of the test split)."""
    minimum = max(1, min(minimum, total))
    default = max(minimum, min(default, total))
    step = 10 if total >= 200 else 1
    if key in st.session_state and not minimum <= st.session_state[key] <= total:
        del st.session_state[key]
    return int(st.slider(label, minimum, total, default, step=step, key=key, **PERSIST))


# ----------------------------------------------------------------------------- images, downloads
def display_scale(side: int, per_row: int = 1) -> int:
    """Integer upscaling so that a tile is 40-96 screen pixels wide and a row stays under ~720 px."""
    target = max(40, min(96, 720 // max(1, per_row)))
    return max(1, round(target / side))


def grid(x: torch.Tensor, nrow: int | None = None) -> Image.Image:
    """Tile ``[N, C, H, W]`` images in ``[-1, 1]`` into one picture at a visible size."""
    n = x.shape[0]
    nrow = nrow or math.ceil(math.sqrt(n))
    return make_grid_image(x, nrow=nrow, scale=display_scale(x.shape[-1], min(nrow, n)))


def show_grid(x: torch.Tensor, caption: str, key: str, nrow: int | None = None, file_name: str | None = None) -> None:
    """Show an image grid with a PNG download button."""
    img = grid(x, nrow)
    st.image(img, caption=caption)
    download_png(img, file_name or f"{key}.png", key=f"{key}_png")


def download_png(img: Image.Image, file_name: str, key: str, label: str = "Download PNG") -> None:
    st.download_button(label, png_bytes(img), file_name=file_name, mime="image/png", key=key, on_click="ignore")


def download_table(df: pd.DataFrame, stem: str, key: str) -> None:
    """CSV and JSON download buttons for a table."""
    a, b = st.columns(2)
    a.download_button("Download CSV", df.to_csv(index=False).encode(), file_name=f"{stem}.csv", mime="text/csv",
                      key=f"{key}_csv", on_click="ignore")
    b.download_button("Download JSON", df.to_json(orient="records", indent=2).encode(), file_name=f"{stem}.json",
                      mime="application/json", key=f"{key}_json", on_click="ignore")


def download_json(obj: Any, file_name: str, key: str, label: str = "Download JSON") -> None:
    st.download_button(label, json.dumps(obj, indent=2, default=float).encode(), file_name=file_name,
                       mime="application/json", key=key, on_click="ignore")


def show_chart(fig: go.Figure, key: str) -> None:
    """A plotly figure at the container's width; its toolbar appears on hover only, so that on narrow
    screens it does not cover the title."""
    st.plotly_chart(fig, width="stretch", key=key, config={"displaylogo": False, "displayModeBar": "hover"})


# -------------------------------------------------------------------------------------- navigation
#: (file in pages/, title, icon, one-line description) of every page, in menu order.
PAGE_SPECS = [
    ("home.py", "Home", ":material/home:", "What JEM is, the loaded models at a glance."),
    ("langevin.py", "Langevin chains", ":material/blur_on:",
     "Live SGLD chains, in-painting and class translation."),
    ("calibration.py", "Calibration", ":material/tune:",
     "Confidence histograms, reliability diagrams, ECE / MCE / NLL / Brier."),
    ("robustness.py", "Robustness", ":material/shield:",
     "PGD and FGSM attacks, accuracy versus eps, SGLD refinement."),
    ("ood.py", "OOD detection", ":material/travel_explore:",
     "log p(x), max p(y|x) and gradient-norm scores against OOD sets."),
    ("likelihood.py", "Likelihood", ":material/functions:",
     "Normalised log p(x): log Z by annealed importance sampling, test log p(x) in nats and bits/dim."),
    ("score.py", "Score an image", ":material/image_search:",
     "Upload images: prediction, energy, unusual-input verdict, attributions."),
    ("train.py", "Train", ":material/model_training:",
     "Train a JEM or baseline in the background with live curves."),
    ("playground.py", "2-D playground", ":material/scatter_plot:",
     "JEM vs baseline on 2-D points: regions, exact p(x), energy, live SGLD particles."),
]
_PAGES: dict[str, Any] = {}


def make_pages() -> list[Any]:
    """``st.Page`` objects for ``st.navigation`` (the files live in the top-level ``pages/`` folder)."""
    pages = []
    for i, (file, title, icon, _) in enumerate(PAGE_SPECS):
        page = st.Page(PAGES_DIR / file, title=title, icon=icon, default=i == 0)
        _PAGES[file] = page
        pages.append(page)
    return pages


def page_link(file: str, number: int | None = None, description: str | None = None) -> None:
    """A link to another page with its description (``description`` replaces the menu's one-liner;
    ``number`` prefixes a step number)."""
    spec = next(s for s in PAGE_SPECS if s[0] == file)
    text = spec[3] if description is None else description
    label = f"{f'{number}. ' if number else ''}{spec[1]}" + (f": {text}" if text else "")
    st.page_link(_PAGES.get(file, str(PAGES_DIR / file)), label=label, icon=spec[2])
