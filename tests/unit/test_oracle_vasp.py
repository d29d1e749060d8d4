"""The vasp backend without VASP: the inputs it writes, the parsing of a recorded vasprun.xml (expected numbers
read from the file's own text, not through ASE), and the whole path with stand-in commands for the VASP binary
(copying the recorded output, writing a vasprun.xml for whatever POSCAR it finds, writing nothing); the recorded
output, the fake POTCARs and the stand-ins are in tests/vasp_recorded.py.
"""

from __future__ import annotations

import math
import re
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
from ase import Atoms
from ase.io import read

from pyacemaker.config import VaspOracleConfig
from pyacemaker.labels import LabelStatus
from pyacemaker.services.oracle.backends.vasp import VaspBackend, read_vasprun
from pyacemaker.services.oracle.deployment import VaspProfile
from tests.vasp_recorded import (
    KPOINT_SPACING,
    RECORDED,
    recorded_structure,
    recorded_values,
    stand_in,
    vasp_backend,
    write_fake_potcars,
)

GPA_PER_EV_A3 = 160.21766208
GPA_PER_KBAR = 0.1

OK, FAILED = LabelStatus.OK, LabelStatus.FAILED


@pytest.fixture
def potcar_dir(tmp_path: Path) -> Path:
    return write_fake_potcars(tmp_path / "potcars")


@pytest.fixture
def workdir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """The backend writes and runs in the current directory, as in an executor's scratch directory."""
    directory = tmp_path / "calc"
    directory.mkdir()
    monkeypatch.chdir(directory)
    return directory


def ase_stress_from_kbar(stress_kbar: np.ndarray) -> np.ndarray:
    """VASP prints stress in kbar, positive under compression; ASE's convention has the opposite sign."""
    voigt = stress_kbar[[0, 1, 2, 1, 0, 0], [0, 1, 2, 2, 2, 1]]
    return -voigt * GPA_PER_KBAR / GPA_PER_EV_A3


def incar_tags() -> dict[str, str]:
    """The INCAR in the current directory as tag → value text."""
    lines = [line.split("=", 1) for line in Path("INCAR").read_text().splitlines() if "=" in line]
    return {key.strip(): value.strip() for key, value in lines}


def test_inputs_follow_the_options_and_the_structure(tmp_path: Path, potcar_dir: Path, workdir: Path) -> None:
    atoms = Atoms(
        "CSiC",
        positions=[[0.1, 0.2, 0.3], [1.5, 1.4, 1.6], [2.9, 2.8, 0.2]],
        cell=[[4.4, 0.1, 0.0], [0.0, 4.3, 0.2], [0.1, 0.0, 4.5]],
        pbc=True,
    )
    atoms.info["charge"] = -1
    labels = vasp_backend(potcar_dir, "true").label(atoms)  # `true` writes no output
    assert labels.status == FAILED and "wrote no vasprun.xml" in labels.reason

    incar = incar_tags()
    assert float(incar["ENCUT"]) == 300.0
    assert (incar["ISMEAR"], float(incar["SIGMA"]), incar["PREC"]) == ("0", 0.05, "Accurate")
    assert (incar["IBRION"], incar["NSW"], incar["ISIF"], incar["GGA"]) == ("-1", "0", "2", "PE")
    assert float(incar["NELECT"]) == 3 * 4.0 + 1  # valences from the POTCARs plus one electron for charge −1

    kpoints = Path("KPOINTS").read_text().splitlines()
    reciprocal = np.linalg.inv(np.asarray(atoms.cell)).T
    grid = [math.ceil(2 * math.pi * np.linalg.norm(b) / KPOINT_SPACING) for b in reciprocal]
    assert kpoints[2].strip() == "Gamma"
    assert [int(n) for n in kpoints[3].split()] == grid

    # POSCAR lists the elements in order of first appearance, each element's atoms in input order.
    poscar = read("POSCAR", format="vasp")
    order = [0, 2, 1]
    assert poscar.get_chemical_symbols() == ["C", "C", "Si"]
    np.testing.assert_allclose(poscar.positions, atoms.positions[order], atol=1e-8)
    np.testing.assert_allclose(poscar.cell, atoms.cell, atol=1e-8)
    potcar_markers = re.findall(r"fake potential of (\w+)", Path("POTCAR").read_text())
    assert potcar_markers == ["C", "Si"]


