"""Step 6: the base ACE fitted on the surrogate set.

Default: a linear ACE through pyace (no TensorFlow). The cutoff comes from the covalent radii of the
elements, the basis size from the amount of data (and never more functions per element than there are
environments of that element, or the active set would be under-determined), the ridge strength from
cross-validation over whole trajectories by the one-standard-error rule (`linear_ace.fit_ridge_cv`).
Outputs: base.yaml (B-basis, what γ needs), base.yace (C-tilde, what production uses), base.asi (active set)
and metrics.json. Option: a nonlinear pacemaker fit (TensorFlow extra), see
`pyacemaker.services.trainer.pacemaker_nonlinear`.

Bounded extrapolation (on by default): below the shortest distance at which the training data hold a pair
of elements (at most the pair's covalent bond length s), ACE's own inner cutoff switches that pair's radial
functions off and a core repulsion φ(r) = A exp(−λ r²)/r on (`add_core_repulsion`). Both are part of the
basis, so the .yaml and the .yace carry them and pyace and LAMMPS (pair_style pace) evaluate them alike.
A and λ come from s: the pair energy is CORE_ENERGY_AT_BOND_EV at r = s and CORE_ENERGY_AT_HALF_BOND_EV at
s/2, so the wall rises where chemistry says atoms cannot go, whatever the data; the inner cutoff, from the
data, says where the fitted part stops being trusted. No training pair lies inside the inner cutoff, so the
core leaves the fit's targets untouched (they are corrected by `AceDesign.fixed_part` all the same).

Stress: periodic frames whose labels carry a stress add six rows each (`linear_ace.AceDesign.stress_rows`),
weighted by `stress_weight` (AceFitSpec.stress_weight; unset: linear_ace.DEFAULT_STRESS_WEIGHT). A set without
such frames (molecules) fits exactly as without the option.
"""

from __future__ import annotations

import json
import logging
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from ase import Atoms
from ase.data import atomic_numbers, covalent_radii

from pyacemaker.artifacts import PACEMAKER_DATASET_KIND, PACEMAKER_INPUT_KIND, ArtifactStore
from pyacemaker.rpc import InvalidInputError
from pyacemaker.services.trainer import linear_ace, pacemaker_export, row_processes
from pyacemaker.services.trainer.datasets import (
    artifact_paths,
    check_finite,
    e0s_by_number,
    elements_of,
    energy_of,
    forces_of,
    load_labelled,
    reference_energy,
    require_e0s,
    shard_paths,
)
from pyacemaker.services.trainer.progress import ProgressWriter
from pyacemaker.services.trainer.results import JobResult
from pyacemaker.v1 import trainer_pb2

log = logging.getLogger(__name__)

MODEL_KINDS = ("linear", "nonlinear")
# Artifact kind of a fit's kept normal equations (EquationsReuse).
NORMAL_EQUATIONS_KIND = "normal_equations"
# A larger ACE cutoff is not a local potential any more (pyace's basis grows with it); 0 means inferred.
MAX_CUTOFF_A = 20.0
# Cutoff = this many times the largest sum of two covalent radii, clamped to the range below (Å).
CUTOFF_PER_BOND_LENGTH = 2.5
CUTOFF_RANGE_A = (4.0, 7.0)
# Observations (energies + force components) per basis function when the size is inferred.
OBSERVATIONS_PER_FUNCTION = 10
FUNCTIONS_PER_ELEMENT_RANGE = (8, 1000)
# Share of an element's environments that its basis functions may number at most (active-set condition).
FUNCTIONS_PER_ENVIRONMENT = 0.8
MAX_FOLDS = 5
# Core repulsion (bounded extrapolation): pair energy at the covalent bond length s and at s/2, eV; the
# inner cutoff's switching width, as a share of s; inner cutoffs stay at least this share of s below the
# radial cutoff.
CORE_ENERGY_AT_BOND_EV = 1.0
CORE_ENERGY_AT_HALF_BOND_EV = 50.0
INNER_SWITCH_PER_BOND = 0.1

