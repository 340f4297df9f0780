"""Stored results under a content address: a likelihood estimate (:class:`~jem_core.likelihood.LikelihoodReport`),
a table of OOD scores (:func:`~jem_core.evaluation.ood.ood_score_table`) and a trained 2-D pair
(:func:`~jem_core.toy.pretrained_pair`).

An AIS estimate of a 28x28 model takes half a minute of a core and more (:mod:`jem_core.likelihood`); the OOD
page's first view scores 3,500 images with two models, 10-15 s of a core and a minute or more while others
compute; the 2-D playground's trained pair 7 s of a core. Saved once, each is read back in milliseconds by anyone
who asks the same question: the same weights, the same images, the same settings and the same code. The address is
a SHA-256 over exactly those:

- the bytes of every tensor of the model's ``state_dict`` (names, dtypes, shapes, values), so retrained or
  edited weights never find an old result;
- the bytes of the images (shape and float32 values);
- for an estimate (:func:`estimate_key`), every keyword of :func:`~jem_core.likelihood.estimate_log_likelihood`
  that changes its result (temperatures, chains, schedule, transition, leapfrog steps, walls, sweep, reverse
  run, data chains, seed), defaults filled in;
- the source files of the method (:mod:`jem_core.likelihood`, or :mod:`jem_core.evaluation.ood` for scores), of
  the energy (:mod:`jem_core.energy`) and of the model's class, so a change of method finds nothing stored and
  computes anew;
- for a 2-D pair (:func:`toy_pair_key`), no weights or images but its recipe: the data spec, the seed, the
  iterations, the labels per class, and the sources of the trainer and of everything it trains with.

It does not cover the torch build or the machine: a stored result is one computation of the same method, whose
figures on another machine differ by float rounding (and, for AIS, by about their standard errors: summation
order changes the chains).

A stored file (``<key>.pt``) holds only tensors and plain values (read with ``weights_only=True``,
:func:`jem_core.checkpoint.safe_torch_load`), with the key, the torch version and the time it was computed.
``python -m jem_core likelihood ... --store FOLDER`` writes an estimate, ``python -m jem_core evaluate ...
--store FOLDER`` the OOD score tables of its in-distribution images and of every OOD set; :func:`save_toy_pair` a
trained pair.

What does not live here: the estimator (:mod:`jem_core.likelihood`), the scores (:mod:`jem_core.evaluation.ood`),
the 2-D trainer (:mod:`jem_core.toy`), the app's lookups (``app/registry.py``).
"""

from __future__ import annotations

import dataclasses
import datetime as _dt
import functools
import hashlib
import inspect
import sys
from pathlib import Path
from typing import Any, Callable, Iterable

import torch
from torch import nn

from . import energy, likelihood
from .checkpoint import CheckpointError, atomic_torch_save, safe_torch_load
from .errors import BadInput
from .likelihood import AISResult, LikelihoodError, LikelihoodReport, StepSizes, estimate_log_likelihood

__all__ = ["FORMAT", "SCORES_FORMAT", "TOY_FORMAT", "StoreError", "StoredScores", "StoredPair", "estimate_key",
           "save_report", "load_report", "find_report", "scores_key", "save_scores", "load_scores", "find_scores",
           "toy_pair_key", "save_toy_pair", "load_toy_pair", "find_toy_pair"]

#: The ``format`` field of a stored likelihood report.
FORMAT = "jem-explorer-likelihood-report/1"
#: The ``format`` field of a stored table of OOD scores.
SCORES_FORMAT = "jem-explorer-ood-scores/1"
#: The ``format`` field of a stored trained 2-D pair.
TOY_FORMAT = "jem-explorer-toy-pair/1"


class StoreError(BadInput):
    """A stored table of OOD scores or a stored 2-D pair cannot be used: an unreadable file, another format, a bad
    key, table or pair. (Stored likelihood reports raise :class:`~jem_core.likelihood.LikelihoodError`.)"""

#: Keywords of :func:`~jem_core.likelihood.estimate_log_likelihood` that do not change its result.
_NOT_IN_KEY = ("model", "test_x", "progress", "device", "batch_size")
_SIGNATURE = inspect.signature(estimate_log_likelihood)  # the estimator's, whatever later replaces the name


@functools.lru_cache(maxsize=16)
def _source_digest(path: str) -> bytes:
    return hashlib.sha256(Path(path).read_bytes()).digest()


