"""Labelled SN2 data for the trainer's tests and benchmarks: rattled and interpolated Cl⁻ + CH3Cl frames from
the example's seeds, labelled with GFN2-xTB (tblite, milliseconds a frame), a systematically different
"level B" derived from them, and a tiny MACE trained from scratch to stand in for a teacher.

Functions are cached per process, so several test modules share one dataset and one model.
"""

from __future__ import annotations

import functools
import os
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from ase import Atoms
from ase.calculators.singlepoint import SinglePointCalculator

from pyacemaker.config import PoolConfig, XtbOracleConfig
from pyacemaker.services.oracle.backends.xtb import XtbBackend
from pyacemaker.services.sampler.pool import generate_pool
from pyacemaker.structures import attach_labels, write_extxyz
from tests.conftest import REPO_ROOT, sn2_seeds

# Ground-state spin multiplicities of the neutral atoms whose energies are the E0s.
_ATOM_MULTIPLICITY = {"H": 2, "C": 3, "Cl": 2}


@functools.cache
def xtb_e0s() -> dict[int, float]:
    """GFN2-xTB energies of the isolated neutral atoms H, C, Cl (eV), by atomic number."""
    backend = XtbBackend(XtbOracleConfig(backend="xtb"))
    energies = {}
    for symbol, multiplicity in _ATOM_MULTIPLICITY.items():
        atom = Atoms(symbol, info={"charge": 0, "spin_multiplicity": multiplicity})
        energies[int(atom.numbers[0])] = backend.label(atom).required_energy()
    return energies


@functools.cache
def _xtb_frames(rattles_per_amplitude: int, interpolation_images: int, seed: int) -> tuple[Atoms, ...]:
    config = PoolConfig(
        rattle_amplitudes=[0.03, 0.06, 0.1],
        rattles_per_amplitude=rattles_per_amplitude,
        interpolation_images=interpolation_images,
        interpolation_rattle=0.05,
        fragment_rotations_per_seed=0,
        random_seed=seed,
    )
    backend = XtbBackend(XtbOracleConfig(backend="xtb"))
    frames = []
    for atoms in generate_pool(sn2_seeds(), config).structures:
        labelled = attach_labels(atoms.copy(), backend.label(atoms))
        if labelled.info["label_status"] == "ok":
            frames.append(labelled)
    return tuple(frames)


def xtb_frames(rattles_per_amplitude: int = 10, interpolation_images: int = 10, seed: int = 0) -> list[Atoms]:
    """SN2 frames labelled with GFN2-xTB: each seed, its rattles at 0.03/0.06/0.1 Å, and rattled images
    interpolated between the seeds; 3·(1 + 3·rattles) + 2·images frames in a fixed, shuffled order."""
    frames = _xtb_frames(rattles_per_amplitude, interpolation_images, seed)
    order = np.random.default_rng(seed).permutation(len(frames))
    return [_copy(frames[i]) for i in order]


def _copy(atoms: Atoms) -> Atoms:
    copy = atoms.copy()
    copy.calc = SinglePointCalculator(copy, **atoms.calc.results)
    return copy


def level_b(frames: Sequence[Atoms], scale: float = 1.15, offset_per_atom: float = 0.05) -> list[Atoms]:
    """A systematically different level of theory from xTB labels: binding energies and forces scaled by
    `scale` (a stiffer potential energy surface, as a different functional gives), and isolated-atom
    energies shifted by `offset_per_atom` eV. Consistent: the forces are minus the gradient of the energies."""
    e0_a = xtb_e0s()
    e0_b = level_b_e0s(offset_per_atom)
    out = []
    for atoms in frames:
        reference_a = sum(e0_a[int(z)] for z in atoms.numbers)
        reference_b = sum(e0_b[int(z)] for z in atoms.numbers)
        energy = scale * (atoms.get_potential_energy() - reference_a) + reference_b
        copy = atoms.copy()
        copy.calc = SinglePointCalculator(copy, energy=energy, forces=scale * atoms.get_forces())
        copy.info["level_of_theory"] = f"xtb-scaled:{scale}"
        out.append(copy)
    return out


def level_b_e0s(offset_per_atom: float = 0.05) -> dict[int, float]:
    return {z: e + offset_per_atom for z, e in xtb_e0s().items()}


def write_frames(path: Path, frames: Sequence[Atoms]) -> Path:
    write_extxyz(path, frames)
    return path


@functools.cache
def tiny_mace(directory: Path, epochs: int = 8, n_frames: int = 60) -> Path:
    """A 16-channel, L=0 MACE trained from scratch on xTB frames (about 10 s): a stand-in teacher. Trained in
    a subprocess so that this process never imports mace's global settings."""
    directory.mkdir(parents=True, exist_ok=True)
    model = directory / "tiny_mace.model"
    if model.exists():
        return model
    frames = xtb_frames()[:n_frames]
    train = []
    for atoms in frames:
        copy = atoms.copy()
        copy.calc = None
        copy.info["REF_energy"] = atoms.get_potential_energy()
        copy.arrays["REF_forces"] = atoms.get_forces()
        train.append(copy)
    write_frames(directory / "train.xyz", train)
    e0s = "{" + ",".join(f"{z}:{e!r}" for z, e in sorted(xtb_e0s().items())) + "}"
    command = [
        sys.executable, "-m", "mace.cli.run_train", "--name=tiny_mace", "--seed=1", "--train_file=train.xyz",
        "--valid_fraction=0.1", "--model=ScaleShiftMACE", "--num_channels=16", "--max_L=0", "--correlation=2",
        "--r_max=5.0", "--batch_size=10", "--lr=0.01", f"--max_num_epochs={epochs}", "--default_dtype=float64",
        f"--E0s={e0s}", "--energy_key=REF_energy", "--forces_key=REF_forces", "--device=cpu", "--work_dir=.",
    ]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO_ROOT)}
    subprocess.run(command, cwd=directory, env=env, check=True, capture_output=True)
    return model
