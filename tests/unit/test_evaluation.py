"""The evaluation module: error figures against numbers computed here by hand, parity data, formats."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from ase import Atoms
from ase.calculators.lj import LennardJones
from ase.calculators.singlepoint import SinglePointCalculator

from pyacemaker.services.trainer.evaluation import (
    error_metrics,
    evaluate_calculator,
    load_calculator,
    parity_data,
    predict,
)
from tests.conftest import sn2_seeds


def lj_frames(n: int, epsilon: float) -> list[Atoms]:
    """Rattled SN2 geometries labelled with a Lennard-Jones potential (a stand-in reference level)."""
    frames = []
    for i in range(n):
        atoms = sn2_seeds()[i % 3]
        atoms.rattle(0.05, seed=i)
        atoms.calc = LennardJones(epsilon=epsilon, sigma=1.2, rc=6.0)
        energy, forces = atoms.get_potential_energy(), atoms.get_forces()
        atoms.calc = SinglePointCalculator(atoms, energy=energy, forces=forces)
        frames.append(atoms)
    return frames


def test_error_figures_match_a_hand_computation() -> None:
    frames = lj_frames(6, epsilon=0.010)
    model = LennardJones(epsilon=0.012, sigma=1.2, rc=6.0)  # the "potential": 20 % deeper wells
    evaluation = evaluate_calculator(model, frames)
    energy_errors, force_errors = [], []
    for atoms in frames:
        probe = atoms.copy()
        probe.calc = LennardJones(epsilon=0.012, sigma=1.2, rc=6.0)
        energy_errors.append((probe.get_potential_energy() - atoms.get_potential_energy()) / len(atoms))
        force_errors.append((probe.get_forces() - atoms.get_forces()).ravel())
    energy_errors, force_errors = np.array(energy_errors), np.concatenate(force_errors)
    errors = evaluation.errors
    assert errors.n_structures == 6
    assert errors.energy_rmse_per_atom == pytest.approx(np.sqrt(np.mean(energy_errors**2)), rel=1e-12)
    assert errors.energy_mae_per_atom == pytest.approx(np.mean(np.abs(energy_errors)), rel=1e-12)
    assert errors.forces_rmse == pytest.approx(np.sqrt(np.mean(force_errors**2)), rel=1e-12)
    assert errors.forces_mae == pytest.approx(np.mean(np.abs(force_errors)), rel=1e-12)
    assert np.isnan(errors.stress_rmse)  # molecules carry no stress
    report = errors.report()
    assert report["energy_rmse_mev_per_atom"] == pytest.approx(1e3 * errors.energy_rmse_per_atom)
    assert report["forces_mae_mev_per_a"] == pytest.approx(1e3 * errors.forces_mae)


def test_a_perfect_potential_has_zero_error_and_parity_on_the_diagonal() -> None:
    frames = lj_frames(4, epsilon=0.010)
    predictions = predict(LennardJones(epsilon=0.010, sigma=1.2, rc=6.0), frames)
    errors = error_metrics(frames, predictions)
    assert errors.energy_rmse_per_atom == pytest.approx(0.0, abs=1e-12)
    assert errors.forces_rmse == pytest.approx(0.0, abs=1e-12)
    parity = parity_data(frames, predictions)
    np.testing.assert_allclose(parity["energy_per_atom_reference"], parity["energy_per_atom_predicted"])
    np.testing.assert_allclose(parity["forces_reference"], parity["forces_predicted"])
    assert len(parity["forces_reference"]) == sum(3 * len(a) for a in frames)
    assert np.all(np.isnan(parity["gamma_max"]))  # no active set, no γ


def test_stress_errors_for_periodic_cells() -> None:
    from ase.build import bulk

    cell = bulk("Ar", "fcc", a=5.3) * (2, 1, 1)
    cell.rattle(0.02, seed=1)
    cell.calc = LennardJones(epsilon=0.0103, sigma=3.4, rc=8.0)
    energy, forces, stress = cell.get_potential_energy(), cell.get_forces(), cell.get_stress()
    cell.calc = SinglePointCalculator(cell, energy=energy, forces=forces, stress=stress)
    model = LennardJones(epsilon=0.011, sigma=3.4, rc=8.0)
    probe = cell.copy()
    probe.calc = LennardJones(epsilon=0.011, sigma=3.4, rc=8.0)
    expected = np.sqrt(np.mean((probe.get_stress() - stress) ** 2))
    assert evaluate_calculator(model, [cell]).errors.stress_rmse == pytest.approx(expected, rel=1e-10)


def test_unknown_potential_formats_are_refused(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="unknown potential format"):
        load_calculator(tmp_path / "potential.txt")
