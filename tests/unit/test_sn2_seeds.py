"""The SN2 seed structures in examples/sn2/seeds are what examples/sn2/make_seeds.py claims they are.

Geometry checks read the files alone; the stationarity checks recompute GFN2-xTB with tblite directly.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from ase import Atoms

from pyacemaker.structures import read_structures

SEED_DIR = Path(__file__).resolve().parents[2] / "examples" / "sn2" / "seeds"
SEED_NAMES = ("reactant_complex", "transition_state", "product_complex")
# Atom order shared by all seeds: C, H, H, H, Cl1 (bonded in the reactant), Cl2 (bonded in the product).
EXPECTED_NUMBERS = [6, 1, 1, 1, 17, 17]
INDEX_C, INDEX_CL1, INDEX_CL2 = 0, 4, 5
INDEX_H = [1, 2, 3]


def load_seed(name: str) -> Atoms:
    frames = read_structures(SEED_DIR / f"{name}.xyz")
    assert len(frames) == 1
    return frames[0]


@pytest.fixture(scope="module")
def seeds() -> dict[str, Atoms]:
    return {name: load_seed(name) for name in SEED_NAMES}


def xi(atoms: Atoms) -> float:
    """ξ = d(C–Cl1) − d(C–Cl2), computed from raw coordinates."""
    positions = atoms.positions
    return float(
        np.linalg.norm(positions[INDEX_CL1] - positions[INDEX_C])
        - np.linalg.norm(positions[INDEX_CL2] - positions[INDEX_C])
    )


def cl_c_cl_angle_deg(atoms: Atoms) -> float:
    to_cl1 = atoms.positions[INDEX_CL1] - atoms.positions[INDEX_C]
    to_cl2 = atoms.positions[INDEX_CL2] - atoms.positions[INDEX_C]
    cosine = np.dot(to_cl1, to_cl2) / (np.linalg.norm(to_cl1) * np.linalg.norm(to_cl2))
    return float(np.degrees(np.arccos(np.clip(cosine, -1.0, 1.0))))


def xtb_atoms(atoms: Atoms) -> Atoms:
    from tblite.ase import TBLite

    atoms = Atoms(atoms.numbers, positions=atoms.positions)
    atoms.calc = TBLite(method="GFN2-xTB", charge=-1, multiplicity=1, verbosity=0)
    return atoms


def test_seeds_share_atom_order_charge_and_spin(seeds: dict[str, Atoms]) -> None:
    for name, atoms in seeds.items():
        assert list(atoms.numbers) == EXPECTED_NUMBERS, name
        assert atoms.info["charge"] == -1, name
        assert atoms.info["spin_multiplicity"] == 1, name
        assert atoms.calc is None, f"{name}: seeds are structures and must not carry calculator results"


def test_transition_state_is_d3h(seeds: dict[str, Atoms]) -> None:
    ts = seeds["transition_state"]
    d1 = np.linalg.norm(ts.positions[INDEX_CL1] - ts.positions[INDEX_C])
    d2 = np.linalg.norm(ts.positions[INDEX_CL2] - ts.positions[INDEX_C])
    assert abs(d1 - d2) < 1e-3
    assert abs(xi(ts)) < 1e-3
    h1, h2, h3 = ts.positions[INDEX_H]
    normal = np.cross(h2 - h1, h3 - h1)
    normal /= np.linalg.norm(normal)
    assert abs(np.dot(ts.positions[INDEX_C] - h1, normal)) < 0.01
    assert cl_c_cl_angle_deg(ts) == pytest.approx(180.0, abs=2.0)


def test_complexes_are_mirror_images_on_either_side(seeds: dict[str, Atoms]) -> None:
    xi_reactant = xi(seeds["reactant_complex"])
    xi_product = xi(seeds["product_complex"])
    assert xi_reactant < -0.8
    assert xi_product > 0.8
    assert xi_product == pytest.approx(-xi_reactant, abs=1e-3)
    for name in ("reactant_complex", "product_complex"):
        assert cl_c_cl_angle_deg(seeds[name]) == pytest.approx(180.0, abs=2.0), name


def test_seeds_are_stationary_at_gfn2_xtb(seeds: dict[str, Atoms]) -> None:
    for name in ("transition_state", "reactant_complex"):
        forces = xtb_atoms(seeds[name]).get_forces()
        assert np.abs(forces).max() < 0.05, name


def test_transition_state_is_a_maximum_along_the_reaction_coordinate(seeds: dict[str, Atoms]) -> None:
    """Moving C along the Cl–C–Cl axis (towards either Cl, i.e. ξ ≠ 0) lowers the energy; a symmetric
    stretch of both C–Cl bonds raises it: the D3h point is a saddle, not a minimum or a maximum."""
    ts = seeds["transition_state"]
    axis = ts.positions[INDEX_CL2] - ts.positions[INDEX_CL1]
    axis /= np.linalg.norm(axis)
    energy_ts = xtb_atoms(ts).get_potential_energy()
    for sign in (1.0, -1.0):
        shifted = ts.copy()
        shifted.positions[INDEX_C] += sign * 0.05 * axis
        assert xtb_atoms(shifted).get_potential_energy() < energy_ts
        stretched = ts.copy()
        stretched.positions[INDEX_CL1] -= sign * 0.05 * axis
        stretched.positions[INDEX_CL2] += sign * 0.05 * axis
        assert xtb_atoms(stretched).get_potential_energy() > energy_ts
