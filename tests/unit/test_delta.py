"""Delta learning: exact recovery of a known correction, anchoring by surrogate rows, the xTB → level-B case
(held-out errors of the final potential below the base's), one self-contained output, and the nonlinear
option's error."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from ase import Atoms

from pyacemaker.rpc import InvalidInputError, WrongStateError
from pyacemaker.services.trainer import linear_ace
from pyacemaker.services.trainer.ace_fit import EquationsReuse, basis_config, fit_linear_ace
from pyacemaker.services.trainer.delta import (
    anchor_normal_equations,
    fit_linear_delta,
    saved_anchor,
    validate_delta_fit,
)
from pyacemaker.services.trainer.evaluation import ace_calculator, evaluate_potential
from pyacemaker.services.trainer.pacemaker_nonlinear import tensorflow_missing
from pyacemaker.structures import labelled_copies, write_extxyz
from pyacemaker.v1 import trainer_pb2
from tests.sn2_training_data import level_b, xtb_e0s, xtb_frames

pyace = pytest.importorskip("pyace", reason="python-ace is not installed (pyacemaker[trainer])")

ELEMENTS = ["H", "C", "Cl"]
E0S = {1: -10.0, 6: -40.0, 17: -100.0}


def write_linear(tmp_path: Path, name: str, coeffs: np.ndarray, e0s: dict[int, float], fpe: int = 6) -> Path:
    basis = pyace.ACEBBasisSet(basis_config(ELEMENTS, 5.0, fpe))
    linear_ace.write_potential(basis, coeffs, e0s, tmp_path / f"{name}.yaml", tmp_path / f"{name}.yace")
    return tmp_path / f"{name}.yaml"


def n_functions(fpe: int = 6) -> int:
    return len(pyace.ACEBBasisSet(basis_config(ELEMENTS, 5.0, fpe)).basis_coeffs)


def labelled_by(path: Path, frames: list[Atoms]) -> list[Atoms]:
    calculator = ace_calculator(path)
    return labelled_copies(calculator, frames)


def test_delta_recovers_a_known_correction_and_reference_shift(tmp_path: Path) -> None:
    rng = np.random.default_rng(4)
    base_coeffs = rng.normal(0.0, 0.05, n_functions())
    true_coeffs = base_coeffs + rng.normal(0.0, 0.05, n_functions())
    shifted = {z: e + 0.3 for z, e in E0S.items()}  # the new level's isolated atoms lie 0.3 eV higher
    base = write_linear(tmp_path, "base", base_coeffs, E0S)
    truth = write_linear(tmp_path, "truth", true_coeffs, shifted)
    frames = labelled_by(truth, xtb_frames()[:70])
    fit = fit_linear_delta(base, frames[:50], [], tmp_path / "out")
    held_out = frames[50:]
    base_errors = evaluate_potential(base, held_out).errors
    final_errors = evaluate_potential(fit.yace_path, held_out).errors
    assert base_errors.energy_rmse_per_atom > 0.2  # the offset alone is 0.3 eV per atom
    assert final_errors.energy_rmse_per_atom < 1e-4
    assert final_errors.forces_rmse < 0.05 * base_errors.forces_rmse


def test_surrogate_rows_anchor_the_correction_to_the_base() -> None:
    frames = xtb_frames()[:40]
    design = linear_ace.AceDesign(pyace.ACEBBasisSet(basis_config(ELEMENTS, 5.0, 10)))
    dft, surrogate = frames[:6], frames[6:]
    rng = np.random.default_rng(0)
    residuals = linear_ace.Targets(rng.normal(0, 0.01, len(dft)), [rng.normal(0, 0.1, (len(a), 3)) for a in dft])
    equations = linear_ace.accumulate(design, dft, residuals, np.arange(len(dft)) % 3, 3)
    zero = linear_ace.Targets(np.zeros(len(surrogate)), [np.zeros((len(a), 3)) for a in surrogate])
    anchor = linear_ace.accumulate(design, surrogate, zero, np.zeros(len(surrogate), dtype=int), 1)
    anchor_gram, _ = anchor.total(linear_ace.DEFAULT_FORCES_SHARE)
    free = linear_ace.fit_ridge_cv(equations, lambdas=[1e-6])
    anchored = linear_ace.fit_ridge_cv(equations, lambdas=[1e-6], anchor_gram=anchor_gram)

    def change_on_surrogate(delta: np.ndarray) -> float:
        _, forces, _ = linear_ace.fit_errors(anchor, delta)  # targets are zero: this is the change itself
        return forces

    assert change_on_surrogate(anchored.coeffs) < 0.5 * change_on_surrogate(free.coeffs)


def test_cross_validation_from_the_kept_dft_rows_equals_the_one_decomposition_per_fold_way() -> None:
    """The delta's CV solves every fold from one decomposition of the anchor and the DFT rows
    (`_AnchoredRidge`); it must give the table, λ and coefficients of the plain way, reference shifts included."""
    frames = xtb_frames()[:40]
    design = linear_ace.AceDesign(pyace.ACEBBasisSet(basis_config(ELEMENTS, 5.0, 10)), reference_elements=ELEMENTS)
    dft, surrogate = frames[:8], frames[8:]
    rng = np.random.default_rng(1)
    residuals = linear_ace.Targets(rng.normal(0, 0.01, len(dft)), [rng.normal(0, 0.1, (len(a), 3)) for a in dft])
    rows = linear_ace.FoldRows()
    equations = linear_ace.accumulate(design, dft, residuals, np.arange(len(dft)) % 4, 4, keep_rows=rows)
    assert rows.count == linear_ace.row_count(dft, residuals) == sum(1 + 3 * len(a) for a in dft)
    zero = linear_ace.Targets(np.zeros(len(surrogate)), [np.zeros((len(a), 3)) for a in surrogate])
    anchor = linear_ace.accumulate(
        design, surrogate, zero, np.zeros(len(surrogate), dtype=int), 1, with_references=False
    )
    anchor_gram = 3.0 * anchor.total(linear_ace.DEFAULT_FORCES_SHARE)[0]
    options = {"anchor_gram": anchor_gram, "n_unpenalised": len(ELEMENTS), "one_standard_error": True}
    plain = linear_ace.fit_ridge_cv(equations, **options)
    from_rows = linear_ace.fit_ridge_cv(equations, rows=rows, **options)
    assert from_rows.lam == plain.lam
    losses = np.array([[row["cv_loss"] for row in fit.table] for fit in (plain, from_rows)])
    np.testing.assert_allclose(losses[1], losses[0], rtol=1e-6)
    np.testing.assert_allclose(from_rows.coeffs, plain.coeffs, rtol=1e-7, atol=1e-9 * np.abs(plain.coeffs).max())
    assert np.abs(plain.coeffs[-len(ELEMENTS) :]).max() > 0  # the reference shifts took part


def test_delta_corrects_xtb_base_towards_level_b_on_held_out_frames(tmp_path: Path) -> None:
    frames = xtb_frames()
    surrogate, rest = frames[:70], frames[70:]
    base = fit_linear_ace(surrogate, tmp_path / "base", e0s=xtb_e0s())
    level_b_frames = level_b(rest)
    dft, held_out = level_b_frames[:20], level_b_frames[20:]
    final = fit_linear_delta(base.yaml_path, dft, surrogate, tmp_path / "final")
    base_errors = evaluate_potential(base.yace_path, held_out).errors
    final_errors = evaluate_potential(final.yace_path, held_out).errors
    assert final_errors.energy_rmse_per_atom < 0.5 * base_errors.energy_rmse_per_atom
    assert final_errors.forces_rmse < base_errors.forces_rmse
    assert final.metrics["final_dft_forces_rmse_ev_per_a"] < final.metrics["base_dft_forces_rmse_ev_per_a"]


def test_final_potential_is_one_self_contained_file(tmp_path: Path) -> None:
    frames = xtb_frames()
    base = fit_linear_ace(frames[:40], tmp_path / "base", e0s=xtb_e0s(), functions_per_element=10)
    dft = level_b(frames[40:60])
    final = fit_linear_delta(base.yaml_path, dft, frames[:40], tmp_path / "final", surrogate_weight=0.1)
    assert final.metrics["surrogate_weight_relative"] == 0.1
    probe = frames[60:70]
    from_yace = evaluate_potential(final.yace_path, probe).predictions
    from_yaml = evaluate_potential(final.yaml_path, probe, final.asi_path).predictions
    np.testing.assert_allclose(from_yace.energies, from_yaml.energies, atol=1e-7)
    assert np.all(np.isfinite(from_yaml.gamma_max))
    # The new reference energies live in the file: an isolated atom gets the corrected E0, not the base's.
    atom = Atoms("C")
    atom.calc = ace_calculator(final.yace_path)
    assert atom.get_potential_energy() != pytest.approx(xtb_e0s()[6], abs=1e-6)
    assert len(list((tmp_path / "final").glob("*.yace"))) == 1


def test_validate_rejects_a_yace_base_and_names_the_extra_for_a_nonlinear_base(tmp_path: Path, artifact_store) -> None:
    frames = xtb_frames()[:20]
    base = fit_linear_ace(frames, tmp_path / "base", e0s=xtb_e0s(), functions_per_element=6)
    write_extxyz(tmp_path / "dft.extxyz", frames[:2])
    data = artifact_store.put_file(tmp_path / "dft.extxyz", "structures")
    yace_ref = artifact_store.put_file(base.yace_path, "potential")
    with pytest.raises(InvalidInputError, match=r"\.yaml"):
        validate_delta_fit(trainer_pb2.DeltaFitSpec(base_potential=yace_ref, dft_data=[data]), artifact_store)
    from pyace.multispecies_basisextension import create_multispecies_basis_config

    nonlinear = create_multispecies_basis_config(
        {
            "deltaSplineBins": 0.001,
            "elements": ELEMENTS,
            "embeddings": {
                "ALL": {"npot": "FinnisSinclairShiftedScaled", "fs_parameters": [1, 1, 1, 0.5], "ndensity": 2}
            },
            "bonds": {"ALL": {"radbase": "SBessel", "radparameters": [5.25], "rcut": 5.0, "dcut": 0.01}},
            "functions": {
                "number_of_functions_per_element": 4,
                "ALL": {"nradmax_by_orders": [4, 2], "lmax_by_orders": [0, 1]},
            },
        }
    )
    nonlinear.save(str(tmp_path / "nonlinear.yaml"))
    assert not linear_ace.is_linear_basis(pyace.BBasisConfiguration(str(tmp_path / "nonlinear.yaml")))
    if tensorflow_missing() is None:
        pytest.skip("the TensorFlow extra is installed here")
    ref = artifact_store.put_file(tmp_path / "nonlinear.yaml", "potential")
    with pytest.raises(WrongStateError, match="TensorFlow"):
        validate_delta_fit(trainer_pb2.DeltaFitSpec(base_potential=ref, dft_data=[data]), artifact_store)


def _far_from(atoms: Atoms) -> Atoms:
    """The structure with its C–H bonds stretched to twice their length: no anchor frame is near it. Wild
    labels (forces of 50 eV/Å): a correction fitted on them would wreck the potential."""
    far = atoms.copy()
    carbon = far.positions[far.numbers == 6][0]
    hydrogens = far.numbers == 1
    far.positions[hydrogens] = carbon + 2.0 * (far.positions[hydrogens] - carbon)
    rng = np.random.default_rng(1)
    from ase.calculators.singlepoint import SinglePointCalculator

    far.calc = SinglePointCalculator(far, energy=atoms.get_potential_energy() + 30.0, forces=rng.normal(0, 50, (6, 3)))
    return far


def test_dft_structures_beyond_the_surrogate_data_are_left_out_and_counted(tmp_path: Path) -> None:
    frames = xtb_frames()
    anchor = frames[:40]
    base = fit_linear_ace(anchor, tmp_path / "base", e0s=xtb_e0s(), functions_per_element=10)
    near = level_b(frames[40:52])
    far = [_far_from(a) for a in frames[52:54]]
    with_far = fit_linear_delta(base.yaml_path, [*near, *far], anchor, tmp_path / "with_far", surrogate_weight=0.1)
    # γ against the anchor's active set, recomputed apart: the far structures lie beyond the limit.
    linear_ace.write_active_set(base.yaml_path, anchor, tmp_path / "anchor.asi")
    grades = evaluate_potential(base.yaml_path, [*near, *far], tmp_path / "anchor.asi").predictions.gamma_max
    beyond = int(np.sum(grades > 5.0))
    assert np.all(grades[len(near) :] > 5.0) and beyond >= len(far)
    assert with_far.metrics["dft_structures_beyond_surrogate_count"] == beyond
    assert with_far.metrics["dft_structures_count"] == len(near) + len(far) - beyond
    assert with_far.metrics["dft_max_gamma_vs_surrogate"] == pytest.approx(grades.max(), rel=1e-6)
    # The final's active set, grown from the anchor's by the DFT frames, covers every frame it was made from, the
    # far ones included, as one chosen from all of them does.
    everything = [*anchor, *near, *far]
    final_grades = evaluate_potential(with_far.yaml_path, everything, with_far.asi_path).predictions.gamma_max
    assert final_grades.max() <= linear_ace.ACTIVE_SET_TOLERANCE + 1e-6
    linear_ace.write_active_set(with_far.yaml_path, everything, tmp_path / "scratch.asi")
    scratch = evaluate_potential(with_far.yaml_path, everything, tmp_path / "scratch.asi").predictions.gamma_max
    assert scratch.max() <= linear_ace.ACTIVE_SET_TOLERANCE + 1e-6
    # Their wild labels take no part: the potential is the one fitted without them ...
    without = fit_linear_delta(
        base.yaml_path,
        [a for a, g in zip([*near, *far], grades, strict=True) if g <= 5.0],
        anchor,
        tmp_path / "without",
        surrogate_weight=0.1,
    )
    probe = frames[60:70]
    np.testing.assert_allclose(
        evaluate_potential(with_far.yace_path, probe).predictions.energies,
        evaluate_potential(without.yace_path, probe).predictions.energies,
        atol=1e-9,
    )
    # ... and with no limit they do take part (and count as inside).
    unlimited = fit_linear_delta(
        base.yaml_path, [*near, *far], anchor, tmp_path / "unlimited", surrogate_weight=0.1, max_dft_gamma=0.0
    )
    assert unlimited.metrics["dft_structures_beyond_surrogate_count"] == 0
    assert unlimited.metrics["dft_structures_count"] == len(near) + len(far)


def _no_progress(done: int, total: int, message: str) -> None:
    """A progress callback that drops the reports."""


def test_anchor_from_the_base_fits_kept_equations_equals_the_anchor_from_every_frames_rows(
    tmp_path: Path, artifact_store
) -> None:
    """The delta's anchor Gram matrices from step 6's kept equations, with the rows of frames the equations hold
    but the anchor lacks taken out and those the anchor adds put in, against the rows of every anchor frame."""
    frames = xtb_frames()[:36]
    held, not_anchor, added = frames[:24], frames[24:30], frames[30:]
    kept = tmp_path / "equations.npz"
    shards = []
    for name, part in (("held", held), ("not_anchor", not_anchor), ("added", added)):
        write_extxyz(tmp_path / f"{name}.extxyz", part)
        shards.append(artifact_store.put_file(tmp_path / f"{name}.extxyz", "structures"))
    base = fit_linear_ace(
        [*held, *not_anchor],
        tmp_path / "base",
        e0s=xtb_e0s(),
        functions_per_element=6,
        reuse=EquationsReuse(keep=kept, metadata={"shards": [shards[0].sha256, shards[1].sha256]}),
    )
    design = linear_ace.AceDesign(linear_ace.load_basis(base.yaml_path), reference_elements=ELEMENTS)
    anchor = [*held, *added]
    spec = trainer_pb2.DeltaFitSpec(
        surrogate_data=[shards[0], shards[2]],
        anchor_equations=artifact_store.put_file(kept, "normal_equations"),
        anchor_equations_data=shards[:2],
    )
    saved = saved_anchor(spec, artifact_store)
    assert saved is not None
    assert (len(saved.removed), len(saved.added)) == (len(not_anchor), len(added))
    from_saved = anchor_normal_equations(design, anchor, False, saved, _no_progress)
    from_rows = anchor_normal_equations(design, anchor, False, None, _no_progress)
    assert (int(from_saved.rows_energy.sum()), int(from_saved.rows_forces.sum())) == (
        len(anchor),
        3 * sum(len(a) for a in anchor),
    )
    expected = from_rows.total(linear_ace.DEFAULT_FORCES_SHARE)[0]
    got = from_saved.total(linear_ace.DEFAULT_FORCES_SHARE)[0]
    np.testing.assert_allclose(got, expected, rtol=0, atol=1e-10 * np.abs(expected).max())
    assert np.abs(got[design.n_functions :]).max() == 0.0  # no reference-energy columns in the anchor
    # Equations of other shards than anchor_equations_data say, or of another basis, are refused by name.
    with pytest.raises(InvalidInputError, match="anchor_equations_data"):
        saved_anchor(trainer_pb2.DeltaFitSpec(**{**_fields(spec), "anchor_equations_data": shards[:1]}), artifact_store)
    wider = linear_ace.AceDesign(pyace.ACEBBasisSet(basis_config(ELEMENTS, 5.0, 8)), reference_elements=ELEMENTS)
    with pytest.raises(InvalidInputError, match="another basis"):
        anchor_normal_equations(wider, anchor, False, saved, _no_progress)


def _fields(spec: trainer_pb2.DeltaFitSpec) -> dict:
    return {field.name: value for field, value in spec.ListFields()}
