"""The qe backend against pw.x run directly by the test on an input file the test writes itself, whose output the
test parses with its own regular expressions and converts with explicitly written constants; and the detection
of an SCF that does not converge, with a retry that heals it.

Bulk Si (2 atoms, LDA norm-conserving pseudopotential from Debian's quantum-espresso-data), strained and rattled
so that forces and stress are far from zero, at a 12 Ry cutoff and a 2×2×2 grid: each pw.x run takes ~0.5 s.
"""

from __future__ import annotations

import math
import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
from ase import Atoms
from ase.build import bulk
from ase.units import GPa, Rydberg

from pyacemaker.config import QeOracleConfig
from pyacemaker.labels import LabelStatus
from pyacemaker.services.oracle.backends.base import monkhorst_pack_grid
from pyacemaker.services.oracle.backends.qe import CONV_THR_RY_PER_ATOM, QeBackend
from pyacemaker.services.oracle.deployment import QeProfile

PSEUDO_DIR = Path("/usr/share/espresso/pseudo")
SI_PSEUDO = "Si.pz-vbc.UPF"
if shutil.which("pw.x") is None or not (PSEUDO_DIR / SI_PSEUDO).is_file():
    pytest.skip(
        f"pw.x or {PSEUDO_DIR / SI_PSEUDO} is missing: install the Debian packages quantum-espresso and "
        "quantum-espresso-data (make install-system)",
        allow_module_level=True,
    )

# CODATA 2018, written out so that the reference does not depend on ase.units.
RYDBERG_EV = 13.605693122994
BOHR_A = 0.529177210903
GPA_PER_EV_A3 = 160.21766208  # 1 eV/Å³ in GPa
GPA_PER_KBAR = 0.1
ECUTWFC_RY = 12.0
KPOINT_SPACING = 1.5  # Å⁻¹, gives 2×2×2 here

OK, FAILED = LabelStatus.OK, LabelStatus.FAILED


def config(**options: object) -> QeOracleConfig:
    return QeOracleConfig.model_validate(
        {
            "backend": "qe",
            "pseudopotentials": {"Si": SI_PSEUDO},
            "ecutwfc_ry": ECUTWFC_RY,
            "kpoint_spacing": KPOINT_SPACING,
            **options,
        }
    )


def strained_silicon() -> Atoms:
    atoms = bulk("Si", "diamond", a=5.43)
    strain = np.array([[0.01, 0.005, 0.0], [0.005, -0.01, 0.0], [0.0, 0.0, 0.02]])
    atoms.set_cell(np.asarray(atoms.cell) @ (np.eye(3) + strain), scale_atoms=True)
    atoms.rattle(0.05, seed=2)
    return atoms


def direct_pw_input(atoms: Atoms, grid: tuple[int, int, int], conv_thr: float) -> str:
    cell = "\n".join(" ".join(f"{x:.12f}" for x in row) for row in np.asarray(atoms.cell))
    positions = "\n".join(f"Si {x:.12f} {y:.12f} {z:.12f}" for x, y, z in atoms.positions)
    return f"""&CONTROL
  calculation = 'scf'
  tprnfor = .true.
  tstress = .true.
  pseudo_dir = '{PSEUDO_DIR}'
  outdir = './out'
  disk_io = 'none'
/
&SYSTEM
  ibrav = 0
  nat = {len(atoms)}
  ntyp = 1
  ecutwfc = {ECUTWFC_RY}
  ecutrho = {4 * ECUTWFC_RY}
/
&ELECTRONS
  conv_thr = {conv_thr:.3e}
/
ATOMIC_SPECIES
Si 28.0855 {SI_PSEUDO}
CELL_PARAMETERS angstrom
{cell}
ATOMIC_POSITIONS angstrom
{positions}
K_POINTS automatic
{grid[0]} {grid[1]} {grid[2]} 0 0 0
"""


def run_pw_directly(atoms: Atoms, grid: tuple[int, int, int], directory: Path) -> dict[str, np.ndarray | float]:
    """pw.x on the test's own input; its output parsed here: Ry, Ry/Bohr, Ry/Bohr³ and kbar as printed."""
    directory.mkdir()
    (directory / "si.pwi").write_text(direct_pw_input(atoms, grid, CONV_THR_RY_PER_ATOM * len(atoms)))
    output = subprocess.run(["pw.x", "-in", "si.pwi"], cwd=directory, capture_output=True, text=True, check=True).stdout
    energy_ry = float(re.search(r"^!\s+total energy\s+=\s+(\S+) Ry", output, re.M).group(1))
    force_block = output.split("Forces acting on atoms (cartesian axes, Ry/au):")[1]
    forces = re.findall(r"atom\s+\d+ type\s+\d+\s+force =\s+(\S+)\s+(\S+)\s+(\S+)", force_block)[: len(atoms)]
    stress_match = re.search(r"total\s+stress\s+\(Ry/bohr\*\*3\)\s+\(kbar\)\s+P=\s*(\S+)\n((?:.*\n){3})", output)
    rows = [[float(x) for x in line.split()] for line in stress_match.group(2).splitlines()]
    return {
        "energy_ry": energy_ry,
        "forces_ry_bohr": np.array(forces, dtype=float),
        "stress_ry_bohr3": np.array([row[:3] for row in rows]),
        "stress_kbar": np.array([row[3:] for row in rows]),
        "pressure_kbar": float(stress_match.group(1)),
    }


def voigt(tensor: np.ndarray) -> np.ndarray:
    return tensor[[0, 1, 2, 1, 0, 0], [0, 1, 2, 2, 2, 1]]


