"""The benchmark suite (bench/speed.py) runs end to end in its tiny mode and writes every target figure; the
speed options it measures keep their promises."""

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from jem_core.energy import JEM
from jem_core.models import ConvNet
from jem_core.sampling import SGLDSampler, frozen_parameters

from bench.speed import floor_step, interleaved, median_ratio, official_style_sample

ROOT = Path(__file__).resolve().parents[1]
KEYS = ("sgld_step_ratio", "official_style_ratio", "train_iter_ratio", "score_latency_ms", "chain_fps",
        "time_to_accuracy_s")


def _numbers(v):
    return list(v.values()) if isinstance(v, dict) else [v]


@pytest.mark.slow
def test_quick_bench_writes_every_key_with_positive_finite_ratios(tmp_path):
    out = tmp_path / "bench.json"
    r = subprocess.run([sys.executable, "bench/speed.py", "--quick", "--threads", "1", "--out", str(out),
                        "--checkpoint", str(tmp_path / "absent.pt")],
                       cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr
    res = json.loads(out.read_text())
    assert set(KEYS) <= set(res)
    ratios = [x for k in ("sgld_step_ratio", "official_style_ratio", "train_iter_ratio") for x in _numbers(res[k])]
    ratios += [x for k, v in res["options"].items() if not k.startswith("time_to_accuracy") for x in _numbers(v)]
    ratios += [res["score_latency_ms"], res["chain_fps"]]
    assert ratios and all(isinstance(x, float) and math.isfinite(x) and x > 0 for x in ratios), ratios
    assert res["machine"]["threads"] == 1 and res["machine"]["torch"] == torch.__version__
    assert "freshly initialised" in res["model_source"], "a missing checkpoint is said so in the JSON"
    assert json.loads(r.stdout.splitlines()[-1])["out"] == str(out)


def test_interleaved_rounds_and_median_ratio():
    calls = []
    t = interleaved({"a": lambda: calls.append("a"), "b": lambda: calls.append("b")}, repeats=3, warmup=1)
    assert len(t["a"]) == len(t["b"]) == 3
    assert calls == ["a", "b", "a", "b", "b", "a", "a", "b"], "warm-up, then the order rotates every round"
    assert median_ratio({"x": [2.0, 4.0, 9.0], "y": [1.0, 2.0, 3.0]}, "x", "y") == 2.0


def test_floor_and_official_style_match_our_sampler_update():
    """The comparison is fair: all three compute the same gradient and (without noise) the same update."""
    model = JEM(ConvNet(1, 10, image_size=8)).eval()
    x = torch.rand(3, 1, 8, 8) * 2 - 1
    with frozen_parameters(model):
        g = floor_step(model, x)
        _, ours, _ = SGLDSampler(model).energy_and_grad(x)
    assert torch.allclose(g, ours)
    x1 = x[:1].clone()
    buf = x1.clone()  # one row: the official loop draws row 0
    out = official_style_sample(model, buf, 1, 1, noise_std=0.0, reinit_freq=0.0)
    expected = SGLDSampler(model.eval(), noise_std=0.0, clamp=False).step(x1)
    assert torch.allclose(out, expected, atol=1e-6) and torch.allclose(buf, expected, atol=1e-6)
    assert all(p.grad is None for p in model.parameters())


# -- the speed options keep their promises ------------------------------------------------------------
def test_bf16_sampler_gradient_is_close_to_float32_and_energies_stay_float32():
    torch.manual_seed(0)
    model = JEM(ConvNet(1, 10, image_size=8)).eval()
    x = torch.rand(16, 1, 8, 8) * 2 - 1
    with frozen_parameters(model):
        e32, g32, _ = SGLDSampler(model).energy_and_grad(x)
        s16 = SGLDSampler(model, bf16=True)
        e16, g16, logits = s16.energy_and_grad(x)
    assert e16.dtype == logits.dtype == g16.dtype == torch.float32
    assert torch.nn.functional.cosine_similarity(g16.flatten(), g32.flatten(), dim=0) > 0.99
    assert torch.allclose(e16, e32, atol=0.05 * e32.abs().max().item())
    assert "bf16" in s16.describe() and "bf16" not in SGLDSampler(model).describe()


def test_class_gaussians_recover_each_class_mean_and_covariance():
    from jem_core.sampling import ClassGaussians

    g = torch.Generator().manual_seed(0)
    a = torch.randn(3000, 16, generator=g) * 0.1 + 0.2
    b = torch.randn(3000, 16, generator=g) @ (torch.randn(16, 16, generator=g) * 0.05).T - 0.3
    x, y = torch.cat([a, b]).view(-1, 1, 4, 4), torch.cat([torch.zeros(3000), torch.ones(3000)]).long()
    cg = ClassGaussians.fit(x, y, 2)
    s = cg.sample(20000, torch.ones(20000, dtype=torch.long), g).flatten(1)
    assert (s.mean(0) - b.mean(0)).abs().max() < 0.01
    assert (torch.cov(s.T) - torch.cov(b.T)).abs().max() < 0.005
    low = ClassGaussians.fit(x, y, 2, rank=4).sample(20000, torch.zeros(20000, dtype=torch.long), g).flatten(1)
    assert abs(torch.cov(low.T).trace() / torch.cov(a.T).trace() - 1) < 0.05, "rank 4 keeps the total variance"


def test_replay_buffer_starts_and_restarts_chains_from_class_gaussians():
    from jem_core.sampling import ClassGaussians, ReplayBuffer

    x = torch.cat([torch.full((50, 1, 2, 2), -0.5), torch.full((50, 1, 2, 2), 0.5)])
    x = x + 0.01 * torch.randn(x.shape, generator=torch.Generator().manual_seed(1))
    y = torch.cat([torch.zeros(50), torch.ones(50)]).long()
    buf = ReplayBuffer(100, (1, 2, 2), reinit_freq=1.0, n_classes=2, generator=torch.Generator().manual_seed(0),
                       init=ClassGaussians.fit(x, y, 2))
    assert (buf.buffer[:50] - -0.5).abs().max() < 0.1 and (buf.buffer[50:] - 0.5).abs().max() < 0.1
    buf.buffer.fill_(0.0)
    starts, idx = buf.sample(8, y=torch.ones(8, dtype=torch.long))
    assert (idx >= 50).all() and (starts - 0.5).abs().max() < 0.1, "restarts come from the class's Gaussian"


def test_trainer_runs_with_every_speed_option():
    from jem_core.data import load_dataset
    from jem_core.training import TrainConfig, Trainer

    tr, te = load_dataset("digits", "train"), load_dataset("digits", "test")
    cfg = TrainConfig(dataset="digits", epochs=1, max_iters_per_epoch=3, sgld_steps=2, buffer_size=200,
                      n_reference=50, sgld_bf16=True, channels_last=True, sgld_init="gaussian", sgld_max_update=0.05)
    t = Trainer(cfg, train_set=tr, test_set=te)
    hist = t.fit()
    assert hist[-1].iterations == 3 and math.isfinite(hist[-1].loss)
    assert "bf16" in t.metadata()["sgld"]
    with pytest.raises(ValueError, match="SGLD init"):
        TrainConfig(sgld_init="normal").validate()


def test_tune_malloc_applies_its_thresholds_and_leaves_a_user_choice_alone():
    code = ("from jem_core.perf import tune_malloc, SERVER_MMAP_THRESHOLD as S\n"
            "print(tune_malloc(), tune_malloc(arena_max=2, mmap_threshold=S))")
    run = lambda env: subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True,
                                     env=env, timeout=120).stdout.split()
    import os

    base = {k: v for k, v in os.environ.items() if not k.startswith(("MALLOC_", "GLIBC_TUNABLES"))}
    if sys.platform.startswith("linux"):
        assert run(base) == ["True", "True"]
    assert run({**base, "MALLOC_TRIM_THRESHOLD_": "131072"}) == ["False", "False"]
    from jem_core.perf import MMAP_THRESHOLD, tune_malloc

    with pytest.raises(ValueError, match="arena_max must be >= 1"):
        tune_malloc(arena_max=0)
    with pytest.raises(ValueError, match="mmap_threshold must lie in"):
        tune_malloc(mmap_threshold=MMAP_THRESHOLD + 1)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mmap threshold")
