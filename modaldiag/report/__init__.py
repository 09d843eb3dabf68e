"""Figures and reports, built from result objects and History only."""

from . import plots

__all__ = ["plots"]
