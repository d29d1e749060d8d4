"""Linear ACE: design rows from pyace, normal equations accumulated fold by fold, ridge regression with the
strength chosen by cross-validation, and the potential files (.yaml, .yace, .asi).

Why normal equations: the design matrix of a linear ACE is dense, (structures × (1 + 3·atoms + 6)) × functions
(6 stress rows per periodic frame when stress is fitted); for thousands of frames and thousands of functions it
does not fit in memory, while the Gram matrix (functions × functions) always does. Rows are computed for a
chunk of structures, folded into the Gram matrices of their cross-validation fold and dropped. Memory:
2 · folds · functions² · 8 bytes (energy and force Gram matrices), 3 · ... when stress rows are fitted.

Why the ridge acts on scaled coefficients: ACE basis functions differ in magnitude by orders, so a plain
penalty ‖c‖² would crush some functions and ignore others. The penalty is λ Σ s_j² c_j² with s_j the RMS of
column j (the weighted diagonal of the Gram matrix): ridge regression in standardised units, one λ for all.

The model: energy per atom = Σ_j c_j B_j / N and forces = Σ_j c_j ∂B_j, with the linear embedding
(FinnisSinclairShiftedScaled with parameters [1, 1], one density), plus the per-element reference energies
E0, which pyace's B-basis has no field for: they go into the .yace (its `E0` entry) and into the .yaml's
metadata (`pyacemaker_e0_ev`), from where `pyacemaker.services.trainer.evaluation` adds them.

Stress (periodic cells): the rows are the strain derivatives of the energy per atom, (1/N) ∂E/∂ε_v for the six
Voigt components in ASE's order (xx, yy, zz, yz, xz, xy), in eV/atom; the label they fit is V·σ_v/N, since ASE's
stress is σ = (1/V) ∂E/∂ε (positive under tension). Per atom, so they have the energy rows' units and size
whatever the cell. pyace gives the B-functions' gradients per atom with the periodic images folded in, and the
total virial only for the whole potential, not per function, so the virial of a single function (which needs
the pair vectors r_ij) is not available: the rows are central differences of the summed B-functions under a
symmetric strain of ±STRAIN_STEP of the cell and positions. The B-functions are smooth in the positions (the
cutoff function is), so the error is O(STRAIN_STEP²) (against pyace's analytic virial: ~1e-8 relative). It
costs 12 evaluations of the B-functions without gradients; measured on an 8-atom Si cell: 0.09 s against 0.05 s
for the energy and force rows with 150 functions, 0.19 s against 0.26 s with 500.

A basis may carry a fixed part that no coefficient scales: ACE's core repulsion below an inner cutoff (see
`pyacemaker.services.trainer.ace_fit.add_core_repulsion`). `AceDesign.fixed_part` evaluates it (the basis with all
coefficients zero), and the targets of a fit are the labels minus it, so the written potential, which
evaluates core and coefficients together, reproduces the labels.

Cross-validation folds hold whole groups (one MD trajectory, one restraint window), never single frames of a
trajectory: neighbouring frames of one trajectory are near copies, and a fold that shares a trajectory with
the training folds measures interpolation, which chooses too weak a ridge.
"""

from __future__ import annotations

import contextlib
import dataclasses
import gc
import hashlib
import json
import re
import tempfile
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from ase import Atoms
from ase.data import atomic_numbers

from pyacemaker.ace_reference_energies import E0_METADATA_KEY, e0_metadata_value
from pyacemaker.services.trainer.datasets import has_stress_cell, stress_of
from pyacemaker.structures import bounded_batches

# Ridge strengths tried by cross-validation, relative to unit-diagonal (standardised) normal equations: half
# decades, so that the one-standard-error rule (fit_ridge_cv) does not have to jump a whole decade.
DEFAULT_LAMBDAS = tuple(10.0 ** (p / 2) for p in range(-18, 1))
# Share of the loss that forces carry (pacemaker calls it kappa); energies per atom carry the rest.
DEFAULT_FORCES_SHARE = 0.3
# Memory allowed for the Gram matrices of the normal equations (they dominate a linear fit's memory).
GRAM_MEMORY_BYTES = 4 * 2**30
# Structures whose rows are computed together before they are folded into the Gram matrices: at most
# CHUNK_STRUCTURES, and no more atoms than CHUNK_ATOMS past the first structure, so that a chunk's force rows
# (3 · atoms × functions) stay bounded for large cells too (4096 atoms × 1000 functions: 98 MB). Molecules and
# small cells fill a chunk by count (64 SN2 frames are 384 atoms), 216-atom cells by atoms (18 per chunk).
CHUNK_STRUCTURES = 64
CHUNK_ATOMS = 4096
# Weight of the stress (virial per atom) term in the loss, relative to the energy and force terms, whose
# shares sum to 1 (see FoldedNormalEquations.weights); 0 leaves stresses out. Measured: on Si cells labelled by
# a MACE model (consistent stresses) 0.01 brought most of the gain of 0.1 (held-out stress RMSE 0.24 GPa with 0,
# 0.11 with 0.01, 0.09 with 0.1); on the Si example's DFT set (QE at 18 Ry, whose stress at the E(V) minimum is
# -1.2 GPa: incomplete-basis (Pulay) stress) the delta fit with 0.01 gave B 92-93 GPa and a within 0.03 % of
# QE's E(V), with 0.1 B 95.6 GPa, a 0.5 % short and hold-out energies 17 instead of 7 meV/atom.
DEFAULT_STRESS_WEIGHT = 0.01
# Symmetric strain of the central differences that give the stress rows (dimensionless).
STRAIN_STEP = 1e-5
# Voigt components in ASE's order: (i, j) of the strain tensor.
VOIGT_PAIRS = ((0, 0), (1, 1), (2, 2), (1, 2), (0, 2), (0, 1))

ProgressCallback = Callable[[int, int, str], None]


class LinearAceError(ValueError):
    """A potential or dataset the linear fit cannot use; the message says why."""


