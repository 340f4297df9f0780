"""The models and data a session works on: the model registry, cached loaders, the sidebar and its Context.

- which checkpoints the picker offers (bundled, uploaded, files on disk, trained in this session) and
  their cached, frozen loading (``st.cache_resource``: shared by every session, never mutated);
- the data root and the test sets (with the demo pack behind them);
- :func:`sidebar`: model, baseline, dataset and data root for this run, as a :class:`Context`, with the
  note on why the app opened on its default pair (kept true when the user picks another model);
- :func:`test_probabilities`: ``p(y|x)`` of the test images, shared by the pages; :func:`likelihood_report`:
  the Likelihood page's AIS estimate with its first view's settings (:data:`LIKELIHOOD_CHAINS`, ...);
  :func:`stored_likelihood`, :func:`stored_ood_scores`: the bundled models' first views, precomputed;
- the 2-D playground's trained pair (:func:`toy_pair`; its first view's stored: :func:`stored_toy_pair`), and
  :func:`warm_up`, which computes the playground's default pair (when it is not stored) and the Likelihood page's
  default estimate in the background once per server, so that first visits do not wait for them.

What does not live here: page plumbing and widgets (``app/ui.py``), figures (``app/figures.py``).
"""

from __future__ import annotations

import hashlib
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import streamlit as st
import torch

from app import share
from app.compute import cached, current_session_id, hurry, in_background, note_arrival, prefetch
from jem_core.checkpoint import CheckpointError, LoadedCheckpoint, load_checkpoint
from jem_core.data import (BUILTIN_DATASETS, DataUnavailableError, ImageDataset, data_available, dataset_shape,
                           default_data_root, demo_pack_file, load_dataset)
from jem_core.report_store import (StoredPair, StoredScores, StoreError, estimate_key, find_report, find_scores,
                                   find_toy_pair, scores_key, toy_pair_key)
from jem_core.toy import TOY_DATASETS, ToyTrainer, pretrained_pair

if TYPE_CHECKING:
    from jem_core.likelihood import LikelihoodReport

ROOT = Path(__file__).resolve().parent.parent
CHECKPOINT_DIR = ROOT / "checkpoints"
SHARED_DATA = ROOT.parent / "shared" / "data"

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
            # a run stopped before its first evaluation has no accuracy yet: say so rather than nothing
            summary = summary or "stopped before its first evaluation: untested, under-trained"
            run["label"] = f"{run['name']} [{summary}] (trained here)"
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
            asked = st.session_state.get("sb_baseline")
            guess = model_label.replace("_jem", "_baseline")
            baselines = [lb for lb in base_opts[1:] if loaded[lb][1].metadata.get("objective") == "baseline"]
            st.session_state["sb_baseline"] = guess if guess in base_opts else (baselines[0] if baselines else "(none)")
            if "sb_baseline" in publish.applied:
                st.warning(f"The link's baseline {asked!r} does not take the input shape of {model_label}, so "
                           f"{st.session_state['sb_baseline']!r} is shown.")
        base_label = st.selectbox("Baseline for comparisons", base_opts, key="sb_baseline",
                                  help="a model of the same input shape, shown beside the chosen one")
        base_entry, base_ck = loaded[base_label] if base_label in loaded else (None, None)

        own = str(ck.metadata.get("dataset", "digits"))
        c, h, _ = shape_of(ck)
        options = [own] + [d for d in BUILTIN_DATASETS if d != own and dataset_shape(d) is not None
                           and dataset_shape(d)[:2] == (c, h) and _dataset_ok(d, root)]
        if st.session_state.get("sb_dataset") not in options:
            asked = st.session_state.get("sb_dataset")
            st.session_state["sb_dataset"] = own
            if "sb_dataset" in publish.applied:
                shape = dataset_shape(asked)
                why = ("has another image shape than the model" if shape is None or shape[:2] != (c, h)
                       else f"has no test set in the data root {root}")
                st.warning(f"The link's dataset {asked!r} {why}, so the model's own, {own!r}, is used.")
        dataset = st.selectbox("Dataset", options, key="sb_dataset",
                               help="test images used by the evaluation pages (the model's own dataset first)")
        ok = _dataset_ok(dataset, root)
        publish()
        opened = st.session_state[_DEFAULT_NOTE]
        if (model_label, base_label) == (opened["model"], opened["baseline"]):
            st.info(opened["note"])
        else:
            vs = f" against **{base_entry.name}**" if base_entry is not None else " (no baseline)"
            st.info(f"Showing **{entry.name}**{vs}, chosen in the picker or the link, not the pair the app opened on "
                    f"({opened['model']} against {opened['baseline']}).")
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
        f"`{dataset}` test images: {len(test):,}, from "
        + (test.note or ("scikit-learn's own copy (no data root needed)" if dataset == "digits" else "the data root")) + "."
        if test is not None else
        f"`{dataset}` test data is not there: pages that need test images say so; scoring uploads and "
        "sampling still work from the checkpoint alone."))
    st.session_state[_CTX] = ctx
    return ctx


