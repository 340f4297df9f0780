"""Shared fixtures: paths, the offline data root, small trained models."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = (ROOT.parent / "shared" / "data").resolve()
CHECKPOINTS = ROOT / "checkpoints"


def pytest_configure(config):
    # One torch thread: the test models are tiny, and on shared 2-core machines a 2-thread OpenMP pool
    # was measured 10-100x slower whenever another process was busy.
    torch.set_num_threads(1)


@pytest.fixture(scope="session")
def data_root() -> Path:
    """The offline torchvision-style data root (../shared/data); tests needing it skip without it."""
    if not (SHARED_DATA / "MNIST" / "raw").is_dir():
        pytest.skip(f"offline data root {SHARED_DATA} not present")
    return SHARED_DATA


@pytest.fixture(scope="session")
def tiny_jem(tmp_path_factory) -> Path:
    """A JEM trained for a few iterations on digits (seconds), saved as a checkpoint."""
    from jem_core.training import TrainConfig, Trainer

    out = tmp_path_factory.mktemp("tiny") / "tiny_jem.pt"
    cfg = TrainConfig(dataset="digits", epochs=1, max_iters_per_epoch=6, sgld_steps=2, buffer_size=200,
                      keep_buffer=50, n_reference=100, warmup_iters=2)
    Trainer(cfg, out=out).fit()
    return out
