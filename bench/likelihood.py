"""Seconds to a log Z with bootstrap standard error <= 0.5 nat, for the bundled digits and MNIST JEMs.

    OMP_NUM_THREADS=1 python bench/likelihood.py --threads 1 --out bench/likelihood.json
    python bench/likelihood.py --threads 2 --out bench/likelihood_2threads.json   # on an otherwise idle machine
    python bench/likelihood.py --quick --out /tmp/l.json                          # seconds: the plumbing only

Procedure (what a user would do): one pilot run tunes the step sizes (``tune_step_sizes``, counted),
then forward AIS with 64 chains and K = 25, 50, 100, ... temperatures (doubling, each run from scratch,
all counted) until the bootstrap standard error of ``log Ẑ`` is at most the target, or the time or K
cap is reached. Recorded per model: the seconds to get there (all runs), the seconds of the last run
alone, K, ``log Ẑ``, its SE, the ESS and the log-weight variance (an SE from few effective chains
understates the error: read the ESS next to it), plus machine information.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from jem_core.checkpoint import load_checkpoint  # noqa: E402
from jem_core.likelihood import forward_ais, model_energy_fn, tune_step_sizes  # noqa: E402
from jem_core.perf import tune_malloc  # noqa: E402

from bench.speed import machine_info  # noqa: E402

MODELS = ["checkpoints/digits_jem.pt", "checkpoints/mnist_jem.pt"]


def time_to_se(checkpoint: str, target_se: float, chains: int, start_temps: int, max_temps: int,
               max_seconds: float, seed: int = 0) -> dict:
    """Doubling K from ``start_temps`` until SE <= ``target_se``; returns the record of the last run."""
    ck = load_checkpoint(ROOT / checkpoint)
    model = ck.model.eval().requires_grad_(False)
    m = ck.metadata
    shape = (int(m["in_channels"]), int(m["image_size"]), int(m["image_size"]))
    efn = model_energy_fn(model)
    t0 = time.perf_counter()
    steps = tune_step_sizes(efn, shape, n_pilot_temps=50, n_chains=16, seed=seed + 1)
    pilot = time.perf_counter() - t0
    runs, k = [], start_temps
    while True:
        r = forward_ais(efn, shape, n_temps=k, n_chains=chains, step_sizes=steps, seed=seed)
        total = time.perf_counter() - t0
        runs.append({"temps": k, "log_z": round(r.log_z, 3), "log_z_se": round(r.log_z_se, 3), "ess": round(r.ess, 1),
                     "log_w_var": round(r.log_w_var, 3), "seconds": round(r.seconds, 1)})
        print(json.dumps({"checkpoint": checkpoint, **runs[-1], "total_seconds": round(total, 1)}), flush=True)
        reached = r.log_z_se <= target_se
        if reached or 2 * k > max_temps or total > max_seconds:
            break
        k *= 2
    return {"checkpoint": checkpoint, "dim": r.dim, "log_z_uniform_box": round(r.log_z0, 3), "reached": reached,
            "seconds_to_target": round(total, 1) if reached else None, "seconds_total": round(total, 1),
            "seconds_pilot": round(pilot, 1), "seconds_last_run": round(r.seconds, 1), "temps": k,
            "log_z": round(r.log_z, 3), "log_z_se": round(r.log_z_se, 3), "ess": round(r.ess, 1),
            "log_w_var": round(r.log_w_var, 3), "runs": runs}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", required=True)
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's own)")
    p.add_argument("--target-se", type=float, default=0.5, help="standard error to reach (nats)")
    p.add_argument("--chains", type=int, default=64)
    p.add_argument("--max-temps", type=int, default=3200)
    p.add_argument("--max-seconds", type=float, default=1800.0, help="per model")
    p.add_argument("--quick", action="store_true", help="digits only, at most 50 temperatures")
    a = p.parse_args(argv)
    if a.threads:
        torch.set_num_threads(a.threads)
    tune_malloc()
    models = MODELS[:1] if a.quick else MODELS
    out = {"figure": f"seconds to log Z with bootstrap SE <= {a.target_se} nat (forward AIS, HMC with reflection)",
           "chains": a.chains, "machine": machine_info(), "models": []}
    for ck in models:
        if not (ROOT / ck).is_file():
            out["models"].append({"checkpoint": ck, "skipped": "not bundled"})
            continue
        out["models"].append(time_to_se(ck, a.target_se, a.chains, 25, 50 if a.quick else a.max_temps,
                                        a.max_seconds))
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps(out, indent=1) + "\n")
    print(json.dumps({m["checkpoint"]: m.get("seconds_to_target") for m in out["models"]}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
