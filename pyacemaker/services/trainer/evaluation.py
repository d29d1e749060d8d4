"""How good a potential is on a dataset: predicted energies, forces and stresses, RMSE/MAE against the
labels (energy per atom and force components), parity data, and the per-structure extrapolation grade γ.

Potentials: ACE as .yace (C-tilde; evaluated with pyace's recursive evaluator, the fast one) or .yaml
(B-basis; needed for γ together with its .asi active set), and MACE model files (one, or a committee whose
mean is used). Energies are totals: a .yace carries its reference energies E0 itself, a .yaml written by
the trainer carries them in its metadata and they are added here.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from ase import Atoms
from ase.calculators.calculator import Calculator, all_changes

from pyacemaker.ace_reference_energies import potential_e0s
from pyacemaker.services.trainer.datasets import energy_of, forces_of

ACE_SUFFIXES = (".yace", ".yaml")
MACE_SUFFIXES = (".model", ".pt")


def _referenced_ace_calculator_class() -> type:
    from pyace import PyACECalculator

    class ReferencedAceCalculator(PyACECalculator):
        """pyace's calculator plus per-element reference energies (a B-basis .yaml has no E0 field)."""

        def __init__(self, basis_set: str, e0s: dict[int, float], **kwargs: Any) -> None:
            super().__init__(basis_set, **kwargs)
            self.e0s = e0s

        def calculate(
            self, atoms=None, properties=("energy", "forces", "stress", "energies"), system_changes=all_changes
        ):
            super().calculate(atoms, properties, system_changes)
            per_atom = np.array([self.e0s.get(int(z), 0.0) for z in self.atoms.numbers])
            self.results["energy"] += float(per_atom.sum())
            self.results["free_energy"] += float(per_atom.sum())
            self.results["energies"] = self.results["energies"] + per_atom

    return ReferencedAceCalculator


def ace_calculator(path: Path, active_set: Path | None = None) -> Calculator:
    """An ASE calculator for an ACE potential file; with `active_set` (.asi, needs the .yaml) it also reports
    the per-atom extrapolation grade in `results["gamma"]`."""
    path = Path(path)
    if path.suffix == ".yace":
        if active_set is not None:
            raise ValueError(f"{path}: γ needs the B-basis .yaml with the active set, not the .yace")
        from pyace import PyACECalculator

        return PyACECalculator(str(path), recursive_evaluator=True, recursive=True)
    if path.suffix == ".yaml":
        calculator = _referenced_ace_calculator_class()(str(path), potential_e0s(path))
        if active_set is not None:
            calculator.set_active_set(str(active_set))
        return calculator
    raise ValueError(f"{path}: not an ACE potential (expected {' or '.join(ACE_SUFFIXES)})")


def mace_calculator(paths: Sequence[Path], dtype: str = "float64", device: str = "cpu") -> Calculator:
    """mace's ASE calculator for one model or a committee (its mean), on a torch device ("cpu" or "cuda", as
    pyacemaker.torch_device resolves it)."""
    from mace.calculators import MACECalculator

    return MACECalculator(model_paths=[str(p) for p in paths], device=device, default_dtype=dtype)


def load_calculator(path: Path, active_set: Path | None = None) -> Calculator:
    path = Path(path)
    if path.suffix in ACE_SUFFIXES:
        return ace_calculator(path, active_set)
    if path.suffix in MACE_SUFFIXES:
        return mace_calculator([path])
    raise ValueError(f"{path}: unknown potential format (expected {', '.join(ACE_SUFFIXES + MACE_SUFFIXES)})")


@dataclass
class Predictions:
    """Per structure: total energy (eV), forces (eV/Å), stress (eV/Å³ Voigt, periodic cells only, else None)
    and the largest per-atom γ (NaN without an active set)."""

    energies: np.ndarray
    forces: list[np.ndarray]
    stresses: list[np.ndarray | None]
    gamma_max: np.ndarray


