"""VASP: ASE's Vasp calculator writes INCAR/POSCAR/KPOINTS/POTCAR, the configured command runs VASP, and the
results come from vasprun.xml.

Everything happens in the current directory (the executor's scratch directory for this calculation). The command
and the POTCAR root come from the oracle deployment's vasp profile that the options name, never from a request
(pyacemaker/services/oracle/deployment.py): POTCARs are taken from the profile's `potcar_dir` (laid out as VASP_PP_PATH:
potpaw_PBE/<element><setup>/POTCAR, potpaw/... for LDA) or, when unset, from the VASP_PP_PATH of the oracle's
environment. The `incar` option takes INCAR tags only (ASE's names for them), not ASE's other keywords (`pp`,
`custom`, `txt`, ...), which could point the input writer at other files.

Labels: the energy is the free energy F (vasprun.xml's e_fr_energy, less the PV term of a PSTRESS), because the
forces VASP reports are −∂F/∂R; a potential fitted to energies and forces needs the pair to be consistent. The
σ→0 extrapolated energy is not used. VASP's stress (kbar, positive under compression) is converted to eV/Å³ in
ASE's sign convention by ASE's reader. VASP orders atoms by element; results are put back in the input order.

Convergence: VASP stops its electronic loop after NELM steps whether or not it converged and still writes
results, so an ionic step with NELM electronic steps counts as not converged (conservatively: one converged
exactly at the last step is retried too). Retries change only how the SCF is iterated (more steps, then the
Davidson algorithm with linear mixing, then all-band conjugate gradients), never ENCUT, smearing or the functional.
Charge is honoured (NELECT from the POTCARs' valences minus the charge); spin only through the user's INCAR tags.
"""

from __future__ import annotations

import os
import subprocess
import xml.etree.ElementTree as ET
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
from ase import Atoms
from ase.calculators.calculator import Calculator, CalculatorError, all_changes
from ase.calculators.vasp import Vasp

from pyacemaker.config import VaspOracleConfig
from pyacemaker.services.oracle.backends.base import ExecutorBackend, UnlabellableStructureError, monkhorst_pack_grid
from pyacemaker.services.oracle.deployment import VaspProfile
from pyacemaker.structures import charge_of

VASPRUN = "vasprun.xml"
# Where the command's stdout and stderr go.
VASP_LOG = "vasp.out"
# Outputs of an earlier attempt in the same directory, removed first so they are never mistaken for this one's.
STALE_OUTPUTS = ("vasprun.xml", "OUTCAR", "OSZICAR", "CONTCAR", "WAVECAR", "CHGCAR", "CHG", VASP_LOG)
# VASP's default NELM; a retry never gets fewer electronic steps than twice this.
DEFAULT_NELM = 60
# Largest difference (Å) between the structure labelled and the one in vasprun.xml before the output is refused.
STRUCTURE_TOLERANCE_A = 1e-4
_POTPAW_FOLDERS = {"pbe": "potpaw_PBE", "lda": "potpaw"}
# Tags set by the backend itself: a single point with forces and stress, nothing left on disk to restart from.
_SINGLE_POINT_TAGS: dict[str, Any] = {"ibrion": -1, "nsw": 0, "isif": 2, "lwave": False, "lcharg": False}


@dataclass(frozen=True)
class VaspScfSettings:
    """INCAR tags that change how VASP iterates the electronic loop, not its result; None keeps the user's."""

    nelm: int
    algo: str | None = None
    amix: float | None = None
    bmix: float | None = None

    @classmethod
    def for_attempt(cls, user_nelm: int | None, attempt: int) -> VaspScfSettings:
        """Attempt 0: the user's INCAR. 1: more steps, Davidson (ALGO=Normal) with linear mixing (AMIX=0.2,
        BMIX=0.0001) against charge sloshing. 2 and later: all-band conjugate gradients (ALGO=All)."""
        base = user_nelm or DEFAULT_NELM
        if attempt == 0:
            return cls(nelm=base)
        steps = max(base, DEFAULT_NELM) * 2**attempt
        if attempt == 1:
            return cls(steps, algo="Normal", amix=0.2, bmix=0.0001)
        return cls(steps, algo="All", amix=0.1, bmix=0.0001)

    def tags(self) -> dict[str, Any]:
        chosen = {"nelm": self.nelm, "algo": self.algo, "amix": self.amix, "bmix": self.bmix}
        return {key: value for key, value in chosen.items() if value is not None}


