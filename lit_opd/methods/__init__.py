"""Methods, each a LightningModule sharing the RolloutDataModule."""

from lit_opd.methods.base import PolicyModule
from lit_opd.methods.list_opd import ListOPDModule
from lit_opd.methods.opd import OPDModule
from lit_opd.methods.sft import SFTModule

__all__ = ["PolicyModule", "OPDModule", "SFTModule", "ListOPDModule"]
