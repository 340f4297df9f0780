"""Shared UI pieces of the dashboard: data root, model picker, cached loaders, page runner, figures.

Everything here is *presentation*: choosing and loading what the user asked for, turning plain
results of ``jem_core`` into plotly figures and pictures, offering downloads. Computations live
in ``jem_core``; a page calls one library function and hands its result to a builder below.

Caching (docs/ARCHITECTURE.md): checkpoints and datasets are ``st.cache_resource`` (shared, never
mutated: loaded models are in eval mode with ``requires_grad`` off); evaluation results go through
:func:`cached`, a small shared store keyed by model identity and settings that shows a progress
bar while it computes. Per-user state (chains, attack results, training runs) lives in
``st.session_state``.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import threading
import time
import traceback
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Sequence, TypeVar

import numpy as np
import pandas as pd
import plotly.graph_objects as go
import streamlit as st
import torch
from plotly.subplots import make_subplots
from PIL import Image

from app import share
from jem_core.checkpoint import CheckpointError, LoadedCheckpoint, load_checkpoint
from jem_core.data import (BUILTIN_DATASETS, DataUnavailableError, ImageDataset, data_available, dataset_shape,
                           default_data_root, demo_pack_file, load_dataset)
from jem_core.images import make_grid_image, png_bytes
from jem_core.perf import tune_malloc

tune_malloc()  # once per server process: faster SGLD steps on CPU (jem_core.perf)

#: Heavy computations (evaluations, attacks, AIS, live-chain steps) that may run at once in this server,
#: across all sessions: one per CPU core (``$JEM_WORKERS`` overrides). Each runs torch on one thread, so
#: the cores are shared fairly instead of oversubscribed (two 2-thread pools on 2 shared cores were
#: measured 10x slower).
N_WORKERS = max(1, int(os.environ.get("JEM_WORKERS", 0)) or (os.cpu_count() or 1))
torch.set_num_threads(int(os.environ.get("JEM_TORCH_THREADS", 1)))

T = TypeVar("T")

ROOT = Path(__file__).resolve().parent.parent
CHECKPOINT_DIR = ROOT / "checkpoints"
PAGES_DIR = ROOT / "pages"
SHARED_DATA = ROOT.parent / "shared" / "data"

#: Seconds between ticks of live parts (Langevin chains, training curves).
LIVE_INTERVAL = 0.5
#: Seconds between refreshes of the live Langevin chains (each refresh spends at most about half of it on SGLD).
CHAIN_INTERVAL = 0.2
#: Colours of the models in every figure: the chosen model, its baseline, extra curves.
COLORS = ["#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f"]
#: Discrete colours for class indices (prediction heat maps).
CLASS_COLORS = ["#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f",
                "#bcbd22", "#17becf"]
PERSIST = {"persist_state": "session"}  # page widgets keep their value across page switches

_CTX = "_jem_ctx"
_EXTRA = "_jem_extra_models"        # models added in this session: uploads, files, trained runs
_UPLOADS = "_jem_upload_bytes"      # digest -> bytes of uploaded checkpoints
_UPLOAD_ERRORS = "_jem_upload_errors"
_NEXT_MODEL = "_jem_select_next"    # a label to select in the picker on the next run
_DEFAULT_NOTE = "_jem_default_note"
TRAIN_RUN = "tr_run"                # the Train page's current run (a dict filled by its background thread)


# ------------------------------------------------------------------------------------ data root
def detected_data_root() -> tuple[Path, str]:
    """The data root to use by default and why: ``$JEM_DATA_ROOT``, else ``<repo>/../shared/data``
    when it exists (the development machines), else :func:`jem_core.data.default_data_root`."""
    env = os.environ.get("JEM_DATA_ROOT")
    if env:
        return Path(env).expanduser(), "from $JEM_DATA_ROOT"
    if SHARED_DATA.is_dir():
        return SHARED_DATA.resolve(), "auto-detected ../shared/data next to the repository"
    return default_data_root(), "the default data root (set JEM_DATA_ROOT to change it)"


# ------------------------------------------------------------------------------- model registry
@dataclass(frozen=True)
class ModelEntry:
    """A model the picker offers.

    Attributes:
        label: text shown in the picker (unique).
        source: ``"bundled"``, ``"file"``, ``"upload"`` or ``"trained"``.
        path: checkpoint file (bundled, file, trained) or None.
        digest: sha256 of the uploaded bytes (upload) or None.
    """

    label: str
    source: str
    path: str | None = None
    digest: str | None = None

    @property
    def name(self) -> str:
        """Short name for legends and file names."""
        if self.path:
            return Path(self.path).stem
        return self.label.split(" (")[0].removesuffix(".pt")


def bundled_entries() -> list[ModelEntry]:
    """The checkpoints shipped in ``checkpoints/`` (resume files left out)."""
    if not CHECKPOINT_DIR.is_dir():
        return []
    files = sorted(p for p in CHECKPOINT_DIR.glob("*.pt") if not p.name.endswith(".resume.pt"))
    return [ModelEntry(f"{p.name} (bundled)", "bundled", str(p)) for p in files]


def session_entries() -> list[ModelEntry]:
    """Models added in this browser session (uploads, files on disk, models trained here)."""
    return list(st.session_state.get(_EXTRA, []))


def add_session_entry(entry: ModelEntry, select: bool = False) -> None:
    """Add a model to this session's picker; ``select`` makes it the chosen model on the next run."""
    extra = st.session_state.setdefault(_EXTRA, [])
    if entry not in extra:
        extra.append(entry)
    if select:
        st.session_state[_NEXT_MODEL] = entry.label


