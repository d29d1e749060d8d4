"""Candidate-pool generation: counts, determinism, and that each operation does what it claims, checked
against direct geometry computations."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
from ase import Atoms
from ase.build import bulk

from pyacemaker.config import MdConfig, PoolConfig, thermal_rattle_amplitudes
from pyacemaker.services.sampler.pool import generate_pool, molecular_fragments
from pyacemaker.structures import content_id
from tests.conftest import sn2_seeds

NOTHING = {
    "rattle_amplitudes": [],
    "rattles_per_amplitude": 0,
    "strains_per_seed": 0,
    "interpolation_images": 0,
    "fragment_rotations_per_seed": 0,
}


def config(**overrides: object) -> PoolConfig:
    return PoolConfig(**{**NOTHING, **overrides})


def by_operation(structures: list[Atoms], operation: str) -> list[Atoms]:
    return [atoms for atoms in structures if atoms.info["operation"] == operation]


def pair_distances(positions: np.ndarray) -> np.ndarray:
    return np.linalg.norm(positions[:, None] - positions[None, :], axis=-1)


def test_pool_is_deterministic_and_depends_on_the_seed() -> None:
    settings = {"rattle_amplitudes": [0.05], "rattles_per_amplitude": 3, "fragment_rotations_per_seed": 2}
    first = generate_pool(sn2_seeds(), config(**settings, random_seed=7))
    again = generate_pool(sn2_seeds(), config(**settings, random_seed=7))
    other = generate_pool(sn2_seeds(), config(**settings, random_seed=8))
    assert [content_id(a) for a in first.structures] == [content_id(a) for a in again.structures]
    assert [content_id(a) for a in first.structures] != [content_id(a) for a in other.structures]


def test_default_sn2_pool_counts_add_up() -> None:
    settings = PoolConfig()
    seeds = sn2_seeds()
    result = generate_pool(seeds, settings)
    # Without amplitudes, the thermal ones of md's default temperatures (300, 600, 1000 and 1250 K).
    settings = settings.resolved(MdConfig().temperatures)
    assert settings.rattle_amplitudes is not None and len(settings.rattle_amplitudes) == 4
    # Every SN2 seed is at least two fragments with a rotatable (≥ 2 atom) one; molecules get no strains.
    expected = (
        len(seeds)
        * (1 + len(settings.rattle_amplitudes) * settings.rattles_per_amplitude + settings.fragment_rotations_per_seed)
        + (len(seeds) - 1) * settings.interpolation_images
    )
    assert len(result.structures) + result.n_rejected == expected
    assert not by_operation(result.structures, "strain")


def test_every_candidate_keeps_charge_spin_and_names_its_parent() -> None:
    seeds = sn2_seeds()
    seed_ids = {content_id(seed) for seed in seeds}
    result = generate_pool(seeds, PoolConfig(rattles_per_amplitude=2, fragment_rotations_per_seed=2))
    for atoms in result.structures:
        assert atoms.info["charge"] == -1
        assert atoms.info["spin_multiplicity"] == 1
        if atoms.info["operation"] == "seed":
            assert "parent_id" not in atoms.info
        else:
            assert atoms.info["parent_id"] in seed_ids
    rattled = by_operation(result.structures, "rattle")
    assert {a.info["amplitude"] for a in rattled} == set(thermal_rattle_amplitudes(MdConfig().temperatures))


def test_rattle_displacements_have_the_requested_spread() -> None:
    seed = bulk("Cu", "fcc", a=3.6, cubic=True) * (4, 4, 4)  # 256 atoms, so the sample std is tight
    result = generate_pool([seed], config(rattle_amplitudes=[0.03, 0.1], rattles_per_amplitude=2))
    for atoms in by_operation(result.structures, "rattle"):
        displacement = atoms.positions - seed.positions
        assert np.std(displacement) == pytest.approx(atoms.info["amplitude"], rel=0.08)
        assert abs(np.mean(displacement)) < 0.2 * atoms.info["amplitude"]


def test_strain_is_symmetric_bounded_and_carries_the_atoms() -> None:
    seed = bulk("Si", "diamond", a=5.43, cubic=True)
    seed.rattle(0.02, seed=1)
    result = generate_pool([seed], config(strains_per_seed=5, max_strain=0.04))
    strained = by_operation(result.structures, "strain")
    assert len(strained) == 5
    for atoms in strained:
        # cell_new = cell · (1 + ε)  ⇒  ε = cell⁻¹ · cell_new − 1
        strain = np.linalg.solve(np.asarray(seed.cell), np.asarray(atoms.cell)) - np.eye(3)
        np.testing.assert_allclose(strain, strain.T, atol=1e-12)
        assert np.abs(strain).max() <= 0.04 + 1e-12
        assert np.abs(strain).max() > 0
        np.testing.assert_allclose(atoms.get_scaled_positions(), seed.get_scaled_positions(), atol=1e-12)


def test_molecules_are_never_strained() -> None:
    result = generate_pool(sn2_seeds(), config(strains_per_seed=4))
    assert not by_operation(result.structures, "strain")


def test_interpolation_images_lie_on_the_straight_line_between_seeds() -> None:
    reactant, transition, _ = sn2_seeds()
    water = Atoms("OH2", positions=[[0, 0, 0], [0.96, 0, 0], [-0.24, 0.93, 0]])
    # The water between the SN2 seeds has other atoms: no images across it.
    seeds = [reactant, transition, water, reactant]
    result = generate_pool(seeds, config(interpolation_images=4, interpolation_rattle=0.0))
    images = by_operation(result.structures, "interpolate")
    assert len(images) == 4
    for atoms in images:
        t = atoms.info["fraction"]
        assert 0 < t < 1
        # The seeds share one frame, so the best alignment is at most a translation: the image has the shape
        # of the plain linear interpolation.
        expected = (1 - t) * reactant.positions + t * transition.positions
        np.testing.assert_allclose(pair_distances(atoms.positions), pair_distances(expected), atol=1e-9)
        assert atoms.info["parent_id"] == content_id(reactant)
        assert atoms.info["end_parent_id"] == content_id(transition)
    assert sorted(a.info["fraction"] for a in images) == pytest.approx([0.2, 0.4, 0.6, 0.8])


def test_interpolation_aligns_a_rotated_end_point() -> None:
    reactant, transition, _ = sn2_seeds()
    turned = transition.copy()
    turned.rotate(70, "x", center="COM")
    turned.translate([3.0, -1.0, 2.0])
    result = generate_pool([reactant, turned], config(interpolation_images=1, interpolation_rattle=0.0))
    (midpoint,) = by_operation(result.structures, "interpolate")
    expected = 0.5 * (reactant.positions + transition.positions)
    # Same shape as the midpoint of the aligned seeds (interatomic distances do not depend on the frame).
    np.testing.assert_allclose(pair_distances(midpoint.positions), pair_distances(expected), atol=1e-9)


def test_periodic_interpolation_follows_the_shortest_path_through_the_boundary() -> None:
    start = Atoms("Ar2", scaled_positions=[[0.05, 0.5, 0.5], [0.5, 0.5, 0.5]], cell=[6.0, 6.0, 6.0], pbc=True)
    end = start.copy()
    end.set_scaled_positions([[0.95, 0.5, 0.5], [0.5, 0.5, 0.5]])
    end.set_cell([6.6, 6.0, 6.0], scale_atoms=True)
    result = generate_pool([start, end], config(interpolation_images=1, interpolation_rattle=0.0))
    (midpoint,) = by_operation(result.structures, "interpolate")
    np.testing.assert_allclose(np.asarray(midpoint.cell), np.diag([6.3, 6.0, 6.0]), atol=1e-12)
    # 0.05 → 0.95 is 0.1 backwards through the boundary, so the midpoint sits at fractional x = 0 (mod 1).
    fractional_x = midpoint.get_scaled_positions(wrap=True)[0, 0]
    assert min(fractional_x, 1 - fractional_x) == pytest.approx(0.0, abs=1e-12)


def test_fragment_rotation_moves_one_fragment_rigidly_about_its_centroid() -> None:
    reactant = sn2_seeds()[0]  # CH3Cl (atoms 0-4) + Cl⁻ (atom 5)
    result = generate_pool([reactant], config(fragment_rotations_per_seed=6, max_rotation_deg=40.0))
    rotated = by_operation(result.structures, "rotate_fragment")
    assert len(rotated) == 6
    molecule = slice(0, 5)
    for atoms in rotated:
        assert atoms.info["fragment_size"] == 5
        assert 0 < atoms.info["angle_deg"] <= 40.0
        np.testing.assert_allclose(atoms.positions[5], reactant.positions[5], atol=1e-12)
        np.testing.assert_allclose(
            pair_distances(atoms.positions[molecule]), pair_distances(reactant.positions[molecule]), atol=1e-10
        )
        np.testing.assert_allclose(
            atoms.positions[molecule].mean(axis=0), reactant.positions[molecule].mean(axis=0), atol=1e-10
        )
        # The rotation angle from the displacement of the rigid body (Kabsch-free: trace of the best rotation).
        before = reactant.positions[molecule] - reactant.positions[molecule].mean(axis=0)
        after = atoms.positions[molecule] - atoms.positions[molecule].mean(axis=0)
        rotation, *_ = np.linalg.lstsq(before, after, rcond=None)
        angle = np.degrees(np.arccos(np.clip((np.trace(rotation) - 1) / 2, -1, 1)))
        assert angle == pytest.approx(atoms.info["angle_deg"], abs=1e-6)


def test_single_fragment_molecules_get_no_rotations() -> None:
    methane = Atoms(
        "CH4",
        positions=[[0, 0, 0], [0.63, 0.63, 0.63], [-0.63, -0.63, 0.63], [-0.63, 0.63, -0.63], [0.63, -0.63, -0.63]],
    )
    result = generate_pool([methane], config(fragment_rotations_per_seed=5))
    assert not by_operation(result.structures, "rotate_fragment")


def test_fragments_found_through_periodic_boundaries() -> None:
    # An H2 molecule split by the boundary of a large box, plus a lone He: two finite fragments, and the
    # unwrapped H2 is 0.70 Å long.
    box = Atoms(
        "H2He", scaled_positions=[[0.01, 0.5, 0.5], [0.99, 0.5, 0.5], [0.5, 0.5, 0.5]], cell=[10.0] * 3, pbc=True
    )
    box.positions[1, 0] = 10.0 - 0.60  # H–H distance through the boundary: 0.10 + 0.60 = 0.70 Å
    fragments = {tuple(indices): unwrapped for indices, unwrapped in molecular_fragments(box)}
    assert set(fragments) == {(0, 1), (2,)}
    assert np.linalg.norm(fragments[(0, 1)][0] - fragments[(0, 1)][1]) == pytest.approx(0.70, abs=1e-9)
    # A covalent crystal is one infinite network: nothing to rotate.
    (network,) = molecular_fragments(bulk("Si", "diamond", a=5.43))
    assert network[1] is None


def test_short_contacts_are_rejected_and_counted() -> None:
    squeezed = Atoms("H2", positions=[[0, 0, 0], [0, 0, 0.5]])
    fine = Atoms("H2", positions=[[0, 0, 0], [0, 0, 0.74]])
    result = generate_pool([squeezed, fine], config(min_distance=0.6))
    assert result.n_rejected == 1
    assert len(result.structures) == 1
    assert result.structures[0].positions[1, 2] == pytest.approx(0.74)


def test_short_contacts_through_the_periodic_boundary_are_rejected() -> None:
    # 0.05 and 0.96 of a 10 Å cell: 9.1 Å apart directly, 0.9 Å through the boundary.
    cell = Atoms("Ar2", scaled_positions=[[0.05, 0.5, 0.5], [0.96, 0.5, 0.5]], cell=[10.0] * 3, pbc=True)
    # Brute-force minimum image over the 27 neighbouring cells, independent of the code under test.
    shifts = np.array(list(itertools.product([-1, 0, 1], repeat=3))) @ np.asarray(cell.cell)
    nearest = np.linalg.norm(cell.positions[1] + shifts - cell.positions[0], axis=1).min()
    assert nearest == pytest.approx(0.9)
    assert generate_pool([cell], config(min_distance=1.0)).n_rejected == 1
    assert generate_pool([cell], config(min_distance=0.8)).n_rejected == 0


def test_large_rattles_lead_to_rejections_that_are_accounted_for() -> None:
    result = generate_pool(sn2_seeds(), config(rattle_amplitudes=[0.4], rattles_per_amplitude=30))
    assert result.n_rejected > 0
    assert len(result.structures) + result.n_rejected == 3 * (1 + 30)
    for atoms in result.structures:
        distances = pair_distances(atoms.positions)[np.triu_indices(len(atoms), 1)]
        assert distances.min() >= PoolConfig().min_distance


def test_progress_reaches_the_planned_total() -> None:
    calls: list[tuple[int, int, str]] = []
    generate_pool(sn2_seeds(), PoolConfig(rattles_per_amplitude=2), progress=lambda *a: calls.append(a))
    done = [c[0] for c in calls]
    assert done == sorted(done)
    assert calls[-1][0] == calls[-1][1]


def test_no_seeds_is_an_error() -> None:
    with pytest.raises(ValueError, match="at least one seed"):
        generate_pool([], PoolConfig())
