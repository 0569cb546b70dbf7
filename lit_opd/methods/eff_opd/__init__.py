"""EffOPD: extrapolate the student's weights along their recent update, kept only while held-out
accuracy improves; plus the update-dynamics diagnostics that say whether it can pay off."""

from lit_opd.methods.eff_opd.callback import EffOPDCallback
from lit_opd.methods.eff_opd.dynamics import UpdateDynamicsCallback

__all__ = ["EffOPDCallback", "UpdateDynamicsCallback"]