def _update_tensor(h: "hashlib._Hash", name: str, t: torch.Tensor) -> None:
    t = t.detach().cpu().contiguous()
    h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
    h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")  # 0-dim too (BatchNorm's count)


def _address(fmt: str, sources: Iterable[str | None], settings: str, model: nn.Module | None,
             images: torch.Tensor | None, images_name: str) -> str:
    """SHA-256 hex digest over the format, the source files, the settings' repr, the weights (if any) and the
    images (if any)."""
    h = hashlib.sha256(fmt.encode())
    for path in sources:
        h.update(_source_digest(str(path)))
    h.update(settings.encode())
    for name, t in sorted(model.state_dict().items() if model is not None else ()):
        _update_tensor(h, name, t)
    if images is not None:
        _update_tensor(h, images_name, images.float())
    return h.hexdigest()


def _is_key(key: str) -> bool:
    return len(key) == 64 and all(c in "0123456789abcdef" for c in key)


def _save(folder: str | Path, key: str, fmt: str, field: str, value: Any) -> Path:
    """Write ``{format, key, torch, python, computed, field: value}`` as ``folder/<key>.pt`` (atomic)."""
    path = Path(folder) / f"{key}.pt"
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_torch_save({"format": fmt, "key": key, "torch": str(torch.__version__),
                       "python": sys.version.split()[0],
                       "computed": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
                       field: value}, path)
    return path


def _provenance(path: str | Path, obj: dict) -> dict[str, Any]:
    return {"file": str(path), "key": obj.get("key"), "torch": obj.get("torch"), "python": obj.get("python"),
            "computed": obj.get("computed")}


def _read(path: str | Path, fmt: str, field: str, error: type[Exception], name: str, kind: str,
          hint: str) -> dict:
    """The stored dict of ``path`` (``weights_only=True``), checked to be of format ``fmt`` with a dict under
    ``field``; else ``error`` saying so (``name``: how a message names the file, ``kind``: what it should be,
    ``hint``: how to write one)."""
    try:
        obj = safe_torch_load(str(path))
    except CheckpointError as e:
        raise error(f"{name} {path}: {e}") from None
    if not isinstance(obj, dict) or obj.get("format") != fmt or not isinstance(obj.get(field), dict):
        found = obj.get("format") if isinstance(obj, dict) else type(obj).__name__
        raise error(f"{path} is not {kind} of format {fmt} (found {found!r}); {hint}")
    return obj


def _find(folders: Iterable[str | Path], key: str, load: Callable[[Path], Any]) -> Any:
    """``load(folder/<key>.pt)`` for the first of ``folders`` that has the file, else None."""
    for folder in folders:
        path = Path(folder) / f"{key}.pt"
        if path.is_file():
            return load(path)
    return None


def estimate_key(model: nn.Module, test_x: torch.Tensor | None, **settings: Any) -> str:
    """The content address of ``estimate_log_likelihood(model, test_x=test_x, **settings)``: 64 hex digits.

    Args:
        model: the classifier whose energy is estimated (its ``state_dict`` and its class's source count).
        test_x: ``[M, C, H, W]`` float32 test images in ``[-1, 1]``, or None.
        settings: the other keywords given to :func:`~jem_core.likelihood.estimate_log_likelihood` (``shape``
            is required); omitted ones count at their defaults, so ``n_chains=64`` and leaving it out give the
            same key. ``device``, ``batch_size`` and ``progress`` do not change the result and are ignored.

    Returns:
        SHA-256 hex digest (see the module docstring for what it covers and what it does not).

    Raises:
        LikelihoodError: ``model`` is not an ``nn.Module``, ``shape`` is missing, or a keyword is not one of
            the estimator's.
    """
    if not isinstance(model, nn.Module):
        raise LikelihoodError(f"estimate_key needs the model as an nn.Module (its weights are hashed); "
                              f"got {type(model).__name__}")
    if "shape" not in settings:
        raise LikelihoodError("estimate_key needs shape=(C, H, W), as estimate_log_likelihood does")
    try:
        bound = _SIGNATURE.bind(model, test_x=test_x, **settings)
    except TypeError as e:
        raise LikelihoodError(f"estimate_key: {e} (pass the keywords of estimate_log_likelihood)") from None
    bound.apply_defaults()
    args = {k: v for k, v in bound.arguments.items() if k not in _NOT_IN_KEY}
    args["shape"] = [int(s) for s in args["shape"]]
    if args.get("sweep") is not None:
        args["sweep"] = [int(s) for s in args["sweep"]]
    return _address(FORMAT, (likelihood.__file__, energy.__file__, inspect.getsourcefile(type(model))),
                    repr(sorted(args.items())), model, test_x, "test_x")


