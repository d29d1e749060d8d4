"""Molecular Kohn-Sham DFT with PySCF: restricted (RKS) for singlets, unrestricted (UKS) for open shells.

The functional and basis come from the options, the total charge and spin multiplicity from each structure.
Energies and analytic gradients come in Hartree and Hartree/Bohr and are converted with ase.units (CODATA 2014,
the constants every backend here uses). The gradient includes the response of the integration grid, so the
forces are the exact derivative of the reported energy, which is what a potential fitted to both needs.

Periodic structures are refused: PySCF's periodic code (pyscf.pbc) is another method with other settings.
A self-consistent field that does not converge is an error; retries escalate how it is reached (more cycles,
damping and a level shift, then second-order Newton iterations), never the functional, basis or grid.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Any, ClassVar

from ase import Atoms
from ase.calculators.calculator import Calculator, all_changes
from ase.units import Bohr, Hartree

from pyacemaker.config import PyscfOracleConfig
from pyacemaker.services.oracle.backends.base import ExecutorBackend, UnlabellableStructureError
from pyacemaker.structures import charge_of, spin_multiplicity_of

# A retry never gets fewer SCF cycles than twice this, whatever max_cycle the first attempt had.
RETRY_MIN_CYCLES = 100
# Density mixing and virtual-orbital shift (Hartree) of the second attempt; both leave the converged
# density unchanged and only damp the oscillations that keep DIIS from converging.
RETRY_DAMPING = 0.5
RETRY_LEVEL_SHIFT_HA = 0.3


@dataclass(frozen=True)
class ScfSettings:
    """How the self-consistent field is iterated; no field changes the converged result."""

    max_cycle: int
    conv_tol: float
    damping: float = 0.0
    level_shift: float = 0.0
    newton: bool = False

    @classmethod
    def for_attempt(cls, config: PyscfOracleConfig, attempt: int) -> ScfSettings:
        """Attempt 0: the configured DIIS iterations. 1: more cycles, damping and a level shift. 2 and later:
        second-order (Newton) iterations, which converge wherever DIIS oscillates, at a higher cost per cycle."""
        if attempt == 0:
            return cls(max_cycle=config.max_cycle, conv_tol=config.conv_tol)
        cycles = max(config.max_cycle, RETRY_MIN_CYCLES) * 2**attempt
        if attempt == 1:
            return cls(cycles, config.conv_tol, damping=RETRY_DAMPING, level_shift=RETRY_LEVEL_SHIFT_HA)
        return cls(cycles, config.conv_tol, newton=True)

    def describe(self) -> str:
        solver = "Newton" if self.newton else "DIIS"
        extras = (
            f", damping {self.damping}, level shift {self.level_shift} Ha" if self.damping or self.level_shift else ""
        )
        return f"{solver}, {self.max_cycle} cycles{extras}"


class PyscfBackend(ExecutorBackend):
    name: ClassVar[str] = "pyscf"
    implemented_properties: ClassVar[tuple[str, ...]] = ("energy", "forces")
    uses_executor: ClassVar[bool] = True
    config: PyscfOracleConfig

    def __init__(self, config: PyscfOracleConfig) -> None:
        self.config = config

    @classmethod
    def unavailable_reason(cls) -> str | None:
        return _pyscf_import_error()

    @property
    def level_of_theory(self) -> str:
        level = f"pyscf:{self.config.functional}/{self.config.basis}"
        return level + ",density-fitting" if self.config.density_fit else level

    def calculator(self, atoms: Atoms, attempt: int = 0) -> PyscfCalculator:
        if atoms.pbc.any():
            raise UnlabellableStructureError(
                f"the pyscf backend labels molecules only, this structure is periodic (pbc={atoms.pbc.tolist()}); "
                "use the qe or vasp backend for periodic cells"
            )
        # Building the molecule once here reports an impossible charge/spin or an unknown basis before any SCF.
        molecule(atoms, self.config.basis)
        return PyscfCalculator(
            functional=self.config.functional,
            basis=self.config.basis,
            density_fit=self.config.density_fit,
            scf=ScfSettings.for_attempt(self.config, attempt),
        )


class PyscfCalculator(Calculator):
    """Energy (eV) and forces (eV/Å) of a molecule from one Kohn-Sham SCF and its analytic gradient."""

    implemented_properties = ["energy", "free_energy", "forces"]  # noqa: RUF012  (ASE's class attribute)

    def __init__(self, functional: str, basis: str, density_fit: bool, scf: ScfSettings) -> None:
        super().__init__()
        self.functional = functional
        self.basis = basis
        self.density_fit = density_fit
        self.scf = scf

    def calculate(
        self,
        atoms: Atoms | None = None,
        properties: list[str] | None = None,
        system_changes: list[str] = all_changes,
    ) -> None:
        super().calculate(atoms, properties or ["energy"], system_changes)
        mf = self._converged_scf(molecule(self.atoms, self.basis))
        gradient = mf.nuc_grad_method()
        gradient.grid_response = True
        gradient.verbose = 0
        energy = float(mf.e_tot) * Hartree
        self.results = {"energy": energy, "free_energy": energy, "forces": -gradient.kernel() * (Hartree / Bohr)}

    def _converged_scf(self, mol: Any) -> Any:
        from pyscf import dft

        mf = dft.RKS(mol) if mol.spin == 0 else dft.UKS(mol)
        mf.xc = self.functional
        mf.conv_tol = self.scf.conv_tol
        mf.max_cycle = self.scf.max_cycle
        mf.damp = self.scf.damping
        mf.level_shift = self.scf.level_shift
        mf.chkfile = None
        mf.verbose = 0
        if self.density_fit:
            mf = mf.density_fit()
        if self.scf.newton:
            mf = mf.newton()
        mf.kernel()
        if not mf.converged:
            raise RuntimeError(
                f"SCF did not converge ({self.scf.describe()}; last energy {float(mf.e_tot):.10f} Ha, "
                f"tolerance {self.scf.conv_tol:g} Ha)"
            )
        return mf


def molecule(atoms: Atoms, basis: str) -> Any:
    """The PySCF molecule of a structure: positions in Å, charge and 2S = multiplicity − 1 from `atoms.info`."""
    from pyscf import gto

    charge = charge_of(atoms)
    multiplicity = spin_multiplicity_of(atoms)
    try:
        return gto.M(
            atom=list(zip(atoms.get_chemical_symbols(), atoms.positions.tolist(), strict=True)),
            unit="Angstrom",
            basis=basis,
            charge=charge,
            spin=multiplicity - 1,
            verbose=0,
        )
    except (RuntimeError, KeyError, ValueError) as exc:
        # PySCF raises RuntimeError for an electron count that cannot have this spin and KeyError/ValueError
        # (or a RuntimeError) for a basis it does not know for an element: no retry can change either.
        first_line = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise UnlabellableStructureError(
            f"PySCF cannot set up this molecule (charge {charge}, multiplicity {multiplicity}, basis {basis!r}): "
            + first_line
        ) from exc


@functools.cache
def _pyscf_import_error() -> str | None:
    try:
        import pyscf.dft  # noqa: F401
    except ImportError as exc:
        return f"pyscf cannot be imported ({exc}); install pyacemaker[oracle]"
    return None
