"""The sampler's MD engine with a real Lennard-Jones force field in-process: restraint forces against finite
differences, the kinetic temperature of a 6-atom cluster, NPT pressure, the distance and γ guards, frame selection."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
from ase import Atoms, units
from ase.build import bulk
from ase.calculators.lj import LennardJones

from pyacemaker.config import LjOracleConfig
from pyacemaker.labels import Uncertainty
from pyacemaker.restraints import DistanceDifferenceRestraint
from pyacemaker.services.oracle.backends.lj import LennardJonesBackend
from pyacemaker.services.sampler.features import get_featuriser
from pyacemaker.services.sampler.frames import select_frames, stride_selection
from pyacemaker.services.sampler.md import FrameEvent, MdParameters, ReplicaStoppedEvent, degrees_of_freedom, run_md
from tests.conftest import sn2_seeds
from tests.finite_differences import numerical_forces

ARGON = {"epsilon": 0.0103, "sigma": 3.40}  # eV, Å


def lj_force_field(cutoff: float = 10.2):
    backend = LennardJonesBackend(LjOracleConfig(backend="lj", cutoff=cutoff, **ARGON))
    return lambda frames: list(backend.label_batch(frames))


def argon_octahedron() -> Atoms:
    """Ar6 with nearest neighbours at the LJ minimum 2^(1/6) σ."""
    spacing = 2 ** (1 / 6) * ARGON["sigma"]
    directions = np.array([[1, 0, 0], [-1, 0, 0], [0, 1, 0], [0, -1, 0], [0, 0, 1], [0, 0, -1]], dtype=float)
    return Atoms("Ar6", positions=directions * spacing / np.sqrt(2))


def parameters(**changes) -> MdParameters:
    base = dict(
        temperatures_k=(20.0,),
        timestep_fs=5.0,
        steps=100,
        save_interval=2,
        replicas=2,
        friction_per_fs=0.01,
        min_distance=2.0,
        max_force_std=1.0,
    )
    base.update(changes)
    return MdParameters(**base)


def collect(generator):
    events = []
    while True:
        try:
            events.append(next(generator))
        except StopIteration as finished:
            return events, finished.value


@pytest.mark.parametrize("center", [-1.0, 0.3])
def test_restraint_forces_are_minus_the_gradient_of_its_energy(center):
    atoms = sn2_seeds()[0]
    atoms.positions += np.random.default_rng(1).normal(0, 0.1, atoms.positions.shape)
    restraint = DistanceDifferenceRestraint(atom_a=4, atom_b=0, atom_c=5, center=center, force_constant=5.0)
    energy, forces = restraint.energy_and_forces(atoms.positions)
    xi = np.linalg.norm(atoms.positions[4] - atoms.positions[0]) - np.linalg.norm(
        atoms.positions[0] - atoms.positions[5]
    )
    assert restraint.value(atoms.positions) == pytest.approx(xi)
    assert energy == pytest.approx(0.5 * 5.0 * (xi - center) ** 2)
    reference = numerical_forces(lambda a: restraint.energy_and_forces(a.positions)[0], atoms, 1e-5)
    np.testing.assert_allclose(forces, reference, atol=1e-7)
    assert np.abs(forces[[1, 2, 3]]).max() == 0.0  # the hydrogens feel no bias
    np.testing.assert_allclose(forces.sum(axis=0), 0.0, atol=1e-12)


def test_restraint_rejects_atoms_it_cannot_use():
    with pytest.raises(ValueError, match=r"out of range for a structure of 6 atoms"):
        DistanceDifferenceRestraint(4, 0, 6, 0.0, 5.0).check(6)
    with pytest.raises(ValueError, match="distinct"):
        DistanceDifferenceRestraint(4, 4, 5, 0.0, 5.0).check(6)


def test_langevin_keeps_the_kinetic_temperature_of_a_six_atom_cluster():
    """Mean kinetic temperature with 3N − 3 degrees of freedom matches the thermostat's: 8 replicas × 500
    steps give ~200 independent samples, so the statistical error is ~3 % (a 3N count would be 20 % off, the
    fixcm doubling 100 %)."""
    target = 20.0
    events, summary = collect(
        run_md([argon_octahedron()], parameters(temperatures_k=(target,), steps=600, replicas=8), lj_force_field())
    )
    temperatures = [e.temperature_k for e in events if isinstance(e, FrameEvent) and e.step > 100]
    assert summary.replicas_stopped == 0 and summary.steps == 600
    assert len(temperatures) == 8 * 250
    assert np.mean(temperatures) == pytest.approx(target, rel=0.08)
    assert degrees_of_freedom(6) == 15
    # The centre of mass stays where it started.
    frames = [e.atoms for e in events if isinstance(e, FrameEvent)]
    np.testing.assert_allclose(frames[-1].get_center_of_mass(), argon_octahedron().get_center_of_mass(), atol=1e-9)


def test_npt_drives_a_periodic_lj_crystal_to_the_target_pressure():
    """Stochastic cell rescaling from a cell at ~0 GPa to 0.3 GPa: the volume shrinks and the mean pressure
    (virial from the oracle's stress plus the kinetic term) over the second half is the target."""
    start = bulk("Ar", "fcc", a=5.37, cubic=True).repeat(2)
    target_gpa = 0.3
    params = parameters(
        temperatures_k=(40.0,),
        steps=400,
        save_interval=4,
        replicas=1,
        pressure_gpa=target_gpa,
        barostat_time_fs=200.0,
        compressibility_per_gpa=0.3,
    )
    events, _ = collect(run_md([start], params, lj_force_field(cutoff=8.5)))
    frames = [e for e in events if isinstance(e, FrameEvent)]
    late = [e for e in frames if e.step > 200]
    volumes = np.array([e.atoms.get_volume() for e in late])
    pressures = np.array(
        [
            (len(e.atoms) * units.kB * e.temperature_k / e.atoms.get_volume() - np.sum(e.atoms.get_stress()[:3]) / 3)
            / units.GPa
            for e in late
        ]
    )
    assert volumes.mean() < 0.96 * start.get_volume()
    assert pressures.mean() == pytest.approx(target_gpa, abs=0.06)
    # The cell stays cubic (isotropic scaling) and the atoms move with it.
    cell = np.asarray(frames[-1].atoms.cell)
    np.testing.assert_allclose(cell, np.eye(3) * cell[0, 0], atol=1e-9)


def test_frames_carry_unbiased_labels_and_windows_hold_xi_near_their_centres():
    """A restraint window on the LJ cluster: saved energies and forces are the plain LJ ones (recomputed here
    by ASE), while ξ stays near ξ₀ because of the bias."""
    restraint = DistanceDifferenceRestraint(atom_a=0, atom_b=2, atom_c=1, center=0.8, force_constant=2.0)
    events, _ = collect(run_md([argon_octahedron()], parameters(steps=200), lj_force_field(), [restraint]))
    frames = [e for e in events if isinstance(e, FrameEvent)]
    reference = LennardJones(**ARGON, rc=10.2, smooth=False)
    for event in frames[-4:]:
        atoms = event.atoms.copy()
        atoms.calc = reference
        assert event.atoms.get_potential_energy() == pytest.approx(atoms.get_potential_energy(), abs=1e-10)
        np.testing.assert_allclose(event.atoms.get_forces(), atoms.get_forces(), atol=1e-10)
        assert event.atoms.info["md_xi"] == pytest.approx(restraint.value(event.atoms.positions))
    xi = np.array([e.collective_variable for e in frames if e.step > 100])
    assert abs(xi.mean() - 0.8) < 0.25  # unrestrained, the octahedron's ξ is 0


def test_a_replica_below_min_distance_is_stopped_before_the_oracle_sees_it():
    calls = []
    force_field = lj_force_field()

    def counting(frames):
        calls.append(len(frames))
        return force_field(frames)

    events, summary = collect(run_md([argon_octahedron()], parameters(min_distance=5.0), counting))
    stops = [e for e in events if isinstance(e, ReplicaStoppedEvent)]
    assert [s.replica for s in stops] == [0, 1] and all(s.step == 0 for s in stops)
    assert "smallest interatomic distance 3.816 Å fell below min_distance 5.0 Å" in stops[0].reason
    assert summary.n_frames == 0 and summary.replicas_stopped == 2 and calls == []


def test_a_replica_whose_extrapolation_grade_exceeds_the_limit_stops_and_reports_where():
    """A force field that reports γ (an ACE with its active set): here γ grows with the cluster's size, so the
    hotter replica crosses the limit first; its stop event carries the structure it stopped at."""
    force_field = lj_force_field()
    start = argon_octahedron()
    size0 = np.ptp(start.positions, axis=0).sum()

    def graded(frames):
        labels = []
        for atoms, label in zip(frames, force_field(frames), strict=True):
            grade = 10.0 * max(0.0, np.ptp(atoms.positions, axis=0).sum() / size0 - 1.0)
            uncertainty = Uncertainty(extrapolation_grade=[grade] * len(atoms), max_extrapolation_grade=grade)
            labels.append(dataclasses.replace(label, uncertainty=uncertainty))
        return labels

    params = parameters(temperatures_k=(5.0, 300.0), steps=200, max_extrapolation_grade=0.5)
    events, summary = collect(run_md([start], params, graded))
    stops = [e for e in events if isinstance(e, ReplicaStoppedEvent)]
    assert [s.replica for s in stops] == [1], [s.reason for s in stops]
    assert "exceeds max_extrapolation_grade 0.5" in stops[0].reason
    stopped_at = stops[0].atoms
    assert stopped_at is not None and stopped_at.calc is None
    assert 10.0 * (np.ptp(stopped_at.positions, axis=0).sum() / size0 - 1.0) > 0.5
    assert summary.replicas_stopped == 1


def test_bad_parameters_and_starts_name_the_problem():
    with pytest.raises(ValueError, match="timestep_fs must be positive"):
        run_md([argon_octahedron()], parameters(timestep_fs=0.0), lj_force_field())
    with pytest.raises(ValueError, match=r"pressure_gpa \(NPT\) needs periodic cells, but start 0"):
        run_md([argon_octahedron()], parameters(pressure_gpa=0.0), lj_force_field())
    with pytest.raises(ValueError, match=r"window 0, start 0: restraint atoms \[0, 2, 9\] are out of range"):
        run_md([argon_octahedron()], parameters(), lj_force_field(), [DistanceDifferenceRestraint(0, 2, 9, 0.0, 1.0)])


def test_stride_selection_spreads_exactly_n_over_trajectories():
    ids = [0] * 10 + [1] * 5 + [2] * 1
    chosen = stride_selection(ids, 7)
    assert list(chosen) == [2, 4, 7, 9, 12, 14, 15]  # 4.375 → 4, 2.19 → 2, 0.44 → 1 (largest remainder)
    assert list(stride_selection(ids, 16)) == list(range(16))
    many = stride_selection(np.repeat(np.arange(4), 100), 40)
    assert len(many) == len(set(many)) == 40
    assert set(np.diff(many[:10])) == {10}  # every 10th frame of the first trajectory, the last one included
    assert many[9] == 99


def test_direct_frame_selection_returns_exactly_n():
    frames = []
    rng = np.random.default_rng(0)
    for i in range(30):
        atoms = argon_octahedron()
        atoms.positions += rng.normal(0, 0.05 + 0.01 * i, atoms.positions.shape)
        frames.append(atoms)
    chosen = select_frames(frames, [i % 3 for i in range(30)], 7, "direct", get_featuriser("distribution"))
    assert len(chosen) == len(set(chosen)) == 7 and list(chosen) == sorted(chosen)
    with pytest.raises(ValueError, match="unknown frame selection 'random'"):
        select_frames(frames, [0] * 30, 7, "random", get_featuriser("distribution"))