class AceDesign:
    """Rows of the linear-ACE design matrix for one B-basis: energy per atom and force components as linear
    functions of the basis coefficients.

    With `reference_elements`, one more column per element holds its count per atom in the energy row (zero
    in force rows): the coefficients of these columns are per-element reference energies (or shifts of them)
    fitted together with the basis, which a short-ranged basis cannot produce itself."""

    def __init__(self, basis: Any, reference_elements: Sequence[str] = ()) -> None:
        from pyace import ACEBEvaluator, ACECalculator

        self.basis = basis
        # The calculator keeps only a raw pointer to the evaluator: both must stay referenced together.
        self._evaluator = ACEBEvaluator(basis)
        self._calculator = ACECalculator(self._evaluator)
        self.offsets: list[int] = []
        count = 0
        for rank1, higher in zip(basis.basis_rank1, basis.basis, strict=True):
            self.offsets.append(count)
            count += len(rank1) + len(higher)
        self.n_functions = count
        self.functions_per_element = {
            symbol: len(basis.basis_rank1[index]) + len(basis.basis[index])
            for symbol, index in basis.elements_to_index_map.items()
        }
        self.reference_elements = list(reference_elements)
        self.n_columns = count + len(self.reference_elements)
        self.cutoff = float(basis.cutoffmax)
        self.element_index = dict(basis.elements_to_index_map)
        self._fixed_calculator: Any = None
        if has_core_repulsion(basis):
            from pyace import ACEBBasisSet, PyACECalculator

            core_only = ACEBBasisSet(basis.to_BBasisConfiguration())
            core_only.basis_coeffs = np.zeros(len(core_only.basis_coeffs))
            self._fixed_calculator = PyACECalculator(core_only)

    def _environment(self, atoms: Atoms) -> Any:
        from pyace.atomicenvironment import aseatoms_to_atomicenvironment

        unknown = sorted(set(atoms.get_chemical_symbols()) - set(self.element_index))
        if unknown:
            raise LinearAceError(f"elements {', '.join(unknown)} are not in the potential's basis")
        return aseatoms_to_atomicenvironment(atoms, cutoff=self.cutoff, elements_mapper_dict=self.element_index)

    def _summed_functions(self, environment: Any, n_atoms: int) -> np.ndarray:
        """Σ over the real atoms of every basis function (the last compute's projections), shape (columns,)."""
        row = np.zeros(self.n_columns)
        # A periodic cell's environment also lists the periodic images (ghost atoms) after the n real atoms;
        # projections and B-gradients are per real atom, with the images' contributions already folded in.
        real_species = environment.species_type[:n_atoms]
        for species, projection in zip(real_species, self._calculator.projections, strict=True):
            start = self.offsets[species]
            row[start : start + len(projection)] += projection
        return row

    def rows(self, atoms: Atoms) -> tuple[np.ndarray, np.ndarray]:
        """(energy-per-atom row, shape (columns,), force rows, shape (3·atoms, columns))."""
        symbols = atoms.get_chemical_symbols()
        environment = self._environment(atoms)
        self._calculator.compute(environment, compute_projections=True, compute_b_grad=True)
        n_atoms = len(atoms)
        energy_row = self._summed_functions(environment, n_atoms)
        for column, element in enumerate(self.reference_elements, start=self.n_functions):
            energy_row[column] = symbols.count(element)
        force_rows = np.zeros((3 * n_atoms, self.n_columns))
        b_gradients = np.asarray(self._calculator.forces_bfuncs, dtype=np.float64)  # (atoms, functions, 3)
        force_rows[:, : self.n_functions] = b_gradients.transpose(0, 2, 1).reshape(3 * n_atoms, self.n_functions)
        return energy_row / n_atoms, force_rows

    def stress_rows(self, atoms: Atoms) -> np.ndarray:
        """The strain derivatives of the energy per atom, (1/N) ∂E/∂ε_v, shape (6, columns), Voigt order of ASE;
        central differences of the summed basis functions (module docstring). The reference-energy columns are
        zero (a constant per atom does not change under strain). Only for cells periodic in all three
        directions (`has_stress_cell`)."""
        if not has_stress_cell(atoms):
            raise LinearAceError("stress rows need a cell that is periodic in all three directions")
        n_atoms = len(atoms)
        cell = np.array(atoms.cell)
        rows = np.zeros((6, self.n_columns))
        for v, (i, j) in enumerate(VOIGT_PAIRS):
            strain = np.zeros((3, 3))
            strain[i, j] += 0.5
            strain[j, i] += 0.5
            sums = []
            for sign in (1.0, -1.0):
                strained = atoms.copy()
                strained.set_cell(cell @ (np.eye(3) + sign * STRAIN_STEP * strain), scale_atoms=True)
                environment = self._environment(strained)
                self._calculator.compute(environment, compute_projections=True, compute_b_grad=False)
                sums.append(self._summed_functions(environment, n_atoms))
            rows[v] = (sums[0] - sums[1]) / (2 * STRAIN_STEP * n_atoms)
        rows[:, self.n_functions :] = 0.0
        return rows

    def fixed_stress(self, atoms: Atoms) -> np.ndarray:
        """Strain derivatives of the energy per atom (V·σ/N, eV/atom, Voigt) of the basis's fixed part (the core
        repulsion); zero for a basis without one."""
        if self._fixed_calculator is None:
            return np.zeros(6)
        copy = atoms.copy()
        copy.calc = self._fixed_calculator
        return np.asarray(copy.get_stress(voigt=True), dtype=np.float64) * atoms.get_volume() / len(atoms)

    def fixed_part(self, atoms: Atoms) -> tuple[float, np.ndarray]:
        """Energy per atom and forces of the part of the potential that no coefficient scales (the core
        repulsion); zero for a basis without one."""
        if self._fixed_calculator is None:
            return 0.0, np.zeros((len(atoms), 3))
        copy = atoms.copy()
        copy.calc = self._fixed_calculator
        return float(copy.get_potential_energy()) / len(atoms), np.array(copy.get_forces())

    def split(self, solution: np.ndarray) -> tuple[np.ndarray, dict[int, float]]:
        """Basis coefficients and per-element reference energies (by atomic number) of a solution vector."""
        references = {
            atomic_numbers[element]: float(value)
            for element, value in zip(self.reference_elements, solution[self.n_functions :], strict=True)
        }
        return solution[: self.n_functions], references


def virial_per_atom(atoms: Atoms) -> np.ndarray | None:
    """The labelled stress of a frame as the target of its stress rows, V·σ/N (eV/atom, Voigt order of ASE), or
    None when the frame has no cell periodic in 3D or no stress label."""
    stress = stress_of(atoms)
    return None if stress is None else stress * atoms.get_volume() / len(atoms)


@dataclass
class Targets:
    """What the linear model must reproduce for each structure: energy per atom (already minus Σ E0, and for
    a delta fit minus the base's prediction), forces and, per frame that has one, the stress as V·σ/N (eV/atom,
    see `virial_per_atom`; None: no stress rows for that frame; an empty list: none for any frame)."""

    energy_per_atom: np.ndarray
    forces: list[np.ndarray]
    stress: list[np.ndarray | None] = field(default_factory=list)

    def stress_of(self, index: int) -> np.ndarray | None:
        return self.stress[index] if self.stress else None

    @property
    def has_stress(self) -> bool:
        return any(value is not None for value in self.stress)


