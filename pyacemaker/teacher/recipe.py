"""The recipe of a small MACE teacher trained from scratch: the bundled teacher's (`make teacher`) and a
bootstrapped one's (`teacher.bootstrap`, trained by the trainer's mace_train job) alike."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from ase import Atoms

# A small MACE (the settings below) with more epochs for a ~500-structure set, and energy weighted 20:100 against
# forces from the start: mace's default 1:100 leaves the energies of the −1 structures (which carry GFN2-xTB's
# E(Cl⁻) − E(Cl) = −8.2 eV) hundreds of meV/atom off until stage two, which then trades forces for them.
MACE_SETTINGS: dict[str, str | int | float] = {
    "model": "ScaleShiftMACE",
    "num_channels": 16,
    "max_L": 0,
    "correlation": 2,
    "r_max": 5.0,
    "num_interactions": 2,
    "batch_size": 10,
    "valid_batch_size": 20,
    "lr": 0.01,
    "max_num_epochs": 400,
    "start_swa": 320,
    "energy_weight": 20,
    "forces_weight": 100,
    "swa_energy_weight": 100,
    "swa_forces_weight": 100,
    "default_dtype": "float64",
    "seed": 1,
}


def split_frames(
    frames: Sequence[Atoms],
    rng: np.random.Generator,
    valid_fraction: float,
    test_fraction: float = 0.0,
    min_valid: int = 0,
) -> dict[str, list[Atoms]]:
    """Random train/valid/test split of the multi-atom frames (test first, then valid, from one permutation);
    single atoms always train (they carry no forces to check). At least `min_valid` validation frames when
    there are two or more multi-atom frames."""
    singles = [a for a in frames if len(a) == 1]
    rest = [a for a in frames if len(a) > 1]
    order = rng.permutation(len(rest))
    n_test = round(test_fraction * len(rest))
    n_valid = round(valid_fraction * len(rest))
    if len(rest) > 1:
        n_valid = max(min_valid, n_valid)
    return {
        "test": [rest[i] for i in order[:n_test]],
        "valid": [rest[i] for i in order[n_test : n_test + n_valid]],
        "train": [rest[i] for i in order[n_test + n_valid :]] + singles,
    }
