"""Independent references for every backend's forces and stress: central finite differences of its energy."""

from __future__ import annotations

import itertools
from collections.abc import Callable

import numpy as np
from ase import Atoms

EnergyFunction = Callable[[Atoms], float]
# Voigt order (xx, yy, zz, yz, xz, xy) as (row, column) of the strain tensor.
VOIGT_PAIRS = ((0, 0), (1, 1), (2, 2), (1, 2), (0, 2), (0, 1))


def numerical_forces(energy: EnergyFunction, atoms: Atoms, step: float) -> np.ndarray:
    """−∂E/∂r by central differences, eV/Å."""
    forces = np.zeros((len(atoms), 3))
    for atom, axis in itertools.product(range(len(atoms)), range(3)):
        plus, minus = atoms.copy(), atoms.copy()
        plus.positions[atom, axis] += step
        minus.positions[atom, axis] -= step
        forces[atom, axis] = -(energy(plus) - energy(minus)) / (2 * step)
    return forces


def numerical_stress(energy: EnergyFunction, atoms: Atoms, step: float) -> np.ndarray:
    """(1/V) ∂E/∂ε by central differences of a symmetric strain, Voigt order, eV/Å³ (ASE's sign convention)."""
    stress = np.zeros(6)
    for voigt, (a, b) in enumerate(VOIGT_PAIRS):
        strain = np.zeros((3, 3))
        strain[a, b] = strain[b, a] = step if a == b else step / 2
        energies = []
        for sign in (1, -1):
            strained = atoms.copy()
            strained.set_cell(np.asarray(atoms.cell) @ (np.eye(3) + sign * strain), scale_atoms=True)
            energies.append(energy(strained))
        stress[voigt] = (energies[0] - energies[1]) / (2 * step * atoms.get_volume())
    return stress