class VaspBackend(ExecutorBackend):
    name: ClassVar[str] = "vasp"
    implemented_properties: ClassVar[tuple[str, ...]] = ("energy", "forces", "stress")
    uses_executor: ClassVar[bool] = True
    config: VaspOracleConfig

    def __init__(self, config: VaspOracleConfig, profile: VaspProfile) -> None:
        self.config = config
        self.profile = profile
        self.incar = user_incar_tags(config.incar)

    @property
    def level_of_theory(self) -> str:
        c = self.config
        setups = ",".join(f"{element}{suffix}" for element, suffix in sorted(c.setups.items()))
        # Tags a retry overrides only change how the SCF converges, so they do not name the physics.
        physics = {
            key: value for key, value in sorted(self.incar.items()) if key not in ("nelm", "algo", "amix", "bmix")
        }
        level = f"vasp:{c.xc};encut={c.encut_ev!r}eV,dk={c.kpoint_spacing!r}/A"
        if setups:
            level += f";setups={setups}"
        if c.profile != "default":  # another profile may hold other POTCARs under the same names
            level += f";profile={c.profile}"
        if physics:
            level += ";" + ",".join(f"{key.upper()}={value}" for key, value in physics.items())
        return level

    def calculator(self, atoms: Atoms, attempt: int = 0) -> VaspRunCalculator:
        if not atoms.pbc.all():
            # VASP treats every cell as periodic; a molecule belongs in a box with pbc=True.
            raise UnlabellableStructureError(
                f"the vasp backend needs a periodic cell (pbc=True), got pbc={atoms.pbc.tolist()}"
            )
        scf = VaspScfSettings.for_attempt(self.incar.get("nelm"), attempt)
        parameters: dict[str, Any] = {
            "xc": self.config.xc,
            "encut": self.config.encut_ev,
            "kpts": monkhorst_pack_grid(atoms, self.config.kpoint_spacing),
            "gamma": True,
            **_SINGLE_POINT_TAGS,
            **self.incar,
            **scf.tags(),
        }
        if self.config.setups:
            parameters["setups"] = dict(self.config.setups)
        if charge_of(atoms):
            parameters["charge"] = charge_of(atoms)
        writer = Vasp(directory=".", **parameters)
        if self.profile.potcar_dir is not None:
            pp = str(writer.input_params["pp"])
            writer.set(pp=str(self.profile.potcar_dir / _POTPAW_FOLDERS.get(pp.lower(), pp)))
        return VaspRunCalculator(writer, self.profile.command)


def user_incar_tags(incar: dict[str, Any]) -> dict[str, Any]:
    """The options' INCAR tags as ASE keywords (lower case). Options may arrive through a protobuf Struct, which
    turns every number into a float; INCAR integers must be written without a decimal point, so whole numbers
    for tags ASE knows as integers become ints again."""
    writer = Vasp()
    integer_tags = writer.int_params
    known = set().union(
        *(
            getattr(writer, group)
            for group in (
                "float_params",
                "exp_params",
                "string_params",
                "int_params",
                "bool_params",
                "list_bool_params",
                "list_int_params",
                "list_float_params",
                "special_params",
                "dict_params",
            )
        )
    )
    tags = {}
    for key, value in incar.items():
        name = key.lower()
        if name not in known:
            raise ValueError(f"option 'incar': {key!r} is not an INCAR tag ASE knows")
        if name in integer_tags and isinstance(value, float) and value.is_integer():
            value = int(value)
        tags[name] = value
    return tags


