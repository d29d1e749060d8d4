"""An ACE potential (.yace) through pyace's ASE calculator: the student, served like any other oracle, so
validation and MD can use it through the same contract as the teacher and DFT.

The .yace carries its per-element reference energies, so the labels are totals on the level of theory the
potential was fitted to. The level of theory names the file's digest: two different fits never compare equal.
With an active set (.asi, and the .yaml B-basis as the potential) the labels also carry the per-atom
extrapolation grade γ (pyace's D-optimality grade) in their uncertainty. pyace evaluates a .yaml without the
reference energies the trainer records in its metadata; they are added here, so a .yaml and its .yace label
alike.
"""

from __future__ import annotations

import functools
import threading
from typing import ClassVar

from ase import Atoms
from ase.calculators.calculator import Calculator

from pyacemaker.ace_reference_energies import potential_e0s
from pyacemaker.artifacts import sha256_of_file
from pyacemaker.config import AceOracleConfig
from pyacemaker.v1 import common_pb2
from services.oracle.backends.base import OracleBackend


class AceBackend(OracleBackend):
    name: ClassVar[str] = "ace"
    implemented_properties: ClassVar[tuple[str, ...]] = ("energy", "forces", "stress")

    def __init__(self, config: AceOracleConfig) -> None:
        if config.potential.suffix not in (".yace", ".yaml"):
            raise ValueError(f"{config.potential}: the ace backend evaluates .yace (or .yaml) potential files")
        if not config.potential.is_file():
            raise ValueError(f"{config.potential}: no such potential file")
        if config.active_set is not None:
            if config.potential.suffix != ".yaml":
                raise ValueError(f"{config.potential}: γ with an active set needs the .yaml potential, not the .yace")
            if not config.active_set.is_file():
                raise ValueError(f"{config.active_set}: no such active-set file")
        self.config = config
        self.digest = sha256_of_file(config.potential)
        # One loaded potential per server thread: building pyace's calculator costs ~0.7 s (measured on SN2,
        # 372 functions), evaluating it ~3 ms, so a fresh one per structure would make MD with the ACE crawl.
        # Per thread, so concurrent streams never share one; reset before each use, so no result carries over.
        self._local = threading.local()
        self._yaml_e0s = potential_e0s(config.potential) if config.potential.suffix == ".yaml" else {}

    @classmethod
    def unavailable_reason(cls) -> str | None:
        return _pyace_import_error()

    @property
    def level_of_theory(self) -> str:
        return f"ace:{self.digest[:16]}"

    def calculator(self, atoms: Atoms, attempt: int = 0) -> Calculator:
        calc: Calculator | None = getattr(self._local, "calculator", None)
        if calc is None:
            calc = self._load()
            self._local.calculator = calc
        calc.reset()
        return calc

    def _load(self) -> Calculator:
        from pyace import PyACECalculator

        if self.config.active_set is not None:
            calc = PyACECalculator(str(self.config.potential))
            calc.set_active_set(str(self.config.active_set))
            return calc
        # The recursive evaluator is pyace's fast one.
        return PyACECalculator(str(self.config.potential), recursive_evaluator=True, recursive=True)

    def annotate(self, atoms: Atoms, labels: common_pb2.Labels) -> None:
        if self._yaml_e0s and labels.HasField("energy"):
            labels.energy += sum(self._yaml_e0s.get(int(z), 0.0) for z in atoms.numbers)
        assert atoms.calc is not None
        gamma = atoms.calc.results.get("gamma")
        # Without an active set pyace reports zeros, which would read as "no extrapolation".
        if gamma is not None and self.config.active_set is not None:
            grades = [float(g) for g in gamma]  # type: ignore[attr-defined]
            labels.uncertainty.extrapolation_grade.extend(grades)
            labels.uncertainty.max_extrapolation_grade = max(grades, default=0.0)


@functools.cache
def _pyace_import_error() -> str | None:
    try:
        import pyace  # noqa: F401
    except ImportError as exc:
        return f"python-ace is not installed (pip install 'pyacemaker[trainer]'): {exc}"
    return None
