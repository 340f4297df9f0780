"""Multi-process training with torch.distributed (DDP): joining the process group and the collectives the trainer uses.

What lives here: joining the process group that ``torchrun`` describes in the environment, the probe for
parameters DDP must be told about, the joint decisions and averages over ranks, gathering every rank's replay
buffer and RNG state for the resume file, and re-slicing a saved buffer for another world size. What does not:
the training loop, the objective and checkpoints (:mod:`jem_core.training`, :mod:`jem_core.losses`,
:mod:`jem_core.checkpoint`). How a run is split over ranks is described in docs/SCALE.md.

Every function here except :func:`dist_info`, :func:`unused_parameters` and :func:`reshard_buffer` is a
collective: all ranks must call it the same number of times, in the same order (the trainer makes every
decision that could break this -- roll back, stop -- the same on all ranks).
"""

from __future__ import annotations

import os
from typing import Any, Callable

import torch
from torch import nn

from .checkpoint import CheckpointError
from .errors import BadInput
from .utils import select_device

__all__ = ["init_from_environment", "dist_info", "unused_parameters", "any_rank", "mean_over_ranks",
           "evaluate_over_ranks", "gather_rank_states", "reshard_buffer"]


def init_from_environment(device: str | None) -> str | None:
    """Join the process group when torchrun started more than one process.

    Backend nccl when the device (``device``, else CUDA when available) is CUDA, each process taking
    ``cuda:LOCAL_RANK``; else gloo on the CPU. Reads ``RANK``, ``WORLD_SIZE`` and ``LOCAL_RANK``.

    Returns:
        The device this process must train on (``"cuda:LOCAL_RANK"`` or ``"cpu"``) when this call joined a
        group; None when it did not (not launched by torchrun, one process, or a group already exists).

    Raises:
        BadInput: CUDA asked for but absent, or fewer CUDA devices than processes on this node.
    """
    import torch.distributed as dist

    world = int(os.environ.get("WORLD_SIZE", "1"))
    if "RANK" not in os.environ or world <= 1 or dist.is_initialized():
        return None
    dev = select_device(device)
    if dev.type == "cuda":
        local = int(os.environ.get("LOCAL_RANK", "0"))
        if local >= torch.cuda.device_count():
            raise BadInput(f"process with LOCAL_RANK {local} has no GPU: this node has {torch.cuda.device_count()} "
                           "CUDA device(s); start at most that many processes per node (--nproc_per_node)")
        torch.cuda.set_device(local)
        device, backend = f"cuda:{local}", "nccl"
    else:
        device, backend = "cpu", "gloo"
    dist.init_process_group(backend)
    return device


def dist_info() -> tuple[int, int]:
    """``(rank, world size)``; ``(0, 1)`` unless a process group is initialised."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def unused_parameters(model: nn.Module, shape: tuple[int, int, int], device: torch.device) -> list[str]:
    """Names of trainable parameters that get no gradient from the logits (one tiny forward/backward).

    Args:
        model: ``[B, C, H, W] -> [B, K]``; its train/eval flag is restored (the probe runs in eval mode, so
            batch-norm statistics do not move).
        shape: ``(C, H, W)`` of one input; the probe is a ``[2, C, H, W]`` batch of zeros on ``device``.
    """
    was = model.training
    model.eval()  # no batch-norm statistics updates from the probe
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    try:
        out = model(torch.zeros(2, *shape, device=device)).float().sum()
        grads = torch.autograd.grad(out, [p for _, p in named], allow_unused=True)
    finally:
        model.train(was)
    return [n for (n, _), g in zip(named, grads) if g is None]


def any_rank(reason: str | None, stop: bool, device: torch.device) -> tuple[str | None, bool]:
    """The decision after an iteration, the same on all ranks: ``(divergence reason or None, stop)``,
    where any rank's divergence or stop request counts for all (a max all-reduce of two flags)."""
    import torch.distributed as dist

    flags = torch.tensor([1.0 if reason else 0.0, 1.0 if stop else 0.0], device=device)
    dist.all_reduce(flags, op=dist.ReduceOp.MAX)
    diverged, stop_any = bool(flags[0] > 0), bool(flags[1] > 0)
    return ((reason or "divergence on another rank") if diverged else None), stop_any