def register_finished_training() -> None:
    """Put the checkpoint of a finished (or stopped) training run of this session into the picker."""
    run = st.session_state.get(TRAIN_RUN)
    if run and run["status"] != "running" and not run["registered"]:
        run["registered"] = True
        if Path(run["out"]).is_file():
            from jem_core.checkpoint import read_checkpoint
            from jem_core.recipes import accuracy_summary

            try:  # the label carries its accuracy, and "under-trained" far below the recipe's target
                summary = accuracy_summary(read_checkpoint(run["out"]).get("metadata") or {})
            except Exception:  # noqa: BLE001 - the label is a courtesy; the picker entry must still appear
                summary = ""
            run["label"] = f"{run['name']} [{summary}] (trained here)" if summary else f"{run['name']} (trained here)"
            add_session_entry(ModelEntry(run["label"], "trained", run["out"]))


def _mtime(path: str) -> int:
    try:
        return os.stat(path).st_mtime_ns
    except OSError:
        return 0


def entry_key(e: ModelEntry) -> str:
    """Identity of the model's current weights, used as a cache key (changes when the file changes)."""
    if e.source == "upload":
        return f"upload:{e.digest}"
    return f"{e.source}:{e.path}@{_mtime(e.path or '')}"


def _frozen(ck: LoadedCheckpoint) -> LoadedCheckpoint:
    # Cached models are shared by every session: no parameter ever needs a gradient in the app.
    ck.model.eval().requires_grad_(False)
    return ck


@st.cache_resource(max_entries=16, show_spinner="Loading checkpoint...")
def _load_path(path: str, mtime_ns: int) -> LoadedCheckpoint:
    return _frozen(load_checkpoint(path))


@st.cache_resource(max_entries=8, show_spinner="Loading checkpoint...")
def _load_bytes(digest: str, _data: bytes) -> LoadedCheckpoint:
    return _frozen(load_checkpoint(bytes(_data)))


def load_entry(e: ModelEntry) -> LoadedCheckpoint:
    """The loaded checkpoint of an entry (cached). Raises CheckpointError."""
    if e.source == "upload":
        data = st.session_state.get(_UPLOADS, {}).get(e.digest)
        if data is None:
            raise CheckpointError(f"the upload {e.label} is no longer in this session; upload it again")
        return _load_bytes(e.digest, data)
    return _load_path(str(e.path), _mtime(str(e.path)))


def shape_of(ck: LoadedCheckpoint) -> tuple[int, int, int]:
    """``(C, H, W)`` of the model's inputs."""
    m = ck.metadata
    return int(m["in_channels"]), int(m["image_size"]), int(m["image_size"])


def class_names(ck: LoadedCheckpoint) -> list[str]:
    m = ck.metadata
    names = m.get("class_names") or []
    k = int(m["n_classes"])
    return [str(n) for n in names] if len(names) == k else [str(i) for i in range(k)]


def _compatible(a: LoadedCheckpoint, b: LoadedCheckpoint) -> bool:
    return shape_of(a) == shape_of(b) and int(a.metadata["n_classes"]) == int(b.metadata["n_classes"])


# --------------------------------------------------------------------------------------- datasets
@st.cache_resource(max_entries=6, show_spinner="Loading the test set...")
def _test_set(spec: str, root: str, channels: int, size: int) -> ImageDataset:
    return load_dataset(spec, "test", root, download=False, channels=channels, size=size)


@st.cache_resource(max_entries=4, show_spinner="Loading the training set...")
def train_set(spec: str, root: str) -> ImageDataset:
    """The training split of a dataset (cached; never mutate it)."""
    return load_dataset(spec, "train", root, download=False)


def _dataset_ok(spec: str, root: Path) -> bool:
    try:
        return data_available(spec, root, "test")
    except Exception:  # noqa: BLE001 - a malformed spec from an uploaded checkpoint's metadata
        return False


# ---------------------------------------------------------------------------------------- context
@dataclass
class Context:
    """What the sidebar chose for this run: the model, its baseline, the dataset and the data root."""

    model: LoadedCheckpoint
    entry: ModelEntry
    baseline: LoadedCheckpoint | None
    baseline_entry: ModelEntry | None
    dataset: str
    data_root: Path
    data_ok: bool
    data_message: str = ""
    _test: ImageDataset | None = field(default=None, repr=False)

    @property
    def key(self) -> str:
        return entry_key(self.entry)

    @property
    def shape(self) -> tuple[int, int, int]:
        return shape_of(self.model)

    @property
    def class_names(self) -> list[str]:
        return class_names(self.model)

    @property
    def name(self) -> str:
        return self.entry.name

    def models(self) -> list[tuple[str, LoadedCheckpoint, str]]:
        """``(name, checkpoint, cache key)`` for the model and, when chosen, the baseline."""
        out = [(self.entry.name, self.model, entry_key(self.entry))]
        if self.baseline is not None and self.baseline_entry is not None:
            name = self.baseline_entry.name
            out.append((name if name != self.entry.name else f"{name} (baseline)", self.baseline,
                        entry_key(self.baseline_entry)))
        return out

    def test_set(self) -> ImageDataset | None:
        """The chosen dataset's test split shaped for the model, or None when it is not available."""
        if not self.data_ok:
            return None
        if self._test is None:
            c, h, _ = self.shape
            try:
                self._test = _test_set(self.dataset, str(self.data_root), c, h)
            except (DataUnavailableError, ValueError, OSError) as e:
                self.data_ok, self.data_message = False, str(e)
                return None
            if tuple(self._test.x.shape[1:]) != self.shape:
                self.data_ok = False
                self.data_message = (f"{self.dataset} images are {tuple(self._test.x.shape[1:])}, "
                                     f"the model takes {self.shape}")
                self._test = None
        return self._test


