"""The command-line interface: ``python -m jem_core train | sample | inpaint | translate | score | likelihood | evaluate | import-official``.

What lives here: argument parsing, the calls into the library and the output (JSON lines, PNG files). What
does not: anything the commands compute (the library modules they call), nor the speed benchmarks
(``python bench/speed.py``, tooling beside the library).

Errors: bad input is reported argparse-style with exit status 2 -- a sub-command's own checks print that
sub-command's usage (``python -m jem_core train: error: ...``), and the library's
:class:`~jem_core.errors.BadInput` (bad option values, unknown datasets, unreadable checkpoints...) and
:class:`~jem_core.data.DataUnavailableError` (data files missing) become one line ``python -m jem_core CMD:
error: MESSAGE``; an output that cannot be written, or would replace an input or (``train``) an existing
checkpoint, is refused so before any work. A diverged training run exits with 3, Ctrl-C with 130. Any other exception is an error of
the program itself and propagates with its traceback.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import sys
import tempfile
from pathlib import Path
from typing import Any, Callable, Sequence

import torch

from .utils import rounded

__all__ = ["main", "build_parser"]

_COMMANDS: dict[str, Callable[[argparse.Namespace, argparse.ArgumentParser], int]] = {}


def _nonneg_int(s: str) -> int:
    v = int(s)
    if v < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0; got {v}")
    return v


def _pos_int(s: str) -> int:
    v = int(s)
    if v < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1; got {v}")
    return v


def _pos_float(s: str) -> float:
    v = float(s)
    if not (v > 0 and math.isfinite(v)):
        raise argparse.ArgumentTypeError(f"must be a positive number; got {s}")
    return v


def _nonneg_float(s: str) -> float:
    v = float(s)
    if not (v >= 0 and math.isfinite(v)):
        raise argparse.ArgumentTypeError(f"must be a number >= 0; got {s}")
    return v


def _num(v: float, digits: int) -> float | None:
    """Round for JSON output; NaN/Inf (e.g. no samples in a baseline run) become null."""
    return rounded(float(v), digits)


_CHECKPOINT_HELP = "a checkpoint of this project (.pt; import-official converts others)"
_DEVICE_HELP = "cpu, cuda or cuda:N (default: cuda when present)"


# -- train -------------------------------------------------------------------------------------------
_TRAIN_HELP = {
    "dataset": "dataset spec: digits, mnist, fashion_mnist, cifar10, cifar100, svhn, npz:PATH, folder:PATH, "
               "toy:moons|circles|gaussians8|spirals[?n=2000&noise=0.08&seed=0], toy:csv:PATH (2-D points)",
    "objective": "jem (CE + contrastive p(x) term) or baseline (CE only)",
    "lr": "peak learning rate", "warmup_iters": "linear warm-up iterations",
    "decay_epochs": "epochs after which the learning rate is multiplied by --decay-rate",
    "arch": "auto (mlp for 2-D points, convnet for 1-channel data, wrn for 3x32x32), convnet, wrn or mlp",
    "mlp_hidden": "hidden units of each of the mlp's two hidden layers",
    "px_weight": "weight of the p(x) term", "pxy_weight": "weight of the optional p(x|y) term",
    "energy_l2": "L2 penalty on data and sample energies (stabiliser; 0 = off)",
    "sgld_steps": "SGLD steps per training iteration", "sgld_step_size": "SGLD step size",
    "sgld_noise": "SGLD noise std ([-1, 1] pixel units)",
    "exact_langevin": "tie noise std to sqrt(step size) (the Langevin equation)",
    "sgld_clamp": "clamp samples to [-1, 1]", "sgld_max_update": "clip each SGLD pixel update to +-this",
    "buffer_size": "replay buffer size", "reinit_freq": "probability of restarting a chain from noise",
    "data_noise": "std of Gaussian noise added to data", "labels_per_class": "semi-supervised: labelled images per class",
    "divergence_threshold": "|energy| above this counts as divergence",
    "max_retries": "divergence recoveries before giving up", "keep_buffer": "buffer samples stored in the checkpoint",
    "init_from": "start from this checkpoint's weights", "max_iters_per_epoch": "cap iterations per epoch (smoke runs)",
    "sgld_bf16": "SGLD gradients under bf16 autocast (faster where bf16 is native; see bench/README.md)",
    "sgld_init": "chain (re)starts: uniform U[-1, 1] noise (JEM) or gaussian, per-class Gaussians fitted to the data (JEM++)",
    "channels_last": "channels_last memory layout for the model (faster oneDNN convolutions on some CPUs)",
    "crop_padding": "pad-crop augmentation in pixels (-1 = auto: 4 for 32x32)", "flip": "horizontal flips (default: on for CIFAR)",
    "recipe": "start from a named recipe (settings printed and stored in the checkpoint); other training flags "
              "given beside it override single settings",
    "px_weight_schedule": "p(x) weight by epoch, EPOCH:VALUE,... piecewise constant (e.g. 0:1,0.5:0.1,4:0.05)",
    "energy_l2_schedule": "energy L2 penalty by epoch, EPOCH:VALUE,... piecewise constant",
    "lr_schedule": "learning-rate shape after warm-up: step (--decay-epochs), cosine (to --lr-floor x lr) or constant",
    "lr_floor": "final learning-rate factor of the cosine schedule, in [0, 1]",
    "val_split": "hold out the last N training images for validation (per-epoch metrics, epoch selection; "
                 "the test split is then used once, for the chosen epoch)",
    "sample_eval": "replay-buffer samples judged per epoch on the validation split (0 = off)",
    "judge": "classifier checkpoint judging buffer samples (bundled:NAME = the project's checkpoints/NAME)",
    "ais_temps": "per-epoch AIS estimate of the validation log p(x) in nats with this many temperatures (0 = off)",
    "ais_chains": "AIS chains of that estimate (>= 2)",
    "drift_guard": "detect slow drift (energy gap, E(data), logit and gradient growth) and roll back before it",
    "drift_gap_limit": "drift limit on |E(data) - E(samples)| (nats, window mean)",
    "drift_energy_shift": "drift limit on the move of E(data) from its level (nats, window mean)",
    "drift_growth": "drift limit factor on logit magnitude and gradient norm growth",
    "drift_sustain": "suspect windows in a row that count as a drift",
    "max_drift_events": "drift rescues before training stops (the epoch chosen on validation is kept)",
    "epochs": "passes over the training split", "batch_size": "images per training iteration",
    "optimizer": "adam or sgd", "momentum": "SGD momentum (with --optimizer sgd)",
    "weight_decay": "L2 weight decay of the optimizer", "decay_rate": "learning-rate factor at each --decay-epochs epoch",
    "width": "convnet: channels of its first layer", "depth": "wrn: depth (layers)",
    "widen_factor": "wrn: widening factor", "norm": "normalisation layers: none (JEM's choice), batch or group",
    "seed": "random seed (data order, initial weights, SGLD noise)",
    "lr_backoff": "learning-rate factor after a divergence rollback, in (0, 1)",
    "guard_every": "iterations per drift-guard window", "n_reference": "validation (else test) images whose "
    "log p(x) quantiles are stored for the score command's percentiles",
    "data_root": "torchvision data root (default $JEM_DATA_ROOT or ~/.cache/jem_explorer/data)",
    "device": _DEVICE_HELP,
}


def _add_train(sub: argparse._SubParsersAction) -> None:
    from .training import TrainConfig

    p = sub.add_parser("train", help="train a JEM or baseline classifier",
                       description="Train a JEM (Grathwohl et al. 2019) or a baseline classifier and write a checkpoint.")
    p.add_argument("--out", required=True, help="checkpoint path to write (.pt); the resume state goes to OUT.resume.pt")
    p.add_argument("--resume", action="store_true", help="continue from OUT.resume.pt")
    p.add_argument("--overwrite", action="store_true",
                   help="replace an existing OUT (without it, or --resume, an existing OUT is refused)")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    positive = {"epochs", "batch_size", "buffer_size", "guard_every", "n_reference"}
    for f in dataclasses.fields(TrainConfig):
        flag = "--" + f.name.replace("_", "-")
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()  # type: ignore[misc]
        # No argparse defaults: only the flags given appear in the namespace, so they (and only they)
        # override a --recipe; without one, TrainConfig's own defaults apply.
        shown = ("on" if default else "off") if isinstance(default, bool) else default
        kw: dict[str, Any] = {"default": argparse.SUPPRESS, "help": _TRAIN_HELP[f.name]
                              + ("" if shown in (None, "", []) else f" (default: {shown})")}
        if f.name == "decay_epochs":
            kw.update(type=_pos_int, nargs="*")
        elif isinstance(default, bool) or f.name == "flip":
            kw.update(action=argparse.BooleanOptionalAction)
        elif f.name in positive:
            kw["type"] = _pos_int
        elif f.name in ("sgld_steps", "warmup_iters", "max_retries", "keep_buffer", "val_split", "sample_eval",
                        "max_drift_events", "ais_temps"):
            kw["type"] = _nonneg_int
        elif f.name in ("lr", "sgld_step_size", "divergence_threshold"):
            kw["type"] = _pos_float
        elif f.name in ("sgld_noise", "data_noise", "energy_l2", "px_weight", "pxy_weight", "weight_decay", "reinit_freq"):
            kw["type"] = _nonneg_float
        elif f.name in ("sgld_max_update", "drift_gap_limit", "drift_energy_shift", "drift_growth"):
            kw["type"] = _pos_float
        elif f.name in ("labels_per_class", "max_iters_per_epoch"):
            kw["type"] = _pos_int
        elif isinstance(default, int):
            kw["type"] = int
        elif isinstance(default, float):
            kw["type"] = float
        if f.name == "objective":
            kw["choices"] = ["jem", "baseline"]
        if f.name == "optimizer":
            kw["choices"] = ["adam", "sgd"]
        if f.name == "arch":
            kw["choices"] = ["auto", "convnet", "wrn", "mlp"]
        if f.name == "sgld_init":
            kw["choices"] = ["uniform", "gaussian"]
        if f.name == "drift_sustain":
            kw["type"] = _pos_int
        if f.name == "lr_floor":
            kw["type"] = _nonneg_float
        if f.name == "lr_schedule":
            from .schedules import LR_SCHEDULES
            kw["choices"] = list(LR_SCHEDULES)
        if f.name == "recipe":
            from .recipes import recipe_names
            kw["choices"] = recipe_names()
        p.add_argument(flag, **kw)
    p.set_defaults(cmd="train")


def _cmd_train(a: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    import torch.distributed as dist

    from .data import dataset_shape
    from .distributed import init_from_environment
    from .training import TrainConfig

    fields = {f.name for f in dataclasses.fields(TrainConfig)}
    given = {k: v for k, v in vars(a).items() if k in fields}  # the flags given (no argparse defaults)
    recipe = given.pop("recipe", None)
    if recipe:
        from .recipes import recipe_config

        cfg = recipe_config(recipe, **given)
        if not dist.is_initialized() or dist.get_rank() == 0:
            print(json.dumps({"recipe": recipe, "settings": dataclasses.asdict(cfg)}), flush=True)
    else:
        cfg = TrainConfig(**given)
    cfg.validate()
    dataset_shape(cfg.dataset)  # unknown names fail here, before any work
    if "judge" in given and given["judge"]:  # a judge named on the command line must exist (a recipe's may not)
        from .training import resolve_judge

        if resolve_judge(given["judge"]) is None:
            parser.error(f"--judge {given['judge']}: no such checkpoint (bundled:NAME names a file in the project's "
                         "checkpoints folder; anything else is a path)")
    device = init_from_environment(cfg.device)
    joined = device is not None
    if joined:
        cfg.device = device
    try:
        return _run_train(a, parser, cfg)
    finally:
        if joined and dist.is_initialized():
            dist.destroy_process_group()


def _run_train(a: argparse.Namespace, parser: argparse.ArgumentParser, cfg: Any) -> int:
    import torch.distributed as dist
    from tqdm.auto import tqdm

    from .training import Trainer, resume_path

    rank = dist.get_rank() if dist.is_initialized() else 0
    bar: list[Any] = [None]

    def on_iter(s: dict) -> None:
        if bar[0] is not None:
            bar[0].update(1)
            bar[0].set_postfix(loss=f"{s['loss']:.3f}", acc=f"{s['accuracy']:.2f}", lr=f"{s['lr']:.2g}", refresh=False)

    def on_epoch(m: Any) -> None:
        if bar[0] is not None:
            bar[0].close()
            bar[0] = None
        if rank == 0:
            val = ({"val_accuracy": _num(m.val_accuracy, 4), "val_ece": _num(m.val_ece, 4), "val_nll": _num(m.val_nll, 4),
                    "sample_fd": _num(m.sample_fd, 4), "sample_agreement": _num(m.sample_agreement, 4),
                    "px_weight": _num(m.px_weight, 4), "energy_l2": _num(m.energy_l2, 5),
                    "drift_events": m.drift_events, "val_log_px": _num(m.val_log_px, 2)}
                   if math.isfinite(m.val_accuracy) else {})
            print(json.dumps({"epoch": m.epoch, "test_accuracy": _num(m.test_accuracy, 4), **val, "loss": round(m.loss, 4),
                              "ce": _num(m.ce, 4), "E_data_minus_E_samples": _num(m.px, 4),
                              "energy_data": _num(m.energy_data, 3), "energy_samples": _num(m.energy_samples, 3),
                              "lr": m.lr, "seconds": round(m.seconds, 1), "divergence_events": m.divergence_events}),
                  flush=True)

    def log(s: str) -> None:
        if rank == 0:
            (tqdm.write if bar[0] is not None else print)(s, file=sys.stderr)

    def on_epoch_start(epoch: int, n: int) -> None:  # one progress bar per epoch
        if not a.quiet and rank == 0:
            bar[0] = tqdm(total=n, desc=f"epoch {epoch + 1}/{cfg.epochs}", leave=False, file=sys.stderr)

    trainer = Trainer(cfg, out=a.out, on_iteration=on_iter, on_epoch=on_epoch, on_epoch_start=on_epoch_start, log=log)
    if a.resume:
        if not resume_path(a.out).exists():
            parser.error(f"--resume: no resume state {resume_path(a.out)} (train once without --resume first)")
        trainer.resume(a.out)
    trainer.fit()
    if rank == 0:
        final = trainer.final or {}
        print(json.dumps({"checkpoint": a.out, "epochs": trainer.epoch,
                          "test_accuracy": (final.get("test_accuracy") if trainer.val_set is not None else
                                            trainer.history[-1].test_accuracy if trainer.history else None),
                          **({"selected_epoch": final.get("epoch"), "val_accuracy": final.get("val_accuracy"),
                              "test_ece": final.get("test_ece"), "test_nll": final.get("test_nll")}
                             if trainer.val_set is not None else {}),
                          "divergence_events": sum(e.get("kind") != "drift" for e in trainer.events),
                          "drift_events": sum(e.get("kind") == "drift" for e in trainer.events)}))
    if dist.is_initialized():
        dist.barrier()  # rank 0 may still be writing; leave together
    return 0


# -- sample ------------------------------------------------------------------------------------------
def _add_sample(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("sample", help="draw SGLD samples from a checkpoint and save a PNG grid")
    p.add_argument("--checkpoint", required=True, help=_CHECKPOINT_HELP)
    p.add_argument("--out", required=True, help="PNG file to write")
    p.add_argument("--n", type=_pos_int, default=64, help="number of samples")
    p.add_argument("--steps", type=_nonneg_int, default=None,
                   help="SGLD steps (default: 100 from the replay buffer, 500 from noise)")
    p.add_argument("--label", type=int, default=None, help="class to condition on (E(x, y)); default unconditional")
    p.add_argument("--init", choices=["auto", "buffer", "noise"], default="auto",
                   help="chain start: the checkpoint's replay buffer or U[-1, 1] noise (auto: buffer when present)")
    _add_sgld_args(p)
    p.set_defaults(cmd="sample")


def _add_sgld_args(p: argparse.ArgumentParser) -> None:
    """The SGLD and output options shared by sample, inpaint and translate."""
    p.add_argument("--step-size", type=_pos_float, default=1.0, help="SGLD step size on dE/dx ([-1, 1] pixel units)")
    p.add_argument("--noise-std", type=_nonneg_float, default=0.01, help="SGLD noise std ([-1, 1] pixel units)")
    p.add_argument("--exact-langevin", action="store_true", help="noise std = sqrt(step size)")
    p.add_argument("--max-update", type=_pos_float, default=None, help="clip each SGLD pixel update to +-this")
    p.add_argument("--seed", type=int, default=0, help="random seed (start images, SGLD noise)")
    p.add_argument("--scale", type=_pos_int, default=None, help="pixel upscaling of the PNG (default: 3 for 28x28, 10 for 8x8)")
    p.add_argument("--device", default=None, help=_DEVICE_HELP)


def _cmd_sample(a: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    from .checkpoint import load_checkpoint
    from .generation import draw_samples
    from .images import save_grid_png
    from .utils import select_device

    ck = load_checkpoint(a.checkpoint, device=select_device(a.device))
    k = int(ck.metadata["n_classes"])
    if a.label is not None and not 0 <= a.label < k:
        parser.error(f"--label must lie in [0, {k}) for this {k}-class model; got {a.label}")
    if a.init == "buffer" and ck.replay_buffer is None:
        parser.error(f"--init buffer: {a.checkpoint} holds no replay buffer; use --init noise")
    x, info = draw_samples(ck, a.n, steps=a.steps, label=a.label, init=a.init, step_size=a.step_size,
                           noise_std=a.noise_std, exact_langevin=a.exact_langevin, max_update=a.max_update,
                           seed=a.seed, progress=True)
    if tuple(x.shape[1:]) == (2, 1, 1):  # 2-D points: a scatter plot over the box, not an image grid
        from .toy import save_points_png

        save_points_png(x, a.out)
    else:
        save_grid_png(x, a.out, scale=_png_scale(a, ck))
    print(json.dumps({"out": a.out, **info}))
    return 0


def _png_scale(a: argparse.Namespace, ck) -> int:
    """``--scale``, or the upscaling that makes a tile about 84 pixels wide (3 for 28x28, 10 for 8x8)."""
    return a.scale or max(1, 84 // int(ck.metadata["image_size"]))


# -- inpaint / translate -----------------------------------------------------------------------------
def _add_inpaint(sub: argparse._SubParsersAction) -> None:
    from .sampling import MASK_KINDS

    p = sub.add_parser("inpaint", help="hide part of test images and fill it in by SGLD; PNG rows: original, "
                       "masked, in-painted")
    p.add_argument("--checkpoint", required=True, help=_CHECKPOINT_HELP)
    p.add_argument("--out", required=True, help="PNG file to write")
    p.add_argument("--mask", choices=MASK_KINDS, default="bottom", help="the part to fill in")
    p.add_argument("--n", type=_pos_int, default=8, help="number of images")
    p.add_argument("--steps", type=_nonneg_int, default=100, help="SGLD steps")
    p.add_argument("--conditional", action="store_true", help="sample E(x, y) with each image's label")
    p.add_argument("--data-root", default=None, help="where the test set lies (else the checkpoint's replay buffer)")
    _add_sgld_args(p)
    p.set_defaults(cmd="inpaint")


def _add_translate(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("translate", help="class translation: conditional SGLD on E(x, y=TO) from images of class "
                       "FROM; PNG rows are paths")
    p.add_argument("--checkpoint", required=True, help=_CHECKPOINT_HELP)
    p.add_argument("--out", required=True, help="PNG file to write")
    p.add_argument("--from", dest="source", type=int, required=True, help="class of the start images")
    p.add_argument("--to", dest="target", type=int, required=True, help="class to translate into")
    p.add_argument("--n", type=_pos_int, default=4, help="number of images")
    p.add_argument("--steps", type=_nonneg_int, default=200, help="SGLD steps")
    p.add_argument("--frames", type=_pos_int, default=8, help="snapshots along each path")
    p.add_argument("--data-root", default=None, help="where the test set lies (else the checkpoint's replay buffer)")
    _add_sgld_args(p)
    p.set_defaults(cmd="translate")


def _sources(a: argparse.Namespace, parser: argparse.ArgumentParser, label: int | None = None):
    """Checkpoint, sampler, generator and start images for inpaint/translate (``parser``: the sub-command's,
    for errors in ``--from``/``--to``)."""
    from .checkpoint import load_checkpoint
    from .data import DataUnavailableError, load_dataset
    from .errors import BadInput
    from .generation import source_images
    from .sampling import SGLDSampler
    from .utils import select_device

    dev = select_device(a.device)
    ck = load_checkpoint(a.checkpoint, device=dev)
    k = int(ck.metadata["n_classes"])
    for flag, v in (("--from", label), ("--to", getattr(a, "target", None))):
        if v is not None and not 0 <= v < k:
            parser.error(f"{flag} must lie in [0, {k}) for this {k}-class model; got {v}")
    test = None
    try:
        test = load_dataset(ck.metadata.get("dataset", ""), "test", a.data_root)
    except (DataUnavailableError, BadInput) as e:
        print(f"note: no test set ({e}); starting from the checkpoint's replay buffer", file=sys.stderr)
    g = torch.Generator().manual_seed(a.seed)
    x, y, where = source_images(ck, a.n, g, label=label, test_set=test)
    if len(x) < a.n:
        print(f"note: only {len(x)} start images were found ({where}), not the {a.n} of --n", file=sys.stderr)
    sampler = SGLDSampler(ck.model, a.step_size, a.noise_std, a.exact_langevin, clamp=True, max_update=a.max_update,
                          generator=torch.Generator(dev).manual_seed(a.seed + 1))
    return ck, sampler, g, x.to(dev), y.to(dev), where


def _bar(total: int, desc: str):
    from tqdm.auto import tqdm

    bar = tqdm(total=total, desc=desc, leave=False)
    return bar, lambda i, done: bar.update(done - bar.n)


def _cmd_inpaint(a: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    from .generation import inpaint
    from .images import save_grid_png

    ck, sampler, g, x, y, where = _sources(a, parser)
    bar, tick = _bar(a.steps, "in-painting")
    x0, chain = inpaint(x, a.mask, sampler, a.steps, y if a.conditional else None, g, tick)
    bar.close()
    save_grid_png(torch.cat([x, x0, chain.x]).cpu(), a.out, nrow=len(x), scale=_png_scale(a, ck))
    err = float((chain.x - x).abs().mean())
    print(json.dumps({"out": a.out, "source": where, "mask": a.mask, "steps": a.steps, "conditional": a.conditional,
                      "mean_abs_error": round(err, 4), "sampler": sampler.describe()}))
    return 0


def _cmd_translate(a: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    from .generation import class_translation
    from .images import save_grid_png

    ck, sampler, g, x, _, where = _sources(a, parser, label=a.source)
    bar, tick = _bar(a.steps, "translating")
    frames, chain = class_translation(ck, x, a.target, sampler, a.steps, a.frames, tick)
    bar.close()
    tiles = torch.stack([x] + frames, dim=1).flatten(0, 1).cpu()  # one row per image: start, then its path
    save_grid_png(tiles, a.out, nrow=a.frames + 1, scale=_png_scale(a, ck))
    final = chain.pred_history[-1] if chain.pred_history else torch.empty(0, dtype=torch.long)
    print(json.dumps({"out": a.out, "source": where, "from": a.source, "to": a.target, "steps": a.steps,
                      "reached_target": float((final == a.target).float().mean()) if len(final) else None,
                      "sampler": sampler.describe()}))
    return 0


# -- score -------------------------------------------------------------------------------------------
def _add_score(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("score", help="score images: label, probabilities, energy, log p(x) percentile (JSON lines)")
    p.add_argument("--checkpoint", required=True, help=_CHECKPOINT_HELP)
    p.add_argument("images", nargs="+", help="image files (PNG, JPEG, ...)")
    p.add_argument("--invert", choices=["auto", "yes", "no"], default="auto",
                   help="invert dark-on-light images (auto: decide from the border brightness)")
    p.add_argument("--no-digit-style", dest="digit_style", action="store_false",
                   help="for 1-channel models, skip MNIST's own normalisation (levels stretched, ink fitted "
                        "into a 20x20 box and centred by its centre of mass) and only pad and resize")
    p.add_argument("--device", default=None, help=_DEVICE_HELP)
    p.set_defaults(cmd="score")


def _cmd_score(a: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    from .checkpoint import load_checkpoint
    from .images import ImageDecodeError, load_image_file, prepare_upload
    from .scoring import score_batch
    from .utils import select_device

    dev = select_device(a.device)
    ck = load_checkpoint(a.checkpoint, device=dev)
    m = ck.metadata
    invert = {"auto": None, "yes": True, "no": False}[a.invert]
    failures = []
    for path in a.images:
        try:
            prep = prepare_upload(load_image_file(path), Path(path).name, int(m["in_channels"]), int(m["image_size"]), invert,
                                  digit_style=a.digit_style)
        except ImageDecodeError as e:
            failures.append(str(path))
            print(json.dumps({"image": path, "error": str(e)}), flush=True)
            continue
        r = score_batch(ck.model, prep.tensor[None].to(dev), m.get("reference"), m.get("class_names"))[0]
        print(json.dumps({"image": path, **r.to_dict(), "inverted": prep.inverted, "blank": prep.blank,
                          "notes": prep.notes}), flush=True)
    if failures:  # every readable image was scored; the status says that some were not
        parser.exit(2, f"{parser.prog}: error: {len(failures)} of {len(a.images)} images could not be read "
                       f"({', '.join(failures)}); each one's JSON line says why\n")
    return 0


# -- likelihood --------------------------------------------------------------------------------------
def _add_likelihood(sub: argparse._SubParsersAction) -> None:
    from .likelihood import BOUNDARIES, SAMPLERS, SCHEDULES

    p = sub.add_parser("likelihood", help="normalised log p(x): log Z by annealed importance sampling, test log p(x) "
                       "in nats and bits/dim (JSON)",
                       description="Estimate log Z of p(x) = exp(-E(x)) / Z on the box [-1, 1]^D (temperature 1, the "
                                   "model as trained) by forward AIS from the uniform box, with a reverse run from "
                                   "approximate samples (a diagnostic, not a bound) and a convergence sweep; then the "
                                   "test set's log p(x) in nats and bits/dim (uniform dequantisation).")
    p.add_argument("--checkpoint", required=True, help=_CHECKPOINT_HELP)
    p.add_argument("--data", default=None, help="test set spec (default: the checkpoint's dataset)")
    p.add_argument("--data-root", default=None, help="where torchvision-style data lies")
    p.add_argument("--n-test", type=_pos_int, default=None, help="use the first N test images (default: all)")
    p.add_argument("--temps", type=_pos_int, default=500, help="temperatures of the main AIS run")
    p.add_argument("--chains", type=_pos_int, default=64, help="AIS chains (>= 2)")
    p.add_argument("--sweep", type=_pos_int, nargs="*", default=None,
                   help="smaller numbers of temperatures for the convergence sweep (default: TEMPS/4 TEMPS/2)")
    p.add_argument("--schedule", choices=SCHEDULES, default="sigmoid", help="spacing of the temperatures")
    p.add_argument("--sampler", choices=SAMPLERS, default="hmc", help="Metropolis-corrected transition")
    p.add_argument("--leapfrog", type=_pos_int, default=5, help="leapfrog steps per HMC transition")
    p.add_argument("--boundary", choices=BOUNDARIES, default="reflect", help="handling of the box walls")
    p.add_argument("--no-reverse", action="store_true", help="skip the reverse (diagnostic) runs")
    p.add_argument("--seed", type=int, default=0, help="random seed (test images, AIS chains)")
    p.add_argument("--device", default=None, help=_DEVICE_HELP)
    p.add_argument("--out", default=None, help="also write the JSON to this file")
    p.add_argument("--store", default=None, metavar="FOLDER",
                   help="also save the whole report as FOLDER/<content address>.pt, where the app finds it "
                        "(jem_core.report_store)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(cmd="likelihood")


def _cmd_likelihood(a: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    from .checkpoint import load_checkpoint
    from .data import load_dataset
    from .likelihood import PUBLISHED_MNIST_BPD, LikelihoodError, estimate_log_likelihood, pixel_levels
    from .utils import select_device

    if a.chains < 2:
        parser.error(f"--chains must be >= 2; got {a.chains}")
    if a.sweep and max(a.sweep) >= a.temps:
        parser.error(f"--sweep values must be smaller than --temps {a.temps} (the convergence check compares fewer "
                     f"temperatures with the main run); got {' '.join(map(str, a.sweep))}")
    dev = select_device(a.device)
    ck = load_checkpoint(a.checkpoint, device=dev)
    m = ck.metadata
    shape = (int(m["in_channels"]), int(m["image_size"]), int(m["image_size"]))
    spec = a.data or str(m.get("dataset", ""))
    test = load_dataset(spec, "test", a.data_root, download=False, channels=shape[0], size=shape[1])
    if tuple(test.x.shape[1:]) != shape:
        raise LikelihoodError(f"{spec} images are {tuple(test.x.shape[1:])}, the model takes {shape}")
    x = test.x[:a.n_test] if a.n_test else test.x
    bar = None
    if not a.quiet:
        from tqdm.auto import tqdm
        bar = tqdm(total=1000, desc="AIS", leave=False, file=sys.stderr)
    kw = dict(shape=shape, levels=pixel_levels(spec), n_temps=a.temps, n_chains=a.chains, schedule=a.schedule,
              sampler=a.sampler, n_leapfrog=a.leapfrog, boundary=a.boundary, sweep=a.sweep, reverse=not a.no_reverse,
              seed=a.seed)
    rep = estimate_log_likelihood(ck.model, test_x=x, device=dev, **kw,
                                  progress=None if bar is None else (lambda f: bar.update(round(f * 1000) - bar.n)))
    if bar is not None:
        bar.close()
    stored = None
    if a.store:
        from .report_store import estimate_key, save_report

        stored = str(save_report(rep, a.store, estimate_key(ck.model, x, **kw)))
    out = {"checkpoint": a.checkpoint, "dataset": spec, "objective": m.get("objective"),
           "density": "p(x) = exp(-E(x)) / Z on the box [-1, 1]^D, temperature 1, the model as trained",
           "bits_per_dim_formula": "-(log p(u) + D log(2/L)) / (D ln 2) at dequantised pixels u, L levels",
           "reverse_note": "reverse AIS from approximate samples (forward end states resampled by weight, then HMC "
                           "at b=1): a diagnostic, not an upper bound",
           **rep.summary(), "curve": rep.forward.to_dict()["curve"], "step_sizes": rep.step_sizes.to_dict(),
           "stored": stored}
    if shape == (2, 1, 1):  # 2-D points: the exact answer by quadrature beside the AIS estimate
        from .toy import exact_log_likelihood, log_z_quadrature

        q = log_z_quadrature(ck.model, 256)
        out.update(exact_log_z=q.log_z, exact_log_z_grid_error=q.error,
                   exact_log_z_method="midpoint rule on a 256 x 256 grid over the box; error = |log Z(256) - "
                                      "log Z(128)| / 3",
                   exact_test_log_px_nats=float(exact_log_likelihood(ck.model, x.to(dev), q.log_z).mean()))
    if pixel_levels(spec) == 256 and spec.split(":")[0] in ("mnist", "fashion_mnist"):
        out["published_mnist_bits_per_dim_other_model_classes"] = [
            {"model": n, "bits_per_dim": v, "source": s} for n, v, s in PUBLISHED_MNIST_BPD]
    print(json.dumps(out, default=float), flush=True)  # first: a file that cannot be written loses nothing
    if a.out:
        Path(a.out).parent.mkdir(parents=True, exist_ok=True)
        Path(a.out).write_text(json.dumps(out, indent=1, default=float) + "\n")
    return 0



# -- evaluate ----------------------------------------------------------------------------------------
def _add_evaluate(sub: argparse._SubParsersAction) -> None:
    from .data import SYNTHETIC_OOD

    p = sub.add_parser(
        "evaluate", help="calibration, OOD detection, adversarial robustness and sample quality; writes a report",
        description="Evaluate a checkpoint (and optionally a second one to compare with) and write "
                    "OUT/report.json, OUT/report.md and PNG plots. eps values are in the [0, 1] pixel scale.")
    p.add_argument("--checkpoint", required=True, help="checkpoint to evaluate")
    p.add_argument("--compare", default=None, help="a second checkpoint of the same dataset (e.g. the baseline)")
    p.add_argument("--data-root", default=None, help="torchvision data root (default $JEM_DATA_ROOT or ~/.cache/jem_explorer/data)")
    p.add_argument("--ood", nargs="+", default=None, metavar="SET",
                   help="OOD sets: dataset specs (fashion_mnist, cifar10, npz:PATH, folder:PATH) and/or synthetic "
                        f"sets ({', '.join(SYNTHETIC_OOD)}). Default: the usual OOD dataset when present "
                        "(fashion_mnist for MNIST) plus all synthetic sets")
    p.add_argument("--eps", nargs="+", type=_nonneg_float, default=None, metavar="EPS",
                   help="L∞ eps values for PGD ([0, 1] pixel scale; default 0 0.05 0.1 0.2 0.3)")
    p.add_argument("--eps-l2", nargs="+", type=_nonneg_float, default=None, metavar="EPS",
                   help="L2 eps values for PGD ([0, 1] pixel scale; default 0 0.5 1 2 for 28x28, 0 0.25 0.5 1 for 8x8)")
    p.add_argument("--eps-fgsm", nargs="*", type=_nonneg_float, default=None, metavar="EPS",
                   help="FGSM eps values (default: the non-zero L∞ ones; give none to skip FGSM)")
    p.add_argument("--n-test", type=_pos_int, default=5000, help="test images for accuracy and calibration (default %(default)s)")
    p.add_argument("--n-calib", type=_nonneg_int, default=1000,
                   help="held-out test images (the last ones) for temperature scaling; 0 = no temperature scaling (default %(default)s)")
    p.add_argument("--n-ood", type=_pos_int, default=2000, help="images per OOD set (and in-distribution side) (default %(default)s)")
    p.add_argument("--n-attack", type=_pos_int, default=200, help="attacked test images (default %(default)s)")
    p.add_argument("--attack-steps", type=_pos_int, default=10, help="PGD steps (default %(default)s)")
    p.add_argument("--attack-loss", choices=["margin", "ce"], default="margin",
                   help="loss the attacks maximise: Carlini-Wagner margin (does not saturate on a JEM's large "
                        "logits) or cross-entropy (default %(default)s)")
    p.add_argument("--refine-steps", type=_nonneg_int, default=5,
                   help="SGLD steps of the refined classifier (0 = no refined classifier) (default %(default)s)")
    p.add_argument("--refine-chains", type=_pos_int, default=2, help="noisy chains averaged by the refined classifier (default %(default)s)")
    p.add_argument("--refine-gradient", choices=["bpda", "full"], default="bpda",
                   help="how the refined classifier is attacked: BPDA + EOT (identity backward) or full "
                        "back-propagation through the SGLD steps (slower) (default %(default)s)")
    p.add_argument("--n-per-class", type=_pos_int, default=20, help="class-conditional samples per class (default %(default)s)")
    p.add_argument("--sample-steps", type=_nonneg_int, default=100, help="SGLD steps per sample (default %(default)s)")
    p.add_argument("--bins", type=_pos_int, default=15, help="calibration bins (default %(default)s)")
    p.add_argument("--skip", nargs="+", default=[], choices=["calibration", "ood", "robustness", "samples"],
                   help="parts to leave out (their report keys are null)")
    p.add_argument("--seed", type=int, default=0, help="random seed (subsets, attacks, SGLD samples; default %(default)s)")
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1 (default: CUDA when available)")
    p.add_argument("--threads", type=_pos_int, default=1,
                   help="torch CPU threads (default %(default)s: on shared 2-core machines 2 threads ran these "
                        "small models 10-100x slower than 1)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--store", default=None, metavar="FOLDER",
                   help="also save every OOD score table as FOLDER/<content address>.pt, where the app finds it "
                        "(jem_core.report_store)")
    p.set_defaults(cmd="evaluate")


def _cmd_evaluate(a: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    import shlex

    from tqdm.auto import tqdm

    from .data import SYNTHETIC_OOD, data_available
    from .evaluation.ood import is_known_ood_spec
    from .evaluation.report import EvalSettings, evaluate_checkpoint, write_report
    from .utils import select_device

    for spec in a.ood or []:
        if not is_known_ood_spec(spec):
            parser.error(f"--ood: unknown set {spec!r}; use {', '.join(SYNTHETIC_OOD)} or a dataset spec "
                         "(fashion_mnist, mnist, cifar10, cifar100, svhn, npz:PATH, folder:PATH)")
        if spec not in SYNTHETIC_OOD and not (data_available(spec, a.data_root, "test")
                                              or data_available(spec, a.data_root, "all")):
            parser.error(f"--ood: the files of {spec!r} are not in the data root "
                         f"({a.data_root or 'default'}); pass --data-root or drop it")
    settings = EvalSettings(n_test=a.n_test, n_calib=a.n_calib, n_ood=a.n_ood, n_attack=a.n_attack,
                            attack_steps=a.attack_steps, eps_linf=a.eps, eps_l2=a.eps_l2, eps_fgsm=a.eps_fgsm,
                            attack_loss=a.attack_loss,
                            refine_steps=a.refine_steps, refine_chains=a.refine_chains,
                            refine_gradient=a.refine_gradient, n_per_class=a.n_per_class,
                            sample_steps=a.sample_steps, n_bins=a.bins, temperature=a.n_calib > 0, skip=a.skip,
                            seed=a.seed)
    if a.threads and (a.device or "cpu").startswith("cpu"):
        torch.set_num_threads(a.threads)
    torch.manual_seed(a.seed)
    bar = None if a.quiet else tqdm(total=1000, desc="evaluate", file=sys.stderr,
                                    bar_format="{desc}: {percentage:3.0f}%|{bar}| [{elapsed}<{remaining}]")

    def progress(f: float) -> None:
        if bar is not None:
            bar.update(int(f * 1000) - bar.n)

    def log(stage: str) -> None:
        if bar is not None:
            bar.set_description(stage)

    try:
        result = evaluate_checkpoint(a.checkpoint, a.data_root, a.ood, a.compare, settings,
                                     device=select_device(a.device), progress=progress, log=log, store=a.store)
    finally:
        if bar is not None:
            bar.close()
    command = "python -m jem_core " + " ".join(shlex.quote(x) for x in sys.argv[1:]) if sys.argv[1:2] == ["evaluate"] else None
    paths = write_report(result, a.out, command=command)
    summary = {k: result[k] for k in ("checkpoint", "accuracy", "ece", "nll")}
    if result.get("compare"):
        summary["compare"] = {k: result["compare"][k] for k in ("checkpoint", "accuracy", "ece", "nll")}
    print(json.dumps({"report": str(paths["json"]), "markdown": str(paths["markdown"]),
                      "seconds": result["seconds_total"], **rounded(summary, 4)}))
    return 0


# -- import-official ---------------------------------------------------------------------------------
def _add_import_official(sub: argparse._SubParsersAction) -> None:
    from .official import _INFER, _OFFICIAL_DATASETS

    p = sub.add_parser(
        "import-official", help="convert an official JEM checkpoint (github.com/wgrathwohl/JEM) into this format",
        description="Convert a checkpoint of the official JEM code (train_wrn_ebm.py: {'model_state_dict', "
                    "'replay_buffer'} or a bare state dict) once: every key and shape is checked, depth/width/norm "
                    "are inferred from the keys, a few hundred replay-buffer samples are kept, and log p(x) "
                    "reference quantiles are computed when the test set is available.")
    p.add_argument("path", metavar="PATH", help="the official checkpoint (.pt)")
    p.add_argument("--out", required=True, help="our checkpoint to write (.pt)")
    p.add_argument("--keep-buffer", type=_nonneg_int, default=400, help="replay-buffer samples to keep (0 = none)")
    p.add_argument("--dataset", choices=_OFFICIAL_DATASETS, default=None,
                   help="the model's dataset (default: cifar10 for 10 classes, cifar100 for 100; give svhn for SVHN)")
    p.add_argument("--data-root", default=None, help="torchvision data root holding the test split (for reference statistics)")
    p.add_argument("--n-reference", type=_nonneg_int, default=2000, help="test images for the reference statistics (0 = skip)")
    p.add_argument("--norm", choices=[_INFER, "none", "batch", "instance", "layer"], default=_INFER,
                   help="normalisation (default: inferred from the keys; 'layer' must be given, its keys equal 'instance')")
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1 (default: CUDA when available)")
    p.set_defaults(cmd="import_official")


def _cmd_import_official(a: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    from .official import convert_official

    summary = convert_official(a.path, a.out, keep_buffer=a.keep_buffer, dataset=a.dataset, data_root=a.data_root,
                               n_reference=a.n_reference, norm=a.norm, device=a.device,
                               log=lambda s: print(s, file=sys.stderr, flush=True))
    print(json.dumps(summary))
    return 0


_ADDERS = [_add_train, _add_sample, _add_inpaint, _add_translate, _add_score, _add_likelihood, _add_evaluate,
           _add_import_official]
_COMMANDS.update(train=_cmd_train, sample=_cmd_sample, inpaint=_cmd_inpaint, translate=_cmd_translate, score=_cmd_score,
                 likelihood=_cmd_likelihood, evaluate=_cmd_evaluate, import_official=_cmd_import_official)


#: The output of each command that writes one: (argument, "file" or "folder").
_OUTPUTS = {"train": [("out", "file")], "sample": [("out", "file")], "inpaint": [("out", "file")],
            "translate": [("out", "file")], "likelihood": [("out", "file"), ("store", "folder")],
            "evaluate": [("out", "folder"), ("store", "folder")], "import_official": [("out", "file")]}


def _unwritable(folder: Path) -> str | None:
    """Why nothing can be created in ``folder`` (or, when it does not exist yet, in its nearest existing ancestor,
    where it would be made), or None when a file can be: a temporary file is created there and removed."""
    p = folder.absolute()
    while not p.exists() and p != p.parent:
        p = p.parent
    if not p.is_dir():
        return f"{p} is a file, not a folder"
    try:
        with tempfile.TemporaryFile(dir=p):
            pass
    except OSError as e:
        return f"{p} is not writable ({e.strerror or e})"
    return None


def _check_outputs(a: argparse.Namespace, parser: argparse.ArgumentParser) -> None:
    """Refuse, before any work, an output that the command could not write or that would destroy an input:
    a file output that is an existing folder, a folder output that is an existing file, a place where nothing
    can be created (read-only, no permission), a file output that is the command's own input checkpoint or image,
    and (``train``) an existing checkpoint without ``--resume`` or ``--overwrite``.

    Raises:
        SystemExit(2): through ``parser.error``, with what was wrong and what to do.
    """
    # (import-official's own input is checked by convert_official, which library callers go through too)
    inputs = [Path(p) for p in [getattr(a, "checkpoint", None), *getattr(a, "images", [])] if p is not None]
    for name, kind in _OUTPUTS.get(a.cmd, []):
        value = getattr(a, name, None)
        if value is None:
            continue
        path, flag = Path(value), f"--{name}"
        if kind == "file" and path.is_dir():
            example = {"train": "model.pt", "import_official": "model.pt", "likelihood": "likelihood.json"}.get(a.cmd, "out.png")
            parser.error(f"{flag} {value} is a folder; give a file path inside it, e.g. {path / example}")
        if kind == "folder" and path.exists() and not path.is_dir():
            parser.error(f"{flag} {value} is a file; give a folder (it is created when missing)")
        why = _unwritable(path if kind == "folder" else path.parent)
        if why:
            parser.error(f"{flag} {value} cannot be written: {why}; choose another path")
        if kind == "file" and path.exists():
            if any(i.exists() and os.path.samefile(i, path) for i in inputs):
                parser.error(f"{flag} {value} is the input file of this command; writing there would replace it; "
                             "choose another path")
            if a.cmd == "train" and not (a.resume or a.overwrite):
                parser.error(f"{flag} {value} exists: pass --resume to continue its run, --overwrite to replace "
                             "it, or choose another path")


class _HelpWithDefaults(argparse.HelpFormatter):
    """Help that states an option's default when it has one and its help does not already say it."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        d = action.default
        flag = isinstance(action, (argparse._StoreTrueAction, argparse._StoreFalseAction))  # the help says it
        if text and action.option_strings and "default" not in text and not flag and not (
                d is None or d is False or d is argparse.SUPPRESS or d == []):
            text += " (default: %(default)s)"
        return text


