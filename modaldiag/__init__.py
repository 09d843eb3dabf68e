"""modaldiag: diagnose and repair modality imbalance in multimodal PyTorch models.

>>> import modaldiag as md
>>> data = md.datasets.load("mfeat-fou-pix")
>>> model = md.models.default_model(data)
>>> history = md.fit(model, data.train.loader(64, shuffle=True), data.val.loader(256), epochs=20)
"""

from . import datasets, models, probes, regulators, report, training
from ._version import __version__
from .benchmark import BenchmarkResult, benchmark
from .models import MidFusionClassifier, MultimodalClassifier, MultimodalModel, wrap
from .probes import (
    Diagnosis,
    RobustnessResult,
    diagnose,
    fisher_trace,
    learning_window,
    robustness,
    separability,
    shapley,
    unimodal_scores,
)
from .regulators import (
    AGM,
    CML,
    LFM,
    MBSD,
    MLA,
    OGM,
    OPM,
    PMR,
    UME,
    UMT,
    AMCo,
    GBlending,
    Greedy,
    InfoReg,
    MMCosine,
    MMPareto,
    ModalityDropout,
    ReconBoost,
    Regulator,
    Relearning,
    ValuationResampling,
)
from .report import plots as plot
from .training import Callback, History, Regulation, StepContext, fit
from .utils.threads import set_threads

__all__ = ["MultimodalClassifier", "MultimodalModel", "wrap", "datasets", "models", "probes",
           "regulators", "training", "report", "plot", "fit", "History", "Callback", "StepContext",
           "Regulation", "unimodal_scores", "shapley", "fisher_trace", "separability", "diagnose",
           "Diagnosis", "learning_window", "Regulator", "InfoReg", "Relearning", "OGM", "OPM",
           "MMPareto", "ValuationResampling", "AGM", "PMR", "MMCosine", "MBSD", "CML", "LFM",
           "GBlending", "AMCo", "ReconBoost", "MLA", "UMT", "UME", "ModalityDropout", "Greedy",
           "MidFusionClassifier", "robustness", "RobustnessResult", "benchmark", "BenchmarkResult",
           "set_threads", "__version__"]