def save_report(report: LikelihoodReport, folder: str | Path, key: str) -> Path:
    """Save ``report`` as ``folder/<key>.pt`` (atomic: a crash leaves the old file or the new one).

    Args:
        report: an estimate of :func:`~jem_core.likelihood.estimate_log_likelihood`.
        folder: where to write (made when missing).
        key: its :func:`estimate_key` (64 hex digits).

    Returns:
        The file written.

    Raises:
        LikelihoodError: ``key`` is not 64 hex digits. OSError: the folder cannot be written.
    """
    if not _is_key(key):
        raise LikelihoodError(f"a stored report's key is 64 lowercase hex digits (estimate_key); got {key!r}")
    state = dataclasses.asdict(report)
    state.pop("stored", None)
    return _save(folder, key, FORMAT, "report", state)


def _ais(d: dict | None) -> AISResult | None:
    return None if d is None else AISResult(**d)


def load_report(path: str | Path) -> LikelihoodReport:
    """Read a report written by :func:`save_report` (tensors and plain values only: ``weights_only=True``).

    Returns:
        The :class:`~jem_core.likelihood.LikelihoodReport`, its ``stored`` field filled with the file, the key,
        the torch and Python versions and the UTC time (ISO 8601) it was computed.

    Raises:
        LikelihoodError: the file is missing, unreadable, or not a stored report of this format.
    """
    obj = _read(path, FORMAT, "report", LikelihoodError, "stored report", "a stored likelihood report",
                "write one with `python -m jem_core likelihood ... --store FOLDER`")
    d = dict(obj["report"])
    try:
        d["forward"], d["reverse"] = _ais(d["forward"]), _ais(d.get("reverse"))
        d["step_sizes"] = StepSizes(**d["step_sizes"])
        report = LikelihoodReport(**d)
    except (TypeError, KeyError) as e:
        raise LikelihoodError(f"stored report {path} does not match this version's LikelihoodReport ({e}); "
                              f"compute it again") from None
    report.stored = _provenance(path, obj)
    return report


def find_report(folders: Iterable[str | Path], key: str) -> LikelihoodReport | None:
    """The report stored as ``<key>.pt`` in the first of ``folders`` that has it, or None (missing folders are
    skipped). Raises LikelihoodError when the file found cannot be read (see :func:`load_report`)."""
    return _find(folders, key, load_report)


# ------------------------------------------------------------------------------------------- OOD scores
class StoredScores(dict):
    """``{score name: [N] float32 CPU tensor}`` read from a file (:func:`load_scores`), as
    :func:`~jem_core.evaluation.ood.ood_score_table` returns it, plus ``stored``: the file, its key, the torch and
    Python versions and the UTC time (ISO 8601) it was computed."""

    stored: dict[str, Any]


def scores_key(model: nn.Module, x: torch.Tensor) -> str:
    """The content address of ``ood_score_table(model, x)`` (every score of
    :data:`~jem_core.evaluation.ood.OOD_SCORES`): 64 hex digits.

    Args:
        model: the classifier scored (its ``state_dict`` and its class's source count).
        x: ``[N, C, H, W]`` float32 images in ``[-1, 1]``.

    Returns:
        SHA-256 hex digest over the weights, the images and the sources of the scores
        (:mod:`jem_core.evaluation.ood`), of the energy and of the model's class (see the module docstring).
        The batch size and the device do not count.

    Raises:
        StoreError: ``model`` is not an ``nn.Module`` or ``x`` is not a 4-D tensor.
    """
    from .evaluation import ood

    if not isinstance(model, nn.Module):
        raise StoreError(f"scores_key needs the model as an nn.Module (its weights are hashed); "
                         f"got {type(model).__name__}")
    if not isinstance(x, torch.Tensor) or x.dim() != 4:
        raise StoreError(f"scores_key needs images [N, C, H, W]; got {getattr(x, 'shape', type(x).__name__)}")
    return _address(SCORES_FORMAT, (ood.__file__, energy.__file__, inspect.getsourcefile(type(model))),
                    repr(list(ood.OOD_SCORES)), model, x, "x")


