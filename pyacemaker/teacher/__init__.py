"""The MACE teacher: which file `teacher.model` names (resolve_teacher), and the bundled C/H/Cl teacher that
`make teacher` builds (pyacemaker.teacher.build)."""

from pyacemaker.teacher.resolve import (
    BUNDLED_METRICS,
    BUNDLED_MODEL,
    BUNDLED_NAME,
    FOUNDATION_MODELS,
    FoundationModel,
    TeacherNotFoundError,
    mace_cache_dir,
    resolve_teacher,
)

__all__ = [
    "BUNDLED_METRICS",
    "BUNDLED_MODEL",
    "BUNDLED_NAME",
    "FOUNDATION_MODELS",
    "FoundationModel",
    "TeacherNotFoundError",
    "mace_cache_dir",
    "resolve_teacher",
]