# pacemaker's own default tables of radial and angular orders by chemical complexity; the per-element
# function count then picks the lowest-order functions from them.
FUNCTION_ORDERS = {
    "UNARY": {"nradmax_by_orders": [15, 6, 4, 3, 2, 2], "lmax_by_orders": [0, 3, 3, 2, 2, 1]},
    "BINARY": {"nradmax_by_orders": [15, 6, 3, 2, 2, 1], "lmax_by_orders": [0, 3, 2, 1, 1, 0]},
    "TERNARY": {"nradmax_by_orders": [15, 3, 3, 2, 1], "lmax_by_orders": [0, 2, 2, 1, 1]},
    "ALL": {"nradmax_by_orders": [15, 3, 2, 1, 1], "lmax_by_orders": [0, 2, 2, 1, 1]},
}


def infer_cutoff(elements: Sequence[str]) -> float:
    """A radial cutoff that reaches well into the second neighbour shell of the largest bonded pair."""
    largest = max(covalent_radii[atomic_numbers[symbol]] for symbol in elements)
    low, high = CUTOFF_RANGE_A
    return float(np.clip(round(CUTOFF_PER_BOND_LENGTH * 2 * largest, 2), low, high))


def environment_counts(frames: Sequence[Atoms]) -> dict[str, int]:
    counts: dict[str, int] = {}
    for atoms in frames:
        for symbol in atoms.get_chemical_symbols():
            counts[symbol] = counts.get(symbol, 0) + 1
    return counts


def infer_functions_per_element(frames: Sequence[Atoms], elements: Sequence[str]) -> int:
    """Basis functions per element from the data size: about one per OBSERVATIONS_PER_FUNCTION energies and
    force components, at most FUNCTIONS_PER_ENVIRONMENT per environment of the rarest element."""
    observations = sum(1 + 3 * len(atoms) for atoms in frames)
    by_data = observations // (OBSERVATIONS_PER_FUNCTION * len(elements))
    by_environments = int(FUNCTIONS_PER_ENVIRONMENT * min(environment_counts(frames)[s] for s in elements))
    low, high = FUNCTIONS_PER_ELEMENT_RANGE
    return int(max(1, min(max(low, by_data), high, by_environments)))


def basis_section(
    elements: Sequence[str], cutoff: float, functions_per_element: int, core: dict[str, dict[str, float]] | None = None
) -> dict[str, Any]:
    """A linear B-basis as pacemaker's `potential` section: one density, linear embedding, SBessel radial basis,
    pacemaker's function tables and, per element pair in `core` (as `add_core_repulsion` returns it), the inner
    cutoff and core repulsion. pyace builds the same basis from it as `basis_config` + `add_core_repulsion`."""
    bonds: dict[str, Any] = {
        "ALL": {"radbase": "SBessel", "radparameters": [5.25], "rcut": float(cutoff), "dcut": 0.01}
    }
    for pair, values in (core or {}).items():
        a, b = pair.split("-")
        bonds[a if a == b else f"{a} {b}"] = {
            "r_in": values["r_in_a"],
            "delta_in": values["delta_in_a"],
            "core-repulsion": [values["prefactor_ev_a"], values["lambda"]],
            "inner_cutoff_type": "distance",
        }
    return {
        "deltaSplineBins": 0.001,
        "elements": list(elements),
        "embeddings": {"ALL": {"npot": "FinnisSinclairShiftedScaled", "fs_parameters": [1, 1], "ndensity": 1}},
        "bonds": bonds,
        "functions": {"number_of_functions_per_element": int(functions_per_element), **FUNCTION_ORDERS},
    }


def basis_config(elements: Sequence[str], cutoff: float, functions_per_element: int) -> Any:
    """A linear B-basis configuration: one density, linear embedding, SBessel radial basis."""
    return create_basis_config(basis_section(elements, cutoff, functions_per_element))


def bond_length(a: str, b: str) -> float:
    """Sum of the covalent radii, Å."""
    return float(covalent_radii[atomic_numbers[a]] + covalent_radii[atomic_numbers[b]])


def core_parameters(a: str, b: str) -> tuple[float, float]:
    """(A, λ) of φ(r) = A exp(−λ r²)/r for a pair, such that the pair energy 2φ (both atoms' cores count it)
    is CORE_ENERGY_AT_BOND_EV at the covalent bond length s and CORE_ENERGY_AT_HALF_BOND_EV at s/2."""
    s = bond_length(a, b)
    lam = (np.log(CORE_ENERGY_AT_HALF_BOND_EV / CORE_ENERGY_AT_BOND_EV) - np.log(2.0)) / (0.75 * s**2)
    prefactor = 0.5 * CORE_ENERGY_AT_BOND_EV * s * np.exp(lam * s**2)
    return float(prefactor), float(lam)


