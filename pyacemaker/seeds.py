"""Seed structures as a run sees them: every frame of every file in `system.seeds`, with the run's charge and
spin multiplicity set on each."""

from __future__ import annotations

import numbers
from typing import Any

import numpy as np
from ase import Atoms

from pyacemaker.config import ConfigError, RunConfig
from pyacemaker.structures import CHARGE_KEY, SPIN_KEY, default_spin_multiplicity, read_structures

# Atoms in all frames of one seed file at most (seeds travel to the orchestrator in one request).
MAX_SEED_ATOMS = 100_000
# Largest |coordinate| or cell component, Å: beyond it a seed is a typo, not a structure.
MAX_COORDINATE = 1e6


def load_seeds(config: RunConfig) -> list[Atoms]:
    """Read the seed files; raises StructureFileError for an unreadable file and ConfigError (one line naming
    the key or the file and frame) when a frame is not a usable structure (no atoms, an unknown element,
    non-finite coordinates, a `charge` or `spin_multiplicity` that is not an integer), when its own charge
    contradicts system.charge, when the spin multiplicity does not fit the electron count, or when restraint
    or profile atom indices lie outside a seed."""
    system = config.system
    indexed = _atom_index_keys(config)
    seeds: list[Atoms] = []
    for path in system.seeds:
        for index, atoms in enumerate(read_structures(path, max_atoms=MAX_SEED_ATOMS)):
            where = f"{path} frame {index}"
            _check_frame(atoms, where)
            if CHARGE_KEY in atoms.info and _integer(atoms.info[CHARGE_KEY], CHARGE_KEY, where) != system.charge:
                raise ConfigError(
                    f"system.charge: {system.charge} contradicts charge={atoms.info[CHARGE_KEY]} in {where}"
                )
            if SPIN_KEY in atoms.info:
                _integer(atoms.info[SPIN_KEY], SPIN_KEY, where)
            electrons = int(atoms.numbers.sum()) - system.charge
            if electrons < 0:
                raise ConfigError(f"system.charge: {system.charge} leaves {electrons} electrons ({where})")
            multiplicity = system.spin_multiplicity or default_spin_multiplicity(atoms.numbers, system.charge)
            if multiplicity > electrons + 1 or (electrons + multiplicity - 1) % 2 != 0:
                raise ConfigError(
                    f"system.spin_multiplicity: {multiplicity} is impossible with {electrons} electrons ({where})"
                )
            for key, atom_indices in indexed:
                if max(atom_indices) >= len(atoms):
                    raise ConfigError(
                        f"{key}: atom index {max(atom_indices)} is out of range for {where} ({len(atoms)} atoms)"
                    )
            atoms.info[CHARGE_KEY] = system.charge
            atoms.info[SPIN_KEY] = multiplicity
            atoms.info.setdefault("source", f"{path.name}:{index}")
            seeds.append(atoms)
    return seeds


def _atom_index_keys(config: RunConfig) -> list[tuple[str, tuple[int, ...]]]:
    """The config keys that hold atom indices into every seed, with their indices."""
    keys: list[tuple[str, tuple[int, ...]]] = []
    if config.md.windows is not None:
        keys.append(("md.windows.atoms", config.md.windows.atoms))
    if config.validation.profile is not None:
        keys.append(("validation.profile.atoms", config.validation.profile.atoms))
    return keys


def _check_frame(atoms: Atoms, where: str) -> None:
    if len(atoms) == 0:
        raise ConfigError(f"{where}: has no atoms")
    numbers_ = atoms.numbers
    if numbers_.min() < 1 or numbers_.max() > 118:
        raise ConfigError(f"{where}: atomic number {int(numbers_.min())} is not an element (1 to 118)")
    for name, values in (("positions", atoms.positions), ("cell", np.asarray(atoms.cell))):
        if not np.all(np.isfinite(values)) or np.abs(values).max(initial=0.0) > MAX_COORDINATE:
            raise ConfigError(f"{where}: {name} must be finite and within ±{MAX_COORDINATE:g} Å")
    if any(atoms.pbc) and abs(atoms.cell.volume) < 1e-6:
        raise ConfigError(f"{where}: periodic, but its cell has no volume")


def _integer(value: Any, key: str, where: str) -> int:
    """An integer-valued `key=value` of a seed's comment line, or ConfigError naming it."""
    if isinstance(value, numbers.Integral) and not isinstance(value, bool | np.bool_):
        return int(value)
    if isinstance(value, numbers.Real) and float(value).is_integer():
        return int(float(value))
    raise ConfigError(f"{where}: {key}={value!r} is not an integer")
