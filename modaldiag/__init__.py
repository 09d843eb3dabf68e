"""modaldiag: diagnose and repair modality imbalance in multimodal PyTorch models.

>>> import modaldiag as md
>>> data = md.datasets.load("mfeat-fou-pix")
>>> model = md.models.default_model(data)
>>> history = md.fit(model, data.train.loader(64, shuffle=True), data.val.loader(256), epochs=20)
"""

from . import datasets, models, probes, regulators, report, training
from .models import MultimodalClassifier, MultimodalModel, wrap
from .probes import (
    diagnose,
    fisher_trace,
    learning_window,
    separability,
    shapley,
    unimodal_scores,
)
from .regulators import OGM, OPM, InfoReg, MMPareto, Regulator, Relearning, ValuationResampling
from .report import plots as plot
from .training import Callback, History, Regulation, StepContext, fit

__version__ = "0.1.0"

__all__ = ["MultimodalClassifier", "MultimodalModel", "wrap", "datasets", "models", "probes",
           "training", "report", "plot", "fit", "History", "Callback", "StepContext",
           "unimodal_scores", "shapley", "fisher_trace", "separability", "diagnose",
           "learning_window", "regulators", "Regulator", "InfoReg", "Relearning", "OGM", "OPM",
           "MMPareto", "ValuationResampling", "Regulation", "__version__"]
