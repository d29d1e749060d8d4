"""The lj backend against an independent brute-force numpy Lennard-Jones (finite differences, impossible input,
retries and batches: tests/unit/test_oracle_conformance.py)."""

from __future__ import annotations

import dataclasses
import itertools

import numpy as np
import pytest
from ase import Atoms
from ase.build import bulk

from pyacemaker.config import LjOracleConfig
from pyacemaker.labels import labels_to_proto
from pyacemaker.services.oracle.backends.lj import LennardJonesBackend
from pyacemaker.v1 import common_pb2

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


def test_molecule_matches_numpy_reference_and_has_no_stress() -> None:
    atoms = argon_cluster()
    distances = atoms.get_all_distances()
    assert np.any(distances > CONFIG.cutoff), "the cluster must have pairs beyond the cutoff to test the cutoff"
    labels = LennardJonesBackend(CONFIG).label(atoms)
    assert labels.ok
    energy, forces, _ = reference_lj(atoms, CONFIG.epsilon, CONFIG.sigma, CONFIG.cutoff)
    assert labels.energy == pytest.approx(energy, rel=1e-10, abs=1e-12)
    np.testing.assert_allclose(labels.forces, forces, rtol=1e-9, atol=1e-12)
    assert labels.stress is None
    assert labels.level_of_theory == "lj:eps=0.0104,sigma=3.4,rc=7.0"
    assert atoms.calc is None, "labelling must not attach a calculator to the caller's atoms"


def test_periodic_cell_matches_numpy_reference_including_stress() -> None:
    atoms = argon_crystal()
    labels = LennardJonesBackend(CONFIG).label(atoms)
    assert labels.ok
    energy, forces, stress = reference_lj(atoms, CONFIG.epsilon, CONFIG.sigma, CONFIG.cutoff)
    assert labels.energy == pytest.approx(energy, rel=1e-10, abs=1e-12)
    np.testing.assert_allclose(labels.forces, forces, rtol=1e-9, atol=1e-12)
    assert labels.stress is not None
    np.testing.assert_allclose(labels.stress, stress, rtol=1e-9, atol=1e-12)
    assert np.abs(stress).max() > 1e-5, "a strained, rattled cell must have a stress worth testing"


def test_labels_leave_the_process_as_the_bytes_the_backend_sent_before_the_value_type() -> None:
    """The job table, the task files and the clients' ledger hold these bytes: the message each label would have
    been when backends built it directly (energy, forces, stress only when periodic; a FAILED label with its
    reason alone) must come out of labels_to_proto byte for byte. Wall time is zeroed: it differs run to run."""
    from ase.calculators.lj import LennardJones

    backend = LennardJonesBackend(CONFIG)
    for atoms in (argon_cluster(), argon_crystal()):
        sent = labels_to_proto(dataclasses.replace(backend.label(atoms), wall_time_s=0.0))
        reference = atoms.copy()
        reference.calc = LennardJones(epsilon=CONFIG.epsilon, sigma=CONFIG.sigma, rc=CONFIG.cutoff, smooth=False)
        before = common_pb2.Labels(
            status=common_pb2.LABEL_STATUS_OK,
            level_of_theory=backend.level_of_theory,
            energy=reference.get_potential_energy(),
            forces=reference.get_forces().ravel().tolist(),
            attempts=1,
        )
        if atoms.pbc.any():
            before.stress.extend(reference.get_stress().tolist())
        assert sent.SerializeToString() == before.SerializeToString()
    coinciding = argon_cluster()
    coinciding.positions[1] = coinciding.positions[0]
    failed = backend.label(coinciding)
    before = common_pb2.Labels(
        status=common_pb2.LABEL_STATUS_FAILED, reason=failed.reason, level_of_theory=backend.level_of_theory, attempts=1
    )
    sent = labels_to_proto(dataclasses.replace(failed, wall_time_s=0.0))
    assert not failed.ok and sent.SerializeToString() == before.SerializeToString()
