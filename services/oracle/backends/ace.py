"""An ACE potential (.yace) through pyace's ASE calculator: the student, served like any other oracle, so
validation and MD can use it through the same contract as the teacher and DFT.

The .yace carries its per-element reference energies, so the labels are totals on the level of theory the
potential was fitted to. The level of theory names the file's digest: two different fits never compare equal.
"""

from __future__ import annotations

import functools
from typing import ClassVar

from ase import Atoms
from ase.calculators.calculator import Calculator

from pyacemaker.artifacts import sha256_of_file
from pyacemaker.config import AceOracleConfig
from services.oracle.backends.base import OracleBackend


class AceBackend(OracleBackend):
    name: ClassVar[str] = "ace"
    implemented_properties: ClassVar[tuple[str, ...]] = ("energy", "forces", "stress")

    def __init__(self, config: AceOracleConfig) -> None:
        if config.potential.suffix != ".yace":
            raise ValueError(f"{config.potential}: the ace backend evaluates .yace files (pace_yaml2yace converts)")
        if not config.potential.is_file():
            raise ValueError(f"{config.potential}: no such potential file")
        self.config = config
        self.digest = sha256_of_file(config.potential)

    @classmethod
    def unavailable_reason(cls) -> str | None:
        return _pyace_import_error()

    @property
    def level_of_theory(self) -> str:
        return f"ace:{self.digest[:16]}"

    def calculator(self, atoms: Atoms, attempt: int = 0) -> Calculator:
        from pyace import PyACECalculator

        # The recursive evaluator is pyace's fast one; loading a .yace takes milliseconds.
        return PyACECalculator(str(self.config.potential), recursive_evaluator=True, recursive=True)


@functools.cache
def _pyace_import_error() -> str | None:
    try:
        import pyace  # noqa: F401
    except ImportError as exc:
        return f"python-ace is not installed (pip install 'pyacemaker[trainer]'): {exc}"
    return None
