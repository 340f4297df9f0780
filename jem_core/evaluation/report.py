"""The evaluation report: every measurement of this package on one checkpoint (and a second one to
compare with), written as ``report.json`` + ``report.md`` + PNG plots (the ``evaluate`` CLI command is in cli.py).

``python -m jem_core evaluate --checkpoint checkpoints/mnist_jem.pt --compare checkpoints/mnist_baseline.pt
--data-root ../shared/data --out reports/mnist``

What is measured, per model (see the modules for the formulas and sources):

- calibration on the first ``n_test`` test images: accuracy, NLL, ECE, MCE, Brier, reliability bins,
  and the same after temperature scaling fitted on the *last* ``n_calib`` test images (disjoint);
- OOD detection: AUROC / AUPR / FPR@95TPR of three scores against every OOD set;
- robustness on the first ``n_attack`` test images: accuracy under L∞ / L2 PGD and FGSM over eps
  (``[0, 1]`` pixel scale), for the plain and the SGLD-refined classifier (attacked with BPDA + EOT);
- samples: class-conditional SGLD samples judged by the baseline classifier (accuracy and
  classifier-feature Fréchet distance).

``report.json`` (accuracies, ECE etc. in ``[0, 1]``; NLL in nats; eps in the ``[0, 1]`` pixel scale)::

    {"checkpoint", "dataset", "objective", "semi_supervised", "n_test",
     "accuracy", "nll", "ece", "mce", "brier", "reliability": [{"lo", "hi", "confidence", "accuracy", "count"}],
     "temperature_scaled": {"temperature", "n_calib", "accuracy", "nll", "ece", "mce", "brier", "reliability"},
     "ood": {SET: {"log_px" | "max_prob" | "neg_grad_norm": {"auroc", "aupr", "fpr95"}}},
     "ood_score_means": {"in_distribution" | SET: {SCORE: mean}}, "n_ood_in",
     "ood_stored": [file, ...] (only with store: the stored score tables, in-distribution first),
     "robustness": {"linf" | "l2" | "fgsm": [{"eps", "accuracy", "accuracy_refined",
                    "accuracy_refined_adaptive", "accuracy_refined_transfer"}]},
     "robustness_settings": {"n_attack", "attack_steps", "eps_scale", "refined"},
     "samples": {"conditional_accuracy", "classifier_fid", "classifier_fid_floor", "n_samples",
                 "n_reference", "steps", "init", "judge"},
     "seconds": {part: seconds},
     "compare": {... the same keys for the --compare model ...} or null,
     "ood_sets", "ood_set_sizes", "test_set_note", "settings", "seconds_total"}

A part left out with ``--skip`` has the value null.

What does not live here: the measurements (the sibling modules), the command's arguments
(:mod:`jem_core.cli`), the plots' drawing (:mod:`.figures`).
"""

from __future__ import annotations

import json
import math
import os
import time
from pathlib import Path
from typing import Any, Callable, Sequence

import torch

from ..checkpoint import LoadedCheckpoint, load_checkpoint
from ..data import SYNTHETIC_OOD, data_available, load_dataset
from ..errors import BadInput
from ..utils import predict_logits, rounded
from .calibration import calibration_report, fit_temperature
from .figures import model_label, plot_reliability, plot_robustness, plot_roc
from .ood import OOD_SCORES, SCORE_LABELS, is_known_ood_spec, load_ood_set, ood_metrics, ood_score_table, roc_curve_data
from .robustness import RefinedClassifier, default_eps, robustness_curve
from .samples import sample_quality

__all__ = ["EvalSettings", "evaluate_checkpoint", "write_report", "default_ood_sets", "REPORT_KEYS"]

REPORT_KEYS = ("checkpoint", "dataset", "n_test", "accuracy", "nll", "ece", "mce", "brier", "ood", "robustness", "samples")