def context() -> Context | None:
    """This run's :class:`Context` (built by the sidebar in ``app/Home.py``)."""
    return st.session_state.get(_CTX)


def _default_pair(entries: list[ModelEntry], root: Path) -> tuple[str | None, str | None, str]:
    """(model label, baseline label, note): the MNIST pair when MNIST test images are there (in the data
    root or the bundled demo pack), else the digits pair; ``JEM_EXPLORER_DEFAULT=digits|mnist`` forces one."""
    names = {Path(e.path).name: e.label for e in entries if e.path}
    forced = os.environ.get("JEM_EXPLORER_DEFAULT", "").strip().lower()

    def pair(family: str) -> tuple[str | None, str | None]:
        return names.get(f"{family}_jem.pt"), names.get(f"{family}_baseline.pt")

    if forced in ("digits", "mnist") and any(pair(forced)):
        m, b = pair(forced)
        return m or b, b if m else None, f"Opened on the {forced} models because JEM_EXPLORER_DEFAULT={forced}."
    m, b = pair("mnist")
    in_root = (root / "MNIST" / "raw" / "t10k-images-idx3-ubyte").is_file()
    if m and (in_root or demo_pack_file("mnist") is not None):
        where = (f"the data root {root}" if in_root else
                 "the bundled demo pack (the 10,000-image MNIST test split; training on MNIST needs the training "
                 "split in a data root, which the Train page can download)")
        return m, b, f"Opened on the MNIST pair, with MNIST test images from {where}."
    dm, db = pair("digits")
    if not (dm or db):
        first = entries[0].label if entries else None
        return first, None, "No bundled digits or MNIST models were found; opened on the first model available."
    if not m:
        why = "the MNIST JEM checkpoint (checkpoints/mnist_jem.pt) is not bundled"
    else:
        why = (f"no MNIST test images were found (not in the data root {root}, and the demo pack "
               "jem_core/demo_data/ is missing); the MNIST models still work from the picker for sampling and "
               "scoring uploads")
    note = f"Opened on the digits pair (scikit-learn's 8x8 digits, always available): {why}."
    return dm or db, db if dm else None, note


def _handle_uploads(entries_now: list[ModelEntry]) -> None:
    """The 'Add a model' box: upload a .pt or name a file on disk; bad files show an error only."""
    errors = st.session_state.setdefault(_UPLOAD_ERRORS, {})
    with st.sidebar.expander("Add a model (upload or file)"):
        up = st.file_uploader("Upload a checkpoint (.pt)", type=["pt", "pth"], key="sb_upload",
                              help=f"up to {st.get_option('server.maxUploadSize')} MB "
                                   "(server.maxUploadSize in .streamlit/config.toml)")
        if up is not None:
            data = up.getvalue()
            digest = hashlib.sha256(data).hexdigest()
            entry = ModelEntry(f"{up.name} (uploaded {digest[:6]})", "upload", None, digest)
            if digest not in errors and entry not in session_entries():
                st.session_state.setdefault(_UPLOADS, {})[digest] = data
                try:
                    _load_bytes(digest, data)
                    add_session_entry(entry, select=True)
                except CheckpointError as e:
                    errors[digest] = str(e)
                    st.session_state[_UPLOADS].pop(digest, None)
            if digest in errors:
                st.error(f"Could not load {up.name}: {errors[digest]} The previous model stays selected.")
        path = st.text_input("...or a checkpoint file on disk", key="sb_path", placeholder="/path/to/model.pt")
        if st.button("Load file", key="sb_load_path") and path.strip():
            p = str(Path(path.strip()).expanduser().resolve())
            try:
                _load_path(p, _mtime(p))
                add_session_entry(ModelEntry(f"{Path(p).name} (file {Path(p).parent.name}/)", "file", p), select=True)
            except CheckpointError as e:
                st.error(f"Could not load {p}: {e} The previous model stays selected.")


