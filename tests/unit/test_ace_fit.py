"""The linear ACE fit: design rows against pyace's own calculator and finite differences, the folded normal
equations against a dense least-squares problem, exact recovery of a known potential, a real fit on xTB
frames, reference energies in the written files, the active set's γ, the core repulsion below the data, the
trajectory-wise cross-validation folds, and the nonlinear option's error."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pytest
from ase import Atoms
from ase.data import atomic_numbers, covalent_radii

from pyacemaker.rpc import WrongStateError
from pyacemaker.services.trainer import linear_ace
from pyacemaker.services.trainer.ace_fit import (
    basis_config,
    fit_linear_ace,
    infer_cutoff,
    infer_functions_per_element,
    shortest_pair_distances,
    validate_ace_fit,
)
from pyacemaker.services.trainer.datasets import fitted_reference_energies
from pyacemaker.services.trainer.evaluation import ace_calculator, evaluate_potential, extrapolation_grades
from pyacemaker.services.trainer.pacemaker_nonlinear import pacemaker_command, pacemaker_input, tensorflow_missing
from pyacemaker.structures import labelled_copies, write_extxyz
from pyacemaker.v1 import trainer_pb2
from tests.conftest import sn2_seeds
from tests.finite_differences import numerical_forces
from tests.sn2_training_data import xtb_e0s, xtb_frames

pyace = pytest.importorskip("pyace", reason="python-ace is not installed (pyacemaker[trainer])")

ELEMENTS = ["H", "C", "Cl"]


def small_basis(functions_per_element: int = 8, cutoff: float = 5.0):
    return pyace.ACEBBasisSet(basis_config(ELEMENTS, cutoff, functions_per_element))


def known_potential(tmp_path: Path, seed: int = 1, functions_per_element: int = 8) -> tuple[Path, Path, np.ndarray]:
    """A linear ACE with random coefficients and E0s, written by the trainer's own writer."""
    basis = small_basis(functions_per_element)
    coeffs = np.random.default_rng(seed).normal(0.0, 0.05, size=len(basis.basis_coeffs))
    e0s = {1: -10.0, 6: -40.0, 17: -100.0}
    yaml_path, yace_path = tmp_path / "known.yaml", tmp_path / "known.yace"
    linear_ace.write_potential(basis, coeffs, e0s, yaml_path, yace_path)
    return yaml_path, yace_path, coeffs


def test_design_rows_reproduce_pyace_energies_and_forces(tmp_path: Path) -> None:
    yaml_path, yace_path, coeffs = known_potential(tmp_path)
    design = linear_ace.AceDesign(linear_ace.load_basis(yaml_path))
    atoms = sn2_seeds()[1]
    atoms.rattle(0.05, seed=2)
    energy_row, force_rows = design.rows(atoms)
    e0_sum = -40.0 + 3 * -10.0 + 2 * -100.0
    reference = ace_calculator(yace_path)
    copy = atoms.copy()
    copy.calc = reference
    assert energy_row @ coeffs * len(atoms) + e0_sum == pytest.approx(copy.get_potential_energy(), abs=1e-8)
    np.testing.assert_allclose((force_rows @ coeffs).reshape(-1, 3), copy.get_forces(), atol=1e-8)

    def energy(a: Atoms) -> float:
        return float(design.rows(a)[0] @ coeffs * len(a))

    np.testing.assert_allclose((force_rows @ coeffs).reshape(-1, 3), numerical_forces(energy, atoms, 1e-4), atol=1e-5)


