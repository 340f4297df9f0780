"""Test helper (not a test): ``python -m jem_core train`` under torchrun, every rank writing its final weights.

Usage (from tests/test_distributed.py)::

    python -m torch.distributed.run --nproc_per_node=2 --standalone tests/ddp_dump_weights.py DIR train ARGS...

Runs the CLI's ``main(ARGS)`` unchanged, with :meth:`jem_core.training.Trainer.fit` wrapped so that when it
returns each rank saves its model's ``state_dict`` (CPU tensors) to ``DIR/rank{r}.pt``, for the test to check
that all ranks ended with identical weights. Production code knows nothing of this.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
import torch.distributed as dist

from jem_core import training
from jem_core.cli import main


def _dump_after_fit(out_dir: Path) -> None:
    fit = training.Trainer.fit

    def fit_and_dump(self):
        history = fit(self)
        out_dir.mkdir(parents=True, exist_ok=True)
        rank = dist.get_rank() if dist.is_initialized() else 0
        torch.save({k: v.detach().cpu() for k, v in self.model.state_dict().items()}, out_dir / f"rank{rank}.pt")
        return history

    training.Trainer.fit = fit_and_dump


if __name__ == "__main__":
    _dump_after_fit(Path(sys.argv[1]))
    sys.exit(main(sys.argv[2:]))
