"""Build the bundled teacher: generate C/H/Cl structures, label them with GFN2-xTB, train a small MACE (on the
CPU unless `--device` says otherwise), and write the model plus its metrics next to this package (`make teacher`).

    OMP_NUM_THREADS=1 .venv/bin/python -m pyacemaker.teacher.build [--work-dir build/teacher] [--device cpu]

Reproducible: the geometries come from a fixed numpy seed, xTB is deterministic, and mace trains with a fixed
seed on one CPU thread (`--device auto` or `cuda` trains and checks on a GPU instead: faster, not
bit-identical). The intermediate files (labelled extxyz, mace logs) go to `--work-dir`; only the model (< 1 MB)
and the metrics JSON are meant to be committed.

Reference energies: E0s are GFN2-xTB isolated *neutral* atoms in their ground-state multiplicities (H doublet,
C triplet, Cl doublet), the same references a DFT oracle uses. For the charge −1 structures, E − ΣE0 then
contains the energy of the extra electron; the set includes an isolated Cl⁻ and Cl⁻ beyond the cutoff of
CH3Cl so the teacher learns that asymptote, and the metrics record E(Cl⁻) − E(Cl) so downstream fine-tuning
can keep the reference consistent (the teacher's `atomic_energies_fn` holds these E0s).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from ase import Atoms, units
from ase.optimize import BFGS

from pyacemaker.config import XtbOracleConfig
from pyacemaker.rpc import WrongStateError
from pyacemaker.structures import CHARGE_KEY, SPIN_KEY, write_extxyz
from pyacemaker.teacher.dataset import GROUP_KEY, INDEX_C, INDEX_CL2, sn2_seeds, training_structures
from pyacemaker.teacher.recipe import MACE_SETTINGS, split_frames
from pyacemaker.teacher.resolve import BUNDLED_METRICS, BUNDLED_MODEL
from pyacemaker.torch_device import DEVICE_SETTINGS, resolve_device

log = logging.getLogger(__name__)

REPO_ROOT = Path(__file__).resolve().parents[2]
SEED_DIR = REPO_ROOT / "examples" / "sn2" / "seeds"
# Ground-state multiplicities of the isolated neutral atoms (the E0 references).
ATOM_MULTIPLICITY = {"H": 2, "C": 3, "Cl": 2}
EV_PER_KCAL_MOL = units.kcal / units.mol  # ASE's CODATA constants: ≈ 0.04336 eV
RANDOM_SEED = 0
TEST_FRACTION = 0.1
VALID_FRACTION = 0.1
MAX_MODEL_BYTES = 1_000_000
# Labelled structures with a larger force component are dropped: they come from rattles that pushed two atoms
# together (MD of these molecules up to ~1000 K stays well below), and a few of them in the validation set made
# the validation loss, which picks mace's checkpoint, rise while the training loss fell.
MAX_FORCE_EV_PER_A = 10.0


def xtb_backend() -> Any:
    """The oracle's own GFN2-xTB backend, so the teacher's labels are exactly the xtb oracle's. The one import of a
    service from the core, allowed by name in the import contract (pyproject.toml): this build script runs alone,
    never inside a service."""
    from pyacemaker.services.oracle.backends.xtb import XtbBackend

    return XtbBackend(XtbOracleConfig(backend="xtb", method="GFN2-xTB"))


def relax_with_xtb(atoms: Atoms, fmax: float = 0.01) -> Atoms:
    """The xTB minimum nearest to `atoms` (charge and multiplicity from its info)."""
    work = atoms.copy()
    work.calc = xtb_backend().calculator(work)
    BFGS(work, logfile=None).run(fmax=fmax, steps=300)
    relaxed = atoms.copy()
    relaxed.positions = work.positions
    return relaxed


def isolated_atom_energies() -> dict[int, float]:
    """E0 per atomic number: GFN2-xTB energy of the neutral atom in its ground-state multiplicity, eV."""
    backend = xtb_backend()
    energies = {}
    for symbol, multiplicity in ATOM_MULTIPLICITY.items():
        atom = Atoms(symbol)
        atom.info.update({CHARGE_KEY: 0, SPIN_KEY: multiplicity})
        energies[int(atom.numbers[0])] = backend.label(atom).required_energy()
    return energies


def label_with_xtb(frames: Sequence[Atoms]) -> list[Atoms]:
    """Frames with REF_energy / REF_forces (mace's default keys). Failed calculations and structures with a
    force component above MAX_FORCE_EV_PER_A are dropped with a log line."""
    labelled = []
    for atoms, labels in zip(frames, xtb_backend().label_batch(frames), strict=True):
        group = atoms.info.get(GROUP_KEY)
        if labels.energy is None or labels.forces is None:
            log.info("dropping a %s structure: %s", group, labels.reason)
            continue
        forces = labels.forces.copy()
        if np.abs(forces).max(initial=0.0) > MAX_FORCE_EV_PER_A:
            log.info("dropping a %s structure: force component %.0f eV/Å", group, np.abs(forces).max())
            continue
        copy = atoms.copy()
        copy.info["REF_energy"] = labels.energy
        copy.arrays["REF_forces"] = forces
        labelled.append(copy)
    return labelled


def train_mace(
    work_dir: Path,
    e0s: dict[int, float],
    name: str,
    settings: dict[str, str | int | float] = MACE_SETTINGS,
    device: str = "cpu",
) -> Path:
    """Run mace's own training entry point on work_dir's train/valid/test.extxyz (REF_energy, REF_forces) with
    `settings` (mace's command-line options; default: the bundled teacher's) on the torch `device` ("cpu" or
    "cuda"); returns the stage-two (SWA) model it writes."""
    args = [
        sys.executable,
        "-m",
        "mace.cli.run_train",
        f"--name={name}",
        f"--train_file={work_dir / 'train.extxyz'}",
        f"--valid_file={work_dir / 'valid.extxyz'}",
        f"--test_file={work_dir / 'test.extxyz'}",
        f"--E0s={ {int(z): float(e) for z, e in e0s.items()}!r}",  # a Python dict literal, as mace parses it
        "--energy_key=REF_energy",
        "--forces_key=REF_forces",
        f"--device={device}",
        "--amsgrad",
        "--ema",
        "--swa",
        "--save_cpu",
        "--error_table=PerAtomRMSE",
        f"--model_dir={work_dir}",
        f"--log_dir={work_dir / 'logs'}",
        f"--checkpoints_dir={work_dir / 'checkpoints'}",
        f"--results_dir={work_dir / 'results'}",
    ] + [f"--{key}={value}" for key, value in settings.items()]
    shutil.rmtree(work_dir / "checkpoints", ignore_errors=True)  # a stale checkpoint would be resumed
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    log.info("training: %s", " ".join(args[3:]))
    with open(work_dir / "train.log", "w") as output:
        subprocess.run(args, check=True, env=env, stdout=output, stderr=subprocess.STDOUT)
    return work_dir / f"{name}_stagetwo.model"


def rmse_metrics(model_path: Path, frames: Sequence[Atoms], device: str = "cpu") -> dict[str, float]:
    """Energy RMSE per atom (meV/atom) and force-component RMSE (meV/Å) against the xTB labels."""
    from mace.calculators import MACECalculator

    calc = MACECalculator(model_paths=str(model_path), device=device, default_dtype="float64")
    energy_errors, force_errors = [], []
    for atoms in frames:
        work = atoms.copy()
        work.calc = calc
        energy_errors.append((work.get_potential_energy() - atoms.info["REF_energy"]) / len(atoms))
        force_errors.append((work.get_forces() - atoms.arrays["REF_forces"]).ravel())
    return {
        "n_structures": len(frames),
        "energy_rmse_mev_per_atom": 1000 * float(np.sqrt(np.mean(np.square(energy_errors)))),
        "force_rmse_mev_per_a": 1000 * float(np.sqrt(np.mean(np.square(np.concatenate(force_errors))))),
    }


def sn2_energetics(model_path: Path, device: str = "cpu") -> dict[str, float]:
    """Central barrier (TS − reactant complex) and the barrier from separated reactants (TS − [CH3Cl + Cl⁻ at
    20 Å]) at xTB and from the teacher, on the example's seed geometries; kcal/mol."""
    from mace.calculators import MACECalculator

    seeds = sn2_seeds(SEED_DIR)
    reactant = seeds["reactant_complex"]
    separated = reactant.copy()
    axis = separated.positions[INDEX_CL2] - separated.positions[INDEX_C]
    separated.positions[INDEX_CL2] = separated.positions[INDEX_C] + 20.0 * axis / np.linalg.norm(axis)
    geometries = {"reactant": reactant, "ts": seeds["transition_state"], "separated": separated}
    calc = MACECalculator(model_paths=str(model_path), device=device, default_dtype="float64")
    backend = xtb_backend()
    energies: dict[str, dict[str, float]] = {"xtb": {}, "teacher": {}}
    for key, atoms in geometries.items():
        atoms.info.update({CHARGE_KEY: -1, SPIN_KEY: 1})
        energies["xtb"][key] = backend.label(atoms).required_energy()
        work = atoms.copy()
        work.calc = calc
        energies["teacher"][key] = float(work.get_potential_energy())
    result = {}
    for level, values in energies.items():
        result[f"{level}_central_barrier_kcal_per_mol"] = (values["ts"] - values["reactant"]) / EV_PER_KCAL_MOL
        result[f"{level}_barrier_from_separated_kcal_per_mol"] = (values["ts"] - values["separated"]) / EV_PER_KCAL_MOL
    return result


def sha256_of(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def build(
    work_dir: Path, model_out: Path = BUNDLED_MODEL, metrics_out: Path = BUNDLED_METRICS, device: str = "cpu"
) -> dict:
    """The whole recipe, training and checking on the torch `device` ("cpu" or "cuda"); returns the metrics it
    writes."""
    import mace
    import torch

    work_dir.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    frames = training_structures(SEED_DIR, relax_with_xtb, RANDOM_SEED)
    labelled = label_with_xtb(frames)
    sets = split_frames(labelled, np.random.default_rng(RANDOM_SEED + 1), VALID_FRACTION, TEST_FRACTION)
    for name, subset in sets.items():
        write_extxyz(work_dir / f"{name}.extxyz", subset)
    e0s = isolated_atom_energies()
    labelling_s = time.perf_counter() - started
    log.info("%d structures labelled in %.0f s (%s)", len(labelled), labelling_s, {k: len(v) for k, v in sets.items()})

    started = time.perf_counter()
    trained = train_mace(work_dir, e0s, "teacher", device=device)
    training_s = time.perf_counter() - started
    size = trained.stat().st_size
    if size >= MAX_MODEL_BYTES:
        raise RuntimeError(f"{trained} is {size} bytes; the bundled teacher must stay under {MAX_MODEL_BYTES}")
    model_out.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(trained, model_out)

    chloride = Atoms("Cl")
    chloride.info.update({CHARGE_KEY: -1, SPIN_KEY: 1})
    chloride_energy = xtb_backend().label(chloride).required_energy()
    groups: dict[str, int] = {}
    for atoms in labelled:
        groups[atoms.info[GROUP_KEY]] = groups.get(atoms.info[GROUP_KEY], 0) + 1
    metrics = {
        "model_file": model_out.name,
        "model_sha256": sha256_of(model_out),
        "model_bytes": size,
        "level_of_theory": "xtb:GFN2-xTB",
        "elements": ["H", "C", "Cl"],
        "charges": [0, -1],
        "e0s_ev": {str(z): e for z, e in sorted(e0s.items())},
        "e0_multiplicities": ATOM_MULTIPLICITY,
        "xtb_chloride_minus_chlorine_atom_ev": chloride_energy - e0s[17],
        "mace_settings": MACE_SETTINGS,
        "random_seed": RANDOM_SEED,
        "n_structures": {name: len(subset) for name, subset in sets.items()},
        "structure_groups": dict(sorted(groups.items())),
        **{name: rmse_metrics(model_out, subset, device) for name, subset in sets.items()},
        "sn2": sn2_energetics(model_out, device),
        "labelling_wall_s": round(labelling_s, 1),
        "training_wall_s": round(training_s, 1),
        "omp_num_threads": os.environ.get("OMP_NUM_THREADS", ""),
        "versions": {"mace-torch": mace.__version__, "torch": torch.__version__},
    }
    metrics_out.write_text(json.dumps(metrics, indent=2) + "\n")
    return metrics


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work-dir", type=Path, default=REPO_ROOT / "build" / "teacher")
    parser.add_argument(
        "--device",
        choices=DEVICE_SETTINGS,
        default="cpu",
        help="where mace trains and the checks run (default cpu: the committed model is reproducible there; auto: a "
        "CUDA GPU when torch sees one)",
    )
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    try:
        device = resolve_device(args.device, "--device")
    except WrongStateError as exc:
        parser.error(str(exc))
    metrics = build(args.work_dir.resolve(), device=device)
    print(json.dumps({k: metrics[k] for k in ("n_structures", "train", "valid", "test", "sn2")}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
