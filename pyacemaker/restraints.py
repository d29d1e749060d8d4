"""Harmonic restraint on the distance difference ξ = d(a, b) − d(b, c), the SN2 reaction coordinate.

E = ½ k (ξ − ξ₀)² in eV with k in eV/Å² and ξ, ξ₀ in Å. The bias acts only inside the sampler's MD: it is added
to the oracle's forces to move the dynamics, and never enters the labels of the frames it saves.

Distances are taken between the atoms' Cartesian positions as they are (the MD never wraps positions back into
the cell, so ξ stays continuous along a trajectory).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class DistanceDifferenceRestraint:
    atom_a: int
    atom_b: int
    atom_c: int
    # Window centre ξ₀, Å.
    center: float
    # k, eV/Å².
    force_constant: float

    def check(self, n_atoms: int) -> None:
        """ValueError when the indices do not name three distinct atoms of a structure with n_atoms atoms."""
        indices = (self.atom_a, self.atom_b, self.atom_c)
        if len(set(indices)) != 3:
            raise ValueError(f"restraint atoms a, b, c must be distinct, got {list(indices)}")
        if min(indices) < 0 or max(indices) >= n_atoms:
            raise ValueError(f"restraint atoms {list(indices)} are out of range for a structure of {n_atoms} atoms")
        if self.force_constant <= 0:
            raise ValueError(f"restraint force_constant must be positive (eV/Å²), got {self.force_constant}")

    def value(self, positions: np.ndarray) -> float:
        """ξ = d(a, b) − d(b, c), Å."""
        return float(
            np.linalg.norm(positions[self.atom_a] - positions[self.atom_b])
            - np.linalg.norm(positions[self.atom_b] - positions[self.atom_c])
        )

    def energy_and_forces(self, positions: np.ndarray) -> tuple[float, np.ndarray]:
        """Bias energy (eV) and its forces −∂E/∂r (eV/Å, shape of `positions`; zero except on a, b, c)."""
        a, b, c = self.atom_a, self.atom_b, self.atom_c
        ab = positions[a] - positions[b]
        bc = positions[b] - positions[c]
        d_ab, d_bc = np.linalg.norm(ab), np.linalg.norm(bc)
        deviation = (d_ab - d_bc) - self.center
        # ∂ξ/∂r_a = û_ab, ∂ξ/∂r_c = û_bc, ∂ξ/∂r_b = −û_ab − û_bc (unit vectors û_ab = (r_a − r_b)/d_ab, ...).
        u_ab, u_bc = ab / d_ab, bc / d_bc
        forces = np.zeros_like(positions, dtype=np.float64)
        scale = -self.force_constant * deviation
        forces[a] = scale * u_ab
        forces[b] = scale * (-u_ab - u_bc)
        forces[c] = scale * u_bc
        return float(0.5 * self.force_constant * deviation**2), forces