def shortest_pair_distances(frames: Sequence[Atoms], cutoff: float) -> dict[tuple[str, str], float]:
    """The shortest distance of every element pair (sorted symbols) within `cutoff` over the frames, Å."""
    from ase.neighborlist import neighbor_list

    shortest: dict[tuple[str, str], float] = {}
    for atoms in frames:
        first, second, distances = neighbor_list("ijd", atoms, cutoff)
        symbols = atoms.get_chemical_symbols()
        for i, j, d in zip(first, second, distances, strict=True):
            pair = (min(symbols[i], symbols[j]), max(symbols[i], symbols[j]))
            if d < shortest.get(pair, np.inf):
                shortest[pair] = float(d)
    return shortest


def add_core_repulsion(config: Any, frames: Sequence[Atoms], cutoff: float) -> dict[str, dict[str, float]]:
    """Inner cutoff and core repulsion in every pair block of a basis configuration (see the module
    docstring); returns them per pair ("C-H": r_in, delta_in, A, lambda) for the fit's metrics. The inner
    cutoff is the pair's shortest distance in the data, at most its covalent bond length s: a pair the data
    hold only far apart (Cl–Cl beyond 4 Å in SN2) keeps its fitted part down to s, where γ, not a wall, tells
    that the potential extrapolates."""
    shortest = shortest_pair_distances(frames, cutoff)
    blocks = config.funcspecs_blocks
    chosen: dict[str, dict[str, float]] = {}
    for block in blocks:
        symbols = block.block_name.split()
        if len(symbols) > 2:  # many-body blocks have no radial functions of their own
            continue
        a, b = sorted(symbols * 2 if len(symbols) == 1 else symbols)
        s = bond_length(a, b)
        r_in = min(shortest.get((a, b), s), s, cutoff - INNER_SWITCH_PER_BOND * s)
        prefactor, lam = core_parameters(a, b)
        block.r_in = r_in
        block.delta_in = INNER_SWITCH_PER_BOND * s
        block.inner_cutoff_type = "distance"
        block.core_rep_parameters = [prefactor, lam]
        chosen[f"{a}-{b}"] = {"r_in_a": r_in, "delta_in_a": block.delta_in, "prefactor_ev_a": prefactor, "lambda": lam}
    config.funcspecs_blocks = blocks
    return chosen


@dataclass
class AceFitResult:
    yaml_path: Path
    yace_path: Path
    asi_path: Path
    metrics: dict[str, float]
    cv_table: list[dict[str, float]] = field(default_factory=list)
    # Further files for the store: (path, artifact kind), e.g. the pacemaker export.
    extra_files: list[tuple[Path, str]] = field(default_factory=list)


def linear_targets(
    frames: Sequence[Atoms],
    e0s: dict[int, float],
    design: linear_ace.AceDesign | None = None,
    with_stress: bool = False,
) -> linear_ace.Targets:
    """Energy per atom minus the reference energies (none: the total energy per atom), forces and, with
    `with_stress`, the labelled stresses of periodic frames as V·σ/N (`linear_ace.virial_per_atom`), each minus
    the design's fixed part (core repulsion) when a design is given."""
    energies, forces, stresses = [], [], []
    for atoms in frames:
        fixed_energy, fixed_forces = design.fixed_part(atoms) if design is not None else (0.0, 0.0)
        energies.append((energy_of(atoms) - (reference_energy(atoms, e0s) if e0s else 0.0)) / len(atoms) - fixed_energy)
        forces.append(forces_of(atoms) - fixed_forces)
        virial = linear_ace.virial_per_atom(atoms) if with_stress else None
        if virial is not None and design is not None:
            virial = virial - design.fixed_stress(atoms)
        stresses.append(virial)
    return linear_ace.Targets(energy_per_atom=np.array(energies), forces=forces, stress=stresses)


