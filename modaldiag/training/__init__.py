"""Training: the reference loop ``fit``, its hook points and the ``History`` it records."""

from .callbacks import Callback, StepContext
from .fit import default_optimizer, fit, train_one_epoch
from .history import History

__all__ = ["fit", "History", "Callback", "StepContext", "default_optimizer", "train_one_epoch"]
