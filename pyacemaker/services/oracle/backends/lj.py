"""Lennard-Jones: an analytic toy oracle, one parameter set for all elements.

u(r) = 4ε[(σ/r)¹² − (σ/r)⁶] − u(r_c) for r < r_c, else 0: the energy is shifted to zero at the cutoff (forces
jump there), which is ASE's `LennardJones(smooth=False)`.
"""

from __future__ import annotations

from typing import ClassVar

import numpy as np
from ase import Atoms
from ase.calculators.lj import LennardJones

from pyacemaker.config import LjOracleConfig
from pyacemaker.labels import Labels
from pyacemaker.services.oracle.backends.base import OracleBackend
from pyacemaker.structure_checks import StructureLimits


class LennardJonesBackend(OracleBackend):
    name: ClassVar[str] = "lj"
    implemented_properties: ClassVar[tuple[str, ...]] = ("energy", "forces", "stress")

    def __init__(self, config: LjOracleConfig) -> None:
        self.config = config

    def structure_limits(self) -> StructureLimits:
        return StructureLimits(cutoff=self.config.cutoff, owner="oracle backend 'lj'")

    @property
    def level_of_theory(self) -> str:
        # repr() of a float is its shortest exact form, so different parameters never print alike.
        c = self.config
        return f"lj:eps={c.epsilon!r},sigma={c.sigma!r},rc={c.cutoff!r}"

    def _attempt(self, atoms: Atoms, attempt: int) -> tuple[Labels, bool]:
        # Coinciding atoms make ASE's LJ divide by zero; the finiteness check of `OracleBackend.label` turns
        # the resulting NaN into a FAILED label, so numpy's warnings would only be noise.
        with np.errstate(divide="ignore", invalid="ignore"):
            return super()._attempt(atoms, attempt)

    def calculator(self, atoms: Atoms, attempt: int = 0) -> LennardJones:
        # An analytic potential has nothing to converge, so a retry gets the same calculator.
        return LennardJones(epsilon=self.config.epsilon, sigma=self.config.sigma, rc=self.config.cutoff, smooth=False)