#: Test images of the Home page's and the Calibration page's first views (their accuracy, ECE and diagrams).
FIRST_VIEW_TEST_IMAGES = 2000


def _proba_job(ctx: Context, name: str, ck: LoadedCheckpoint, key: str, n: int) -> tuple[tuple, Any, str]:
    """(cache key, compute(progress), label) of a model's ``p(y|x)`` on the first ``n`` test images."""
    from jem_core.evaluation import predict_proba

    test = ctx.test_set()
    assert test is not None
    x = test.x[:n]
    return (("proba", key, ctx.dataset, str(ctx.data_root), n), lambda p: predict_proba(ck.model, x, progress=p),
            f"Classifying {n} test images with {name}...")


def test_probabilities(ctx: Context, name: str, ck: LoadedCheckpoint, key: str, n: int) -> torch.Tensor:
    """``p(y|x)`` ``[n, K]`` of a model on the first ``n`` test images (shared cache across pages)."""
    return cached(*_proba_job(ctx, name, ck, key, n))


# ------------------------------------------------------------------------------------- likelihood
#: The Likelihood page's first view: AIS chains, transition, schedule, reverse run, test images (at most).
LIKELIHOOD_CHAINS = 32
LIKELIHOOD_SAMPLER = "hmc"
LIKELIHOOD_SCHEDULE = "sigmoid"
LIKELIHOOD_REVERSE = True
LIKELIHOOD_TEST_IMAGES = 1000
#: Precomputed estimates (:mod:`jem_core.report_store`) read before one is computed: the bundled models' first
#: views, written by ``python -m jem_core likelihood ... --store checkpoints/likelihood`` (``checkpoints/README.md``).
STORED_LIKELIHOOD = CHECKPOINT_DIR / "likelihood"


def likelihood_temps(dim: int) -> int:
    """The first view's number of AIS temperatures for images of ``dim`` pixels: fewer for 28x28 than for 8x8,
    so that the first estimate takes well under a minute on 2 CPU cores (MNIST with its 1,000 test images: 34 s on
    one core, measured on a slow machine)."""
    return 100 if dim <= 256 else 50


def stored_likelihood(model: torch.nn.Module, test_x: torch.Tensor | None, settings: dict[str, Any],
                      folder: Path = STORED_LIKELIHOOD) -> LikelihoodReport | None:
    """The estimate of ``estimate_log_likelihood(model, test_x=test_x, **settings)`` stored in ``folder`` under
    its content address (:func:`jem_core.report_store.estimate_key`), or None when there is none. A stored file
    that cannot be read counts as none (computed anew) and is reported on the server's log."""
    from jem_core.likelihood import LikelihoodError

    try:
        return find_report([folder], estimate_key(model, test_x, **settings))
    except LikelihoodError as e:
        print(f"JEM Explorer: a stored estimate was not used: {e}", file=sys.stderr, flush=True)
        return None


#: Precomputed OOD score tables (:func:`jem_core.report_store.save_scores`) read before any is computed: the OOD
#: page's first view of the bundled MNIST pair, written by ``python -m jem_core evaluate ... --n-ood 500 --store
#: checkpoints/ood``, and the Score page's reference (``checkpoints/README.md``).
STORED_OOD = CHECKPOINT_DIR / "ood"
#: Test images (at most) whose OOD scores are the Score page's reference histograms.
SCORE_REFERENCE_IMAGES = 1000


def stored_ood_scores(model: torch.nn.Module, x: torch.Tensor, scores: tuple[str, ...],
                      folder: Path = STORED_OOD) -> StoredScores | None:
    """The ``scores`` of ``ood_score_table(model, x)`` stored in ``folder`` under their content address
    (:func:`jem_core.report_store.scores_key`), or None when there is no such table or it lacks one of ``scores``.
    A stored file that cannot be read counts as none (computed anew) and is reported on the server's log."""
    try:
        table = find_scores([folder], scores_key(model, x))
    except StoreError as e:
        print(f"JEM Explorer: stored OOD scores were not used: {e}", file=sys.stderr, flush=True)
        return None
    if table is None or not set(scores) <= set(table):
        return None
    out = StoredScores({k: table[k] for k in scores})
    out.stored = table.stored
    return out