def test_the_recorded_vasprun_is_parsed_into_ase_units() -> None:
    values = recorded_values(RECORDED.read_text())
    results = read_vasprun(RECORDED, recorded_structure())
    # The free energy, which the forces are the derivative of, not the σ→0 extrapolation.
    assert results["energy"] == pytest.approx(values["free_energy"], abs=1e-9)
    assert results["energy"] != pytest.approx(values["sigma0_energy"], abs=1e-6)
    np.testing.assert_allclose(results["forces"], values["forces"], atol=1e-9)
    np.testing.assert_allclose(results["stress"], ase_stress_from_kbar(values["stress_kbar"]), rtol=1e-8, atol=1e-12)
    print(f"vasp recorded: E = {results['energy']} eV, stress = {results['stress']} eV/Å³")


def test_the_whole_path_with_a_stand_in_that_copies_the_recorded_output(
    tmp_path: Path, potcar_dir: Path, workdir: Path
) -> None:
    command = stand_in(tmp_path, "vasp_copy.sh", f"cp '{RECORDED}' vasprun.xml\n")
    backend = vasp_backend(potcar_dir, command)
    labels = backend.label_with_retries(recorded_structure(), max_retries=2)
    assert (labels.status, labels.attempts) == (OK, 1), labels.reason
    values = recorded_values(RECORDED.read_text())
    assert labels.energy == pytest.approx(values["free_energy"], abs=1e-9)
    np.testing.assert_allclose(labels.forces, values["forces"], atol=1e-9)
    np.testing.assert_allclose(labels.stress, ase_stress_from_kbar(values["stress_kbar"]), rtol=1e-8, atol=1e-12)
    assert labels.level_of_theory == "vasp:PBE;encut=300.0eV,dk=1.1/A;ISMEAR=0,PREC=Accurate,SIGMA=0.05"
    assert [int(n) for n in Path("KPOINTS").read_text().splitlines()[3].split()] == [2, 2, 2]


FAKE_VASP = """
import sys
import xml.etree.ElementTree as ET
from ase.io import read

# Stands in for VASP: the recorded vasprun.xml, rewritten for the atoms of ./POSCAR (in VASP's order), with the
# force on each atom equal to 0.1 × its Cartesian position, so that the caller's reordering can be checked.
atoms = read("POSCAR", format="vasp")
tree = ET.parse(sys.argv[1])
root = tree.getroot()
rows = root.find("atominfo/array[@name='atoms']/set")
for row in list(rows):
    rows.remove(row)
for symbol in atoms.get_chemical_symbols():
    ET.SubElement(ET.SubElement(rows, "rc"), "c").text = symbol
root.find("atominfo/atoms").text = str(len(atoms))
def fill(varray, values):
    for v in list(varray):
        varray.remove(v)
    for row in values:
        ET.SubElement(varray, "v").text = " ".join(f"{x:.10f}" for x in row)
for structure in root.iter("structure"):
    fill(structure.find("crystal/varray[@name='basis']"), atoms.cell)
    fill(structure.find("varray[@name='positions']"), atoms.get_scaled_positions(wrap=False))
fill(root.find("calculation/varray[@name='forces']"), 0.1 * atoms.positions)
tree.write("vasprun.xml")
"""


def test_results_come_back_in_the_input_atom_order(tmp_path: Path, potcar_dir: Path, workdir: Path) -> None:
    script = tmp_path / "fake_vasp.py"
    script.write_text(FAKE_VASP)
    atoms = Atoms(
        "SiCSiC",
        scaled_positions=[[0.0, 0.0, 0.0], [0.25, 0.25, 0.25], [0.5, 0.5, 0.0], [0.75, 0.75, 0.25]],
        cell=[[0.0, 4.3, 4.3], [4.3, 0.0, 4.3], [4.3, 4.3, 0.0]],
        pbc=True,
    )
    atoms.rattle(0.02, seed=5)
    labels = vasp_backend(potcar_dir, f"{sys.executable} {script} {RECORDED}").label(atoms)
    assert labels.status == OK, labels.reason
    np.testing.assert_allclose(labels.forces, 0.1 * atoms.positions, atol=1e-8)