def _model_card(ck: LoadedCheckpoint, title: str) -> None:
    m = ck.metadata
    metrics = m.get("metrics") or {}
    acc = metrics.get("test_accuracy")
    objective = str(m.get("objective", "?")) + (" (semi-supervised)" if m.get("semi_supervised") else "")
    acc_text = f"**{acc * 100:.2f}%**" if isinstance(acc, (int, float)) else "not recorded"
    st.markdown(f"**{title}**  \ndataset: `{m.get('dataset', '?')}` · objective: `{objective}`  \n"
                f"test accuracy: {acc_text}")
    nll = metrics.get("test_nll")
    extra = {"architecture": f"{m.get('arch')} {m.get('arch_kwargs') or ''}", "parameters": m.get("parameters"),
             "input": "x".join(str(v) for v in shape_of(ck)), "epochs": metrics.get("epochs"),
             "test NLL": f"{nll:.4f}" if isinstance(nll, (int, float)) else None, "SGLD": m.get("sgld"),
             "divergence events": len(m.get("divergence_events") or []),
             "replay buffer": None if ck.replay_buffer is None else f"{len(ck.replay_buffer)} samples",
             "library version": m.get("version")}
    with st.expander(f"Details: {title.split(': ')[-1]}"):
        st.caption("  \n".join(f"{k}: {v}" for k, v in extra.items() if v not in (None, "")))


def sidebar() -> Context | None:
    """Draw the sidebar (model, baseline, dataset, data root, model card) and store the :class:`Context`."""
    st.session_state.pop(_CTX, None)
    sb = st.sidebar
    sb.markdown("### Model")
    picker = sb.container()
    bundled = bundled_entries()
    register_finished_training()
    _handle_uploads(bundled + session_entries())
    data_box = sb.expander("Data root")
    with data_box:
        detected, why = detected_data_root()
        root_text = st.text_input("Data root", value=str(detected), key="sb_data_root",
                                  help="torchvision-style folder with MNIST/, FashionMNIST/, ... Without it, the "
                                       "MNIST and Fashion-MNIST test images come from the bundled demo pack; the "
                                       "Train page can download MNIST's training split here")
    root = Path(root_text.strip() or str(detected)).expanduser()
    why = why if root == detected else "set in the sidebar"

    loaded: dict[str, tuple[ModelEntry, LoadedCheckpoint]] = {}
    broken: list[str] = []
    for e in bundled + session_entries():
        try:
            loaded[e.label] = (e, load_entry(e))
        except CheckpointError as err:
            broken.append(f"{e.label}: {err}")
    with picker:
        if not loaded:
            st.error(f"No model could be loaded. Put checkpoints in {CHECKPOINT_DIR} or upload one below.")
            for b in broken:
                st.caption(b)
            return None
        labels = list(loaded)
        if _DEFAULT_NOTE not in st.session_state:
            m_label, b_label, note = _default_pair([e for e, _ in loaded.values()], root)
            st.session_state[_DEFAULT_NOTE] = {"note": note, "model": m_label, "baseline": b_label or "(none)"}
            if m_label in loaded:
                st.session_state["sb_model"] = m_label
            if b_label in loaded:
                st.session_state["sb_baseline"] = b_label
        publish = share.sync([share.Param("sb_model", share.choice(labels)),
                              share.Param("sb_baseline", share.choice(["(none)", *labels])),
                              share.Param("sb_dataset", share.choice(BUILTIN_DATASETS))], share.SHARED_SCOPE)
        nxt = st.session_state.pop(_NEXT_MODEL, None)
        if nxt in loaded:
            st.session_state["sb_model"] = nxt
        if st.session_state.get("sb_model") not in loaded:
            st.session_state["sb_model"] = labels[0]
        model_label = st.selectbox("Model", labels, key="sb_model",
                                   help="bundled checkpoints, models trained on the Train page, uploads and files")
        entry, ck = loaded[model_label]
        base_opts = ["(none)"] + [lb for lb, (_, c) in loaded.items() if lb != model_label and _compatible(ck, c)]
        if st.session_state.get("sb_baseline") not in base_opts:
            guess = model_label.replace("_jem", "_baseline")
            baselines = [lb for lb in base_opts[1:] if loaded[lb][1].metadata.get("objective") == "baseline"]
            st.session_state["sb_baseline"] = guess if guess in base_opts else (baselines[0] if baselines else "(none)")
        base_label = st.selectbox("Baseline for comparisons", base_opts, key="sb_baseline",
                                  help="a model of the same input shape, shown beside the chosen one")
        base_entry, base_ck = loaded[base_label] if base_label in loaded else (None, None)

        own = str(ck.metadata.get("dataset", "digits"))
        c, h, _ = shape_of(ck)
        options = [own] + [d for d in BUILTIN_DATASETS if d != own and dataset_shape(d) is not None
                           and dataset_shape(d)[:2] == (c, h) and _dataset_ok(d, root)]
        if st.session_state.get("sb_dataset") not in options:
            st.session_state["sb_dataset"] = own
        dataset = st.selectbox("Dataset", options, key="sb_dataset",
                               help="test images used by the evaluation pages (the model's own dataset first)")
        ok = _dataset_ok(dataset, root)
        publish()
        opened = st.session_state[_DEFAULT_NOTE]
        if (model_label, base_label) == (opened["model"], opened["baseline"]):
            st.info(opened["note"])
        else:
            vs = f" against **{base_entry.name}**" if base_entry is not None else " (no baseline)"
            st.info(f"Showing **{entry.name}**{vs}, chosen in the picker or the link. {opened['note']}")
        _model_card(ck, f"Model card: {entry.name}")
        if base_ck is not None and base_entry is not None:
            _model_card(base_ck, f"Baseline: {base_entry.name}")
    for b in broken:
        sb.warning(f"Skipped a checkpoint that does not load: {b}")
    with data_box:
        st.caption(f"In use: `{root}` ({why}).")
    ctx = Context(ck, entry, base_ck, base_entry, dataset, root, ok,
                  "" if ok else f"The {dataset} test set is not in the data root {root}.")
    test = ctx.test_set() if ok else None
    sb.caption(f"Data root in use: `{root}` ({why}). " + (
        f"`{dataset}` test images: {len(test):,}" + (f", from {test.note}." if test.note else " from the data root.")
        if test is not None else
        f"`{dataset}` test data is not there: pages that need test images say so; scoring uploads and "
        "sampling still work from the checkpoint alone."))
    st.session_state[_CTX] = ctx
    return ctx