def predict(calculator: Calculator, frames: Sequence[Atoms]) -> Predictions:
    energies, forces, stresses, gammas = [], [], [], []
    for atoms in frames:
        work = atoms.copy()
        work.calc = calculator
        energies.append(work.get_potential_energy())
        forces.append(np.array(work.get_forces()))
        stresses.append(np.array(work.get_stress()) if work.cell.rank == 3 and all(work.pbc) else None)
        gamma = calculator.results.get("gamma") if getattr(calculator, "is_active_set_configured", False) else None
        gammas.append(float(np.max(gamma)) if gamma is not None and len(gamma) else np.nan)
    return Predictions(np.array(energies), forces, stresses, np.array(gammas))


@dataclass
class ErrorMetrics:
    """Errors against the labels: energy per atom (eV/atom), force components (eV/Å), stress (eV/Å³; NaN
    when no structure has a labelled stress)."""

    n_structures: int
    energy_rmse_per_atom: float
    energy_mae_per_atom: float
    forces_rmse: float
    forces_mae: float
    stress_rmse: float

    def report(self) -> dict[str, float]:
        """The figures in report units: meV/atom, meV/Å, meV/Å³."""
        return {
            "structures_count": float(self.n_structures),
            "energy_rmse_mev_per_atom": 1e3 * self.energy_rmse_per_atom,
            "energy_mae_mev_per_atom": 1e3 * self.energy_mae_per_atom,
            "forces_rmse_mev_per_a": 1e3 * self.forces_rmse,
            "forces_mae_mev_per_a": 1e3 * self.forces_mae,
            "stress_rmse_mev_per_a3": 1e3 * self.stress_rmse,
        }


def error_metrics(frames: Sequence[Atoms], predictions: Predictions) -> ErrorMetrics:
    n_atoms = np.array([len(a) for a in frames])
    energy_error = (predictions.energies - np.array([energy_of(a) for a in frames])) / n_atoms
    force_error = np.concatenate([(p - forces_of(a)).ravel() for a, p in zip(frames, predictions.forces, strict=True)])
    stress_errors = [
        p - np.asarray(a.calc.results["stress"]).ravel()[:6]
        for a, p in zip(frames, predictions.stresses, strict=True)
        if p is not None and a.calc is not None and "stress" in a.calc.results
    ]
    stress_rmse = float(np.sqrt(np.mean(np.concatenate(stress_errors) ** 2))) if stress_errors else float("nan")
    return ErrorMetrics(
        n_structures=len(frames),
        energy_rmse_per_atom=float(np.sqrt(np.mean(energy_error**2))),
        energy_mae_per_atom=float(np.mean(np.abs(energy_error))),
        forces_rmse=float(np.sqrt(np.mean(force_error**2))),
        forces_mae=float(np.mean(np.abs(force_error))),
        stress_rmse=stress_rmse,
    )


def parity_data(frames: Sequence[Atoms], predictions: Predictions) -> dict[str, list[float]]:
    """Reference against predicted values, ready for a parity plot: energy per atom (eV/atom) per structure
    and every force component (eV/Å)."""
    n_atoms = np.array([len(a) for a in frames])
    return {
        "energy_per_atom_reference": (np.array([energy_of(a) for a in frames]) / n_atoms).tolist(),
        "energy_per_atom_predicted": (predictions.energies / n_atoms).tolist(),
        "forces_reference": np.concatenate([forces_of(a).ravel() for a in frames]).tolist(),
        "forces_predicted": np.concatenate([f.ravel() for f in predictions.forces]).tolist(),
        "gamma_max": predictions.gamma_max.tolist(),
    }


@dataclass
class Evaluation:
    predictions: Predictions
    errors: ErrorMetrics
    parity: dict[str, list[float]]


def evaluate_potential(path: Path, frames: Sequence[Atoms], active_set: Path | None = None) -> Evaluation:
    """Predictions, errors and parity data of one potential file on labelled frames."""
    return evaluate_calculator(load_calculator(path, active_set), frames)


def evaluate_calculator(calculator: Calculator, frames: Sequence[Atoms]) -> Evaluation:
    predictions = predict(calculator, frames)
    return Evaluation(predictions, error_metrics(frames, predictions), parity_data(frames, predictions))


def extrapolation_grades(yaml_path: Path, asi_path: Path, frames: Sequence[Atoms]) -> np.ndarray:
    """The largest per-atom γ of each structure: ≤ 1 inside the training data's span, > 1 extrapolating."""
    return predict(ace_calculator(yaml_path, asi_path), frames).gamma_max
