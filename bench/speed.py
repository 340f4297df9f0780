"""Speed benchmarks: SGLD sampling and JEM training against the cost of the network itself.

``python bench/speed.py --out bench.json`` (a few minutes; not part of the tests, which run the
tiny ``--quick`` mode only to check the output's keys). Tooling beside the library: nothing in ``jem_core``
or the app imports this file; the library's one speed setting it measures lives in :mod:`jem_core.perf`.

The floor of one SGLD step is one forward pass plus one ``torch.autograd.grad`` of the summed
energy with respect to the input, with the parameters frozen: the least any sampler can do.
Everything our sampler and trainer do beyond that is overhead. Every speed figure is a *ratio*
measured inside one run: the contenders run in interleaved rounds after a warm-up, the order
rotating from round to round; each round gives one ratio per contender (its time over the floor's
time in the same round) and the figure is the median over rounds, so machine load that drifts
over seconds cancels. Latency and frames per second are medians of absolute times, so they depend
on the machine: the JSON records the thread count, torch version and CPU.

Figures (with their targets):

- ``sgld_step_ratio``: our SGLD (replay-buffer draw, ``SGLDSampler.run`` with frozen parameters,
  write-back), per step, over the floor; MNIST ConvNet at batch 64 and WRN-28-2 at batch 32 on
  3x32x32. Target <= 1.05.
- ``official_style_ratio``: the same for the official JEM loop's style (``sample_q`` of
  ``train_wrn_ebm.py``: CPU buffer, ``.data`` updates, train/eval toggles, ``retain_graph=True``).
- ``train_iter_ratio``: one iteration of :meth:`Trainer.fit` (default JEM settings, MNIST-shaped
  data) over K floor steps plus one forward/backward of the data and sampled batches. Target <= 1.10.
- ``score_latency_ms``: one 28x28 PNG end to end (decode, preprocess, forward, energy, percentile).
  Target <= 20 ms.
- ``chain_fps``: grid refreshes per second of the Langevin page's driver, 64 chains, every 5 steps
  (``ChainState.advance`` + ``make_grid_image``). Target >= 5.
- ``time_to_accuracy_s``: wall time of ``train`` on digits with the default JEM settings until the
  test accuracy reaches 95% (null if it does not within the configured epochs).
- ``options``: the speed-ups tried, as ratios over the same float32 floor in the same rounds,
  ``sgld_step_ratio_{bf16,channels_last[,compile]}`` (bf16 autocast of the energy gradient, the network's
  weights in ``channels_last`` layout, ``torch.compile`` of the energy-gradient function with
  ``--compile``), ``train_iter_ratio_{bf16,channels_last,bf16_channels_last}`` (the matching
  :class:`~jem_core.training.TrainConfig` options), and, with ``--accuracy-options``, as
  ``time_to_accuracy_s_*`` for bf16 + channels_last and for JEM++-style settings (5 or 10 clipped steps from class
  Gaussians, :class:`~jem_core.sampling.ClassGaussians`).

``floor_step_ratio_tuned_malloc`` times :func:`jem_core.perf.tune_malloc` (glibc's allocator
thresholds) on the ConvNet's floor step in fresh processes, alternating with and without it: the
allocator's behaviour depends on what the process freed before, so it cannot be measured in-process.

On a machine shared with other work, ``--threads 1 --clock cpu`` measures this process's CPU time,
which the other processes do not inflate.
"""

from __future__ import annotations

import copy
import io
import math
import os
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from jem_core.utils import rounded  # noqa: E402

__all__ = ["run_benchmarks", "interleaved", "median_ratio", "floor_step", "official_style_sample", "TARGETS"]

#: The targets: (comparison, value).
TARGETS = {"sgld_step_ratio": ("<=", 1.05), "train_iter_ratio": ("<=", 1.10), "score_latency_ms": ("<=", 20.0),
           "chain_fps": (">=", 5.0), "time_to_accuracy_s": ("report", None)}

DEFAULT_CHECKPOINT = "checkpoints/mnist_jem.pt"

#: ``wall``: elapsed time (what a user waits for). ``cpu``: this process's CPU time, which other
#: processes on a shared machine do not inflate; it equals wall time only with one torch thread
#: (with more, it adds up every thread, spin-waits included), so use it with ``--threads 1``.
CLOCKS: dict[str, Callable[[], float]] = {"wall": time.perf_counter, "cpu": time.process_time}