def _likelihood_job(ctx: Context, name: str, ck: LoadedCheckpoint, key: str, n_test: int, temps: int, chains: int,
                    sampler: str, schedule: str, reverse: bool) -> tuple[tuple, Any, str, Any]:
    """(cache key, compute(progress), label, stored()) of one model's AIS estimate on the first ``n_test`` test
    images; ``stored()`` reads it from :data:`STORED_LIKELIHOOD` when it is there."""
    from jem_core.likelihood import estimate_log_likelihood, pixel_levels

    test = ctx.test_set()
    x = None if test is None else test.x[:n_test]
    settings = dict(shape=shape_of(ck), levels=pixel_levels(ctx.dataset), n_temps=temps, n_chains=chains,
                    sampler=sampler, schedule=schedule, reverse=reverse)
    return (("likelihood", key, ctx.dataset, str(ctx.data_root), 0 if x is None else len(x), temps, chains, sampler,
             schedule, reverse),
            lambda p: estimate_log_likelihood(ck.model, test_x=x, progress=p, **settings),
            f"Annealing {chains} chains through {temps} temperatures for {name} (log Z by AIS)...",
            lambda: stored_likelihood(ck.model, x, settings))


def likelihood_report(ctx: Context, name: str, ck: LoadedCheckpoint, key: str, n_test: int, temps: int, chains: int,
                      sampler: str, schedule: str, reverse: bool) -> LikelihoodReport:
    """One model's :class:`~jem_core.likelihood.LikelihoodReport` (:func:`jem_core.likelihood.estimate_log_likelihood`
    with ``temps`` temperatures, ``chains`` chains, ``sampler``, ``schedule``, the ``reverse`` diagnostic, and the
    first ``n_test`` test images), shared by every session (:func:`app.compute.cached`); read from
    :data:`STORED_LIKELIHOOD` instead of computed when it is stored there (its ``stored`` field says so). Raises
    :class:`~jem_core.likelihood.LikelihoodError` for bad settings and :class:`app.compute.Cancelled`."""
    return cached(*_likelihood_job(ctx, name, ck, key, n_test, temps, chains, sampler, schedule, reverse))


def _likelihood_first_view(ctx: Context) -> tuple[tuple, Any, str, Any]:
    """The job of the Likelihood page's first view in ``ctx``: its model alone, the default settings."""
    test = ctx.test_set()
    c, h, w = ctx.shape
    name, ck, key = ctx.models()[0]
    return _likelihood_job(ctx, name, ck, key, 0 if test is None else min(len(test), LIKELIHOOD_TEST_IMAGES),
                           likelihood_temps(c * h * w), LIKELIHOOD_CHAINS, LIKELIHOOD_SAMPLER, LIKELIHOOD_SCHEDULE,
                           LIKELIHOOD_REVERSE)


# ------------------------------------------------------------------------------ 2-D playground pair
#: Training iterations of the playground's trained pair.
TOY_PRETRAIN_ITERS = 400


def toy_spec(name: str = "moons", noise: float | None = None, n: int = 2000, arms: int = 3) -> str:
    """The dataset spec of the playground's 2-D points (``jem_core.toy``): ``name`` in ``TOY_DATASETS``, its
    own noise when ``noise`` is None, ``n`` points, ``arms`` for the spirals. The defaults are the page's
    first view. Raises KeyError for an unknown ``name``."""
    noise = TOY_DATASETS[name][0] if noise is None else noise
    return f"toy:{name}?noise={noise:g}&n={int(n)}" + (f"&k={int(arms)}" if name == "spirals" else "")


#: Where the playground's trained pairs are stored (``jem_core.report_store``): its first view's, shipped.
STORED_TOY = CHECKPOINT_DIR / "toy"


def stored_toy_pair(spec: str, seed: int, labels: int | None, folder: Path = STORED_TOY) -> StoredPair | None:
    """The pair of :func:`toy_pair` stored in ``folder`` under its content address
    (:func:`jem_core.report_store.toy_pair_key`), or None when there is none. A stored file that cannot be read
    counts as none (trained anew) and is reported on the server's log."""
    try:
        return find_toy_pair([folder], toy_pair_key(spec, seed, TOY_PRETRAIN_ITERS, labels))
    except StoreError as e:
        print(f"JEM Explorer: a stored 2-D pair was not used: {e}", file=sys.stderr, flush=True)
        return None


