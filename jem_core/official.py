"""Import checkpoints written by the official JEM code (Grathwohl et al. 2019, github.com/wgrathwohl/JEM).

What lives here: the mapping of an official file onto this project's checkpoint format (unwrapping, the key
map, the architecture inferred from key names and shapes, the replay buffer's checks) and the one-time
conversion behind ``python -m jem_core import-official``. What does not: reading files and building models
with every key and shape checked -- that is the normal loader's job (:mod:`jem_core.checkpoint`:
:func:`~jem_core.checkpoint.safe_torch_load`, :func:`~jem_core.checkpoint.checkpoint_from_dict`), and every
failure is its :class:`~jem_core.checkpoint.CheckpointError`.

The official ``train_wrn_ebm.py`` saves ``{"model_state_dict": f.state_dict(), "replay_buffer":
buffer}`` where ``f`` is its ``F``/``CCF`` module (a WideResNet trunk ``f`` plus the heads
``energy_output`` and ``class_output``) and ``buffer`` is a float tensor ``[10000, 3, 32, 32]`` in
roughly ``[-1, 1]``. Shared checkpoints are sometimes a bare state dict instead. This module:

- unwraps it (:func:`load_official_state_dict`), infers the architecture from key names and
  shapes alone (:func:`infer_wrn_config`),
- maps the keys onto :class:`~jem_core.wideresnet.WideResNet`'s (the same layout: only a ``module.`` prefix is
  dropped and BatchNorm's ``num_batches_tracked``, absent before PyTorch 0.4.1, filled in) and hands the result
  to the normal loader (:func:`build_from_official`): a mismatch raises naming the keys; a half-loaded model is
  never returned,
- and describes it for our checkpoint metadata (:func:`official_metadata`).

Typical use (the ``import-official`` CLI command)::

    model, config, buffer = build_from_official(safe_torch_load(path))
    save_checkpoint(out, model, official_metadata(config, path), replay_buffer=buffer)
"""

from __future__ import annotations

import os
import re
import warnings
from collections.abc import Mapping
from typing import Any

import torch

from .checkpoint import FORMAT, CheckpointError, checkpoint_from_dict, list_names, safe_torch_load
from .errors import BadInput
from .wideresnet import WideResNet

__all__ = [
    "load_official_state_dict",
    "infer_wrn_config",
    "validate_replay_buffer",
    "build_from_official",
    "official_metadata",
    "convert_official",
    "CIFAR10_CLASSES",
]

_IMAGE_SIZE = 32
_LAYER_KEY = re.compile(r"^f\.layer([123])\.(\d+)\.")


def _is_state_dict(obj: Any) -> bool:
    return (isinstance(obj, Mapping) and len(obj) > 0
            and all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in obj.items()))


