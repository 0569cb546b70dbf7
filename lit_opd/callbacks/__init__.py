"""Callbacks that work with any lit_opd method. EffOPD's live in its home,
:mod:`lit_opd.methods.eff_opd`, and are re-exported here."""

from lit_opd.callbacks.health import AtomicCheckpointIO, HealthGuard
from lit_opd.callbacks.report import AccuracyReport
from lit_opd.methods.eff_opd import EffOPDCallback, UpdateDynamicsCallback

__all__ = ["AccuracyReport", "AtomicCheckpointIO", "EffOPDCallback", "HealthGuard", "UpdateDynamicsCallback"]
