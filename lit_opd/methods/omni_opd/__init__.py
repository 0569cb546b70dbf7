"""OmniOPD: logit-free on-policy distillation from a teacher that is only asked for text (the
peak-entropy picker, the similarity registry, the chunk objective and the module; README.md here)."""

from lit_opd.methods.omni_opd.audits import pick_audits, repetition_loops
from lit_opd.methods.omni_opd.group import GroupVerification, standardized_advantages
from lit_opd.methods.omni_opd.module import OmniOPDModule
from lit_opd.methods.omni_opd.objective import SpeculativeVerification, anchor_kl, posterior_target
from lit_opd.methods.omni_opd.similarity import (
    SIMILARITIES, edit_similarity, resolve_similarity, semantic_count,
)

__all__ = [
    "OmniOPDModule", "SpeculativeVerification", "GroupVerification", "standardized_advantages", "SIMILARITIES", "anchor_kl",
    "edit_similarity", "pick_audits", "posterior_target", "repetition_loops", "resolve_similarity",
    "semantic_count",
]