def test_the_server_threshold_maps_large_blocks_on_their_own_and_keeps_small_ones_in_the_heap():
    """Under SERVER_MMAP_THRESHOLD an 8 MB tensor is mapped on its own (its pages leave the process on free), a
    2 MB one stays in the heap; under the default 32 MiB threshold both stay (VmRSS in a fresh process)."""
    code = ("import re, sys, torch\nfrom jem_core.perf import tune_malloc, SERVER_MMAP_THRESHOLD, MMAP_THRESHOLD\n"
            "rss = lambda: int(re.search(r'VmRSS:\\s+(\\d+)', open('/proc/self/status').read()).group(1)) / 1024\n"
            "tune_malloc(mmap_threshold=SERVER_MMAP_THRESHOLD if sys.argv[1] == 'server' else MMAP_THRESHOLD)\n"
            "out = []\nfor n in (2 * 2**18, 8 * 2**18):\n"
            "    x = [torch.ones(n) for _ in range(40)]\n    a = rss()\n    del x\n    out.append(a - rss())\n"
            "print(*out)")
    import os

    env = {k: v for k, v in os.environ.items() if not k.startswith(("MALLOC_", "GLIBC_TUNABLES"))}

    def freed(kind: str) -> list[float]:
        out = subprocess.run([sys.executable, "-c", code, kind], cwd=ROOT, capture_output=True, text=True, env=env,
                             timeout=120)
        return [float(v) for v in out.stdout.split()]

    small, large = freed("server")
    assert large > 0.5 * 320 and small < 0.2 * 80, (small, large)  # MB given back on free: 40 x 8 MB, 40 x 2 MB
    small, large = freed("default")
    assert large < 0.2 * 320 and small < 0.2 * 80, (small, large)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's malloc_trim")
