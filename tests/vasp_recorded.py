"""VASP without VASP, for the vasp backend's tests and the oracle conformance suite: a recorded vasprun.xml
(expected numbers read from the file's own text, not through ASE), a fake POTCAR directory and stand-in
commands for the VASP binary.

POTCARs are licensed, so `write_fake_potcars` builds a VASP_PP_PATH whose POTCARs hold just the header lines ASE
reads (TITEL and, four lines below, POMASS/ZVAL) and a marker line that shows which file went where.
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
from ase import Atoms

from pyacemaker.config import VaspOracleConfig
from pyacemaker.services.oracle.backends.vasp import VaspBackend
from pyacemaker.services.oracle.deployment import VaspProfile

RECORDED = Path(__file__).parent / "data" / "vasp" / "vasprun.xml"
VALENCE = {"Si": 4.0, "C": 4.0}
KPOINT_SPACING = 1.1  # Å⁻¹; 2×2×2 for the recorded cell


def write_fake_potcars(root: Path) -> Path:
    """A POTCAR directory (potpaw_PBE/<element>/POTCAR) for the elements of VALENCE under `root`."""
    for element, zval in VALENCE.items():
        folder = root / "potpaw_PBE" / element
        folder.mkdir(parents=True)
        (folder / "POTCAR").write_text(
            f"""  PAW_PBE {element} 05Jan2001
 {zval:.17f}
 parameters from PSCTR are:
   VRHFIN ={element}: s2p2
   LEXCH  = PE
   EATOM  =   103.0669 eV,    7.5752 Ry

   TITEL  = PAW_PBE {element} 05Jan2001
   LULTRA =        F    use ultrasoft PP ?
   IUNSCR =        1    unscreen: 0-lin 1-nonlin 2-no
   RPACOR =    1.500    partial core radius
   POMASS =   28.085; ZVAL   =    {zval:.3f}    mass and valenz
 fake potential of {element} for tests
 End of Dataset
"""
        )
    return root


def vasp_backend(potcar_dir: Path, command: str, **options: object) -> VaspBackend:
    """The backend with the options of a request and a deployment profile that runs `command` (the deployment's
    setting, never a request's)."""
    config = VaspOracleConfig.model_validate(
        {
            "backend": "vasp",
            "encut_ev": 300.0,
            "kpoint_spacing": KPOINT_SPACING,
            "incar": {"ISMEAR": 0, "SIGMA": 0.05, "PREC": "Accurate"},
            **options,
        }
    )
    return VaspBackend(config, VaspProfile(command=command, potcar_dir=potcar_dir))


def vectors(text: str, name: str, occurrence: int = -1) -> np.ndarray:
    """Rows of the `occurrence`-th <varray name=...> of a vasprun.xml text, parsed by regex."""
    blocks = re.findall(rf'<varray name="{name}" >(.*?)</varray>', text, re.S)
    return np.array([[float(x) for x in row.split()] for row in re.findall(r"<v>(.*?)</v>", blocks[occurrence])])


def recorded_values(text: str) -> dict[str, object]:
    """The recorded cell, fractional positions, free energy, forces (eV/Å) and stress (kbar, VASP's sign)."""
    final_energy_block = text.split("</scstep>")[-1].split("<energy>")[1]

    def energy(name: str) -> float:
        match = re.search(rf'name="{name}">\s*(\S+)', final_energy_block)
        assert match is not None, f"no {name} in the recorded vasprun.xml"
        return float(match.group(1))

    return {
        "cell": vectors(text, "basis", 0),
        "scaled_positions": vectors(text, "positions", 0),
        "free_energy": energy("e_fr_energy"),
        "sigma0_energy": energy("e_0_energy"),
        "forces": vectors(text, "forces"),
        "stress_kbar": vectors(text, "stress"),
    }


def recorded_structure() -> Atoms:
    values = recorded_values(RECORDED.read_text())
    return Atoms("Si2", cell=values["cell"], scaled_positions=values["scaled_positions"], pbc=True)


def stand_in(directory: Path, name: str, body: str) -> str:
    """An executable shell script `name` in `directory` that stands in for the VASP command."""
    script = directory / name
    script.write_text("#!/bin/sh\n" + body)
    script.chmod(0o755)
    return str(script)
