"""The one interface every oracle backend implements, shaped like an ASE calculator.

A backend names itself, says which properties it returns and which level of theory its labels belong to, and
hands out a fresh ASE calculator for each structure. `label` runs that calculator and turns whatever goes
wrong inside the calculation into a FAILED label, so one bad structure never ends a stream of thousands.

Self-healing: `calculator(atoms, attempt)` with attempt > 0 is a retry after a failed attempt, and a backend may
then escalate settings that change how the answer is reached (more SCF cycles, damping, a level shift, another
solver) but never the answer itself, so `level_of_theory` is the same for every attempt. `label_with_retries`
runs attempts 0..max_retries and stops at the first success, or early when the failure is an
`UnlabellableStructureError` that no setting can heal.

Backends whose calculations are expensive (`uses_executor`) run in the current working directory: the executor
gives every calculation its own scratch directory and changes into it, so file-based codes (pw.x, VASP) write
their input and output files there.
"""

from __future__ import annotations

import logging
import time
from abc import ABC, abstractmethod
from collections.abc import Iterator, Sequence
from dataclasses import replace
from typing import ClassVar, Protocol

import numpy as np
from ase import Atoms
from ase.calculators.calculator import BaseCalculator, CalculatorError

from pyacemaker.config import ExecutorConfig, RetryConfig
from pyacemaker.labels import Labels
from pyacemaker.structure_checks import StructureLimits
from pyacemaker.structures import labels_of_atoms

log = logging.getLogger(__name__)

# Each attempt's reason is cut to this length in the summary of a structure that failed every attempt, so the
# summary stays readable when a code dumps a long error message.
ATTEMPT_REASON_CHARS = 300
# What a backend whose config says nothing of retries gets: one attempt, a lost task resubmitted once.
NO_RETRIES = RetryConfig(max_retries=0, resubmit_lost_tasks=1)


class UnlabellableStructureError(ValueError):
    """A structure this backend cannot treat with any settings (a periodic cell for a molecular code, an element
    without a pseudopotential); retrying with escalated settings cannot help, so `label_with_retries` stops."""


class OracleBackend(ABC):
    """A source of energies, forces and (for periodic cells) stresses in eV, eV/Å and eV/Å³.

    `label` may be called from several server threads at once; a backend keeps no per-structure state
    (each structure gets its own calculator), so results never depend on what was labelled before.
    """

    name: ClassVar[str]
    implemented_properties: ClassVar[tuple[str, ...]]
    # True when the backend also computes per-structure descriptors (the Describe RPC).
    descriptors: ClassVar[bool] = False
    # True for expensive backends (DFT) whose calculations go through an executor (`config.executor`, with
    # `config.retries`); False for cheap ones labelled in the server's own process.
    uses_executor: ClassVar[bool] = False
    # True for cheap backends whose native code can crash the process (tblite): the oracle labels with them in
    # worker subprocesses (pyacemaker/services/oracle/workers.py), so a crash fails one structure, not the service.
    isolated: ClassVar[bool] = False

    @classmethod
    def unavailable_reason(cls) -> str | None:
        """Why this backend cannot run in this process (e.g. a missing library), or None when it can."""
        return None

    def executor_config(self) -> ExecutorConfig | None:
        """The executor this backend's calculations run through as tasks; None: labelled in the server's own
        process (a backend with `uses_executor` then gets a local executor)."""
        return None

    def retry_config(self) -> RetryConfig:
        """Retries of a failed calculation and resubmissions of a lost task, for calculations run as tasks."""
        return NO_RETRIES

    def describe_batch(self, frames: Sequence[Atoms], first_index: int = 0) -> Iterator[np.ndarray]:
        """Per-atom descriptors (n_atoms, n_features) of each frame, in order; only backends with `descriptors`."""
        raise NotImplementedError(f"oracle backend {self.name!r} computes no descriptors")

    def structure_limits(self) -> StructureLimits:
        """What this backend can take (elements, cutoff of its interactions, most atoms): the oracle checks
        every structure against it before the backend sees it (pyacemaker.structure_checks)."""
        return StructureLimits(owner=f"oracle backend {self.name!r}")

    @property
    @abstractmethod
    def level_of_theory(self) -> str:
        """Backend plus the settings that define the physics; equal strings mean interchangeable labels."""

    @abstractmethod
    def calculator(self, atoms: Atoms, attempt: int = 0) -> BaseCalculator:
        """A fresh ASE calculator for this structure (its charge and spin are in `atoms.info`); `attempt` > 0
        asks for settings that converge more robustly after `attempt` failed tries (see the module docstring).

        May raise for a structure the backend cannot treat; `label` reports that as a FAILED label."""

    def label(self, atoms: Atoms, attempt: int = 0) -> Labels:
        """Energy, forces and, for periodic structures, stress of one structure from one attempt; never raises
        for a failed calculation but returns a FAILED label whose reason says what went wrong."""
        return self._attempt(atoms, attempt)[0]

    def label_with_retries(self, atoms: Atoms, max_retries: int) -> Labels:
        """`label` at attempts 0, 1, ..., max_retries until one succeeds. `attempts` says how many ran and
        `wall_time_s` covers them all; when none succeeds the reason lists every attempt's failure."""
        if max_retries < 0:
            raise ValueError(f"max_retries must be at least 0, got {max_retries}")
        start = time.perf_counter()
        failures: list[str] = []
        for attempt in range(max_retries + 1):
            labels, retryable = self._attempt(atoms, attempt)
            if labels.ok:
                break
            failures.append(labels.reason)
            if not retryable:
                break
        if not labels.ok and len(failures) > 1:
            listed = "; ".join(f"attempt {n}: {_shortened(reason)}" for n, reason in enumerate(failures, start=1))
            labels = Labels.failed(f"failed in all {len(failures)} attempts: {listed}", self.level_of_theory)
        return replace(labels, attempts=len(failures) + int(labels.ok), wall_time_s=time.perf_counter() - start)

    def _attempt(self, atoms: Atoms, attempt: int) -> tuple[Labels, bool]:
        """One attempt's labels, and whether a failure might heal with escalated settings."""
        start = time.perf_counter()
        try:
            work = atoms.copy()
            work.calc = self.calculator(work, attempt)
            for name in self._properties_for(work):
                work.calc.get_property(name, work)
            check_finite(work.calc.results)
            labels = self.annotate(work, labels_of_atoms(work, self.level_of_theory))
            return replace(labels, wall_time_s=time.perf_counter() - start, attempts=1), False
        except Exception as exc:  # every failure of one structure becomes its label, see the module docstring
            if not isinstance(exc, CalculatorError | ValueError | RuntimeError | ArithmeticError | OSError):
                log.warning("%s backend raised an unexpected %s", self.name, type(exc).__name__, exc_info=True)
            reason = f"{type(exc).__name__}: {exc}"
            failed = Labels.failed(reason, self.level_of_theory, wall_time_s=time.perf_counter() - start, attempts=1)
            return failed, not isinstance(exc, UnlabellableStructureError)

    def annotate(self, atoms: Atoms, labels: Labels) -> Labels:
        """The labels of `atoms` (its calculator holds the results) completed with what this backend computes
        beyond energy, forces and stress; unchanged by default."""
        return labels

    def label_batch(self, frames: Sequence[Atoms]) -> Iterator[Labels]:
        """Labels for several structures, in order, each yielded as soon as it is ready. Backends that gain
        from batching (a neural network on a batch) override this."""
        for atoms in frames:
            yield self.label(atoms)

    def _properties_for(self, atoms: Atoms) -> list[str]:
        properties = ["energy", "forces"]
        if "stress" in self.implemented_properties and atoms.pbc.any():
            properties.append("stress")
        return properties