# Real OOD datasets used by default when their files are present.
_DEFAULT_OOD_DATASETS = {"mnist": ["fashion_mnist"], "fashion_mnist": ["mnist"], "cifar10": ["svhn", "cifar100"],
                         "cifar100": ["svhn", "cifar10"], "svhn": ["cifar10"]}


def default_ood_sets(dataset: str, data_root: str | os.PathLike | None = None) -> list[str]:
    """The synthetic OOD sets plus the usual real OOD datasets for ``dataset`` whose files are present."""
    real = [s for s in _DEFAULT_OOD_DATASETS.get(dataset, []) if data_available(s, data_root, "test")]
    return real + list(SYNTHETIC_OOD)


class EvalSettings:
    """Settings of one evaluation run (plain attributes; see :func:`evaluate_checkpoint` for their meaning)."""

    def __init__(self, n_test: int = 5000, n_calib: int = 1000, n_ood: int = 2000, n_attack: int = 200,
                 attack_steps: int = 10, eps_linf: Sequence[float] | None = None, eps_l2: Sequence[float] | None = None,
                 eps_fgsm: Sequence[float] | None = None, attack_loss: str = "margin", refine_steps: int = 5,
                 refine_chains: int = 2,
                 refine_step_size: float = 1.0, refine_noise: float = 0.01, refine_gradient: str = "bpda",
                 n_per_class: int = 20,
                 sample_steps: int | None = 100, n_bins: int = 15, temperature: bool = True,
                 skip: Sequence[str] = (), seed: int = 0, batch_size: int = 250):
        checks = [(n_test >= 1, f"n_test must be >= 1; got {n_test}"), (n_calib >= 0, f"n_calib must be >= 0; got {n_calib}"),
                  (n_ood >= 1, f"n_ood must be >= 1; got {n_ood}"), (n_attack >= 1, f"n_attack must be >= 1; got {n_attack}"),
                  (attack_steps >= 1, f"attack steps must be >= 1; got {attack_steps}"),
                  (attack_loss in ("margin", "ce"), f"attack loss must be 'margin' or 'ce'; got {attack_loss!r}"),
                  (refine_steps >= 0, f"refine steps must be >= 0; got {refine_steps}"),
                  (refine_chains >= 1, f"refine chains must be >= 1; got {refine_chains}"),
                  (refine_gradient in ("bpda", "full"), f"refine gradient must be 'bpda' or 'full'; got {refine_gradient!r}"),
                  (n_per_class >= 1, f"samples per class must be >= 1; got {n_per_class}"),
                  (n_bins >= 1, f"n_bins must be >= 1; got {n_bins}"),
                  (set(skip) <= {"calibration", "ood", "robustness", "samples"},
                   f"skip may name calibration, ood, robustness, samples; got {list(skip)}")]
        for eps_list in (eps_linf, eps_l2, eps_fgsm):
            for e in eps_list or []:
                checks.append((e >= 0 and math.isfinite(e), f"eps values must be >= 0; got {e}"))
        for ok, msg in checks:
            if not ok:
                raise BadInput(msg)
        self.n_test, self.n_calib, self.n_ood, self.n_attack = int(n_test), int(n_calib), int(n_ood), int(n_attack)
        self.attack_steps, self.attack_loss = int(attack_steps), attack_loss
        self.eps_linf, self.eps_l2, self.eps_fgsm = eps_linf, eps_l2, eps_fgsm
        self.refine_steps, self.refine_chains = int(refine_steps), int(refine_chains)
        self.refine_step_size, self.refine_noise = float(refine_step_size), float(refine_noise)
        self.refine_gradient = refine_gradient
        self.n_per_class, self.sample_steps, self.n_bins = int(n_per_class), sample_steps, int(n_bins)
        self.temperature, self.skip, self.seed, self.batch_size = bool(temperature), tuple(skip), int(seed), int(batch_size)

    def as_dict(self) -> dict[str, Any]:
        """Plain dict (for report.json)."""
        return dict(vars(self), skip=list(self.skip))


