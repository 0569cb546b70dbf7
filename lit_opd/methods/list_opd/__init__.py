"""ListOPD: G-OPD kept below the extrapolation cliff λ* on structured (JSON ranking) outputs.

Its home holds the module, its objective, the closed-form cliff, the calibration that measures
λ*, the ranking task it is evaluated on and its ``calibrate`` command; see README.md here.
"""

from lit_opd.methods.list_opd.calibration import CalibrationReport, calibrate
from lit_opd.methods.list_opd.cliff import lambda_star, lambda_star_kary, q_star
from lit_opd.methods.list_opd.module import ListOPDModule
from lit_opd.methods.list_opd.objective import BaseRelativeClip, base_relative_ppo_loss
from lit_opd.tasks.ranking import RankingTask

__all__ = [
    "ListOPDModule", "BaseRelativeClip", "base_relative_ppo_loss", "CalibrationReport", "calibrate", "lambda_star",
    "lambda_star_kary", "q_star", "RankingTask",
]
