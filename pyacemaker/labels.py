"""What an oracle computed for one structure, as the science code handles it (like ASE's calculator `results`).

The wire message `pyacemaker.v1.common_pb2.Labels` carries the same content flat (forces as 3N numbers); it is
converted here and only here, by `labels_from_proto` / `labels_to_proto`, at the boundaries: the gRPC clients,
the servicers, the oracle's worker pipe and its stored results (job table, task files; the DFT ledger). Arrays
are copies that cannot be written to, so a Labels value can be shared (a cache, a replica's last step) without
one holder changing it under another.
"""

from __future__ import annotations

import enum
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np
from ase import Atoms

from pyacemaker.v1 import common_pb2


class LabelStatus(enum.StrEnum):
    """The two outcomes the pipeline knows; the values are what extxyz info and the ledger spell."""

    OK = "ok"
    # The calculation failed for good (after any retries); `reason` says why. The pipeline goes on.
    FAILED = "failed"


# A FAILED label's reason is cut to this length, so a code that dumps a long error cannot bloat every message.
MAX_REASON_CHARS = 2000


def _frozen_array(values: object, shape: tuple[int, ...], what: str) -> np.ndarray:
    array = np.array(values, dtype=np.float64)
    if array.shape != shape:
        raise ValueError(f"{what} must have shape {shape}, got {array.shape}")
    array.setflags(write=False)
    return array


@dataclass(frozen=True, eq=False)  # eq=False: equality of numpy fields is elementwise, not a bool
class Uncertainty:
    """Committee or model uncertainty; zero / None where the backend has none."""

    energy_std: float = 0.0  # standard deviation of the total energy across the committee, eV
    force_std: np.ndarray | None = None  # (N,) per-atom force standard deviation (norm over x, y, z), eV/Å
    max_force_std: float = 0.0  # largest entry of force_std, eV/Å
    # (N,) per-atom extrapolation grade γ of an ACE with its active set (above 1: outside the training data's).
    extrapolation_grade: np.ndarray | None = None
    max_extrapolation_grade: float = 0.0  # largest entry of extrapolation_grade (dimensionless)

    def __post_init__(self) -> None:
        for name in ("force_std", "extrapolation_grade"):
            values = getattr(self, name)
            if values is not None:
                object.__setattr__(self, name, _frozen_array(values, (np.size(values),), name))


@dataclass(frozen=True, eq=False)
class Labels:
    status: LabelStatus
    reason: str = ""  # why, when FAILED
    energy: float | None = None  # total energy, eV; None when the calculation failed
    forces: np.ndarray | None = None  # (N, 3), eV/Å; None when the calculation gave none
    stress: np.ndarray | None = None  # (6,) Voigt (xx, yy, zz, yz, xz, xy), eV/Å³, ASE's sign; None for molecules
    uncertainty: Uncertainty = field(default_factory=Uncertainty)
    # Backend and the settings that define the physics ("xtb:GFN2-xTB"); labels are interchangeable only when equal.
    level_of_theory: str = ""
    wall_time_s: float = 0.0  # wall time of the calculation, all attempts, s
    attempts: int = 0  # attempts made, counting retries and resubmissions (1 = first try worked)

    def __post_init__(self) -> None:
        object.__setattr__(self, "status", LabelStatus(self.status))
        if self.energy is not None:
            object.__setattr__(self, "energy", float(self.energy))
        if self.forces is not None:
            forces = np.asarray(self.forces)
            if forces.ndim != 2 or forces.shape[1] != 3:
                raise ValueError(f"forces must have shape (N, 3), got {forces.shape}")
            object.__setattr__(self, "forces", _frozen_array(forces, forces.shape, "forces"))
        if self.stress is not None:
            object.__setattr__(self, "stress", _frozen_array(self.stress, (6,), "stress"))

    @property
    def ok(self) -> bool:
        return self.status is LabelStatus.OK

    def required_energy(self) -> float:
        """The energy, for callers that asked only for successful labels; ValueError when there is none."""
        if self.energy is None:
            raise ValueError(f"the labels carry no energy ({self.reason or self.status.value})")
        return self.energy

    def required_forces(self) -> np.ndarray:
        """The (N, 3) forces, for callers that asked only for successful labels; ValueError when there are none."""
        if self.forces is None:
            raise ValueError(f"the labels carry no forces ({self.reason or self.status.value})")
        return self.forces

    @classmethod
    def failed(cls, reason: str, level_of_theory: str = "", wall_time_s: float = 0.0, attempts: int = 0) -> Labels:
        if len(reason) > MAX_REASON_CHARS:
            reason = reason[: MAX_REASON_CHARS - 3] + "..."
        return cls(
            LabelStatus.FAILED,
            reason=reason,
            level_of_theory=level_of_theory,
            wall_time_s=wall_time_s,
            attempts=attempts,
        )


