"""Step 2's selection science: calibration of the committee spread and uncertain-but-diverse picks."""

from __future__ import annotations

import numpy as np
import pytest
from ase import Atoms
from ase.calculators.singlepoint import SinglePointCalculator

from pyacemaker.services.orchestrator.active_learning import (
    _median_pairwise_distance,
    below_force_cap,
    calibration_factor,
    candidate_force_cap,
    max_force_error,
    select_uncertain,
    within_force_cap,
)


def test_max_force_error_is_the_largest_atomic_error_norm():
    predicted = np.zeros((3, 3))
    reference = np.array([[0.0, 0.0, 0.0], [0.3, 0.4, 0.0], [0.0, 0.1, 0.0]])
    assert max_force_error(predicted, reference) == pytest.approx(0.5)


def test_calibration_recovers_a_known_underestimate():
    rng = np.random.default_rng(1)
    std = rng.uniform(0.01, 0.1, 200)
    error = 7.0 * std * rng.lognormal(0.0, 0.1, 200)  # the committee underestimates 7-fold
    assert calibration_factor(std, error) == pytest.approx(7.0, rel=0.05)


def test_calibration_ignores_zero_spread_and_never_shrinks():
    assert calibration_factor(np.array([0.0, 0.1, 0.2]), np.array([1.0, 0.05, 0.1])) == 1.0
    with pytest.raises(ValueError, match="no labelled structure"):
        calibration_factor(np.zeros(3), np.ones(3))


def test_selection_takes_the_most_uncertain_above_the_threshold():
    std = np.array([0.01, 0.05, 0.2, 0.03, 0.1])
    features = np.arange(5, dtype=float)[:, None] * 10.0  # far apart: no diversity conflicts
    chosen = select_uncertain(std, 2.0, 0.1, features, np.zeros((0, 1)), max_count=10, diversity_fraction=0.1)
    assert chosen.tolist() == [2, 4]  # calibrated 0.4 and 0.2; 0.1 is not above the threshold
    capped = select_uncertain(std, 2.0, 0.05, features, np.zeros((0, 1)), max_count=2, diversity_fraction=0.1)
    assert capped.tolist() == [2, 4]


def test_near_duplicates_are_not_all_sent():
    # Three copies of one uncertain geometry and one distinct, slightly less uncertain one.
    features = np.array([[0.0, 0.0], [0.001, 0.0], [0.0, 0.001], [5.0, 5.0], [10.0, 0.0]])
    std = np.array([0.5, 0.49, 0.48, 0.3, 0.0])
    chosen = select_uncertain(std, 1.0, 0.1, features, np.zeros((0, 2)), max_count=3, diversity_fraction=0.1)
    assert chosen.tolist() == [0, 3]


def test_structures_near_labelled_data_are_skipped():
    features = np.array([[0.0], [10.0], [20.0]])
    std = np.array([0.9, 0.8, 0.7])
    labelled = np.array([[0.01]])
    chosen = select_uncertain(std, 1.0, 0.1, features, labelled, max_count=3, diversity_fraction=0.1)
    assert chosen.tolist() == [1, 2]


def test_ineligible_candidates_are_never_chosen():
    features = np.arange(4, dtype=float)[:, None] * 10.0
    std = np.array([0.9, 0.8, 0.7, 0.6])
    eligible = np.array([False, True, False, True])  # e.g. near-collision geometries excluded by their forces
    chosen = select_uncertain(std, 1.0, 0.1, features, np.zeros((0, 1)), 4, 0.1, eligible=eligible)
    assert chosen.tolist() == [1, 3]


def test_force_cap_judges_the_largest_atomic_force_norm():
    calm = np.array([[0.0, 0.0, 0.0], [3.0, 4.0, 0.0]])  # largest norm 5 eV/Å
    collision = np.array([[0.0, 0.0, 12.0], [0.0, 0.0, -12.0]])
    components_below_norm_above = np.array([[6.0, 6.0, 6.0], [0.0, 0.0, 0.0]])  # norm 10.4 eV/Å
    mask = below_force_cap([calm, collision, components_below_norm_above], 10.0)
    assert mask.tolist() == [True, False, False]
    assert below_force_cap([calm], 5.0).tolist() == [True]  # the cap itself is allowed


def test_training_set_keeps_labels_within_the_training_force_cap():
    frames = []
    for largest in (2.0, 8.0, 12.0):
        atoms = Atoms("H2", positions=[[0, 0, 0], [0, 0, 0.74]])
        atoms.calc = SinglePointCalculator(atoms, forces=[[0, 0, largest], [0, 0, -largest]])
        frames.append(atoms)
    kept, dropped = within_force_cap(frames, 10.0)
    assert [a.get_forces()[0, 2] for a in kept] == [2.0, 8.0]
    assert [a.get_forces()[0, 2] for a in dropped] == [12.0]


def test_candidate_cap_falls_to_the_largest_force_the_md_visited():
    md_frames = [np.array([[0.0, 3.0, 4.0], [1.0, 0.0, 0.0]]), np.array([[0.0, 0.0, 6.5]])]  # largest norms 5, 6.5
    assert candidate_force_cap(10.0, md_frames) == pytest.approx(6.5)
    assert candidate_force_cap(6.0, md_frames) == 6.0  # the configured cap is never raised
    assert candidate_force_cap(10.0, []) == 10.0  # no MD frames among the candidates (iteration 1)


def test_within_energy_range_keeps_candidates_near_the_labelled_energies():
    from pyacemaker.services.orchestrator.active_learning import within_energy_range

    labelled = np.array([-10.0, -9.8, -9.9])  # range 0.2 eV/atom: candidates within [-10.2, -9.6] pass
    candidates = np.array([-10.1, -9.7, -9.55, -10.25, -3.0])
    assert within_energy_range(candidates, labelled).tolist() == [True, True, False, False, False]
    # A one-point labelled set still allows min_margin around it; without labels everything passes.
    assert within_energy_range(np.array([-10.04, -10.2]), np.array([-10.0])).tolist() == [True, False]
    assert within_energy_range(np.array([5.0]), np.array([])).tolist() == [True]


def test_median_pairwise_distance_matches_every_pair_measured_directly():
    points = np.random.default_rng(3).normal(size=(120, 7))
    direct = [np.linalg.norm(points[i] - points[j]) for i in range(120) for j in range(i + 1, 120)]
    assert _median_pairwise_distance(points) == pytest.approx(float(np.median(direct)), rel=1e-12)
    # Above max_points a fixed subsample stands in: the same value on every call.
    assert _median_pairwise_distance(points, max_points=50) == _median_pairwise_distance(points, max_points=50)
    assert _median_pairwise_distance(points[:1]) == 0.0
