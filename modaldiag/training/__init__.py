"""Training: the reference loop ``fit``, its hook points and the ``History`` it records."""

from .callbacks import Callback, StepContext
from .fit import default_optimizer, fit
from .history import History
from .loop import CallOrderError, Regulation, check_optimizer
from .monitor import FisherMonitor
from .speed import ConditionalSpeedMonitor

__all__ = ["fit", "History", "Callback", "StepContext", "Regulation", "default_optimizer",
           "FisherMonitor", "CallOrderError", "check_optimizer",
           "ConditionalSpeedMonitor"]
