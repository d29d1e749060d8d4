"""The per-element reference energies (E0) that a PyAceMaker ACE potential carries in its .yaml metadata.

The trainer writes them when it fits a potential; the oracle's ace backend and the trainer's evaluation read them
back to add the E0s to what pyace computes, so both live here in the core rather than in either service."""

from __future__ import annotations

import json
from pathlib import Path

from ase.data import atomic_numbers, chemical_symbols

# Metadata key of the per-element reference energies (JSON object symbol → eV) in a B-basis .yaml.
E0_METADATA_KEY = "pyacemaker_e0_ev"


def potential_e0s(yaml_path: Path) -> dict[int, float]:
    """The reference energies stored in a .yaml's metadata (by atomic number); empty when there are none, as
    for a potential that pacemaker wrote."""
    from pyace import BBasisConfiguration

    metadata = BBasisConfiguration(str(yaml_path)).metadata
    if E0_METADATA_KEY not in metadata:
        return {}
    return {atomic_numbers[symbol]: float(value) for symbol, value in json.loads(metadata[E0_METADATA_KEY]).items()}


def e0_metadata_value(e0s: dict[int, float]) -> str:
    """The metadata value that `potential_e0s` reads back."""
    return json.dumps({chemical_symbols[z]: e for z, e in sorted(e0s.items())})
