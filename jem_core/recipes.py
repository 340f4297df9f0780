"""Named training recipes: one command from scratch, with schedules, validation and the drift guard.

``python -m jem_core train --recipe mnist-jem --data-root DIR --out run.pt`` builds the recipe's
:class:`~jem_core.training.TrainConfig`; flags given beside ``--recipe`` override single settings. The
recipe's name and every setting are printed at start and stored in the checkpoint (``train_args`` and
``recipe`` in the metadata).

The recipes replace hand-chained stages (``--init-from`` runs, each with a fresh replay buffer and
optimizer) by schedules inside one run (:mod:`jem_core.schedules`): the MNIST recipe keeps JEM's p(x)
weight 1 for the first half epoch, while the sampler forms, then lowers it to 0.1 and later 0.05 with an
energy L2 penalty (Du & Mordatch 2019, section 3.3), the settings of the earlier three stages.

What does not live here: what each setting does (:mod:`jem_core.training`), schedule parsing
(:mod:`jem_core.schedules`).
"""

from __future__ import annotations

from typing import Any

__all__ = ["RECIPES", "recipe_config", "recipe_names", "target_accuracy", "accuracy_summary"]

#: name -> {"description", "target" (what the recipe is meant to reach), "settings" (TrainConfig fields)}.
RECIPES: dict[str, dict[str, Any]] = {
    "digits-jem": {
        "description": ("8x8 digits JEM in seconds: p(x) weight 1 -> 0.3 (epoch 2), 20 SGLD steps, cosine learning "
                        "rate from 2e-3, 300 validation images, drift guard"),
        "target": {"accuracy": 0.95},
        "settings": dict(dataset="digits", objective="jem", epochs=12, batch_size=64, lr=2e-3, warmup_iters=50,
                         lr_schedule="cosine", lr_floor=0.1, crop_padding=0, px_weight_schedule="0:1,2:0.3",
                         buffer_size=2000, keep_buffer=400,
                         sgld_steps=20, val_split=300, sample_eval=300, judge="bundled:digits_baseline.pt",
                         drift_guard=True, guard_every=10),
    },
    "digits-baseline": {
        "description": "8x8 digits cross-entropy baseline, same split and schedule",
        "target": {"accuracy": 0.97},
        "settings": dict(dataset="digits", objective="baseline", epochs=30, lr=1e-3, warmup_iters=50,
                         lr_schedule="cosine", lr_floor=0.05, crop_padding=1, val_split=300, guard_every=10),
    },
    "mnist-jem": {
        "description": ("MNIST JEM in one run: p(x) weight 1 -> 0.1 (epoch 0.5) -> 0.05 (epoch 4) with an energy "
                        "penalty, 10 SGLD steps clipped to +-0.05 per pixel from class Gaussians (JEM++), Adam at "
                        "1e-3 with a cosine decay, 5,000 validation images, bf16 SGLD, a per-epoch AIS log p(x), "
                        "drift guard"),
        "target": {"accuracy": 0.985, "classifier_fd": 0.15, "conditional_accuracy": 0.90},
        "settings": dict(dataset="mnist", objective="jem", epochs=8, batch_size=64, lr=1e-3, warmup_iters=200,
                         lr_schedule="cosine", lr_floor=0.1, px_weight=1.0,
                         px_weight_schedule="0:1,0.5:0.1,4:0.05", energy_l2_schedule="0:0,0.5:0.0005,4:0.001",
                         sgld_steps=10, sgld_init="gaussian", sgld_max_update=0.05, buffer_size=10000,
                         keep_buffer=400, sgld_bf16=True, channels_last=True, ais_temps=50, ais_chains=16,
                         val_split=5000, sample_eval=500, judge="bundled:mnist_baseline.pt", drift_guard=True,
                         guard_every=50),
    },
    "mnist-baseline": {
        "description": "MNIST cross-entropy baseline, 5,000 validation images",
        "target": {"accuracy": 0.99},
        "settings": dict(dataset="mnist", objective="baseline", epochs=8, lr=1e-3, warmup_iters=200,
                         lr_schedule="cosine", lr_floor=0.05, val_split=5000),
    },
}


def recipe_names() -> list[str]:
    """The known recipe names, sorted."""
    return sorted(RECIPES)


def recipe_config(name: str, **overrides: Any):
    """The :class:`~jem_core.training.TrainConfig` of recipe ``name``, with ``overrides`` applied.

    Args:
        name: one of :func:`recipe_names`.
        overrides: TrainConfig fields to change (e.g. ``seed=1``, ``data_root="..."``).

    Raises:
        BadInput: unknown recipe or unknown field.
    """
    from .errors import BadInput
    from .training import TrainConfig

    if name not in RECIPES:
        raise BadInput(f"unknown recipe {name!r}; known: {', '.join(recipe_names())}")
    settings = {**RECIPES[name]["settings"], **overrides, "recipe": name}
    fields = set(TrainConfig.__dataclass_fields__)
    bad = sorted(set(settings) - fields)
    if bad:
        raise BadInput(f"unknown training setting(s) {', '.join(bad)}")
    return TrainConfig(**settings)


def target_accuracy(metadata: dict) -> float | None:
    """The accuracy a checkpoint should reach: its recipe's target, else the target of the recipe for the
    same dataset and objective (``"<dataset>-jem"`` / ``"<dataset>-baseline"``); None when there is none."""
    rec = (metadata.get("recipe") or {}) if isinstance(metadata.get("recipe"), dict) else {}
    if rec.get("target"):
        return float(rec["target"]["accuracy"])
    name = f"{metadata.get('dataset')}-{'baseline' if metadata.get('objective') == 'baseline' else 'jem'}"
    return float(RECIPES[name]["target"]["accuracy"]) if name in RECIPES else None


def accuracy_summary(metadata: dict, far: float = 0.03) -> str:
    """A short label of a trained checkpoint's accuracy for the model picker, e.g.
    ``"val 97.3%, test 97.2%"``, with ``", under-trained"`` when the test (or else validation) accuracy
    lies more than ``far`` (a fraction, 0.03 = 3 points) below :func:`target_accuracy`; ``""`` when the
    checkpoint records no accuracy."""
    m = metadata.get("metrics") or {}
    val, test = m.get("val_accuracy"), m.get("test_accuracy")
    hist = m.get("history") or []
    if val is None and hist and hist[-1].get("val_accuracy") == hist[-1].get("val_accuracy"):
        val = hist[-1].get("val_accuracy")  # a run stopped before its final report
    parts = []
    if isinstance(val, (int, float)) and val == val:
        parts.append(f"val {100 * val:.1f}%")
    if isinstance(test, (int, float)) and test == test:
        parts.append(f"test {100 * test:.1f}%")
    if not parts:
        return ""
    acc = test if isinstance(test, (int, float)) and test == test else val
    target = target_accuracy(metadata)
    if target is not None and acc < target - far:
        parts.append("under-trained")
    return ", ".join(parts)
