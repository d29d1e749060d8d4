"""The checks that decide whether an MD run of a potential survived, against geometries built by hand."""

from __future__ import annotations

import numpy as np
from ase import Atoms
from ase.build import bulk, molecule

from pyacemaker.services.orchestrator.md_stability import (
    StabilityRun,
    TrajectoryJudge,
    fragments,
    frame_problem,
    nearest_neighbour_distances,
    seed_fragments,
    stability_summary,
    thermal_displacement_bound,
)


def _chain(spacings: list[float]) -> Atoms:
    return Atoms("H" * (len(spacings) + 1), positions=[[x, 0.0, 0.0] for x in np.cumsum([0.0, *spacings])])


def test_nearest_neighbour_distances_with_and_without_a_periodic_cell():
    assert np.allclose(nearest_neighbour_distances(_chain([1.0, 3.0])), [1.0, 1.0, 3.0])
    periodic = Atoms("H2", positions=[[0.2, 0, 0], [3.8, 0, 0]], cell=[4.0, 4.0, 4.0], pbc=True)
    assert np.allclose(nearest_neighbour_distances(periodic), [0.4, 0.4])  # through the boundary


def test_frame_problem_names_collapse_and_non_finite_values():
    assert frame_problem(_chain([1.0, 1.2]), -3.0, 0.5) is None
    assert "within 0.300 Å" in frame_problem(_chain([0.3, 1.2]), -3.0, 0.5)
    assert "not finite" in frame_problem(_chain([1.0, 1.2]), float("nan"), 0.5)
    assert frame_problem(_chain([1.0, 9.0]), -3.0, 0.5) is None  # a split alone: TrajectoryJudge decides


def _complex(chloride_z: float) -> Atoms:
    """CH3Cl along z with a chloride on the far side of the carbon, `chloride_z` Å below it."""
    atoms = molecule("CH3Cl")
    carbon = atoms.positions[atoms.numbers == 6][0]
    atoms += Atoms("Cl", positions=[carbon - [0.0, 0.0, chloride_z]])
    return atoms


def _judge(temperature_k: float = 600.0) -> TrajectoryJudge:
    return TrajectoryJudge(seed_fragments([_complex(3.2)]), temperature_k, min_distance=0.5, max_neighbour_distance=8.0)


def test_fragments_of_the_sn2_complex_and_of_a_crystal():
    assert fragments(_complex(3.2)) == ["CH3Cl", "Cl"]
    assert seed_fragments([_complex(3.2)]) == {"CH3Cl", "Cl", "CH3Cl2"}
    assert fragments(bulk("Si", "diamond", a=5.43, cubic=True)) == ["Si8"]  # bonded through the boundary


def test_thermal_displacement_bound_follows_mass_and_temperature():
    bound = thermal_displacement_bound(Atoms("HCl"), 1000.0, 40.0)
    # sqrt(3 kT / m): H (1.008 u) at 1000 K 4975 m/s = 0.04975 Å/fs; Cl (35.45 u) 0.008388 Å/fs; ×5 ×40 fs + 1 Å.
    assert np.allclose(bound, [5 * 0.04975 * 40 + 1, 5 * 0.008388 * 40 + 1], rtol=1e-3)
    thermal_part = [thermal_displacement_bound(Atoms("H"), t, 40.0)[0] - 1.0 for t in (250.0, 1000.0)]
    assert np.isclose(thermal_part[0], thermal_part[1] / 2)  # √T


def test_a_chloride_leaving_at_thermal_speed_is_a_dissociation_not_a_loss():
    judge = _judge()
    # 0.5 Å per 40 fs (0.0125 Å/fs: twice Cl's rms thermal speed at 600 K) out to 10 Å.
    for frame, z in enumerate(np.arange(3.2, 10.01, 0.5)):
        assert judge.judge(_complex(z), -10.0, 40.0 * frame) is None
    assert judge.dissociation is not None and "CH3Cl + Cl" in judge.dissociation


def test_a_thrown_atom_and_a_broken_bond_are_losses():
    thrown = _judge()
    assert thrown.judge(_complex(3.2), -10.0, 0.0) is None
    problem = thrown.judge(_complex(30.0), -10.0, 40.0)  # 26.8 Å in 40 fs
    assert problem is not None and "atom 5 (Cl) moved 26.8 Å in 40 fs" in problem and "threw it" in problem

    broken = _judge(1000.0)
    atoms = _complex(3.2)
    hydrogen = int(np.flatnonzero(atoms.numbers == 1)[0])
    direction = atoms.positions[hydrogen] - atoms.positions[0]
    direction /= np.linalg.norm(direction)
    problem = None
    for frame in range(40):  # the hydrogen walks off at 0.5 Å per 40 fs, slow enough to pass the speed check
        atoms.positions[hydrogen] += 0.5 * direction if frame else 0.0
        problem = broken.judge(atoms, -10.0, 40.0 * frame)
        if problem is not None:
            break
    assert problem is not None and "CH2Cl" in problem and "no fragment of any seed" in problem


def test_periodic_displacement_across_the_boundary_is_not_a_jump():
    judge = TrajectoryJudge(frozenset({"Si2"}), 300.0, 0.5, 8.0)
    crystal = Atoms("Si2", positions=[[0.05, 1.0, 1.0], [2.0, 1.0, 1.0]], cell=[4.0, 4.0, 4.0], pbc=True)
    assert judge.judge(crystal, -9.0, 0.0) is None
    crystal.positions[0, 0] = 3.95  # wrapped: 0.1 Å, not 3.9 Å
    assert judge.judge(crystal, -9.0, 5.0) is None


def test_stability_summary_counts_survivors_per_temperature():
    runs = [
        StabilityRun(0, 300.0, 100),
        StabilityRun(1, 300.0, 40, "step 40: collapse"),
        StabilityRun(0, 600.0, 100),
    ]
    summary = stability_summary(runs, 100, 0.5)
    assert summary.n_runs == 3 and summary.n_survivors == 2
    assert summary.survivors_by_temperature == {"300": [1, 2], "600": [1, 1]}
    assert summary.runs[1].survived is False
