"""Quantum ESPRESSO pw.x through ASE's Espresso calculator: plane waves and pseudopotentials for periodic cells.

pw.x runs in the current directory (the executor's scratch directory for this calculation) with the command
and pseudopotential directory of the oracle deployment's qe profile that the options name (a request never
names a program or a directory, see pyacemaker/services/oracle/deployment.py); the functional is the one the UPF files
were made for.

Units: pw.x reports Ry, Ry/Bohr and Ry/Bohr³. ASE's output reader converts them with CODATA 2006 constants,
while every other backend here uses ase.units (CODATA 2014); the Rydberg differs by 1e-7 relative, 2e-5 eV on a
15 Ry cell, so the results are re-expressed in ase.units. Stress is returned in ASE's sign convention
(σ = (1/V) ∂E/∂ε, negative under compression), the opposite of what pw.x prints.

An SCF that does not converge makes pw.x print "convergence NOT achieved" (and stop with a non-zero status);
that is an error, and retries escalate only how the SCF is iterated: more steps, gentler and locally
Thomas-Fermi screened mixing, then conjugate-gradient diagonalisation. Smearing is not switched on by a retry
although it would help a metal converge: it changes the energy, so it is part of the level of theory and must be
set in the options (`smearing`, `degauss_ry`) for metals from the start.

Charge is honoured (`tot_charge`); spin is not: the calculation is spin-unpolarised.
"""

from __future__ import annotations

import os
import re
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
from ase import Atoms
from ase.calculators.calculator import CalculatorError
from ase.calculators.espresso import Espresso, EspressoProfile, EspressoTemplate
from ase.io.espresso import units as ase_espresso_units
from ase.units import Bohr, Rydberg

from pyacemaker.config import QeOracleConfig
from pyacemaker.services.oracle.backends.base import ExecutorBackend, UnlabellableStructureError, monkhorst_pack_grid
from pyacemaker.services.oracle.deployment import QeProfile
from pyacemaker.structures import charge_of

# pw.x's conv_thr bounds the estimated total-energy error of the SCF; its default (1e-6 Ry) leaves force errors
# of ~1e-3 Ry/Bohr, too large for force labels, so it is set per atom.
CONV_THR_RY_PER_ATOM = 1e-10
# A retry never gets fewer SCF steps than twice this (pw.x's default electron_maxstep).
RETRY_MIN_STEPS = 100
NOT_CONVERGED = "convergence NOT achieved"
# Factors from the CODATA 2006 values ASE's pw.x reader uses to ase.units' values.
_ENERGY_FACTOR = Rydberg / ase_espresso_units["Ry"]
_FORCE_FACTOR = (Rydberg / Bohr) / (ase_espresso_units["Ry"] / ase_espresso_units["Bohr"])
_STRESS_FACTOR = (Rydberg / Bohr**3) / (ase_espresso_units["Ry"] / ase_espresso_units["Bohr"] ** 3)


@dataclass(frozen=True)
class PwScfSettings:
    """How pw.x iterates the SCF; no field changes the converged result."""

    electron_maxstep: int
    mixing_beta: float = 0.7
    mixing_mode: str = "plain"
    diagonalization: str = "david"

    @classmethod
    def for_attempt(cls, config: QeOracleConfig, attempt: int) -> PwScfSettings:
        """Attempt 0: pw.x's defaults. 1: more steps, mixing 0.3 with local Thomas-Fermi screening (charge
        sloshing in slabs and inhomogeneous cells). 2 and later: mixing 0.1 and conjugate-gradient diagonalisation."""
        if attempt == 0:
            return cls(electron_maxstep=config.electron_maxstep)
        steps = max(config.electron_maxstep, RETRY_MIN_STEPS) * 2**attempt
        if attempt == 1:
            return cls(steps, mixing_beta=0.3, mixing_mode="local-TF")
        return cls(steps, mixing_beta=0.1, mixing_mode="local-TF", diagonalization="cg")