@dataclass
class FoldedNormalEquations:
    """Per cross-validation fold: Gram matrices, right-hand sides, target norms and row counts, kept apart for
    energy rows, force rows and (`with_stress`) stress rows so that RMSEs of each can be reported."""

    n_functions: int
    n_folds: int
    with_stress: bool = False
    gram_energy: np.ndarray = field(init=False)
    gram_forces: np.ndarray = field(init=False)
    gram_stress: np.ndarray = field(init=False)
    rhs_energy: np.ndarray = field(init=False)
    rhs_forces: np.ndarray = field(init=False)
    rhs_stress: np.ndarray = field(init=False)
    norm_energy: np.ndarray = field(init=False)
    norm_forces: np.ndarray = field(init=False)
    norm_stress: np.ndarray = field(init=False)
    rows_energy: np.ndarray = field(init=False)
    rows_forces: np.ndarray = field(init=False)
    rows_stress: np.ndarray = field(init=False)

    def __post_init__(self) -> None:
        k, n = self.n_folds, self.n_functions
        self.gram_energy = np.zeros((k, n, n))
        self.gram_forces = np.zeros((k, n, n))
        # Without stress the third Gram matrix is not allocated (it would cost a third of the memory for zeros).
        self.gram_stress = np.zeros((k, n, n) if self.with_stress else (k, 0, 0))
        self.rhs_energy = np.zeros((k, n))
        self.rhs_forces = np.zeros((k, n))
        self.rhs_stress = np.zeros((k, n))
        self.norm_energy = np.zeros(k)
        self.norm_forces = np.zeros(k)
        self.norm_stress = np.zeros(k)
        self.rows_energy = np.zeros(k, dtype=np.int64)
        self.rows_forces = np.zeros(k, dtype=np.int64)
        self.rows_stress = np.zeros(k, dtype=np.int64)

    def add(
        self,
        fold: int,
        energy_rows: np.ndarray,
        energy_targets: np.ndarray,
        force_rows: np.ndarray,
        force_targets: np.ndarray,
        stress_rows: np.ndarray | None = None,
        stress_targets: np.ndarray | None = None,
    ) -> None:
        self.gram_energy[fold] += energy_rows.T @ energy_rows
        self.rhs_energy[fold] += energy_rows.T @ energy_targets
        self.norm_energy[fold] += float(energy_targets @ energy_targets)
        self.rows_energy[fold] += len(energy_targets)
        self.gram_forces[fold] += force_rows.T @ force_rows
        self.rhs_forces[fold] += force_rows.T @ force_targets
        self.norm_forces[fold] += float(force_targets @ force_targets)
        self.rows_forces[fold] += len(force_targets)
        if stress_rows is not None and stress_targets is not None and len(stress_targets):
            if not self.with_stress:
                raise LinearAceError("stress rows given to normal equations made without stress")
            self.gram_stress[fold] += stress_rows.T @ stress_rows
            self.rhs_stress[fold] += stress_rows.T @ stress_targets
            self.norm_stress[fold] += float(stress_targets @ stress_targets)
            self.rows_stress[fold] += len(stress_targets)

    def add_equations(self, other: FoldedNormalEquations, sign: int = 1) -> None:
        """Add the rows `other` holds (same columns and folds); `sign` -1 takes them out, as if they had never
        been added. Arrays `other` does not allocate (no stress rows) are left as they are."""
        combine = np.add if sign > 0 else np.subtract  # in place: no temporary copy of a Gram matrix
        for name in EQUATION_ARRAYS:
            mine, theirs = getattr(self, name), getattr(other, name)
            if theirs.size:
                combine(mine, theirs, out=mine)

    def weights(self, forces_share: float, stress_weight: float = 0.0) -> tuple[float, float, float]:
        """Row weights that make the loss (1 − share)·MSE(energy per atom) + share·MSE(force components)
        + stress_weight·MSE(stress rows, V·σ/N per component); the stress term is absent without stress rows, so
        a set without periodic frames fits as if stress_weight were 0."""
        stress_rows = int(self.rows_stress.sum())
        return (
            (1.0 - forces_share) / max(1, int(self.rows_energy.sum())),
            forces_share / max(1, int(self.rows_forces.sum())),
            stress_weight / stress_rows if stress_rows else 0.0,
        )

    def total(
        self, forces_share: float, leave_out: int | None = None, stress_weight: float = 0.0
    ) -> tuple[np.ndarray, np.ndarray]:
        """Weighted Gram matrix and right-hand side over all folds but `leave_out`."""
        w_energy, w_forces, w_stress = self.weights(forces_share, stress_weight)
        keep = [k for k in range(self.n_folds) if k != leave_out]
        gram = w_energy * self.gram_energy[keep].sum(axis=0) + w_forces * self.gram_forces[keep].sum(axis=0)
        rhs = w_energy * self.rhs_energy[keep].sum(axis=0) + w_forces * self.rhs_forces[keep].sum(axis=0)
        if w_stress:
            gram += w_stress * self.gram_stress[keep].sum(axis=0)
            rhs += w_stress * self.rhs_stress[keep].sum(axis=0)
        return gram, rhs

    def squared_errors(self, fold: int, coeffs: np.ndarray) -> tuple[float, float, float]:
        """Sums of squared residuals of energy rows, force rows and stress rows of one fold for the given
        coefficients."""
        sse_energy = coeffs @ self.gram_energy[fold] @ coeffs - 2 * coeffs @ self.rhs_energy[fold]
        sse_forces = coeffs @ self.gram_forces[fold] @ coeffs - 2 * coeffs @ self.rhs_forces[fold]
        sse_stress = 0.0
        if self.rows_stress[fold]:
            sse_stress = coeffs @ self.gram_stress[fold] @ coeffs - 2 * coeffs @ self.rhs_stress[fold]
        return (
            max(0.0, sse_energy + self.norm_energy[fold]),
            max(0.0, sse_forces + self.norm_forces[fold]),
            max(0.0, sse_stress + self.norm_stress[fold]),
        )


# What a saved set of normal equations holds besides its metadata.
EQUATION_ARRAYS = tuple(f.name for f in dataclasses.fields(FoldedNormalEquations) if not f.init)
# The symmetric ones, saved as their upper triangles: half the bytes to write, to hash on every use (the store
# verifies a file's digest each time it hands it out) and to read. Measured on the SN2 flagship's 3000 functions:
# 720 MB whole took 2.8 s to hash and 3.1 s to load, each time a refit or a delta fit used them.
_GRAM_ARRAYS = ("gram_energy", "gram_forces", "gram_stress")


