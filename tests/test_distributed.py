"""Multi-process training with torch.distributed (DDP, gloo on CPU).

Claims: two ranks launched by torchrun end with identical weights and one checkpoint; a divergence
or a stop request on one rank is acted on by every rank (no rank is left waiting in a collective);
resume gives each rank its own replay-buffer chains back, also under another world size.
"""

from __future__ import annotations

import dataclasses
import datetime
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

from jem_core.distributed import reshard_buffer
from jem_core.training import TrainConfig, Trainer, resume_path

ROOT = Path(__file__).resolve().parents[1]

needs_gloo = pytest.mark.skipif(not (dist.is_available() and dist.is_gloo_available()),
                                reason="torch.distributed with the gloo backend is not available")


@needs_gloo
@pytest.mark.slow
def test_torchrun_two_processes_train_identical_weights_and_write_one_checkpoint(tmp_path):
    out = tmp_path / "x.pt"
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    # The CLI's main under torchrun, each rank saving its final weights (a test-only wrapper of the entry point).
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--standalone",
           str(ROOT / "tests" / "ddp_dump_weights.py"), str(tmp_path / "ranks"), "train", "--dataset", "digits",
           "--epochs", "1", "--max-iters-per-epoch", "3", "--sgld-steps", "2", "--buffer-size", "200", "--out", str(out),
           "--quiet"]
    r = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr[-3000:]
    w0 = torch.load(tmp_path / "ranks" / "rank0.pt", weights_only=True)
    w1 = torch.load(tmp_path / "ranks" / "rank1.pt", weights_only=True)
    assert w0.keys() == w1.keys() and all(torch.equal(w0[k], w1[k]) for k in w0)
    # Only rank 0 writes: one checkpoint and its resume state, no per-rank files, one summary line.
    assert sorted(p.name for p in tmp_path.iterdir() if p.is_file()) == ["x.pt", "x.pt.resume.pt"]
    assert sum('"checkpoint"' in line for line in r.stdout.splitlines()) == 1
    saved = torch.load(out, weights_only=True)
    assert all(torch.equal(saved["state_dict"][k], w0["f." + k]) for k in saved["state_dict"])
    assert saved["metadata"]["distributed"]["world_size"] == 2
    state = torch.load(resume_path(out), weights_only=True)["trainer"]
    assert state["world_size"] == 2 and state["buffer"]["buffer"].shape[0] == 200  # both ranks' 100 chains
    assert state["iteration"] == 3 and json.loads(r.stdout.splitlines()[-1])["epochs"] == 1


# -- in-process ranks (torch.multiprocessing), to steer one rank -------------------------------------------
class _OneRankDiverges(Trainer):
    """Rank 1 alone reports a divergence at iteration 2 (once)."""

    def _diverged(self, s):
        if self.rank == 1 and self.iteration == 2 and not self.events:
            return "injected on rank 1"
        return super()._diverged(s)


def _worker(rank: int, world: int, tmp: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{tmp}/store", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=60))  # a collective mismatch fails, never hangs
    try:
        out = Path(tmp) / "ck.pt"
        cfg = TrainConfig(dataset="digits", epochs=1, max_iters_per_epoch=4, sgld_steps=2, buffer_size=200,
                          keep_buffer=20, n_reference=50, warmup_iters=2)
        t = _OneRankDiverges(cfg, out=out)
        t.fit()
        buffer_at_save = t.buffer.buffer.clone()
        # Resume in a fresh trainer; rank 0 alone asks to stop after the first iteration of epoch 2.
        t2 = Trainer(dataclasses.replace(cfg, epochs=3), out=out,
                     on_iteration=lambda s: t2.request_stop() if rank == 0 else None)
        t2.resume(out)
        buffer_after_resume = t2.buffer.buffer.clone()
        t2.fit()
        torch.save({"events": t.events, "iteration": t.iteration, "buffer_at_save": buffer_at_save,
                    "buffer_after_resume": buffer_after_resume, "iteration2": t2.iteration, "epoch2": t2.epoch,
                    "weights": t2.model.state_dict()}, Path(tmp) / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


@needs_gloo
@pytest.mark.slow
def test_ranks_agree_on_divergence_stop_and_resume(tmp_path):
    torch.multiprocessing.spawn(_worker, args=(2, str(tmp_path)), nprocs=2, join=True)
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in (0, 1))
    # The divergence seen by rank 1 alone rolled back both ranks (one event each, 3 steps of 4 batches).
    assert [e["reason"] for e in r1["events"]] == ["injected on rank 1"]
    assert [e["reason"] for e in r0["events"]] == ["divergence on another rank"]
    assert r0["iteration"] == r1["iteration"] == 3
    # Resume hands each rank its own chains back; the ranks' chains differ.
    for r in (r0, r1):
        assert torch.equal(r["buffer_after_resume"], r["buffer_at_save"])
    assert not torch.equal(r0["buffer_at_save"], r1["buffer_at_save"])
    # Rank 0's stop request (made after iteration 4) stopped both after the same iteration, mid-epoch: the ranks
    # agree on it with the next iteration's divergence check, so under DDP it acts one iteration later.
    assert r0["iteration2"] == r1["iteration2"] == 5 and r0["epoch2"] == r1["epoch2"] == 1
    assert all(torch.equal(r0["weights"][k], r1["weights"][k]) for k in r0["weights"])


def test_reshard_buffer_keeps_chains_and_class_blocks():
    # Two ranks saved 2 x [3 classes x 2 rows]; row value = 100 * rank + 10 * class + j.
    saved = torch.tensor([100 * r + 10 * k + j for r in range(2) for k in range(3) for j in range(2)],
                         dtype=torch.float32).view(-1, 1, 1, 1)
    same = [reshard_buffer(saved, 2, 2, r, 6, 3).flatten().tolist() for r in range(2)]
    assert same == [[0, 1, 10, 11, 20, 21], [100, 101, 110, 111, 120, 121]]  # exactly each rank's own chains
    one = reshard_buffer(saved, 2, 1, 0, 12, 3).flatten().tolist()  # one process: every chain, class blocks kept
    assert one == [0, 1, 100, 101, 10, 11, 110, 111, 20, 21, 120, 121]
    three = [reshard_buffer(saved, 2, 3, r, 3, 3).flatten() for r in range(3)]  # 1 row per class each
    assert all((t // 10 % 10).tolist() == [0, 1, 2] for t in three)  # class k stays in block k
    flat = reshard_buffer(saved, 2, 4, 3, 5, None)  # unconditional, short share topped up with noise
    assert flat.shape == (5, 1, 1, 1) and flat[:3].flatten().tolist() == [111, 120, 121]
    assert flat[3:].abs().max() <= 1


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message for a machine without CUDA")
def test_torchrun_with_cuda_requested_but_absent_is_an_argparse_error(monkeypatch, capsys):
    from jem_core.cli import main

    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(SystemExit) as e:
        main(["train", "--dataset", "digits", "--device", "cuda", "--out", "unused.pt"])
    assert e.value.code == 2 and "CUDA is not available" in capsys.readouterr().err
    assert not dist.is_initialized()