class VaspRunCalculator(Calculator):
    """Writes the inputs with ASE's Vasp, runs the command in the current directory, reads vasprun.xml."""

    implemented_properties = ["energy", "free_energy", "forces", "stress"]  # noqa: RUF012  (ASE's class attribute)

    def __init__(self, writer: Vasp, command: str) -> None:
        super().__init__()
        self.writer = writer
        self.command = command

    def calculate(
        self,
        atoms: Atoms | None = None,
        properties: list[str] | None = None,
        system_changes: list[str] = all_changes,
    ) -> None:
        super().calculate(atoms, properties or ["energy"], system_changes)
        for name in STALE_OUTPUTS:
            Path(name).unlink(missing_ok=True)
        try:
            self.writer.write_input(self.atoms)
        except (RuntimeError, OSError) as exc:  # ASE raises RuntimeError for a missing POTCAR
            raise UnlabellableStructureError(f"cannot write the VASP inputs: {' '.join(str(exc).split())}") from exc
        with open(VASP_LOG, "wb") as log:
            returncode = subprocess.run(
                self.command, shell=True, stdout=log, stderr=subprocess.STDOUT, env=os.environ
            ).returncode
        try:
            results = read_vasprun(Path(VASPRUN), self.writer.atoms_sorted)
        except CalculatorError as exc:
            if returncode != 0:
                raise CalculatorError(
                    f"{self.command!r} exited with status {returncode} ({exc}){_log_tail()}"
                ) from None
            raise
        resort = np.asarray(self.writer.resort)
        results["forces"] = results["forces"][resort]
        self.results = results


def read_vasprun(path: Path, expected: Atoms) -> dict[str, Any]:
    """Energy (free energy, eV), forces (eV/Å, VASP's atom order) and stress (eV/Å³, ASE's sign, Voigt) of the
    last ionic step of a vasprun.xml, which must be complete, converged and about the `expected` structure."""
    from ase.io import read

    if not path.is_file():
        raise CalculatorError(f"VASP wrote no {path.name}")
    try:
        root = ET.parse(path).getroot()
    except ET.ParseError as exc:
        raise CalculatorError(f"{path.name} is incomplete, VASP stopped before finishing it ({exc})") from None
    steps = root.findall("calculation")
    if not steps or steps[-1].find("energy") is None:
        raise CalculatorError(f"{path.name} holds no completed ionic step")
    nelm_field = root.find("parameters//i[@name='NELM']")
    nelm = int(nelm_field.text or 0) if nelm_field is not None else DEFAULT_NELM
    electronic_steps = len(steps[-1].findall("scstep"))
    if electronic_steps >= nelm:
        raise CalculatorError(f"VASP electronic SCF not converged in NELM = {nelm} steps")
    atoms = read(path, index=-1, format="vasp-xml")
    if not isinstance(atoms, Atoms):
        raise CalculatorError(f"{path.name} holds no single last ionic step")
    _check_same_structure(atoms, expected)
    calc = atoms.calc
    stress = calc.results.get("stress")
    if calc.results.get("forces") is None or stress is None:
        raise CalculatorError(f"{path.name} has no forces or no stress (ISIF >= 1 is needed for stress)")
    free_energy = float(calc.results["free_energy"])
    return {
        "energy": free_energy,
        "free_energy": free_energy,
        "forces": np.array(calc.results["forces"], dtype=np.float64),
        "stress": np.array(stress, dtype=np.float64),
    }


def _check_same_structure(found: Atoms, expected: Atoms) -> None:
    """A vasprun.xml left from another calculation must not label this structure."""
    if len(found) != len(expected) or found.get_chemical_symbols() != expected.get_chemical_symbols():
        raise CalculatorError("vasprun.xml describes other atoms than the structure labelled (a stale output?)")
    shift = found.get_scaled_positions(wrap=False) - expected.get_scaled_positions(wrap=False)
    shift -= np.round(shift)  # the same atom one period further is the same structure
    cell_error = np.abs(np.asarray(found.cell) - np.asarray(expected.cell)).max()
    position_error = np.abs(shift @ np.asarray(expected.cell)).max()
    if max(cell_error, position_error) > STRUCTURE_TOLERANCE_A:
        raise CalculatorError(
            f"vasprun.xml describes another geometry than the structure labelled (cell differs by {cell_error:.2g} Å, "
            f"positions by {position_error:.2g} Å; a stale output?)"
        )


def _log_tail() -> str:
    path = Path(VASP_LOG)
    text = path.read_text(errors="replace").strip()[-300:] if path.is_file() else ""
    return f": {' '.join(text.split())}" if text else ""
