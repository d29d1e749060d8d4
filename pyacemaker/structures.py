"""Conversion between ase.Atoms and the wire message `Structure`, between Atoms and `Labels` values, and extxyz
file I/O.

Charge and spin travel in `atoms.info["charge"]` and `atoms.info["spin_multiplicity"]`; every other info
entry and every extra per-atom array is kept, so Atoms → Structure → Atoms is lossless.
"""

from __future__ import annotations

import hashlib
import io
import json
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from ase import Atoms
from ase.calculators.singlepoint import SinglePointCalculator

from pyacemaker.labels import Labels, LabelStatus
from pyacemaker.v1 import common_pb2

CHARGE_KEY = "charge"
SPIN_KEY = "spin_multiplicity"
LEVEL_KEY = "level_of_theory"
# info key of the largest per-atom extrapolation grade γ of an ACE label (per-atom values: array "gamma").
MAX_GAMMA_KEY = "max_gamma"
# Keys that the Structure message carries in its own fields, so they are not repeated in info_json.
_STRUCTURE_INFO_KEYS = {CHARGE_KEY, SPIN_KEY, "content_id"}
# Per-atom arrays that Structure carries in its own fields.
_STRUCTURE_ARRAYS = {"numbers", "positions"}
# Labels written into Atoms by `attach_labels`; they describe a calculation, not the structure.
_LABEL_INFO_KEYS = {
    LEVEL_KEY,
    "label_status",
    "label_reason",
    "energy_std",
    "max_force_std",
    "wall_time_s",
    MAX_GAMMA_KEY,
}
_LABEL_ARRAYS = {"force_std", "gamma"}


class StructureFileError(ValueError):
    """A structure file that cannot be read; the message names the file."""


def default_spin_multiplicity(numbers: Iterable[int], charge: int) -> int:
    """Lowest multiplicity compatible with the electron count: singlet if even, doublet if odd."""
    electrons = int(sum(int(z) for z in numbers)) - int(charge)
    return 1 if electrons % 2 == 0 else 2


# Subshells in aufbau order, as (n, l), and the ground-state multiplicities that aufbau + Hund's rule miss.
_AUFBAU = [(1, 0), (2, 0), (2, 1), (3, 0), (3, 1), (4, 0), (3, 2), (4, 1), (5, 0), (4, 2), (5, 1), (6, 0), (4, 3),
           (5, 2), (6, 1), (7, 0), (5, 3), (6, 2), (7, 1)]  # fmt: skip
_MULTIPLICITY_EXCEPTIONS = {24: 7, 29: 2, 41: 6, 42: 7, 44: 5, 45: 4, 46: 1, 47: 2, 57: 2, 58: 3, 64: 9, 78: 3, 79: 2}


def atom_ground_state_multiplicity(atomic_number: int) -> int:
    """2S+1 of the isolated neutral atom (H 2, C 3, N 4, O 3, Cl 2, ...): Hund's rule on the open subshell of
    the aufbau configuration, with the known exceptions (Cr, Cu, ...) from a table. The isolated-atom reference
    energies (E0s) are computed in these states."""
    left = int(atomic_number)
    for _n, angular in _AUFBAU:
        capacity = 2 * (2 * angular + 1)
        if left <= capacity:
            if atomic_number in _MULTIPLICITY_EXCEPTIONS:
                return _MULTIPLICITY_EXCEPTIONS[atomic_number]
            return min(left, capacity - left) + 1
        left -= capacity
    raise ValueError(f"no ground-state multiplicity for Z={atomic_number}")


def charge_of(atoms: Atoms) -> int:
    """The total charge; a fractional one (1.5 from a file) is a ValueError, never silently truncated."""
    value = atoms.info.get(CHARGE_KEY, 0)
    try:
        as_float = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"charge must be an integer, got {value!r}") from None
    if not np.isfinite(as_float) or as_float != int(as_float):
        raise ValueError(f"charge must be an integer, got {as_float:g}")
    return int(as_float)


def spin_multiplicity_of(atoms: Atoms) -> int:
    value = atoms.info.get(SPIN_KEY)
    if value is None:
        return default_spin_multiplicity(atoms.numbers, charge_of(atoms))
    return int(value)


def content_id(atoms: Atoms) -> str:
    """sha256 of the canonical geometry (positions and cell to 1e-6 Å), pbc, charge and spin."""
    digest = hashlib.sha256()
    digest.update(np.asarray(atoms.numbers, dtype=np.int64).tobytes())
    # Adding 0.0 turns -0.0 into 0.0 so that equal geometries hash equally.
    digest.update((np.round(atoms.positions, 6) + 0.0).astype(np.float64).tobytes())
    digest.update((np.round(np.asarray(atoms.cell), 6) + 0.0).astype(np.float64).tobytes())
    digest.update(np.asarray(atoms.pbc, dtype=np.int8).tobytes())
    digest.update(f"{charge_of(atoms)}:{spin_multiplicity_of(atoms)}".encode())
    return digest.hexdigest()