def report_cross_validation(fit: linear_ace.RidgeFit, progress: ProgressWriter | None, member: int = 0) -> None:
    """The cross-validation table as training lines (iteration = index of λ, loss = CV loss, RMSEs = CV RMSEs),
    so a watcher of a linear fit sees figures as it would for an epoch-based one."""
    if progress is None:
        return
    for index, row in enumerate(fit.table):
        progress.training(
            epoch=0,
            iteration=index,
            loss=row["cv_loss"],
            energy_rmse=row["cv_energy_rmse_ev_per_atom"],
            forces_rmse=row["cv_forces_rmse_ev_per_a"],
            member=member,
        )


@dataclass
class EquationsReuse:
    """A refit that adds data to a fit on the same basis need not compute the rows of that fit's frames again:
    the fit saves its normal equations per cross-validation fold (`keep`), and the refit, on the same basis (the
    pacemaker section of the first fit's .yaml), starts from them (`start_from`, holding the first `covered`
    frames) and adds the rows of the frames after those. A known group keeps its fold, new groups are placed
    onto the folds' loads (`linear_ace.extend_group_folds`), so the result equals a fit of all frames on that
    basis with those folds, to the round-off of the sums (measured: coefficients agree to 1e-9 relative).
    Measured on the SN2 flagship's refit (3104 frames, 3000 functions, 1 thread): the rows and their Gram
    matrices were 135 of its 262 s."""

    section: dict[str, Any] | None = None  # the basis, as pacemaker's potential section of a linear fit
    start_from: Path | None = None
    covered: int = 0
    keep: Path | None = None
    metadata: dict[str, Any] = field(default_factory=dict)  # recorded with the kept equations


def section_settings(
    section: dict[str, Any], frames: Sequence[Atoms]
) -> tuple[list[str], float, int, dict[str, dict[str, float]]]:
    """(elements, cutoff, functions per element, core repulsion per pair as `add_core_repulsion` returns it)
    of a linear fit's section; InvalidInputError when the frames hold an element it lacks."""
    elements = [str(symbol) for symbol in section["elements"]]
    missing = sorted(set(elements_of(frames)) - set(elements))
    if missing:
        raise InvalidInputError(f"ace_fit.basis has no functions for {', '.join(missing)}, which the data hold")
    cutoff = float(section["bonds"]["ALL"]["rcut"])
    core: dict[str, dict[str, float]] = {}
    for name, bond in section["bonds"].items():
        if name == "ALL" or "r_in" not in bond:
            continue
        symbols = name.split()
        a, b = sorted(symbols * 2 if len(symbols) == 1 else symbols)
        prefactor, lam = bond["core-repulsion"]
        core[f"{a}-{b}"] = {
            "r_in_a": bond["r_in"],
            "delta_in_a": bond["delta_in"],
            "prefactor_ev_a": prefactor,
            "lambda": lam,
        }
    return elements, cutoff, int(section["functions"]["number_of_functions_per_element"]), core


def create_basis_config(section: dict[str, Any]) -> Any:
    """The basis configuration pyace builds from pacemaker's potential section."""
    from pyace.multispecies_basisextension import create_multispecies_basis_config

    return create_multispecies_basis_config(section)


def _e0_json(e0s: dict[int, float]) -> dict[str, float]:
    return {str(z): float(e) for z, e in sorted(e0s.items())}


def _saved_equations(
    path: Path,
    covered: int,
    identity: str,
    e0s: dict[int, float],
    with_stress: bool,
    groups: Sequence[str],
    seed: int,
) -> tuple[linear_ace.FoldedNormalEquations, np.ndarray]:
    """Saved equations of the first `covered` frames and the folds of all frames; InvalidInputError naming what
    does not match this fit (another basis, other reference energies, stress rows, frame count)."""
    try:
        metadata = linear_ace.equations_metadata(path)
    except linear_ace.LinearAceError as exc:
        raise InvalidInputError(f"ace_fit.normal_equations: {exc}") from None
    problems = []
    if metadata.get("basis") != identity:
        problems.append("they were made for another basis than ace_fit.basis")
    if metadata.get("e0s") != _e0_json(e0s):
        problems.append("with other reference energies (ace_fit.e0s)")
    if metadata.get("fit_stress") != with_stress:
        problems.append("with stress rows" if metadata.get("fit_stress") else "without stress rows")
    if metadata.get("structures") != covered:
        problems.append(f"for {metadata.get('structures')} structures, but their shards hold {covered}")
    if problems:
        raise InvalidInputError(f"ace_fit.normal_equations do not fit this fit: {'; '.join(problems)}")
    equations = linear_ace.load_equations(path)
    known: dict[str, int] = metadata["group_folds"]
    folds = linear_ace.extend_group_folds(known, equations.rows_energy.tolist(), groups, seed)
    if any(int(folds[i]) != known.get(groups[i], -1) for i in range(covered)):
        raise InvalidInputError("ace_fit.normal_equations: their groups are not those of the frames they cover")
    if with_stress and not equations.with_stress:
        equations.gram_stress = np.zeros((equations.n_folds, equations.n_functions, equations.n_functions))
        equations.with_stress = True
    return equations, folds


