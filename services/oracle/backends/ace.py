"""An ACE potential (.yace) through pyace's ASE calculator: the student, served like any other oracle, so
validation and MD can use it through the same contract as the teacher and DFT.

The .yace carries its per-element reference energies, so the labels are totals on the level of theory the
potential was fitted to. The level of theory names the file's digest: two different fits never compare equal.

With its active set (`active_set`, .asi, and the B-basis .yaml it belongs to, `basis`) every label also
carries the per-atom extrapolation grade γ in its uncertainty (≤ 1 inside the training data, MaxVol); the
energies and forces still come from the .yace, as in production. The student-driven refinement watches γ in
the student's own MD this way.
"""

from __future__ import annotations

import functools
import threading
from typing import Any, ClassVar

import numpy as np
from ase import Atoms
from ase.calculators.calculator import Calculator

from pyacemaker.artifacts import sha256_of_file
from pyacemaker.config import AceOracleConfig
from pyacemaker.v1 import common_pb2
from services.oracle.backends.base import OracleBackend


class AceBackend(OracleBackend):
    name: ClassVar[str] = "ace"
    implemented_properties: ClassVar[tuple[str, ...]] = ("energy", "forces", "stress")

    def __init__(self, config: AceOracleConfig) -> None:
        if config.potential.suffix != ".yace":
            raise ValueError(f"{config.potential}: the ace backend evaluates .yace files (pace_yaml2yace converts)")
        for path in (config.potential, config.active_set, config.basis):
            if path is not None and not path.is_file():
                raise ValueError(f"{path}: no such file")
        if config.basis is not None and config.basis.suffix != ".yaml":
            raise ValueError(f"{config.basis}: γ needs the potential's B-basis .yaml")
        self.config = config
        self.digest = sha256_of_file(config.potential)
        # Loading a potential costs ~60 times an evaluation of a small molecule (measured: 90 ms vs 1.4 ms for
        # SN2), so each server thread keeps its calculator; the γ calculator (loading the active set too) is one
        # per backend, its use serialised.
        self._local = threading.local()
        self._grader: Any = None
        self._grader_lock = threading.Lock()

    @classmethod
    def unavailable_reason(cls) -> str | None:
        return _pyace_import_error()

    @property
    def level_of_theory(self) -> str:
        return f"ace:{self.digest[:16]}"

    def calculator(self, atoms: Atoms, attempt: int = 0) -> Calculator:
        from pyace import PyACECalculator

        calculator = getattr(self._local, "calculator", None)
        if calculator is None:
            # The recursive evaluator is pyace's fast one.
            calculator = PyACECalculator(str(self.config.potential), recursive_evaluator=True, recursive=True)
            self._local.calculator = calculator
        return calculator

    def _attempt(self, atoms: Atoms, attempt: int) -> tuple[common_pb2.Labels, bool]:
        labels, retryable = super()._attempt(atoms, attempt)
        if self.config.active_set is not None and labels.status == common_pb2.LABEL_STATUS_OK:
            grades = self.extrapolation_grades(atoms)
            labels.uncertainty.extrapolation_grade.extend(grades.tolist())
            labels.uncertainty.max_extrapolation_grade = float(grades.max())
        return labels, retryable

    def extrapolation_grades(self, atoms: Atoms) -> np.ndarray:
        """Per-atom γ of a structure against the potential's active set."""
        from pyace import PyACECalculator

        with self._grader_lock:
            if self._grader is None:
                self._grader = PyACECalculator(str(self.config.basis))
                self._grader.set_active_set(str(self.config.active_set))
            work = atoms.copy()
            work.calc = self._grader
            work.get_potential_energy()
            return np.asarray(self._grader.results["gamma"], dtype=np.float64)


@functools.cache
def _pyace_import_error() -> str | None:
    try:
        import pyace  # noqa: F401
    except ImportError as exc:
        return f"python-ace is not installed (pip install 'pyacemaker[trainer]'): {exc}"
    return None
