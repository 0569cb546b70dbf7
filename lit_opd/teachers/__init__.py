"""Teachers behind one protocol; each declares the capability it provides."""

from lit_opd.teachers.base import Teacher, check_capability
from lit_opd.teachers.hf import HFTeacher

__all__ = ["Teacher", "HFTeacher", "check_capability"]
