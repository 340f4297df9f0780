"""Drawing samples from a loaded checkpoint: unconditional or class-conditional SGLD.

Chains start from the checkpoint's stored replay buffer (short-run from PCD states, as JEM
samples at test time) or from ``U[-1, 1]`` noise, and run SGLD on ``E(x)`` or ``E(x, y)``
(Grathwohl et al. 2019, sec. 4 and appendix).
"""

from __future__ import annotations

from typing import Any

import torch

from .checkpoint import LoadedCheckpoint
from .sampling import SGLDReport, SGLDSampler, frozen_parameters, init_noise

__all__ = ["draw_samples", "chain_starts", "DEFAULT_STEPS"]

DEFAULT_STEPS = {"buffer": 100, "noise": 500}


def chain_starts(ck: LoadedCheckpoint, n: int, init: str = "auto", generator: torch.Generator | None = None,
                 device: torch.device | str = "cpu") -> tuple[torch.Tensor, str]:
    """``n`` chain starts ``[n, C, H, W]`` in ``[-1, 1]`` and the init actually used.

    Args:
        init: ``"buffer"`` (random rows of the stored replay buffer), ``"noise"`` or ``"auto"``
            (buffer when the checkpoint has one).

    Raises:
        ValueError: ``init="buffer"`` but the checkpoint stores no buffer, or unknown init.
    """
    m = ck.metadata
    shape = (int(m["in_channels"]), int(m["image_size"]), int(m["image_size"]))
    if init == "auto":
        init = "buffer" if ck.replay_buffer is not None and len(ck.replay_buffer) else "noise"
    if init == "buffer":
        if ck.replay_buffer is None or not len(ck.replay_buffer):
            raise ValueError("this checkpoint stores no replay buffer; use init='noise'")
        idx = torch.randint(0, len(ck.replay_buffer), (n,), generator=generator)
        return ck.replay_buffer[idx].clone().to(device), "buffer"
    if init == "noise":
        return init_noise(n, shape, generator).to(device), "noise"
    raise ValueError(f"unknown init {init!r}; use 'auto', 'buffer' or 'noise'")


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
