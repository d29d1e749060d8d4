"""The one interface every oracle backend implements, shaped like an ASE calculator.

A backend names itself, says which properties it returns and which level of theory its labels belong to, and
hands out a fresh ASE calculator for each structure. `label` runs that calculator and turns whatever goes
wrong inside the calculation into a FAILED label, so one bad structure never ends a stream of thousands.
"""

from __future__ import annotations

import logging
import time
from abc import ABC, abstractmethod
from collections.abc import Iterator, Sequence
from typing import ClassVar

import numpy as np
from ase import Atoms
from ase.calculators.calculator import Calculator, CalculatorError

from pyacemaker.structures import failed_labels, labels_from_atoms
from pyacemaker.v1 import common_pb2

log = logging.getLogger(__name__)


class OracleBackend(ABC):
    """A source of energies, forces and (for periodic cells) stresses in eV, eV/Å and eV/Å³.

    `label` may be called from several server threads at once; a backend keeps no per-structure state
    (each structure gets its own calculator), so results never depend on what was labelled before.
    """

    name: ClassVar[str]
    implemented_properties: ClassVar[tuple[str, ...]]
    # True when the backend also computes per-structure descriptors (the Describe RPC).
    descriptors: ClassVar[bool] = False

    @classmethod
    def unavailable_reason(cls) -> str | None:
        """Why this backend cannot run in this process (e.g. a missing library), or None when it can."""
        return None

    @property
    @abstractmethod
    def level_of_theory(self) -> str:
        """Backend plus the settings that define the physics; equal strings mean interchangeable labels."""

    @abstractmethod
    def calculator(self, atoms: Atoms) -> Calculator:
        """A fresh ASE calculator for this structure (its charge and spin are in `atoms.info`).

        May raise for a structure the backend cannot treat; `label` reports that as a FAILED label."""

    def label(self, atoms: Atoms) -> common_pb2.Labels:
        """Energy, forces and, for periodic structures, stress of one structure; never raises for a
        failed calculation but returns a FAILED label whose reason says what went wrong."""
        start = time.perf_counter()
        try:
            work = atoms.copy()
            work.calc = self.calculator(work)
            for name in self._properties_for(work):
                work.calc.get_property(name, work)
            _check_finite(work.calc.results)
            return labels_from_atoms(work, self.level_of_theory, wall_time_s=time.perf_counter() - start)
        except Exception as exc:  # every failure of one structure becomes its label, see the module docstring
            if not isinstance(exc, CalculatorError | ValueError | RuntimeError | ArithmeticError):
                log.warning("%s backend raised an unexpected %s", self.name, type(exc).__name__, exc_info=True)
            return failed_labels(f"{type(exc).__name__}: {exc}", self.level_of_theory)

    def label_batch(self, frames: Sequence[Atoms]) -> Iterator[common_pb2.Labels]:
        """Labels for several structures, in order, each yielded as soon as it is ready. Backends that gain
        from batching (a neural network on a batch) override this."""
        for atoms in frames:
            yield self.label(atoms)

    def _properties_for(self, atoms: Atoms) -> list[str]:
        properties = ["energy", "forces"]
        if "stress" in self.implemented_properties and atoms.pbc.any():
            properties.append("stress")
        return properties


def _check_finite(results: dict[str, object]) -> None:
    """A NaN or infinite label would poison every fit downstream; treat it as a failed calculation."""
    for name in ("energy", "forces", "stress"):
        if name in results and not np.all(np.isfinite(np.asarray(results[name], dtype=np.float64))):
            raise ArithmeticError(f"{name} is not finite (coinciding atoms?)")
