"""Is a model's robustness real, or gradient masking? Several attacks on the same images, per-image worst case.

Usage (about 10 minutes on one CPU core for the MNIST pair)::

    OMP_NUM_THREADS=1 python docs/results/attack_check.py --checkpoint checkpoints/mnist_jem.pt \\
        --compare checkpoints/mnist_baseline.pt --data-root ../shared/data --out docs/results/mnist/attack_check.json

For each model and L∞ eps (in the [0, 1] pixel scale) on the first ``--n`` test images:

- plain classifier: PGD-10 with the margin loss (the report's attack), PGD-40 with a random start,
  PGD-10 with the cross-entropy loss, and the transfer of the *other* model's PGD-40 image; worst case
  per image over all four;
- refined classifier (5 SGLD steps, 2 chains; Grathwohl et al. 2019, sec. 5.3): transfer of the plain
  model's PGD-10 image, BPDA + EOT PGD-10, full back-propagation through the SGLD steps PGD-10; worst case
  per image over the three (Athalye et al. 2018).

Prints a markdown table and writes the numbers as JSON.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from jem_core.checkpoint import load_checkpoint  # noqa: E402
from jem_core.data import load_dataset  # noqa: E402
from jem_core.evaluation.robustness import RefinedClassifier, attack, correct_predictions  # noqa: E402


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--checkpoint", required=True)
    p.add_argument("--compare", required=True)
    p.add_argument("--data-root", default=None)
    p.add_argument("--n", type=int, default=100)
    p.add_argument("--eps", type=float, nargs="+", default=[0.1, 0.2])
    p.add_argument("--out", required=True)
    a = p.parse_args()
    cks = {Path(a.checkpoint).stem: load_checkpoint(a.checkpoint), Path(a.compare).stem: load_checkpoint(a.compare)}
    test = load_dataset(next(iter(cks.values())).metadata["dataset"], "test", a.data_root)
    x, y = test.x[:a.n], test.y[:a.n]
    names = list(cks)
    results: dict = {"n": a.n, "eps": a.eps, "models": {}}
    t0 = time.perf_counter()
    strong = {}  # PGD-40 images per (model, eps), for the transfer rows
    for name in names:
        for eps in a.eps:
            strong[name, eps] = attack(cks[name].model, x, y, "pgd_linf", eps, steps=40, random_start=True, seed=1)
    for i, name in enumerate(names):
        model, other = cks[name].model, names[1 - i]
        rows = {}
        for eps in a.eps:
            pgd10 = attack(model, x, y, "pgd_linf", eps, steps=10)
            plain = {
                "PGD-10, margin loss (report)": pgd10,
                "PGD-40, margin loss, random start": strong[name, eps],
                "PGD-10, cross-entropy loss": attack(model, x, y, "pgd_linf", eps, steps=10, loss="ce"),
                "transfer of the other model's PGD-40 image": strong[other, eps],
            }
            ok = {k: correct_predictions(model, v, y) for k, v in plain.items()}
            worst = torch.stack(list(ok.values())).all(0)
            refined_rows = {}
            bpda = RefinedClassifier(model, steps=5, n_chains=2, seed=0)
            full = RefinedClassifier(model, steps=5, n_chains=2, gradient="full", seed=0)
            judge = RefinedClassifier(model, steps=5, n_chains=2, seed=123)  # a fresh draw judges every image
            refined_inputs = {
                "transfer of the plain model's PGD-10 image": pgd10,
                "BPDA + EOT, PGD-10": attack(bpda, x, y, "pgd_linf", eps, steps=10, batch_size=50),
                "full back-propagation through SGLD, PGD-10": attack(full, x, y, "pgd_linf", eps, steps=10,
                                                                     batch_size=25),
            }
            for k, v in refined_inputs.items():
                refined_rows[k] = correct_predictions(judge, v, y)
            refined_worst = torch.stack(list(refined_rows.values())).all(0)
            rows[str(eps)] = {
                "plain": {**{k: float(v.float().mean()) for k, v in ok.items()}, "worst case": float(worst.float().mean())},
                "refined": {**{k: float(v.float().mean()) for k, v in refined_rows.items()},
                            "worst case": float(refined_worst.float().mean())},
            }
            print(f"{name} eps {eps}: {rows[str(eps)]} ({time.perf_counter() - t0:.0f} s)", flush=True)
        results["models"][name] = rows
    results["seconds"] = round(time.perf_counter() - t0, 1)
    Path(a.out).write_text(json.dumps(results, indent=1))
    # markdown
    print(f"\n| attack | " + " | ".join(f"{n} eps {e}" for n in names for e in a.eps) + " |")
    print("|---|" + "---|" * (len(names) * len(a.eps)))
    for part in ("plain", "refined"):
        keys = list(dict.fromkeys(k for n in names for e in a.eps for k in results["models"][n][str(e)][part]))
        for k in keys:
            cells = [results["models"][n][str(e)][part].get(k) for n in names for e in a.eps]
            print(f"| {part}: {k} | " + " | ".join("-" if c is None else f"{c:.2f}" for c in cells) + " |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
