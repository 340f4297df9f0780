"""Checkpoints: weights + metadata (+ a small replay buffer), written atomically, loaded safely.

What lives here: the file format, atomic writing, the one safe ``torch.load`` of the library
(:func:`safe_torch_load`, also used for official JEM files), and building a model from a checkpoint dict with
every key and shape checked. What does not: mapping the official JEM code's files onto this format
(:mod:`jem_core.official`), resume state contents (:mod:`jem_core.training`).

File format (a ``torch.save`` dict of tensors and plain Python values only)::

    {"format": "jem_explorer/1",
     "state_dict": backbone.state_dict(),
     "metadata": {"arch", "arch_kwargs", "in_channels", "image_size", "n_classes", "dataset",
                  "normalization": "[-1, 1]", "objective", "train_args", "metrics",
                  "reference": {"logpx_quantiles": [101 floats]}, "version", ...},
     "replay_buffer": [M, C, H, W] float32 or None,
     "trainer": {...} (resume files only: optimizer, epoch, iteration, RNG states)}

A checkpoint is untrusted input: it is read with ``torch.load(..., weights_only=True)`` so that
a crafted pickle cannot run code, and the weights are checked key by key and shape by shape
before they reach a model, so no half-loaded model is ever returned.
"""

from __future__ import annotations

import io
import os
import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from . import __version__
from .energy import JEM
from .errors import BadInput
from .models import build_model
from .utils import atomic_write

__all__ = ["CheckpointError", "LoadedCheckpoint", "save_checkpoint", "load_checkpoint", "read_checkpoint",
           "safe_torch_load", "check_format", "checkpoint_from_dict", "atomic_torch_save", "check_state_dict",
           "state_dict_mismatch", "FORMAT", "REQUIRED_METADATA"]

FORMAT = "jem_explorer/1"
REQUIRED_METADATA = ("arch", "in_channels", "image_size", "n_classes")


class CheckpointError(BadInput):
    """A checkpoint could not be read or does not fit; the message says what is wrong."""


@dataclass
class LoadedCheckpoint:
    """A loaded checkpoint.

    Attributes:
        model: :class:`~jem_core.energy.JEM` in eval mode (on ``device``).
        metadata: the metadata dict.
        replay_buffer: ``[M, C, H, W]`` float32 in ``[-1, 1]`` or None.
        path: where it came from (or ``"<bytes>"``).
        raw: the whole loaded dict (for resume: the ``"trainer"`` entry).
    """

    model: JEM
    metadata: dict[str, Any]
    replay_buffer: torch.Tensor | None
    path: str
    raw: dict[str, Any]


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OverflowError, OSError):
        return True  # exists (another user's) or cannot tell: keep its file
    return True


#: A temp file without a writer's pid in its name (written before pids were recorded) counts as
#: stale once it is this old (seconds).
_STALE_TEMP_AGE = 600.0


def _remove_stale_temps(path: Path) -> None:
    """Delete temp files of ``path`` (``.NAME.PID.XXXXXXXX.tmp``) left by writers killed mid-write.

    Only this target's temp files, and only those whose writer (the pid in the name) no longer runs;
    temp files of live processes, this one included, are left alone. Best effort: errors are ignored.
    """
    pattern = re.compile(rf"\.{re.escape(path.name)}\.(?:(\d+)\.)?[a-z0-9_]{{8}}\.tmp")
    try:
        names = [n for n in os.listdir(path.parent) if n.endswith(".tmp")]
    except OSError:
        return
    for n in names:
        m = pattern.fullmatch(n)
        if m is None:
            continue
        f = path.parent / n
        try:
            if m.group(1) is not None:
                pid = int(m.group(1))
                if pid == os.getpid() or _pid_alive(pid):
                    continue
            elif time.time() - f.stat().st_mtime < _STALE_TEMP_AGE:
                continue
            f.unlink()
        except OSError:
            pass


