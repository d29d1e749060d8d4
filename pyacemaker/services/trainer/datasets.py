"""Training data for the trainer: labelled extxyz shards from the artifact store, checked before use, and the
isolated-atom reference energies (E0s) that every fit subtracts.

A frame is usable when it carries an energy and forces (as ASE's extxyz reader puts them on a
SinglePointCalculator) and is not marked `label_status=failed`; failed labels are skipped, anything else
missing is an error that names the file and frame.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path

import numpy as np
from ase import Atoms
from ase.data import atomic_numbers, chemical_symbols

from pyacemaker.artifacts import ArtifactError, ArtifactStore
from pyacemaker.rpc import InvalidInputError
from pyacemaker.structures import StructureFileError, count_extxyz_frames, read_structures
from pyacemaker.v1 import common_pb2, trainer_pb2


def artifact_paths(store: ArtifactStore, refs: Iterable[common_pb2.ArtifactRef], what: str) -> list[Path]:
    """Local paths of artifacts after verifying their digests; errors say which input was bad."""
    paths = []
    for i, ref in enumerate(refs):
        try:
            paths.append(store.path(ref))
        except ArtifactError as exc:
            raise InvalidInputError(f"{what}[{i}]: {exc}") from None
    return paths


def shard_paths(store: ArtifactStore, refs: Iterable[common_pb2.ArtifactRef], what: str) -> list[Path]:
    """`artifact_paths` of extxyz shards, each checked to hold at least one frame (a quick scan of its atom-count
    lines, no parsing), so a job is never started on a file that is not a structure file."""
    paths = artifact_paths(store, refs, what)
    for i, path in enumerate(paths):
        try:
            frames = count_extxyz_frames(path)
        except StructureFileError as exc:
            raise InvalidInputError(f"{what}[{i}]: not an extxyz structure file ({exc})") from None
        if frames == 0:
            raise InvalidInputError(f"{what}[{i}]: {path.name} holds no structures")
    return paths


def check_finite(values: Mapping[str, float]) -> None:
    """InvalidInputError naming the first value (by its field name) that is NaN or infinite."""
    for name, value in values.items():
        if not math.isfinite(value):
            raise InvalidInputError(f"{name} must be a finite number, got {value}")


def has_labels(atoms: Atoms) -> bool:
    if atoms.info.get("label_status") == "failed" or atoms.calc is None:
        return False
    results = atoms.calc.results
    return "energy" in results and "forces" in results


def read_labelled(paths: Sequence[Path], what: str) -> list[Atoms]:
    """Every labelled frame of the files, in order. Frames with a failed label are left out."""
    frames: list[Atoms] = []
    for path in paths:
        try:
            file_frames = read_structures(path)
        except StructureFileError as exc:
            raise InvalidInputError(f"{what}: {exc}") from None
        for index, atoms in enumerate(file_frames):
            if atoms.info.get("label_status") == "failed":
                continue
            if not has_labels(atoms):
                raise InvalidInputError(f"{what}: {path} frame {index} has no energy and forces")
            frames.append(atoms)
    return frames


def load_labelled(store: ArtifactStore, refs: Iterable[common_pb2.ArtifactRef], what: str) -> list[Atoms]:
    return read_labelled(artifact_paths(store, refs, what), what)


def energy_of(atoms: Atoms) -> float:
    return float(atoms.calc.results["energy"])


def forces_of(atoms: Atoms) -> np.ndarray:
    return np.asarray(atoms.calc.results["forces"], dtype=np.float64).reshape(len(atoms), 3)


def has_stress_cell(atoms: Atoms) -> bool:
    """True for a cell periodic in all three directions with a volume: the frames that have a stress."""
    return bool(all(atoms.pbc)) and atoms.cell.rank == 3


def stress_of(atoms: Atoms) -> np.ndarray | None:
    """The labelled stress (eV/Å³, the 6 Voigt components in ASE's order) of a cell periodic in all three
    directions, or None for a frame without one (a molecule, a slab, no stress label)."""
    if not has_stress_cell(atoms) or atoms.calc is None or "stress" not in atoms.calc.results:
        return None
    stress = np.asarray(atoms.calc.results["stress"], dtype=np.float64)
    if stress.shape == (3, 3):
        stress = stress[[0, 1, 2, 1, 0, 0], [0, 1, 2, 2, 2, 1]]
    if stress.shape != (6,):
        raise InvalidInputError(f"a stress label must have 6 (Voigt) or 3×3 components, got shape {stress.shape}")
    return stress


def elements_of(frames: Iterable[Atoms]) -> list[str]:
    """Element symbols present, sorted by atomic number."""
    numbers = sorted({int(z) for atoms in frames for z in atoms.numbers})
    return [chemical_symbols[z] for z in numbers]


def e0s_by_number(entries: Iterable[trainer_pb2.AtomicEnergy]) -> dict[int, float]:
    table: dict[int, float] = {}
    for entry in entries:
        if entry.atomic_number <= 0 or entry.atomic_number >= len(chemical_symbols):
            raise InvalidInputError(f"e0s: atomic number {entry.atomic_number} is not an element")
        if not math.isfinite(entry.energy):
            raise InvalidInputError(f"e0s: the energy of Z={entry.atomic_number} is {entry.energy}, not finite")
        if entry.atomic_number in table:
            raise InvalidInputError(f"e0s: element {chemical_symbols[entry.atomic_number]} is given twice")
        table[int(entry.atomic_number)] = float(entry.energy)
    return table


def require_e0s(e0s: dict[int, float], elements: Iterable[str], what: str) -> None:
    missing = [symbol for symbol in elements if atomic_numbers[symbol] not in e0s]
    if missing:
        raise InvalidInputError(f"{what}: no isolated-atom energy for {', '.join(missing)}")


def reference_energy(atoms: Atoms, e0s: dict[int, float]) -> float:
    """Σ E0 over the atoms, eV."""
    return float(sum(e0s[int(z)] for z in atoms.numbers))


def composition_matrix(frames: Sequence[Atoms], elements: Sequence[str]) -> np.ndarray:
    """Counts of each element per frame, shape (frames, elements)."""
    column = {atomic_numbers[symbol]: i for i, symbol in enumerate(elements)}
    counts = np.zeros((len(frames), len(elements)))
    for row, atoms in enumerate(frames):
        for z in atoms.numbers:
            counts[row, column[int(z)]] += 1
    return counts


def fitted_reference_energies(
    frames: Sequence[Atoms], energies: np.ndarray, elements: Sequence[str]
) -> dict[int, float]:
    """Per-element energies that best explain `energies` by composition alone (least squares, minimum norm).

    Used where no isolated-atom energies are given. With a single stoichiometry (a reaction of one molecule)
    the split between elements is arbitrary and only the sum is meaningful: it removes the mean energy so
    the model fits the variation."""
    counts = composition_matrix(frames, elements)
    solution, *_ = np.linalg.lstsq(counts, np.asarray(energies, dtype=np.float64), rcond=None)
    return {atomic_numbers[symbol]: float(value) for symbol, value in zip(elements, solution, strict=True)}