# ------------------------------------------------------------------------------------ page runner
def run_page(body: Callable[[Context], None], title: str, intro: str | None = None) -> None:
    """Title, intro, then ``body(ctx)``; any failure is shown in the page and the app keeps working."""
    st.title(title)
    if intro:
        st.caption(intro)
    ctx = context()
    if ctx is None:
        st.error("No model is loaded: choose or upload one in the sidebar.")
        return
    try:
        body(ctx)
    except Cancelled as c:
        st.info(f"Cancelled: {c}. Nothing was kept; change the settings or run it again.")
    except Exception as e:  # noqa: BLE001 - show any failure in the page, keep the app alive
        st.error(f"This page hit an error: {type(e).__name__}: {e}")
        with st.expander("Details"):
            st.code("".join(traceback.format_exception(e)))


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


# --------------------------------------------------------------------------------------- caching
@st.cache_resource
def _store() -> dict[str, Any]:
    return {"lock": threading.Lock(), "data": OrderedDict()}


class Cancelled(Exception):
    """The user pressed Cancel on a long computation (see :func:`progress_box`)."""


_CANCEL = "_jem_cancel"  # session_state: True after a Cancel click, until the next computation sees it


@contextlib.contextmanager
def progress_box(label: str) -> Iterator[Callable[[float], None]]:
    """A progress bar with elapsed time, an estimate of the time left, and a Cancel button.

    Yields ``progress(fraction in [0, 1])``. The estimate is measured throughput: ``elapsed * (1 - f) / f``.
    Cancel works by Streamlit's own interruption: its click reruns the script, which stops the running
    computation at its next progress update (no thread is left behind); the click also marks the session
    so that the computation asked for first on the rerun raises :class:`Cancelled` instead of starting
    again. Raises :class:`Cancelled` at entry when that mark is set.
    """
    if st.session_state.pop(_CANCEL, False):
        raise Cancelled(label)
    slot = st.empty()
    box = slot.container(border=True)
    bar = box.progress(0.0, text=label)
    box.button("Cancel", key=f"cancel_{hashlib.sha1(label.encode()).hexdigest()[:10]}", icon=":material/cancel:",
               on_click=lambda: st.session_state.__setitem__(_CANCEL, True))
    t0 = time.monotonic()

    def progress(f: float) -> None:
        f = min(max(float(f), 0.0), 1.0)
        elapsed = time.monotonic() - t0
        eta = f", about {elapsed * (1 - f) / f:.0f} s left" if 0.02 <= f < 1 and elapsed > 1 else ""
        bar.progress(f, text=f"{label} {f:.0%} · {elapsed:.0f} s{eta}")
    try:
        yield progress
    finally:
        slot.empty()


@st.cache_resource
def _workers() -> dict[str, Any]:
    return {"sem": threading.BoundedSemaphore(N_WORKERS), "lock": threading.Lock(), "busy": 0}


@contextlib.contextmanager
def worker(label: str, wait: bool = True) -> Iterator[bool]:
    """Hold one of the server's :data:`N_WORKERS` compute slots while the block runs.

    With ``wait``, shows "waiting for a free worker" until a slot frees (the wait can be interrupted like
    any script run) and yields True; without, yields False at once when every slot is busy, so a live
    view can skip a tick instead of queueing behind long computations.
    """
    w = _workers()
    got = w["sem"].acquire(blocking=False)
    if not got and wait:
        slot = st.empty()
        t0 = time.monotonic()
        while not got:
            slot.info(f"Waiting for a free worker for: {label} ({w['busy']} computations are using this machine's "
                      f"{N_WORKERS} worker{'s' if N_WORKERS > 1 else ''}; {time.monotonic() - t0:.0f} s so far)",
                      icon=":material/hourglass_top:")
            got = w["sem"].acquire(timeout=0.5)
        slot.empty()
    if got:
        with w["lock"]:
            w["busy"] += 1
    try:
        yield got
    finally:
        if got:
            with w["lock"]:
                w["busy"] -= 1
            w["sem"].release()


def workers_busy() -> int:
    """How many of the server's compute slots are in use now."""
    return int(_workers()["busy"])


def cached(key: tuple, compute: Callable[[Callable[[float], None]], T], label: str, max_items: int = 96) -> T:
    """Shared store of evaluation results keyed by ``key``; computes on a miss inside :func:`progress_box`,
    holding a :func:`worker` slot (so at most :data:`N_WORKERS` computations run at once, server-wide).

    ``compute`` receives a ``progress(fraction)`` callback. Keys must name everything the result
    depends on (model keys from :func:`entry_key`, dataset, number of images, settings).
    Raises :class:`Cancelled` when the user cancelled this computation.
    """
    s = _store()
    with s["lock"]:
        if key in s["data"]:
            s["data"].move_to_end(key)
            return s["data"][key]
    with worker(label), progress_box(label) as progress:
        value = compute(progress)
    with s["lock"]:
        s["data"][key] = value
        while len(s["data"]) > max_items:
            s["data"].popitem(last=False)
    return value


