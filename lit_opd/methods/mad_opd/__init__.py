"""MAD-OPD: on-policy distillation from a group of teachers (routed, fixed weights, or a blind debate
whose confidences weight them). Its home holds the module, the debate, the weight and loss math; see
README.md here."""

from lit_opd.methods.mad_opd.debate import DebatePrompts, DebateSettings, last_confidence, run_debate
from lit_opd.methods.mad_opd.module import MADOPDModule
from lit_opd.methods.mad_opd.weights import confidence_weights, fixed_weights, mix, reduce_samples

__all__ = [
    "MADOPDModule", "DebatePrompts", "DebateSettings", "last_confidence", "run_debate", "confidence_weights",
    "fixed_weights", "mix", "reduce_samples",
]
