"""A linear fit as pacemaker reads it: the fit's training data as a pacemaker dataset (`train.pckl.gzip`) and an
`input.yaml` with which `pacemaker input.yaml` fits the same linear ACE again.

What carries over exactly:
- the basis: the `potential` section is the specification the fit built its basis from (elements, radial basis
  and cutoff, linear embedding, `number_of_functions_per_element` and the function tables) plus, per element
  pair, the inner cutoff and core repulsion; pyace builds the identical B-basis from it;
- the reference energies E0 (`data: reference_energy`), so `energy_corrected` = E − Σ E0 as in the fit;
- the weighting: `w_energy` / `w_forces` columns that make pacemaker's loss the fit's own (each block a mean
  over its energies per atom and its force components; for the delta fit the DFT block weight 1 and the anchor
  block ω); the force share s of the fit becomes pacemaker's kappa = (s/3) / ((1 − s) + s/3), because
  pacemaker sums the three components of an atom's force error where the fit averages components;
- only the basis coefficients are trained (`trainable_parameters: func`), so the problem stays linear (a convex
  quadratic that BFGS solves).

What cannot carry over: the fit's ridge penalises every coefficient by its own column scale (λ Σ s_j² c_j²);
pacemaker's `L2_coeffs` is one weight for all. The input uses λ · median(s_j²) in pacemaker's units, so the
regularisation has the right size but not the same shape. The delta fit's ridge acts on the correction δ to the
base; pacemaker's acts on the coefficients themselves. And the fit picks λ (and ω) by cross-validation over whole
trajectories; pacemaker takes them as given. Nor does the stress term (`stress_weight`, periodic frames):
pacemaker's linear fit has no stress loss, so the input reproduces the fit as it would be without stress rows.

The delta fit's anchor frames are written with the labels the fit gave them: the base potential's own
predictions (core repulsion included), on the final reference energies.

The files are an export for pacemaker users (datasets at rest stay extxyz): pandas pickles are tied to pandas
versions, so the frame is built from plain columns (object column index, float arrays) to stay readable by the
pandas 2 that pacemaker's TensorFlow backend needs.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import yaml
from ase import Atoms
from ase.data import chemical_symbols

from pyacemaker.services.trainer.datasets import energy_of, forces_of, reference_energy

# Where a fit writes the export, and its files.
EXPORT_DIR = "pacemaker"
DATASET_FILE = "train.pckl.gzip"
INPUT_FILE = "input.yaml"
# Metadata key of a linear fit's potential section (JSON) in its B-basis .yaml, so a later fit (delta learning on
# this base) can write the same section.
SECTION_METADATA_KEY = "pyacemaker_pacemaker_potential"
# BFGS iterations pacemaker may take: a linear problem of a few thousand coefficients converges well within.
MAX_ITERATIONS = 2000


def pacemaker_kappa(forces_share: float) -> float:
    """pacemaker's kappa for a fit whose loss is (1 − s)·MSE(energy per atom) + s·MSE(force components)."""
    per_atom = forces_share / 3.0
    return per_atom / ((1.0 - forces_share) + per_atom)


def loss_scale(forces_share: float) -> float:
    """pacemaker's data loss (uniform weights) divided by the fit's: 1 / ((1 − s) + s/3)."""
    return 1.0 / ((1.0 - forces_share) + forces_share / 3.0)


def equivalent_l2(
    lam: float, penalty_scale_sq: np.ndarray, forces_share: float, block_weight_sum: float = 1.0
) -> float:
    """pacemaker's L2_coeffs for the fit's ridge λ Σ s_j² c_j²: λ times the median s_j², in pacemaker's loss units
    (its weights sum to one over all blocks, the fit's to `block_weight_sum`)."""
    return float(lam * np.median(penalty_scale_sq) * loss_scale(forces_share) / block_weight_sum)


def section_of(yaml_path: Path) -> dict[str, Any] | None:
    """The potential section a linear fit recorded in its .yaml, or None (a potential from elsewhere)."""
    from pyace import BBasisConfiguration

    metadata = BBasisConfiguration(str(yaml_path)).metadata
    return json.loads(metadata[SECTION_METADATA_KEY]) if SECTION_METADATA_KEY in metadata else None