def test_release_free_memory_gives_a_freed_peak_back_under_the_tuned_thresholds():
    """Under tune_malloc's 1 GiB trim threshold 200 MB of freed 4 MB tensors stay in the process; release_free_memory
    (malloc_trim) returns most of them (measured from VmRSS in a fresh process)."""
    code = ("import re, torch\nfrom jem_core.perf import tune_malloc, release_free_memory\n"
            "rss = lambda: int(re.search(r'VmRSS:\\s+(\\d+)', open('/proc/self/status').read()).group(1)) // 1024\n"
            "tune_malloc()\nx = [torch.ones(1000, 1000) for _ in range(50)]\ndel x\na = rss()\n"
            "ok = release_free_memory()\nprint(a, rss(), ok)")
    import os

    env = {k: v for k, v in os.environ.items() if not k.startswith(("MALLOC_", "GLIBC_TUNABLES"))}
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, env=env, timeout=120)
    before, after, ok = out.stdout.split()
    assert ok == "True" and int(before) - int(after) > 100, out.stdout  # MB


def test_traces_picture_bench_compares_the_same_pictures_and_writes_its_figures(tmp_path):
    out = tmp_path / "tp.json"
    r = subprocess.run([sys.executable, "bench/traces_picture.py", "--refreshes", "6", "--rounds", "1",
                        "--out", str(out)], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr  # it exits with an error when the blitted and full pictures differ
    res = json.loads(out.read_text())
    assert res["blit_over_full"] > 0 and set(res["ms_per_redraw"]) == {"blit", "full"}
    assert res["png_bytes_last"] > 1000


def test_traces_picture_histories_grow_and_stay_within_the_kept_points():
    from bench.traces_picture import histories

    seq = histories(refreshes=50, points=40, chains=4, classes=3, per_refresh=3)
    assert len(seq) == 50
    for steps, energies, preds in seq:
        assert steps == sorted(set(steps)) and steps[0] == 0 and len(steps) <= 40
        assert energies.shape == preds.shape == (len(steps), 4) and int(preds.max()) < 3
    assert seq[-1][0][-1] == 150
