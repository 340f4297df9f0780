"""Drawing samples from a loaded checkpoint: unconditional or class-conditional SGLD, in-painting,
class translation.

Chains start from the checkpoint's stored replay buffer (short-run from PCD states, as JEM
samples at test time) or from ``U[-1, 1]`` noise, and run SGLD on ``E(x)`` or ``E(x, y)``
(Grathwohl et al. 2019, sec. 4 and appendix). In-painting runs SGLD on the masked pixels only;
class translation runs conditional SGLD on ``E(x, y=target)`` from images of another class.

What does not live here: the sampler, chain state and masks (:mod:`jem_core.sampling`), judging samples
(:mod:`jem_core.evaluation.samples`), showing chains (``pages/langevin.py``).
"""

from __future__ import annotations

from typing import Any, Callable

import torch

from .checkpoint import LoadedCheckpoint
from .data import ImageDataset
from .errors import BadInput
from .sampling import ChainState, SGLDReport, SGLDSampler, frozen_parameters, half_mask, init_noise, inpaint_start
from .utils import predict_logits

__all__ = ["draw_samples", "chain_starts", "source_images", "advance_in_frames", "inpaint", "class_translation",
           "DEFAULT_STEPS"]

DEFAULT_STEPS = {"buffer": 100, "noise": 500}


def chain_starts(ck: LoadedCheckpoint, n: int, init: str = "auto", generator: torch.Generator | None = None,
                 device: torch.device | str = "cpu", data: torch.Tensor | None = None) -> tuple[torch.Tensor, str]:
    """``n`` chain starts ``[n, C, H, W]`` in ``[-1, 1]`` and the init actually used.

    Args:
        init: ``"buffer"`` (random rows of the stored replay buffer), ``"noise"`` (``U[-1, 1]``),
            ``"data"`` (random rows of ``data``, drawn with replacement) or ``"auto"`` (buffer when
            the checkpoint has one, else noise).
        data: ``[M, C, H, W]`` float32 in ``[-1, 1]`` (e.g. test images), for ``init="data"``.

    Raises:
        BadInput: ``init="buffer"`` but the checkpoint stores no buffer.
        ValueError: ``init="data"`` without data, or unknown init.
    """
    m = ck.metadata
    shape = (int(m["in_channels"]), int(m["image_size"]), int(m["image_size"]))
    if init == "auto":
        init = "buffer" if ck.replay_buffer is not None and len(ck.replay_buffer) else "noise"
    if init == "buffer":
        if ck.replay_buffer is None or not len(ck.replay_buffer):
            raise BadInput("this checkpoint stores no replay buffer; use init='noise'")
        idx = torch.randint(0, len(ck.replay_buffer), (n,), generator=generator)
        return ck.replay_buffer[idx].clone().to(device), "buffer"
    if init == "noise":
        return init_noise(n, shape, generator).to(device), "noise"
    if init == "data":
        if data is None or not len(data):
            raise ValueError("init='data' needs images to start from (e.g. the test set)")
        return data[torch.randint(len(data), (n,), generator=generator)].clone().to(device), "data"
    raise ValueError(f"unknown init {init!r}; use 'auto', 'buffer', 'noise' or 'data'")


