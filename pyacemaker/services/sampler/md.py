"""Surrogate MD (step 4): many replicas advanced together, their forces from one batched oracle call per step.

Integrator: Langevin dynamics with the BAOAB splitting (Leimkuhler & Matthews, Appl. Math. Res. Express 2013),
which samples configurations accurately at the time steps MD uses. Every replica keeps its centre of mass at
rest: the net force is removed from the forces and the centre-of-mass velocity from every velocity update
(the thermostat noise is projected onto the zero-momentum subspace, which in mass-weighted coordinates is an
orthogonal projection, so the other 3N − 3 degrees of freedom keep the exact Maxwell distribution). The kinetic
temperature is 2 E_kin / ((3N − 3) k_B). (Measured here: ASE's Langevin with fixcm=True runs a 6-atom molecule
about twice as hot as asked; the tests check this integrator's mean kinetic temperature on a 6-atom cluster.)

NPT (periodic cells, `pressure_gpa` set): isotropic stochastic cell rescaling (Bernetti & Bussi, J. Chem. Phys.
153, 114107 (2020)), Berendsen's barostat plus the noise term that makes the volume distribution correct:
dε = −(β_T/τ_P)(P₀ − P − k_BT/V) dt + √(2 k_BT β_T dt/(V τ_P)) R with ε = ln V, positions and cell scaled by
e^{dε/3}, velocities by e^{−dε/3}. P = 2 E_kin/(3V) − tr(σ)/3 with σ the oracle's stress (ASE's sign).

Per step, every running replica is checked before its frame can be kept: a smallest interatomic distance below
`min_distance` (checked before the oracle is asked), a FAILED label, or a committee max force std above
`max_force_std` (or, for force fields that report one, an extrapolation grade γ above `max_extrapolation_grade`)
stops the replica with the reason; the frames it saved before stay, and the stop event carries the structure.

Restraint windows: the bias of `restraints.DistanceDifferenceRestraint` is added to the oracle's forces; the
saved frames carry the oracle's (unbiased) labels only.

Units inside: ASE's (Å, eV, amu, time in Å·√(amu/eV)); parameters in fs, K, GPa are converted here.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Generator, Sequence
from dataclasses import dataclass

import numpy as np
from ase import Atoms, units
from ase.neighborlist import neighbor_list

from pyacemaker.labels import ForceField, Labels
from pyacemaker.restraints import DistanceDifferenceRestraint
from pyacemaker.structures import attach_labels

# Upper bounds of MdParameters: a longer time step is no MD any more (hydrogen needs ≤ 1 fs, heavy atoms a few),
# a hotter bath melts everything into plasma, more replicas than this do not fit one batched oracle call.
MAX_TIMESTEP_FS = 20.0
MAX_TEMPERATURE_K = 100_000.0
MAX_REPLICAS = 10_000
# Radius of the neighbour search for the smallest distance in periodic cells, Å; beyond it all pairs are taken.
_PERIODIC_SEARCH_RADIUS = 5.0
# info keys of saved frames.
REPLICA_KEY, WINDOW_KEY, STEP_KEY = "md_replica", "md_window", "md_step"
TEMPERATURE_KEY, CV_KEY = "md_temperature_k", "md_xi"


@dataclass(frozen=True)
class MdParameters:
    temperatures_k: tuple[float, ...]
    timestep_fs: float
    steps: int
    save_interval: int
    # Per restraint window; in plain MD the total.
    replicas: int
    friction_per_fs: float
    min_distance: float
    max_force_std: float
    pressure_gpa: float | None = None
    barostat_time_fs: float = 1000.0
    compressibility_per_gpa: float = 0.01
    random_seed: int = 0
    # Largest extrapolation grade γ a replica may reach (force fields that report one); inf: no limit.
    max_extrapolation_grade: float = float("inf")

    def check(self) -> None:
        """ValueError naming the first parameter out of range."""
        positive = {
            "timestep_fs": self.timestep_fs,
            "friction_per_fs": self.friction_per_fs,
            "min_distance": self.min_distance,
            "max_force_std": self.max_force_std,
            "barostat_time_fs": self.barostat_time_fs,
            "compressibility_per_gpa": self.compressibility_per_gpa,
        }
        for name, value in positive.items():
            if not (value > 0 and math.isfinite(value)):
                raise ValueError(f"{name} must be positive and finite, got {value}")
        if not self.max_extrapolation_grade > 0:  # inf: no limit (the default)
            raise ValueError(f"max_extrapolation_grade must be positive, got {self.max_extrapolation_grade}")
        if self.timestep_fs > MAX_TIMESTEP_FS:
            raise ValueError(f"timestep_fs must be at most {MAX_TIMESTEP_FS:g} fs, got {self.timestep_fs:g}")
        counts = {"steps": self.steps, "save_interval": self.save_interval, "replicas": self.replicas}
        for name, count in counts.items():
            if count < 1:
                raise ValueError(f"{name} must be at least 1, got {count}")
        if self.replicas > MAX_REPLICAS:
            raise ValueError(f"replicas must be at most {MAX_REPLICAS}, got {self.replicas}")
        if not self.temperatures_k:
            raise ValueError("temperatures_k must not be empty")
        for temperature in self.temperatures_k:
            if not (0 < temperature <= MAX_TEMPERATURE_K):
                raise ValueError(
                    f"temperatures_k must be positive and at most {MAX_TEMPERATURE_K:g} K, got {temperature}"
                )
        if self.pressure_gpa is not None and not math.isfinite(self.pressure_gpa):
            raise ValueError(f"pressure_gpa must be finite, got {self.pressure_gpa}")
        if self.random_seed < 0:
            raise ValueError(f"random_seed must not be negative, got {self.random_seed}")


@dataclass
class FrameEvent:
    """A saved frame: a copy of the replica's atoms with the oracle's unbiased labels attached."""

    replica: int
    window: int
    step: int
    atoms: Atoms
    # The oracle's labels of this frame (unbiased), as attached to `atoms`.
    labels: Labels
    temperature_k: float
    target_temperature_k: float
    collective_variable: float | None
    min_distance: float


@dataclass
class ReplicaStoppedEvent:
    replica: int
    step: int
    reason: str
    # A copy of the structure at which it stopped (no labels).
    atoms: Atoms | None = None


@dataclass
class StepEvent:
    """After every step: how far the run is."""

    step: int
    running: int


@dataclass
class MdSummary:
    steps: int
    wall_time_s: float
    replicas: int
    replicas_stopped: int
    n_frames: int
    # Replica steps made (one replica advanced by one step), summed over replicas.
    replica_steps: int


MdEvent = FrameEvent | ReplicaStoppedEvent | StepEvent


@dataclass
class _Replica:
    index: int
    window: int
    restraint: DistanceDifferenceRestraint | None
    temperature_k: float
    atoms: Atoms
    masses: np.ndarray  # (n, 1), amu
    velocities: np.ndarray  # (n, 3), Å per ASE time unit
    rng: np.random.Generator
    forces: np.ndarray | None = None  # oracle + bias, net force removed
    labels: Labels | None = None  # oracle's, unbiased
    running: bool = True

    @property
    def kt(self) -> float:
        return units.kB * self.temperature_k

    def kinetic_energy(self) -> float:
        return 0.5 * float(np.sum(self.masses * self.velocities**2))

    def kinetic_temperature(self) -> float:
        return 2.0 * self.kinetic_energy() / (degrees_of_freedom(len(self.atoms)) * units.kB)


def degrees_of_freedom(n_atoms: int) -> int:
    """3N − 3: the centre of mass is held at rest."""
    return 3 * n_atoms - 3


def remove_com(vectors: np.ndarray, masses: np.ndarray, weight_by_mass: bool) -> np.ndarray:
    """Velocities (weight_by_mass) or forces with zero total momentum / net force."""
    if weight_by_mass:
        return vectors - np.sum(masses * vectors, axis=0) / np.sum(masses)
    return vectors - masses * np.sum(vectors, axis=0) / np.sum(masses)


def min_interatomic_distance(atoms: Atoms) -> float:
    """Smallest distance between two atoms, Å (periodic images included for periodic cells); inf for one atom
    of a molecule."""
    if atoms.pbc.any():
        distances = neighbor_list("d", atoms, _PERIODIC_SEARCH_RADIUS)
        if len(distances):
            return float(distances.min())
        if len(atoms) < 2:
            return float("inf")
        all_distances = atoms.get_all_distances(mic=True)
        return float(all_distances[np.triu_indices(len(atoms), k=1)].min())
    if len(atoms) < 2:
        return float("inf")
    diff = atoms.positions[:, None, :] - atoms.positions[None, :, :]
    return float(np.sqrt(np.sum(diff**2, axis=-1))[np.triu_indices(len(atoms), k=1)].min())


def _stop_reason(labels: Labels, params: MdParameters) -> str | None:
    if not labels.ok:
        return f"the oracle could not label it: {labels.reason}"
    if labels.forces is None:
        return "the oracle returned no forces"
    spread = labels.uncertainty.max_force_std
    if spread > params.max_force_std:
        return f"committee max force std {spread:.3f} eV/Å exceeds max_force_std {params.max_force_std} eV/Å"
    grade = labels.uncertainty.max_extrapolation_grade
    if grade > params.max_extrapolation_grade:
        return f"extrapolation grade {grade:.3g} exceeds max_extrapolation_grade {params.max_extrapolation_grade:g}"
    return None


def _build_replicas(
    starts: Sequence[Atoms], params: MdParameters, windows: Sequence[DistanceDifferenceRestraint]
) -> list[_Replica]:
    """Replica r of window w gets index w·replicas + r. Plain MD: replica r starts from starts[r % S] at
    temperatures[(r // S) % T], so every start meets every temperature; windows: every replica of a window
    starts from the start whose ξ is nearest the window's centre, at temperatures[r % T]."""
    temperatures = params.temperatures_k
    plan: list[tuple[int, DistanceDifferenceRestraint | None, Atoms, float]] = []
    if windows:
        for w, restraint in enumerate(windows):
            for i, atoms in enumerate(starts):
                try:
                    restraint.check(len(atoms))
                except ValueError as exc:
                    raise ValueError(f"window {w}, start {i}: {exc}") from None
            nearest = min(starts, key=lambda atoms: abs(restraint.value(atoms.positions) - restraint.center))
            for r in range(params.replicas):
                plan.append((w, restraint, nearest, temperatures[r % len(temperatures)]))
    else:
        for r in range(params.replicas):
            start = starts[r % len(starts)]
            plan.append((0, None, start, temperatures[(r // len(starts)) % len(temperatures)]))
    replicas = []
    for index, (window, bias, start, temperature) in enumerate(plan):
        atoms = start.copy()
        atoms.calc = None
        masses = atoms.get_masses()[:, None]
        rng = np.random.default_rng([params.random_seed, index])
        velocities = rng.normal(size=atoms.positions.shape) * np.sqrt(units.kB * temperature / masses)
        velocities = remove_com(velocities, masses, weight_by_mass=True)
        replicas.append(_Replica(index, window, bias, temperature, atoms, masses, velocities, rng))
    return replicas


def _check_starts(starts: Sequence[Atoms], params: MdParameters, windows: Sequence[object]) -> None:
    if not starts:
        raise ValueError("no start structures")
    for i, atoms in enumerate(starts):
        if len(atoms) < 2:
            raise ValueError(f"start {i} has {len(atoms)} atom(s); MD needs at least 2")
        if params.pressure_gpa is not None and not (atoms.pbc.all() and atoms.cell.rank == 3):
            raise ValueError(f"pressure_gpa (NPT) needs periodic cells, but start {i} is not periodic in 3D")
    if params.pressure_gpa is not None and windows:
        raise ValueError("restraint windows run NVT; unset pressure_gpa or the windows")


def run_md(
    starts: Sequence[Atoms],
    params: MdParameters,
    force_field: ForceField,
    windows: Sequence[DistanceDifferenceRestraint] = (),
    should_continue: Callable[[], bool] = lambda: True,
) -> Generator[MdEvent, None, MdSummary]:
    """The replicas' run (see the module docstring) as a generator that yields events as they happen and
    returns the summary. `force_field` gets the running replicas' structures and returns their labels in order
    (one batched oracle call); `should_continue` is asked once per step (False ends the run early, e.g. a
    cancelled call). Raises ValueError at once (before any force call) for parameters, starts or windows that
    cannot run."""
    params.check()
    _check_starts(starts, params, windows)
    return _run_replicas(_build_replicas(starts, params, windows), params, force_field, should_continue)


def _run_replicas(
    replicas: list[_Replica], params: MdParameters, force_field: ForceField, should_continue: Callable[[], bool]
) -> Generator[MdEvent, None, MdSummary]:
    dt = params.timestep_fs * units.fs
    c1 = float(np.exp(-params.friction_per_fs / units.fs * dt))
    c2 = float(np.sqrt(1.0 - c1**2))
    began = time.perf_counter()
    stopped = n_frames = replica_steps = 0
    step = 0

    def stop(replica: _Replica, reason: str) -> ReplicaStoppedEvent:
        nonlocal stopped
        replica.running = False
        stopped += 1
        atoms = replica.atoms.copy()
        atoms.calc = None
        return ReplicaStoppedEvent(replica.index, step, reason, atoms)

    def evaluate(active: list[_Replica]) -> Generator[ReplicaStoppedEvent, None, None]:
        """New forces for the active replicas: the distance guard first, then one oracle call for the rest."""
        for replica in active:
            distance = min_interatomic_distance(replica.atoms)
            if distance < params.min_distance:
                yield stop(
                    replica,
                    f"smallest interatomic distance {distance:.3f} Å fell below min_distance {params.min_distance} Å",
                )
        ask = [replica for replica in active if replica.running]
        if not ask:
            return
        labels = force_field([replica.atoms for replica in ask])
        if len(labels) != len(ask):
            raise RuntimeError(f"the force field returned {len(labels)} labels for {len(ask)} structures")
        for replica, label in zip(ask, labels, strict=True):
            reason = _stop_reason(label, params)
            if reason is not None:
                yield stop(replica, reason)
                continue
            assert label.forces is not None  # _stop_reason stops a replica without forces
            forces = label.forces
            if replica.restraint is not None:
                forces = forces + replica.restraint.energy_and_forces(replica.atoms.positions)[1]
            replica.forces = remove_com(forces, replica.masses, weight_by_mass=False)
            replica.labels = label

    yield from evaluate(replicas)
    while step < params.steps and any(r.running for r in replicas) and should_continue():
        active = [r for r in replicas if r.running]
        for replica in active:
            assert replica.forces is not None
            v, m = replica.velocities, replica.masses
            v += 0.5 * dt * replica.forces / m  # B
            replica.atoms.positions += 0.5 * dt * v  # A
            noise = replica.rng.normal(size=v.shape) * np.sqrt(replica.kt / m)
            v[:] = remove_com(c1 * v + c2 * noise, m, weight_by_mass=True)  # O
            if params.pressure_gpa is not None:
                _rescale_cell(replica, params, dt)
            replica.atoms.positions += 0.5 * dt * replica.velocities  # A
        step += 1
        yield from evaluate(active)
        for replica in active:
            if not replica.running:
                continue
            assert replica.forces is not None and replica.labels is not None
            replica.velocities += 0.5 * dt * replica.forces / replica.masses  # B
            replica_steps += 1
            if step % params.save_interval == 0:
                n_frames += 1
                yield _frame(replica, step)
        yield StepEvent(step, sum(r.running for r in replicas))
    return MdSummary(step, time.perf_counter() - began, len(replicas), stopped, n_frames, replica_steps)


def _rescale_cell(replica: _Replica, params: MdParameters, dt: float) -> None:
    """One stochastic cell-rescaling update (module docstring), with the stress of the last oracle call."""
    assert replica.labels is not None
    if replica.labels.stress is None:
        raise RuntimeError("NPT needs the oracle's stress, but its labels have none")
    atoms = replica.atoms
    volume = atoms.get_volume()
    kinetic = replica.kinetic_energy()
    pressure = 2.0 * kinetic / (3.0 * volume) - float(np.sum(replica.labels.stress[:3])) / 3.0
    target = params.pressure_gpa * units.GPa  # type: ignore[operator]  # set whenever this is called
    beta = params.compressibility_per_gpa / units.GPa  # 1/(eV/Å³)
    tau = params.barostat_time_fs * units.fs
    drift = -beta / tau * (target - pressure - replica.kt / volume) * dt
    noise = np.sqrt(2.0 * replica.kt * beta * dt / (volume * tau)) * replica.rng.normal()
    scale = float(np.exp((drift + noise) / 3.0))
    atoms.set_cell(np.asarray(atoms.cell) * scale, scale_atoms=False)
    atoms.positions *= scale
    replica.velocities /= scale


def _frame(replica: _Replica, step: int) -> FrameEvent:
    assert replica.labels is not None
    atoms = replica.atoms.copy()
    temperature = replica.kinetic_temperature()
    xi = replica.restraint.value(atoms.positions) if replica.restraint is not None else None
    distance = min_interatomic_distance(atoms)
    atoms.info.update(
        {REPLICA_KEY: replica.index, WINDOW_KEY: replica.window, STEP_KEY: step, TEMPERATURE_KEY: replica.temperature_k}
    )
    if xi is not None:
        atoms.info[CV_KEY] = xi
    attach_labels(atoms, replica.labels)
    return FrameEvent(
        replica.index, replica.window, step, atoms, replica.labels, temperature, replica.temperature_k, xi, distance
    )
