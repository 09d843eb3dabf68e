"""Regulators: interventions against modality imbalance, one file per method, one base class."""

from .base import Regulator, all_reduce_sum, check_composition, encoder_parameters
from .inforeg import InfoReg
from .mmpareto import MMPareto, pareto_combine
from .ogm import OGM, ogm_coefficients, released_unimodal_logits
from .opm import OPM, opm_drop_probability, opm_released_theta
from .relearning import Relearning
from .valuation import ValuationResampling, extra_copies

__all__ = ["Regulator", "InfoReg", "Relearning", "OGM", "OPM", "MMPareto", "ValuationResampling",
           "ogm_coefficients", "opm_drop_probability", "released_unimodal_logits",
           "opm_released_theta", "pareto_combine", "extra_copies",
           "all_reduce_sum", "check_composition", "encoder_parameters"]
