"""The recipe of a small MACE teacher trained from scratch: the bundled teacher's (`make teacher`) and a
bootstrapped one's (`teacher.bootstrap`, trained by the trainer's mace_train job) alike."""

from __future__ import annotations

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