def build_parser() -> argparse.ArgumentParser:
    """The argparse parser with every sub-command."""
    from . import __version__

    p = argparse.ArgumentParser(prog="python -m jem_core",
                                description="JEM Explorer: Joint Energy-based Models (Grathwohl et al. 2019).")
    p.add_argument("--version", action="version", version=__version__)
    sub = p.add_subparsers(dest="command", required=True)
    for add in _ADDERS:
        add(sub)
    for command in sub.choices.values():
        command.formatter_class = _HelpWithDefaults
    return p


def _subparser(parser: argparse.ArgumentParser, command: str) -> argparse.ArgumentParser:
    """The parser of sub-command ``command`` (its ``error`` prints that sub-command's usage)."""
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            return action.choices[command]
    raise LookupError(f"no sub-command {command!r}")


def main(argv: Sequence[str] | None = None) -> int:
    """Run the CLI; returns the exit status.

    Exit status: 0 on success; 2 for bad input (argparse's own errors; a sub-command's checks, with its usage,
    outputs that could not be written or would replace an input among them (:func:`_check_outputs`); ``score``:
    an image that could not be read, after every other one was scored; :class:`~jem_core.errors.BadInput` and
    :class:`~jem_core.data.DataUnavailableError` from the library, as one line ``PROG CMD: error: MESSAGE``
    on stderr); 3 for a diverged training run; 130 on Ctrl-C.

    Raises:
        Any other exception of a command, unchanged: it is a bug, and shows as one (a traceback).
    """
    from .data import DataUnavailableError
    from .errors import BadInput
    from .perf import tune_malloc
    from .training import TrainingDiverged

    parser = build_parser()
    a = parser.parse_args(argv)
    cmd_parser = _subparser(parser, a.command)
    tune_malloc()  # SGLD activations stay in the heap instead of fresh mmap pages (jem_core.perf, bench/README.md)
    _check_outputs(a, cmd_parser)
    root = getattr(a, "data_root", None)
    if root and a.cmd != "train" and not Path(root).is_dir():  # train downloads into a new root
        print(f"note: --data-root {root} is not a folder: MNIST and Fashion-MNIST test images come from the bundled "
              "demo pack instead, other datasets are unavailable", file=sys.stderr)
    try:
        return _COMMANDS[a.cmd](a, cmd_parser)
    except (BadInput, DataUnavailableError) as e:
        cmd_parser.exit(2, f"{cmd_parser.prog}: error: {e}\n")
    except TrainingDiverged as e:
        cmd_parser.exit(3, f"{cmd_parser.prog}: error: {e}\n")
    except KeyboardInterrupt:
        parser.exit(130, "interrupted\n")
    return 0
