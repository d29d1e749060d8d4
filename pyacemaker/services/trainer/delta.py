"""Step 7: delta learning, the base ACE corrected with the few DFT labels, written as ONE potential.

Linear (base is a linear ACE): find coefficients c = c_base + δ that minimise

    DFT error(c)  +  ω · surrogate error(c; targets = the base's own predictions)  +  λ Σ_j s_j² δ_j²

- the DFT rows pull the potential to the new level of theory;
- the surrogate rows, whose targets are what the base predicts, anchor the correction in function space:
  wherever the surrogate set has data and the DFT set has none, the potential stays the base (a plain ridge
  on δ alone is badly scaled across basis functions and barely helps, measured on SN2);
- the ridge term (on scaled coefficients, see `linear_ace`) keeps δ small where neither set says anything.
Each error term is a mean over its rows (energies per atom and force components weighted as in the base fit),
so ω (DeltaFitSpec.surrogate_weight) is the weight of the whole surrogate block relative to the whole DFT
block, whatever the sizes of the two sets. λ (and ω, unless given) come from cross-validation over the DFT
structures, each by the one-standard-error rule (the largest λ, then the largest ω, whose CV loss the DFT set
cannot tell from the best: `smallest_correction`); the training lines of a delta job report one
cross-validation table per ω tried (`member` = the index of ω). A constant offset between the two levels
(different isolated-atom references) goes into the per-element E0s first, by least squares over the
composition, since a short-ranged basis cannot make a constant.

DFT structures far outside the surrogate data (extrapolation grade γ of the base's basis against the active set
of the anchor frames above MAX_DFT_GAMMA) take no part in the correction; the metrics count them
(`dft_structures_beyond_surrogate_count`). A correction fitted there reaches into the surrogate region through
the shared basis functions and distorts it. Measured on the quick SN2 run (7 of 22 and 7 of 26 structures left
out, mostly fragment rotations and harsh rattles; with ω ≥ 1, see SURROGATE_WEIGHTS), the final ACE against
the base on the validation's independent hold-out part: forces 33.0 vs 49.7 and 50.8 vs 54.3 meV/Å; on 36
frames of GFN1-xTB MD at 300-600 K: 54.0 vs 75.5 and 59.3 vs 77.4 meV/Å (before: 54.4 and 517.5). The base
itself has seen those structures (step 6 fits the committee's labels of them), so the final stays bounded there.

Stress: periodic DFT frames with a stress label add stress rows (targets: the label minus the base's stress)
and periodic anchor frames add stress rows with zero targets, both weighted by `stress_weight` within their
block (DeltaFitSpec.stress_weight, as in the base fit; `pyacemaker.services.trainer.ace_fit`).

The result is one self-contained final.yaml / final.yace / final.asi: no second potential summed at run time.

Nonlinear (the base is a nonlinear pacemaker potential): pacemaker fine-tunes from the base (`-p`), DFT rows
weighted high; TensorFlow extra, see `pyacemaker.services.trainer.pacemaker_nonlinear`.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from ase import Atoms
from ase.calculators.singlepoint import SinglePointCalculator
from ase.data import atomic_numbers

from pyacemaker.ace_reference_energies import potential_e0s
from pyacemaker.artifacts import PACEMAKER_DATASET_KIND, PACEMAKER_INPUT_KIND, ArtifactStore
from pyacemaker.rpc import InvalidInputError
from pyacemaker.services.trainer import linear_ace, pacemaker_export, row_processes
from pyacemaker.services.trainer.ace_fit import (
    AceFitResult,
    report_cross_validation,
    store_fit_outputs,
    stress_weight_of,
)
from pyacemaker.services.trainer.datasets import (
    artifact_paths,
    check_finite,
    elements_of,
    energy_of,
    forces_of,
    has_stress_cell,
    load_labelled,
    reference_energy,
    shard_paths,
)
from pyacemaker.services.trainer.progress import ProgressWriter
from pyacemaker.services.trainer.results import JobResult
from pyacemaker.structures import labelled_copies, read_structures
from pyacemaker.v1 import common_pb2, trainer_pb2

log = logging.getLogger(__name__)

# Total weight of the surrogate block relative to the DFT block's, tried by cross-validation when not given.
# Never below 1: the cross-validation scores DFT structures only, so it favours a weak anchor, which fits the
# DFT set best and holds the rest least. Measured on the quick SN2 run (DFT structures beyond the surrogate data
# left out): with the grid from 0.01 the choice was 0.1-0.3 and the final ACE lost 2 of 6 MD runs in
# iteration 2 and had a frame above 1 eV/Å on independent 1000 K MD frames; with ω = 1 it kept 6/6, no such
# frame, and still beat the base on every hold-out (forces 46 → 35 meV/Å on the run's own frames, 57.5 → 50.8 on
# independent ones, 77 → 59 on GFN1-xTB MD at 300-600 K).
SURROGATE_WEIGHTS = (1.0, 3.0, 10.0)
MAX_FOLDS = 5
# DFT structures whose γ against the anchor frames' active set exceeds this are left out of the correction.
MAX_DFT_GAMMA = 5.0
# ... but at least this many of them (the lowest γ) always take part.
MIN_DFT_STRUCTURES = 2
# Surrogate frames used as anchor at most (evenly spaced through the set); they cost rows, not unknowns.
MAX_SURROGATE_FRAMES = 2000


def _spread(frames: Sequence[Atoms], limit: int) -> list[Atoms]:
    if len(frames) <= limit:
        return list(frames)
    picks = np.linspace(0, len(frames) - 1, limit).round().astype(int)
    return [frames[i] for i in picks]


@dataclass
class AnchorEquations:
    """The anchor's Gram matrices from normal equations a fit on the base's basis kept (`path`), instead of
    from the rows of every anchor frame: the equations hold the rows of their own training frames; the rows of
    `removed` (frames they hold that are no anchor frames: the committee-labelled DFT structures of step 6) are
    taken out and those of `added` (anchor frames they lack: the refinement's student frames) put in. The
    result equals the Gram matrices of the anchor frames' rows to the round-off of the sums. Measured on the SN2
    flagship (2000 anchor frames, 3000 functions, 2 threads): the anchor rows were 26 of the delta's 68 s."""

    path: Path
    removed: list[Atoms] = field(default_factory=list)
    added: list[Atoms] = field(default_factory=list)


def _zero_targets(frames: Sequence[Atoms], with_stress: bool) -> linear_ace.Targets:
    """Targets of anchor rows: zero energies and forces, and zero stresses of periodic cells `with_stress`."""
    return linear_ace.Targets(
        np.zeros(len(frames)),
        [np.zeros((len(a), 3)) for a in frames],
        [np.zeros(6) if with_stress and has_stress_cell(a) else None for a in frames],
    )


def anchor_normal_equations(
    design: linear_ace.AceDesign,
    anchor: Sequence[Atoms],
    with_stress: bool,
    saved: AnchorEquations | None,
    report: linear_ace.ProgressCallback,
) -> linear_ace.FoldedNormalEquations:
    """The anchor rows' normal equations in one fold, without the reference-energy columns (the anchor holds the
    basis part of the correction at zero and leaves the reference shifts free): from `saved` where given (see
    `AnchorEquations`), else from the rows of every anchor frame."""

    def rows_of(
        frames: Sequence[Atoms], stage: str, into: linear_ace.FoldedNormalEquations | None = None
    ) -> linear_ace.FoldedNormalEquations:
        folds = np.zeros(len(frames), dtype=np.int64)
        targets = _zero_targets(frames, with_stress)
        return row_processes.accumulate_in_processes(design, frames, targets, folds, 1, report, stage, False, into)

    if saved is None:
        return rows_of(anchor, "surrogate rows")
    report(0, 0, "anchor rows from the base fit's normal equations")
    try:
        metadata = linear_ace.equations_metadata(saved.path)
    except linear_ace.LinearAceError as exc:
        raise InvalidInputError(f"delta_fit.anchor_equations: {exc}") from None
    if metadata.get("basis") != linear_ace.basis_identity(design.basis):
        raise InvalidInputError("delta_fit.anchor_equations were made for another basis than the base potential's")
    if bool(metadata.get("with_stress")) != with_stress:
        made = "with" if metadata.get("with_stress") else "without"
        raise InvalidInputError(
            f"delta_fit.anchor_equations were made {made} stress rows, the anchor frames here need them "
            f"{'' if with_stress else 'not '}(another ace.stress_weight?)"
        )
    kept = linear_ace.load_equations(saved.path, summed=True)
    n = design.n_functions
    equations = linear_ace.FoldedNormalEquations(design.n_columns, 1, with_stress=with_stress)
    # The saved equations' columns past the basis functions (fitted reference energies, if any) are no anchor's,
    # nor are their right-hand sides (the anchor's targets are zero).
    equations.gram_energy[0, :n, :n] = kept.gram_energy[0, :n, :n]
    equations.gram_forces[0, :n, :n] = kept.gram_forces[0, :n, :n]
    if with_stress:
        equations.gram_stress[0, :n, :n] = kept.gram_stress[0, :n, :n]
    equations.rows_energy[:] = kept.rows_energy
    equations.rows_forces[:] = kept.rows_forces
    equations.rows_stress[:] = kept.rows_stress
    del kept
    if saved.removed:
        equations.add_equations(rows_of(saved.removed, "anchor rows taken out"), sign=-1)
    if saved.added:
        rows_of(saved.added, "anchor rows put in", into=equations)
    return equations


def base_residuals(
    design: linear_ace.AceDesign,
    base_coeffs: np.ndarray,
    base_e0s: dict[int, float],
    frames: Sequence[Atoms],
    with_stress: bool = False,
) -> linear_ace.Targets:
    """DFT labels minus the base's predictions (its fixed part, the core repulsion, included): energy per atom,
    forces and, with `with_stress`, the stresses of periodic frames as V·σ/N (`linear_ace.virial_per_atom`)."""
    energy, forces, stresses = [], [], []
    n = design.n_functions
    for atoms in frames:
        virial = linear_ace.virial_per_atom(atoms) if with_stress else None
        if virial is not None:
            virial = virial - design.stress_rows(atoms)[:, :n] @ base_coeffs - design.fixed_stress(atoms)
        stresses.append(virial)
        energy_row, force_rows = design.rows(atoms)
        fixed_energy, fixed_forces = design.fixed_part(atoms)
        predicted = energy_row[:n] @ base_coeffs + reference_energy(atoms, base_e0s) / len(atoms) + fixed_energy
        energy.append(energy_of(atoms) / len(atoms) - predicted)
        predicted_forces = (force_rows[:, :n] @ base_coeffs).reshape(len(atoms), 3) + fixed_forces
        forces.append(forces_of(atoms) - predicted_forces)
    return linear_ace.Targets(np.array(energy), forces, stresses)


def within_surrogate_span(
    base_yaml: Path,
    design: linear_ace.AceDesign,
    dft_frames: Sequence[Atoms],
    anchor: Sequence[Atoms],
    work_dir: Path,
    max_gamma: float,
) -> tuple[list[Atoms], np.ndarray, linear_ace.ActiveSet | None]:
    """The DFT frames inside the anchor frames' span (γ of the base's basis against their active set at most
    `max_gamma`; at least MIN_DFT_STRUCTURES, the lowest γ first), every frame's γ and the anchor frames' active
    set. All frames (γ reading 0) and no active set when `max_gamma` is 0 or the anchor frames are too few for an
    active set of their own."""
    from pyacemaker.services.trainer.evaluation import extrapolation_grades

    try:
        if max_gamma <= 0 or not anchor:
            raise linear_ace.LinearAceError("no limit")
        linear_ace.check_active_set_data(design, anchor)
    except linear_ace.LinearAceError:
        return list(dft_frames), np.zeros(len(dft_frames)), None
    work_dir.mkdir(parents=True, exist_ok=True)
    asi = work_dir / "surrogate_span.asi"
    span = linear_ace.active_set(design.basis, anchor)
    linear_ace.save_active_set(span, design.basis, asi)
    grades = np.asarray(extrapolation_grades(base_yaml, asi, dft_frames), dtype=np.float64)
    asi.unlink()
    keep = set(np.flatnonzero(grades <= max_gamma).tolist())
    keep |= set(np.argsort(grades, kind="stable")[:MIN_DFT_STRUCTURES].tolist())
    return [atoms for i, atoms in enumerate(dft_frames) if i in keep], grades, span


def smallest_correction(fits: Sequence[tuple[float, linear_ace.RidgeFit]]) -> tuple[float, linear_ace.RidgeFit]:
    """Of the fits per anchor weight ω (each already at its one-standard-error λ), the one with the largest ω
    whose best CV loss is within one standard error of the best over all ω: the correction that moves the base
    least among those the DFT set cannot tell apart. The CV scores DFT structures only and so always favours a
    weak anchor; measured on the B3LYP SN2 flagship's data, the weakest (ω = 1, CV loss 6.4e-4 against 6.9e-4
    at ω = 3) with its λ kept 7 of 9 MD runs of the final ACE, C–Cl broken in the two at 1000 K."""
    best = min(fits, key=lambda item: item[1].best_cv_loss)[1]
    bound = best.best_cv_loss + best.best_cv_loss_standard_error
    return max((item for item in fits if item[1].best_cv_loss <= bound), key=lambda item: item[0])


def fit_linear_delta(
    base_yaml: Path,
    dft_frames: Sequence[Atoms],
    surrogate_frames: Sequence[Atoms],
    out_dir: Path,
    surrogate_weight: float = 0.0,
    seed: int = 0,
    stem: str = "final",
    progress: ProgressWriter | None = None,
    max_dft_gamma: float = MAX_DFT_GAMMA,
    stress_weight: float = linear_ace.DEFAULT_STRESS_WEIGHT,
    anchor_equations: AnchorEquations | None = None,
) -> AceFitResult:
    """Correct a linear base ACE with DFT frames; writes <stem>.yaml, .yace, .asi into out_dir. DFT frames
    beyond the surrogate data (γ above `max_dft_gamma`, 0: no limit) are left out (module docstring). Stress
    rows of periodic frames are weighted by `stress_weight` (0: none). With `anchor_equations` every surrogate
    frame is an anchor frame (their rows cost nothing); without, MAX_SURROGATE_FRAMES of them at most."""
    started = time.perf_counter()
    basis = linear_ace.load_basis(base_yaml)
    if not linear_ace.is_linear_basis(basis.to_BBasisConfiguration()):
        raise InvalidInputError(f"{base_yaml.name}: not a linear ACE; a nonlinear base is corrected by pacemaker")
    if len(dft_frames) < 2:
        raise InvalidInputError(f"delta learning needs at least 2 labelled DFT structures, got {len(dft_frames)}")
    unknown = sorted(set(elements_of([*dft_frames, *surrogate_frames])) - set(basis.elements_name))
    if unknown:
        raise InvalidInputError(f"elements {', '.join(unknown)} are not in the base potential")

    def report(done: int, total: int, message: str) -> None:
        if progress is not None:
            progress.stage("delta_fit", done, total, message)

    base_e0s = potential_e0s(base_yaml) or {atomic_numbers[s]: 0.0 for s in basis.elements_name}
    base_coeffs = np.array(basis.basis_coeffs, dtype=np.float64)
    # Shifts of the per-element reference energies are fitted with the correction, unpenalised: a constant
    # offset between the two levels (other isolated-atom energies) cannot come from a short-ranged basis.
    design = linear_ace.AceDesign(basis, reference_elements=elements_of(dft_frames))
    anchor = list(surrogate_frames) if anchor_equations else _spread(surrogate_frames, MAX_SURROGATE_FRAMES)
    try:
        linear_ace.check_active_set_data(design, [*dft_frames, *anchor])
    except linear_ace.LinearAceError as exc:
        raise InvalidInputError(f"{exc}: give the base's training frames as delta_fit.surrogate_data") from None
    all_dft = list(dft_frames)
    report(0, 0, "extrapolation grades of the DFT structures")
    dft_frames, dft_gammas, span = within_surrogate_span(base_yaml, design, all_dft, anchor, out_dir, max_dft_gamma)
    with_stress = stress_weight > 0
    residuals = base_residuals(design, base_coeffs, base_e0s, dft_frames, with_stress)
    base_energy_rmse = float(np.sqrt(np.mean(residuals.energy_per_atom**2)))
    base_forces_rmse = float(np.sqrt(np.mean(np.concatenate([f.ravel() for f in residuals.forces]) ** 2)))
    base_virials = [v for v in residuals.stress if v is not None]
    # The anchor's Gram matrices (2, or 3 with stress rows) and the working copy of the sum (1) come on top of
    # the folds'.
    anchor_stress = with_stress and any(has_stress_cell(a) for a in anchor)
    try:
        n_folds = linear_ace.folds_within_memory(
            design.n_columns,
            len(dft_frames),
            MAX_FOLDS,
            extra_matrices=4 if anchor_stress else 3,
            matrices_per_fold=3 if residuals.has_stress else 2,
        )
    except linear_ace.LinearAceError as exc:
        raise InvalidInputError(str(exc)) from None
    folds = linear_ace.fold_assignment(len(dft_frames), n_folds, seed)
    # A few DFT rows (the usual case) are kept: the cross-validation over ω and λ then needs one decomposition
    # per ω instead of one per fold and ω (`linear_ace.fit_ridge_cv`).
    few_rows = linear_ace.uses_few_rows(linear_ace.row_count(dft_frames, residuals), design.n_columns)
    dft_rows = linear_ace.FoldRows() if few_rows else None
    dft_equations = linear_ace.accumulate(
        design, dft_frames, residuals, folds, n_folds, report, "DFT rows", keep_rows=dft_rows
    )
    anchor_gram = None
    if anchor:
        anchor_rows = anchor_normal_equations(design, anchor, anchor_stress, anchor_equations, report)
        anchor_gram, _ = anchor_rows.total(linear_ace.DEFAULT_FORCES_SHARE, stress_weight=stress_weight)
        del anchor_rows
    n_free = design.n_columns - design.n_functions
    weights = [surrogate_weight] if surrogate_weight > 0 or anchor_gram is None else list(SURROGATE_WEIGHTS)
    fits: list[tuple[float, linear_ace.RidgeFit]] = []
    for index, weight in enumerate(weights):
        fit = linear_ace.fit_ridge_cv(
            dft_equations,
            anchor_gram=None if anchor_gram is None else weight * anchor_gram,
            n_unpenalised=n_free,
            stress_weight=stress_weight,
            one_standard_error=True,
            rows=dft_rows,
        )
        report_cross_validation(fit, progress, member=index)
        log.info("delta: surrogate weight %.3g → λ %.1e, CV loss %.4g", weight, fit.lam, fit.best_cv_loss)
        fits.append((weight, fit))
    chosen_weight, fit = smallest_correction(fits)
    delta, e0_shift = design.split(fit.coeffs)
    final_e0s = {z: base_e0s.get(z, 0.0) + e0_shift.get(z, 0.0) for z in {*base_e0s, *e0_shift}}
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = (out_dir / f"{stem}.yaml", out_dir / f"{stem}.yace", out_dir / f"{stem}.asi")
    section = pacemaker_export.section_of(base_yaml)
    extra: list[tuple[Path, str]] = []
    if section is not None:
        weight = chosen_weight if anchor_gram is not None else 0.0
        extra = export_delta_fit(
            base_yaml, section, dft_frames, anchor, weight, base_e0s, final_e0s, fit, seed, out_dir
        )
    metadata = {pacemaker_export.SECTION_METADATA_KEY: json.dumps(section)} if section is not None else None
    linear_ace.write_potential(basis, base_coeffs + delta, final_e0s, paths[0], paths[1], metadata)
    fit_seconds = time.perf_counter() - started
    report(0, 0, "active set")
    if span is None:
        linear_ace.write_active_set(paths[0], [*all_dft, *anchor], paths[2])
    else:  # the anchor's, grown by the DFT frames (the projections do not depend on the coefficients)
        final_set = linear_ace.extended_active_set(span, linear_ace.projections_of(basis, all_dft))
        linear_ace.save_active_set(final_set, basis, paths[2])
    final_energy_rmse, final_forces_rmse, final_virial_rmse = linear_ace.fit_errors(dft_equations, fit.coeffs)
    metrics = {
        "dft_structures_count": float(len(dft_frames)),
        "dft_structures_beyond_surrogate_count": float(len(all_dft) - len(dft_frames)),
        "dft_max_gamma_vs_surrogate": float(dft_gammas.max(initial=0.0)),
        "surrogate_structures_count": float(len(anchor)),
        "basis_functions_count": float(design.n_functions),
        "surrogate_weight_relative": chosen_weight if anchor_gram is not None else 0.0,
        "ridge_lambda_relative": fit.lam,
        "base_dft_energy_rmse_ev_per_atom": base_energy_rmse,
        "base_dft_forces_rmse_ev_per_a": base_forces_rmse,
        "final_dft_energy_rmse_ev_per_atom": final_energy_rmse,
        "final_dft_forces_rmse_ev_per_a": final_forces_rmse,
        "cv_energy_rmse_ev_per_atom": fit.cv_energy_rmse,
        "cv_forces_rmse_ev_per_a": fit.cv_forces_rmse,
        "fit_time_s": fit_seconds,
        "stress_weight": stress_weight,
        "dft_stress_structures_count": float(len(base_virials)),
    }
    if base_virials:
        metrics["base_dft_virial_rmse_ev_per_atom"] = float(np.sqrt(np.mean(np.concatenate(base_virials) ** 2)))
        metrics["final_dft_virial_rmse_ev_per_atom"] = final_virial_rmse
        metrics["cv_virial_rmse_ev_per_atom"] = fit.cv_stress_rmse
    return AceFitResult(*paths, metrics=metrics, cv_table=fit.table, extra_files=extra)


def export_delta_fit(
    base_yaml: Path,
    section: dict[str, Any],
    dft_frames: Sequence[Atoms],
    anchor: Sequence[Atoms],
    anchor_weight: float,
    base_e0s: dict[int, float],
    final_e0s: dict[int, float],
    fit: linear_ace.RidgeFit,
    seed: int,
    out_dir: Path,
) -> list[tuple[Path, str]]:
    """The delta fit as pacemaker data and input: the DFT frames as labelled (block weight 1) and the anchor
    frames labelled as the fit saw them, the base's own predictions on the final reference energies (block
    weight ω); see `pacemaker_export`."""
    from pyacemaker.services.trainer.evaluation import ace_calculator

    anchor_labelled = []
    for atoms in labelled_copies(ace_calculator(base_yaml), anchor):
        shift = reference_energy(atoms, final_e0s) - reference_energy(atoms, base_e0s)
        atoms.calc = SinglePointCalculator(atoms, energy=energy_of(atoms) + shift, forces=forces_of(atoms))
        anchor_labelled.append(atoms)
    blocks = [(list(dft_frames), 1.0)] + ([(anchor_labelled, anchor_weight)] if anchor_labelled else [])
    energy_weights, forces_weights = pacemaker_export.block_weights(blocks)
    share = linear_ace.DEFAULT_FORCES_SHARE
    total_weight = 1.0 + (anchor_weight if anchor_labelled else 0.0)
    l2 = pacemaker_export.equivalent_l2(fit.lam, fit.penalty_scale_sq, share, total_weight)
    config = pacemaker_export.fit_input(section, final_e0s, share, l2, seed)
    frames = [*dft_frames, *anchor_labelled]
    dataset, input_yaml = pacemaker_export.write_export(
        out_dir, frames, final_e0s, config, energy_weights, forces_weights
    )
    return [(dataset, PACEMAKER_DATASET_KIND), (input_yaml, PACEMAKER_INPUT_KIND)]


# ----------------------------------------------------------------------------------------------- the job
def validate_delta_fit(spec: trainer_pb2.DeltaFitSpec, store: ArtifactStore) -> None:
    if not spec.base_potential.uri:
        raise InvalidInputError("delta_fit.base_potential is not set; give the base ACE .yaml")
    if not spec.dft_data:
        raise InvalidInputError("delta_fit.dft_data is empty; give the labelled DFT set")
    check_finite({"delta_fit.surrogate_weight": spec.surrogate_weight, "delta_fit.stress_weight": spec.stress_weight})
    if spec.surrogate_weight < 0:
        raise InvalidInputError("delta_fit.surrogate_weight must not be negative (0 means chosen by cross-validation)")
    if spec.stress_weight < 0:
        raise InvalidInputError(f"delta_fit.stress_weight must not be negative, got {spec.stress_weight:g}")
    if spec.random_seed < 0:
        raise InvalidInputError(f"delta_fit.random_seed must not be negative, got {spec.random_seed}")
    (base,) = artifact_paths(store, [spec.base_potential], "delta_fit.base_potential")
    if base.suffix != ".yaml":
        raise InvalidInputError(f"delta_fit.base_potential must be the B-basis .yaml, got {base.suffix or 'no suffix'}")
    shard_paths(store, spec.dft_data, "delta_fit.dft_data")
    shard_paths(store, spec.surrogate_data, "delta_fit.surrogate_data")
    if spec.anchor_equations_data and not spec.HasField("anchor_equations"):
        raise InvalidInputError("delta_fit.anchor_equations_data are given without delta_fit.anchor_equations")
    if spec.HasField("anchor_equations"):
        artifact_paths(store, [spec.anchor_equations], "delta_fit.anchor_equations")
        shard_paths(store, spec.anchor_equations_data, "delta_fit.anchor_equations_data")
    try:
        linear = _is_linear(base)
    except Exception as exc:  # pyace raises assorted errors for a file that is not a B-basis
        raise InvalidInputError(
            f"delta_fit.base_potential: not a readable ACE B-basis .yaml ({type(exc).__name__}: {str(exc)[:200]})"
        ) from None
    if not linear:
        if spec.HasField("anchor_equations"):
            raise InvalidInputError("delta_fit.anchor_equations are for a linear base, this base is nonlinear")
        from pyacemaker.services.trainer.pacemaker_nonlinear import require_tensorflow

        require_tensorflow()


def _is_linear(base_yaml: Path) -> bool:
    from pyace import BBasisConfiguration

    return linear_ace.is_linear_basis(BBasisConfiguration(str(base_yaml)))


def run_delta_fit(
    spec: trainer_pb2.DeltaFitSpec, store: ArtifactStore, work_dir: Path, progress: ProgressWriter
) -> JobResult:
    progress.stage("load_data", message="reading and verifying the base potential and the data")
    (base,) = artifact_paths(store, [spec.base_potential], "delta_fit.base_potential")
    dft = load_labelled(store, spec.dft_data, "delta_fit.dft_data")
    # Surrogate frames serve as geometry only (their targets are the base's predictions): labels optional.
    surrogate = [
        atoms
        for path in artifact_paths(store, spec.surrogate_data, "delta_fit.surrogate_data")
        for atoms in read_structures(path)
    ]
    out_dir = work_dir / "output"
    if _is_linear(base):
        result = fit_linear_delta(
            base,
            dft,
            surrogate,
            out_dir,
            spec.surrogate_weight,
            spec.random_seed,
            "final",
            progress,
            stress_weight=stress_weight_of(spec),
            anchor_equations=saved_anchor(spec, store),
        )
    else:
        from pyacemaker.services.trainer.pacemaker_nonlinear import finetune_nonlinear_ace

        result = finetune_nonlinear_ace(
            base, dft, surrogate, out_dir, spec.surrogate_weight, spec.random_seed, progress
        )
    return store_fit_outputs(store, result, progress)


def saved_anchor(spec: trainer_pb2.DeltaFitSpec, store: ArtifactStore) -> AnchorEquations | None:
    """The spec's anchor_equations with the frames whose rows differ from the anchor's (`AnchorEquations`);
    None without them. InvalidInputError when anchor_equations_data are not the shards the equations record."""
    if not spec.HasField("anchor_equations"):
        return None
    (path,) = artifact_paths(store, [spec.anchor_equations], "delta_fit.anchor_equations")
    try:
        recorded = list(linear_ace.equations_metadata(path).get("shards", []))
    except linear_ace.LinearAceError as exc:
        raise InvalidInputError(f"delta_fit.anchor_equations: {exc}") from None
    if recorded != [ref.sha256 for ref in spec.anchor_equations_data]:
        raise InvalidInputError(
            "delta_fit.anchor_equations_data are not the shards delta_fit.anchor_equations were made from"
        )
    anchor_digests = {ref.sha256 for ref in spec.surrogate_data}
    held_digests = set(recorded)

    def frames(refs: Sequence[common_pb2.ArtifactRef], what: str) -> list[Atoms]:
        return [atoms for path in artifact_paths(store, refs, what) for atoms in read_structures(path)]

    removed = [ref for ref in spec.anchor_equations_data if ref.sha256 not in anchor_digests]
    added = [ref for ref in spec.surrogate_data if ref.sha256 not in held_digests]
    return AnchorEquations(
        path,
        removed=frames(removed, "delta_fit.anchor_equations_data"),
        added=frames(added, "delta_fit.surrogate_data"),
    )