def draw_samples(ck: LoadedCheckpoint, n: int = 64, steps: int | None = None, label: int | torch.Tensor | None = None,
                 init: str = "auto", step_size: float = 1.0, noise_std: float = 0.01, exact_langevin: bool = False,
                 max_update: float | None = None, seed: int = 0, progress: bool = False
                 ) -> tuple[torch.Tensor, dict[str, Any]]:
    """Draw ``n`` samples by SGLD from a checkpoint's JEM.

    Args:
        ck: a loaded checkpoint.
        n: number of samples.
        steps: SGLD steps (default :data:`DEFAULT_STEPS` for the init used).
        label: None (unconditional, ``E(x)``), a class index, or ``[n]`` int64 labels (``E(x, y)``).
        init, step_size, noise_std, exact_langevin, max_update: see :class:`~jem_core.sampling.SGLDSampler`.
        seed: the same seed gives the same samples.
        progress: show a tqdm bar.

    Returns:
        ``(x [n, C, H, W]`` float32 in ``[-1, 1]`` on the CPU, ``info`` dict: init, steps, sampler description,
        mean final energy).
    """
    dev = next(ck.model.parameters()).device
    g = torch.Generator().manual_seed(seed)
    x0, used = chain_starts(ck, n, init, g, dev)
    steps = DEFAULT_STEPS[used] if steps is None else int(steps)
    y = None
    if label is not None:
        y = (torch.full((n,), int(label), dtype=torch.long) if not torch.is_tensor(label) else label.long()).to(dev)
    gen_dev = torch.Generator(dev).manual_seed(seed + 1)
    sampler = SGLDSampler(ck.model, step_size, noise_std, exact_langevin, clamp=True, max_update=max_update,
                          generator=gen_dev)
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=steps, desc="SGLD", leave=False)

    def tick(r: SGLDReport) -> None:
        bar.update(r.step - bar.n)  # type: ignore[union-attr]

    with frozen_parameters(ck.model):
        x = sampler.run(x0, steps, y, every=1 if bar else 0, callback=tick if bar else None)
        e = ck.model.energy(x, y).mean().item() if steps else float("nan")
    if bar:
        bar.close()
    return x.cpu(), {"init": used, "steps": steps, "label": None if label is None else (int(label) if not torch.is_tensor(label) else "per-sample"),
                     "sampler": sampler.describe(), "mean_energy": e}


def source_images(ck: LoadedCheckpoint, n: int, generator: torch.Generator | None = None, label: int | None = None,
                  test_set: ImageDataset | None = None) -> tuple[torch.Tensor, torch.Tensor, str]:
    """``n`` real-looking start images for in-painting and class translation.

    Test images (of class ``label`` when given) when ``test_set`` is there; otherwise rows of the
    checkpoint's replay buffer (those the model classifies as ``label``), so that a checkpoint alone
    is enough offline.

    Returns:
        ``(x [m, C, H, W]`` float32 in ``[-1, 1]``, ``y [m]`` int64 (true labels for test images, the
        model's predictions for buffer rows), ``"test images"`` or ``"replay-buffer samples"``), with
        ``m = min(n, available)``.

    Raises:
        BadInput: no test set and no stored buffer; no image of class ``label``.
        ValueError: ``n < 1``.
    """
    if n < 1:
        raise ValueError(f"n must be >= 1; got {n}")
    if test_set is not None:
        pool = torch.arange(len(test_set)) if label is None else torch.nonzero(test_set.y == label).flatten()
        where, xs, ys = "test images", test_set.x, test_set.y
    else:
        buf = ck.replay_buffer
        if buf is None or not len(buf):
            raise BadInput("needs a test set or a checkpoint that stores a replay buffer")
        ys = predict_logits(ck.model, buf).argmax(1)
        pool = torch.arange(len(buf)) if label is None else torch.nonzero(ys == label).flatten()
        where, xs = "replay-buffer samples", buf
    if len(pool) == 0:
        raise BadInput(f"no {where[:-1]} of class {label}; pass the test set (--data-root) instead")
    idx = pool[torch.randperm(len(pool), generator=generator)[:n]]
    return xs[idx].clone(), ys[idx].clone(), where


