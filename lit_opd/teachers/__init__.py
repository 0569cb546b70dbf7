"""Teachers behind one protocol; each declares the capability it provides (README.md here)."""

from lit_opd.teachers.api import APITeacher
from lit_opd.teachers.base import Teacher, check_capability
from lit_opd.teachers.group import TeacherGroup
from lit_opd.teachers.hf import HFTeacher
from lit_opd.teachers.server import ServerTeacher
from lit_opd.teachers.text import HFTextTeacher

__all__ = [
    "Teacher", "HFTeacher", "ServerTeacher", "APITeacher", "HFTextTeacher", "TeacherGroup",
    "check_capability",
]
