"""Standard on-policy distillation (GKD divergences, Tinker / G-OPD sampled-token rewards)."""

from lit_opd.methods.opd.module import OPDModule

__all__ = ["OPDModule"]
