"""Stored likelihood estimates: a :class:`~jem_core.likelihood.LikelihoodReport` saved under a content address.

An AIS estimate of a 28x28 model takes half a minute of a core and more (:mod:`jem_core.likelihood`). Saved
once, it is read back in milliseconds by anyone who asks the same question: the same weights, the same test
images, the same settings and the same estimator code. The address (:func:`estimate_key`) is a SHA-256 over
exactly those:

- the bytes of every tensor of the model's ``state_dict`` (names, dtypes, shapes, values), so retrained or
  edited weights never find an old estimate;
- the bytes of the test images (shape and float32 values);
- every keyword of :func:`~jem_core.likelihood.estimate_log_likelihood` that changes its result (temperatures,
  chains, schedule, transition, leapfrog steps, walls, sweep, reverse run, data chains, seed), defaults filled in;
- the source files of the estimator (:mod:`jem_core.likelihood`), of the energy (:mod:`jem_core.energy`) and of
  the model's class, so a change of method finds nothing stored and computes anew.

It does not cover the torch build or the machine: a stored estimate is one draw of the same estimator, whose
figures on another machine differ by about their standard errors (float summation order changes the chains).

A stored file (``<key>.pt``) holds only tensors and plain values (read with ``weights_only=True``,
:func:`jem_core.checkpoint.safe_torch_load`), with the key, the torch version and the time it was computed.
``python -m jem_core likelihood ... --store FOLDER`` writes one.

What does not live here: the estimator (:mod:`jem_core.likelihood`), the app's lookup (``app/registry.py``).
"""

from __future__ import annotations

import dataclasses
import datetime as _dt
import functools
import hashlib
import inspect
import sys
from pathlib import Path
from typing import Any, Iterable

import torch
from torch import nn

from . import energy, likelihood
from .checkpoint import CheckpointError, atomic_torch_save, safe_torch_load
from .likelihood import AISResult, LikelihoodError, LikelihoodReport, StepSizes, estimate_log_likelihood

__all__ = ["FORMAT", "estimate_key", "save_report", "load_report", "find_report"]

#: The ``format`` field of a stored report.
FORMAT = "jem-explorer-likelihood-report/1"

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
    h = hashlib.sha256(FORMAT.encode())
    for path in (likelihood.__file__, energy.__file__, inspect.getsourcefile(type(model))):
        h.update(_source_digest(str(path)))
    h.update(repr(sorted(args.items())).encode())
    for name, t in sorted(model.state_dict().items()):
        _update_tensor(h, name, t)
    if test_x is not None:
        _update_tensor(h, "test_x", test_x.float())
    return h.hexdigest()


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
    if len(key) != 64 or any(c not in "0123456789abcdef" for c in key):
        raise LikelihoodError(f"a stored report's key is 64 lowercase hex digits (estimate_key); got {key!r}")
    state = dataclasses.asdict(report)
    state.pop("stored", None)
    path = Path(folder) / f"{key}.pt"
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_torch_save({"format": FORMAT, "key": key, "torch": str(torch.__version__),
                       "python": sys.version.split()[0],
                       "computed": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
                       "report": state}, path)
    return path


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
    try:
        obj = safe_torch_load(str(path))
    except CheckpointError as e:
        raise LikelihoodError(f"stored report {path}: {e}") from None
    if not isinstance(obj, dict) or obj.get("format") != FORMAT or not isinstance(obj.get("report"), dict):
        found = obj.get("format") if isinstance(obj, dict) else type(obj).__name__
        raise LikelihoodError(f"{path} is not a stored likelihood report of format {FORMAT} (found {found!r}); "
                              f"write one with `python -m jem_core likelihood ... --store FOLDER`")
    d = dict(obj["report"])
    try:
        d["forward"], d["reverse"] = _ais(d["forward"]), _ais(d.get("reverse"))
        d["step_sizes"] = StepSizes(**d["step_sizes"])
        report = LikelihoodReport(**d)
    except (TypeError, KeyError) as e:
        raise LikelihoodError(f"stored report {path} does not match this version's LikelihoodReport ({e}); "
                              f"compute it again") from None
    report.stored = {"file": str(path), "key": obj.get("key"), "torch": obj.get("torch"),
                     "python": obj.get("python"), "computed": obj.get("computed")}
    return report


def find_report(folders: Iterable[str | Path], key: str) -> LikelihoodReport | None:
    """The report stored as ``<key>.pt`` in the first of ``folders`` that has it, or None (missing folders are
    skipped). Raises LikelihoodError when the file found cannot be read (see :func:`load_report`)."""
    for folder in folders:
        path = Path(folder) / f"{key}.pt"
        if path.is_file():
            return load_report(path)
    return None