def _check_table(table: Any, where: str) -> dict[str, torch.Tensor]:
    from .evaluation.ood import OOD_SCORES

    if not isinstance(table, dict) or not table or not set(table) <= set(OOD_SCORES):
        raise StoreError(f"{where}: a score table maps names of {', '.join(OOD_SCORES)} to tensors; "
                         f"got {sorted(table) if isinstance(table, dict) else type(table).__name__}")
    sizes = {k: tuple(v.shape) if isinstance(v, torch.Tensor) else None for k, v in table.items()}
    if len(set(sizes.values())) != 1 or None in sizes.values() or len(next(iter(sizes.values()))) != 1:
        raise StoreError(f"{where}: every score is a 1-D tensor of one length per image; got shapes {sizes}")
    return table


def save_scores(table: dict[str, torch.Tensor], folder: str | Path, key: str) -> Path:
    """Save an OOD score table as ``folder/<key>.pt`` (atomic: a crash leaves the old file or the new one).

    Args:
        table: ``{score name: [N] tensor}`` of :func:`~jem_core.evaluation.ood.ood_score_table`, stored as
            float32 CPU tensors.
        folder: where to write (made when missing).
        key: its :func:`scores_key` (64 hex digits).

    Returns:
        The file written.

    Raises:
        StoreError: ``key`` is not 64 hex digits, or ``table`` is not a score table. OSError: the folder cannot
        be written.
    """
    if not _is_key(key):
        raise StoreError(f"a stored score table's key is 64 lowercase hex digits (scores_key); got {key!r}")
    table = _check_table(table, "save_scores")
    return _save(folder, key, SCORES_FORMAT, "scores",
                 {k: v.detach().to("cpu", torch.float32).contiguous() for k, v in table.items()})


def load_scores(path: str | Path) -> StoredScores:
    """Read a table written by :func:`save_scores` (tensors and plain values only: ``weights_only=True``).

    Returns:
        :class:`StoredScores`: ``{score name: [N] float32 tensor}`` with its ``stored`` provenance.

    Raises:
        StoreError: the file is missing, unreadable, not a stored score table of this format, or its table is
        malformed.
    """
    obj = _read(path, SCORES_FORMAT, "scores", StoreError, "stored scores", "a stored table of OOD scores",
                "write one with `python -m jem_core evaluate ... --store FOLDER`")
    out = StoredScores(_check_table(obj.get("scores"), f"stored scores {path}"))
    out.stored = _provenance(path, obj)
    return out


def find_scores(folders: Iterable[str | Path], key: str) -> StoredScores | None:
    """The table stored as ``<key>.pt`` in the first of ``folders`` that has it, or None (missing folders are
    skipped). Raises StoreError when the file found cannot be read (see :func:`load_scores`)."""
    return _find(folders, key, load_scores)


# --------------------------------------------------------------------------------------------- 2-D pairs
class StoredPair(tuple):
    """``(jem, baseline)``: two :class:`~jem_core.toy.ToyTrainer` read from a file (:func:`load_toy_pair`), as
    :func:`~jem_core.toy.pretrained_pair` returns them, plus ``stored``: the file, its key, the torch and Python
    versions and the UTC time (ISO 8601) they were trained."""

    stored: dict[str, Any]


def _toy_sources() -> tuple[str, ...]:
    """The sources a trained 2-D pair depends on: the trainer, the training loop and everything it trains and
    measures with."""
    from . import data, drift, losses, models, sampling, schedules, toy, training
    from .evaluation import calibration

    return tuple(m.__file__ for m in (toy, training, sampling, losses, energy, models, schedules, drift, data,
                                      calibration))


def toy_pair_key(spec: str, seed: int, iterations: int, labels_per_class: int | None = None,
                 measure_every: int = 25) -> str:
    """The content address of ``pretrained_pair(spec, seed, iterations, measure_every,
    labels_per_class=labels_per_class)`` with the default settings: 64 hex digits.

    Args:
        spec: the 2-D data spec (``toy:moons?noise=0.08&n=2000``, :func:`~jem_core.toy.load_toy`).
        seed: the seed of both trainers.
        iterations: training iterations of each (>= 0).
        labels_per_class: labelled points per class, or None for all.
        measure_every: iterations between two measured rows of the history (>= 1).

    Returns:
        SHA-256 hex digest over these and the sources of :mod:`jem_core.toy`, the training loop and what it
        trains with (see the module docstring); the torch build and the machine do not count.

    Raises:
        StoreError: ``spec`` is not a string, or a count is not an integer in range.
    """
    if not isinstance(spec, str):
        raise StoreError(f"toy_pair_key needs the data spec as a string (toy:moons?...); got {type(spec).__name__}")
    counts = {"seed": seed, "iterations": iterations, "measure_every": measure_every,
              "labels_per_class": labels_per_class}
    for name, v in counts.items():
        if v is None and name == "labels_per_class":
            continue
        if isinstance(v, bool) or not isinstance(v, int) or v < (1 if name == "measure_every" else 0):
            raise StoreError(f"toy_pair_key: {name} must be a non-negative integer (measure_every >= 1); got {v!r}")
    return _address(TOY_FORMAT, _toy_sources(), repr(sorted({"spec": spec, **counts}.items())), None, None, "")