def fit_linear_ace(
    frames: Sequence[Atoms],
    out_dir: Path,
    e0s: dict[int, float] | None = None,
    cutoff: float = 0.0,
    functions_per_element: int = 0,
    seed: int = 0,
    validation: Sequence[Atoms] = (),
    stem: str = "base",
    progress: ProgressWriter | None = None,
    core_repulsion: bool = True,
    stress_weight: float = linear_ace.DEFAULT_STRESS_WEIGHT,
    reuse: EquationsReuse | None = None,
    ridge_lambda: float | None = None,
    active_set: bool = True,
) -> AceFitResult:
    """Fit a linear ACE to labelled frames and write <stem>.yaml, .yace, .asi into out_dir.

    Without `e0s`, per-element reference energies are fitted together with the basis (with a single
    stoichiometry only their sum is determined; the minimum-norm split is taken). With `core_repulsion`, the
    basis gets inner cutoffs and a core repulsion (module docstring). The ridge strength is chosen by
    cross-validation over whole groups (MD trajectories; `linear_ace.structure_groups`). Periodic frames with
    a stress label add stress rows weighted by `stress_weight` (0: none). `reuse`: fit on a given basis,
    starting from saved normal equations and/or saving this fit's (`EquationsReuse`). `ridge_lambda`: this
    strength instead of the cross-validated one (the cross-validation figures are reported at it). Without
    `active_set` no .asi is written."""
    from pyace import ACEBBasisSet

    if len(frames) < 2:
        raise InvalidInputError(f"a linear ACE fit needs at least 2 labelled structures, got {len(frames)}")
    started = time.perf_counter()
    reuse = reuse or EquationsReuse()
    if reuse.section is not None:
        section = reuse.section
        elements, cutoff, functions_per_element, core = section_settings(section, frames)
        config = create_basis_config(section)
    else:
        elements = elements_of(frames)
        cutoff = cutoff or infer_cutoff(elements)
        functions_per_element = functions_per_element or infer_functions_per_element(frames, elements)
        config = basis_config(elements, cutoff, functions_per_element)
        core = add_core_repulsion(config, frames, cutoff) if core_repulsion else {}
        section = basis_section(elements, cutoff, functions_per_element, core)
    if e0s:
        require_e0s(e0s, elements, "e0s")
    given = dict(e0s or {})
    basis = ACEBBasisSet(config)
    # Without given E0s, per-element reference energies are fitted with the basis (unpenalised columns).
    design = linear_ace.AceDesign(basis, reference_elements=() if given else elements)
    try:
        linear_ace.check_active_set_data(design, frames)
    except linear_ace.LinearAceError as exc:
        raise InvalidInputError(str(exc)) from None
    with_stress = stress_weight > 0
    groups = linear_ace.structure_groups(frames)
    identity = linear_ace.basis_identity(basis) if reuse.start_from or reuse.keep else ""
    covered = reuse.covered if reuse.start_from else 0
    # Rows are computed for the frames the saved equations do not hold; the equations hold the others'.
    targets = linear_targets(frames[covered:], given, design, with_stress=with_stress)
    if reuse.start_from is not None:
        equations, folds = _saved_equations(reuse.start_from, covered, identity, given, with_stress, groups, seed)
        n_folds = equations.n_folds
    else:
        try:
            n_folds = linear_ace.folds_within_memory(
                design.n_columns, len(frames), MAX_FOLDS, matrices_per_fold=3 if targets.has_stress else 2
            )
        except linear_ace.LinearAceError as exc:
            raise InvalidInputError(str(exc)) from None
        folds, n_folds = linear_ace.group_folds(groups, n_folds, seed)
        equations = None

    def report(done: int, total: int, message: str) -> None:
        if progress is not None:
            progress.stage("ace_fit", done, total, message)

    log.info(
        "linear ACE: %d structures (%d from saved normal equations), %s, cutoff %.2f Å, %d functions",
        len(frames),
        covered,
        elements,
        cutoff,
        design.n_functions,
    )
    equations = row_processes.accumulate_in_processes(
        design, frames[covered:], targets, folds[covered:], n_folds, report, into=equations
    )
    if reuse.keep is not None:
        fold_of = {group: int(fold) for group, fold in zip(groups, folds, strict=True)}
        metadata = {
            "basis": identity,
            "structures": len(frames),
            "e0s": _e0_json(given),
            "fit_stress": with_stress,
            "group_folds": fold_of,
        }
        linear_ace.save_equations(equations, reuse.keep, {**reuse.metadata, **metadata})
    n_free = design.n_columns - design.n_functions
    # The one-standard-error rule: a base that extrapolates tamely beats one a hair better on its own data.
    fit = linear_ace.fit_ridge_cv(
        equations,
        lambdas=linear_ace.DEFAULT_LAMBDAS if ridge_lambda is None else [ridge_lambda],
        n_unpenalised=n_free,
        progress=report,
        stress_weight=stress_weight,
        one_standard_error=True,
    )
    coeffs, fitted_references = design.split(fit.coeffs)
    report_cross_validation(fit, progress)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = (out_dir / f"{stem}.yaml", out_dir / f"{stem}.yace", out_dir / f"{stem}.asi")
    references = given or fitted_references
    section_json = {pacemaker_export.SECTION_METADATA_KEY: json.dumps(section)}
    linear_ace.write_potential(basis, coeffs, references, paths[0], paths[1], section_json)
    energy_weights, forces_weights = pacemaker_export.block_weights([(frames, 1.0)])
    l2 = pacemaker_export.equivalent_l2(fit.lam, fit.penalty_scale_sq, linear_ace.DEFAULT_FORCES_SHARE)
    config = pacemaker_export.fit_input(section, references, linear_ace.DEFAULT_FORCES_SHARE, l2, seed)
    exported = pacemaker_export.write_export(out_dir, frames, references, config, energy_weights, forces_weights)
    fit_seconds = time.perf_counter() - started
    if active_set:
        report(0, 0, "active set")
        linear_ace.write_active_set(paths[0], frames, paths[2])
    train_energy, train_forces, train_stress = linear_ace.fit_errors(equations, fit.coeffs)
    metrics = {
        "structures_count": float(len(frames)),
        "basis_functions_count": float(design.n_functions),
        "cutoff_a": cutoff,
        "ridge_lambda_relative": fit.lam,
        "train_energy_rmse_ev_per_atom": train_energy,
        "train_forces_rmse_ev_per_a": train_forces,
        "cv_energy_rmse_ev_per_atom": fit.cv_energy_rmse,
        "cv_forces_rmse_ev_per_a": fit.cv_forces_rmse,
        "cv_folds_count": float(n_folds),
        "cv_groups_count": float(len(set(groups))),
        "core_repulsion": float(bool(core)),
        "fit_time_s": fit_seconds,
        "stress_weight": stress_weight,
        # Over every frame: `targets` holds only the rows computed here, not those of reused equations.
        "stress_structures_count": float(
            sum(linear_ace.virial_per_atom(atoms) is not None for atoms in frames) if with_stress else 0
        ),
        "reused_equations_structures_count": float(covered),
    }
    if equations.with_stress:
        metrics["train_virial_rmse_ev_per_atom"] = train_stress
        metrics["cv_virial_rmse_ev_per_atom"] = fit.cv_stress_rmse
    for pair, values in core.items():
        metrics[f"inner_cutoff_{pair}_a"] = values["r_in_a"]
    if validation:
        from pyacemaker.services.trainer.evaluation import evaluate_potential

        scores = evaluate_potential(paths[1], validation).errors
        metrics["validation_energy_rmse_ev_per_atom"] = scores.energy_rmse_per_atom
        metrics["validation_forces_rmse_ev_per_a"] = scores.forces_rmse
        if np.isfinite(scores.stress_rmse):
            metrics["validation_stress_rmse_ev_per_a3"] = scores.stress_rmse
    extra = [(exported[0], PACEMAKER_DATASET_KIND), (exported[1], PACEMAKER_INPUT_KIND)]
    return AceFitResult(*paths, metrics=metrics, cv_table=fit.table, extra_files=extra)