def _to_jsonable(value: Any) -> Any:
    if isinstance(value, np.ndarray):
        return {"__ndarray__": value.tolist(), "dtype": str(value.dtype), "shape": list(value.shape)}
    if isinstance(value, np.generic):
        return {"__npscalar__": value.item(), "dtype": str(value.dtype)}
    if isinstance(value, dict):
        return {str(k): _to_jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_to_jsonable(v) for v in value]
    return value


def _from_jsonable(value: Any) -> Any:
    if isinstance(value, dict):
        if "__ndarray__" in value:
            return np.array(value["__ndarray__"], dtype=value["dtype"]).reshape(value["shape"])
        if "__npscalar__" in value:
            return np.dtype(value["dtype"]).type(value["__npscalar__"])
        return {k: _from_jsonable(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_from_jsonable(v) for v in value]
    return value


def atoms_to_structure(atoms: Atoms, provenance: common_pb2.Provenance | None = None) -> common_pb2.Structure:
    """ase.Atoms → Structure. Calculator results are not part of a Structure (see `labels_of_atoms`)."""
    info = {k: v for k, v in atoms.info.items() if k not in _STRUCTURE_INFO_KEYS | _LABEL_INFO_KEYS}
    arrays = {k: v for k, v in atoms.arrays.items() if k not in _STRUCTURE_ARRAYS | _LABEL_ARRAYS and k != "forces"}
    message = common_pb2.Structure(
        atomic_numbers=[int(z) for z in atoms.numbers],
        positions=np.asarray(atoms.positions, dtype=np.float64).ravel().tolist(),
        cell=np.asarray(atoms.cell, dtype=np.float64).ravel().tolist(),
        pbc=[bool(p) for p in atoms.pbc],
        charge=charge_of(atoms),
        spin_multiplicity=spin_multiplicity_of(atoms),
        content_id=content_id(atoms),
        info_json=json.dumps(_to_jsonable(info), sort_keys=True) if info else "",
        arrays_json=json.dumps(_to_jsonable(arrays), sort_keys=True) if arrays else "",
    )
    if provenance is not None:
        message.provenance.CopyFrom(provenance)
    return message


# Longest info_json / arrays_json accepted, characters: generous for per-atom arrays of large cells, and a bound
# on what parsing one structure's JSON may cost.
MAX_JSON_CHARS = 16_000_000


def structure_to_atoms(message: common_pb2.Structure) -> Atoms:
    """Structure → ase.Atoms, with charge and spin multiplicity in `info`. A message that does not describe
    Atoms (wrong counts, bad JSON in info_json / arrays_json) is a ValueError naming the field."""
    n_atoms = len(message.atomic_numbers)
    positions = np.array(message.positions, dtype=np.float64)
    if positions.size != 3 * n_atoms:
        raise ValueError(f"Structure has {n_atoms} atoms but {positions.size} position values (need 3 per atom)")
    cell = np.array(message.cell, dtype=np.float64) if message.cell else np.zeros(9)
    if cell.size != 9:
        raise ValueError(f"Structure cell has {cell.size} values (need 9)")
    pbc = list(message.pbc) if message.pbc else [False, False, False]
    if len(pbc) != 3:
        raise ValueError(f"Structure pbc has {len(pbc)} flags (need 3)")
    atoms = Atoms(
        numbers=list(message.atomic_numbers),
        positions=positions.reshape(n_atoms, 3),
        cell=cell.reshape(3, 3),
        pbc=pbc,
    )
    if message.info_json:
        atoms.info.update(_json_object(message.info_json, "info_json"))
    if message.arrays_json:
        for name, values in _json_object(message.arrays_json, "arrays_json").items():
            if name in atoms.arrays:
                raise ValueError(f"arrays_json: {name[:40]!r} is carried by the Structure's own fields")
            try:
                atoms.new_array(name, np.asarray(values))
            except (ValueError, TypeError, RuntimeError) as exc:
                raise ValueError(f"arrays_json: array {name[:40]!r}: {exc}") from None
    atoms.info[CHARGE_KEY] = int(message.charge)
    atoms.info[SPIN_KEY] = int(message.spin_multiplicity) or default_spin_multiplicity(atoms.numbers, message.charge)
    return atoms


def _json_object(text: str, field: str) -> dict[str, Any]:
    """The JSON object of info_json / arrays_json with numpy values restored; ValueError naming the field."""
    if len(text) > MAX_JSON_CHARS:
        raise ValueError(f"{field} has {len(text)} characters (at most {MAX_JSON_CHARS})")
    try:
        value = _from_jsonable(json.loads(text))
    except (ValueError, TypeError, KeyError, AttributeError, RecursionError) as exc:
        why = f"{type(exc).__name__}: {str(exc)[:200]}"
        raise ValueError(f"{field} is not a valid JSON object of values ({why})") from None
    if not isinstance(value, dict):
        raise ValueError(f"{field} must be a JSON object, got {type(value).__name__}")
    return value


def labels_of_atoms(atoms: Atoms, level_of_theory: str) -> Labels:
    """The results of `atoms.calc` (energy eV, forces eV/Å, stress eV/Å³ Voigt) as OK Labels; a stress is kept
    for periodic structures only."""
    if atoms.calc is None:
        raise ValueError("atoms carry no calculator results")
    results = atoms.calc.results
    stress = None
    if "stress" in results and any(atoms.pbc):
        stress = np.asarray(results["stress"], dtype=np.float64)
        if stress.shape == (3, 3):
            stress = stress[[0, 1, 2, 1, 0, 0], [0, 1, 2, 2, 2, 1]]
    return Labels(
        LabelStatus.OK,
        energy=float(results["energy"]) if "energy" in results else None,
        forces=np.asarray(results["forces"], dtype=np.float64) if "forces" in results else None,
        stress=stress,
        level_of_theory=level_of_theory,
    )


def attach_labels(atoms: Atoms, labels: Labels) -> Atoms:
    """Put Labels onto atoms as a SinglePointCalculator plus info entries, ready for extxyz."""
    if labels.forces is not None and len(labels.forces) != len(atoms):
        raise ValueError(f"labels with forces on {len(labels.forces)} atoms do not belong to {len(atoms)} atoms")
    results: dict[str, Any] = {}
    if labels.energy is not None:
        results["energy"] = labels.energy
    # Copies: the labels' arrays are read-only, and whoever reads the atoms back may work on them in place.
    if labels.forces is not None:
        results["forces"] = labels.forces.copy()
    if labels.stress is not None:
        results["stress"] = labels.stress.copy()
    atoms.calc = SinglePointCalculator(atoms, **results) if results else None
    atoms.info[LEVEL_KEY] = labels.level_of_theory
    atoms.info["label_status"] = labels.status.value
    if labels.reason:
        atoms.info["label_reason"] = labels.reason
    if labels.wall_time_s:
        atoms.info["wall_time_s"] = labels.wall_time_s
    uncertainty = labels.uncertainty
    if uncertainty.force_std is not None and uncertainty.force_std.size:
        atoms.info["energy_std"] = uncertainty.energy_std
        atoms.info["max_force_std"] = uncertainty.max_force_std
        atoms.set_array("force_std", uncertainty.force_std.copy())
    if uncertainty.extrapolation_grade is not None and uncertainty.extrapolation_grade.size:
        atoms.info[MAX_GAMMA_KEY] = uncertainty.max_extrapolation_grade
        atoms.set_array("gamma", uncertainty.extrapolation_grade.copy())
    return atoms


def labelled_copies(calculator: Any, frames: Iterable[Atoms]) -> list[Atoms]:
    """Copies of `frames` carrying `calculator`'s energy and forces as fixed labels (SinglePointCalculator)."""
    labelled = []
    for atoms in frames:
        copy = atoms.copy()
        copy.calc = calculator
        energy, forces = copy.get_potential_energy(), copy.get_forces()
        copy.calc = SinglePointCalculator(copy, energy=energy, forces=forces)
        labelled.append(copy)
    return labelled


# Atoms in one frame at most: far beyond what an ACE/MACE training frame holds, and a bound on what a count
# line can make the reader allocate.
MAX_ATOMS_PER_FRAME = 1_000_000
_XYZ_SUFFIXES = {".xyz", ".extxyz"}


def bounded_batches(sizes: Sequence[int], max_structures: int, max_atoms: int) -> Iterator[range]:
    """Consecutive structures (of `sizes` atoms each) to treat together: at most `max_structures`, and at most
    `max_atoms` atoms unless one structure alone has more. What a batch costs in memory grows with its atoms,
    so a count alone that suits molecules would put tens of thousands of atoms of large cells into one batch."""
    start = 0
    while start < len(sizes):
        stop, atoms = start + 1, sizes[start]
        while stop < len(sizes) and stop - start < max_structures and atoms + sizes[stop] <= max_atoms:
            atoms += sizes[stop]
            stop += 1
        yield range(start, stop)
        start = stop


def read_structures(path: str | Path, max_atoms: int | None = None) -> list[Atoms]:
    """Read every frame of an xyz/extxyz (or any ASE-readable) file; errors name the file (and for xyz the frame
    and line). xyz/extxyz frames are delimited from their count lines first, so a count larger than the file
    holds is an error at once rather than a read to the end; `max_atoms` bounds the atoms of all frames."""
    path = Path(path)
    if not path.is_file():
        raise StructureFileError(f"{path}: no such file")
    if path.suffix.lower() in _XYZ_SUFFIXES:
        if max_atoms is not None and sum(int(lines[0]) for _, lines in _numbered_frame_lines(path)) > max_atoms:
            raise StructureFileError(f"{path}: more than {max_atoms} atoms in all")
        frames = list(iter_extxyz(path))
    else:
        from ase.io import read

        try:
            read_frames = read(str(path), index=":")
        except Exception as exc:  # ASE raises many types for malformed files; all mean "cannot read"
            raise StructureFileError(f"{path}: not a readable structure file ({type(exc).__name__}: {exc})") from exc
        frames = read_frames if isinstance(read_frames, list) else [read_frames]
        if max_atoms is not None and sum(len(atoms) for atoms in frames) > max_atoms:
            raise StructureFileError(f"{path}: more than {max_atoms} atoms in all")
    if not frames:
        raise StructureFileError(f"{path}: contains no structures")
    return frames


def write_extxyz(path: str | Path, frames: Iterable[Atoms], append: bool = False) -> int:
    """Write frames as extxyz; returns how many were written."""
    from ase.io import write

    frames = list(frames)
    write(str(path), frames, format="extxyz", append=append)
    return len(frames)


def iter_extxyz(path: str | Path, start: int = 0) -> Iterator[Atoms]:
    """Stream the frames of an (ext)xyz file one at a time, from frame `start` on (earlier frames are skipped
    unparsed). Holds one frame: ASE's own iread first indexes every frame of the file, which grows with it.
    Errors name the file and the frame."""
    from ase.io.extxyz import read_xyz

    path = Path(path)
    for index, (line_number, lines) in enumerate(_numbered_frame_lines(path)):
        if index < start:
            continue
        try:
            atoms = next(read_xyz(io.StringIO(b"".join(lines).decode("utf-8")), index=0))
        except UnicodeDecodeError:
            raise StructureFileError(f"{path}: frame {index} (line {line_number}) is not UTF-8 text") from None
        except Exception as exc:  # ASE raises many types for a malformed frame; all mean "cannot read"
            raise StructureFileError(
                f"{path}: frame {index} (line {line_number}) is not valid extxyz ({type(exc).__name__}: {exc})"
            ) from None
        yield atoms


def count_extxyz_frames(path: str | Path) -> int:
    """Frames in an (ext)xyz file, counted from the atom-count lines without parsing the frames (about a second
    for 100 000 small frames, flat memory); errors name the file and line."""
    return sum(1 for _ in _numbered_frame_lines(Path(path)))


def _numbered_frame_lines(path: Path) -> Iterator[tuple[int, list[bytes]]]:
    """The raw lines of each frame, with the line number of its count line: the atom count, the comment line,
    one line per atom, and any VEC lines (the old xyz way of giving a cell) that follow. A count must be a
    whole number from 0 to MAX_ATOMS_PER_FRAME, and the file must hold the lines it announces."""
    if not path.is_file():
        raise StructureFileError(f"{path}: no such file")
    try:
        handle = open(path, "rb")  # noqa: SIM115 (closed by the with below; open's OSError named here)
    except OSError as exc:
        raise StructureFileError(f"{path}: cannot be read ({exc.strerror})") from None
    with handle:
        line_number = 1
        line = handle.readline()
        frame = 0
        while line:
            if not line.strip():  # blank lines between or after frames
                line, line_number = handle.readline(), line_number + 1
                continue
            text = line.strip()
            if not text.isdigit() or len(text) > 7 or int(text) > MAX_ATOMS_PER_FRAME:
                expected = f"the atom count of frame {frame}"
                if text.isdigit():
                    expected += f" (at most {MAX_ATOMS_PER_FRAME})"
                raise StructureFileError(f"{path}: line {line_number}: expected {expected}, got {line[:40]!r}")
            n_atoms = int(text)
            lines = [line]
            for _ in range(n_atoms + 1):  # the comment line, then one line per atom
                lines.append(handle.readline())
                if not lines[-1]:
                    raise StructureFileError(
                        f"{path}: frame {frame} (line {line_number}) is cut short: its count line announces "
                        f"{n_atoms} atoms"
                    )
            start, line, line_number = line_number, handle.readline(), line_number + n_atoms + 2
            while line.lstrip().startswith(b"VEC"):
                lines.append(line)
                line, line_number = handle.readline(), line_number + 1
            yield start, lines
            frame += 1
