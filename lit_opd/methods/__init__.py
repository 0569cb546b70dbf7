"""Methods, one home each (module, own math, config defaults, README), sharing the
RolloutDataModule and :class:`~lit_opd.methods.base.PolicyModule`."""

from lit_opd.methods.base import PolicyModule
from lit_opd.methods.eff_opd import EffOPDCallback, UpdateDynamicsCallback
from lit_opd.methods.list_opd import ListOPDModule
from lit_opd.methods.mad_opd import MADOPDModule
from lit_opd.methods.omni_opd import OmniOPDModule
from lit_opd.methods.opd import OPDModule
from lit_opd.methods.sft import SFTModule

__all__ = [
    "PolicyModule", "OPDModule", "SFTModule", "ListOPDModule", "OmniOPDModule", "EffOPDCallback",
    "UpdateDynamicsCallback", "MADOPDModule",
]
