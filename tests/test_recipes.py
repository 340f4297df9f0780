"""Named recipes: one command from scratch, settings printed and stored; the digits recipe's claim."""

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from jem_core.checkpoint import load_checkpoint
from jem_core.recipes import RECIPES, recipe_config, recipe_names
from jem_core.training import Trainer, resolve_judge

ROOT = Path(__file__).resolve().parents[1]


def run_cli(*args):
    return subprocess.run([sys.executable, "-m", "jem_core", *map(str, args)], cwd=ROOT, capture_output=True,
                          text=True, timeout=600, env={"OMP_NUM_THREADS": "1", **__import__("os").environ})


def test_every_recipe_is_a_valid_config_with_a_validation_split():
    assert {"mnist-jem", "digits-jem", "mnist-baseline", "digits-baseline"} <= set(recipe_names())
    for name in recipe_names():
        cfg = recipe_config(name)
        cfg.validate()
        assert cfg.recipe == name and cfg.val_split > 0, name
        assert RECIPES[name]["target"]["accuracy"] >= 0.95
    mnist = recipe_config("mnist-jem", seed=2)
    assert mnist.seed == 2 and mnist.val_split == 5000 and mnist.drift_guard and mnist.px_weight_schedule
    assert resolve_judge(mnist.judge) == ROOT / "checkpoints" / "mnist_baseline.pt"
    with pytest.raises(ValueError, match="unknown recipe"):
        recipe_config("imagenet-jem")
    with pytest.raises(ValueError, match="unknown training setting"):
        recipe_config("digits-jem", nonsense=1)


def test_cli_recipe_prints_and_stores_its_settings_and_flags_override_them(tmp_path):
    out = tmp_path / "r.pt"
    r = run_cli("train", "--recipe", "digits-jem", "--epochs", "2", "--max-iters-per-epoch", "3",
                "--sample-eval", "50", "--out", out, "--quiet")
    assert r.returncode == 0, r.stderr
    lines = [json.loads(l) for l in r.stdout.splitlines() if l.startswith("{")]
    assert lines[0]["recipe"] == "digits-jem"
    s = lines[0]["settings"]
    assert s["epochs"] == 2 and s["lr"] == pytest.approx(2e-3) and s["val_split"] == 300 and s["sample_eval"] == 50
    epochs = [l for l in lines if "epoch" in l and "checkpoint" not in l]
    assert len(epochs) == 2 and all(l["test_accuracy"] is None and 0 <= l["val_accuracy"] <= 1 for l in epochs)
    final = lines[-1]
    assert final["selected_epoch"] in (1, 2) and 0 <= final["test_accuracy"] <= 1 and final["drift_events"] == 0
    meta = load_checkpoint(out).metadata
    assert meta["train_args"]["recipe"] == "digits-jem" and meta["train_args"]["px_weight_schedule"] == "0:1,2:0.3"
    assert meta["recipe"]["name"] == "digits-jem" and meta["recipe"]["target"]["accuracy"] == 0.95
    assert meta["metrics"]["selected_epoch"] == final["selected_epoch"]


@pytest.mark.parametrize("args, msg", [
    (["--recipe", "imagenet-jem"], "invalid choice"),
    (["--dataset", "digits", "--px-weight-schedule", "0:x"], "px weight schedule"),
    (["--dataset", "digits", "--lr-floor", "-1"], "must be a number >= 0"),
    (["--dataset", "digits", "--val-split", "1437"], "validation split"),
])
def test_cli_refuses_bad_recipe_and_schedule_input(tmp_path, args, msg):
    r = run_cli("train", *args, "--epochs", "1", "--max-iters-per-epoch", "1", "--out", tmp_path / "x.pt", "--quiet")
    assert r.returncode == 2 and "error:" in r.stderr and msg in r.stderr, r.stderr


def test_digits_recipe_reaches_95_percent_in_seconds():
    """The digits-jem recipe: >= 95% test accuracy for the epoch chosen on validation (measured: 97.2%, ECE 0.11,
    about 20 s on one idle core; the time is printed, not asserted, since the machine is shared)."""
    t0 = time.perf_counter()
    t = Trainer(recipe_config("digits-jem"))
    t.fit()
    seconds = time.perf_counter() - t0
    print(f"digits-jem: {seconds:.1f} s, chosen epoch {t.final['epoch']}, test {t.final['test_accuracy']:.4f}")
    assert t.final["test_accuracy"] >= 0.95
    assert t.final["test_ece"] < 0.2
    assert t.history[-1].sample_agreement > 0.8  # the judge (digits baseline) agrees on buffer samples
    assert not [e for e in t.events if e["kind"] == "divergence"]
    assert all(torch.isfinite(p).all() for p in t.model.parameters())
