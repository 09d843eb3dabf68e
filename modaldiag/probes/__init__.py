"""Probes: measure what each modality contributes and learns (read-only, no training)."""

from .unimodal import EvalResult, UnimodalScore, evaluate, inforeg_gap, ogm_ratio, unimodal_scores

__all__ = ["UnimodalScore", "EvalResult", "evaluate", "unimodal_scores", "ogm_ratio", "inforeg_gap"]