# -- measuring ---------------------------------------------------------------------------------------
def interleaved(fns: dict[str, Callable[[], Any]], repeats: int, warmup: int = 1,
                clock: Callable[[], float] = time.perf_counter) -> dict[str, list[float]]:
    """Time each function ``repeats`` times in interleaved rounds; returns seconds per call, per name.

    Every function runs ``warmup`` times first (allocator, oneDNN kernels, caches). In round ``r``
    the order is rotated by ``r`` so that no contender always runs right after the same one.
    ``clock`` is wall time by default; see :data:`CLOCKS`.
    """
    names = list(fns)
    for _ in range(warmup):
        for n in names:
            fns[n]()
    times: dict[str, list[float]] = {n: [] for n in names}
    for r in range(repeats):
        k = r % len(names)
        for n in names[k:] + names[:k]:
            t0 = clock()
            fns[n]()
            times[n].append(clock() - t0)
    return times


def median_ratio(times: dict[str, list[float]], num: str, den: str) -> float:
    """Median over rounds of ``times[num][r] / times[den][r]``."""
    return statistics.median(a / b for a, b in zip(times[num], times[den]))


def floor_step(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The floor of one SGLD step: a forward pass and ``dE/dx`` of the summed energy.

    The caller freezes the parameters (``requires_grad=False``), so nothing is stored for them.
    """
    xg = x.detach().requires_grad_(True)
    e = -torch.logsumexp(model(xg), 1)
    return torch.autograd.grad(e.sum(), xg)[0]


def official_style_sample(model: nn.Module, buffer: torch.Tensor, n: int, n_steps: int, step_size: float = 1.0,
                          noise_std: float = 0.01, reinit_freq: float = 0.05,
                          device: torch.device | str = "cpu") -> torch.Tensor:
    """The official JEM sampling loop (``sample_p_0`` + ``sample_q`` of ``train_wrn_ebm.py``), for comparison.

    Its style, kept on purpose: the replay buffer ``[M, C, H, W]`` on the CPU, a noise batch drawn
    for every row and mixed in by arithmetic, the model toggled to eval and back to train, the
    parameters left trainable, ``retain_graph=True`` and updates through ``.data``; no clamping.
    """
    model.eval()
    inds = torch.randint(0, len(buffer), (n,))
    buffer_samples = buffer[inds]
    random_samples = torch.rand_like(buffer_samples) * 2 - 1
    choose_random = (torch.rand(n) < reinit_freq).float()[:, None, None, None]
    samples = choose_random * random_samples + (1 - choose_random) * buffer_samples
    x_k = samples.to(device).requires_grad_(True)
    for _ in range(n_steps):
        f_prime = torch.autograd.grad(model(x_k).logsumexp(1).sum(), [x_k], retain_graph=True)[0]
        x_k.data += step_size * f_prime + noise_std * torch.randn_like(x_k)
    model.train()
    final = x_k.detach()
    buffer[inds] = final.cpu()
    return final


# -- the figures -------------------------------------------------------------------------------------
def bench_sgld(model: nn.Module, shape: tuple[int, int, int], batch: int, n_steps: int, repeats: int,
               bf16: bool = True, channels_last: bool = True, compile_fn: bool = False,
               buffer_size: int = 10000, seed: int = 0, clock: Callable[[], float] = time.perf_counter
               ) -> dict[str, Any]:
    """SGLD per-step ratios over the floor for one model and batch size.

    Contenders (all from the same kind of replay buffer, ``n_steps`` steps per call): ``floor``,
    ``ours`` (:class:`~jem_core.sampling.ReplayBuffer` draw, :meth:`SGLDSampler.run` inside
    :func:`frozen_parameters`, write-back; default settings), ``official`` (:func:`official_style_sample`)
    and the options: ``bf16`` (ours with ``bf16=True``), ``channels_last`` (ours on a
    ``channels_last`` copy of the model) and ``compile`` (``torch.compile`` of the energy-gradient
    function, then our update; compile time reported separately).
    """
    from jem_core.sampling import ReplayBuffer, SGLDSampler, frozen_parameters

    model = model.eval()
    g = torch.Generator().manual_seed(seed)
    x_floor = torch.rand((batch, *shape), generator=g) * 2 - 1
    ours_buf = ReplayBuffer(buffer_size, shape, generator=torch.Generator().manual_seed(seed + 1))
    official_buf = ours_buf.buffer.clone()

    def ours(s: SGLDSampler) -> Callable[[], None]:
        """The trainer's sampling: buffer draw, ``n_steps`` steps with frozen parameters, write-back."""
        def run() -> None:
            xq, idx = ours_buf.sample(batch)
            with frozen_parameters(s.model):
                xq = s.run(xq, n_steps)
            ours_buf.update(idx, xq)
        return run

    def sampler(m: nn.Module, **kw: Any) -> SGLDSampler:
        return SGLDSampler(m, generator=torch.Generator().manual_seed(seed + 2), **kw)

    def floor() -> None:
        with frozen_parameters(model):
            for _ in range(n_steps):
                floor_step(model, x_floor)

    fns: dict[str, Callable[[], Any]] = {
        "floor": floor,
        "ours": ours(sampler(model)),
        "official": lambda: official_style_sample(model, official_buf, batch, n_steps),
    }
    if bf16:
        fns["bf16"] = ours(sampler(model, bf16=True))
    if channels_last:  # the weights' layout is what matters (a 1-channel input is both layouts at once)
        fns["channels_last"] = ours(sampler(copy.deepcopy(model).to(memory_format=torch.channels_last)))
    compile_s = None
    if compile_fn:
        compiled, compile_s = _compiled_energy_grad(model, x_floor)
        s_c = sampler(model)
        s_c.energy_and_grad = lambda x, y=None: compiled(x)  # type: ignore[method-assign]
        fns["compile"] = ours(s_c)
    try:
        times = interleaved(fns, repeats, clock=clock)
    finally:
        model.eval()  # the official loop leaves the model in train mode
    floor_ms = 1000 * statistics.median(times["floor"]) / n_steps
    out: dict[str, Any] = {
        "ours": median_ratio(times, "ours", "floor"),
        "official": median_ratio(times, "official", "floor"),
        "options": {k: median_ratio(times, k, "floor") for k in fns if k not in ("floor", "ours", "official")},
        "floor_ms_per_step": floor_ms,
        "ours_ms_per_step": 1000 * statistics.median(times["ours"]) / n_steps,
        "batch": batch, "shape": list(shape), "steps_per_call": n_steps, "rounds": repeats,
    }
    if compile_s is not None:
        out["compile_seconds"] = compile_s
    return out


def _compiled_energy_grad(model: nn.Module, x: torch.Tensor) -> tuple[Callable, float]:
    """``torch.compile`` of (energy, dE/dx, logits) at ``x``; returns the function and its compile time."""
    from jem_core.sampling import frozen_parameters

    def energy_grad(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        xg = x.detach().requires_grad_(True)
        logits = model(xg)
        e = -torch.logsumexp(logits, 1)
        (grad,) = torch.autograd.grad(e.sum(), xg)
        return e.detach(), grad, logits.detach()

    fn = torch.compile(energy_grad)
    t0 = time.perf_counter()
    with frozen_parameters(model):
        fn(x)
    return fn, time.perf_counter() - t0


def bench_train_iter(shape: tuple[int, int, int], iters: int, sgld_steps: int, buffer_size: int,
                     seed: int = 0, clock: Callable[[], float] = time.perf_counter, **config: Any) -> dict[str, Any]:
    """One :meth:`Trainer.fit` iteration over the floor of the same work, interleaved.

    The trainer runs its real loop (``fit`` with default JEM settings unless ``config`` says
    otherwise) on random MNIST-shaped data; the ``on_iteration`` hook times each iteration and then
    runs one floor iteration on a copy of the model: ``sgld_steps`` floor steps on the sampled
    batch plus one forward/backward of the data and sampled batches concatenated.
    The first iteration (epoch set-up, first snapshot) is warm-up and not counted.
    """
    from jem_core.data import ImageDataset
    from jem_core.sampling import frozen_parameters
    from jem_core.training import TrainConfig, Trainer

    g = torch.Generator().manual_seed(seed)
    c, h, _ = shape
    n_train = max(2 * 64, 64 * (iters + 2))
    train = ImageDataset(torch.rand((n_train, *shape), generator=g) * 2 - 1,
                         torch.randint(0, 10, (n_train,), generator=g), 10, "random", "train")
    test = ImageDataset(train.x[:64], train.y[:64], 10, "random", "test")
    cfg = TrainConfig(dataset="mnist" if h == 28 else "digits", epochs=1, sgld_steps=sgld_steps,
                      buffer_size=buffer_size, max_iters_per_epoch=iters + 1, n_reference=64, seed=seed, **config)
    trainer = Trainer(cfg, train_set=train, test_set=test)
    ref = copy.deepcopy(trainer.model).to(memory_format=torch.contiguous_format)  # the float32 NCHW floor
    bs = cfg.batch_size
    x_data = train.x[:bs].clone()
    x_q = train.x[bs:2 * bs].clone()

    def floor_iter() -> None:
        with frozen_parameters(ref):
            for _ in range(sgld_steps):
                floor_step(ref, x_q)
        loss = ref(torch.cat([x_data, x_q])).logsumexp(1).mean()
        loss.backward()
        ref.zero_grad(set_to_none=True)

    it_times: list[float] = []
    floor_times: list[float] = []
    mark = [0.0]

    def on_iteration(_: dict) -> None:
        it_times.append(clock() - mark[0])
        t0 = clock()
        floor_iter()
        floor_times.append(clock() - t0)
        mark[0] = clock()

    trainer.on_iteration = on_iteration
    floor_iter()  # warm-up of the floor's own path
    mark[0] = clock()
    trainer.fit()
    times = {"iteration": it_times[1:], "floor": floor_times[1:]}
    if not times["iteration"]:
        raise RuntimeError("the trainer ran no counted iteration (diverged?)")
    return {
        "ratio": median_ratio(times, "iteration", "floor"),
        "iteration_ms": 1000 * statistics.median(times["iteration"]),
        "floor_ms": 1000 * statistics.median(times["floor"]),
        "sgld_steps": sgld_steps, "batch": bs, "shape": list(shape), "rounds": len(times["iteration"]),
        "divergence_events": len(trainer.events),
    }


def _digit_png(side: int = 28) -> bytes:
    """A '7' as a grayscale PNG (light stroke on dark, like MNIST), no dataset needed: the pixels within
    1.5 px of its two strokes are set (an input image for the scoring benchmark, not a chart)."""
    from PIL import Image

    s = side / 28
    yy, xx = np.mgrid[0:side, 0:side].astype(np.float64)

    def near(a: tuple[float, float], b: tuple[float, float]) -> np.ndarray:
        (ax, ay), (bx, by) = a, b
        t = np.clip(((xx - ax) * (bx - ax) + (yy - ay) * (by - ay)) / ((bx - ax) ** 2 + (by - ay) ** 2), 0, 1)
        return np.hypot(xx - (ax + t * (bx - ax)), yy - (ay + t * (by - ay))) <= 1.5 * s

    ink = near((6 * s, 6 * s), (21 * s, 6 * s)) | near((21 * s, 6 * s), (11 * s, 23 * s))
    buf = io.BytesIO()
    Image.fromarray((ink * 255).astype(np.uint8), mode="L").save(buf, format="PNG")
    return buf.getvalue()


def bench_score_latency(model: nn.Module, metadata: dict[str, Any], repeats: int,
                        clock: Callable[[], float] = time.perf_counter) -> dict[str, Any]:
    """Milliseconds to score one uploaded 28x28 PNG end to end: decode, preprocess, forward, energy, percentile."""
    from jem_core.images import prepare_upload
    from jem_core.scoring import score_batch

    png = _digit_png(int(metadata["image_size"]))
    channels, side = int(metadata["in_channels"]), int(metadata["image_size"])
    reference = metadata.get("reference") or {"logpx_quantiles": [float(v) for v in torch.linspace(-5, 15, 101)]}
    names = metadata.get("class_names")
    dev = next(model.parameters()).device

    def score() -> Any:
        prep = prepare_upload(png, "digit.png", channels, side)
        return score_batch(model, prep.tensor[None].to(dev), reference, names)[0]

    times = interleaved({"score": score}, repeats, warmup=3, clock=clock)["score"]
    r = score()
    return {"median_ms": 1000 * statistics.median(times), "p90_ms": 1000 * _quantile(times, 0.9),
            "repeats": repeats, "percentile_computed": r.percentile is not None,
            "reference": "checkpoint" if metadata.get("reference") else "stand-in quantiles (no checkpoint reference)"}


def bench_chain_fps(model: nn.Module, shape: tuple[int, int, int], n_chains: int, every: int, refreshes: int,
                    start: torch.Tensor | None = None, seed: int = 0, clock: Callable[[], float] = time.perf_counter,
                    bf16: bool = False, channels_last: bool = False) -> dict[str, Any]:
    """Grid refreshes per second of the Langevin page's driver: ``ChainState.advance(sampler, k, every=k)``
    then :func:`~jem_core.images.make_grid_image` (8 per row, 3x upscaling, as the page shows 28x28).

    ``bf16`` and ``channels_last`` time the options: the sampler's bf16 autocast, and a copy of the
    model in ``channels_last`` layout (what the app would load once).
    """
    from jem_core.images import make_grid_image
    from jem_core.sampling import ChainState, SGLDSampler, init_noise

    g = torch.Generator().manual_seed(seed)
    x0 = start[:n_chains].clone() if start is not None and len(start) >= n_chains else init_noise(n_chains, shape, g)
    chain = ChainState(x0)
    nrow = math.ceil(math.sqrt(n_chains))
    scale = max(1, round(84 / shape[-1]))

    if channels_last:
        model = copy.deepcopy(model).to(memory_format=torch.channels_last)

    def refresh() -> Any:
        chain.advance(SGLDSampler(model, generator=g, bf16=bf16), every, every=every)
        return make_grid_image(chain.x, nrow=nrow, scale=scale)

    times = interleaved({"refresh": refresh}, refreshes, warmup=1, clock=clock)["refresh"]
    return {"fps": 1.0 / statistics.median(times), "refresh_ms": 1000 * statistics.median(times),
            "chains": n_chains, "steps_per_refresh": every, "refreshes": refreshes,
            "start": "replay buffer" if start is not None and len(start) >= n_chains else "uniform noise"}


def bench_time_to_accuracy(target: float = 0.95, max_epochs: int | None = None,
                           max_iters_per_epoch: int | None = None, clock: Callable[[], float] = time.perf_counter,
                           **config: Any) -> dict[str, Any]:
    """Wall time of ``train`` on digits (default JEM settings unless ``config`` overrides) until the
    test accuracy reaches ``target``; trains at most the default number of epochs (or ``max_epochs``)."""
    from jem_core.training import TrainConfig, Trainer, TrainingDiverged

    t0 = clock()
    cfg = TrainConfig(dataset="digits", max_iters_per_epoch=max_iters_per_epoch, **config)
    if max_epochs is not None:
        cfg.epochs = max_epochs
    trainer = Trainer(cfg)
    reached: list[float] = []
    accs: list[float] = []

    def on_epoch(m: Any) -> None:
        accs.append(m.test_accuracy)
        if m.test_accuracy >= target:
            reached.append(clock() - t0)
            trainer.request_stop()

    trainer.on_epoch = on_epoch
    diverged = None
    try:
        trainer.fit()
    except TrainingDiverged as e:  # a result too: these settings are not stable
        diverged = str(e).split(";")[0]
    return {"seconds": reached[0] if reached else None, "epochs": len(accs),
            "test_accuracy": accs[-1] if accs else None, "target_accuracy": target,
            "sgld_steps": cfg.sgld_steps, "divergence_events": len(trainer.events), "gave_up": diverged,
            "settings": {k: v for k, v in config.items()} or "TrainConfig defaults, dataset digits"}


_FRESH_FLOOR = """
import statistics, sys, time, torch
from bench.speed import CLOCKS, floor_step
from jem_core.energy import JEM
from jem_core.models import ConvNet
from jem_core.perf import tune_malloc
from jem_core.sampling import frozen_parameters
threads, clock, batch, steps, tuned = int(sys.argv[1]), CLOCKS[sys.argv[2]], int(sys.argv[3]), int(sys.argv[4]), sys.argv[5] == "1"
torch.set_num_threads(threads)
applied = tune_malloc() if tuned else False
model, x = JEM(ConvNet(1, 10, image_size=28)).eval(), torch.rand(batch, 1, 28, 28) * 2 - 1
times = []
with frozen_parameters(model):
    for i in range(steps + 3):
        t0 = clock()
        floor_step(model, x)
        if i >= 3:
            times.append(clock() - t0)
print(statistics.median(times), applied)
"""


def bench_malloc(batch: int, steps: int, rounds: int = 2, clock: str = "wall") -> dict[str, Any]:
    """Floor-step time of the MNIST ConvNet in fresh processes, with and without :func:`jem_core.perf.tune_malloc`.

    glibc's allocator behaves according to the process's history (its mmap threshold follows the
    blocks freed so far), so each measurement starts a new Python process that does nothing else;
    the two kinds alternate ``rounds`` times and the ratio is the median of per-round ratios.
    """
    import subprocess

    def one(tuned: bool) -> tuple[float, bool]:
        args = [str(torch.get_num_threads()), clock, str(batch), str(steps), "1" if tuned else "0"]
        env = {k: v for k, v in os.environ.items() if not k.startswith(("MALLOC_", "GLIBC_TUNABLES"))}
        r = subprocess.run([sys.executable, "-c", _FRESH_FLOOR, *args], capture_output=True, text=True, env=env,
                           cwd=ROOT, timeout=600, check=True)
        t, applied = r.stdout.split()
        return float(t), applied == "True"

    times: dict[str, list[float]] = {"default": [], "tuned": []}
    applied = False
    for _ in range(rounds):
        times["default"].append(one(False)[0])
        t, applied = one(True)
        times["tuned"].append(t)
    return {"ratio": median_ratio(times, "tuned", "default"), "applied": applied,
            "default_ms": 1000 * statistics.median(times["default"]), "tuned_ms": 1000 * statistics.median(times["tuned"]),
            "batch": batch, "steps": steps, "rounds": rounds}


# -- the suite ---------------------------------------------------------------------------------------
def _quantile(v: list[float], q: float) -> float:
    s = sorted(v)
    return s[min(len(s) - 1, int(round(q * (len(s) - 1))))]


def _load_mnist_model(checkpoint: str | None) -> tuple[nn.Module, dict[str, Any], torch.Tensor | None, str]:
    """The bundled MNIST JEM, or a freshly initialised 28x28 ConvNet when the checkpoint is absent."""
    from jem_core.checkpoint import load_checkpoint
    from jem_core.energy import JEM
    from jem_core.models import ConvNet

    if checkpoint and Path(checkpoint).is_file():
        ck = load_checkpoint(checkpoint)
        return ck.model, ck.metadata, ck.replay_buffer, checkpoint
    torch.manual_seed(0)
    meta = {"in_channels": 1, "image_size": 28, "n_classes": 10, "class_names": [str(i) for i in range(10)]}
    why = f"{checkpoint} not found: " if checkpoint else ""
    return JEM(ConvNet(1, 10, image_size=28)).eval(), meta, None, why + "freshly initialised ConvNet(1, 10, image_size=28)"


def machine_info() -> dict[str, Any]:
    """Thread count, torch/Python versions and CPU, recorded with every run."""
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")), cpu)
    except OSError:
        pass
    return {"threads": torch.get_num_threads(), "cpu_count": os.cpu_count(), "cpu": cpu, "torch": torch.__version__,
            "python": platform.python_version(), "platform": platform.platform(),
            "bf16_native": bool(getattr(torch.cpu, "_is_avx512_bf16_supported", lambda: False)())}


#: The training options measured next to the defaults (``TrainConfig`` overrides).
TRAIN_OPTIONS: dict[str, dict[str, Any]] = {
    "bf16": {"sgld_bf16": True},
    "channels_last": {"channels_last": True},
    "bf16_channels_last": {"sgld_bf16": True, "channels_last": True},
}

#: JEM++-style settings (Yang & Ji 2021): fewer SGLD steps from class-Gaussian starts with clipped updates,
#: and the same steps from uniform noise for comparison; timed to accuracy with ``--accuracy-options``.
ACCURACY_OPTIONS: dict[str, dict[str, Any]] = {
    "bf16_channels_last": {"sgld_bf16": True, "channels_last": True},
    "jempp_10_steps": {"sgld_steps": 10, "sgld_init": "gaussian", "sgld_max_update": 0.05},
    "jempp_5_steps": {"sgld_steps": 5, "sgld_init": "gaussian", "sgld_max_update": 0.05},
    "uniform_5_steps_clipped": {"sgld_steps": 5, "sgld_max_update": 0.05},
}

#: Sizes of the full run and of the tiny ``--quick`` run (which checks the plumbing only).
SIZES = {
    "full": {"conv_batch": 64, "conv_steps": 5, "conv_repeats": 25, "wrn": (28, 2), "wrn_batch": 32, "wrn_steps": 2,
             "repeats": 11,
             "train_steps": 20, "train_buffer": 10000, "score_repeats": 50, "chains": 64, "refreshes": 12},
    "quick": {"conv_batch": 4, "conv_steps": 2, "conv_repeats": 2, "wrn": (10, 1), "wrn_batch": 2, "wrn_steps": 2,
              "repeats": 2,
              "train_steps": 2, "train_buffer": 100, "score_repeats": 5, "chains": 4, "refreshes": 2},
}


def run_benchmarks(checkpoint: str | None = DEFAULT_CHECKPOINT, quick: bool = False, repeats: int | None = None,
                   compile_fn: bool = False, accuracy: bool = True, accuracy_options: bool = False,
                   clock: str = "wall", tune_allocator: bool = True,
                   log: Callable[[str], None] = lambda s: None) -> dict[str, Any]:
    """Run every benchmark and return the JSON-ready results (see the module docstring).

    Args:
        checkpoint: the MNIST JEM to use (falls back to a fresh ConvNet when absent; the result says so).
        quick: tiny sizes (seconds): checks the plumbing, the figures mean nothing.
        repeats: interleaved rounds per ratio (default 11, and 25 for the cheap ConvNet SGLD; quick 2).
        compile_fn: also measure ``torch.compile`` of the energy-gradient function (adds a minute or two).
        accuracy: run the time-to-accuracy training (the longest part).
        accuracy_options: also time :data:`ACCURACY_OPTIONS` to accuracy (about a minute more).
        clock: ``"wall"`` or ``"cpu"`` (see :data:`CLOCKS`).
        tune_allocator: call :func:`jem_core.perf.tune_malloc` first, as the CLI and the app do: with
            glibc's default thresholds each contender's timing depends on the order of its allocations
            (page faults), which adds run-to-run offsets of 5-15% at 2 threads.
        log: progress lines.
    """
    from jem_core.perf import tune_malloc
    from jem_core.wideresnet import WideResNet

    t_start = time.perf_counter()
    mode = "quick" if quick else "full"
    z = SIZES[mode]
    r = repeats or z["repeats"]
    tick = CLOCKS[clock]
    model, meta, replay, source = _load_mnist_model(checkpoint)
    out: dict[str, Any] = {"machine": machine_info(), "clock": clock, "mode": mode, "model_source": source}
    out["machine"]["malloc_tuned"] = tune_malloc() if tune_allocator else False

    conv_key = f"mnist_convnet_b{z['conv_batch']}"
    wrn_key = f"wrn{z['wrn'][0]}_{z['wrn'][1]}_b{z['wrn_batch']}"
    log(f"SGLD on the MNIST ConvNet ({conv_key}) ...")
    conv = bench_sgld(model, (1, 28, 28), z["conv_batch"], z["conv_steps"], repeats or z["conv_repeats"],
                      compile_fn=compile_fn, clock=tick)
    log(f"SGLD on the WideResNet ({wrn_key}) ...")
    wrn = bench_sgld(WideResNet(*z["wrn"]), (3, 32, 32), z["wrn_batch"], z["wrn_steps"], r, clock=tick)
    out["sgld_step_ratio"] = {conv_key: conv["ours"], wrn_key: wrn["ours"]}
    out["official_style_ratio"] = {conv_key: conv["official"], wrn_key: wrn["official"]}
    out["options"] = {f"sgld_step_ratio_{k}": {key: res["options"][k] for key, res in ((conv_key, conv), (wrn_key, wrn))
                                               if k in res["options"]}
                      for k in conv["options"]}

    log("one JEM training iteration ...")
    tr = bench_train_iter((1, 28, 28), r, z["train_steps"], z["train_buffer"], clock=tick)
    out["train_iter_ratio"] = tr["ratio"]
    tr_opts = {}
    for name, kw in TRAIN_OPTIONS.items():
        log(f"  ... with {name}")
        tr_opts[name] = bench_train_iter((1, 28, 28), r, z["train_steps"], z["train_buffer"], clock=tick, **kw)
        out["options"][f"train_iter_ratio_{name}"] = tr_opts[name]["ratio"]

    log("scoring latency ...")
    sc = bench_score_latency(model, meta, z["score_repeats"], clock=tick)
    out["score_latency_ms"] = sc["median_ms"]

    log("live chains ...")
    ch = bench_chain_fps(model, (1, 28, 28), z["chains"], 5, z["refreshes"], start=replay, clock=tick)
    out["chain_fps"] = ch["fps"]
    ch_opt = bench_chain_fps(model, (1, 28, 28), z["chains"], 5, z["refreshes"], start=replay, clock=tick,
                             bf16=True, channels_last=True)
    out["options"]["chain_fps_bf16_channels_last"] = ch_opt["fps"]

    tta: dict[str, Any] = {"skipped": True}
    tta_opts: dict[str, Any] = {}
    tiny = {"max_epochs": 1, "max_iters_per_epoch": 2, "buffer_size": 100, "n_reference": 50} if quick else {}
    if accuracy:
        log("time to 95% test accuracy on digits ...")
        tta = bench_time_to_accuracy(clock=tick, **{**tiny, **({"sgld_steps": 2} if quick else {})})
    if accuracy_options:
        for name, kw in ACCURACY_OPTIONS.items():
            log(f"  ... with {name}")
            tta_opts[name] = bench_time_to_accuracy(clock=tick, **{**tiny, **kw})
            out["options"][f"time_to_accuracy_s_{name}"] = tta_opts[name]["seconds"]
    out["time_to_accuracy_s"] = tta.get("seconds")

    log("allocator tuning, in fresh processes ...")
    mal = bench_malloc(z["conv_batch"], 3 * r, 1 if quick else 3, clock=clock)
    out["options"]["floor_step_ratio_tuned_malloc"] = mal["ratio"]
    out["details"] = {"sgld": {conv_key: conv, wrn_key: wrn}, "train_iter": tr, "train_iter_options": tr_opts,
                      "score_latency": sc, "chain_fps": ch,
                      "chain_fps_options": {"bf16_channels_last": ch_opt},
                      "time_to_accuracy": tta, "time_to_accuracy_options": tta_opts, "malloc": mal}
    out["targets"] = {k: {"target": f"{c} {v}" if v is not None else "report", "met": _met(out.get(k), c, v)}
                      for k, (c, v) in TARGETS.items()}
    out["seconds_total"] = time.perf_counter() - t_start
    return rounded(out, 4, significant=True)


def _met(value: Any, cmp: str, target: float | None) -> bool | None:
    if target is None or value is None:
        return None
    vals = list(value.values()) if isinstance(value, dict) else [value]
    return all(v <= target if cmp == "<=" else v >= target for v in vals)


# -- the command line --------------------------------------------------------------------------------
def main(argv: list[str] | None = None) -> int:
    """``python bench/speed.py [--quick] [--out FILE] ...``: run :func:`run_benchmarks`, write its JSON to
    ``--out`` and print a one-line JSON summary; bad option values exit 2 with the usage."""
    import argparse
    import json

    p = argparse.ArgumentParser(
        prog="python bench/speed.py",
        description="Measure SGLD and JEM training against the cost of the network itself, "
                    "scoring latency, live-chain frame rate and time to accuracy; write a JSON file.")
    p.add_argument("--out", default="bench.json", help="JSON file to write")
    p.add_argument("--checkpoint", default=DEFAULT_CHECKPOINT,
                   help="MNIST JEM checkpoint (a freshly initialised ConvNet is used when it is absent)")
    p.add_argument("--quick", action="store_true", help="tiny sizes (seconds): checks the plumbing only")
    p.add_argument("--repeats", type=int, default=None, help="interleaved rounds per ratio (default 11, 25 for the ConvNet's SGLD; quick 2)")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's default)")
    p.add_argument("--compile", action="store_true", help="also time torch.compile of the energy gradient (~1 min more)")
    p.add_argument("--no-accuracy", action="store_true", help="skip the time-to-accuracy training run")
    p.add_argument("--accuracy-options", action="store_true",
                   help="also time bf16/channels_last and JEM++-style settings to accuracy (about a minute more)")
    p.add_argument("--default-malloc", action="store_true",
                   help="keep glibc's default allocator thresholds (default: jem_core.perf.tune_malloc first)")
    p.add_argument("--clock", choices=sorted(CLOCKS), default="wall",
                   help="wall time (default) or this process's CPU time, which other processes on a shared "
                        "machine do not inflate (use it with --threads 1)")
    a = p.parse_args(argv)
    if a.repeats is not None and a.repeats < 1:
        p.error(f"--repeats must be >= 1; got {a.repeats}")
    if a.threads is not None:
        if a.threads < 1:
            p.error(f"--threads must be >= 1; got {a.threads}")
        torch.set_num_threads(a.threads)
    res = run_benchmarks(a.checkpoint, quick=a.quick, repeats=a.repeats, compile_fn=a.compile,
                         accuracy=not a.no_accuracy, accuracy_options=a.accuracy_options, clock=a.clock,
                         tune_allocator=not a.default_malloc,
                         log=lambda s: print(s, file=sys.stderr, flush=True))
    out = Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(res, indent=2) + "\n")
    summary = {k: res[k] for k in ("sgld_step_ratio", "official_style_ratio", "train_iter_ratio", "score_latency_ms",
                                   "chain_fps", "time_to_accuracy_s")}
    print(json.dumps({"out": str(out), **summary, "threads": res["machine"]["threads"], "clock": res["clock"],
                      "torch": res["machine"]["torch"], "seconds": round(res["seconds_total"], 1)}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