# ----------------------------------------------------------------------------------------------- the job
def validate_ace_fit(spec: trainer_pb2.AceFitSpec, store: ArtifactStore) -> None:
    if not spec.train_data:
        raise InvalidInputError("ace_fit.train_data is empty; give at least one labelled extxyz shard")
    if spec.model_kind not in ("", *MODEL_KINDS):
        raise InvalidInputError(f"ace_fit.model_kind {spec.model_kind!r} is not one of {', '.join(MODEL_KINDS)}")
    check_finite({"ace_fit.cutoff": spec.cutoff, "ace_fit.stress_weight": spec.stress_weight})
    if spec.stress_weight < 0:
        raise InvalidInputError(f"ace_fit.stress_weight must not be negative, got {spec.stress_weight:g}")
    if spec.HasField("ridge_lambda") and not (math.isfinite(spec.ridge_lambda) and spec.ridge_lambda > 0):
        raise InvalidInputError(f"ace_fit.ridge_lambda must be a positive number, got {spec.ridge_lambda:g}")
    if spec.cutoff < 0 or spec.basis_size < 0:
        raise InvalidInputError("ace_fit.cutoff and ace_fit.basis_size must not be negative (0 means inferred)")
    if spec.cutoff > MAX_CUTOFF_A:
        raise InvalidInputError(f"ace_fit.cutoff must be at most {MAX_CUTOFF_A:g} Å, got {spec.cutoff:g}")
    if spec.random_seed < 0:
        raise InvalidInputError(f"ace_fit.random_seed must not be negative, got {spec.random_seed}")
    e0s_by_number(spec.e0s)
    shard_paths(store, spec.train_data, "ace_fit.train_data")
    shard_paths(store, spec.validation_data, "ace_fit.validation_data")
    linear_only = [
        name
        for name, given in (
            ("basis", spec.HasField("basis")),
            ("normal_equations", spec.HasField("normal_equations")),
            ("keep_normal_equations", spec.keep_normal_equations),
        )
        if given
    ]
    if spec.HasField("ridge_lambda"):
        linear_only.append("ridge_lambda")
    if spec.no_active_set:
        linear_only.append("no_active_set")
    if spec.model_kind == "nonlinear":
        if linear_only:
            raise InvalidInputError(f"ace_fit.{linear_only[0]} is for linear fits, not model_kind 'nonlinear'")
        from pyacemaker.services.trainer.pacemaker_nonlinear import require_tensorflow

        require_tensorflow()
    if spec.HasField("normal_equations") and not spec.HasField("basis"):
        raise InvalidInputError("ace_fit.normal_equations need ace_fit.basis, the basis they were made for")
    for name in ("basis", "normal_equations"):
        if spec.HasField(name):
            artifact_paths(store, [getattr(spec, name)], f"ace_fit.{name}")


