"""Regulators: interventions against modality imbalance, one file per method, one base class."""

from .base import Regulator, all_reduce_sum, check_composition, encoder_parameters
from .inforeg import InfoReg
from .mmpareto import MMPareto, pareto_combine
from .ogm import OGM, ogm_coefficients
from .opm import OPM, opm_drop_probability
from .relearning import Relearning
from .valuation import ValuationResampling, extra_copies

__all__ = ["Regulator", "InfoReg", "Relearning", "OGM", "OPM", "MMPareto", "ValuationResampling",
           "ogm_coefficients", "opm_drop_probability", "pareto_combine", "extra_copies",
           "all_reduce_sum", "check_composition", "encoder_parameters"]
