"""Probes: measure what each modality contributes and learns (read-only, no training)."""

from .diagnose import Diagnosis, Evidence, diagnose, under_optimisation
from .fisher import FISHER_FORMS, FisherMonitor, fisher_trace, grad_sq_norms
from .separability import (
    Separability,
    collect_features,
    linear_probe_accuracy,
    purity,
    separability,
)
from .shapley import (
    VALUE_FUNCTIONS,
    ShapleyValues,
    coalition_masks,
    shapley,
    shapley_to_disk,
    shapley_weights,
)
from .unimodal import EvalResult, UnimodalScore, evaluate, inforeg_gap, ogm_ratio, unimodal_scores
from .window import LearningWindow, learning_window, window_state

__all__ = [
    "shapley", "shapley_to_disk", "ShapleyValues", "VALUE_FUNCTIONS", "coalition_masks", "shapley_weights",
    "fisher_trace", "FisherMonitor", "FISHER_FORMS", "grad_sq_norms",
    "learning_window", "LearningWindow", "window_state",
    "separability", "Separability", "purity", "collect_features", "linear_probe_accuracy",
    "unimodal_scores", "UnimodalScore", "evaluate", "EvalResult", "ogm_ratio", "inforeg_gap",
    "diagnose", "Diagnosis", "Evidence", "under_optimisation",
]
