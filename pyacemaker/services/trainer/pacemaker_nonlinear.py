"""Nonlinear ACE through the `pacemaker` CLI: the optional extra that needs TensorFlow.

Not installed by default (2 GB, and it pins numpy < 2.4 and pandas < 3 for the whole environment), so every
entry point first checks for it and fails with a message that names what to install. With the extra
present: the labelled frames become the pandas pickles pacemaker reads (transient inputs inside the job's
work dir; datasets at rest stay extxyz), the input YAML is written from the same inferred cutoff and basis
size as the linear fit, `pacemaker input.yaml` fits (or `pacemaker input.yaml -p base.yaml` fine-tunes a base
for delta learning, with per-structure weights: DFT high, surrogate low), and the result is finished like
a linear fit: .yaml and .yace with the E0s recorded, and an active set.
"""

from __future__ import annotations

import importlib.util
import shutil
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import yaml
from ase import Atoms
from ase.data import chemical_symbols

from pyacemaker.ace_reference_energies import potential_e0s
from pyacemaker.rpc import WrongStateError
from pyacemaker.services.trainer import linear_ace
from pyacemaker.services.trainer.ace_fit import (
    FUNCTION_ORDERS,
    AceFitResult,
    infer_cutoff,
    infer_functions_per_element,
)
from pyacemaker.services.trainer.datasets import (
    elements_of,
    energy_of,
    fitted_reference_energies,
)
from pyacemaker.services.trainer.pacemaker_export import write_dataset
from pyacemaker.services.trainer.progress import ProgressWriter

# What the extra needs; pins tested on these machines.
TENSORFLOW_EXTRA_INSTALL = (
    'pip install "numpy>=2,<2.4" "pandas>=2,<3" "tensorflow-cpu==2.20.*" matscipy sympy "pyyaml>=6.0.2" tqdm '
    'requests "questionary>=2.0" "rich>=13.0" && pip install --no-deps tensorpotential==0.6.2.1 tf_keras==2.20.1'
)
MAX_ITERATIONS = 300
# Per-structure weight of a DFT row relative to a surrogate row in a nonlinear fine-tune when not given.
DEFAULT_SURROGATE_WEIGHT = 0.1


def tensorflow_missing() -> str | None:
    """Which part of the nonlinear extra is missing, or None when pacemaker can fit."""
    missing = [name for name in ("tensorflow", "tensorpotential") if importlib.util.find_spec(name) is None]
    if shutil.which("pacemaker") is None and not (Path(sys.executable).parent / "pacemaker").exists():
        missing.append("the pacemaker command (python-ace)")
    return ", ".join(missing) or None


def require_tensorflow() -> None:
    missing = tensorflow_missing()
    if missing:
        raise WrongStateError(
            f"nonlinear ACE (pacemaker) needs the optional TensorFlow extra, which is not installed here "
            f"(missing: {missing}); the default linear ACE needs none of it. To add the extra (it pins numpy<2.4 "
            f"and pandas<3 for the whole environment): {TENSORFLOW_EXTRA_INSTALL}"
        )


def pacemaker_input(
    elements: Sequence[str],
    cutoff: float,
    functions_per_element: int,
    train_file: Path,
    test_file: Path | None,
    seed: int,
    max_iterations: int = MAX_ITERATIONS,
    forces_share: float = linear_ace.DEFAULT_FORCES_SHARE,
) -> dict[str, Any]:
    """The pacemaker input (as a dict for YAML): two densities with the Finnis-Sinclair square-root embedding
    (the nonlinear model), the same radial basis and function tables as the linear fit, BFGS. The data
    carry `energy_corrected` (E − Σ E0) already, so no reference_energy is set."""
    data: dict[str, Any] = {"filename": str(train_file)}
    if test_file is not None:
        data["test_filename"] = str(test_file)
    return {
        "seed": int(seed),
        "cutoff": float(cutoff),
        "metadata": {"origin": "pyacemaker trainer"},
        "potential": {
            "deltaSplineBins": 0.001,
            "elements": list(elements),
            "embeddings": {
                "ALL": {"npot": "FinnisSinclairShiftedScaled", "fs_parameters": [1, 1, 1, 0.5], "ndensity": 2}
            },
            "bonds": {
                "ALL": {
                    "radbase": "SBessel",
                    "radparameters": [5.25],
                    "rcut": float(cutoff),
                    "dcut": 0.01,
                    "NameOfCutoffFunction": "cos",
                }
            },
            "functions": {"number_of_functions_per_element": int(functions_per_element), **FUNCTION_ORDERS},
        },
        "data": data,
        "fit": {
            "loss": {"kappa": float(forces_share), "L1_coeffs": 1e-8, "L2_coeffs": 1e-8},
            "optimizer": "BFGS",
            "maxiter": int(max_iterations),
            "repulsion": "auto",
        },
        "backend": {"evaluator": "tensorpot", "batch_size": 100, "display_step": 50},
    }