class _Progress:
    """Splits one [0, 1] progress bar into weighted stages and reports stage names."""

    def __init__(self, weights: list[tuple[str, float]], progress: Callable[[float], None] | None,
                 log: Callable[[str], None] | None):
        self.total = sum(w for _, w in weights) or 1.0
        self.weights = dict(weights)
        self.done = 0.0
        self.progress, self.log = progress, log
        self.current: tuple[str, float] | None = None

    def stage(self, name: str) -> Callable[[float], None]:
        self.finish()
        w = self.weights.get(name, 0.0)
        self.current = (name, w)
        if self.log:
            self.log(name)
        base = self.done

        def report(frac: float) -> None:
            if self.progress:
                self.progress(min(1.0, (base + w * min(max(frac, 0.0), 1.0)) / self.total))
        return report

    def finish(self) -> None:
        if self.current is not None:
            self.done += self.current[1]
            self.current = None
            if self.progress:
                self.progress(min(1.0, self.done / self.total))


def _split_test(n_total: int, s: EvalSettings) -> tuple[int, int]:
    """(n_eval, n_calib): evaluation on the first n_eval, temperature fitting on the last n_calib (disjoint)."""
    n_calib = s.n_calib if s.temperature and "calibration" not in s.skip else 0
    if n_calib and n_total < s.n_test + n_calib:
        n_calib = min(n_calib, max(2, n_total // 4))
    n_eval = min(s.n_test, n_total - n_calib)
    if n_eval < 1:
        raise BadInput(f"the test set has only {n_total} images")
    return n_eval, n_calib


def _store_scores(model: torch.nn.Module, x: torch.Tensor, table: dict[str, torch.Tensor],
                  store: str | os.PathLike | None) -> str | None:
    """Save one OOD score table under its content address in ``store`` (:mod:`jem_core.report_store`); the file."""
    if store is None:
        return None
    from ..report_store import save_scores, scores_key

    return str(save_scores(table, store, scores_key(model, x)))


def _evaluate_model(ck: LoadedCheckpoint, test_x: torch.Tensor, test_y: torch.Tensor, calib: tuple | None,
                    ood_x: dict[str, torch.Tensor], judge: tuple[str, torch.nn.Module] | None, s: EvalSettings,
                    prog: _Progress, tag: str, store: str | os.PathLike | None = None) -> dict[str, Any]:
    model = ck.model
    m = ck.metadata
    res: dict[str, Any] = {"checkpoint": ck.path, "dataset": m.get("dataset"), "objective": m.get("objective"),
                           "semi_supervised": bool(m.get("semi_supervised", False)), "n_test": int(len(test_x))}
    times: dict[str, float] = {}
    art: dict[str, Any] = {}
    # -- calibration ------------------------------------------------------------------------------
    t0 = time.perf_counter()
    p = prog.stage(f"{tag}: calibration")
    logits = predict_logits(model, test_x, s.batch_size, p)
    rep = calibration_report(torch.softmax(logits, 1), test_y, s.n_bins)
    res.update(rep.summary())
    res["reliability"] = rep.bins_as_dicts()
    if calib is not None and "calibration" not in s.skip:
        cx, cy = calib
        t = fit_temperature(predict_logits(model, cx, s.batch_size), cy)
        rep_t = calibration_report(torch.softmax(logits / t, 1), test_y, s.n_bins)
        res["temperature_scaled"] = {"temperature": t, "n_calib": int(len(cx)), **rep_t.summary(),
                                     "reliability": rep_t.bins_as_dicts()}
    times["calibration"] = time.perf_counter() - t0
    # -- OOD ----------------------------------------------------------------------------------------
    if "ood" not in s.skip:
        t0 = time.perf_counter()
        p = prog.stage(f"{tag}: OOD scores")
        total = len(test_x[: s.n_ood]) + sum(len(v) for v in ood_x.values())
        done = [0]

        def sub(n: int) -> Callable[[float], None]:
            start = done[0]
            done[0] += n
            return lambda f: p((start + f * n) / max(1, total))

        x_in = test_x[: s.n_ood]
        s_in = ood_score_table(model, x_in, OOD_SCORES, s.batch_size, sub(len(x_in)))
        stored = [_store_scores(model, x_in, s_in, store)]
        res["ood"], res["ood_score_means"] = {}, {"in_distribution": {k: float(v.mean()) for k, v in s_in.items()}}
        art["roc"] = {}
        for name, xo in ood_x.items():
            s_out = ood_score_table(model, xo, OOD_SCORES, s.batch_size, sub(len(xo)))
            stored.append(_store_scores(model, xo, s_out, store))
            res["ood"][name] = {k: ood_metrics(s_in[k], s_out[k]) for k in OOD_SCORES}
            res["ood_score_means"][name] = {k: float(v.mean()) for k, v in s_out.items()}
            art["roc"][name] = {k: roc_curve_data(s_in[k], s_out[k], 100) for k in OOD_SCORES}
        res["n_ood_in"] = int(len(x_in))
        if store is not None:
            res["ood_stored"] = stored
        times["ood"] = time.perf_counter() - t0
    else:
        res["ood"] = None
    # -- robustness -----------------------------------------------------------------------------------
    if "robustness" not in s.skip:
        t0 = time.perf_counter()
        p = prog.stage(f"{tag}: robustness")
        side = int(test_x.shape[-1])
        eps = {"pgd_linf": list(s.eps_linf if s.eps_linf is not None else default_eps("linf", side)),
               "pgd_l2": list(s.eps_l2 if s.eps_l2 is not None else default_eps("l2", side)),
               "fgsm": list(s.eps_fgsm if s.eps_fgsm is not None else [e for e in default_eps("linf", side) if e > 0])}
        eps = {k: v for k, v in eps.items() if v}
        refined = RefinedClassifier(model, s.refine_steps, s.refine_chains, s.refine_step_size, s.refine_noise,
                                    s.refine_gradient, seed=s.seed) if s.refine_steps > 0 else None
        xa, ya = test_x[: s.n_attack], test_y[: s.n_attack]
        res["robustness"] = robustness_curve(model, xa, ya, eps, s.attack_steps, refined, batch_size=s.batch_size,
                                             progress=p, loss=s.attack_loss)
        for k in ("linf", "l2"):
            res["robustness"].setdefault(k, [])
        res["robustness_settings"] = {"n_attack": int(len(xa)), "attack_steps": s.attack_steps,
                                      "attack_loss": {"margin": "Carlini-Wagner margin", "ce": "cross-entropy"}[s.attack_loss],
                                      "eps_scale": "[0, 1] pixel scale (model inputs are [-1, 1]: model-space eps = 2 * eps)",
                                      "refined": refined.describe() if refined else None}
        times["robustness"] = time.perf_counter() - t0
    else:
        res["robustness"] = None
    # -- samples ----------------------------------------------------------------------------------------
    if "samples" not in s.skip and judge is not None:
        t0 = time.perf_counter()
        p = prog.stage(f"{tag}: samples")
        sq = sample_quality(ck, judge[1], test_x, s.n_per_class, s.sample_steps, s.seed, progress=p, keep_samples=True)
        art["samples"] = sq.pop("_samples")
        res["samples"] = {**sq, "judge": judge[0]}
        times["samples"] = time.perf_counter() - t0
    else:
        res["samples"] = None
    prog.finish()
    res["seconds"] = {k: round(v, 1) for k, v in times.items()}
    res["_artifacts"] = art
    return res


def evaluate_checkpoint(path: str | os.PathLike, data_root: str | os.PathLike | None = None,
                        ood_sets: Sequence[str] | None = None, compare: str | os.PathLike | None = None,
                        settings: EvalSettings | None = None, device: str | torch.device = "cpu",
                        progress: Callable[[float], None] | None = None, log: Callable[[str], None] | None = None,
                        store: str | os.PathLike | None = None, **kwargs: Any) -> dict[str, Any]:
    """Evaluate a checkpoint (and optionally a second one on the same data) on every measurement.

    Args:
        path: checkpoint to evaluate.
        data_root: torchvision data root (offline: nothing is downloaded).
        ood_sets: OOD set specs (synthetic names or dataset specs); default :func:`default_ood_sets`.
        compare: a second checkpoint of the same dataset and image shape (e.g. the baseline), evaluated
            the same way under ``"compare"``.
        settings: :class:`EvalSettings`; or pass its fields as keyword arguments (``n_test=1000``...).
            ``n_test`` test images for calibration (first ones); ``n_calib`` held-out test images (last
            ones) for temperature scaling; ``n_ood`` images per OOD set and of the in-distribution side;
            ``n_attack`` attacked images; eps lists in the ``[0, 1]`` pixel scale; ``refine_steps`` /
            ``refine_chains`` for the refined classifier (0 steps = none); ``n_per_class`` /
            ``sample_steps`` for the sample-quality check; ``skip`` names parts to leave out (their
            keys are then None).
        device: where the models run.
        progress: called with the overall fraction done in ``[0, 1]`` (for ``st.progress`` / tqdm).
        log: called with the name of each stage as it starts.
        store: a folder where every OOD score table (the in-distribution images' and each OOD set's, per
            model) is also saved under its content address (:func:`jem_core.report_store.save_scores`), where
            the app finds it; the files are listed under ``"ood_stored"`` (in-distribution first, then the sets).

    Returns:
        a dict with at least :data:`REPORT_KEYS` (layout in the module docstring), ``"settings"``,
        ``"ood_sets"``, ``"compare"`` (same keys, or None), and ``"_artifacts"`` entries (tensors and
        curves for plots; :func:`write_report` leaves keys starting with ``_`` out of report.json).
        Samples are judged by the baseline-objective model of the pair (else by the other model;
        without ``compare`` by the model itself, which is recorded in ``samples.judge``).

    Raises:
        CheckpointError: unreadable checkpoint; DataUnavailableError: test or OOD data missing;
        BadInput: bad settings, unknown OOD set, or checkpoints of different data shapes;
        ValueError: both ``settings`` and keyword settings given.
    """
    s = settings or EvalSettings(**kwargs)
    if settings is not None and kwargs:
        raise ValueError("pass either settings or keyword settings, not both")
    ck = load_checkpoint(path, device=device)
    ck2 = load_checkpoint(compare, device=device) if compare else None
    m = ck.metadata
    shape = (int(m["in_channels"]), int(m["image_size"]), int(m["n_classes"]))
    if ck2 is not None:
        m2 = ck2.metadata
        shape2 = (int(m2["in_channels"]), int(m2["image_size"]), int(m2["n_classes"]))
        if shape2 != shape or m2.get("dataset") != m.get("dataset"):
            raise BadInput(f"--compare checkpoint is for {m2.get('dataset')} {shape2} but {path} is for "
                           f"{m.get('dataset')} {shape}; compare models of the same dataset")
    dataset = str(m.get("dataset"))
    ood_sets = list(ood_sets) if ood_sets is not None else default_ood_sets(dataset, data_root)
    unknown = [o for o in ood_sets if not is_known_ood_spec(o)]
    if unknown:
        raise BadInput(f"unknown OOD set(s) {unknown}; use {', '.join(SYNTHETIC_OOD)} or a dataset spec")
    test = load_dataset(dataset, "test", data_root, download=False)
    if tuple(test.x.shape[1:]) != shape[:1] + (shape[1], shape[1]):
        raise BadInput(f"test images of {dataset} are {tuple(test.x.shape[1:])} but the model expects {shape[:2]}")
    n_eval, n_calib = _split_test(len(test), s)
    test_x, test_y = test.x[:n_eval], test.y[:n_eval]
    calib = (test.x[len(test) - n_calib:], test.y[len(test) - n_calib:]) if n_calib else None
    ood_x: dict[str, torch.Tensor] = {}
    if "ood" not in s.skip:
        for i, name in enumerate(ood_sets):
            ood_x[name] = load_ood_set(name, test_x[: s.n_ood], data_root, n=min(s.n_ood, len(test_x)), seed=s.seed + i)
    # Judges for the sample-quality check.
    models = [(str(path), ck)] + ([(str(compare), ck2)] if ck2 is not None else [])
    baselines = [(p_, c.model) for p_, c in models if c.metadata.get("objective") == "baseline"]

    def judge_for(i: int) -> tuple[str, torch.nn.Module]:
        if len(models) == 1:
            return f"{models[0][0]} (self: not an independent judge)", models[0][1].model
        if len(baselines) == 1:
            name, jm = baselines[0]
            return (name if name != models[i][0] else f"{name} (self: not an independent judge)"), jm
        other = models[1 - i]
        return other[0], other[1].model

    # Stage weights: rough relative costs, for a smooth progress bar.
    n_ood_imgs = min(s.n_ood, n_eval) + sum(len(v) for v in ood_x.values())
    n_eps = sum(len(v) for v in (s.eps_linf or default_eps("linf", shape[1]), s.eps_l2 or default_eps("l2", shape[1]),
                                 s.eps_fgsm or default_eps("linf", shape[1])[1:]))
    w_rob = n_eps * min(s.n_attack, n_eval) * s.attack_steps * (1 + s.refine_steps * s.refine_chains) / 10
    weights = []
    for tag, _ in models:
        weights += [(f"{tag}: calibration", n_eval / 20), (f"{tag}: OOD scores", n_ood_imgs / 4),
                    (f"{tag}: robustness", 0 if "robustness" in s.skip else w_rob),
                    (f"{tag}: samples", 0 if "samples" in s.skip else shape[2] * s.n_per_class * (s.sample_steps or 100) / 4)]
    prog = _Progress(weights, progress, log)
    t_start = time.perf_counter()
    results = [_evaluate_model(c, test_x, test_y, calib, ood_x, judge_for(i), s, prog, tag, store)
               for i, (tag, c) in enumerate(models)]
    out = results[0]
    out["compare"] = results[1] if len(results) > 1 else None
    out["ood_sets"] = list(ood_x)
    out["ood_set_sizes"] = {k: int(len(v)) for k, v in ood_x.items()}
    out["test_set_note"] = test.note
    out["settings"] = s.as_dict()
    out["seconds_total"] = round(time.perf_counter() - t_start, 1)
    return out


# ---------------------------------------------------------------------------------------------------
# Writing: report.json, report.md, PNG plots (matplotlib, in figures.py).
# ---------------------------------------------------------------------------------------------------


def _fmt(v: Any, nd: int = 3) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return "nan" if v != v else f"{v:.{nd}f}"
    return str(v)


def _markdown(result: dict, files: dict[str, str], command: str | None) -> str:
    models = [result] + ([result["compare"]] if result.get("compare") else [])
    names = [model_label(r) for r in models]
    st = result["settings"]
    L = [f"# Evaluation report: {Path(str(result['checkpoint'])).name}", ""]
    if command:
        L += ["Command:", "", "```", command, "```", ""]
    L += [f"- dataset: `{result['dataset']}` (test split{'; ' + result['test_set_note'] if result.get('test_set_note') else ''}); "
          f"models: " + ", ".join(f"`{r['checkpoint']}` ({r.get('objective')}"
                                     f"{', semi-supervised' if r.get('semi_supervised') else ''})" for r in models),
          f"- calibration and accuracy on the first {result['n_test']} test images"
          + (f"; temperature fitted on the last {result['temperature_scaled']['n_calib']} (disjoint)"
             if result.get("temperature_scaled") else "") + f"; {st['n_bins']} equal-width bins",
          f"- total time {result.get('seconds_total', '?')} s", ""]
    # Calibration
    L += ["## Calibration", "", "| model | accuracy | NLL | ECE | MCE | Brier |", "|---|---|---|---|---|---|"]
    for r, n in zip(models, names):
        L.append(f"| {n} | {_fmt(r['accuracy'], 4)} | {_fmt(r['nll'], 4)} | {_fmt(r['ece'], 4)} | {_fmt(r['mce'], 4)} | {_fmt(r['brier'], 4)} |")
        t = r.get("temperature_scaled")
        if t:
            L.append(f"| {n}, temperature-scaled (T = {t['temperature']:.3f}) | {_fmt(t['accuracy'], 4)} | {_fmt(t['nll'], 4)} | "
                     f"{_fmt(t['ece'], 4)} | {_fmt(t['mce'], 4)} | {_fmt(t['brier'], 4)} |")
    if "reliability" in files:
        L += ["", f"![reliability diagrams]({files['reliability']})"]
    L.append("")
    # OOD
    if result.get("ood"):
        L += ["## OOD detection", "",
              f"In-distribution: the first {result.get('n_ood_in', '?')} test images (positive class); OOD sets: "
              + ", ".join(f"`{k}` ({v})" for k, v in result.get("ood_set_sizes", {}).items())
              + ". Higher score = more in-distribution.", "",
              "| OOD set | score | " + " | ".join(f"AUROC {n}" for n in names) + " | "
              + " | ".join(f"AUPR {n}" for n in names) + " | " + " | ".join(f"FPR@95TPR {n}" for n in names) + " |",
              "|---|---|" + "---|" * (3 * len(models))]
        for name in result["ood"]:
            for sc in OOD_SCORES:
                vals = [[(r.get("ood") or {}).get(name, {}).get(sc, {}).get(k) for r in models] for k in ("auroc", "aupr", "fpr95")]
                label = SCORE_LABELS[sc].replace("|", "\\|")  # a bare | would split the table cell
                L.append(f"| {name} | {label} | " + " | ".join(_fmt(v) for vs in vals for v in vs) + " |")
        if "roc" in files:
            L += ["", f"![ROC curves]({files['roc']})"]
        L.append("")
    # Robustness
    if result.get("robustness"):
        rs = result.get("robustness_settings", {})
        L += ["## Adversarial robustness", "",
              f"Attacked subset: the first {rs.get('n_attack')} test images; untargeted, {rs.get('attack_loss', 'margin')} loss, "
              f"{rs.get('attack_steps')} PGD steps (captum), eps in the **[0, 1] pixel scale** (model inputs are "
              f"[-1, 1], so the model-space radius is 2 eps). Refined classifier: {rs.get('refined') or 'not run'}; "
              "it counts as correct on an image only if it survives both that adaptive attack and the plain "
              "classifier's adversarial image (per-example worst case; the two parts are in report.json).", ""]
        for key, title in (("linf", "PGD L∞"), ("l2", "PGD L2"), ("fgsm", "FGSM (L∞)")):
            if not result["robustness"].get(key):
                continue
            L += [f"### {title}", "", "| eps | " + " | ".join(f"{n} | {n} refined" for n in names) + " |",
                  "|---|" + "---|---|" * len(models)]
            for i, row in enumerate(result["robustness"][key]):
                cells = []
                for r in models:
                    rr = (r.get("robustness") or {}).get(key, [])
                    rr = rr[i] if i < len(rr) else {}
                    cells += [_fmt(rr.get("accuracy")), _fmt(rr.get("accuracy_refined"))]
                L.append(f"| {row['eps']:g} | " + " | ".join(cells) + " |")
            L.append("")
        if "robustness" in files:
            L += [f"![robustness curves]({files['robustness']})", ""]
    # Samples
    if result.get("samples"):
        L += ["## Samples", "",
              "Class-conditional SGLD samples on E(x, y), judged by a classifier: its accuracy on them, and the Fréchet "
              "distance between its penultimate features of the samples and of test images (lower is better; the "
              "floor is the distance between two disjoint test sets of the same size).", "",
              "| model | judge | samples | SGLD steps (init) | conditional accuracy | classifier FID | FID floor |",
              "|---|---|---|---|---|---|---|"]
        for r, n in zip(models, names):
            sq = r.get("samples")
            if sq:
                L.append(f"| {n} | `{sq['judge']}` | {sq['n_samples']} | {sq['steps']} ({sq['init']}) | "
                         f"{_fmt(sq['conditional_accuracy'])} | {_fmt(sq['classifier_fid'], 2)} | {_fmt(sq['classifier_fid_floor'], 2)} |")
        for r in models:
            key = f"samples_{Path(str(r['checkpoint'])).stem}"
            if key in files:
                L += ["", f"{model_label(r)} (one row per class):", "", f"![samples]({files[key]})"]
        L.append("")
    L += ["## Time per part (seconds)", "", "| model | " + " | ".join(["calibration", "ood", "robustness", "samples"]) + " |",
          "|---|---|---|---|---|"]
    for r, n in zip(models, names):
        L.append(f"| {n} | " + " | ".join(_fmt(r.get("seconds", {}).get(k), 1) for k in ("calibration", "ood", "robustness", "samples")) + " |")
    L.append("")
    return "\n".join(L)


def _strip_private(v: Any) -> Any:
    if isinstance(v, dict):
        return {k: _strip_private(x) for k, x in v.items() if not str(k).startswith("_")}
    if isinstance(v, list):
        return [_strip_private(x) for x in v]
    return v


def write_report(result: dict[str, Any], out_dir: str | os.PathLike, command: str | None = None,
                 plots: bool = True) -> dict[str, Path]:
    """Write ``report.json``, ``report.md`` and PNG plots (reliability, ROC, robustness, sample grids).

    Args:
        result: from :func:`evaluate_checkpoint`.
        out_dir: folder (created).
        command: the command line that produced the result (quoted in report.md).
        plots: draw the PNG files.

    Returns:
        ``{"json": path, "markdown": path, <plot name>: path, ...}``.
    """
    from ..images import save_grid_png

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    models = [result] + ([result["compare"]] if result.get("compare") else [])
    files: dict[str, str] = {}
    if plots:
        plot_reliability(models, out / "reliability.png")
        files["reliability"] = "reliability.png"
        if any(r.get("_artifacts", {}).get("roc") for r in models):
            plot_roc(models, out / "ood_roc.png", "log_px", SCORE_LABELS["log_px"])
            files["roc"] = "ood_roc.png"
        if any(r.get("robustness") for r in models):
            plot_robustness(models, out / "robustness.png")
            files["robustness"] = "robustness.png"
        for r in models:
            smp = r.get("_artifacts", {}).get("samples")
            if smp is not None:
                name = f"samples_{Path(str(r['checkpoint'])).stem}"
                side = smp["x"].shape[-1]
                if tuple(smp["x"].shape[1:]) == (2, 1, 1):  # 2-D points (toy: datasets): a scatter plot
                    from ..toy import save_points_png

                    save_points_png(smp["x"], out / f"{name}.png")
                else:
                    save_grid_png(smp["x"], out / f"{name}.png",
                                  nrow=len(smp["x"]) // max(1, int(smp["y"].max()) + 1), scale=max(1, 56 // side))
                files[name] = f"{name}.png"
    data = rounded(_strip_private(result), 6)
    (out / "report.json").write_text(json.dumps(data, indent=1) + "\n")
    (out / "report.md").write_text(_markdown(data, files, command))
    return {"json": out / "report.json", "markdown": out / "report.md", **{k: out / v for k, v in files.items()}}
