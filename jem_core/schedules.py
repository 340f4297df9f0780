"""Schedules for training settings: piecewise-constant values by epoch, and learning-rate shapes.

A *piecewise schedule* is written ``"EPOCH:VALUE,EPOCH:VALUE,..."`` (for example ``"0:1,0.5:0.1,4:0.05"``):
the value at training progress ``t`` (in epochs, fractional within an epoch, ``t >= 0``) is the value of
the last key ``<= t``; before the first key the first value holds. This replaces the hand-chained stages
of earlier training (``--init-from`` runs, each with a fresh replay buffer and optimizer) by one run with
one buffer and one optimizer state.

The learning-rate factor (multiplying the peak rate) is one of

- ``"step"``: ``decay_rate ** (number of decay epochs <= t)`` (the classic multi-step decay);
- ``"cosine"``: ``floor + (1 - floor) * (1 + cos(pi * t / T)) / 2`` with ``T`` the run's epochs
  (Loshchilov & Hutter 2017, SGDR, eq. 5, without restarts);
- ``"constant"``: 1;

each times a linear warm-up ``(i + 1) / warmup_iters`` over the first ``warmup_iters`` iterations
(Goyal et al. 2017, section 2.2).

What does not live here: applying them during training (:mod:`jem_core.training`), named recipes
(:mod:`jem_core.recipes`).
"""

from __future__ import annotations

import math

from .errors import BadInput

__all__ = ["parse_schedule", "schedule_value", "lr_factor", "LR_SCHEDULES"]

#: The learning-rate shapes :func:`lr_factor` knows.
LR_SCHEDULES = ("step", "cosine", "constant")


def parse_schedule(text: str) -> list[tuple[float, float]]:
    """Parse ``"EPOCH:VALUE,..."`` into sorted ``[(epoch, value), ...]``.

    Args:
        text: comma-separated ``EPOCH:VALUE`` pairs; epochs are floats ``>= 0`` (fractions of an epoch
            allowed), values floats ``>= 0`` and finite; an empty string means "no schedule".

    Returns:
        the pairs sorted by epoch (an empty list for an empty string).

    Raises:
        BadInput: a malformed pair, a negative or non-finite number, or a repeated epoch.
    """
    pairs: list[tuple[float, float]] = []
    for part in (p.strip() for p in text.split(",")):
        if not part:
            continue
        if part.count(":") != 1:
            raise BadInput(f"schedule entry {part!r} must be EPOCH:VALUE (e.g. '0:1,2:0.1')")
        a, b = part.split(":")
        try:
            e, v = float(a), float(b)
        except ValueError:
            raise BadInput(f"schedule entry {part!r}: EPOCH and VALUE must be numbers") from None
        if not (math.isfinite(e) and e >= 0 and math.isfinite(v) and v >= 0):
            raise BadInput(f"schedule entry {part!r}: EPOCH and VALUE must be finite numbers >= 0")
        pairs.append((e, v))
    pairs.sort()
    if len({e for e, _ in pairs}) != len(pairs):
        raise BadInput(f"schedule {text!r} repeats an epoch")
    return pairs


def schedule_value(pairs: list[tuple[float, float]], progress: float, default: float) -> float:
    """The scheduled value at ``progress`` epochs (float ``>= 0``); ``default`` when ``pairs`` is empty.

    The value of the last key ``<= progress``, or the first value before the first key.
    """
    if not pairs:
        return default
    value = pairs[0][1]
    for e, v in pairs:
        if e <= progress:
            value = v
        else:
            break
    return value


def lr_factor(kind: str, progress: float, epochs: int, iteration: int, warmup_iters: int,
              decay_epochs: list[int], decay_rate: float, floor: float) -> float:
    """The learning-rate multiplier in ``(0, 1]`` at ``progress`` epochs and global ``iteration``.

    Args:
        kind: one of :data:`LR_SCHEDULES` (formulas in the module docstring).
        progress: epochs done, fractional (``>= 0``).
        epochs: the run's length in epochs (the cosine's period ``T``).
        iteration: optimiser steps taken so far (the warm-up counts them).
        warmup_iters: linear warm-up length in iterations (0 = none).
        decay_epochs, decay_rate: the ``"step"`` schedule's epochs and factor.
        floor: the ``"cosine"`` schedule's final factor in ``[0, 1]``.

    Raises:
        ValueError: an unknown ``kind``.
    """
    if kind == "step":
        f = decay_rate ** sum(progress >= e for e in decay_epochs)
    elif kind == "cosine":
        t = min(1.0, max(0.0, progress / max(1, epochs)))
        f = floor + (1.0 - floor) * 0.5 * (1.0 + math.cos(math.pi * t))
    elif kind == "constant":
        f = 1.0
    else:
        raise ValueError(f"learning-rate schedule must be one of {', '.join(LR_SCHEDULES)}; got {kind!r}")
    if warmup_iters > 0 and iteration < warmup_iters:
        f *= (iteration + 1) / warmup_iters
    return f