def fit_input(
    section: dict[str, Any], e0s: dict[int, float], forces_share: float, l2: float, seed: int
) -> dict[str, Any]:
    """The input.yaml (as a dict) that fits the section's basis, coefficients only, on the exported dataset."""
    cutoff = max(float(bond["rcut"]) for bond in section["bonds"].values() if "rcut" in bond)
    return {
        "seed": int(seed),
        "cutoff": cutoff,
        "metadata": {"origin": "pyacemaker: the linear ACE fit, for pacemaker"},
        "potential": section,
        "data": {
            "filename": DATASET_FILE,
            "reference_energy": {chemical_symbols[z]: float(e) for z, e in sorted(e0s.items())},
        },
        "fit": {
            "loss": {"kappa": pacemaker_kappa(forces_share), "L1_coeffs": 0.0, "L2_coeffs": l2},
            "trainable_parameters": "func",
            "optimizer": "BFGS",
            "maxiter": MAX_ITERATIONS,
        },
        # pyace's own evaluator: a linear fit needs no TensorFlow.
        "backend": {"evaluator": "pyace", "parallel_mode": "serial", "display_step": 50},
    }


def block_weights(blocks: Sequence[tuple[Sequence[Atoms], float]]) -> tuple[list[float], list[np.ndarray]]:
    """Per-structure energy weights and per-atom force weights such that each block (frames, weight) contributes
    its weight times the mean over its structures (energies) and over its atoms (forces)."""
    energy: list[float] = []
    forces: list[np.ndarray] = []
    for frames, weight in blocks:
        n_atoms = sum(len(atoms) for atoms in frames)
        for atoms in frames:
            energy.append(weight / len(frames))
            forces.append(np.full(len(atoms), weight / n_atoms))
    return energy, forces


def write_dataset(
    frames: Sequence[Atoms],
    e0s: dict[int, float],
    path: Path,
    energy_weights: Sequence[float] | None = None,
    forces_weights: Sequence[np.ndarray] | None = None,
) -> Path:
    """The pandas pickle pacemaker reads: ase_atoms, energy, energy_corrected (E − Σ E0), forces and, when given,
    w_energy (per structure) and w_forces (per atom); pacemaker normalises each weight column to sum one."""
    import pandas as pd

    table: dict[str, list[Any]] = {
        "ase_atoms": [atoms.copy() for atoms in frames],
        "energy": [energy_of(atoms) for atoms in frames],
        "energy_corrected": [energy_of(atoms) - reference_energy(atoms, e0s) for atoms in frames],
        "forces": [forces_of(atoms) for atoms in frames],
    }
    if energy_weights is not None:
        table["w_energy"] = [float(w) for w in energy_weights]
    if forces_weights is not None:
        table["w_forces"] = [np.asarray(w, dtype=np.float64) for w in forces_weights]
    frame = pd.DataFrame(table)
    frame.columns = pd.Index(list(frame.columns), dtype=object)
    path.parent.mkdir(parents=True, exist_ok=True)
    # No time stamp in the gzip header: the same fit writes the same bytes (the artifact store deduplicates them).
    frame.to_pickle(path, compression={"method": "gzip", "mtime": 0})
    return path


def write_export(
    out_dir: Path,
    frames: Sequence[Atoms],
    e0s: dict[int, float],
    config: dict[str, Any],
    energy_weights: Sequence[float],
    forces_weights: Sequence[np.ndarray],
) -> tuple[Path, Path]:
    """Write out_dir/pacemaker/train.pckl.gzip and input.yaml; returns their paths."""
    directory = out_dir / EXPORT_DIR
    dataset = write_dataset(frames, e0s, directory / DATASET_FILE, energy_weights, forces_weights)
    text = yaml.safe_dump(config, sort_keys=False)
    (directory / INPUT_FILE).write_text(
        "# Fits the same linear ACE with pacemaker: `pacemaker input.yaml` in this directory (pyace backend, no\n"
        "# TensorFlow). See docs/outputs.md for what carries over exactly and what does not.\n" + text
    )
    return dataset, directory / INPUT_FILE
