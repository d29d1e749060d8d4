"""The distribution featuriser: invariances, agreement with a brute-force loop over atoms and periodic images,
fixed layout, speed."""

from __future__ import annotations

import itertools
import time

import numpy as np
import pytest
from ase import Atoms
from ase.build import bulk

from pyacemaker.services.sampler.features import DistributionFeaturiser, UnknownFeaturiserError, get_featuriser
from tests.conftest import sn2_seeds

CUTOFF, N_RADIAL, ANGULAR_CUTOFF, N_ANGULAR = 6.0, 24, 3.5, 16


def random_rotation(rng: np.random.Generator) -> np.ndarray:
    q, r = np.linalg.qr(rng.normal(size=(3, 3)))
    q = q * np.sign(np.diag(r))
    return q if np.linalg.det(q) > 0 else -q


def rattled_sn2(seed: int = 0) -> Atoms:
    atoms = sn2_seeds()[0]
    atoms.rattle(0.1, seed=seed)
    return atoms


def brute_force_features(atoms: Atoms, elements: list[int], image_range: int = 0) -> np.ndarray:
    """The documented definition, evaluated with plain loops over atoms and periodic images."""
    radial_width, angular_width = CUTOFF / N_RADIAL, 2.0 / N_ANGULAR
    radial_centres = (np.arange(N_RADIAL) + 0.5) * radial_width
    angular_centres = -1 + (np.arange(N_ANGULAR) + 0.5) * angular_width
    pairs = [(a, b) for i, a in enumerate(elements) for b in elements[i:]]
    radial = {pair: np.zeros(N_RADIAL) for pair in pairs}
    angular = {z: np.zeros(N_ANGULAR) for z in elements}

    def cutoff_weight(d: float, rc: float) -> float:
        return 0.5 * (np.cos(np.pi * d / rc) + 1) if d < rc else 0.0

    shifts = [
        np.array(s) @ np.asarray(atoms.cell) for s in itertools.product(range(-image_range, image_range + 1), repeat=3)
    ]
    for i, centre in enumerate(atoms.positions):
        legs = []
        for j, other in enumerate(atoms.positions):
            for shift in shifts:
                vector = other + shift - centre
                d = float(np.linalg.norm(vector))
                if (j == i and not shift.any()) or d >= CUTOFF:
                    continue
                pair = tuple(sorted((atoms.numbers[i], atoms.numbers[j])))
                radial[pair] += (
                    0.5 * cutoff_weight(d, CUTOFF) * np.exp(-0.5 * ((radial_centres - d) / radial_width) ** 2)
                )
                if d < ANGULAR_CUTOFF:
                    legs.append((vector, d))
        for (u, du), (v, dv) in itertools.combinations(legs, 2):
            cosine = np.dot(u, v) / (du * dv)
            weight = cutoff_weight(du, ANGULAR_CUTOFF) * cutoff_weight(dv, ANGULAR_CUTOFF)
            angular[atoms.numbers[i]] += weight * np.exp(-0.5 * ((angular_centres - cosine) / angular_width) ** 2)
    return np.concatenate([*(radial[p] for p in pairs), *(angular[z] for z in elements)]) / len(atoms)


def test_molecule_features_match_the_brute_force_definition() -> None:
    atoms = rattled_sn2()
    features = DistributionFeaturiser()([atoms])
    np.testing.assert_allclose(features[0], brute_force_features(atoms, [1, 6, 17]), atol=1e-12)


def test_periodic_features_match_the_brute_force_definition() -> None:
    # Two elements in a small cell, so neighbours within 6 Å include several periodic images of each atom.
    atoms = bulk("NaCl", "rocksalt", a=5.64)
    atoms.rattle(0.05, seed=3)
    features = DistributionFeaturiser()([atoms])
    np.testing.assert_allclose(features[0], brute_force_features(atoms, [11, 17], image_range=3), atol=1e-12)


def test_diatomic_radial_peak_is_the_analytic_gaussian() -> None:
    d = 1.27
    features = DistributionFeaturiser(elements=[1, 17])([Atoms("HCl", positions=[[0, 0, 0], [0, 0, d]])])[0]
    width = CUTOFF / N_RADIAL
    centres = (np.arange(N_RADIAL) + 0.5) * width
    weight = 0.5 * (np.cos(np.pi * d / CUTOFF) + 1)
    # Channels: H–H, H–Cl, Cl–Cl, then angular H, angular Cl. One pair over two atoms.
    np.testing.assert_allclose(
        features[N_RADIAL : 2 * N_RADIAL], weight * np.exp(-0.5 * ((centres - d) / width) ** 2) / 2
    )
    assert not features[:N_RADIAL].any() and not features[2 * N_RADIAL :].any()


