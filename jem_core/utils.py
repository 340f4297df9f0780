"""Small helpers every part of the library shares: eval mode, batched logits, the model's device, choosing a
device, JSON rounding, atomic writes.

What lives here: plumbing with no JEM meaning. What does not: energies (:mod:`jem_core.energy`), sampling,
evaluation metrics, anything that needs Streamlit.
"""

from __future__ import annotations

import contextlib
import math
import os
import tempfile
from pathlib import Path
from typing import IO, Any, Callable, Iterator

import torch
from torch import nn

from .errors import BadInput

__all__ = ["eval_mode", "device_of", "select_device", "predict_logits", "rounded", "atomic_write"]


@contextlib.contextmanager
def eval_mode(model: nn.Module) -> Iterator[None]:
    """Put ``model`` (and every submodule) in eval mode; restore each module's own flag on exit.

    Restoring per module matters for wrappers: ``wrapper.train(True)`` would also switch a wrapped
    model that was in eval mode to training mode.
    """
    flags = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        yield
    finally:
        for m, flag in flags:
            m.training = flag


def device_of(model: nn.Module) -> torch.device:
    """The device of the model's first parameter (CPU for a model without parameters)."""
    p = next(model.parameters(), None)
    return p.device if p is not None else torch.device("cpu")


def select_device(device: str | None = None) -> torch.device:
    """``device`` if given (``"cpu"``, ``"cuda"``, ``"cuda:1"``), else CUDA when available, else CPU.

    ``None``, ``""`` and ``"auto"`` all mean "choose".

    Raises:
        BadInput: CUDA asked for but not available.
    """
    if device in (None, "", "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise BadInput(f"device {device!r} requested but CUDA is not available; use --device cpu")
    return dev


@torch.no_grad()
def predict_logits(model: nn.Module, x: torch.Tensor, batch_size: int = 500,
                   progress: Callable[[float], None] | None = None) -> torch.Tensor:
    """Logits of ``model`` on ``x`` in batches, with the model in eval mode.

    Args:
        model: module ``[B, C, H, W] -> [B, K]``; its train/eval flag is restored afterwards.
        x: ``[N, C, H, W]`` float32 in ``[-1, 1]`` (any device; batches move to the model's).
        batch_size: images per forward pass (>= 1).
        progress: called with the fraction done in ``[0, 1]`` after every batch.

    Returns:
        ``[N, K]`` float32 logits on the CPU.

    Raises:
        ValueError: ``x`` not 4-D or ``batch_size < 1``.
    """
    if x.dim() != 4:
        raise ValueError(f"x must be [N, C, H, W]; got {tuple(x.shape)}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1; got {batch_size}")
    dev = device_of(model)
    out = []
    with eval_mode(model):
        for i in range(0, len(x), batch_size):
            out.append(model(x[i:i + batch_size].to(dev)).float().cpu())
            if progress is not None:
                progress(min(1.0, (i + batch_size) / max(1, len(x))))
    if not out:
        return torch.zeros(0, 0)
    return torch.cat(out)


def rounded(v: Any, digits: int = 4, significant: bool = False) -> Any:
    """Floats rounded for a readable JSON file, recursively through dicts, lists and tuples (tuples become
    lists); NaN and infinities become None (JSON has no such numbers); everything else is unchanged.

    Args:
        v: a float, or a container of them.
        digits: decimal places, or significant digits with ``significant``.
        significant: round to ``digits`` significant digits instead of decimal places.
    """
    if isinstance(v, float):
        if not math.isfinite(v):
            return None
        return float(f"{v:.{digits}g}") if significant else round(v, digits)
    if isinstance(v, dict):
        return {k: rounded(x, digits, significant) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [rounded(x, digits, significant) for x in v]
    return v


def _umask() -> int:
    """The process umask, read without changing it (``os.umask`` would race with other threads)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    return 0o022


def atomic_write(path: str | os.PathLike, write: Callable[[IO[bytes]], None]) -> Path:
    """Write a file so that a crash leaves either the old file or the complete new one, never a partial one.

    ``write(f)`` fills a temp file ``.NAME.PID.XXXXXXXX.tmp`` in the same folder; it is flushed and fsynced,
    renamed over ``path`` (``os.replace``), and the folder is fsynced so that the rename itself is durable.
    The file gets the usual permissions (``0o666`` less the umask). On any failure the temp file is removed
    and the error re-raised. Missing parent folders are created.

    Returns:
        ``path`` as a ``Path``.

    Raises:
        OSError: the file cannot be written; whatever ``write`` raises.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.{os.getpid()}.", suffix=".tmp", dir=path.parent)
    try:
        try:
            os.fchmod(fd, 0o666 & ~_umask())
        except (AttributeError, OSError):  # no fchmod (Windows) or a file system without modes
            pass
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        try:  # make the rename itself durable
            dfd = os.open(path.parent, os.O_RDONLY)
            try:
                os.fsync(dfd)
            finally:
                os.close(dfd)
        except OSError:
            pass
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise
    return path
