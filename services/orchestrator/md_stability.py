"""MD stability of a potential: short MD runs from every seed at each temperature, and which of them survive.

A run survives when no atom pair comes closer than a minimum distance (a collapse), no atom drifts farther from
its nearest neighbour than a bound (a fragment flying apart, into a region the potential has never seen) and
every energy stays finite. The checks are plain functions of the frames, so the pipeline (MD through the
sampler and oracle) and the benchmark (ASE MD in one process) judge a trajectory the same way.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from ase import Atoms
from ase.geometry import get_distances


def nearest_neighbour_distances(atoms: Atoms) -> np.ndarray:
    """Per atom, the distance to its nearest other atom (minimum image in periodic cells), Å."""
    if len(atoms) < 2:
        return np.zeros(len(atoms))
    _, distances = get_distances(atoms.positions, cell=atoms.cell, pbc=atoms.pbc)
    np.fill_diagonal(distances, np.inf)
    return np.asarray(distances.min(axis=1))


def frame_problem(atoms: Atoms, energy: float, min_distance: float, max_neighbour_distance: float) -> str | None:
    """Why this frame shows an unstable run, or None when it does not."""
    if not np.isfinite(energy):
        return f"energy {energy} is not finite"
    nearest = nearest_neighbour_distances(atoms)
    if len(nearest) == 0:
        return None
    if nearest.min() < min_distance:
        return f"two atoms came within {nearest.min():.3f} Å (below {min_distance} Å)"
    if nearest.max() > max_neighbour_distance:
        return (
            f"atom {int(nearest.argmax())} drifted {nearest.max():.2f} Å from its nearest neighbour "
            f"(beyond {max_neighbour_distance} Å)"
        )
    return None


@dataclass
class StabilityRun:
    seed: int
    temperature_k: float
    steps_done: int
    problem: str | None = None

    @property
    def survived(self) -> bool:
        return self.problem is None

    def as_dict(self) -> dict[str, object]:
        return {
            "seed": self.seed,
            "temperature_k": self.temperature_k,
            "steps_done": self.steps_done,
            "survived": self.survived,
            "problem": self.problem,
        }


def stability_summary(runs: Sequence[StabilityRun], steps: int, timestep_fs: float) -> dict[str, object]:
    """The record of a stability test: survivors of runs, per temperature, and every run."""
    temperatures = sorted({run.temperature_k for run in runs})
    return {
        "steps": steps,
        "timestep_fs": timestep_fs,
        "n_runs": len(runs),
        "n_survivors": sum(run.survived for run in runs),
        "survivors_by_temperature": {
            f"{t:g}": [sum(r.survived for r in runs if r.temperature_k == t), sum(r.temperature_k == t for r in runs)]
            for t in temperatures
        },
        "runs": [run.as_dict() for run in runs],
    }