def advance_in_frames(chain: ChainState, sampler: SGLDSampler, steps: int, n_frames: int,
                      on_frame: Callable[[int, int], None] | None = None) -> list[torch.Tensor]:
    """Advance ``chain`` by ``steps`` SGLD steps in ``n_frames`` near-equal pieces.

    Records energies and predictions after every step (``chain.energy_history`` etc.) and calls
    ``on_frame(frame index, steps done)`` after each piece (progress bars).

    Returns:
        ``n_frames`` snapshots ``[N, C, H, W]`` (the state after each piece).

    Raises:
        ValueError: ``steps < 0`` or ``n_frames < 1``.
    """
    if steps < 0 or n_frames < 1:
        raise ValueError(f"need steps >= 0 and n_frames >= 1; got {steps}, {n_frames}")
    frames, done = [], 0
    for i in range(n_frames):
        k = (steps * (i + 1)) // n_frames - done
        if k > 0:
            chain.advance(sampler, k, every=1)
            done += k
        frames.append(chain.x.clone())
        if on_frame is not None:
            on_frame(i, done)
    return frames


def inpaint(x: torch.Tensor, mask: torch.Tensor | str, sampler: SGLDSampler, steps: int = 100,
            y: torch.Tensor | None = None, generator: torch.Generator | None = None,
            on_frame: Callable[[int, int], None] | None = None, n_frames: int = 10) -> tuple[torch.Tensor, ChainState]:
    """Fill in the masked pixels of ``x`` by SGLD on ``E(x)`` (or ``E(x, y)``), the rest held fixed.

    Args:
        x: ``[N, C, H, W]`` float32 in ``[-1, 1]``.
        mask: bool broadcastable to ``x``, True = fill in, or a :data:`~jem_core.sampling.MASK_KINDS` name.
        sampler: an :class:`~jem_core.sampling.SGLDSampler` on the model.
        steps: SGLD steps.
        y: optional ``[N]`` int64 labels for conditional in-painting.

    Returns:
        ``(x0, chain)``: the start (masked pixels replaced by ``U[-1, 1]`` noise) and the finished
        :class:`~jem_core.sampling.ChainState` (``chain.x`` is the in-painted batch).

    Raises:
        ValueError: unknown mask name, bad ``steps``.
    """
    if isinstance(mask, str):
        mask = half_mask(mask, tuple(x.shape[1:]), generator)
    x0 = inpaint_start(x, mask, generator)
    chain = ChainState(x=x0.clone(), y=y, mask=mask)
    advance_in_frames(chain, sampler, steps, n_frames, on_frame)
    return x0, chain


def class_translation(ck: LoadedCheckpoint, x: torch.Tensor, target: int, sampler: SGLDSampler, steps: int = 200,
                      n_frames: int = 8,
                      on_frame: Callable[[int, int], None] | None = None) -> tuple[list[torch.Tensor], ChainState]:
    """Translate images towards class ``target`` by conditional SGLD on ``E(x, y=target)``.

    The chains start at ``x`` (images of another class) and follow ``-dE(x, target)/dx``; the
    classifier's prediction along the way (``chain.pred_history``) shows when the image changes
    class (Grathwohl et al. 2019 list this among JEM's uses; the same chain as conditional sampling,
    started from data instead of noise).

    Args:
        ck: the checkpoint whose model ``sampler`` runs.
        x: ``[N, C, H, W]`` float32 in ``[-1, 1]``.
        target: class index in ``[0, K)``.
        sampler: an :class:`~jem_core.sampling.SGLDSampler` on the model.
        steps, n_frames: total SGLD steps and the number of snapshots along the path.

    Returns:
        ``(frames, chain)``: ``n_frames`` snapshots ``[N, C, H, W]`` and the finished chain.

    Raises:
        BadInput: ``target`` outside the model's classes.
        ValueError: bad ``steps``/``n_frames``.
    """
    k = int(ck.metadata["n_classes"])
    if not 0 <= target < k:
        raise BadInput(f"target class must lie in [0, {k}); got {target}")
    chain = ChainState(x=x.clone(), y=torch.full((len(x),), int(target), dtype=torch.long, device=x.device))
    frames = advance_in_frames(chain, sampler, steps, n_frames, on_frame)
    return frames, chain
