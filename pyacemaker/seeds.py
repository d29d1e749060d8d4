"""Seed structures as a run sees them: every frame of every file in `system.seeds`, with the run's charge and
spin multiplicity set on each."""

from __future__ import annotations

from ase import Atoms

from pyacemaker.config import ConfigError, RunConfig
from pyacemaker.structures import CHARGE_KEY, SPIN_KEY, default_spin_multiplicity, read_structures


def load_seeds(config: RunConfig) -> list[Atoms]:
    """Read the seed files; raises StructureFileError for an unreadable file and ConfigError when a frame's own
    charge contradicts system.charge or the spin multiplicity does not fit the electron count."""
    system = config.system
    seeds: list[Atoms] = []
    for path in system.seeds:
        for index, atoms in enumerate(read_structures(path)):
            where = f"{path} frame {index}"
            if CHARGE_KEY in atoms.info and int(atoms.info[CHARGE_KEY]) != system.charge:
                raise ConfigError(
                    f"system.charge: {system.charge} contradicts charge={atoms.info[CHARGE_KEY]} in {where}"
                )
            electrons = int(atoms.numbers.sum()) - system.charge
            multiplicity = system.spin_multiplicity or default_spin_multiplicity(atoms.numbers, system.charge)
            if (electrons + multiplicity - 1) % 2 != 0:
                raise ConfigError(
                    f"system.spin_multiplicity: {multiplicity} is impossible with {electrons} electrons ({where})"
                )
            atoms.info[CHARGE_KEY] = system.charge
            atoms.info[SPIN_KEY] = multiplicity
            atoms.info.setdefault("source", f"{path.name}:{index}")
            seeds.append(atoms)
    return seeds