class QeBackend(ExecutorBackend):
    name: ClassVar[str] = "qe"
    implemented_properties: ClassVar[tuple[str, ...]] = ("energy", "forces", "stress")
    uses_executor: ClassVar[bool] = True
    config: QeOracleConfig

    def __init__(self, config: QeOracleConfig, profile: QeProfile | None = None) -> None:
        self.config = config
        self.profile = profile if profile is not None else QeProfile()

    @property
    def ecutrho_ry(self) -> float:
        return self.config.ecutrho_ry if self.config.ecutrho_ry is not None else 4 * self.config.ecutwfc_ry

    @property
    def level_of_theory(self) -> str:
        c = self.config
        pseudos = ",".join(f"{element}={upf}" for element, upf in sorted(c.pseudopotentials.items()))
        level = f"qe:{pseudos};ecutwfc={c.ecutwfc_ry!r}Ry,ecutrho={self.ecutrho_ry!r}Ry,dk={c.kpoint_spacing!r}/A"
        if c.smearing != "none":
            level += f",smearing={c.smearing}:{c.degauss_ry!r}Ry"
        if c.profile != "default":  # another profile may read other UPF files under the same names
            level += f";profile={c.profile}"
        return level

    def calculator(self, atoms: Atoms, attempt: int = 0) -> PwCalculator:
        return PwCalculator(
            profile=EspressoProfile(command=self.profile.command, pseudo_dir=self.profile.pseudo_dir),
            input_data=self.pw_input(atoms, PwScfSettings.for_attempt(self.config, attempt)),
            pseudopotentials=self.pseudopotentials_for(atoms),
            kpts=monkhorst_pack_grid(atoms, self.config.kpoint_spacing),
        )

    def pseudopotentials_for(self, atoms: Atoms) -> dict[str, str]:
        """Element → UPF file for the elements of this structure; a missing one cannot be healed by a retry."""
        elements = sorted(set(atoms.get_chemical_symbols()))
        missing = [element for element in elements if element not in self.config.pseudopotentials]
        if missing:
            raise UnlabellableStructureError(
                f"no pseudopotential for {', '.join(missing)} in the qe options (`pseudopotentials`)"
            )
        chosen = {element: self.config.pseudopotentials[element] for element in elements}
        for upf in chosen.values():
            if not (self.profile.pseudo_dir / upf).is_file():
                raise UnlabellableStructureError(
                    f"pseudopotential file {self.profile.pseudo_dir / upf} does not exist (the pseudo_dir of the "
                    f"oracle deployment's qe profile {self.config.profile!r})"
                )
        return chosen

    def pw_input(self, atoms: Atoms, scf: PwScfSettings) -> dict[str, dict[str, Any]]:
        """pw.x's namelists for one SCF with forces and stress."""
        if atoms.cell.rank < 3:
            raise UnlabellableStructureError("pw.x needs a cell with three vectors; this structure has none")
        system: dict[str, Any] = {"ecutwfc": self.config.ecutwfc_ry, "ecutrho": self.ecutrho_ry}
        if self.config.smearing == "none":
            system["occupations"] = "fixed"
        else:
            system.update(occupations="smearing", smearing=self.config.smearing, degauss=self.config.degauss_ry)
        if charge_of(atoms):
            system["tot_charge"] = charge_of(atoms)
        return {
            "control": {
                "calculation": "scf",
                "tprnfor": True,
                "tstress": True,
                "outdir": "pwscf",
                "disk_io": "none",
            },
            "system": system,
            "electrons": {
                "conv_thr": CONV_THR_RY_PER_ATOM * len(atoms),
                "electron_maxstep": scf.electron_maxstep,
                "mixing_beta": scf.mixing_beta,
                "mixing_mode": scf.mixing_mode,
                "diagonalization": scf.diagonalization,
            },
        }


class CheckedPwTemplate(EspressoTemplate):
    """ASE's pw.x template, plus: a failed or unconverged run raises with pw.x's own reason, and results are
    re-expressed in ase.units (see the module docstring)."""

    def execute(self, directory: os.PathLike, profile: EspressoProfile) -> None:
        try:
            super().execute(directory, profile)
        except subprocess.CalledProcessError as exc:
            raise CalculatorError(self._failure_reason(Path(directory), exc.returncode)) from None

    def read_results(self, directory: os.PathLike) -> dict[str, Any]:
        directory = Path(directory)
        output = (directory / self.outputname).read_text(errors="replace")
        if NOT_CONVERGED in output:
            raise CalculatorError(self._failure_reason(directory, 0))
        results = super().read_results(directory)
        if results.get("energy") is None or results.get("forces") is None:
            raise CalculatorError(f"pw.x output {directory / self.outputname} has no final energy or forces")
        converted = {
            "energy": results["energy"] * _ENERGY_FACTOR,
            "free_energy": results["energy"] * _ENERGY_FACTOR,
            "forces": np.asarray(results["forces"]) * _FORCE_FACTOR,
        }
        if results.get("stress") is not None:
            converted["stress"] = np.asarray(results["stress"]) * _STRESS_FACTOR
        return converted

    def _failure_reason(self, directory: Path, returncode: int) -> str:
        output_path = directory / self.outputname
        output = output_path.read_text(errors="replace") if output_path.is_file() else ""
        unconverged = re.search(r"convergence NOT achieved after\s+(\d+)\s+iterations", output)
        if unconverged:
            return f"pw.x SCF convergence NOT achieved after {unconverged.group(1)} iterations"
        error = re.search(r"%{10,}\n(.*?)\n\s*%{10,}", output, re.S)
        if error:
            return "pw.x stopped: " + " ".join(error.group(1).split())
        error_path = directory / self.errorname
        stderr = error_path.read_text(errors="replace").strip()[-500:] if error_path.is_file() else ""
        return f"pw.x exited with status {returncode}" + (f": {stderr}" if stderr else "")


class PwCalculator(Espresso):
    """ASE's Espresso calculator with the checked template; runs in the current directory."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.template = CheckedPwTemplate()
