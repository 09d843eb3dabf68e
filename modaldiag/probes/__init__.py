"""Probes: measure what each modality contributes and learns (read-only, no training).

Every probe runs in eval mode and leaves the model (every submodule's mode, ``requires_grad``,
``.grad``, buffers) and the global python / numpy / torch RNG states exactly as found. Absence
(for unimodal scores and Shapley values) is the model's stored baseline unless a call overrides
it with ``baseline="zero"`` or ``"mean"``; every result records the kind it used.
"""

from .conditional import (
    ConditionalUtilization,
    conditional_utilization,
    conditional_utilization_rates,
    utilization_difference,
)
from .diagnose import (
    Diagnosis,
    Evidence,
    ShapleySummary,
    combine,
    diagnose,
    split_of,
    under_optimisation,
)
from .fisher import (
    FISHER_ENGINES,
    FISHER_FORMS,
    FisherTrace,
    encoder_grad_sq_norms,
    fisher_trace,
    grad_sq_norms,
)
from .recommend import METHOD_PAGES, recommend
from .robustness import CORRUPTIONS, RobustnessResult, robustness, robustness_auc
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
from .verdict import ProbeIntervals, Verdict, bootstrap_intervals, decide, seed_intervals
from .window import LearningWindow, learning_window, window_state

__all__ = [
    "shapley", "shapley_to_disk", "ShapleyValues", "VALUE_FUNCTIONS", "coalition_masks", "shapley_weights",
    "fisher_trace", "FisherTrace", "FISHER_FORMS", "FISHER_ENGINES", "grad_sq_norms",
    "encoder_grad_sq_norms",
    "learning_window", "LearningWindow", "window_state",
    "separability", "Separability", "purity", "collect_features", "linear_probe_accuracy",
    "unimodal_scores", "UnimodalScore", "evaluate", "EvalResult", "ogm_ratio", "inforeg_gap",
    "diagnose", "Diagnosis", "Evidence", "under_optimisation",
    "ShapleySummary", "split_of", "recommend", "METHOD_PAGES", "ProbeIntervals", "Verdict",
    "bootstrap_intervals", "decide", "combine", "seed_intervals",
    "robustness", "RobustnessResult", "robustness_auc", "CORRUPTIONS",
    "conditional_utilization", "ConditionalUtilization", "conditional_utilization_rates",
    "utilization_difference",
]
