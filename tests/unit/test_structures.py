"""ase.Atoms ⇄ Structure/Labels conversion: lossless round trips, charge/spin kept, content ids stable."""

from __future__ import annotations

import numpy as np
import pytest
from ase import Atoms
from ase.build import bulk, molecule
from ase.calculators.singlepoint import SinglePointCalculator

from pyacemaker.structures import (
    StructureFileError,
    atoms_to_structure,
    attach_labels,
    content_id,
    default_spin_multiplicity,
    labels_of_atoms,
    read_structures,
    structure_to_atoms,
    write_extxyz,
)
from pyacemaker.v1 import common_pb2


def _sn2_like() -> Atoms:
    atoms = molecule("CH3Cl")
    atoms += Atoms("Cl", positions=[[0.0, 0.0, -3.2]])
    atoms.info.update(
        charge=-1,
        spin_multiplicity=1,
        note="seed",
        weights=np.array([1.5, 2.0]),
        step=np.int64(7),
        nested={"a": [1, 2]},
    )
    atoms.set_tags([0, 1, 1, 1, 2, 3])
    atoms.set_initial_magnetic_moments(np.linspace(0, 0.5, 6))
    return atoms


def test_round_trip_is_lossless_through_the_wire_bytes():
    atoms = _sn2_like()
    wire = atoms_to_structure(atoms).SerializeToString()
    back = structure_to_atoms(common_pb2.Structure.FromString(wire))
    assert back.numbers.tolist() == atoms.numbers.tolist()
    np.testing.assert_array_equal(back.positions, atoms.positions)  # bit-exact, not approximately
    np.testing.assert_array_equal(back.cell.array, atoms.cell.array)
    assert back.pbc.tolist() == atoms.pbc.tolist()
    assert back.info["charge"] == -1 and back.info["spin_multiplicity"] == 1
    assert back.info["note"] == "seed" and back.info["nested"] == {"a": [1, 2]}
    np.testing.assert_array_equal(back.info["weights"], atoms.info["weights"])
    assert back.info["step"] == 7 and isinstance(back.info["step"], np.int64)
    assert back.get_tags().tolist() == [0, 1, 1, 1, 2, 3]
    np.testing.assert_array_equal(back.get_initial_magnetic_moments(), atoms.get_initial_magnetic_moments())


def test_periodic_round_trip_and_content_id():
    atoms = bulk("Si", "diamond", a=5.43) * (2, 1, 1)
    atoms.rattle(0.01, seed=1)
    message = atoms_to_structure(atoms)
    back = structure_to_atoms(message)
    np.testing.assert_array_equal(back.cell.array, atoms.cell.array)
    assert back.pbc.all()
    assert message.content_id == content_id(back)
    moved = atoms.copy()
    moved.positions[0, 0] += 1e-3
    assert content_id(moved) != message.content_id


def test_content_id_depends_on_charge_and_spin():
    neutral = molecule("H2O")
    anion = neutral.copy()
    anion.info["charge"] = -1
    triplet = neutral.copy()
    triplet.info["spin_multiplicity"] = 3
    assert len({content_id(neutral), content_id(anion), content_id(triplet)}) == 3


def test_default_spin_multiplicity_follows_electron_parity():
    assert default_spin_multiplicity([6, 1, 1, 1, 17, 17], -1) == 1  # 44 electrons
    assert default_spin_multiplicity([6, 1, 1, 1], 0) == 2  # methyl radical, 9 electrons


def test_labels_round_trip_in_ev_units():
    atoms = bulk("Cu", "fcc", a=3.6)
    forces = np.array([[0.1, -0.2, 0.3]])
    stress = np.array([0.01, 0.02, 0.03, 0.004, 0.005, 0.006])
    atoms.calc = SinglePointCalculator(atoms, energy=-3.5, forces=forces, stress=stress)
    labels = labels_of_atoms(atoms, "test:level")
    assert labels.ok and labels.energy == -3.5
    bare = atoms.copy()
    attach_labels(bare, labels)
    assert bare.get_potential_energy() == -3.5
    np.testing.assert_array_equal(bare.get_forces(), forces)
    np.testing.assert_array_equal(bare.get_stress(), stress)
    assert bare.info["level_of_theory"] == "test:level"


def test_labelled_extxyz_file_keeps_labels_and_charge(tmp_path):
    atoms = _sn2_like()
    atoms.calc = SinglePointCalculator(atoms, energy=-10.0, forces=np.ones((6, 3)))
    path = tmp_path / "out.extxyz"
    write_extxyz(path, [atoms])
    (back,) = read_structures(path)
    assert back.get_potential_energy() == -10.0
    assert back.info["charge"] == -1


def test_malformed_file_error_names_the_file(tmp_path):
    bad = tmp_path / "bad.xyz"
    bad.write_text("3\ncomment\nC 0 0\n")
    with pytest.raises(StructureFileError, match=str(bad)):
        read_structures(bad)
    with pytest.raises(StructureFileError, match="no such file"):
        read_structures(tmp_path / "missing.xyz")


def test_atom_ground_state_multiplicities_follow_hunds_rule():
    from pyacemaker.structures import atom_ground_state_multiplicity

    expected = {1: 2, 2: 1, 6: 3, 7: 4, 8: 3, 9: 2, 14: 3, 17: 2, 18: 1, 24: 7, 26: 5, 29: 2, 35: 2}
    assert {z: atom_ground_state_multiplicity(z) for z in expected} == expected


def test_bounded_batches_cut_by_count_and_by_atoms_and_keep_a_too_large_structure_alone() -> None:
    from pyacemaker.structures import bounded_batches

    def spans(sizes: list[int], count: int, atoms: int) -> list[tuple[int, int]]:
        return [(batch.start, batch.stop) for batch in bounded_batches(sizes, count, atoms)]

    assert spans([6] * 10, 4, 4096) == [(0, 4), (4, 8), (8, 10)]  # molecules: by count
    assert spans([216] * 5, 64, 500) == [(0, 2), (2, 4), (4, 5)]  # large cells: by atoms
    assert spans([5000, 10, 10, 4090], 64, 4096) == [(0, 1), (1, 3), (3, 4)]  # one alone may exceed the bound
    assert spans([], 4, 10) == []
