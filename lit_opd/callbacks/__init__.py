"""Callbacks that work with any lit_opd method."""

from lit_opd.callbacks.eff_opd import EffOPDCallback
from lit_opd.callbacks.report import AccuracyReport
from lit_opd.callbacks.update_dynamics import UpdateDynamicsCallback

__all__ = ["AccuracyReport", "EffOPDCallback", "UpdateDynamicsCallback"]
