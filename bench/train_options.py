"""Training options on a recipe at a fixed iteration budget: accuracy, samples, calibration, events, speed.

    OMP_NUM_THREADS=1 python bench/train_options.py --recipe mnist-jem --data-root ../shared/data \\
        --iters 1200 --options recipe,steps5,steps20 --out bench/train_options_mnist_a.json
    python bench/train_options.py --table bench/train_options_mnist_a.json bench/train_options_mnist_b.json

Each option is the recipe (:func:`jem_core.recipes.recipe_config`) with a few settings changed (:data:`OPTIONS`),
trained from scratch for ``--iters`` iterations split into ``--evals`` equal epochs (the recipe's schedules
are in epochs, so they are compressed with it), judged on the validation split after every epoch by the
trainer itself (accuracy, ECE, the replay buffer's classifier Fréchet distance and agreement), with the test
split evaluated once for the epoch chosen on validation. Recorded per option: those numbers, the
training seconds (sum of epoch times, evaluation excluded) and their ratio per iteration, the training
seconds until validation accuracy first reached ``--to`` (NaN if never), divergence roll-backs and drift
rescues. Several invocations (one per core, ``OMP_NUM_THREADS=1``) can split the options; ``--table``
merges their JSON files into one markdown table.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

#: option name -> (description, TrainConfig settings that differ from the recipe).
OPTIONS: dict[str, tuple[str, dict]] = {
    "recipe": ("the recipe as defined (mnist-jem: 10 SGLD steps clipped to +-0.05 per pixel from class "
               "Gaussians, bf16 + channels-last, Adam 1e-3)", {}),
    "steps5": ("5 SGLD steps", {"sgld_steps": 5}),
    "steps20": ("20 SGLD steps", {"sgld_steps": 20}),
    "noclip": ("no per-pixel update clip (plain SGLD steps from class Gaussians)", {"sgld_max_update": None}),
    "uniform": ("clipped steps from uniform noise instead of class Gaussians", {"sgld_init": "uniform"}),
    "plain": ("JEM's chains: no clip, uniform starts", {"sgld_max_update": None, "sgld_init": "uniform"}),
    "float32": ("float32 SGLD, default memory layout", {"sgld_bf16": False, "channels_last": False}),
    "sgd": ("SGD, momentum 0.9, lr 0.05", {"optimizer": "sgd", "lr": 0.05, "momentum": 0.9}),
    "adam1e-4": ("Adam 1e-4 (the earlier recipe's rate)", {"lr": 1e-4}),
}


def run_option(recipe: str, name: str, iters: int, evals: int, seed: int, data_root: str | None,
               to: float) -> dict:
    """Train one option; returns its record (see the module docstring)."""
    from jem_core.recipes import recipe_config
    from jem_core.training import Trainer

    desc, settings = OPTIONS[name]
    per_epoch = max(1, iters // evals)
    cfg = recipe_config(recipe, seed=seed, data_root=data_root, epochs=evals, max_iters_per_epoch=per_epoch,
                        **settings)
    from jem_core.training import TrainingDiverged

    t0 = time.perf_counter()
    trainer = Trainer(cfg)
    try:
        trainer.fit()
        gave_up = None
    except TrainingDiverged as e:  # the guard gave up: a row of the table, not the end of the benchmark
        gave_up = str(e)
    hist = trainer.history
    wall = time.perf_counter() - t0
    train_s = sum(h.seconds for h in hist)
    done = sum(h.iterations for h in hist)
    reached = [sum(h.seconds for h in hist[:i + 1]) for i, h in enumerate(hist) if h.val_accuracy >= to]
    final = trainer.final or {}
    chosen = next((h for h in hist if h.epoch == final.get("epoch")), hist[-1] if hist else None)
    return {"option": name, "description": desc, "settings": settings, "seed": seed, "iterations": done,
            "train_seconds": round(train_s, 1), "wall_seconds": round(wall, 1),
            "ms_per_iteration": round(1000 * train_s / done, 1) if done else float("nan"),
            f"seconds_to_val_{to}": round(reached[0], 1) if reached else float("nan"),
            "val_accuracy": [round(h.val_accuracy, 4) for h in hist],
            "chosen_epoch": final.get("epoch"), "test_accuracy": final.get("test_accuracy"),
            "test_ece": final.get("test_ece"), "sample_fd": round(chosen.sample_fd, 4) if chosen else float("nan"),
            "sample_agreement": round(chosen.sample_agreement, 4) if chosen else float("nan"),
            "divergence_events": sum(e["kind"] == "divergence" for e in trainer.events),
            "drift_events": sum(e["kind"] == "drift" for e in trainer.events), "gave_up": gave_up}


def table(records: list[dict]) -> str:
    """The records as a markdown table (one row per option, seeds joined)."""
    by: dict[str, list[dict]] = {}
    for r in records:
        by.setdefault(r["option"], []).append(r)
    to_key = next((k for k in records[0] if k.startswith("seconds_to_val_")), None) if records else None
    to = to_key.rsplit("_", 1)[1] if to_key else "?"
    lines = [f"| option | ms / iteration | to {float(to):.1%} val. (s) | val. accuracy by epoch (%) | "
             "test accuracy (%) | ECE | FD | agrees | events |", "|---|---|---|---|---|---|---|---|---|"]
    order = [k for k in OPTIONS if k in by] + [k for k in by if k not in OPTIONS]

    def fmt(v, f, missing="never"):
        return missing if v is None or (isinstance(v, float) and math.isnan(v)) else f.format(v)

    for name in order:
        rs = by[name]
        lines.append("| " + " | ".join([
            rs[0]["description"],
            ", ".join(fmt(r["ms_per_iteration"] or float("nan"), "{:.0f}", "-") for r in rs),
            ", ".join(fmt(r[to_key], "{:.0f}") for r in rs),
            "; ".join(" / ".join(f"{100 * v:.1f}" for v in r["val_accuracy"]) for r in rs),
            ", ".join(fmt(r["test_accuracy"] and 100 * r["test_accuracy"], "{:.2f}", "-") for r in rs),
            ", ".join(fmt(r["test_ece"], "{:.3f}", "-") for r in rs),
            ", ".join(fmt(r["sample_fd"], "{:.3f}", "-") for r in rs),
            ", ".join(fmt(r["sample_agreement"] and 100 * r["sample_agreement"], "{:.1f}%", "-") for r in rs),
            ", ".join(f"{r['divergence_events']} / {r['drift_events']}" + (" (gave up)" if r.get("gave_up") else "")
                      for r in rs)]) + " |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--recipe", default="mnist-jem")
    ap.add_argument("--options", default="recipe", help=f"comma-separated, from: {', '.join(OPTIONS)}")
    ap.add_argument("--iters", type=int, default=1200, help="training iterations per option")
    ap.add_argument("--evals", type=int, default=3, help="validation evaluations (epochs) over the budget")
    ap.add_argument("--seeds", default="0")
    ap.add_argument("--to", type=float, default=0.97, help="validation accuracy whose time is recorded")
    ap.add_argument("--data-root", default=None)
    ap.add_argument("--out", default="/tmp/train_options.json")
    ap.add_argument("--table", nargs="*", default=None, help="print the table of these JSON files and exit")
    a = ap.parse_args()
    if a.table is not None:
        print(table([r for f in a.table for r in json.loads(Path(f).read_text())["records"]]))
        return
    names = [n for n in a.options.split(",") if n]
    unknown = [n for n in names if n not in OPTIONS]
    if unknown:
        raise SystemExit(f"error: unknown option(s) {', '.join(unknown)}; known: {', '.join(OPTIONS)}")
    from bench.speed import machine_info

    out = Path(a.out)
    result = {"recipe": a.recipe, "iters": a.iters, "evals": a.evals, "machine": machine_info(), "records": []}
    for seed in [int(s) for s in a.seeds.split(",")]:
        for name in names:
            rec = run_option(a.recipe, name, a.iters, a.evals, seed, a.data_root, a.to)
            result["records"].append(rec)
            print(json.dumps(rec), flush=True)
            out.write_text(json.dumps(result, indent=2))  # after every option: a killed run keeps its rows
    print(table(result["records"]))


if __name__ == "__main__":
    main()
