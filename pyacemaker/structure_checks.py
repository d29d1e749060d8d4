"""Is one structure sane enough to hand to a calculation? Checked before any backend (native code included)
sees it, so that one absurd structure becomes a clear error instead of a crash, a hang or a machine's worth of
memory.

`check_structure` raises `StructureCheckError` (a ValueError) naming the first problem: no atoms or too many,
atomic numbers outside 1..118 or unknown to the backend, non-finite or absurdly far positions, a non-integer
charge or one the electron count cannot carry, an impossible spin multiplicity, a degenerate periodic cell, or a
cell so dense that the number of neighbours within the backend's cutoff would be absurd. The density estimate
is cheap (it uses the cell's volume, area or length only) and runs BEFORE any neighbour list is built.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np
from ase import Atoms
from ase.data import chemical_symbols

from pyacemaker.structures import SPIN_KEY, charge_of, default_spin_multiplicity

MAX_ATOMIC_NUMBER = 118
# More atoms than any backend here can label; a backend may set a lower limit (dense-matrix codes).
MAX_ATOMS = 100_000
# |coordinate| and cell-vector length bound, Å: beyond it a structure is a unit error, and neighbour-list
# binning over its extent would need absurd memory.
MAX_COORDINATE_A = 1.0e5
# Extra electrons an anion may carry per atom (N³⁻ is the most any single atom takes).
MAX_EXTRA_ELECTRONS_PER_ATOM = 3
# Neighbours per atom within the cutoff, estimated from the density of periodic images. Dense solids have
# ~0.2 atoms/Å³, i.e. ~100 neighbours within 5 Å; a thousand-fold margin still stops a 0.1 Å cell.
MAX_NEIGHBOURS_PER_ATOM = 2000
# Cutoff used for the neighbour estimate when the backend names none, Å.
DEFAULT_CUTOFF_A = 6.0


class StructureCheckError(ValueError):
    """A structure that no backend should be asked to label; the message names the field and the value."""


@dataclass(frozen=True)
class StructureLimits:
    """What a backend can take: its interaction range, its elements and its largest structure."""

    cutoff: float = DEFAULT_CUTOFF_A
    # Atomic numbers the backend knows; None means every element 1..118.
    elements: frozenset[int] | None = None
    max_atoms: int = MAX_ATOMS
    # Who set the limits, for messages ("oracle backend 'xtb'").
    owner: str = ""


DEFAULT_LIMITS = StructureLimits()


def check_structure(atoms: Atoms, limits: StructureLimits = DEFAULT_LIMITS) -> None:
    """Raise StructureCheckError naming the first thing that makes `atoms` unfit for a calculation under
    `limits`; return None for a sane structure. Cost: O(atoms), no neighbour list."""
    n_atoms = len(atoms)
    if n_atoms == 0:
        raise StructureCheckError("the structure has no atoms")
    if n_atoms > limits.max_atoms:
        raise StructureCheckError(f"the structure has {n_atoms} atoms; {_who(limits)}takes at most {limits.max_atoms}")
    _check_numbers(np.asarray(atoms.numbers), limits)
    _check_positions(np.asarray(atoms.positions, dtype=np.float64))
    _check_cell(atoms, limits)
    try:
        charge = charge_of(atoms)
    except ValueError as exc:
        raise StructureCheckError(str(exc)) from None
    _check_electrons(atoms, charge)


def _check_numbers(numbers_: np.ndarray, limits: StructureLimits) -> None:
    bad = sorted({int(z) for z in numbers_ if not 1 <= int(z) <= MAX_ATOMIC_NUMBER})
    if bad:
        verb = "is not an element" if len(bad) == 1 else "are not elements"
        raise StructureCheckError(f"atomic_numbers: {_listed(bad)} {verb} (1..{MAX_ATOMIC_NUMBER})")
    if limits.elements is not None:
        unknown = sorted({int(z) for z in numbers_} - limits.elements)
        if unknown:
            raise StructureCheckError(
                f"atomic_numbers: {element_names(unknown)} {'is' if len(unknown) == 1 else 'are'} not supported by "
                f"{_who(limits) or 'the backend '}(it knows {element_names(limits.elements, ranges=True)})"
            )


def _check_positions(positions: np.ndarray) -> None:
    finite = np.isfinite(positions).all(axis=1)
    if not finite.all():
        raise StructureCheckError(f"positions: atom {int(np.argmin(finite))} has a non-finite coordinate")
    largest = float(np.abs(positions).max())
    if largest > MAX_COORDINATE_A:
        raise StructureCheckError(f"positions: a coordinate of {largest:.3g} Å exceeds {MAX_COORDINATE_A:g} Å")


def _check_cell(atoms: Atoms, limits: StructureLimits) -> None:
    cell = np.asarray(atoms.cell, dtype=np.float64)
    if not np.isfinite(cell).all():
        raise StructureCheckError("cell: has a non-finite value")
    lengths = np.linalg.norm(cell, axis=1)
    if float(lengths.max()) > MAX_COORDINATE_A:
        raise StructureCheckError(f"cell: a lattice vector of {lengths.max():.3g} Å exceeds {MAX_COORDINATE_A:g} Å")
    periodic = [i for i in range(3) if atoms.pbc[i]]
    if not periodic:
        return
    vectors = cell[periodic]
    # The d-dimensional measure of the periodic lattice (length, area or volume) from the Gram determinant.
    measure = math.sqrt(max(float(np.linalg.det(vectors @ vectors.T)), 0.0))
    if measure <= 1e-12 * max(float(lengths.max()), 1.0) ** len(periodic):
        axes = "".join("abc"[i] for i in periodic)
        raise StructureCheckError(f"cell: the periodic lattice vectors ({axes}) are zero or linearly dependent")
    neighbours = estimated_neighbours_per_atom(len(atoms), measure, len(periodic), limits.cutoff)
    if neighbours > MAX_NEIGHBOURS_PER_ATOM:
        what = {1: f"a {measure:.3g} Å period", 2: f"a {measure:.3g} Å² cell area", 3: f"a {measure:.3g} Å³ cell"}
        raise StructureCheckError(
            f"cell: {len(atoms)} atoms in {what[len(periodic)]} give ~{neighbours:.3g} neighbours per atom within "
            f"{limits.cutoff:g} Å (at most {MAX_NEIGHBOURS_PER_ATOM}); the cell is far too small"
        )


def estimated_neighbours_per_atom(n_atoms: int, measure: float, dimensions: int, cutoff: float) -> float:
    """Atoms of the periodic crystal within `cutoff` of an atom, from the density alone: n_atoms per period
    (`measure`: length, area or volume of the `dimensions`-dimensional lattice) times the length, area or
    volume of the ball of radius `cutoff` (an upper bound for slabs and wires)."""
    ball = {1: 2 * cutoff, 2: math.pi * cutoff**2, 3: 4 / 3 * math.pi * cutoff**3}[dimensions]
    return n_atoms * ball / measure


def _check_electrons(atoms: Atoms, charge: int) -> None:
    n_atoms = len(atoms)
    electrons = int(np.asarray(atoms.numbers, dtype=np.int64).sum()) - charge
    if electrons < 0:
        raise StructureCheckError(
            f"charge {charge} removes more electrons than the structure has ({electrons + charge})"
        )
    if -charge > MAX_EXTRA_ELECTRONS_PER_ATOM * n_atoms:
        raise StructureCheckError(
            f"charge {charge} adds {-charge} electrons to {n_atoms} atom(s); at most "
            f"{MAX_EXTRA_ELECTRONS_PER_ATOM} per atom"
        )
    raw = atoms.info.get(SPIN_KEY)
    if raw is None:
        multiplicity = default_spin_multiplicity(atoms.numbers, charge)
    elif isinstance(raw, bool) or not isinstance(raw, numbers.Integral | np.integer):
        raise StructureCheckError(f"spin_multiplicity must be an integer, got {_short(raw)}")
    else:
        multiplicity = int(raw)
    unpaired = multiplicity - 1
    if multiplicity < 1 or unpaired > electrons or (electrons - unpaired) % 2:
        raise StructureCheckError(
            f"spin_multiplicity {multiplicity} is impossible with {electrons} electrons (charge {charge}); "
            f"{'odd' if electrons % 2 else 'even'} electron counts need an {'even' if electrons % 2 else 'odd'} "
            f"multiplicity between 1 and {electrons + 1}"
        )


def _who(limits: StructureLimits) -> str:
    return f"{limits.owner} " if limits.owner else ""


def _listed(values: list[int]) -> str:
    shown = ", ".join(str(v) for v in values[:5])
    return shown + (f" and {len(values) - 5} more" if len(values) > 5 else "")


def element_names(numbers_: Iterable[int], ranges: bool = False) -> str:
    """Elements as symbols in order of atomic number, for messages: [17, 1, 6] -> "H, C, Cl"; with `ranges`,
    runs of consecutive atomic numbers are shortened: range(1, 87) -> "H-Rn"."""
    values = sorted({int(z) for z in numbers_})
    if not values:
        return "no elements"
    if not ranges:
        return ", ".join(_symbol(z) for z in values)
    parts = []
    start = previous = values[0]
    for value in [*values[1:], None]:
        if value is not None and value == previous + 1:
            previous = value
            continue
        parts.append(_symbol(start) if start == previous else f"{_symbol(start)}-{_symbol(previous)}")
        if value is not None:
            start = previous = value
    return ", ".join(parts)


def _symbol(z: int) -> str:
    return chemical_symbols[z] if 0 < z < len(chemical_symbols) else f"Z={z}"


def _short(value: object, limit: int = 40) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."
