"""Supervised fine-tuning on the reference answers: the baseline and the warm start."""

from lit_opd.methods.sft.module import SFTModule

__all__ = ["SFTModule"]