def _upper_triangles(matrices: np.ndarray) -> np.ndarray:
    """(folds, n, n) symmetric matrices as (folds, n(n+1)/2): each one's upper triangle, row after row."""
    folds, n, _ = matrices.shape
    packed = np.empty((folds, n * (n + 1) // 2))
    offset = 0
    for i in range(n):
        packed[:, offset : offset + n - i] = matrices[:, i, i:]
        offset += n - i
    return packed


def _symmetric_from_upper(packed: np.ndarray, n: int) -> np.ndarray:
    """The inverse of `_upper_triangles` (row by row: much faster than a scatter through index arrays)."""
    matrices = np.empty((packed.shape[0], n, n))
    offset = 0
    for i in range(n):
        row = packed[:, offset : offset + n - i]
        matrices[:, i, i:] = row
        matrices[:, i:, i] = row
        offset += n - i
    return matrices


def save_equations(equations: FoldedNormalEquations, path: Path, metadata: dict[str, Any]) -> None:
    """The equations and what they were made from (`metadata`, JSON) in one .npz file (uncompressed: Gram
    matrices of real data do not compress; the Gram matrices as their upper triangles, `_GRAM_ARRAYS`)."""
    header = {
        "n_functions": equations.n_functions,
        "n_folds": equations.n_folds,
        "with_stress": equations.with_stress,
        "gram_upper_triangles": True,
    }
    arrays: dict[str, Any] = {
        name: _upper_triangles(getattr(equations, name)) if name in _GRAM_ARRAYS else getattr(equations, name)
        for name in EQUATION_ARRAYS
    }
    with path.open("wb") as handle:
        np.savez(handle, metadata=np.array(json.dumps({**metadata, **header})), **arrays)


def equations_metadata(path: Path) -> dict[str, Any]:
    """The metadata of saved equations, without reading the matrices."""
    try:
        with np.load(path) as data:
            return dict(json.loads(str(data["metadata"])))
    except (OSError, ValueError, KeyError) as exc:
        raise LinearAceError(f"{path.name}: not a file of saved normal equations ({exc})") from None


def load_equations(path: Path, summed: bool = False) -> FoldedNormalEquations:
    """Saved equations; `summed`: with their folds summed into one (what an anchor needs), each array summed as
    it is read, so that the memory of all folds is never held at once."""
    metadata = equations_metadata(path)
    equations = FoldedNormalEquations.__new__(FoldedNormalEquations)  # no zero matrices allocated first
    equations.n_functions = n = int(metadata["n_functions"])
    equations.n_folds = 1 if summed else int(metadata["n_folds"])
    equations.with_stress = bool(metadata["with_stress"])
    packed = bool(metadata.get("gram_upper_triangles"))  # files of earlier versions hold whole matrices
    with np.load(path) as data:
        for name in EQUATION_ARRAYS:
            values = np.array(data[name])
            if summed:
                values = values.sum(axis=0, keepdims=True)
            if packed and name in _GRAM_ARRAYS:
                values = _symmetric_from_upper(values, n if values.shape[1] else 0)
            setattr(equations, name, values)
    return equations


def basis_identity(basis: Any) -> str:
    """sha256 of a B-basis without its coefficients and metadata: what the design rows depend on. Two fits on
    one basis (a base and its refit, a delta on it) have the same identity whatever their coefficients and
    reference energies."""
    from pyace import ACEBBasisSet
    from pyace.basis import MapStringString

    bare = ACEBBasisSet(basis.to_BBasisConfiguration())
    bare.basis_coeffs = np.zeros(len(bare.basis_coeffs))
    config = bare.to_BBasisConfiguration()
    config.metadata = MapStringString()
    with tempfile.TemporaryDirectory(prefix="basis-") as scratch:
        path = Path(scratch) / "basis.yaml"
        config.save(str(path))
        return hashlib.sha256(path.read_bytes()).hexdigest()


def folds_within_memory(
    n_columns: int, n_structures: int, wanted: int, extra_matrices: int = 0, matrices_per_fold: int = 2
) -> int:
    """Cross-validation folds that keep the normal equations (`matrices_per_fold` Gram matrices per fold: 2, 3
    with stress rows, plus `extra_matrices`) under GRAM_MEMORY_BYTES; at least 2, else the basis is too large
    for this machine's budget."""
    per_matrix = 8 * n_columns**2
    affordable = (GRAM_MEMORY_BYTES // per_matrix - extra_matrices) // matrices_per_fold
    folds = min(wanted, n_structures, affordable)
    if folds < 2:
        needed = (2 * matrices_per_fold + extra_matrices) * per_matrix / 2**30
        raise LinearAceError(
            f"{n_columns} basis functions need {needed:.1f} GiB for the normal equations of a 2-fold "
            f"cross-validation (budget {GRAM_MEMORY_BYTES / 2**30:.0f} GiB); choose a smaller basis_size"
        )
    return int(folds)


def fold_assignment(n_structures: int, n_folds: int, seed: int) -> np.ndarray:
    """A random fold for each structure, equal fold sizes (±1)."""
    order = np.random.default_rng(seed).permutation(n_structures)
    folds = np.empty(n_structures, dtype=np.int64)
    folds[order] = np.arange(n_structures) % n_folds
    return folds


def group_fold_assignment(groups: Sequence[str], n_folds: int, seed: int) -> np.ndarray:
    """A fold for each structure such that all structures of a group share one fold; groups in random order,
    each into the fold that holds the fewest structures so far (largest groups first), so folds stay about
    equal. Needs at least `n_folds` groups (see `group_folds`)."""
    names = sorted(set(groups))
    if len(names) < n_folds:
        raise LinearAceError(f"{len(names)} groups cannot fill {n_folds} cross-validation folds")
    sizes = {name: 0 for name in names}
    for name in groups:
        sizes[name] += 1
    fold_of = _place_groups(sizes, {}, np.zeros(n_folds, dtype=np.int64), seed)
    return np.array([fold_of[name] for name in groups], dtype=np.int64)


def extend_group_folds(known: dict[str, int], loads: Sequence[int], groups: Sequence[str], seed: int) -> np.ndarray:
    """Folds for `groups` when some groups were placed before (`known`, with `loads` structures per fold then):
    a known group keeps its fold, new groups are placed as `group_fold_assignment` places them, onto the loads
    there are. So the normal equations of the structures placed before stay valid fold by fold."""
    sizes = {name: 0 for name in sorted(set(groups)) if name not in known}
    for name in groups:
        if name in sizes:
            sizes[name] += 1
    fold_of = _place_groups(sizes, known, np.array(loads, dtype=np.int64), seed)
    return np.array([fold_of[name] for name in groups], dtype=np.int64)


def _place_groups(sizes: dict[str, int], known: dict[str, int], load: np.ndarray, seed: int) -> dict[str, int]:
    """Groups (name: structures) in random order, largest first, each into the fold that holds the fewest
    structures so far."""
    names = sorted(sizes)
    order = [names[i] for i in np.random.default_rng(seed).permutation(len(names))]
    order.sort(key=lambda name: -sizes[name])  # stable: ties keep the random order
    fold_of = dict(known)
    for name in order:
        fold = int(np.argmin(load))
        fold_of[name] = fold
        load[fold] += sizes[name]
    return fold_of


def group_folds(groups: Sequence[str], wanted: int, seed: int) -> tuple[np.ndarray, int]:
    """(fold per structure, number of folds): whole groups per fold when there are at least 2 groups (as many
    folds as groups, at most `wanted`), else contiguous blocks of the structures in their order (a single
    trajectory: its blocks are as far apart in time as it allows)."""
    n_groups = len(set(groups))
    if n_groups >= 2:
        n_folds = min(wanted, n_groups)
        return group_fold_assignment(groups, n_folds, seed), n_folds
    n_folds = min(wanted, len(groups))
    return (np.arange(len(groups)) * n_folds // max(1, len(groups))).astype(np.int64), n_folds


# info key of a structure's cross-validation group; without it the MD replica, else the structure alone.
GROUP_KEY = "fit_group"
_MD_GROUP_KEYS = ("md_replica",)


def structure_groups(frames: Sequence[Atoms]) -> list[str]:
    """The cross-validation group of every structure: its `fit_group` info entry, else its MD replica (one
    trajectory), else its own index (a structure not from MD stands alone)."""
    groups = []
    for index, atoms in enumerate(frames):
        if GROUP_KEY in atoms.info:
            groups.append(str(atoms.info[GROUP_KEY]))
        elif all(key in atoms.info for key in _MD_GROUP_KEYS):
            groups.append("md:" + ":".join(str(atoms.info[key]) for key in _MD_GROUP_KEYS))
        else:
            groups.append(f"structure:{index}")
    return groups


def accumulate(
    design: AceDesign,
    frames: Sequence[Atoms],
    targets: Targets,
    folds: np.ndarray,
    n_folds: int,
    progress: ProgressCallback | None = None,
    stage: str = "design",
    with_references: bool = True,
    into: FoldedNormalEquations | None = None,
    keep_rows: FoldRows | None = None,
) -> FoldedNormalEquations:
    """Fold every structure's rows into its fold's normal equations, a chunk at a time (`chunks`); stress rows
    for the frames whose `targets.stress` entry is given. Without `with_references` the reference-energy
    columns are left out of these rows (zero). The targets are taken as given: a caller whose labels include
    the basis's fixed part subtracts it first (`fixed_part`, `fixed_stress`). `into`: equations of other
    structures (same design and folds) to add these to. `keep_rows`: the rows are also kept there (for a small
    set whose cross-validation can then use them, `fit_ridge_cv`)."""
    equations = into or FoldedNormalEquations(design.n_columns, n_folds, with_stress=targets.has_stress)
    with garbage_collection_paused():
        _accumulate_into(equations, design, frames, targets, folds, progress, stage, with_references, keep_rows)
    return equations


@dataclass
class FoldRows:
    """The rows behind normal equations, kept when there are few (a delta fit's DFT set): per block of rows its
    fold, its kind (0 energy, 1 forces, 2 stress: the three weights of `FoldedNormalEquations.weights`), the
    rows and their targets."""

    blocks: list[tuple[int, int, np.ndarray, np.ndarray]] = field(default_factory=list)

    @property
    def count(self) -> int:
        return sum(len(targets) for _, _, _, targets in self.blocks)

    def weighted(
        self, equations: FoldedNormalEquations, forces_share: float, stress_weight: float = 0.0
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(rows × √weight, targets × √weight, fold of each row): XᵀX and Xᵀy of the rows outside a fold are
        that fold's `equations.total(..., leave_out=fold)`."""
        weights = np.sqrt(equations.weights(forces_share, stress_weight))
        rows = np.vstack([weights[kind] * block for _, kind, block, _ in self.blocks])
        targets = np.concatenate([weights[kind] * values for _, kind, _, values in self.blocks])
        folds = np.concatenate([np.full(len(values), fold) for fold, _, _, values in self.blocks])
        return rows, targets, folds


@contextlib.contextmanager
def garbage_collection_paused() -> Iterator[None]:
    """pyace hands the B-gradients over as nested Python lists (thousands of list objects per structure);
    with the cyclic garbage collector running, collecting them costs more than computing them."""
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()


def _accumulate_into(
    equations: FoldedNormalEquations,
    design: AceDesign,
    frames: Sequence[Atoms],
    targets: Targets,
    folds: np.ndarray,
    progress: ProgressCallback | None,
    stage: str,
    with_references: bool,
    keep_rows: FoldRows | None = None,
) -> None:
    for structures in chunks([len(atoms) for atoms in frames]):
        accumulate_chunk(equations, design, frames, targets, folds, structures, with_references, keep_rows)
        if progress is not None:
            progress(structures.stop, len(frames), f"{stage}: rows of {structures.stop}/{len(frames)} structures")


def accumulate_chunk(
    equations: FoldedNormalEquations,
    design: AceDesign,
    frames: Sequence[Atoms],
    targets: Targets,
    folds: np.ndarray,
    structures: range,
    with_references: bool = True,
    keep_rows: FoldRows | None = None,
) -> None:
    """Add the rows of one chunk of `frames` (`chunks`) to their folds' equations."""
    chunk: dict[int, tuple[list, list, list, list, list, list]] = {}
    for i in structures:
        energy_row, force_rows = design.rows(frames[i])
        if not with_references:
            energy_row[design.n_functions :] = 0.0
        lists = chunk.setdefault(int(folds[i]), ([], [], [], [], [], []))
        lists[0].append(energy_row)
        lists[1].append(targets.energy_per_atom[i])
        lists[2].append(force_rows)
        lists[3].append(np.asarray(targets.forces[i], dtype=np.float64).ravel())
        stress = targets.stress_of(i)
        if stress is not None:
            lists[4].append(design.stress_rows(frames[i]))
            lists[5].append(np.asarray(stress, dtype=np.float64).ravel())
    for fold, (e_rows, e_targets, f_rows, f_targets, s_rows, s_targets) in chunk.items():
        blocks = [(np.array(e_rows), np.array(e_targets)), (np.vstack(f_rows), np.concatenate(f_targets))]
        if s_rows:
            blocks.append((np.vstack(s_rows), np.concatenate(s_targets)))
        equations.add(fold, *blocks[0], *blocks[1], *(blocks[2] if s_rows else (None, None)))
        if keep_rows is not None:
            keep_rows.blocks += [(fold, kind, rows, values) for kind, (rows, values) in enumerate(blocks)]


def chunks(sizes: Sequence[int]) -> Iterator[range]:
    """Consecutive structures (of `sizes` atoms each) whose rows are computed together."""
    return bounded_batches(sizes, CHUNK_STRUCTURES, CHUNK_ATOMS)


def _column_scale(gram: np.ndarray) -> np.ndarray:
    diagonal = np.sqrt(np.clip(np.diag(gram), 0.0, None))
    floor = max(float(diagonal.max()), 1.0) * 1e-12
    return np.where(diagonal > floor, diagonal, 1.0)


class _ScaledRidge:
    """Solutions of (A + λ S²) c = b for many λ from one eigendecomposition, with the last `n_free` unknowns
    unpenalised. Those are eliminated exactly (Schur complement; pseudo-inverse, since with one
    stoichiometry the per-element references are determined only in sum): minimising over them for given
    penalised unknowns a leaves a ridge problem in a alone, which is solved in scaled units S⁻¹ A S⁻¹.
    `solve_once` solves for one λ without the decomposition (a linear solve, a fraction of its cost)."""

    def __init__(self, gram: np.ndarray, rhs: np.ndarray, scale: np.ndarray, n_free: int = 0) -> None:
        p = len(rhs) - n_free
        self.n_free = n_free
        self.scale = scale[:p]
        gram_aa, rhs_a = gram[:p, :p], rhs[:p]
        if n_free:
            self.gram_ar = gram[:p, p:]
            self.free_inverse = np.linalg.pinv(gram[p:, p:], rcond=1e-10, hermitian=True)
            self.rhs_r = rhs[p:]
            gram_aa = gram_aa - self.gram_ar @ self.free_inverse @ self.gram_ar.T
            rhs_a = rhs_a - self.gram_ar @ self.free_inverse @ self.rhs_r
        # The scaled system until it is decomposed: then its eigenvectors take its place in memory.
        self.system: np.ndarray | None = gram_aa / np.outer(self.scale, self.scale)
        self.scaled_rhs = rhs_a / self.scale
        self._eigen: tuple[np.ndarray, np.ndarray, np.ndarray] | None = None

    def solve(self, lam: float) -> np.ndarray:
        if self._eigen is None:
            assert self.system is not None
            eigenvalues, vectors = np.linalg.eigh(self.system)
            self._eigen = (np.clip(eigenvalues, 0.0, None), vectors, vectors.T @ self.scaled_rhs)
            self.system = None
        eigenvalues, vectors, projected = self._eigen
        return self._with_free((vectors @ (projected / (eigenvalues + lam))) / self.scale)

    def solve_once(self, lam: float) -> np.ndarray:
        """`solve(lam)` to round-off, by one linear solve instead of the eigendecomposition (unless that is
        already done)."""
        if self.system is None:
            return self.solve(lam)
        system = self.system.copy()
        system[np.diag_indices_from(system)] += lam
        return self._with_free(np.linalg.solve(system, self.scaled_rhs) / self.scale)

    def _with_free(self, penalised: np.ndarray) -> np.ndarray:
        if not self.n_free:
            return penalised
        free = self.free_inverse @ (self.rhs_r - self.gram_ar.T @ penalised)
        return np.concatenate([penalised, free])


# Relative singular-value cutoff of the unpenalised columns' rows: the pseudo-inverse _ScaledRidge takes of their
# Gram matrix with rcond 1e-10 keeps the same directions (eigenvalues of XᵀX are squared singular values of X).
_FREE_RCOND = 1e-5


class _AnchoredRidge:
    """The solutions _ScaledRidge gives for (A + XᵀX + λ S²) c = Xᵀy, when A (the delta fit's anchor: no right-hand
    side, zero in the unpenalised columns) is the same for every cross-validation fold and X has few rows: from
    one eigendecomposition of the scaled A (`anchor_eigen`, shared by all folds) instead of one per fold.

    The unpenalised columns are eliminated as there, which leaves W = P X_a with P the projector off their rows'
    span, so the system in the penalised unknowns is (A_s + λ + U Uᵀ) z = U y in the eigenbasis of A_s, with
    U = Vᵀ S⁻¹ Wᵀ (functions × rows). The push-through identity turns it into a system of the rows' size:
    z = D⁻¹ U (1 + Uᵀ D⁻¹ U)⁻¹ y with D = eigenvalues + λ. Per λ that costs rows² × functions, against
    functions³ for a decomposition; exact, not an approximation (a test compares both)."""

    def __init__(
        self,
        anchor_eigen: tuple[np.ndarray, np.ndarray],
        rows: np.ndarray,
        targets: np.ndarray,
        scale: np.ndarray,
        n_free: int = 0,
    ) -> None:
        p = rows.shape[1] - n_free
        self.n_free = n_free
        self.scale = scale[:p]
        self.eigenvalues, self.vectors = anchor_eigen
        self.rows_a, self.targets = rows[:, :p], targets
        projected = self.rows_a
        if n_free:
            left, singular, right = np.linalg.svd(rows[:, p:], full_matrices=False)
            keep = singular > _FREE_RCOND * max(float(singular.max(initial=0.0)), np.finfo(float).tiny)
            span = left[:, keep]
            self.free_solve = (right[keep].T / singular[keep]) @ span.T  # the pseudo-inverse of the free rows
            projected = self.rows_a - span @ (span.T @ self.rows_a)
        self.u = self.vectors.T @ (projected / self.scale).T

    def solve_once(self, lam: float) -> np.ndarray:
        return self.solve(lam)  # already a system of the rows' size, from the shared decomposition

    def solve(self, lam: float) -> np.ndarray:
        weighted = self.u / (self.eigenvalues + lam)[:, None]
        system = self.u.T @ weighted
        system[np.diag_indices_from(system)] += 1.0
        penalised = (self.vectors @ (weighted @ np.linalg.solve(system, self.targets))) / self.scale
        if not self.n_free:
            return penalised
        free = self.free_solve @ (self.targets - self.rows_a @ penalised)
        return np.concatenate([penalised, free])


def _anchor_eigen(anchor_gram: np.ndarray, scale: np.ndarray, n_free: int) -> tuple[np.ndarray, np.ndarray]:
    p = len(scale) - n_free
    if n_free and (np.any(anchor_gram[p:]) or np.any(anchor_gram[:, p:])):
        raise LinearAceError("an anchor with rows in the unpenalised columns cannot share one decomposition")
    eigenvalues, vectors = np.linalg.eigh(anchor_gram[:p, :p] / np.outer(scale[:p], scale[:p]))
    return np.clip(eigenvalues, 0.0, None), vectors


def row_count(frames: Sequence[Atoms], targets: Targets) -> int:
    """Rows of the design matrix of these frames: energy, forces, and stress where `targets` has it."""
    return sum(1 + 3 * len(atoms) + (6 if targets.stress_of(i) is not None else 0) for i, atoms in enumerate(frames))


def uses_few_rows(n_rows: int, n_columns: int) -> bool:
    """Whether cross-validation with an anchor is cheaper from the rows (`_AnchoredRidge`) than from one
    decomposition per fold: per λ and fold it costs rows² × columns, a decomposition about 10 columns³, and
    there are 19 λ; a quarter of the columns keeps the rows' way ahead and their memory small."""
    return 0 < n_rows <= n_columns // 4


@dataclass
class RidgeFit:
    """The coefficients at the chosen λ, and the cross-validation table that chose it."""

    coeffs: np.ndarray
    lam: float
    cv_energy_rmse: float  # eV/atom
    cv_forces_rmse: float  # eV/Å
    table: list[dict[str, float]]
    # Of the stress rows, V·σ/N (eV/atom); NaN without stress rows.
    cv_stress_rmse: float = float("nan")
    # s_j² of the penalised columns: the ridge term is λ Σ s_j² c_j².
    penalty_scale_sq: np.ndarray = field(default_factory=lambda: np.zeros(0))
    # The smallest cross-validation loss over the λ tried, and its standard error over the folds.
    best_cv_loss: float = float("nan")
    best_cv_loss_standard_error: float = float("nan")


def fit_ridge_cv(
    equations: FoldedNormalEquations,
    forces_share: float = DEFAULT_FORCES_SHARE,
    lambdas: Sequence[float] = DEFAULT_LAMBDAS,
    anchor_gram: np.ndarray | None = None,
    n_unpenalised: int = 0,
    progress: ProgressCallback | None = None,
    stress_weight: float = 0.0,
    one_standard_error: bool = False,
    rows: FoldRows | None = None,
) -> RidgeFit:
    """Ridge regression with λ chosen by K-fold cross-validation on the folds of `equations`.

    `anchor_gram` is an extra, always-included quadratic term with zero right-hand side (the delta fit's
    surrogate rows, whose targets are the base's own predictions, i.e. zero correction). The last
    `n_unpenalised` columns (reference energies) carry no penalty. `stress_weight` weighs the stress rows in
    the fit and in the cross-validation loss (`FoldedNormalEquations.weights`). `rows`: the rows `equations` were
    made of, when they are few (`uses_few_rows`): with an anchor, every fold is then solved from one
    decomposition of the anchor (`_AnchoredRidge`), with the same result.

    With `one_standard_error`, λ is the largest whose loss is within one standard error (over the folds) of the
    smallest loss (the "one-standard-error rule"): the most regularised fit the data cannot tell apart from the
    best. Cross-validation only scores where the data is; the larger λ keeps the potential tame where it is not.
    Measured on the SN2 flagship's refinement data (3234 frames, 3000 functions): the loss is flat from λ = 1e-8
    to 1e-4 and the minimum (1e-5) lost 3 of 9 MD runs (chlorides thrown 27–300 Å), where 1e-3 kept 9 of 9 and
    scored 95 instead of 99 meV/Å on an independent B3LYP hold-out."""
    if equations.n_folds < 2:
        raise LinearAceError("cross-validation needs at least 2 folds")
    extra = anchor_gram if anchor_gram is not None else 0.0
    full_gram, full_rhs = equations.total(forces_share, stress_weight=stress_weight)
    scale = _column_scale(full_gram + extra)
    solver: Callable[[int | None], _ScaledRidge | _AnchoredRidge]
    if anchor_gram is not None and rows is not None and rows.count:
        eigen = _anchor_eigen(anchor_gram, scale, n_unpenalised)
        x, y, row_folds = rows.weighted(equations, forces_share, stress_weight)

        def solver(leave_out: int | None) -> _ScaledRidge | _AnchoredRidge:
            keep = row_folds != leave_out
            return _AnchoredRidge(eigen, x[keep], y[keep], scale, n_unpenalised)

    else:

        def solver(leave_out: int | None) -> _ScaledRidge | _AnchoredRidge:
            gram, rhs = (
                (full_gram, full_rhs)
                if leave_out is None
                else equations.total(forces_share, leave_out=leave_out, stress_weight=stress_weight)
            )
            return _ScaledRidge(gram + extra, rhs, scale, n_unpenalised)

    sse = np.zeros((equations.n_folds, 3, len(lambdas)))
    for fold in range(equations.n_folds):
        ridge = solver(fold)
        for i, lam in enumerate(lambdas):
            # One λ (a refit that keeps its base's): a linear solve per fold, no decomposition for many λ.
            coeffs = ridge.solve_once(lam) if len(lambdas) == 1 else ridge.solve(lam)
            sse[fold, :, i] = equations.squared_errors(fold, coeffs)
        if progress is not None:
            progress(fold + 1, equations.n_folds + 1, f"cross-validation fold {fold + 1}/{equations.n_folds}")
    stress_rows = int(equations.rows_stress.sum())

    def loss_of(sse: np.ndarray, rows_energy: float, rows_forces: float, rows_stress: float) -> np.ndarray:
        """The cross-validation loss of summed squared errors (3, L) over the given numbers of rows."""
        loss = (1 - forces_share) * sse[0] / max(1.0, rows_energy) + forces_share * sse[1] / max(1.0, rows_forces)
        if stress_rows and stress_weight:
            loss = loss + stress_weight * sse[2] / max(1.0, rows_stress)
        return np.asarray(loss)

    total = sse.sum(axis=0)
    mse_energy = total[0] / max(1, int(equations.rows_energy.sum()))
    mse_forces = total[1] / max(1, int(equations.rows_forces.sum()))
    mse_stress = total[2] / stress_rows if stress_rows else np.full(len(lambdas), np.nan)
    loss = loss_of(total, equations.rows_energy.sum(), equations.rows_forces.sum(), stress_rows)
    best = int(np.argmin(loss))
    per_fold = np.array(
        [
            loss_of(sse[k], equations.rows_energy[k], equations.rows_forces[k], equations.rows_stress[k])
            for k in range(equations.n_folds)
        ]
    )
    best_loss, standard_error = float(loss[best]), float(per_fold[:, best].std(ddof=1) / np.sqrt(equations.n_folds))
    if one_standard_error:
        # The largest λ within one standard error of the best (glmnet's lambda.1se). Noted: the paired variant
        # (the error of the fold-by-fold difference to the best) kept λ = 1e-4 on the SN2 data above, which
        # lost 1 of 9 MD runs.
        best = int(
            max((i for i in range(len(lambdas)) if loss[i] <= best_loss + standard_error), key=lambda i: lambdas[i])
        )
    table = []
    for i, lam in enumerate(lambdas):
        row = {
            "lambda": float(lam),
            "cv_energy_rmse_ev_per_atom": float(np.sqrt(mse_energy[i])),
            "cv_forces_rmse_ev_per_a": float(np.sqrt(mse_forces[i])),
            "cv_loss": float(loss[i]),
        }
        if stress_rows:
            row["cv_virial_rmse_ev_per_atom"] = float(np.sqrt(mse_stress[i]))
        table.append(row)
    # One λ left: no decomposition of the whole set's system is needed for it.
    coeffs = solver(None).solve_once(lambdas[best])
    if progress is not None:
        progress(equations.n_folds + 1, equations.n_folds + 1, f"final solve at lambda {lambdas[best]:.1e}")
    return RidgeFit(
        coeffs=coeffs,
        lam=float(lambdas[best]),
        cv_energy_rmse=float(np.sqrt(mse_energy[best])),
        cv_forces_rmse=float(np.sqrt(mse_forces[best])),
        table=table,
        cv_stress_rmse=float(np.sqrt(mse_stress[best])),
        penalty_scale_sq=scale[: len(scale) - n_unpenalised] ** 2,
        best_cv_loss=best_loss,
        best_cv_loss_standard_error=standard_error,
    )


def fit_errors(equations: FoldedNormalEquations, coeffs: np.ndarray) -> tuple[float, float, float]:
    """In-sample RMSEs (energy per atom eV/atom, force components eV/Å, stress rows V·σ/N eV/atom; NaN without
    stress rows) of coefficients on all folds."""
    sse = np.zeros(3)
    for fold in range(equations.n_folds):
        sse += equations.squared_errors(fold, coeffs)
    stress_rows = int(equations.rows_stress.sum())
    return (
        float(np.sqrt(sse[0] / max(1, int(equations.rows_energy.sum())))),
        float(np.sqrt(sse[1] / max(1, int(equations.rows_forces.sum())))),
        float(np.sqrt(sse[2] / stress_rows)) if stress_rows else float("nan"),
    )


# ------------------------------------------------------------------------------------------ potential files
def has_core_repulsion(basis: Any) -> bool:
    """True when some pair block of the basis has a core repulsion (a prefactor above zero)."""
    return any(
        block.core_rep_parameters and block.core_rep_parameters[0] > 0
        for block in basis.to_BBasisConfiguration().funcspecs_blocks
    )


def is_linear_basis(basis_config: Any) -> bool:
    """True when every element block has one density with the linear embedding, so energy is linear in the
    coefficients."""
    for block in basis_config.funcspecs_blocks:
        if block.number_of_species != 1:
            continue
        if block.ndensityi != 1 or block.npoti != "FinnisSinclairShiftedScaled":
            return False
        if list(block.fs_parameters) != [1.0, 1.0]:
            return False
    return True


def load_basis(yaml_path: Path) -> Any:
    from pyace import ACEBBasisSet

    return ACEBBasisSet(str(yaml_path))


_YACE_E0_LINE = re.compile(r"^E0: \[[^\]]*\]$", re.MULTILINE)
_YACE_ELEMENTS_LINE = re.compile(r"^elements: \[([^\]]*)\]$", re.MULTILINE)


def _write_yace_with_e0(basis: Any, e0s: dict[int, float], yace_path: Path) -> None:
    """The .yace of a B-basis with its E0 entry filled in: pyace writes E0: [0, ...] and offers no setter, but
    the C-tilde format has the field and pyace's and LAMMPS' evaluators add it to every atom's energy."""
    basis.to_ACECTildeBasisSet().save_yaml(str(yace_path))
    text = yace_path.read_text()
    elements_match = _YACE_ELEMENTS_LINE.search(text)
    if elements_match is None or _YACE_E0_LINE.search(text) is None:
        raise LinearAceError(f"{yace_path}: unexpected .yace layout (no 'elements:' or 'E0:' line)")
    order = [symbol.strip() for symbol in elements_match.group(1).split(",")]
    values = ", ".join(repr(float(e0s.get(atomic_numbers[symbol], 0.0))) for symbol in order)
    yace_path.write_text(_YACE_E0_LINE.sub(f"E0: [{values}]", text, count=1))


def write_potential(
    basis: Any,
    coeffs: np.ndarray,
    e0s: dict[int, float],
    yaml_path: Path,
    yace_path: Path,
    metadata: dict[str, str] | None = None,
) -> None:
    """Save coefficients into the basis and write the B-basis .yaml (E0s and `metadata` in its metadata) and the
    .yace (E0s in its E0 entry), so each file on its own gives total energies."""
    basis.basis_coeffs = np.asarray(coeffs, dtype=np.float64)
    write_potential_files(basis, e0s, yaml_path, yace_path, metadata)


def write_potential_files(
    basis: Any, e0s: dict[int, float], yaml_path: Path, yace_path: Path, metadata: dict[str, str] | None = None
) -> None:
    """The .yaml and .yace of a B-basis (linear or not) with the reference energies E0 recorded in both."""
    from pyace import ACEBBasisSet

    config = basis.to_BBasisConfiguration()
    for key, value in (metadata or {}).items():
        config.metadata[key] = value
    config.metadata[E0_METADATA_KEY] = e0_metadata_value(e0s)
    config.save(str(yaml_path))
    _write_yace_with_e0(ACEBBasisSet(config), e0s, yace_path)


def check_active_set_data(design: AceDesign, frames: Sequence[Atoms]) -> None:
    """The active set of an element needs at least as many environments of it as it has basis functions;
    checked before a fit rather than after it."""
    counts: dict[str, int] = {}
    for atoms in frames:
        for symbol in atoms.get_chemical_symbols():
            counts[symbol] = counts.get(symbol, 0) + 1
    for symbol, n_functions in design.functions_per_element.items():
        if n_functions and counts.get(symbol, 0) < n_functions:
            raise LinearAceError(
                f"the active set needs at least as many {symbol} environments as {symbol} basis functions "
                f"({counts.get(symbol, 0)} < {n_functions}); use a smaller basis or more data"
            )


# MaxVol's tolerance and iteration limit for every active set here.
ACTIVE_SET_TOLERANCE = 1.01
ACTIVE_SET_MAX_ITERATIONS = 300
# Rounds of `extended_active_set` that take in projections still above the tolerance.
EXTENSION_ROUNDS = 3


@dataclass
class ActiveSet:
    """Per element (pyace's species index): the B-projections of the environments it was chosen from and the
    chosen rows (the active set, square)."""

    projections: dict[int, np.ndarray]
    rows: dict[int, np.ndarray]


def projections_of(basis: Any, frames: Sequence[Atoms]) -> dict[int, np.ndarray]:
    """The B-projections of every environment of `frames`, per element."""
    from pyace.activelearning import compute_B_projections

    projections = compute_B_projections(basis, list(frames))
    return dict(projections[0] if isinstance(projections, tuple) else projections)


def _maxvol(projections: dict[int, np.ndarray]) -> dict[int, np.ndarray]:
    from pyace.activelearning import compute_active_set

    # pyace adds a small diagonal to all-zero columns in place: it gets copies.
    copies = {element: np.array(values) for element, values in projections.items()}
    return dict(compute_active_set(copies, tol=ACTIVE_SET_TOLERANCE, max_iters=ACTIVE_SET_MAX_ITERATIONS))


def active_set(basis: Any, frames: Sequence[Atoms]) -> ActiveSet:
    """The active set of `frames` (MaxVol over their B-projections). See check_active_set_data."""
    projections = projections_of(basis, frames)
    return ActiveSet(projections, _maxvol(projections))


def extended_active_set(start: ActiveSet, extra: dict[int, np.ndarray]) -> ActiveSet:
    """The active set of `start`'s environments and `extra` ones, grown from `start`'s rows instead of chosen
    from all of them again: MaxVol over the rows and the extra projections, then over the result and every
    projection whose γ against it still exceeds the tolerance, until none does (pyace's
    compute_active_set_by_batches refines the same way). Every environment then has γ within the tolerance, as
    from scratch. Measured on the SN2 flagship's delta (2073 anchor and 36 DFT frames, 2 threads): 2.5 s
    instead of 9.2 s for one chosen from all of them; both leave every environment at γ ≤ 1.0."""
    projections = {
        element: np.vstack([start.projections[element], extra[element]]) if element in extra else values
        for element, values in start.projections.items()
    }
    rows = {}
    for element, values in projections.items():
        chosen = _maxvol({element: np.vstack([start.rows[element], extra.get(element, values[:0])])})[element]
        for _ in range(EXTENSION_ROUNDS):
            gamma = np.abs(values @ np.linalg.pinv(chosen)).max(axis=1)
            outside = values[gamma > ACTIVE_SET_TOLERANCE]
            if not len(outside):
                break
            chosen = _maxvol({element: np.vstack([chosen, outside])})[element]
        rows[element] = chosen
    return ActiveSet(projections, rows)


def save_active_set(active: ActiveSet, basis: Any, asi_path: Path) -> None:
    """The active set as pyace's .asi (the inverses of its rows), which turns the .yaml into a γ estimator."""
    from pyace.activelearning import compute_A_active_inverse, save_active_inverse_set

    save_active_inverse_set(str(asi_path), compute_A_active_inverse(active.rows), elements_name=basis.elements_name)


def write_active_set(yaml_path: Path, frames: Sequence[Atoms], asi_path: Path) -> None:
    """The active set (MaxVol over the B-projections of the training environments) that turns the .yaml
    into an extrapolation-grade (γ) estimator, saved as .asi. For a linear ACE the projections do not depend
    on the coefficients, so the base's data serve the corrected potential too. See check_active_set_data."""
    basis = load_basis(yaml_path)
    save_active_set(active_set(basis, frames), basis, asi_path)
