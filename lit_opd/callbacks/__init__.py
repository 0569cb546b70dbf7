"""Callbacks that work with any lit_opd method."""

from lit_opd.callbacks.report import AccuracyReport

__all__ = ["AccuracyReport"]