@st.cache_resource(show_spinner=False, max_entries=8)  # the page shows its own spinner (this runs in the background too)
def toy_pair(spec: str, seed: int, labels: int | None) -> tuple[ToyTrainer, ToyTrainer]:
    """The JEM and baseline trained :data:`TOY_PRETRAIN_ITERS` iterations on ``spec`` with ``seed`` (``labels``
    per class, or all), shared by every session and never mutated: sessions work on clones. Read from
    :data:`STORED_TOY` when stored there (a :class:`~jem_core.report_store.StoredPair`, with its provenance),
    else trained (7 s of a core). A visit calls :func:`toy_pair_for_visit`."""
    return stored_toy_pair(spec, seed, labels) or pretrained_pair(spec, seed, TOY_PRETRAIN_ITERS,
                                                                   labels_per_class=labels)


def first_toy_pair() -> tuple[str, int, None]:
    """``(spec, seed, labels)`` of the playground's first view: the pair :func:`warm_up` trains ahead of visits."""
    return toy_spec(), 0, None


def toy_pair_for_visit(spec: str, seed: int, labels: int | None) -> tuple[ToyTrainer, ToyTrainer]:
    """:func:`toy_pair` for a page that waits for it: when :func:`warm_up` is training this very pair in the
    background, that training goes on at the server's own priority (:func:`app.compute.hurry`)."""
    if (spec, seed, labels) == first_toy_pair():
        hurry("toy_pair")
    return toy_pair(spec, seed, labels)


#: Libraries the pages import on first use (scikit-learn's metrics and datasets, SciPy's statistics, torchmetrics,
#: captum): about 3 s of one idle core together, which the first visit of Home, Calibration, OOD, Robustness or the
#: playground would otherwise wait for (2-3x longer while live chains share the cores).
PAGE_LIBRARIES = ("scipy.stats", "sklearn.metrics", "sklearn.datasets", "torchmetrics.functional.classification",
                  "captum.robust", "captum.attr")


def _import_page_libraries() -> None:
    import importlib

    for name in PAGE_LIBRARIES:
        importlib.import_module(name)


def warm_up(ctx: Context | None) -> None:
    """Note this run's session as a visitor (:func:`app.compute.note_arrival`), then, once per server, in the
    background (no worker slot): the libraries the pages import on first use (:data:`PAGE_LIBRARIES`, at once and
    at the server's own priority: a page importing one meanwhile waits for this thread), the models' test
    probabilities that the Home page's and the Calibration page's first views show (:data:`FIRST_VIEW_TEST_IMAGES`
    images; at once and at the server's priority: a second or two of a core for MNIST), and the first views' two
    longest computations, which give way to arriving visitors (they begin, and the estimate goes on, only once no
    new session has started for :data:`app.compute.ARRIVAL_QUIET_S` seconds; at a fresh server's start they had
    doubled a new visitor's first page load): the playground's default pair (:func:`app.compute.in_background`, at
    lower CPU priority; 3-6 s alone on these 2 cores, 10-26 s while live chains run) and the Likelihood page's
    default AIS estimate for ``ctx`` (the context of the server's first run: its default pair unless a link chose
    another) by :func:`app.compute.prefetch` at the server's own priority: about half a minute of one core for
    MNIST, which at lower priority took minutes when browsers on the same cores kept them busy
    (``bench/README.md``); read at once instead when it is stored (:data:`STORED_LIKELIHOOD`). A visit that arrives first computes the pair itself, or joins the estimate, which then
    runs without pausing. Cheap to call on every run; ``$JEM_WARM_UP=0`` turns the background work off.

    Only inside a script run (a server's session, AppTest): a bare import of the app (a multiprocessing child
    that re-imports the main script, say) starts nothing."""
    session = current_session_id()
    note_arrival(session)
    if session is None or os.environ.get("JEM_WARM_UP", "1").strip() == "0":
        return
    in_background("imports", _import_page_libraries, nice=0)
    first_views = _warmed("probabilities")
    test = None if ctx is None else ctx.test_set()
    if test is not None and not first_views:  # a second or two of a core, at once: most visits begin on Home
        first_views.extend(prefetch(*_proba_job(ctx, name, ck, key, min(len(test), FIRST_VIEW_TEST_IMAGES)), nice=0)
                           for name, ck, key in ctx.models())
    in_background("toy_pair", lambda: toy_pair(*first_toy_pair()), give_way=True)
    started = _warmed("likelihood")
    if ctx is not None and not started:  # from this (script) thread: a job started by a niced thread stays niced
        started.append(prefetch(*_likelihood_first_view(ctx), nice=0, give_way=True))


@st.cache_resource(show_spinner=False)
def _warmed(name: str) -> list:
    """Once per server: what :func:`warm_up` started under ``name`` (empty before)."""
    return []