class _TaskSettings(Protocol):
    """The part of a backend's config that says how its calculations run as tasks (config.py's DFT oracles and
    the xtb oracle)."""

    @property
    def executor(self) -> ExecutorConfig | None: ...

    @property
    def retries(self) -> RetryConfig: ...


class ExecutorBackend(OracleBackend):
    """A backend whose config names the executor its calculations run through and how they are retried."""

    config: _TaskSettings

    def executor_config(self) -> ExecutorConfig | None:
        return self.config.executor

    def retry_config(self) -> RetryConfig:
        return self.config.retries


def _shortened(reason: str) -> str:
    reason = " ".join(reason.split())
    return reason if len(reason) <= ATTEMPT_REASON_CHARS else reason[: ATTEMPT_REASON_CHARS - 3] + "..."


def monkhorst_pack_grid(atoms: Atoms, spacing: float) -> tuple[int, int, int]:
    """The k-point grid of the plane-wave backends: along each periodic direction the fewest points whose
    spacing 2π|b_i|/n_i is at most `spacing` (Å⁻¹, the 2π included, as VASP's KSPACING); one point along a
    non-periodic direction."""
    if atoms.cell.rank < 3:
        raise UnlabellableStructureError(f"a k-point grid needs three cell vectors; the cell has {atoms.cell.rank}")
    reciprocal_lengths = 2 * np.pi * np.linalg.norm(np.linalg.inv(np.asarray(atoms.cell)).T, axis=1)
    # The small tolerance keeps a spacing that divides a reciprocal length exactly from adding a point.
    counts = [max(1, int(np.ceil(length / spacing - 1e-9))) for length in reciprocal_lengths]
    n_a, n_b, n_c = (count if periodic else 1 for count, periodic in zip(counts, atoms.pbc, strict=True))
    return n_a, n_b, n_c


def check_finite(results: dict[str, object]) -> None:
    """A NaN or infinite label would poison every fit downstream; treat it as a failed calculation."""
    for name in ("energy", "forces", "stress"):
        if name in results and not np.all(np.isfinite(np.asarray(results[name], dtype=np.float64))):
            raise ArithmeticError(f"{name} is not finite (coinciding atoms?)")