def test_ase_units_rydberg_and_gpa_agree_with_the_written_constants() -> None:
    # ase.units is CODATA 2014; the written constants are CODATA 2018: they agree to 1e-8.
    assert Rydberg == pytest.approx(RYDBERG_EV, rel=1e-8)
    assert 1 / GPa == pytest.approx(GPA_PER_EV_A3, rel=1e-8)
    one_kbar_in_ev_a3 = GPA_PER_KBAR / GPA_PER_EV_A3
    assert one_kbar_in_ev_a3 == pytest.approx(6.241509e-4, rel=1e-6)


def test_kpoint_grid_from_spacing() -> None:
    atoms = strained_silicon()
    reciprocal = np.linalg.inv(np.asarray(atoms.cell)).T  # rows b_i / 2π
    expected = tuple(math.ceil(2 * math.pi * np.linalg.norm(b) / KPOINT_SPACING) for b in reciprocal)
    assert monkhorst_pack_grid(atoms, KPOINT_SPACING) == expected == (2, 2, 2)
    assert monkhorst_pack_grid(atoms, 0.25) == tuple(
        math.ceil(2 * math.pi * np.linalg.norm(b) / 0.25) for b in reciprocal
    )
    slab = atoms.copy()
    slab.pbc = [True, True, False]
    assert monkhorst_pack_grid(slab, KPOINT_SPACING)[2] == 1


def test_energy_forces_and_stress_equal_a_direct_pw_run_in_ev_units(tmp_path: Path, monkeypatch) -> None:
    atoms = strained_silicon()
    direct = run_pw_directly(atoms, (2, 2, 2), tmp_path / "direct")
    workdir = tmp_path / "backend"
    workdir.mkdir()
    monkeypatch.chdir(workdir)  # the backend runs pw.x in the current directory
    labels = QeBackend(config()).label(atoms)
    assert labels.status == OK, labels.reason
    assert (workdir / "espresso.pwo").is_file()

    energy = direct["energy_ry"] * RYDBERG_EV
    forces = direct["forces_ry_bohr"] * RYDBERG_EV / BOHR_A
    # pw.x prints the stress positive under compression; ASE's (and the Labels') sign is the opposite.
    stress = -voigt(direct["stress_ry_bohr3"]) * RYDBERG_EV / BOHR_A**3
    stress_from_kbar = -voigt(direct["stress_kbar"]) * GPA_PER_KBAR / GPA_PER_EV_A3
    backend_stress = np.array(labels.stress)
    print(
        f"qe Si: energy backend - direct = {labels.energy - energy:.2e} eV; "
        f"max force diff = {np.abs(labels.forces - forces).max():.2e} eV/Å; "
        f"max stress diff = {np.abs(backend_stress - stress).max():.2e} eV/Å³ (Ry/bohr³ column), "
        f"{np.abs(backend_stress - stress_from_kbar).max():.2e} eV/Å³ (kbar column)"
    )
    assert labels.energy == pytest.approx(energy, abs=1e-5)
    np.testing.assert_allclose(labels.forces, forces, atol=1e-4)
    assert np.abs(forces).max() > 0.5
    np.testing.assert_allclose(backend_stress, stress, atol=1e-6)
    # The kbar column has two decimals: 0.005 kbar is 3.1e-6 eV/Å³.
    np.testing.assert_allclose(backend_stress, stress_from_kbar, atol=0.0051 * GPA_PER_KBAR / GPA_PER_EV_A3)
    assert np.abs(stress).max() > 1e-3
    # pw.x's pressure is +1/3 of its printed trace, so -1/3 of the trace of the ASE-convention stress.
    pressure_kbar = -backend_stress[:3].mean() * GPA_PER_EV_A3 / GPA_PER_KBAR
    assert pressure_kbar == pytest.approx(direct["pressure_kbar"], abs=0.006)
    assert labels.level_of_theory == "qe:Si=Si.pz-vbc.UPF;ecutwfc=12.0Ry,ecutrho=48.0Ry,dk=1.5/A"


def test_an_unconverged_scf_is_detected_and_a_retry_heals_it(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    atoms = strained_silicon()
    starved = QeBackend(config(electron_maxstep=2))
    first = starved.label(atoms)
    assert first.status == FAILED
    assert "convergence NOT achieved after 2 iterations" in first.reason
    assert starved.label_with_retries(atoms, max_retries=0).attempts == 1
    healed = starved.label_with_retries(atoms, max_retries=2)
    assert (healed.status, healed.attempts) == (OK, 2), healed.reason
    pw_input = Path("espresso.pwi").read_text()
    assert re.search(r"electron_maxstep\s*=\s*200", pw_input) and re.search(r"mixing_beta\s*=\s*0.3", pw_input)
    reference = QeBackend(config()).label(atoms)
    assert healed.energy == pytest.approx(reference.energy, abs=1e-5)
    np.testing.assert_allclose(healed.forces, reference.forces, atol=1e-4)
    assert healed.level_of_theory == first.level_of_theory == reference.level_of_theory


def test_an_element_without_a_pseudopotential_fails_without_retries(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    atoms = strained_silicon()
    atoms.symbols[1] = "C"
    labels = QeBackend(config()).label_with_retries(atoms, max_retries=2)
    assert (labels.status, labels.attempts) == (FAILED, 1)
    assert "no pseudopotential for C" in labels.reason


def test_a_pw_error_is_reported_with_its_message(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    pools = QeProfile(command="pw.x -nk 7", pseudo_dir=PSEUDO_DIR)  # more pools than processes
    labels = QeBackend(config(), pools).label(strained_silicon())
    assert labels.status == FAILED
    assert "pw.x stopped: Error in routine" in labels.reason
