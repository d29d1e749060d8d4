"""GFN-xTB through tblite's ASE calculator (results already in eV, eV/Å, eV/Å³).

Charge and spin multiplicity come from each structure, the Hamiltonian and SCF settings from the options.
A structure whose SCF does not converge within `max_iterations` gets a FAILED label.
"""

from __future__ import annotations

import functools
from typing import ClassVar

from ase import Atoms
from ase.calculators.calculator import Calculator

from pyacemaker.config import XtbOracleConfig
from pyacemaker.services.oracle.backends.base import ExecutorBackend, UnlabellableStructureError
from pyacemaker.structure_checks import StructureLimits
from pyacemaker.structures import charge_of, spin_multiplicity_of

# tblite's and xtb's own default; a label at another electronic temperature is a different level of theory.
DEFAULT_ELECTRONIC_TEMPERATURE_K = 300.0
# GFN1/GFN2/IPEA1-xTB are parametrised for H..Rn. tblite reads Z outside silently as nothing (Z = 0, -1) or
# crashes; the oracle refuses such structures first.
XTB_ELEMENTS = frozenset(range(1, 87))
# Range used to estimate neighbours per atom in periodic cells, Å (tblite's real-space sums reach about this far).
XTB_NEIGHBOUR_CUTOFF_A = 10.0
# tblite holds dense matrices of ~4 basis functions per atom: 1000 atoms is ~130 MB each, more gets heavy fast.
XTB_MAX_ATOMS = 1000


class XtbBackend(ExecutorBackend):
    name: ClassVar[str] = "xtb"
    implemented_properties: ClassVar[tuple[str, ...]] = ("energy", "forces", "stress")
    isolated: ClassVar[bool] = True
    config: XtbOracleConfig

    def __init__(self, config: XtbOracleConfig) -> None:
        self.config = config

    @classmethod
    def unavailable_reason(cls) -> str | None:
        return _tblite_import_error()

    def structure_limits(self) -> StructureLimits:
        return StructureLimits(
            cutoff=XTB_NEIGHBOUR_CUTOFF_A, elements=XTB_ELEMENTS, max_atoms=XTB_MAX_ATOMS, owner="oracle backend 'xtb'"
        )

    @property
    def level_of_theory(self) -> str:
        level = f"xtb:{self.config.method}"
        if self.config.electronic_temperature != DEFAULT_ELECTRONIC_TEMPERATURE_K:
            level += f",Tel={self.config.electronic_temperature!r}K"
        return level

    def calculator(self, atoms: Atoms, attempt: int = 0) -> Calculator:
        """A retry only gets more SCC iterations: a higher electronic temperature would converge more easily
        but change the level of theory."""
        from tblite.ase import TBLite

        charge = charge_of(atoms)
        multiplicity = spin_multiplicity_of(atoms)
        check_spin(atoms, charge, multiplicity)
        return TBLite(
            method=self.config.method,
            charge=charge,
            multiplicity=multiplicity,
            accuracy=self.config.accuracy,
            electronic_temperature=self.config.electronic_temperature,
            max_iterations=self.config.max_iterations * 2**attempt,
            verbosity=0,
        )


@functools.cache
def _tblite_import_error() -> str | None:
    try:
        import tblite.ase  # noqa: F401
    except ImportError as exc:
        return f"tblite cannot be imported ({exc}); install pyacemaker[oracle]"
    return None


def check_spin(atoms: Atoms, charge: int, multiplicity: int) -> None:
    """tblite silently accepts a multiplicity that cannot match the electron count (a singlet with an odd
    number of electrons) and returns a meaningless energy; refuse it instead. Core shells are closed, so
    the parity of all electrons equals that of the valence electrons xTB treats."""
    electrons = int(atoms.numbers.sum()) - charge
    unpaired = multiplicity - 1
    if multiplicity < 1 or electrons < 0 or unpaired > electrons or (electrons - unpaired) % 2:
        raise UnlabellableStructureError(
            f"spin multiplicity {multiplicity} is impossible with {electrons} electrons (charge {charge})"
        )