def digest_files(files: Iterable[Any]) -> str:
    """A short hash of uploaded files' names and bytes (cache key for uploads)."""
    h = hashlib.sha256()
    for f in files:
        h.update(str(getattr(f, "name", "")).encode())
        h.update(f.getvalue())
    return h.hexdigest()[:16]


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


# ----------------------------------------------------------------------------------- figures
def _layout(fig: go.Figure, title: str, xlabel: str, ylabel: str, height: int = 360) -> go.Figure:
    fig.update_layout(title=title, xaxis_title=xlabel, yaxis_title=ylabel, height=height,
                      margin=dict(l=10, r=10, t=50, b=10),
                      legend=dict(orientation="h", yanchor="top", y=-0.28, xanchor="left", x=0))
    return fig


def _np(v: Any) -> np.ndarray:
    return np.asarray(torch.as_tensor(v).detach().cpu().double()) if not isinstance(v, np.ndarray) else v


def fig_histograms(values: dict[str, Any], title: str, xlabel: str, nbins: int = 40, overlay: bool = True,
                   colors: Sequence[str] | None = None, value_range: tuple[float, float] | None = None,
                   log_y: bool = False) -> go.Figure:
    """Histograms (as fractions of each set) of several sets of values, overlaid or grouped.

    All sets share the same ``nbins`` bins over ``value_range`` (default: the range of all values).
    """
    fig = go.Figure()
    colors = colors or COLORS
    arrays = {name: _np(v)[np.isfinite(_np(v))] for name, v in values.items()}
    if value_range is None:
        nonempty = [a for a in arrays.values() if len(a)]
        lo = min((float(a.min()) for a in nonempty), default=0.0)
        hi = max((float(a.max()) for a in nonempty), default=1.0)
        value_range = (lo, hi if hi > lo else lo + 1.0)
    size = (value_range[1] - value_range[0]) / max(1, nbins)
    for i, (name, arr) in enumerate(arrays.items()):
        fig.add_histogram(x=arr, name=name, histnorm="probability", opacity=0.6 if overlay else 0.9,
                          xbins=dict(start=value_range[0], end=value_range[1] + 1e-9, size=size),
                          marker_color=colors[i % len(colors)])
    fig.update_layout(barmode="overlay" if overlay else "group")
    if log_y:
        fig.update_yaxes(type="log")
    return _layout(fig, title, xlabel, "fraction of images")


def fig_reliability(reports: dict[str, Any], title: str = "Reliability diagram",
                    colors: dict[str, str] | None = None) -> go.Figure:
    """Reliability diagrams in the form of Guo et al. (2017, fig. 1), one panel per model on shared axes.

    Per confidence bin: the accuracy ("outputs", the model's colour), the gap to the diagonal (red, from the
    accuracy to the bin's mean confidence: below the diagonal = over-confident), and the number of images
    (written on the bar, and in the lower row on a log scale). Bins holding fewer than
    ``max(5, 0.5% of the images)`` are drawn faint: their accuracy is too noisy to read.

    ``reports``: name -> :class:`jem_core.evaluation.calibration.CalibrationReport`; ``colors``: name -> colour
    (default: :data:`COLORS` in order).
    """
    names = list(reports)
    fig = make_subplots(rows=2, cols=len(names), shared_xaxes=True, shared_yaxes="rows", row_heights=[0.74, 0.26],
                        vertical_spacing=0.06, horizontal_spacing=0.04,
                        subplot_titles=[f"{n} (ECE {reports[n].ece:.3f})" for n in names])
    for i, name in enumerate(names, start=1):
        r = reports[name]
        c = (colors or {}).get(name, COLORS[(i - 1) % len(COLORS)])
        n = int(sum(b.count for b in r.bins))
        few = max(5, int(0.005 * n))
        centers = [(b.lo + b.hi) / 2 for b in r.bins]
        width = [(b.hi - b.lo) * 0.92 for b in r.bins]
        opac = [0.9 if b.count >= few else 0.25 for b in r.bins]
        acc = [b.accuracy if b.count else None for b in r.bins]
        conf = [b.confidence if b.count else None for b in r.bins]
        gap = [(cf - a) if b.count else None for b, a, cf in zip(r.bins, acc, conf)]
        custom = [[b.lo, b.hi, b.confidence if b.count else float("nan"), b.count] for b in r.bins]
        fig.add_scatter(x=[0, 1], y=[0, 1], mode="lines", line=dict(dash="dash", color="gray"),
                        name="perfect calibration", showlegend=i == 1, row=1, col=i)
        fig.add_bar(x=centers, y=acc, width=width, name="outputs (accuracy)", marker=dict(color=c, opacity=opac),
                    text=[str(b.count) if b.count else "" for b in r.bins], textposition="inside",
                    insidetextanchor="start", customdata=custom, showlegend=False, row=1, col=i,
                    hovertemplate="confidence %{customdata[0]:.2f}-%{customdata[1]:.2f}<br>mean confidence "
                                  "%{customdata[2]:.3f}<br>accuracy %{y:.3f}<br>%{customdata[3]} images<extra></extra>")
        fig.add_bar(x=centers, y=gap, base=acc, width=width, name="gap to the diagonal",
                    marker=dict(color="rgba(214,39,40,0.35)", line=dict(color="#d62728", width=1),
                                pattern=dict(shape="/")), showlegend=i == 1, row=1, col=i,
                    hovertemplate="gap %{y:+.3f} (confidence - accuracy)<extra></extra>")
        fig.add_bar(x=centers, y=[b.count for b in r.bins], width=width, marker=dict(color=c, opacity=opac),
                    showlegend=False, row=2, col=i, hovertemplate="%{y} images<extra></extra>")
        fig.update_xaxes(range=[0, 1], row=1, col=i)
        fig.update_xaxes(range=[0, 1], title_text="confidence max p(y|x)", row=2, col=i)
    fig.update_yaxes(title_text="accuracy", range=[0, 1.02], row=1, col=1)
    fig.update_yaxes(title_text="images", type="log", row=2, col=1)
    fig.update_layout(title=title, height=500, barmode="overlay", margin=dict(l=10, r=10, t=70, b=10),
                      legend=dict(orientation="h", y=-0.18))
    return fig


