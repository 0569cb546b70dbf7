"""Callbacks that work with any lit_opd method (and any LightningModule that logs the same terms).
EffOPD's callbacks live in their method's home, :mod:`lit_opd.methods.eff_opd` (also ``lit_opd.EffOPDCallback``)."""

from lit_opd.callbacks.checkpoint_io import AtomicCheckpointIO
from lit_opd.callbacks.collapse import CollapseWatch, TrainingCollapsed
from lit_opd.callbacks.health import HealthGuard
from lit_opd.callbacks.progress import StepProgressBar
from lit_opd.callbacks.report import AccuracyReport, RunSummary

__all__ = [
    "AccuracyReport", "AtomicCheckpointIO", "CollapseWatch", "HealthGuard", "RunSummary", "StepProgressBar",
    "TrainingCollapsed",
]
