"""Static figures of the evaluation report (``python -m jem_core evaluate``), drawn with matplotlib.

Three PNG files, from the plain dicts of the report (``report.json``'s entries), never from tensors:

- :func:`plot_reliability`: reliability diagrams in the form of Guo et al. (2017, fig. 1): per-bin accuracy
  (outputs), the gap to the diagonal (hatched red), and the share of images per bin; one panel per model
  (and per temperature-scaled model), on shared axes;
- :func:`plot_robustness`: accuracy versus eps per attack, plain (solid) and SGLD-refined (dashed);
- :func:`plot_roc`: ROC curves of one OOD score against every OOD set, one panel per model.

What does not live here: the dashboard's interactive figures (plotly, in ``app/ui.py``) and the numbers
themselves (``report.py``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

__all__ = ["model_label", "plot_reliability", "plot_robustness", "plot_roc"]

#: One colour per model, in the order of the report (matplotlib's default cycle, as the dashboard's).
COLORS = ["#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f"]
_ATTACKS = {"linf": "PGD L∞", "l2": "PGD L2", "fgsm": "FGSM (L∞)"}


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")  # files only: no display needed
    import matplotlib.pyplot as plt

    return plt


def model_label(r: dict) -> str:
    """``"name (objective)"`` of a report entry, for titles and tables."""
    return f"{Path(str(r['checkpoint'])).stem} ({r.get('objective')})"


def plot_reliability(models: list[dict[str, Any]], path: str | Path) -> None:
    """Reliability diagrams of every model (and its temperature-scaled version when present) to ``path``.

    Args:
        models: report entries with ``"reliability"`` (bins ``{"lo", "hi", "confidence", "accuracy",
            "count"}``, confidences and accuracies in ``[0, 1]``, None for empty bins), ``"ece"``,
            ``"checkpoint"``, ``"objective"``, optionally ``"temperature_scaled"`` with the same keys.
        path: the PNG file to write.
    """
    plt = _pyplot()
    panels = [(r, key, COLORS[i % len(COLORS)]) for i, r in enumerate(models)
              for key in ("", "temperature_scaled") if not key or r.get(key)]
    fig, axes = plt.subplots(2, len(panels), figsize=(3.6 * len(panels), 4.6), sharex=True, sharey="row",
                             gridspec_kw={"height_ratios": [3, 1]}, squeeze=False)
    for i, (r, key, color) in enumerate(panels):
        src = r[key] if key else r
        bins = src["reliability"]
        n = max(1, sum(b["count"] for b in bins))
        full = [b for b in bins if b["count"]]
        centres = [(b["lo"] + b["hi"]) / 2 for b in full]
        widths = [(b["hi"] - b["lo"]) * 0.92 for b in full]
        acc = [b["accuracy"] for b in full]
        conf = [b["confidence"] for b in full]
        top, bottom = axes[0, i], axes[1, i]
        top.bar(centres, acc, widths, color=color, alpha=0.85, label="outputs")
        top.bar(centres, [c - a for c, a in zip(conf, acc)], widths, bottom=acc, color="#d62728", alpha=0.25,
                edgecolor="#d62728", hatch="//", label="gap")
        top.plot([0, 1], [0, 1], "--", color="gray", lw=1)
        top.set_title(f"{model_label(r)}{', T-scaled' if key else ''}\nECE {src['ece']:.3f}", fontsize=9)
        bottom.bar(centres, [b["count"] / n for b in full], widths, color=color, alpha=0.6)
        bottom.set_xlabel("confidence max p(y|x)")
        top.set_xlim(0, 1)
        top.set_ylim(0, 1)
    axes[0, 0].set_ylabel("accuracy")
    axes[1, 0].set_ylabel("share of images")
    axes[0, 0].legend(loc="upper left", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def plot_robustness(models: list[dict[str, Any]], path: str | Path) -> None:
    """Accuracy under attack versus eps, one panel per attack kind, to ``path`` (nothing without results).

    Args:
        models: report entries with ``"robustness"``: ``{"linf" | "l2" | "fgsm": [{"eps", "accuracy",
            "accuracy_refined"}, ...]}`` (eps in the ``[0, 1]`` pixel scale, accuracies in ``[0, 1]``).
        path: the PNG file to write.
    """
    keys = [k for k in _ATTACKS if any(r.get("robustness") and r["robustness"].get(k) for r in models)]
    if not keys:
        return
    plt = _pyplot()
    fig, axes = plt.subplots(1, len(keys), figsize=(4 * len(keys), 3.4), sharey=True, squeeze=False)
    for ax, k in zip(axes[0], keys):
        for j, r in enumerate(models):
            rows = (r.get("robustness") or {}).get(k) or []
            if not rows:
                continue
            xs, name, color = [row["eps"] for row in rows], Path(str(r["checkpoint"])).stem, COLORS[j % len(COLORS)]
            ax.plot(xs, [row["accuracy"] for row in rows], "o-", color=color, label=name)
            if any(row.get("accuracy_refined") is not None for row in rows):
                ax.plot(xs, [row.get("accuracy_refined") for row in rows], "s--", color=color, label=f"{name} refined")
        ax.set_title(_ATTACKS[k], fontsize=10)
        ax.set_xlabel("eps ([0, 1] pixel scale)")
        ax.set_ylim(0, 1.02)
        ax.grid(alpha=0.3)
    axes[0, 0].set_ylabel("accuracy")
    axes[0, 0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def plot_roc(models: list[dict[str, Any]], path: str | Path, score: str = "log_px", score_label: str = "") -> None:
    """ROC curves (in-distribution = positive) of ``score`` against every OOD set, one panel per model.

    Args:
        models: report entries with ``"_artifacts"["roc"]``: ``{set: {score: {"fpr": [...], "tpr": [...]}}}``
            and ``"ood"``: ``{set: {score: {"auroc": float}}}``; entries without curves are skipped.
        path: the PNG file to write (nothing is written when no entry has curves).
        score: the score's key (``"log_px"``, ``"max_prob"``, ``"neg_grad_norm"``).
        score_label: the score's name in the titles.
    """
    models = [r for r in models if r.get("_artifacts", {}).get("roc")]
    if not models:
        return
    plt = _pyplot()
    fig, axes = plt.subplots(1, len(models), figsize=(4 * len(models), 3.8), squeeze=False)
    for ax, r in zip(axes[0], models):
        for j, (name, c) in enumerate(r["_artifacts"]["roc"].items()):
            ax.plot(c[score]["fpr"], c[score]["tpr"], color=COLORS[j % len(COLORS)],
                    label=f"{name} {r['ood'][name][score]['auroc']:.3f}")
        ax.plot([0, 1], [0, 1], "--", color="gray", lw=1)
        ax.set_title(f"{model_label(r)}: ROC of {score_label or score}", fontsize=9)
        ax.set_xlabel("FPR (OOD accepted)")
        ax.set_ylabel("TPR")
        ax.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
