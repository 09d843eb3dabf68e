"""Figures and reports, built from result objects and History only."""

from . import diagnosis, html, plots

__all__ = ["plots", "html", "diagnosis"]