@pytest.mark.parametrize("trial", range(3))
def test_molecule_features_are_invariant(trial: int) -> None:
    rng = np.random.default_rng(trial)
    atoms = rattled_sn2(seed=trial)
    moved = atoms.copy()
    moved.positions = atoms.positions @ random_rotation(rng).T + rng.normal(scale=5.0, size=3)
    # Permute like atoms: the three H (1-3) and the two Cl (4, 5).
    order = [0, *(1 + rng.permutation(3)), *(4 + rng.permutation(2))]
    moved = moved[order]
    featuriser = DistributionFeaturiser()
    original, transformed = featuriser([atoms, moved])
    np.testing.assert_allclose(transformed, original, rtol=0, atol=1e-10)
    assert np.abs(original).max() > 0.1


def test_periodic_features_are_invariant() -> None:
    rng = np.random.default_rng(5)
    atoms = bulk("NaCl", "rocksalt", a=5.64, cubic=True)  # 4 Na + 4 Cl
    atoms.rattle(0.05, seed=1)
    moved = atoms.copy()
    rotation = random_rotation(rng)
    moved.set_cell(np.asarray(atoms.cell) @ rotation.T, scale_atoms=True)
    moved.translate(rng.normal(size=3))
    moved.wrap()
    na = [i for i, z in enumerate(atoms.numbers) if z == 11]
    cl = [i for i, z in enumerate(atoms.numbers) if z == 17]
    moved = moved[[*rng.permutation(na), *rng.permutation(cl)]]
    original, transformed = DistributionFeaturiser()([atoms, moved])
    np.testing.assert_allclose(transformed, original, rtol=0, atol=1e-10)


def test_different_geometries_have_different_features() -> None:
    reactant, transition, _ = sn2_seeds()
    features = DistributionFeaturiser()([reactant, transition, rattled_sn2()])
    for a, b in itertools.combinations(range(3), 2):
        assert np.linalg.norm(features[a] - features[b]) > 1e-2 * np.linalg.norm(features[a])


def test_layout_is_fixed_by_the_element_list() -> None:
    frames = [Atoms("H2", positions=[[0, 0, 0], [0, 0, 0.74]]), rattled_sn2()]
    featuriser = DistributionFeaturiser(elements=[1, 6, 17])
    features = featuriser(frames)
    n_expected = 6 * N_RADIAL + 3 * N_ANGULAR  # 6 unordered pairs of 3 elements, 3 centre elements
    assert features.shape == (2, n_expected)
    # H2 alone only fills the H–H channel.
    assert features[0, :N_RADIAL].any() and not features[0, N_RADIAL:].any()
    # Derived from the frames, the same two frames give the same layout.
    np.testing.assert_array_equal(DistributionFeaturiser()(frames), features)
    with pytest.raises(ValueError, match=r"frames contain Cl, not in the feature layout \(H, C\)"):
        DistributionFeaturiser(elements=[1, 6])([rattled_sn2()])


def test_a_thousand_small_molecules_featurise_quickly() -> None:
    frames = [rattled_sn2(seed) for seed in range(1000)]
    featuriser = get_featuriser("distribution")
    started = time.perf_counter()
    features = featuriser(frames)
    elapsed = time.perf_counter() - started
    assert features.shape[0] == 1000
    assert elapsed < 3.0, f"featurising 1000 six-atom frames took {elapsed:.2f} s"


def test_small_batches_give_the_same_features() -> None:
    frames = [rattled_sn2(seed) for seed in range(20)] + [bulk("Si", "diamond", a=5.43)]
    featuriser = DistributionFeaturiser(elements=[1, 6, 14, 17])
    whole = featuriser(frames)
    featuriser._PAIRS_PER_BATCH = 1  # one frame per batch
    np.testing.assert_allclose(featuriser(frames), whole, rtol=0, atol=1e-14)


def test_unknown_featuriser_names_the_known_ones() -> None:
    with pytest.raises(UnknownFeaturiserError, match="distribution"):
        get_featuriser("soap")