def fig_lines(x: Sequence[float] | dict[str, Sequence[float]], series: dict[str, Sequence[float | None]],
              title: str, xlabel: str, ylabel: str, markers: bool = True, yrange: Sequence[float] | None = None,
              colors: dict[str, str] | None = None, height: int = 360,
              intervals: dict[str, tuple[Sequence[float], Sequence[float]]] | None = None) -> go.Figure:
    """Line plot of several series over a shared x (or one x per series when ``x`` is a dict).

    ``intervals``: name -> (lower bounds, upper bounds) drawn as asymmetric error bars (e.g. 95% intervals).
    """
    fig = go.Figure()
    for i, (name, y) in enumerate(series.items()):
        xs = x[name] if isinstance(x, dict) else x
        err = None
        if intervals and name in intervals:
            lo, hi = intervals[name]
            err = dict(type="data", symmetric=False, array=[h - v for h, v in zip(hi, y)],
                       arrayminus=[v - lo_ for lo_, v in zip(lo, y)], thickness=1.2, width=4)
        fig.add_scatter(x=list(xs), y=list(y), name=name, mode="lines+markers" if markers else "lines",
                        line=dict(color=(colors or {}).get(name, COLORS[i % len(COLORS)])), error_y=err)
    if yrange is not None:
        fig.update_yaxes(range=list(yrange))
    return _layout(fig, title, xlabel, ylabel, height)


def fig_roc(curves: dict[str, dict[str, Sequence[float]]], title: str) -> go.Figure:
    """ROC curves: ``name -> {"fpr": [...], "tpr": [...]}`` (in-distribution = positive)."""
    fig = go.Figure()
    fig.add_scatter(x=[0, 1], y=[0, 1], mode="lines", line=dict(dash="dash", color="gray"), name="chance")
    for i, (name, c) in enumerate(curves.items()):
        fig.add_scatter(x=c["fpr"], y=c["tpr"], mode="lines", name=name, line=dict(color=COLORS[i % len(COLORS)]))
    fig.update_xaxes(range=[0, 1])
    fig.update_yaxes(range=[0, 1.02])
    return _layout(fig, title, "false positive rate (OOD accepted)", "true positive rate (in-distribution kept)", 400)


def fig_chain_energy(steps: Sequence[int], energies: torch.Tensor, title: str) -> go.Figure:
    """Energy of every chain over SGLD steps (thin lines) and their mean (thick); ``energies`` ``[T, N]``."""
    e = _np(energies)
    fig = go.Figure()
    n = e.shape[1] if e.ndim == 2 else 0
    for j in range(n):
        fig.add_scatter(x=list(steps), y=e[:, j], mode="lines", line=dict(width=1, color=CLASS_COLORS[j % 10]),
                        opacity=0.45, name=f"chain {j}", showlegend=False)
    if n:
        fig.add_scatter(x=list(steps), y=e.mean(1), mode="lines", line=dict(width=3, color="black"), name="mean")
    return _layout(fig, title, "SGLD step", "energy", 320)


def fig_chain_predictions(steps: Sequence[int], preds: torch.Tensor, names: Sequence[str], title: str) -> go.Figure:
    """The classifier's prediction for every chain over steps, as a heat map (chains x steps)."""
    p = _np(preds).astype(int).T if len(steps) else np.zeros((0, 0), dtype=int)  # [N, T]
    k = len(names)
    scale = []
    for i in range(k):
        c = CLASS_COLORS[i % len(CLASS_COLORS)]
        scale += [[i / k, c], [(i + 1) / k, c]]
    fig = go.Figure(go.Heatmap(z=p, x=list(steps), y=[f"chain {j}" for j in range(p.shape[0])], zmin=-0.5,
                               zmax=k - 0.5, colorscale=scale,
                               colorbar=dict(title="class", tickvals=list(range(k)), ticktext=list(names)),
                               hovertemplate="step %{x}<br>%{y}<br>predicted %{z}<extra></extra>"))
    fig.update_yaxes(autorange="reversed", showticklabels=p.shape[0] <= 16)
    return _layout(fig, title, "SGLD step", "chain", 320)