def atomic_torch_save(obj: Any, path: str | os.PathLike) -> None:
    """``torch.save`` to a temp file in the same folder, fsync, then rename over ``path``.

    A crash at any point leaves either the old file or the new one, never a partial file. The temp
    file is ``.NAME.PID.XXXX.tmp``; a process killed mid-write leaves it behind, and the next
    successful save of the same target deletes it (temp files of live writers are kept). The file
    gets the usual permissions (``0o666`` less the umask), not ``mkstemp``'s ``0o600``.
    """
    path = atomic_write(path, lambda f: torch.save(obj, f))
    _remove_stale_temps(path)


def _plain(v: Any) -> Any:
    """Metadata must survive weights_only loading: only str/int/float/bool/None/list/dict."""
    if isinstance(v, dict):
        return {str(k): _plain(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_plain(x) for x in v]
    if isinstance(v, (str, int, float, bool)) or v is None:
        return v
    if torch.is_tensor(v) and v.numel() == 1:
        return v.item()
    if isinstance(v, os.PathLike):
        return str(v)
    if hasattr(v, "item"):
        return v.item()
    return str(v)


def save_checkpoint(path: str | os.PathLike, model: nn.Module, metadata: dict[str, Any],
                    replay_buffer: torch.Tensor | None = None, trainer: dict[str, Any] | None = None) -> None:
    """Write a checkpoint atomically.

    Args:
        path: target file (``.pt``); parent folders are created.
        model: the backbone or a :class:`JEM` (its backbone's weights are saved).
        metadata: must hold :data:`REQUIRED_METADATA`; the library version is added.
        replay_buffer: optional ``[M, C, H, W]`` samples to ship (keep M small: a few hundred).
        trainer: optional resume state (optimizer state dict, counters, RNG states).

    Raises:
        CheckpointError: metadata incomplete.
    """
    missing = [k for k in REQUIRED_METADATA if k not in metadata]
    if missing:
        raise CheckpointError(f"metadata lacks {missing}; it needs {list(REQUIRED_METADATA)}")
    backbone = model.f if isinstance(model, JEM) else model
    meta = _plain({**metadata, "version": __version__, "normalization": metadata.get("normalization", "[-1, 1]")})
    obj = {
        "format": FORMAT,
        "state_dict": {k: v.detach().cpu() for k, v in backbone.state_dict().items()},
        "metadata": meta,
        "replay_buffer": None if replay_buffer is None else replay_buffer.detach().cpu().float().contiguous(),
    }
    if trainer is not None:
        obj["trainer"] = trainer
    atomic_torch_save(obj, path)


def _file_head(source: str | os.PathLike | bytes, n: int = 8) -> bytes:
    if isinstance(source, (bytes, bytearray)):
        return bytes(source[:n])
    try:
        with open(source, "rb") as f:
            return f.read(n)
    except OSError:
        return b""


_MAGIC = ((b"\x89PNG", "a PNG image"), (b"\xff\xd8\xff", "a JPEG image"), (b"GIF8", "a GIF image"),
          (b"%PDF", "a PDF document"), (b"BM", "a BMP image"), (b"\x1f\x8b", "a gzip file"))


def _file_kind(head: bytes) -> str | None:
    """What a file that is not a checkpoint looks like, from its first bytes (None: no idea)."""
    if not head:
        return "an empty file"
    kind = next((k for magic, k in _MAGIC if head.startswith(magic)), None)
    if kind is None and all(32 <= c < 127 or c in b"\t\r\n" for c in head):
        kind = "a text file"
    return kind


def safe_torch_load(source: str | os.PathLike | bytes, map_location: str | torch.device = "cpu") -> Any:
    """``torch.load(source, map_location, weights_only=True)`` with every failure turned into one clear error.

    The one place the library unpickles a file it did not write itself (our checkpoints, resume states,
    the official JEM code's checkpoints): only tensors and plain containers are accepted, a file whose
    unpickling would build arbitrary objects or run code is refused, never executed, and the message never
    advises loading unsafely (torch's own message does).

    Args:
        source: a path, or the raw bytes of a file (an upload).
        map_location: where tensors go (default the CPU).

    Returns:
        The loaded object, unchecked (a dict for our checkpoints; see :func:`read_checkpoint`).

    Raises:
        CheckpointError: the file is missing; it was refused (it holds objects that could run code); it is
            corrupt, truncated or another format (the message says what it looks like, e.g. "a PNG image").
    """
    name = "<uploaded bytes>" if isinstance(source, (bytes, bytearray)) else str(source)
    if not isinstance(source, (bytes, bytearray)) and not Path(source).is_file():
        if Path(source).is_dir():
            raise CheckpointError(f"checkpoint {name} is a folder; give a .pt file in it")
        raise CheckpointError(f"checkpoint {name} does not exist")
    try:
        f = io.BytesIO(source) if isinstance(source, (bytes, bytearray)) else source
        return torch.load(f, map_location=map_location, weights_only=True)
    except Exception as e:  # torch raises many types here (UnpicklingError, RuntimeError, EOFError...)
        text = str(e)
        lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
        # torch's weights_only message starts with generic advice (never follow it: it says to load
        # unsafely); the specific reason is the line naming the global or the opcode.
        msg = next((ln for ln in lines if "GLOBAL" in ln or "Unsupported" in ln), lines[0] if lines else "")[:300]
        if not lines or isinstance(e, (KeyError, EOFError)):
            msg = f"{type(e).__name__}: {msg}".rstrip(": ")
        head = _file_head(source)
        # A refused global, or a raw pickle stream (protocol 2+ starts with 0x80) that the safe
        # unpickler cannot parse: either could run code if loaded unsafely.
        if "GLOBAL" in text or "Unsupported global" in text or ("Unsupported operand" in text and head[:1] == b"\x80"):
            raise CheckpointError(
                f"{name} was refused by weights_only=True loading: it contains Python objects that could run code "
                f"when unpickled (only tensors and plain values are accepted). Re-save it as a state dict. "
                f"Detail: {msg}") from e
        kind = _file_kind(head)
        raise CheckpointError(f"{name} is not a readable checkpoint (corrupt, truncated or another format"
                              f"{'; it is ' + kind if kind else ''}): {msg}") from e


def check_format(obj: Any, name: str = "checkpoint") -> None:
    """Check that a loaded object is a JEM Explorer checkpoint: a dict with ``"state_dict"`` and ``"metadata"``,
    the metadata holding :data:`REQUIRED_METADATA`.

    Raises:
        CheckpointError: another structure (an official JEM checkpoint gets a pointer to ``import-official``),
            or metadata lacking required keys.
    """
    if not isinstance(obj, dict) or "state_dict" not in obj or "metadata" not in obj:
        keys = list(obj)[:8] if isinstance(obj, dict) else type(obj).__name__
        hint = (" It looks like an official JEM checkpoint: convert it with "
                "`python -m jem_core import-official PATH --out ours.pt`." if isinstance(obj, dict) and
                ("model_state_dict" in obj or any(str(k).startswith("f.") for k in obj)) else "")
        raise CheckpointError(f"{name} is not a JEM Explorer checkpoint (expected keys 'state_dict' and 'metadata'; "
                              f"found {keys}).{hint}")
    meta = obj["metadata"]
    missing = [k for k in REQUIRED_METADATA if k not in meta] if isinstance(meta, dict) else list(REQUIRED_METADATA)
    if missing:
        raise CheckpointError(f"{name}: metadata lacks {missing}")


def read_checkpoint(source: str | os.PathLike | bytes, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Read a checkpoint file (or its bytes) safely and check its structure; no model is built.

    Returns:
        The checkpoint dict (the file format in the module docstring).

    Raises:
        CheckpointError: see :func:`safe_torch_load` (missing, refused, unreadable) and :func:`check_format`
            (not a JEM Explorer checkpoint).
    """
    name = "<uploaded bytes>" if isinstance(source, (bytes, bytearray)) else str(source)
    obj = safe_torch_load(source, map_location)
    check_format(obj, name)
    return obj


def list_names(names: list[str], limit: int = 20) -> str:
    """``"a, b, c"``, cut after ``limit`` names with ``", ... (+N more)"`` (for error messages)."""
    more = len(names) - limit
    return ", ".join(names[:limit]) + (f", ... (+{more} more)" if more > 0 else "")


def state_dict_mismatch(expected: dict[str, torch.Tensor], state: dict[str, Any]) -> str | None:
    """How ``state`` differs from ``expected`` (a model's ``state_dict()``), or None when it fits exactly.

    Returns:
        ``"missing keys: ...; unexpected keys: ...; shape mismatches: k (checkpoint [..], model [..])"``
        with only the parts that apply.
    """
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    shapes = [f"{k} (checkpoint {list(state[k].shape) if torch.is_tensor(state[k]) else type(state[k]).__name__}, "
              f"model {list(v.shape)})"
              for k, v in expected.items() if k in state and (not torch.is_tensor(state[k]) or state[k].shape != v.shape)]
    parts = [f"{what}: {list_names(names)}" for what, names in
             (("missing keys", missing), ("unexpected keys", unexpected), ("shape mismatches", shapes)) if names]
    return "; ".join(parts) or None


def check_state_dict(model: nn.Module, state: dict[str, torch.Tensor], name: str = "checkpoint") -> None:
    """Check that ``state`` fits ``model`` exactly, key by key and shape by shape.

    Raises:
        CheckpointError: naming missing keys, unexpected keys and shape mismatches.
    """
    problem = state_dict_mismatch(model.state_dict(), state)
    if problem:
        raise CheckpointError(f"{name} does not fit the architecture in its metadata: {problem}")


def load_checkpoint(source: str | os.PathLike | bytes, device: str | torch.device = "cpu") -> LoadedCheckpoint:
    """Load a checkpoint into a :class:`JEM` in eval mode.

    Args:
        source: path or raw bytes (an upload).
        device: where to put the model.

    Raises:
        CheckpointError: see :func:`read_checkpoint` and :func:`checkpoint_from_dict`.
    """
    name = "<uploaded bytes>" if isinstance(source, (bytes, bytearray)) else str(source)
    return checkpoint_from_dict(read_checkpoint(source), name, device)


def checkpoint_from_dict(obj: dict[str, Any], name: str = "checkpoint",
                         device: str | torch.device = "cpu") -> LoadedCheckpoint:
    """Build the model of a checkpoint dict (the file format in the module docstring) with every key and shape
    checked; the importer of official checkpoints (:mod:`jem_core.official`) maps its files onto this format.

    Args:
        obj: the checkpoint dict (from :func:`read_checkpoint`, or built in memory).
        name: how messages name it (a path, ``"<uploaded bytes>"``...).
        device: where to put the model.

    Returns:
        A :class:`LoadedCheckpoint`; its model is a :class:`JEM` in eval mode on ``device``, its replay buffer
        ``[M, C, H, W]`` float32 or None.

    Raises:
        CheckpointError: see :func:`check_format`; the metadata names an unknown architecture or bad arguments;
            the weights do not fit it (:func:`check_state_dict`); the replay buffer has the wrong shape.
    """
    check_format(obj, name)
    meta = obj["metadata"]
    try:
        backbone = build_model(meta["arch"], int(meta["in_channels"]), int(meta["n_classes"]), meta.get("arch_kwargs"))
    except (ValueError, TypeError) as e:
        raise CheckpointError(f"{name}: cannot build architecture from metadata: {e}") from e
    check_state_dict(backbone, obj["state_dict"], name)
    backbone.load_state_dict(obj["state_dict"], strict=True)
    buf = obj.get("replay_buffer")
    if buf is not None:
        want = (int(meta["in_channels"]), int(meta["image_size"]), int(meta["image_size"]))
        if not torch.is_tensor(buf) or buf.dim() != 4 or tuple(buf.shape[1:]) != want:
            raise CheckpointError(f"{name}: replay buffer must be [M, {want[0]}, {want[1]}, {want[2]}]; "
                                  f"got {tuple(buf.shape) if torch.is_tensor(buf) else type(buf).__name__}")
        buf = buf.float()
    model = JEM(backbone).to(device).eval()
    return LoadedCheckpoint(model, meta, buf, name, obj)
