"""Regulators: interventions against modality imbalance, one file per method, one base class."""

from .agm import AGM, agm_coefficients, shapley_matrix, shapley_outputs
from .amco import AMCo, amco_schedule, joint_softmax_mass
from .base import Regulator, all_reduce_sum, check_composition, encoder_parameters
from .cml import CML, cml_all_pairs_loss, cml_chain_loss
from .dropout import ModalityDropout, expected_drop_rate
from .gblending import GBlending, gblending_weights
from .greedy import Greedy
from .inforeg import InfoReg
from .lfm import LFM, lfm_alignment, lfm_fitted_alpha
from .mbsd import MBSD, mbsd_pair_terms
from .mla import MLA, mla_fusion_weights, mla_project_gradient, mla_projector_update, mla_step_size
from .mmcosine import MMCosine, nce_loss
from .mmpareto import MMPareto, pareto_combine
from .ogm import OGM, ogm_coefficients, released_unimodal_logits
from .opm import OPM, opm_drop_probability, opm_released_theta
from .pmr import PMR, pmr_coefficients, prototype_log_probs
from .reconboost import ReconBoost, reconboost_boost_loss, reconboost_ga, reconboost_schedule
from .relearning import Relearning
from .umt import UME, UMT, choose_umt_or_ume, ume_combine, umt_distillation_loss
from .valuation import ValuationResampling, extra_copies

__all__ = ["Regulator", "InfoReg", "Relearning", "OGM", "OPM", "MMPareto", "ValuationResampling",
           "AGM", "PMR", "MMCosine", "MBSD", "CML", "LFM", "GBlending", "AMCo",
           "ogm_coefficients", "opm_drop_probability", "released_unimodal_logits",
           "opm_released_theta", "pareto_combine", "extra_copies",
           "all_reduce_sum", "check_composition", "encoder_parameters",
           "agm_coefficients", "shapley_matrix", "shapley_outputs", "pmr_coefficients",
           "prototype_log_probs", "nce_loss", "mbsd_pair_terms", "cml_chain_loss",
           "cml_all_pairs_loss", "lfm_alignment", "lfm_fitted_alpha", "gblending_weights",
           "amco_schedule", "joint_softmax_mass", "ReconBoost", "reconboost_boost_loss",
           "reconboost_ga", "reconboost_schedule", "MLA", "mla_fusion_weights",
           "mla_project_gradient", "mla_projector_update", "mla_step_size", "UMT", "UME",
           "choose_umt_or_ume", "ume_combine", "umt_distillation_loss", "ModalityDropout",
           "expected_drop_rate", "Greedy"]