def write_dataset_pickle(
    frames: Sequence[Atoms], e0s: dict[int, float], path: Path, weights: Sequence[float] | None = None
) -> Path:
    """The pandas pickle pacemaker reads (`pacemaker_export.write_dataset`); for a weighted fine-tune, each
    structure's weight on its energy and, spread over its atoms, on its forces."""
    if weights is None:
        return write_dataset(frames, e0s, path)
    normalised = np.asarray(weights, dtype=np.float64) / np.sum(weights)
    forces = [np.full(len(a), w / len(a)) for a, w in zip(frames, normalised, strict=True)]
    return write_dataset(frames, e0s, path, list(normalised), forces)


def pacemaker_command(input_yaml: Path, initial_potential: Path | None = None) -> list[str]:
    """`pacemaker input.yaml` (fit) or `pacemaker input.yaml -p base.yaml` (fine-tune from the base; not
    `-ip`, which grows the basis)."""
    executable = shutil.which("pacemaker") or str(Path(sys.executable).parent / "pacemaker")
    command = [executable, str(input_yaml)]
    if initial_potential is not None:
        command += ["-p", str(initial_potential)]
    return command


def _run_pacemaker(
    input_yaml: Path, work_dir: Path, initial_potential: Path | None, progress: ProgressWriter | None
) -> Path:
    require_tensorflow()
    if progress is not None:
        progress.stage("pacemaker", message=" ".join(pacemaker_command(input_yaml, initial_potential)))
    with open(work_dir / "pacemaker.log", "ab") as log_handle:
        subprocess.run(
            pacemaker_command(input_yaml, initial_potential),
            cwd=work_dir,
            stdout=log_handle,
            stderr=subprocess.STDOUT,
            check=True,
        )
    return work_dir / "output_potential.yaml"


def _finish(
    fitted_yaml: Path, e0s: dict[int, float], frames: Sequence[Atoms], out_dir: Path, stem: str
) -> tuple[Path, Path, Path]:
    basis = linear_ace.load_basis(fitted_yaml)
    paths = (out_dir / f"{stem}.yaml", out_dir / f"{stem}.yace", out_dir / f"{stem}.asi")
    linear_ace.write_potential_files(basis, e0s, paths[0], paths[1])
    linear_ace.write_active_set(paths[0], frames, paths[2])
    return paths


def fit_nonlinear_ace(
    frames: Sequence[Atoms],
    out_dir: Path,
    e0s: dict[int, float] | None,
    cutoff: float,
    functions_per_element: int,
    seed: int,
    validation: Sequence[Atoms],
    progress: ProgressWriter | None = None,
) -> AceFitResult:
    require_tensorflow()
    elements = elements_of(frames)
    references = e0s or fitted_reference_energies(frames, np.array([energy_of(a) for a in frames]), elements)
    cutoff = cutoff or infer_cutoff(elements)
    functions_per_element = functions_per_element or infer_functions_per_element(frames, elements)
    work = out_dir / "pacemaker"
    work.mkdir(parents=True, exist_ok=True)
    train = write_dataset_pickle(frames, references, work / "train.pckl.gzip")
    test = write_dataset_pickle(validation, references, work / "test.pckl.gzip") if validation else None
    config = pacemaker_input(elements, cutoff, functions_per_element, train, test, seed)
    (work / "input.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
    fitted = _run_pacemaker(work / "input.yaml", work, None, progress)
    paths = _finish(fitted, references, frames, out_dir, "base")
    return AceFitResult(*paths, metrics={"structures_count": float(len(frames)), "cutoff_a": cutoff})


def finetune_nonlinear_ace(
    base_yaml: Path,
    dft_frames: Sequence[Atoms],
    surrogate_frames: Sequence[Atoms],
    out_dir: Path,
    surrogate_weight: float,
    seed: int,
    progress: ProgressWriter | None = None,
) -> AceFitResult:
    """pacemaker fine-tune from the base: DFT rows weight 1, surrogate rows (labelled by the base's own
    level) `surrogate_weight`."""
    require_tensorflow()
    base_e0s = potential_e0s(base_yaml)
    basis = linear_ace.load_basis(base_yaml)
    elements = list(basis.elements_name)
    weight = surrogate_weight or DEFAULT_SURROGATE_WEIGHT
    labelled_surrogate = [a for a in surrogate_frames if a.calc is not None and "energy" in a.calc.results]
    frames = [*dft_frames, *labelled_surrogate]
    weights = [1.0] * len(dft_frames) + [weight] * len(labelled_surrogate)
    work = out_dir / "pacemaker"
    work.mkdir(parents=True, exist_ok=True)
    references = base_e0s or {chemical_symbols.index(s): 0.0 for s in elements}
    train = write_dataset_pickle(frames, references, work / "train.pckl.gzip", weights)
    config = pacemaker_input(elements, float(basis.cutoffmax), 0, train, None, seed)
    config["potential"] = str(base_yaml)  # start from the base (also given as -p, which overrides the section)
    (work / "input.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
    fitted = _run_pacemaker(work / "input.yaml", work, base_yaml, progress)
    paths = _finish(fitted, references, frames, out_dir, "final")
    return AceFitResult(*paths, metrics={"dft_structures_count": float(len(dft_frames))})