def _strip_module_prefix(sd: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Drop a leading ``module.`` (DataParallel / DDP) from the keys when EVERY key has it."""
    if sd and all(k.startswith("module.") for k in sd):
        return {k[len("module."):]: v for k, v in sd.items()}
    return dict(sd)


def load_official_state_dict(obj: Any) -> tuple[dict[str, torch.Tensor], Any | None]:
    """Unwrap an official checkpoint object into ``(state_dict, replay_buffer or None)``.

    Accepts ``{"model_state_dict": sd, "replay_buffer": buf}`` (``replay_buffer`` optional) or a
    bare state dict (a non-empty mapping of str to tensors). A leading ``module.`` prefix
    (DataParallel) is stripped. The replay buffer is returned as found; it is validated by
    :func:`validate_replay_buffer` (which :func:`build_from_official` calls).

    Raises:
        CheckpointError: ``obj`` is neither form.
    """
    buffer = None
    if isinstance(obj, Mapping) and "model_state_dict" in obj:
        sd = obj["model_state_dict"]
        buffer = obj.get("replay_buffer")
        if not _is_state_dict(sd):
            raise CheckpointError(
                "'model_state_dict' of the checkpoint is not a state dict (a non-empty mapping of names to tensors); "
                f"got {type(sd).__name__}"
            )
    elif _is_state_dict(obj):
        sd = obj
    else:
        if isinstance(obj, Mapping):
            keys = [repr(k) for k in list(obj)[:10]]
            what = f"a dict with keys {', '.join(keys)}" if keys else "an empty dict"
        else:
            what = f"a {type(obj).__name__}"
        raise CheckpointError(
            "not an official JEM checkpoint: expected a dict with 'model_state_dict' (and optionally "
            f"'replay_buffer'), or a bare state dict of tensors; got {what}"
        )
    return _strip_module_prefix(sd), buffer


def infer_wrn_config(state_dict: Mapping[str, torch.Tensor]) -> dict[str, Any]:
    """Infer the official WideResNet's configuration from key names and tensor shapes alone.

    - depth ``= 6n + 4`` with ``n`` = number of blocks in ``f.layer1`` (layer2/3 must agree),
    - widen_factor ``= f.layer1.0.conv1.weight.shape[0] / 16``,
    - n_classes ``= class_output.weight.shape[0]``, in_channels ``= f.conv1.weight.shape[1]``,
    - norm from ``f.bn1``'s keys: ``running_mean`` -> ``"batch"``; ``weight`` without running
      statistics -> ``"instance"`` (the official ``"layer"`` norm has the same keys and cannot be
      told apart; override with ``build_from_official(..., norm="layer")``); no keys -> None.
      ActNorm (``loc``/``scale``) is recognised and refused.
    - trunk_linear_out ``= f.linear.weight.shape[0]`` (the unused trunk head; 10 officially).

    Works on tensors of any device, including ``meta`` (only shapes are read). A ``module.``
    prefix is stripped first.

    Returns:
        ``dict(depth=, widen_factor=, n_classes=, in_channels=, norm=, trunk_linear_out=)``.

    Raises:
        CheckpointError: the keys do not look like the official JEM WideResNet.
    """
    sd = _strip_module_prefix(state_dict)
    needed = ["f.conv1.weight", "f.layer1.0.conv1.weight", "class_output.weight"]
    missing = [k for k in needed if k not in sd]
    if missing:
        raise CheckpointError(
            "state dict does not look like the official JEM WideResNet (F/CCF from train_wrn_ebm.py): "
            f"missing {list_names(missing)}; first keys: {list_names(list(sd)[:8])}"
        )
    blocks: dict[int, set[int]] = {1: set(), 2: set(), 3: set()}
    for k in sd:
        m = _LAYER_KEY.match(k)
        if m:
            blocks[int(m.group(1))].add(int(m.group(2)))
    counts = {s: len(b) for s, b in blocks.items()}
    for s, b in blocks.items():
        if b != set(range(len(b))):
            raise CheckpointError(f"f.layer{s} has non-contiguous block indices {sorted(b)}")
    if len(set(counts.values())) != 1 or counts[1] == 0:
        raise CheckpointError(
            "the three WideResNet stages must have the same number of blocks; found "
            f"layer1={counts[1]}, layer2={counts[2]}, layer3={counts[3]}"
        )
    n = counts[1]
    width_ch = int(sd["f.layer1.0.conv1.weight"].shape[0])
    if width_ch % 16 != 0:
        raise CheckpointError(
            f"f.layer1.0.conv1.weight has {width_ch} output channels, not a multiple of 16: not an official WideResNet"
        )
    bn_keys = {k[len("f.bn1."):] for k in sd if k.startswith("f.bn1.")}
    if "running_mean" in bn_keys:
        norm = "batch"
    elif {"loc", "scale"} & bn_keys:
        raise CheckpointError(
            "this checkpoint uses the official ActNorm (norm='act', keys f.bn1.loc/scale), which is not supported"
        )
    elif "weight" in bn_keys:
        norm = "instance"
    elif bn_keys:
        raise CheckpointError(f"unrecognised normalisation keys f.bn1.{{{', '.join(sorted(bn_keys))}}}")
    else:
        norm = None
    lin = sd.get("f.linear.weight")
    return {
        "depth": 6 * n + 4,
        "widen_factor": width_ch // 16,
        "n_classes": int(sd["class_output.weight"].shape[0]),
        "in_channels": int(sd["f.conv1.weight"].shape[1]),
        "norm": norm,
        "trunk_linear_out": int(lin.shape[0]) if lin is not None and lin.dim() == 2 else 10,
    }


def validate_replay_buffer(buffer: Any, in_channels: int = 3) -> torch.Tensor | None:
    """Check an official replay buffer and return it as a CPU float32 tensor ``[N, C, 32, 32]`` in ``[-1, 1]``.

    ``None``, an empty list (the official code's "no buffer") or a tensor with ``N == 0`` give
    None. Values outside ``[-1, 1]`` (the official SGLD does not clamp) are clamped, with a
    ``UserWarning`` saying how many.

    Raises:
        CheckpointError: not a floating tensor of shape ``[N, in_channels, 32, 32]``, or
            holds NaN/Inf.
    """
    if buffer is None or (isinstance(buffer, (list, tuple)) and len(buffer) == 0):
        return None
    if not isinstance(buffer, torch.Tensor):
        raise CheckpointError(f"replay_buffer must be a tensor [N, C, 32, 32]; got {type(buffer).__name__}")
    if not buffer.is_floating_point():
        raise CheckpointError(f"replay_buffer must be a floating tensor; got dtype {buffer.dtype}")
    expected = (in_channels, _IMAGE_SIZE, _IMAGE_SIZE)
    if buffer.dim() != 4 or tuple(buffer.shape[1:]) != expected:
        raise CheckpointError(
            f"replay_buffer must have shape [N, {in_channels}, 32, 32]; got {list(buffer.shape)}"
        )
    if buffer.shape[0] == 0:
        return None
    buf = buffer.detach().to(device="cpu", dtype=torch.float32).contiguous()
    if not torch.isfinite(buf).all():
        bad = int((~torch.isfinite(buf)).flatten(1).any(1).sum())
        raise CheckpointError(f"replay_buffer holds NaN/Inf values in {bad} of {buf.shape[0]} samples")
    outside = int(((buf < -1) | (buf > 1)).sum())
    if outside:
        warnings.warn(
            f"replay_buffer: {outside} of {buf.numel()} values outside [-1, 1] "
            f"(min {buf.min().item():.3g}, max {buf.max().item():.3g}); clamped into [-1, 1]",
            UserWarning, stacklevel=2,
        )
        buf = buf.clamp_(-1.0, 1.0)
    return buf


def _map_keys(sd: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The official keys as :class:`WideResNet` names them: the same layout, with BatchNorm's
    ``num_batches_tracked`` (absent from checkpoints of PyTorch < 0.4.1; it does not affect outputs) filled in
    as 0 next to every ``running_mean``."""
    out = dict(sd)
    for k in sd:
        if k.endswith(".running_mean"):
            out.setdefault(k[: -len("running_mean")] + "num_batches_tracked", torch.zeros((), dtype=torch.long))
    return out


_INFER = "infer"


def build_from_official(obj: Any, *, norm: str | None = _INFER) -> tuple[WideResNet, dict[str, Any], torch.Tensor | None]:
    """Rebuild an official JEM model as a :class:`WideResNet` with every key and shape checked.

    Args:
        obj: what :func:`~jem_core.checkpoint.safe_torch_load` returned for the file (a dict with
            ``"model_state_dict"`` or a bare state dict), or a path, which is then read with it.
        norm: ``"infer"`` (default) to take the normalisation from the keys; give ``"layer"``
            for an official ``--norm layer`` model (its keys equal ``"instance"``'s).

    Returns:
        ``(model, config, replay_buffer)``: the model on CPU, float32, in eval mode, with all
        weights loaded; ``config`` from :func:`infer_wrn_config` (``norm`` overridden if asked);
        the replay buffer ``[N, C, 32, 32]`` float32 in ``[-1, 1]`` or None
        (see :func:`validate_replay_buffer`).

    Raises:
        CheckpointError: unreadable or unrecognised input; missing keys, unexpected keys
            or shape mismatches (listed by name, by :func:`~jem_core.checkpoint.checkpoint_from_dict`);
            NaN/Inf weights; a malformed replay buffer.
    """
    source = os.fspath(obj) if isinstance(obj, (str, os.PathLike)) else "(in memory)"
    if isinstance(obj, (str, os.PathLike)):
        obj = safe_torch_load(obj)
    sd, raw_buffer = load_official_state_dict(obj)
    config = infer_wrn_config(sd)
    if norm != _INFER:
        if config["norm"] in ("instance", "layer") and norm in ("instance", "layer"):
            config["norm"] = norm
        elif norm != config["norm"] and not (norm == "none" and config["norm"] is None):
            raise CheckpointError(
                f"norm={norm!r} was asked for, but the checkpoint's keys say norm={config['norm']!r}"
            )
    sd = _map_keys(sd)
    name = (f"official JEM checkpoint {source} (architecture inferred from its keys: WRN-{config['depth']}-{config['widen_factor']}, "
            f"norm {config['norm']})")
    loaded = checkpoint_from_dict({"format": FORMAT, "state_dict": sd, "metadata": official_metadata(config, source),
                                   "replay_buffer": None}, name)
    nonfinite = [k for k, v in sd.items() if v.is_floating_point() and not torch.isfinite(v).all()]
    if nonfinite:
        raise CheckpointError(f"checkpoint weights hold NaN/Inf in: {list_names(nonfinite)}")
    buffer = validate_replay_buffer(raw_buffer, in_channels=config["in_channels"])
    return loaded.model.f, config, buffer


def official_metadata(config: Mapping[str, Any], source_path: str | os.PathLike) -> dict[str, Any]:
    """Metadata for our checkpoint format describing an imported official JEM model.

    ``arch_kwargs`` are the :class:`WideResNet` constructor arguments (``trunk_linear_out`` is
    added only when it is not the official 10), so ``build_model("wrn", in_channels, n_classes,
    arch_kwargs)`` rebuilds the same module.
    """
    k = int(config["n_classes"])
    arch_kwargs: dict[str, Any] = {
        "depth": int(config["depth"]),
        "widen_factor": int(config["widen_factor"]),
        "norm": config["norm"],
        "dropout": 0.0,
    }
    if int(config.get("trunk_linear_out", 10)) != 10:
        arch_kwargs["trunk_linear_out"] = int(config["trunk_linear_out"])
    return {
        "arch": "wrn",
        "arch_kwargs": arch_kwargs,
        "in_channels": int(config.get("in_channels", 3)),
        "image_size": _IMAGE_SIZE,
        "n_classes": k,
        "dataset": {10: "cifar10", 100: "cifar100"}.get(k, "unknown"),
        "normalization": "[-1, 1]",
        "objective": "jem",
        "source": "official JEM checkpoint " + os.fspath(source_path),
        "train_args": {},
        "metrics": {},
    }


# -- conversion and the ``import-official`` CLI command ----------------------------------------------------
#: CIFAR-10's class names in label order (torchvision's ``CIFAR10.classes``), for converted checkpoints.
CIFAR10_CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")
_OFFICIAL_DATASETS = ("cifar10", "cifar100", "svhn")  # what train_wrn_ebm.py trains on


def convert_official(path: str | os.PathLike, out: str | os.PathLike, *, keep_buffer: int = 400,
                     dataset: str | None = None, data_root: str | os.PathLike | None = None,
                     n_reference: int = 2000, norm: str | None = _INFER,
                     device: str | None = None, log: Any = None) -> dict[str, Any]:
    """Convert an official JEM checkpoint once into this project's format (weights + metadata + buffer).

    Args:
        path: the official file (``{"model_state_dict", "replay_buffer"}`` or a bare state dict).
        out: our checkpoint to write (atomically); must not be ``path``.
        keep_buffer: replay-buffer rows to keep, evenly spaced (the official buffer has 10,000;
            a few hundred are enough for the "init from buffer" option); 0 = none.
        dataset: ``"cifar10"``, ``"cifar100"`` or ``"svhn"``; default from the class count
            (10 -> cifar10, 100 -> cifar100). Pass ``"svhn"`` for an SVHN model.
        data_root: where the test split of ``dataset`` is (see :mod:`jem_core.data`); when it is
            there, ``metadata["reference"]`` (``log p(x)`` quantiles on the first ``n_reference``
            test images) is computed, else it is left out and ``metadata["reference_note"]`` says why.
        n_reference: test images for the reference statistics (0 = skip them).
        norm: see :func:`build_from_official`.
        device: where to compute the reference statistics (default: CUDA when available).
        log: optional callable taking progress lines.

    Returns:
        A summary dict (``out``, ``arch``, ``n_classes``, ``dataset``, ``buffer_rows``, ``buffer_kept``,
        ``reference``: its split description or None, ``note``).

    Raises:
        CheckpointError: unreadable or mismatching checkpoint (keys named).
        BadInput: bad arguments (``out`` is ``path``, negative counts, a dataset that does not fit).
    """
    from .checkpoint import save_checkpoint
    from .data import data_available, dataset_shape, load_dataset
    from .training import reference_statistics
    from .utils import select_device

    say = log or (lambda s: None)
    if os.path.exists(out) and os.path.exists(path) and os.path.samefile(path, out):
        raise BadInput(f"--out {os.fspath(out)} is the input file; choose another path")
    if keep_buffer < 0 or n_reference < 0:
        raise BadInput(f"keep_buffer and n_reference must be >= 0; got {keep_buffer}, {n_reference}")
    model, config, buffer = build_from_official(path, norm=norm)
    meta = official_metadata(config, path)
    k = int(config["n_classes"])
    if dataset is not None:
        if dataset not in _OFFICIAL_DATASETS:
            raise BadInput(f"dataset must be one of {', '.join(_OFFICIAL_DATASETS)}; got {dataset!r}")
        if dataset_shape(dataset)[2] != k:
            raise BadInput(f"dataset {dataset} has {dataset_shape(dataset)[2]} classes but the "
                           f"checkpoint's class_output has {k}")
        meta["dataset"] = dataset
    dataset = meta["dataset"]
    meta["class_names"] = list(CIFAR10_CLASSES) if dataset == "cifar10" else [str(i) for i in range(k)]
    rows = 0 if buffer is None else int(buffer.shape[0])
    kept = None
    if buffer is not None and keep_buffer > 0:
        kept = buffer[torch.linspace(0, rows - 1, min(keep_buffer, rows)).long()].clone()
    meta["import"] = {"source": os.fspath(path), "replay_buffer_rows": rows,
                      "replay_buffer_kept": 0 if kept is None else int(kept.shape[0]), "inferred": dict(config)}
    note = ""
    if n_reference == 0:
        note = "reference statistics skipped (n_reference 0): score percentiles unavailable"
    elif dataset == "unknown" or not data_available(dataset, data_root, "test"):
        note = (f"no {dataset} test split found (data root {data_root or 'default'}): reference statistics left out, "
                "so score percentiles are unavailable; re-run with --data-root pointing at the test set")
    else:
        test = load_dataset(dataset, "test", data_root, download=False).subset(n_reference)
        dev = select_device(device)
        say(f"computing reference log p(x) quantiles on {len(test)} {dataset} test images ({dev})")
        meta["reference"] = reference_statistics(model.to(dev), test.x, device=dev)
        meta["reference"]["split"] = f"{dataset} test (first {len(test)})" + (f"; {test.note}" if test.note else "")
        model.cpu()
    if note:
        meta["reference_note"] = note
    save_checkpoint(out, model, meta, replay_buffer=kept)
    return {"out": os.fspath(out), "arch": f"WRN-{config['depth']}-{config['widen_factor']}", "norm": config["norm"],
            "n_classes": k, "dataset": dataset, "buffer_rows": rows,
            "buffer_kept": 0 if kept is None else int(kept.shape[0]),
            "reference": meta.get("reference", {}).get("split"), "note": note or None}