def test_an_unconverged_run_fails_and_a_retry_with_escalated_tags_heals_it(
    tmp_path: Path, potcar_dir: Path, workdir: Path
) -> None:
    text = RECORDED.read_text()
    steps = text.count("<scstep>")
    unconverged = tmp_path / "unconverged.xml"
    # The same run as VASP would record it had it stopped at NELM = number of electronic steps it made.
    unconverged.write_text(re.sub(r'(<i type="int" name="NELM">)\s*\d+', rf"\g<1>     {steps}", text))
    # Like a real VASP, the stand-in converges only with the escalated settings of the first retry.
    command = stand_in(
        tmp_path,
        "vasp_hard.sh",
        f"if grep -q '^ALGO = Normal' INCAR && grep -q '^NELM = 120' INCAR; "
        f"then cp '{RECORDED}' vasprun.xml; else cp '{unconverged}' vasprun.xml; fi\n",
    )
    backend = vasp_backend(potcar_dir, command)
    first = backend.label(recorded_structure())
    assert first.status == FAILED
    assert f"not converged in NELM = {steps} steps" in first.reason
    assert backend.label_with_retries(recorded_structure(), max_retries=0).attempts == 1
    healed = backend.label_with_retries(recorded_structure(), max_retries=3)
    assert (healed.status, healed.attempts) == (OK, 2), healed.reason
    assert healed.energy == pytest.approx(recorded_values(text)["free_energy"], abs=1e-9)
    assert healed.level_of_theory == first.level_of_theory
    incar = incar_tags()  # the first retry's, which converged
    assert (incar["ALGO"], int(incar["NELM"]), float(incar["AMIX"]), float(incar["BMIX"])) == ("Normal", 120, 0.2, 1e-4)
    assert (float(incar["ENCUT"]), incar["ISMEAR"], float(incar["SIGMA"])) == (300.0, "0", 0.05)


def test_a_crashed_run_fails_with_its_exit_status_and_output(tmp_path: Path, potcar_dir: Path, workdir: Path) -> None:
    command = stand_in(tmp_path, "vasp_crash.sh", "echo 'VERY BAD NEWS! internal error in subroutine' ; exit 3\n")
    labels = vasp_backend(potcar_dir, command).label_with_retries(recorded_structure(), max_retries=1)
    assert (labels.status, labels.attempts) == (FAILED, 2)
    assert "exited with status 3" in labels.reason and "wrote no vasprun.xml" in labels.reason
    assert "VERY BAD NEWS" in labels.reason


def test_a_truncated_vasprun_fails(tmp_path: Path, potcar_dir: Path, workdir: Path) -> None:
    truncated = tmp_path / "truncated.xml"
    text = RECORDED.read_text()
    truncated.write_text(text[: text.index('<varray name="forces"')])
    command = stand_in(tmp_path, "vasp_killed.sh", f"cp '{truncated}' vasprun.xml\n")
    labels = vasp_backend(potcar_dir, command).label(recorded_structure())
    assert labels.status == FAILED and "incomplete" in labels.reason


def test_output_of_another_structure_is_refused(tmp_path: Path, potcar_dir: Path, workdir: Path) -> None:
    command = stand_in(tmp_path, "vasp_stale.sh", f"cp '{RECORDED}' vasprun.xml\n")
    other = recorded_structure()
    other.positions[1] += [0.01, 0.0, 0.0]
    labels = vasp_backend(potcar_dir, command).label(other)
    assert labels.status == FAILED and "another geometry" in labels.reason


def test_a_missing_potcar_fails_without_retries(tmp_path: Path, potcar_dir: Path, workdir: Path) -> None:
    shutil.rmtree(potcar_dir / "potpaw_PBE" / "C")
    atoms = recorded_structure()
    atoms.symbols[1] = "C"
    labels = vasp_backend(potcar_dir, "true").label_with_retries(atoms, max_retries=2)
    assert (labels.status, labels.attempts) == (FAILED, 1)
    assert "POTCAR" in labels.reason or "pseudopotential" in labels.reason


def test_integer_tags_from_a_protobuf_struct_are_written_as_integers(potcar_dir: Path, workdir: Path) -> None:
    # A protobuf Struct carries every number as a double.
    backend = vasp_backend(potcar_dir, "true", incar={"NELM": 80.0, "ISMEAR": 0.0, "SIGMA": 0.05})
    backend.label(recorded_structure())
    assert (incar_tags()["NELM"], incar_tags()["ISMEAR"]) == ("80", "0")


def test_a_molecule_without_a_cell_is_refused() -> None:
    config_ = VaspOracleConfig(backend="vasp")
    labels = VaspBackend(config_, VaspProfile(command="true")).label(Atoms("H2", positions=[[0, 0, 0], [0.74, 0, 0]]))
    assert labels.status == FAILED and "periodic" in labels.reason
