"""check_structure: each structure that crashed, hung or fooled a service (issue 15) is refused with a message
naming the field; sane structures, small crystals included, pass."""

from __future__ import annotations

import math

import numpy as np
import pytest
from ase import Atoms
from ase.build import bulk, molecule

from pyacemaker.structure_checks import (
    MAX_NEIGHBOURS_PER_ATOM,
    StructureCheckError,
    StructureLimits,
    check_structure,
    estimated_neighbours_per_atom,
)
from pyacemaker.structures import atoms_to_structure, charge_of, structure_to_atoms
from pyacemaker.v1 import common_pb2
from tests.conftest import sn2_seeds


def h2() -> Atoms:
    return Atoms("H2", positions=[[0, 0, 0], [0, 0, 0.74]])


@pytest.mark.parametrize(
    "atoms",
    [h2(), molecule("CH4"), sn2_seeds()[1], bulk("Si", "diamond", a=5.43), bulk("Cu", "fcc", a=3.6) * (3, 3, 3)],
    ids=["H2", "CH4", "SN2 TS", "Si primitive", "Cu 3x3x3"],
)
def test_sane_structures_pass(atoms: Atoms) -> None:
    check_structure(atoms, StructureLimits(cutoff=10.0))


def with_info(atoms: Atoms, **info: object) -> Atoms:
    atoms.info.update(info)
    return atoms


@pytest.mark.parametrize(
    ("atoms", "expected"),
    [
        (with_info(h2(), charge=-(2**31)), "charge -2147483648 adds 2147483648 electrons"),
        (with_info(h2(), charge=3), "charge 3 removes more electrons than the structure has (2)"),
        (with_info(h2(), charge=1.5), "charge must be an integer, got 1.5"),
        (with_info(h2(), spin_multiplicity=2), "spin_multiplicity 2 is impossible with 2 electrons"),
        (with_info(h2(), spin_multiplicity=-1), "spin_multiplicity -1 is impossible"),
        (Atoms(numbers=[0, 1], positions=[[0, 0, 0], [0, 0, 1]]), "atomic_numbers: 0 is not an element (1..118)"),
        (Atoms(numbers=[-1, 1], positions=[[0, 0, 0], [0, 0, 1]]), "atomic_numbers: -1 is not an element"),
        (Atoms(numbers=[119, 1], positions=[[0, 0, 0], [0, 0, 1]]), "atomic_numbers: 119 is not an element"),
        (Atoms(), "the structure has no atoms"),
        (Atoms("H2", positions=[[0, 0, 0], [0, 0, math.nan]]), "positions: atom 1 has a non-finite coordinate"),
        (Atoms("H2", positions=[[0, 0, 0], [0, 0, 1e300]]), "positions: a coordinate of 1e+300 Å exceeds"),
        (Atoms("H2", positions=[[0, 0, 0], [0, 0, 0.74]], cell=np.eye(3) * math.nan), "cell: has a non-finite value"),
        (Atoms("H2", cell=[[3, 0, 0], [6, 0, 0], [0, 0, 3]], pbc=True), "cell: the periodic lattice vectors (abc)"),
    ],
)
def test_each_defect_is_refused_naming_the_field(atoms: Atoms, expected: str) -> None:
    with pytest.raises(StructureCheckError) as error:
        check_structure(atoms)
    assert expected in str(error.value)


@pytest.mark.parametrize("side", [0.01, 0.1])
def test_a_tiny_periodic_cell_is_refused_before_any_neighbour_list(side: float) -> None:
    atoms = Atoms("H2", positions=[[0, 0, 0], [0, 0, side / 2]], cell=np.eye(3) * side, pbc=True)
    with pytest.raises(StructureCheckError, match="the cell is far too small"):
        check_structure(atoms, StructureLimits(cutoff=5.0))


def test_the_neighbour_estimate_is_density_times_the_ball() -> None:
    # Independent count: fcc Cu (a = 3.6 Å) has 12 + 6 + 24 + 12 = 54 neighbours within 5.2 Å (four shells).
    atoms = bulk("Cu", "fcc", a=3.6, cubic=True)
    estimate = estimated_neighbours_per_atom(len(atoms), atoms.get_volume(), 3, 5.2)
    assert estimate == pytest.approx(4 / 3.6**3 * 4 / 3 * math.pi * 5.2**3)
    assert 40 < estimate < 70  # the continuum estimate is within the shell structure of the exact 54
    # A chain of period L: 2 r_c / L copies of each atom.
    assert estimated_neighbours_per_atom(1, 2.5, 1, 5.0) == pytest.approx(4.0)
    # The limit sits far above dense matter: diamond within 10 Å is ~740.
    diamond = bulk("C", "diamond", a=3.567)
    assert estimated_neighbours_per_atom(2, diamond.get_volume(), 3, 10.0) < MAX_NEIGHBOURS_PER_ATOM / 2


def test_a_periodic_slab_uses_its_area() -> None:
    slab = Atoms("H2", positions=[[0, 0, 0], [0, 0, 0.74]], cell=[0.05, 0.05, 0], pbc=[True, True, False])
    with pytest.raises(StructureCheckError, match=r"Å² cell area"):
        check_structure(slab)


def test_backend_elements_and_atom_count() -> None:
    limits = StructureLimits(elements=frozenset(range(1, 87)), max_atoms=5, owner="oracle backend 'xtb'")
    expected = r"atomic_numbers: Ra is not supported by oracle backend 'xtb' \(it knows H-Rn\)"
    with pytest.raises(StructureCheckError, match=expected):
        check_structure(Atoms("RaH", positions=[[0, 0, 0], [0, 0, 2]]), limits)
    with pytest.raises(StructureCheckError, match="has 6 atoms; oracle backend 'xtb' takes at most 5"):
        check_structure(Atoms("H6", positions=np.arange(18.0).reshape(6, 3)), limits)


def test_a_fractional_charge_is_never_truncated() -> None:
    atoms = with_info(h2(), charge=1.5)
    with pytest.raises(ValueError, match=r"charge must be an integer, got 1\.5"):
        charge_of(atoms)
    with pytest.raises(ValueError, match="charge must be an integer"):
        atoms_to_structure(atoms)
    assert charge_of(with_info(h2(), charge=-1.0)) == -1


@pytest.mark.parametrize(
    ("field", "value", "expected"),
    [
        ("info_json", "{", "info_json is not a valid JSON object"),
        ("info_json", "[1, 2]", "info_json must be a JSON object, got list"),
        ("info_json", '{"a": {"__ndarray__": 1, "dtype": "bogus"}}', "info_json is not a valid JSON object"),
        ("info_json", "[" * 100_000, "info_json is not a valid JSON object"),
        ("arrays_json", '{"x": [1, 2, 3]}', "arrays_json: array 'x'"),
        ("arrays_json", '{"numbers": [1, 1]}', "arrays_json: 'numbers' is carried by the Structure's own fields"),
    ],
)
def test_bad_json_in_a_structure_is_a_value_error_naming_the_field(field: str, value: str, expected: str) -> None:
    message = common_pb2.Structure(atomic_numbers=[1, 1], positions=[0, 0, 0, 0, 0, 0.74])
    setattr(message, field, value)
    with pytest.raises(ValueError) as error:
        structure_to_atoms(message)
    assert expected in str(error.value)
