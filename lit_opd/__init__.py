"""lit_opd: on-policy distillation of language models as PyTorch Lightning parts.

Data flow of one step: prompts (RolloutDataModule) → rollout with the current student →
teacher scoring → divergence / sampled-token objective → optimizer step.
"""

from lit_opd.callbacks import AccuracyReport, CollapseWatch, HealthGuard, RunSummary, StepProgressBar
from lit_opd.errors import NonFiniteError, TeacherUnreachable, UserError
from lit_opd.methods import ListOPDModule, MADOPDModule, OmniOPDModule, OPDModule, PolicyModule, SFTModule
from lit_opd.methods.eff_opd import EffOPDCallback, UpdateDynamicsCallback
from lit_opd.methods.list_opd import (
    BaseRelativeClip, CalibrationReport, calibrate, lambda_star, lambda_star_kary, q_star,
)
from lit_opd.models import ModelSpec
from lit_opd.objectives import Divergence, Objective, SampledReward
from lit_opd.rollout import (
    ExactMatch, HFDatasetPrompts, JsonlPrompts, ListPrompts, MathVerify, RegexMatch, RolloutDataModule,
    TaskPrompts, TurnPrompts, Verifier,
)
from lit_opd.rollout.evaluation import Evaluation
from lit_opd.teachers import APITeacher, HFTeacher, HFTextTeacher, ServerTeacher, Teacher, TeacherGroup
from lit_opd.types import RolloutBatch, SamplingParams, TeacherCapability, TeacherOutput

__version__ = "0.1.0"

__all__ = [
    "OPDModule", "OmniOPDModule", "MADOPDModule", "ListOPDModule", "SFTModule", "PolicyModule", "ModelSpec",
    "RolloutDataModule", "JsonlPrompts", "ListPrompts", "TaskPrompts", "TurnPrompts", "HFDatasetPrompts",
    "Verifier", "ExactMatch", "RegexMatch", "MathVerify", "Evaluation", "HFTeacher", "ServerTeacher",
    "APITeacher", "HFTextTeacher", "Teacher", "TeacherGroup", "RolloutBatch", "SamplingParams",
    "TeacherCapability", "TeacherOutput", "Objective", "Divergence", "SampledReward", "BaseRelativeClip",
    "lambda_star", "lambda_star_kary", "q_star", "calibrate", "CalibrationReport", "AccuracyReport",
    "CollapseWatch", "RunSummary", "StepProgressBar", "HealthGuard", "EffOPDCallback",
    "UpdateDynamicsCallback",
    "UserError", "NonFiniteError", "TeacherUnreachable",
]
