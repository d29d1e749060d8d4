"""An energy profile along a reaction coordinate ξ = d(a, b) − d(b, c): a relaxed scan with one model, then the
same geometries evaluated by every model (DFT, teacher, base and final ACE), so their profiles and barriers
compare point by point.

The scan restrains ξ harmonically (stiff, so ξ ends within a few hundredths of an Å of its target) and relaxes
every other degree of freedom with BFGS. Each point starts from the previous point's geometry, walking outward
from the seed closest to the middle of the range, so the path stays on one connected valley.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
from ase import Atoms, units
from ase.calculators.calculator import Calculator, CalculatorError, all_changes
from ase.optimize import BFGS

from pyacemaker.labels import ForceField
from pyacemaker.restraints import DistanceDifferenceRestraint

# eV → kcal/mol (ASE's CODATA constants: 1 eV ≈ 23.06 kcal/mol).
KCAL_PER_MOL_PER_EV = units.mol / units.kcal
SCAN_FORCE_CONSTANT = 50.0  # eV/Å²
SCAN_FMAX = 0.01  # eV/Å
SCAN_MAX_STEPS = 300


class RestrainedCalculator(Calculator):
    """Energy and forces from a force field (the oracle) plus a harmonic restraint on ξ."""

    implemented_properties = ["energy", "forces"]  # noqa: RUF012  (ASE declares it a plain list)

    def __init__(self, force_field: ForceField, restraint: DistanceDifferenceRestraint) -> None:
        super().__init__()
        self.force_field = force_field
        self.restraint = restraint

    def calculate(self, atoms=None, properties=("energy",), system_changes=all_changes):  # type: ignore[no-untyped-def]
        super().calculate(atoms, properties, system_changes)
        (labels,) = self.force_field([self.atoms])
        if not labels.ok:
            raise CalculatorError(f"the force field failed during the scan: {labels.reason}")
        if labels.energy is None or labels.forces is None:
            raise CalculatorError("the force field returned no energy or forces during the scan")
        bias, bias_forces = self.restraint.energy_and_forces(self.atoms.positions)
        self.results = {"energy": labels.energy + bias, "forces": labels.forces + bias_forces}


def xi_of(atoms: Atoms, indices: tuple[int, int, int]) -> float:
    a, b, c = indices
    p = atoms.positions
    return float(np.linalg.norm(p[a] - p[b]) - np.linalg.norm(p[b] - p[c]))


def relaxed_scan(
    force_field: ForceField,
    seeds: Sequence[Atoms],
    indices: tuple[int, int, int],
    centers: Sequence[float],
    on_point: Callable[[int, int], None] | None = None,
) -> list[Atoms]:
    """One relaxed geometry per ξ₀ in `centers` (same order), carrying the seeds' info (charge, spin)."""
    centers = list(centers)
    middle = 0.5 * (centers[0] + centers[-1])
    start = min(seeds, key=lambda s: abs(xi_of(s, indices) - middle))
    first = int(np.argmin([abs(c - xi_of(start, indices)) for c in centers]))
    # Outward from the point nearest the start: first..end, then first-1..0, each from its neighbour.
    order = [*range(first, len(centers)), *range(first - 1, -1, -1)]
    relaxed: dict[int, Atoms] = {}
    for done, index in enumerate(order, 1):
        neighbour = index - 1 if index > first else index + 1
        atoms = (relaxed[neighbour] if neighbour in relaxed and index != first else start).copy()
        restraint = DistanceDifferenceRestraint(*indices, center=centers[index], force_constant=SCAN_FORCE_CONSTANT)
        atoms.calc = RestrainedCalculator(force_field, restraint)
        BFGS(atoms, logfile=None).run(fmax=SCAN_FMAX, steps=SCAN_MAX_STEPS)
        atoms.calc = None
        relaxed[index] = atoms
        if on_point is not None:
            on_point(done, len(centers))
    return [relaxed[i] for i in range(len(centers))]


def central_barrier_kcal(energies: Sequence[float]) -> float:
    """Highest point of the profile above its lowest (for SN2: the TS above the ion–dipole complex), kcal/mol."""
    values = np.asarray(energies, dtype=float)
    return float((values.max() - values.min()) * KCAL_PER_MOL_PER_EV)