def fig_probabilities(probs: Sequence[float], names: Sequence[str], title: str = "p(y|x)") -> go.Figure:
    """Bar chart of class probabilities, the top class highlighted."""
    top = int(np.argmax(probs))
    colors = [COLORS[0] if i == top else "#9fbfdf" for i in range(len(probs))]
    fig = go.Figure(go.Bar(x=list(names), y=list(probs), marker_color=colors,
                           hovertemplate="%{x}: %{y:.4f}<extra></extra>"))
    fig.update_yaxes(range=[0, 1])
    fig.update_xaxes(type="category")
    return _layout(fig, title, "class", "probability", 260)


def fig_maps(maps: dict[str, Any], title: str, signed: dict[str, bool] | None = None, height: int = 260,
             fixed: dict[str, tuple[float, float]] | None = None) -> go.Figure:
    """Side-by-side heat maps of 2-D arrays (attribution maps, differences), image orientation, no axes.

    Signed maps use a diverging scale centred on 0 (red = raises the target, blue = lowers it); unsigned
    attributions a sequential scale from 0 (black) to their maximum (yellow), so they never look like the
    grey input; ``fixed[name]`` (e.g. ``(0, 1)`` for a picture) draws a map in grey over that range.
    """
    names = list(maps)
    fig = make_subplots(rows=1, cols=len(names), subplot_titles=names, horizontal_spacing=0.04)
    for i, name in enumerate(names, start=1):
        z = _np(maps[name])
        is_signed = (signed or {}).get(name, bool(np.nanmin(z) < 0))
        lim = float(np.nanmax(np.abs(z))) or 1.0
        if fixed and name in fixed:
            (lo, hi), scale = fixed[name], "Gray"
        elif is_signed:
            (lo, hi), scale = (-lim, lim), "RdBu_r"
        else:
            (lo, hi), scale = (0.0, lim), "Inferno"
        fig.add_heatmap(z=z, row=1, col=i, colorscale=scale, zmin=lo, zmax=hi, showscale=False,
                        hovertemplate="row %{y}, col %{x}: %{z:.3g}<extra></extra>")
        fig.update_yaxes(autorange="reversed", scaleanchor=f"x{i if i > 1 else ''}", visible=False, row=1, col=i)
        fig.update_xaxes(visible=False, row=1, col=i)
    fig.update_layout(title=title, height=height, margin=dict(l=10, r=10, t=60, b=10),
                      plot_bgcolor="rgba(0,0,0,0)")
    return fig


def fig_placement(scores: dict[str, tuple[Any, float, float]], title: str) -> go.Figure:
    """One panel per score: the reference set's histogram, the value of one input (solid line) and the
    threshold below which an input is called unusual (dashed). ``scores``: name -> (reference values, value,
    threshold)."""
    names = list(scores)
    fig = make_subplots(rows=1, cols=len(names), subplot_titles=names, horizontal_spacing=0.06)
    for i, name in enumerate(names, start=1):
        ref, v, thr = scores[name]
        ref = _np(ref)
        fig.add_histogram(x=ref, nbinsx=40, marker_color=COLORS[2], opacity=0.7, showlegend=i == 1,
                          name="test images", row=1, col=i)
        fig.add_vline(x=thr, line=dict(color="#7f7f7f", dash="dash"), row=1, col=i)
        fig.add_vline(x=v, line=dict(color=COLORS[3], width=3), row=1, col=i)
        lo, hi = float(min(ref.min(), v, thr)), float(max(ref.max(), v, thr))
        pad = 0.05 * (hi - lo or 1.0)
        fig.update_xaxes(range=[lo - pad, hi + pad], row=1, col=i)
    fig.add_scatter(x=[None], y=[None], mode="lines", line=dict(color=COLORS[3], width=3), name="this image")
    fig.add_scatter(x=[None], y=[None], mode="lines", line=dict(color="#7f7f7f", dash="dash"),
                    name="unusual below this line")
    return _layout(fig, title, "", "test images", 300)


def image_map(x: torch.Tensor) -> np.ndarray:
    """One image ``[C, H, W]`` in ``[-1, 1]`` as a 2-D array in ``[0, 1]`` for :func:`fig_maps` (grey)."""
    a = (x.detach().cpu().float().clamp(-1, 1) + 1) / 2
    return a.mean(0).numpy()


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


def test_probabilities(ctx: Context, name: str, ck: LoadedCheckpoint, key: str, n: int) -> torch.Tensor:
    """``p(y|x)`` ``[n, K]`` of a model on the first ``n`` test images (shared cache across pages)."""
    from jem_core.evaluation import predict_proba

    test = ctx.test_set()
    assert test is not None
    x = test.x[:n]
    return cached(("proba", key, ctx.dataset, str(ctx.data_root), n),
                  lambda p: predict_proba(ck.model, x, progress=p), f"Classifying {n} test images with {name}...")


def difference_images(x_adv: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """``x_adv - x`` for display in ``[-1, 1]``, scaled so the largest change in the batch is full contrast."""
    d = (x_adv - x).detach().cpu()
    m = float(d.abs().max())
    return d / m if m > 0 else d
