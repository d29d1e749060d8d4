"""Which elements a MACE model file knows, for checks made before a run (`pyacemaker config check`, `run`).

A model with a metrics file beside it (`<stem>_metrics.json` whose `model_sha256` is the file's digest, as
`make teacher` writes for the bundled teacher) is read from that file, in milliseconds and without torch. Any
other model is loaded with torch (mace-torch must be installed; seconds): a MACE model file is a pickle and
loading it runs code, so only files the user's own config names are loaded here, as the mace oracle would.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from pathlib import Path

from ase import Atoms
from ase.data import atomic_numbers


class ModelElementsError(ValueError):
    """The model file cannot be read; the message names the file."""


def model_elements(path: Path) -> list[int]:
    """The atomic numbers `path` (a MACE model file) knows, sorted."""
    recorded = _recorded_elements(path)
    if recorded is not None:
        return recorded
    try:
        import torch
    except ImportError as exc:
        raise ModelElementsError(f"{path}: cannot read its elements without torch ({exc})") from None
    try:
        model = torch.load(path, map_location="cpu", weights_only=False)
        return sorted(int(z) for z in model.atomic_numbers)
    except Exception as exc:  # a truncated file, not a pickle, not a MACE model: all mean "not usable"
        raise ModelElementsError(f"{path}: not a readable MACE model ({type(exc).__name__}: {exc})") from None


def seed_elements(seeds: Sequence[Atoms]) -> list[int]:
    """The atomic numbers in `seeds`, sorted."""
    return sorted({int(z) for atoms in seeds for z in atoms.numbers})


def missing_elements(path: Path, seeds: Sequence[Atoms]) -> list[int]:
    """The atomic numbers in `seeds` that the model `path` does not know, sorted; ModelElementsError when the
    file cannot be read."""
    return sorted(set(seed_elements(seeds)) - set(model_elements(path)))


def _recorded_elements(path: Path) -> list[int] | None:
    """The elements in the metrics file beside `path`, when it describes exactly this file; else None."""
    metrics_file = path.with_name(f"{path.stem}_metrics.json")
    if not metrics_file.is_file():
        return None
    try:
        metrics = json.loads(metrics_file.read_text())
        if metrics.get("model_sha256") != hashlib.sha256(path.read_bytes()).hexdigest():
            return None
        return sorted(atomic_numbers[symbol] for symbol in metrics["elements"])
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return None
