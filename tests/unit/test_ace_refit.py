"""Refits that add data to a linear fit: on the fit's basis, from the normal equations it kept
(`pyacemaker.services.trainer.ace_fit.EquationsReuse`), against the same refit computed from every frame's rows."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from ase import Atoms
from pyace import ACEBBasisSet, PyACECalculator

from pyacemaker.rpc import InvalidInputError
from pyacemaker.services.trainer import linear_ace, pacemaker_export
from pyacemaker.services.trainer.ace_fit import (
    NORMAL_EQUATIONS_KIND,
    EquationsReuse,
    basis_config,
    fit_linear_ace,
    linear_targets,
    run_ace_fit,
    validate_ace_fit,
)
from pyacemaker.services.trainer.progress import ProgressWriter
from pyacemaker.structures import write_extxyz
from pyacemaker.v1 import trainer_pb2
from tests.sn2_training_data import xtb_e0s, xtb_frames

FIRST, ADDED = 40, 24


def grouped_frames() -> list[Atoms]:
    """xtb frames in groups of four (cross-validation groups, as MD trajectories would be)."""
    frames = xtb_frames()[: FIRST + ADDED]
    for index, atoms in enumerate(frames):
        atoms.info["fit_group"] = f"{'first' if index < FIRST else 'added'}:{index // 4}"
    return frames


def test_folds_extended_keep_the_known_groups_and_balance_the_new() -> None:
    groups = [f"g{i // 3}" for i in range(30)]  # ten groups of three
    folds = linear_ace.group_fold_assignment(groups[:15], 3, seed=1)
    known = {g: int(f) for g, f in zip(groups[:15], folds, strict=True)}
    extended = linear_ace.extend_group_folds(known, np.bincount(folds, minlength=3).tolist(), groups, seed=1)
    assert [int(f) for f in extended[:15]] == [int(f) for f in folds]
    for group in set(groups):  # whole groups per fold
        assert len({int(f) for f, g in zip(extended, groups, strict=True) if g == group}) == 1
    loads = np.bincount(extended, minlength=3)
    assert loads.max() - loads.min() <= 3  # balanced as groups of three allow


def test_a_refit_from_kept_equations_equals_the_refit_from_every_frame(tmp_path: Path) -> None:
    frames = grouped_frames()
    e0s = xtb_e0s()
    kept = tmp_path / "equations.npz"
    base = fit_linear_ace(
        frames[:FIRST], tmp_path / "base", e0s=e0s, cutoff=4.5, seed=2, reuse=EquationsReuse(keep=kept)
    )
    section = pacemaker_export.section_of(base.yaml_path)
    assert section is not None
    # The basis rebuilt from the .yaml's section is the one the kept equations were made for.
    metadata = linear_ace.equations_metadata(kept)
    assert metadata["structures"] == FIRST and metadata["basis"] == linear_ace.basis_identity(
        linear_ace.load_basis(base.yaml_path)
    )

    refit = fit_linear_ace(
        frames,
        tmp_path / "refit",
        e0s=e0s,
        seed=2,
        reuse=EquationsReuse(section=section, start_from=kept, covered=FIRST, keep=tmp_path / "refit.npz"),
    )
    assert refit.metrics["reused_equations_structures_count"] == FIRST
    assert refit.metrics["structures_count"] == FIRST + ADDED
    # Independently: every frame's rows on the same basis, in the refit's folds.
    design = linear_ace.AceDesign(linear_ace.load_basis(base.yaml_path))
    groups = linear_ace.structure_groups(frames)
    fold_of = linear_ace.equations_metadata(tmp_path / "refit.npz")["group_folds"]
    folds = np.array([fold_of[g] for g in groups])
    assert [int(f) for f in folds[:FIRST]] == [metadata["group_folds"][g] for g in groups[:FIRST]]
    full = linear_ace.accumulate(design, frames, linear_targets(frames, e0s, design), folds, int(folds.max()) + 1)
    reused = linear_ace.load_equations(tmp_path / "refit.npz")
    for name in ("gram_energy", "gram_forces", "rhs_energy", "rhs_forces", "norm_energy", "rows_forces"):
        np.testing.assert_allclose(getattr(reused, name), getattr(full, name), rtol=1e-10, atol=1e-12, err_msg=name)
    fit = linear_ace.fit_ridge_cv(full, one_standard_error=True)
    assert refit.metrics["ridge_lambda_relative"] == fit.lam
    # The refit's potential predicts as the coefficients solved from every frame's equations do.
    probe = frames[FIRST + 1].copy()
    energy_row, _ = design.rows(probe)
    fixed, _ = design.fixed_part(probe)
    expected = (energy_row @ fit.coeffs + fixed) * len(probe) + sum(e0s[int(z)] for z in probe.numbers)
    probe.calc = PyACECalculator(str(refit.yace_path))
    assert probe.get_potential_energy() == pytest.approx(expected, abs=1e-7)


def test_kept_equations_that_do_not_fit_the_refit_are_refused_by_name(tmp_path: Path) -> None:
    frames = grouped_frames()
    kept = tmp_path / "equations.npz"
    base = fit_linear_ace(frames[:FIRST], tmp_path / "base", e0s=xtb_e0s(), cutoff=4.5, reuse=EquationsReuse(keep=kept))
    section = pacemaker_export.section_of(base.yaml_path)
    assert section is not None
    other_e0s = {z: e + 0.1 for z, e in xtb_e0s().items()}
    with pytest.raises(InvalidInputError, match=r"other reference energies \(ace_fit.e0s\)"):
        fit_linear_ace(frames, tmp_path / "a", e0s=other_e0s, reuse=EquationsReuse(section, kept, FIRST))
    with pytest.raises(InvalidInputError, match="for 40 structures, but their shards hold 39"):
        fit_linear_ace(frames[1:], tmp_path / "b", e0s=xtb_e0s(), reuse=EquationsReuse(section, kept, FIRST - 1))
    wider = {**section, "bonds": {**section["bonds"], "ALL": {**section["bonds"]["ALL"], "rcut": 5.0}}}
    with pytest.raises(InvalidInputError, match=r"made for another basis than ace_fit\.basis"):
        fit_linear_ace(frames, tmp_path / "c", e0s=xtb_e0s(), reuse=EquationsReuse(wider, kept, FIRST))


def test_the_refit_job_takes_the_basis_and_the_kept_equations_from_the_store(artifact_store, tmp_path: Path) -> None:
    frames = grouped_frames()
    shards = []
    for name, part in (("first", frames[:FIRST]), ("added", frames[FIRST:])):
        write_extxyz(tmp_path / f"{name}.extxyz", part)
        shards.append(artifact_store.put_file(tmp_path / f"{name}.extxyz", "structures"))
    e0s = [trainer_pb2.AtomicEnergy(atomic_number=z, energy=e) for z, e in xtb_e0s().items()]
    base_spec = trainer_pb2.AceFitSpec(train_data=shards[:1], cutoff=4.5, e0s=e0s, keep_normal_equations=True)
    validate_ace_fit(base_spec, artifact_store)
    base = run_ace_fit(base_spec, artifact_store, tmp_path / "base", ProgressWriter(tmp_path / "p1.jsonl"))
    (equations,) = [ref for ref in base.outputs if ref.kind == NORMAL_EQUATIONS_KIND]
    (yaml,) = [ref for ref in base.outputs if ref.uri.endswith(".yaml") and ref.kind == "potential"]
    refit_spec = trainer_pb2.AceFitSpec(train_data=shards, e0s=e0s, basis=yaml, normal_equations=equations)
    validate_ace_fit(refit_spec, artifact_store)
    refit = run_ace_fit(refit_spec, artifact_store, tmp_path / "refit", ProgressWriter(tmp_path / "p2.jsonl"))
    assert refit.metrics["reused_equations_structures_count"] == FIRST
    assert not [ref for ref in refit.outputs if ref.kind == NORMAL_EQUATIONS_KIND]  # not asked to keep them
    # The refinement's refits keep the base's ridge strength: cross-validated at it, not chosen again.
    base_lambda = base.metrics["ridge_lambda_relative"]
    kept_lambda = trainer_pb2.AceFitSpec(
        train_data=shards, e0s=e0s, basis=yaml, normal_equations=equations, ridge_lambda=base_lambda
    )
    validate_ace_fit(kept_lambda, artifact_store)
    same = run_ace_fit(kept_lambda, artifact_store, tmp_path / "same", ProgressWriter(tmp_path / "p4.jsonl"))
    assert same.metrics["ridge_lambda_relative"] == base_lambda
    assert [ref for ref in same.outputs if ref.uri.endswith(".asi")]
    # A refit whose active set nothing reads skips it.
    kept_lambda.no_active_set = True
    bare = run_ace_fit(kept_lambda, artifact_store, tmp_path / "bare", ProgressWriter(tmp_path / "p5.jsonl"))
    assert not [ref for ref in bare.outputs if ref.uri.endswith(".asi")]
    assert [ref for ref in bare.outputs if ref.uri.endswith(".yace")]
    assert 0 < same.metrics["cv_forces_rmse_ev_per_a"] < 10 * refit.metrics["cv_forces_rmse_ev_per_a"]
    for bad in (0.0, -1e-5, float("nan")):
        with pytest.raises(InvalidInputError, match=r"ace_fit\.ridge_lambda must be a positive number"):
            validate_ace_fit(trainer_pb2.AceFitSpec(train_data=shards, e0s=e0s, ridge_lambda=bad), artifact_store)
    # Shards in another order: the equations do not hold the first shard any more.
    swapped = trainer_pb2.AceFitSpec(train_data=shards[::-1], e0s=e0s, basis=yaml, normal_equations=equations)
    with pytest.raises(InvalidInputError, match=r"not the first ones of ace_fit\.train_data"):
        run_ace_fit(swapped, artifact_store, tmp_path / "swapped", ProgressWriter(tmp_path / "p3.jsonl"))
    without_basis = trainer_pb2.AceFitSpec(train_data=shards, e0s=e0s, normal_equations=equations)
    with pytest.raises(InvalidInputError, match=r"ace_fit\.normal_equations need ace_fit\.basis"):
        validate_ace_fit(without_basis, artifact_store)


def test_chunks_bound_the_atoms_whose_rows_are_held_and_the_equations_do_not_depend_on_them(monkeypatch) -> None:
    """A chunk of large cells is cut by atoms (its force rows are 3 · atoms × functions), one of molecules by
    count; the normal equations are the same sums however the structures are chunked."""
    assert [len(r) for r in linear_ace.chunks([6] * 130)] == [64, 64, 2]
    assert [len(r) for r in linear_ace.chunks([216] * 40)] == [18, 18, 4]
    frames = grouped_frames()[:FIRST]
    design = linear_ace.AceDesign(ACEBBasisSet(basis_config(["H", "C", "Cl"], 4.5, 20)))
    targets = linear_targets(frames, xtb_e0s(), design)
    folds = np.arange(len(frames)) % 2
    whole = linear_ace.accumulate(design, frames, targets, folds, 2)
    monkeypatch.setattr(linear_ace, "CHUNK_ATOMS", 20)  # three 6-atom frames per chunk
    assert len(list(linear_ace.chunks([6] * len(frames)))) == 14
    small = linear_ace.accumulate(design, frames, targets, folds, 2)
    for name in ("gram_energy", "gram_forces", "rhs_energy", "rhs_forces", "rows_forces"):
        np.testing.assert_allclose(getattr(small, name), getattr(whole, name), rtol=1e-12, atol=1e-12, err_msg=name)


def test_saved_equations_hold_upper_triangles_and_load_back_whole_or_summed(tmp_path: Path) -> None:
    rng = np.random.default_rng(5)
    equations = linear_ace.FoldedNormalEquations(7, 3, with_stress=True)
    for name in ("gram_energy", "gram_forces", "gram_stress"):
        rows = rng.normal(size=(3, 11, 7))
        setattr(equations, name, np.einsum("kri,krj->kij", rows, rows))
    equations.rhs_forces = rng.normal(size=(3, 7))
    equations.rows_forces = np.array([4, 5, 6])
    path = tmp_path / "equations.npz"
    linear_ace.save_equations(equations, path, {"shards": ["a"]})
    with np.load(path) as data:
        assert data["gram_forces"].shape == (3, 7 * 8 // 2)  # the upper triangles only
    loaded = linear_ace.load_equations(path)
    for name in ("gram_energy", "gram_forces", "gram_stress", "rhs_forces", "rows_forces"):
        np.testing.assert_array_equal(getattr(loaded, name), getattr(equations, name))
    summed = linear_ace.load_equations(path, summed=True)
    assert summed.n_folds == 1
    np.testing.assert_allclose(summed.gram_stress[0], equations.gram_stress.sum(axis=0), rtol=1e-14)
    assert int(summed.rows_forces[0]) == 15
    # A file of an earlier version (whole matrices, no flag) still loads.
    with path.open("wb") as handle:
        arrays = {name: getattr(equations, name) for name in linear_ace.EQUATION_ARRAYS}
        header = {"n_functions": 7, "n_folds": 3, "with_stress": True}
        np.savez(handle, metadata=np.array(json.dumps(header)), **arrays)
    np.testing.assert_array_equal(linear_ace.load_equations(path).gram_energy, equations.gram_energy)
