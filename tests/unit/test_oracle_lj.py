"""The lj backend against an independent brute-force numpy Lennard-Jones and against finite differences."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
from ase import Atoms
from ase.build import bulk

from pyacemaker.config import LjOracleConfig
from pyacemaker.v1 import common_pb2
from services.oracle.backends.lj import LennardJonesBackend
from tests.finite_differences import numerical_forces, numerical_stress

CONFIG = LjOracleConfig(backend="lj", epsilon=0.0104, sigma=3.40, cutoff=7.0)


def reference_lj(atoms: Atoms, epsilon: float, sigma: float, cutoff: float) -> tuple[float, np.ndarray, np.ndarray]:
    """Energy (eV), forces (eV/Å) and stress (eV/Å³, Voigt, ASE sign) of a pair potential shifted to zero at
    the cutoff, summed over every periodic image within reach; written from the formula, not from ASE."""
    positions = atoms.positions
    cell = np.asarray(atoms.cell)
    reach = []
    for axis in range(3):
        if atoms.pbc[axis]:
            normal = np.cross(cell[(axis + 1) % 3], cell[(axis + 2) % 3])
            spacing = abs(np.dot(cell[axis], normal)) / np.linalg.norm(normal)
            reach.append(int(np.ceil(cutoff / spacing)) + 1)
        else:
            reach.append(0)
    images = np.array(list(itertools.product(*[range(-n, n + 1) for n in reach])), dtype=float) @ cell

    def pair_energy(r: np.ndarray) -> np.ndarray:
        return 4 * epsilon * ((sigma / r) ** 12 - (sigma / r) ** 6)

    # d[i, j, k] = r_j + image_k − r_i
    d = positions[None, :, None, :] + images[None, None, :, :] - positions[:, None, None, :]
    r = np.linalg.norm(d, axis=-1)
    within = (r < cutoff) & (r > 0)  # r == 0 only for an atom and itself in the home cell
    r_safe = np.where(within, r, 1.0)
    energy = 0.5 * np.sum(np.where(within, pair_energy(r_safe) - pair_energy(np.array(cutoff)), 0.0))
    du_dr = np.where(within, 4 * epsilon * (-12 * sigma**12 / r_safe**13 + 6 * sigma**6 / r_safe**7), 0.0)
    forces = np.einsum("ijk,ijkx->ix", du_dr / r_safe, d)
    stress = np.zeros(6)
    if atoms.pbc.any():
        virial = 0.5 * np.einsum("ijk,ijka,ijkb->ab", du_dr / r_safe, d, d)
        full = virial / atoms.get_volume()
        stress = full[[0, 1, 2, 1, 0, 0], [0, 1, 2, 2, 2, 1]]
    return float(energy), forces, stress


def argon_cluster() -> Atoms:
    atoms = bulk("Ar", "fcc", a=5.26, cubic=True).repeat((2, 2, 1))
    atoms.pbc = False
    atoms.cell = np.zeros((3, 3))
    atoms.rattle(0.15, seed=2)
    return atoms


def argon_crystal() -> Atoms:
    atoms = bulk("Ar", "fcc", a=5.3, cubic=True)
    shear = np.array([[0.0, 0.2, 0.0], [0.1, 0.0, 0.0], [0.0, -0.15, 0.0]])
    atoms.set_cell(np.asarray(atoms.cell) + shear, scale_atoms=True)
    atoms.rattle(0.1, seed=7)
    return atoms


def lj_energy(backend: LennardJonesBackend, atoms: Atoms) -> float:
    labels = backend.label(atoms)
    assert labels.status == common_pb2.LABEL_STATUS_OK, labels.reason
    return labels.energy


def assert_no_pair_near_cutoff(atoms: Atoms, margin: float) -> None:
    """Shifted LJ forces jump at the cutoff; a finite difference across it would test nothing."""
    distances = atoms.get_all_distances(mic=atoms.pbc.any())
    assert not np.any(np.abs(distances - CONFIG.cutoff) < margin)


def test_molecule_matches_numpy_reference_and_has_no_stress() -> None:
    atoms = argon_cluster()
    distances = atoms.get_all_distances()
    assert np.any(distances > CONFIG.cutoff), "the cluster must have pairs beyond the cutoff to test the cutoff"
    labels = LennardJonesBackend(CONFIG).label(atoms)
    assert labels.status == common_pb2.LABEL_STATUS_OK
    energy, forces, _ = reference_lj(atoms, CONFIG.epsilon, CONFIG.sigma, CONFIG.cutoff)
    assert labels.energy == pytest.approx(energy, rel=1e-10, abs=1e-12)
    np.testing.assert_allclose(np.reshape(labels.forces, (-1, 3)), forces, rtol=1e-9, atol=1e-12)
    assert list(labels.stress) == []
    assert labels.level_of_theory == "lj:eps=0.0104,sigma=3.4,rc=7.0"
    assert atoms.calc is None, "labelling must not attach a calculator to the caller's atoms"


def test_periodic_cell_matches_numpy_reference_including_stress() -> None:
    atoms = argon_crystal()
    labels = LennardJonesBackend(CONFIG).label(atoms)
    assert labels.status == common_pb2.LABEL_STATUS_OK
    energy, forces, stress = reference_lj(atoms, CONFIG.epsilon, CONFIG.sigma, CONFIG.cutoff)
    assert labels.energy == pytest.approx(energy, rel=1e-10, abs=1e-12)
    np.testing.assert_allclose(np.reshape(labels.forces, (-1, 3)), forces, rtol=1e-9, atol=1e-12)
    assert len(labels.stress) == 6
    np.testing.assert_allclose(labels.stress, stress, rtol=1e-9, atol=1e-12)
    assert np.abs(stress).max() > 1e-5, "a strained, rattled cell must have a stress worth testing"


@pytest.mark.parametrize("make_atoms", [argon_cluster, argon_crystal], ids=["molecule", "periodic"])
def test_forces_are_minus_the_finite_difference_gradient(make_atoms) -> None:
    atoms = make_atoms()
    backend = LennardJonesBackend(CONFIG)
    step = 1e-4
    assert_no_pair_near_cutoff(atoms, margin=10 * step)
    forces = np.reshape(backend.label(atoms).forces, (-1, 3))
    assert np.abs(forces).max() > 1e-3
    numeric = numerical_forces(lambda a: lj_energy(backend, a), atoms, step)
    np.testing.assert_allclose(forces, numeric, atol=1e-6)


def test_stress_is_the_finite_difference_strain_derivative() -> None:
    atoms = argon_crystal()
    backend = LennardJonesBackend(CONFIG)
    stress = np.array(backend.label(atoms).stress)
    numeric = numerical_stress(lambda a: lj_energy(backend, a), atoms, step=1e-5)
    np.testing.assert_allclose(stress, numeric, atol=1e-8)


def test_coinciding_atoms_give_a_failed_label_not_an_exception() -> None:
    atoms = Atoms("Ar3", positions=[[0, 0, 0], [0, 0, 0], [3.8, 0, 0]])
    labels = LennardJonesBackend(CONFIG).label(atoms)
    assert labels.status == common_pb2.LABEL_STATUS_FAILED
    assert "not finite" in labels.reason
    assert not labels.HasField("energy")
    assert labels.level_of_theory == "lj:eps=0.0104,sigma=3.4,rc=7.0"