# What MD and the relaxed scan call for forces: structures in, their labels out, in order (the oracle client
# `OracleForceField`, or a backend in-process in tests).
ForceField = Callable[[Sequence[Atoms]], list[Labels]]

_STATUS_FROM_PROTO = {common_pb2.LABEL_STATUS_OK: LabelStatus.OK, common_pb2.LABEL_STATUS_FAILED: LabelStatus.FAILED}
_STATUS_TO_PROTO = {status: value for value, status in _STATUS_FROM_PROTO.items()}


def labels_from_proto(message: common_pb2.Labels, n_atoms: int) -> Labels:
    """The wire message of the labels of a structure of `n_atoms` atoms. Per-atom fields must be empty or hold
    one entry (forces: three) per atom, else a ValueError; an UNSPECIFIED status counts as FAILED, as everywhere
    the code compared it with OK."""
    forces = None
    if message.forces:
        if len(message.forces) != 3 * n_atoms:
            raise ValueError(f"Labels carry {len(message.forces)} force values for {n_atoms} atoms (need 3 per atom)")
        forces = np.array(message.forces, dtype=np.float64).reshape(n_atoms, 3)
    stress = None
    if message.stress:
        if len(message.stress) != 6:
            raise ValueError(f"Labels carry {len(message.stress)} stress values (need 6, Voigt order)")
        stress = np.array(message.stress, dtype=np.float64)
    uncertainty = message.uncertainty
    for name in ("force_std", "extrapolation_grade"):
        count = len(getattr(uncertainty, name))
        if count and count != n_atoms:
            raise ValueError(f"Labels carry {count} {name} values for {n_atoms} atoms (need 1 per atom)")
    return Labels(
        status=_STATUS_FROM_PROTO.get(message.status, LabelStatus.FAILED),
        reason=message.reason,
        energy=message.energy if message.HasField("energy") else None,
        forces=forces,
        stress=stress,
        uncertainty=Uncertainty(
            energy_std=uncertainty.energy_std,
            force_std=np.array(uncertainty.force_std) if uncertainty.force_std else None,
            max_force_std=uncertainty.max_force_std,
            extrapolation_grade=np.array(uncertainty.extrapolation_grade) if uncertainty.extrapolation_grade else None,
            max_extrapolation_grade=uncertainty.max_extrapolation_grade,
        ),
        level_of_theory=message.level_of_theory,
        wall_time_s=message.wall_time_s,
        attempts=message.attempts,
    )


def labels_to_proto(labels: Labels) -> common_pb2.Labels:
    message = common_pb2.Labels(
        status=_STATUS_TO_PROTO[labels.status],
        reason=labels.reason,
        level_of_theory=labels.level_of_theory,
        wall_time_s=labels.wall_time_s,
        attempts=labels.attempts,
    )
    if labels.energy is not None:
        message.energy = labels.energy
    if labels.forces is not None:
        message.forces.extend(labels.forces.ravel().tolist())
    if labels.stress is not None:
        message.stress.extend(labels.stress.tolist())
    # Only fields with a value are set, so a label without uncertainty serializes without that sub-message, byte
    # for byte as before the value type existed (the ledger and the oracle's job table store these bytes).
    uncertainty = labels.uncertainty
    if uncertainty.energy_std:
        message.uncertainty.energy_std = uncertainty.energy_std
    if uncertainty.force_std is not None:
        message.uncertainty.force_std.extend(uncertainty.force_std.tolist())
    if uncertainty.max_force_std:
        message.uncertainty.max_force_std = uncertainty.max_force_std
    if uncertainty.extrapolation_grade is not None:
        message.uncertainty.extrapolation_grade.extend(uncertainty.extrapolation_grade.tolist())
    if uncertainty.max_extrapolation_grade:
        message.uncertainty.max_extrapolation_grade = uncertainty.max_extrapolation_grade
    return message