def test_folded_normal_equations_equal_the_dense_weighted_problem(tmp_path: Path) -> None:
    frames = xtb_frames()[:12]
    design = linear_ace.AceDesign(small_basis(4))
    targets = linear_ace.Targets(
        np.array([a.get_potential_energy() / len(a) for a in frames]), [a.get_forces() for a in frames]
    )
    folds = linear_ace.fold_assignment(len(frames), 3, seed=0)
    equations = linear_ace.accumulate(design, frames, targets, folds, 3)
    rows = [design.rows(a) for a in frames]
    energy_rows = np.array([r[0] for r in rows])
    force_rows = np.vstack([r[1] for r in rows])
    force_targets = np.concatenate([f.ravel() for f in targets.forces])
    w_energy, w_forces = (1 - 0.3) / len(frames), 0.3 / len(force_targets)
    gram, rhs = equations.total(0.3)
    dense_gram = w_energy * energy_rows.T @ energy_rows + w_forces * force_rows.T @ force_rows
    dense_rhs = w_energy * energy_rows.T @ targets.energy_per_atom + w_forces * force_rows.T @ force_targets
    np.testing.assert_allclose(gram, dense_gram, rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(rhs, dense_rhs, rtol=1e-10, atol=1e-12)
    coeffs = np.random.default_rng(0).normal(size=design.n_functions)
    fold_energy = sum(equations.squared_errors(k, coeffs)[0] for k in range(3))
    assert fold_energy == pytest.approx(np.sum((energy_rows @ coeffs - targets.energy_per_atom) ** 2), rel=1e-8)


def test_fit_recovers_a_known_linear_potential(tmp_path: Path) -> None:
    _, yace_path, _ = known_potential(tmp_path, functions_per_element=6)
    frames = labelled_copies(ace_calculator(yace_path), xtb_frames()[:60])
    fit = fit_linear_ace(
        frames[:45], tmp_path / "fit", e0s={1: -10.0, 6: -40.0, 17: -100.0}, cutoff=5.0, functions_per_element=6
    )
    scores = evaluate_potential(fit.yace_path, frames[45:]).errors
    # The one-standard-error rule regularises more than the smallest CV loss would (here λ = 1e-3 for a CV force
    # error of 0.34 instead of 0.27 meV/Å): recovery to a fraction of a meV/Å, against labels spread over eV/Å.
    assert 0 < fit.metrics["ridge_lambda_relative"] <= 1e-2
    assert scores.energy_rmse_per_atom < 1e-4
    assert scores.forces_rmse < 1e-3


def test_linear_fit_on_xtb_frames_generalises(tmp_path: Path) -> None:
    frames = xtb_frames()
    train, held_out = frames[:80], frames[80:]
    fit = fit_linear_ace(train, tmp_path / "fit", e0s=xtb_e0s(), validation=held_out)
    forces = np.concatenate([a.get_forces().ravel() for a in held_out])
    energies = np.array([a.get_potential_energy() / len(a) for a in held_out])
    # Far better than predicting the mean: the held-out errors are a small part of the labels' spread.
    assert fit.metrics["validation_forces_rmse_ev_per_a"] < 0.35 * forces.std()
    assert fit.metrics["validation_energy_rmse_ev_per_atom"] < 0.35 * energies.std()
    assert 0 < fit.metrics["basis_functions_count"] <= 3 * infer_functions_per_element(train, ELEMENTS)
    # The .yaml (E0s in its metadata) and the .yace (E0s in its E0 entry) are the same potential.
    from_yaml = evaluate_potential(fit.yaml_path, held_out).predictions
    from_yace = evaluate_potential(fit.yace_path, held_out).predictions
    np.testing.assert_allclose(from_yaml.energies, from_yace.energies, atol=1e-7)
    np.testing.assert_allclose(np.vstack(from_yaml.forces), np.vstack(from_yace.forces), atol=1e-7)


def test_fit_without_reference_energies_fits_them_with_the_basis(tmp_path: Path) -> None:
    frames = xtb_frames()
    with_e0s = fit_linear_ace(frames[:80], tmp_path / "given", e0s=xtb_e0s(), validation=frames[80:])
    fitted = fit_linear_ace(frames[:80], tmp_path / "fitted", validation=frames[80:])
    # Total energies come out right although no isolated-atom energy was given (the mean alone is ~60 eV/atom).
    assert (
        fitted.metrics["validation_energy_rmse_ev_per_atom"]
        < 2 * with_e0s.metrics["validation_energy_rmse_ev_per_atom"]
    )
    assert fitted.metrics["validation_forces_rmse_ev_per_a"] < 1.5 * with_e0s.metrics["validation_forces_rmse_ev_per_a"]


def test_isolated_atoms_get_their_reference_energy(tmp_path: Path) -> None:
    yaml_path, yace_path, _ = known_potential(tmp_path)
    for path in (yaml_path, yace_path):
        calculator = ace_calculator(path)
        for symbol, e0 in (("H", -10.0), ("C", -40.0), ("Cl", -100.0)):
            atom = Atoms(symbol)
            atom.calc = calculator
            assert atom.get_potential_energy() == pytest.approx(e0, abs=1e-10)


def test_active_set_grades_training_environments_inside_and_distortions_outside(tmp_path: Path) -> None:
    frames = xtb_frames()[:60]
    fit = fit_linear_ace(frames, tmp_path / "fit", e0s=xtb_e0s(), functions_per_element=20)
    inside = extrapolation_grades(fit.yaml_path, fit.asi_path, frames)
    stretched = sn2_seeds()[1]
    stretched.positions *= 1.35  # every bond 35 % longer: no training environment looks like this
    outside = extrapolation_grades(fit.yaml_path, fit.asi_path, [stretched])
    assert inside.max() <= 1.01 + 1e-6  # MaxVol tolerance: the active set spans the training environments
    assert outside[0] > 2.0


def test_inferred_cutoff_and_basis_size() -> None:
    largest_bond = 2 * max(covalent_radii[atomic_numbers[s]] for s in ELEMENTS)
    assert infer_cutoff(ELEMENTS) == pytest.approx(2.5 * largest_bond, abs=0.01)
    assert infer_cutoff(["H"]) == 4.0  # clamped: a cutoff must reach beyond the first shell
    few = xtb_frames()[:10]
    # Never more functions per element than 0.8 x environments of the rarest element (one C per frame).
    assert infer_functions_per_element(few, ELEMENTS) <= 8
    many = xtb_frames()
    assert infer_functions_per_element(many, ELEMENTS) > infer_functions_per_element(few, ELEMENTS)


def test_fitted_reference_energies_explain_the_mean_energy() -> None:
    frames = xtb_frames()[:20]
    energies = np.array([a.get_potential_energy() for a in frames])
    fitted = fitted_reference_energies(frames, energies, ELEMENTS)
    sums = [sum(fitted[int(z)] for z in a.numbers) for a in frames]
    assert np.mean(sums) == pytest.approx(energies.mean(), abs=1e-8)


@pytest.mark.skipif(tensorflow_missing() is None, reason="the TensorFlow extra is installed here")
def test_nonlinear_fit_names_the_missing_extra(artifact_store, tmp_path: Path) -> None:
    write_extxyz(tmp_path / "train.extxyz", xtb_frames()[:2])
    frames = artifact_store.put_file(tmp_path / "train.extxyz", "structures")
    spec = trainer_pb2.AceFitSpec(train_data=[frames], model_kind="nonlinear")
    with pytest.raises(WrongStateError) as error:
        validate_ace_fit(spec, artifact_store)
    message = str(error.value)
    assert "TensorFlow" in message and "tensorflow-cpu==2.20" in message and "linear ACE needs none" in message


def test_pacemaker_input_and_command_for_fit_and_finetune(tmp_path: Path) -> None:
    config = pacemaker_input(ELEMENTS, 5.1, 40, tmp_path / "train.pckl.gzip", None, seed=3)
    assert config["potential"]["elements"] == ELEMENTS
    assert config["potential"]["bonds"]["ALL"]["rcut"] == 5.1
    assert config["potential"]["embeddings"]["ALL"]["ndensity"] == 2  # nonlinear embedding
    assert config["potential"]["functions"]["number_of_functions_per_element"] == 40
    assert config["data"] == {"filename": str(tmp_path / "train.pckl.gzip")}
    fit = pacemaker_command(tmp_path / "in.yaml")
    finetune = pacemaker_command(tmp_path / "in.yaml", tmp_path / "b.yaml")
    assert fit[-1] == str(tmp_path / "in.yaml") and "-p" not in fit
    assert finetune[-2:] == ["-p", str(tmp_path / "b.yaml")] and "-ip" not in finetune


def test_cross_validation_folds_fit_the_memory_budget() -> None:
    budget_matrices = linear_ace.GRAM_MEMORY_BYTES // (8 * 1000**2)  # 1000 functions: 8 MB per Gram matrix
    assert linear_ace.folds_within_memory(1000, 500, 5) == min(5, budget_matrices // 2)
    assert linear_ace.folds_within_memory(1000, 3, 5) == 3  # never more folds than structures
    with pytest.raises(linear_ace.LinearAceError, match="smaller basis_size"):
        linear_ace.folds_within_memory(20000, 500, 5)  # 3.2 GB per matrix: not even 2 folds fit


def _dimer_energies(path: Path, pair: str, distances: Sequence[float]) -> tuple[np.ndarray, np.ndarray]:
    """Energies above the isolated atoms (eV) and the second atom's force along the bond (eV/Å) of a dimer."""
    calculator = ace_calculator(path)
    energies, forces = [], []
    for r in distances:
        dimer = Atoms(pair, positions=[[0.0, 0.0, 0.0], [r, 0.0, 0.0]])
        dimer.calc = calculator
        energies.append(dimer.get_potential_energy() - sum(xtb_e0s()[int(z)] for z in dimer.numbers))
        forces.append(dimer.get_forces()[1, 0])
    return np.array(energies), np.array(forces)


def test_core_repulsion_bounds_the_potential_below_the_data(tmp_path: Path) -> None:
    frames = xtb_frames()[:80]
    shortest = shortest_pair_distances(frames, 5.0)
    assert min(shortest[("Cl", "H")], shortest[("C", "Cl")]) > 1.5  # no training pair comes near 0.5-1.0 Å
    distances = (0.5, 0.7, 0.9, 1.0)
    walls, free = {}, {}
    for part, subset in (("a", frames[:60]), ("b", frames[20:])):
        with_core = fit_linear_ace(subset, tmp_path / f"core_{part}", e0s=xtb_e0s(), functions_per_element=10)
        without = fit_linear_ace(
            subset, tmp_path / f"free_{part}", e0s=xtb_e0s(), functions_per_element=10, core_repulsion=False
        )
        assert with_core.metrics["inner_cutoff_Cl-H_a"] == pytest.approx(min(shortest[("Cl", "H")], 1.33), abs=1e-6)
        for pair in ("HCl", "CCl"):
            energies, forces = _dimer_energies(with_core.yace_path, pair, distances)
            # A wall: energies of several eV that rise as the atoms are pushed together, forces pushing apart.
            assert energies[-1] > 5.0 and np.all(np.diff(energies) < 0), (pair, energies)
            assert np.all(forces > 1.0), (pair, forces)
            # The .yaml (what γ uses) carries the same wall as the .yace (what LAMMPS uses).
            np.testing.assert_allclose(_dimer_energies(with_core.yaml_path, pair, distances)[0], energies, atol=1e-6)
            walls[part, pair] = energies
            free[part, pair] = _dimer_energies(without.yace_path, pair, distances)[0]
    for pair in ("HCl", "CCl"):
        # Below the inner cutoff no fitted coefficient acts: two fits on different data agree there exactly,
        # while without the core each fit extrapolates its own way (differences of eV at least).
        np.testing.assert_allclose(walls["a", pair], walls["b", pair], atol=1e-8)
        assert np.max(np.abs(free["a", pair] - free["b", pair])) > 1.0


def test_cross_validation_folds_hold_whole_trajectories() -> None:
    frames = []
    for replica, size in enumerate((7, 3, 5, 5, 2, 8, 4)):
        for step in range(size):
            frames.append(Atoms("H2", positions=[[0, 0, 0], [0.74 + 0.01 * step, 0, 0]], info={"md_replica": replica}))
    frames.append(Atoms("H2", positions=[[0, 0, 0], [0.8, 0, 0]]))  # not from MD: a group of its own
    groups = linear_ace.structure_groups(frames)
    assert len(set(groups)) == 8
    folds, n_folds = linear_ace.group_folds(groups, 5, seed=3)
    assert n_folds == 5
    for group in set(groups):
        assert len({int(f) for f, g in zip(folds, groups, strict=True) if g == group}) == 1
    sizes = np.bincount(folds, minlength=n_folds)
    assert sizes.min() >= 4 and sizes.max() <= 9  # balanced as whole groups allow (35 frames, largest group 8)
    # One trajectory alone: contiguous blocks in time order, not interleaved frames.
    single, n_single = linear_ace.group_folds(["md:0"] * 10, 3, seed=0)
    assert n_single == 3 and list(single) == sorted(single)
