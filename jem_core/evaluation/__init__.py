"""Evaluation of JEMs and baseline classifiers: calibration, OOD detection, adversarial robustness,
attributions, sample quality, and the ``evaluate`` report (CLI and dashboard).

Modules (each importable on its own; nothing here imports streamlit or plotting libraries for pages):

- :mod:`.calibration`: ECE / MCE, NLL, Brier score, reliability bins, temperature scaling;
- :mod:`.ood`: OOD scores (``log p(x)``, ``max p(y|x)``, ``-||∇x log p(x)||``), AUROC / AUPR / FPR@95TPR, OOD sets;
- :mod:`.robustness`: PGD (L∞ / L2) and FGSM via captum, the SGLD-refined classifier (BPDA + EOT);
- :mod:`.attribution`: captum Saliency / Integrated Gradients / Noise Tunnel maps for a class or the energy;
- :mod:`.samples`: class-conditional sample accuracy and classifier-feature Fréchet distance;
- :mod:`.report`: :func:`~.report.evaluate_checkpoint`, :func:`~.report.write_report`, the CLI command.

What does not live here: the energies and samplers they measure (:mod:`jem_core.energy`,
:mod:`jem_core.sampling`) and the dashboard's figures (``app/figures.py``).
"""

from .attribution import attribution_maps
from .calibration import CalibrationReport, TemperatureScaled, calibration_report, fit_temperature, predict_logits, predict_proba
from .ood import OOD_SCORES, load_ood_set, ood_metrics, ood_score_table, ood_scores, roc_curve_data
from .robustness import RefinedClassifier, attack, robustness_curve
from .samples import classifier_fid, conditional_samples, sample_quality

__all__ = ["attribution_maps", "CalibrationReport", "TemperatureScaled", "calibration_report", "fit_temperature",
           "predict_logits", "predict_proba", "OOD_SCORES", "load_ood_set", "ood_metrics", "ood_score_table",
           "ood_scores", "roc_curve_data", "RefinedClassifier", "attack", "robustness_curve", "classifier_fid",
           "conditional_samples", "sample_quality"]
