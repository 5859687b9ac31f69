"""Models: the student encoder, EdgeSAM assembly and checkpoints, teachers, prompted decoding."""

from edgesam.models.decoding import decode
from edgesam.models.edgesam import build_edgesam, load_edgesam, save_edgesam
from edgesam.models.student import StudentEncoder
from edgesam.models.teacher import (
    TeacherCheckpointError,
    build_tiny_sam,
    load_teacher,
    load_tiny_sam,
    save_tiny_sam,
)

__all__ = [
    "StudentEncoder",
    "TeacherCheckpointError",
    "build_edgesam",
    "build_tiny_sam",
    "decode",
    "load_edgesam",
    "load_teacher",
    "load_tiny_sam",
    "save_edgesam",
    "save_tiny_sam",
]