def run_ace_fit(
    spec: trainer_pb2.AceFitSpec, store: ArtifactStore, work_dir: Path, progress: ProgressWriter
) -> JobResult:
    progress.stage("load_data", message="reading and verifying the training shards")
    reuse, covered_shards = equations_reuse(spec, store, work_dir)
    # The frames of the shards the saved equations hold come first (their count is what the equations hold).
    frames = load_labelled(store, spec.train_data[:covered_shards], "ace_fit.train_data")
    reuse.covered = len(frames)
    frames += load_labelled(store, spec.train_data[covered_shards:], "ace_fit.train_data")
    validation = load_labelled(store, spec.validation_data, "ace_fit.validation_data")
    e0s = e0s_by_number(spec.e0s)
    out_dir = work_dir / "output"
    elements = elements_of(frames)
    functions_per_element = -(-spec.basis_size // len(elements)) if spec.basis_size else 0
    if spec.model_kind == "nonlinear":
        from pyacemaker.services.trainer.pacemaker_nonlinear import fit_nonlinear_ace

        result = fit_nonlinear_ace(
            frames, out_dir, e0s or None, spec.cutoff, functions_per_element, spec.random_seed, validation, progress
        )
    else:
        result = fit_linear_ace(
            frames,
            out_dir,
            e0s or None,
            spec.cutoff,
            functions_per_element,
            spec.random_seed,
            validation,
            "base",
            progress,
            core_repulsion=not spec.no_core_repulsion,
            stress_weight=stress_weight_of(spec),
            reuse=reuse,
            ridge_lambda=spec.ridge_lambda if spec.HasField("ridge_lambda") else None,
            active_set=not spec.no_active_set,
        )
        if reuse.keep is not None:
            result.extra_files.append((reuse.keep, NORMAL_EQUATIONS_KIND))
    return store_fit_outputs(store, result, progress)


def equations_reuse(spec: trainer_pb2.AceFitSpec, store: ArtifactStore, work_dir: Path) -> tuple[EquationsReuse, int]:
    """The spec's basis, saved equations and where to keep this fit's; and how many leading shards of
    train_data the saved equations hold."""
    shards = [ref.sha256 for ref in spec.train_data]
    reuse = EquationsReuse(metadata={"shards": shards})
    if spec.keep_normal_equations:
        reuse.keep = work_dir / "normal_equations.npz"
        reuse.keep.parent.mkdir(parents=True, exist_ok=True)
    if spec.HasField("basis"):
        (basis_path,) = artifact_paths(store, [spec.basis], "ace_fit.basis")
        try:
            reuse.section = pacemaker_export.section_of(basis_path)
        except RuntimeError as exc:  # pyace's message for a file that is not a basis
            raise InvalidInputError(f"ace_fit.basis: not an ACE .yaml ({exc})") from None
        if reuse.section is None:
            raise InvalidInputError("ace_fit.basis: not a linear fit's .yaml (it records no pacemaker section)")
    if spec.HasField("normal_equations"):
        (reuse.start_from,) = artifact_paths(store, [spec.normal_equations], "ace_fit.normal_equations")
        try:
            covered_shards = list(linear_ace.equations_metadata(reuse.start_from).get("shards", []))
        except linear_ace.LinearAceError as exc:
            raise InvalidInputError(f"ace_fit.normal_equations: {exc}") from None
        if not covered_shards or shards[: len(covered_shards)] != covered_shards:
            raise InvalidInputError(
                "ace_fit.normal_equations were made from shards that are not the first ones of ace_fit.train_data"
            )
        return reuse, len(covered_shards)
    return reuse, 0


def stress_weight_of(spec: trainer_pb2.AceFitSpec | trainer_pb2.DeltaFitSpec) -> float:
    """The spec's stress weight; linear_ace.DEFAULT_STRESS_WEIGHT when the field is not set."""
    return spec.stress_weight if spec.HasField("stress_weight") else linear_ace.DEFAULT_STRESS_WEIGHT


def store_fit_outputs(store: ArtifactStore, result: AceFitResult, progress: ProgressWriter) -> JobResult:
    """Put a fit's files into the artifact store: .yaml and .yace as "potential", .asi (when written) as "active_set",
    metrics plus the cross-validation table as "report"."""
    progress.stage("store_outputs", message="copying the potential into the artifact store")
    report = result.yaml_path.with_name(result.yaml_path.stem + "_metrics.json")
    report.write_text(json.dumps({"metrics": result.metrics, "cross_validation": result.cv_table}, indent=2))
    outputs = [
        store.put_file(result.yaml_path, "potential"),
        store.put_file(result.yace_path, "potential"),
        *([store.put_file(result.asi_path, "active_set")] if result.asi_path.exists() else []),
        store.put_file(report, "report"),
        # Moved, not copied: kept normal equations are hundreds of MB.
        *(store.put_file(path, kind, move=True) for path, kind in result.extra_files),
    ]
    return JobResult(metrics=result.metrics, outputs=outputs)