def save_toy_pair(pair: tuple[Any, Any], folder: str | Path, key: str) -> Path:
    """Save a trained 2-D pair as ``folder/<key>.pt`` (atomic: a crash leaves the old file or the new one).

    Args:
        pair: ``(jem, baseline)`` :class:`~jem_core.toy.ToyTrainer` of :func:`~jem_core.toy.pretrained_pair`
            (their :meth:`~jem_core.toy.ToyTrainer.state_dict`: weights, optimizer, replay buffer, RNG states,
            history; about 0.5 MB).
        folder: where to write (made when missing).
        key: its :func:`toy_pair_key` (64 hex digits).

    Returns:
        The file written.

    Raises:
        StoreError: ``key`` is not 64 hex digits, or ``pair`` is not a JEM and a baseline trained on the same
        data. OSError: the folder cannot be written.
    """
    from .toy import ToyTrainer

    if not _is_key(key):
        raise StoreError(f"a stored pair's key is 64 lowercase hex digits (toy_pair_key); got {key!r}")
    if (not isinstance(pair, tuple) or len(pair) != 2 or not all(isinstance(t, ToyTrainer) for t in pair)
            or [t.objective for t in pair] != ["jem", "baseline"] or pair[0].dataset != pair[1].dataset):
        raise StoreError("save_toy_pair needs (jem, baseline) ToyTrainers on the same data, as pretrained_pair "
                         "returns them")
    jem = pair[0]
    return _save(folder, key, TOY_FORMAT, "pair",
                 {"spec": jem.dataset, "seed": jem.seed, "labels_per_class": jem.trainer.cfg.labels_per_class,
                  "jem": jem.state_dict(), "baseline": pair[1].state_dict()})


def load_toy_pair(path: str | Path) -> StoredPair:
    """Read a pair written by :func:`save_toy_pair` (tensors and plain values only: ``weights_only=True``) into
    two new :class:`~jem_core.toy.ToyTrainer` that continue exactly like the pair saved.

    Returns:
        :class:`StoredPair` ``(jem, baseline)`` with its ``stored`` provenance.

    Raises:
        StoreError: the file is missing, unreadable or not a stored pair of this format, or its trainers' state
        does not match this version's :class:`~jem_core.toy.ToyTrainer`.
    """
    from .data import DataUnavailableError
    from .toy import ToySettings, ToyTrainer, load_toy

    obj = _read(path, TOY_FORMAT, "pair", StoreError, "stored pair", "a stored 2-D pair",
                "write one with jem_core.report_store.save_toy_pair")
    pair = obj["pair"]
    try:
        spec, data = pair["spec"], (load_toy(pair["spec"], "train"), load_toy(pair["spec"], "test"))
        out = []
        for objective in ("jem", "baseline"):
            state = pair[objective]
            t = ToyTrainer(spec, objective, int(pair["seed"]), ToySettings(**state["settings"]), data=data,
                           labels_per_class=pair["labels_per_class"])
            t.load_state_dict(state)
            out.append(t)
    except (KeyError, TypeError, ValueError, RuntimeError, BadInput, DataUnavailableError) as e:
        raise StoreError(f"stored pair {path} does not match this version's ToyTrainer ({type(e).__name__}: {e}); "
                         f"train it again") from None
    result = StoredPair(out)
    result.stored = _provenance(path, obj)
    return result


def find_toy_pair(folders: Iterable[str | Path], key: str) -> StoredPair | None:
    """The pair stored as ``<key>.pt`` in the first of ``folders`` that has it, or None (missing folders are
    skipped). Raises StoreError when the file found cannot be read (see :func:`load_toy_pair`)."""
    return _find(folders, key, load_toy_pair)