def mean_over_ranks(d: dict[str, float], device: torch.device) -> dict[str, float]:
    """Average each value of ``d`` over ranks (float64 sum / world size; every rank ran the same number of
    iterations, so the mean of rank means is the mean over all iterations)."""
    import torch.distributed as dist

    keys = sorted(d)
    t = torch.tensor([d[k] for k in keys], dtype=torch.float64, device=device)
    dist.all_reduce(t)
    t /= dist.get_world_size()
    return {k: float(v) for k, v in zip(keys, t)}


def evaluate_over_ranks(evaluate: Callable[..., dict[str, float]], model: nn.Module, x: torch.Tensor,
                        y: torch.Tensor, device: torch.device) -> dict[str, float]:
    """Accuracy and NLL on the whole set ``x`` ``[N, C, H, W]``, ``y`` ``[N]``, each rank scoring every W-th image.

    Args:
        evaluate: the per-rank scorer, called as ``evaluate(model, x_share, y_share, device=device)`` and
            returning ``{"accuracy", "nll"}`` means over its share
            (:func:`jem_core.training.evaluate_classifier`).

    Returns:
        ``{"accuracy" (in [0, 1]), "nll" (nats per image)}``: share means weighted by share size.
    """
    import torch.distributed as dist

    rank, world = dist.get_rank(), dist.get_world_size()
    xs, ys = x[rank::world], y[rank::world]
    part = evaluate(model, xs, ys, device=device)
    n = len(xs)
    t = torch.tensor([part["accuracy"] * n, part["nll"] * n, float(n)], dtype=torch.float64, device=device)
    dist.all_reduce(t)
    total = max(1.0, float(t[2]))
    return {"accuracy": float(t[0]) / total, "nll": float(t[1]) / total}


def gather_rank_states(buffer: torch.Tensor | None, rng: dict) -> tuple[torch.Tensor | None, list[dict]]:
    """Every rank's replay buffer (``[W * rows, C, H, W]``, concatenated in rank order, on the CPU; None
    without one) and every rank's RNG state dict (a list in rank order)."""
    import torch.distributed as dist

    world = dist.get_world_size()
    rngs: list[Any] = [None] * world
    dist.all_gather_object(rngs, rng)
    if buffer is None:
        return None, rngs
    parts = [torch.empty_like(buffer) for _ in range(world)]
    dist.all_gather(parts, buffer.contiguous())
    return torch.cat([p.cpu() for p in parts]), rngs


def reshard_buffer(full: torch.Tensor, saved_world: int, world: int, rank: int, rows: int,
                   n_classes: int | None) -> torch.Tensor:
    """This rank's ``rows`` rows of a replay buffer saved by ``saved_world`` ranks (slices concatenated
    in rank order), for a run of ``world`` ranks.

    With the same world size each rank gets back exactly its own chains. Otherwise each rank takes
    an even contiguous share (per class for a class-conditional buffer, whose slices are laid out
    as ``n_classes`` blocks), cut to ``rows`` or topped up with fresh U[-1, 1] noise (from the
    global torch RNG, seeded per rank).

    Args:
        full: ``[M, C, H, W]`` the saved buffer (any float dtype and device).

    Returns:
        ``[rows, C, H, W]`` float32 on the CPU.

    Raises:
        CheckpointError: a class-conditional buffer whose size does not split into the saved layout.
    """
    from .sampling import init_noise

    full = full.detach().cpu().float()
    shape = tuple(full.shape[1:])

    def share(pool: torch.Tensor, want: int) -> torch.Tensor:
        p = pool.shape[0]
        out = pool[rank * p // world:(rank + 1) * p // world][:want]
        if out.shape[0] < want:
            out = torch.cat([out, init_noise(want - out.shape[0], shape, None).cpu()])
        return out

    if not n_classes:
        return share(full, rows)
    if full.shape[0] % (saved_world * n_classes):
        raise CheckpointError(f"class-conditional replay buffer of {full.shape[0]} rows does not split into "
                              f"{saved_world} rank(s) x {n_classes} classes")
    block = full.shape[0] // (saved_world * n_classes)
    pools = full.view(saved_world, n_classes, block, *shape).transpose(0, 1).reshape(n_classes, saved_world * block, *shape)
    return torch.cat([share(pools[k], rows // n_classes) for k in range(n_classes)])
