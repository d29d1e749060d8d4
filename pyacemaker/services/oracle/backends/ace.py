"""An ACE potential (.yace) through pyace's ASE calculator: the student, served like any other oracle, so
validation and MD can use it through the same contract as the teacher and DFT.

The .yace carries its per-element reference energies, so the labels are totals on the level of theory the
potential was fitted to. The level of theory names the file's digest: two different fits never compare equal.
With an active set (.asi, and the .yaml B-basis as the potential) the labels also carry the per-atom
extrapolation grade γ (pyace's D-optimality grade) in their uncertainty. pyace evaluates a .yaml without the
reference energies the trainer records in its metadata; they are added here, so a .yaml and its .yace label
alike.

Why γ is computed here and not by pyace: γ of an atom is max_k |b · A⁻¹_k|, its projections b (one per basis
function of its element) times the inverse active set of the element. pyace does that product structure by
structure and function by function; on the SN2 flagship's refined student (1000 functions per element, 6 atoms)
that took 8.7 of the 9.9 ms a structure cost, which made the student's MD in refinement the slowest part of a
run. Here pyace gives the projections only (1.3 ms) and the products of a whole batch run as one matrix product
per element (0.5 ms a structure for a batch of 200). The grades agree with pyace's to round-off (2e-4 on
grades of order 1, measured on the same structures).

Labels come from pyace's evaluator directly (`label`), not through its ASE calculator, whose bookkeeping (state
checks, atoms copies, list-to-array conversions) cost as much as the evaluation itself: 1.57 against 0.75 ms a
structure on the flagship's student. `calculator` still gives that ASE calculator, for callers that want one.

Processes (`processes`): pyace holds Python's global interpreter lock while it computes, so threads cannot share
a batch; with processes > 1 a large batch (the replicas of one MD step) is split among worker processes, which
every ace backend of the oracle shares and which keep the potentials they were given loaded, so the student's MD
uses every core the oracle has. A part whose worker died goes once more to fresh workers, then gets FAILED labels.
"""

from __future__ import annotations

import functools
import itertools
import multiprocessing
import os
import threading
import time
from collections.abc import Iterator, Sequence
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import replace
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
from ase import Atoms
from ase.calculators.calculator import Calculator

from pyacemaker.ace_reference_energies import potential_e0s
from pyacemaker.artifacts import sha256_of_file
from pyacemaker.config import AceOracleConfig
from pyacemaker.labels import Labels, LabelStatus
from pyacemaker.services.oracle.backends.base import OracleBackend, check_finite

# Structures whose projections are graded together: bounds the projections held at once (atoms × functions).
GRADE_BATCH_ATOMS = 20_000

# Structures a worker process gets at least: a part costs well under 1 ms of pickling and process round trip, a
# structure ~2-3 ms of pyace (6 atoms, 3000 functions).
MIN_STRUCTURES_PER_PROCESS = 4

# The element symbols of a structure's atoms and their projections (pyace's, one row per atom), awaiting γ.
_Projections = tuple[list[str], list[np.ndarray]]


class AceBackend(OracleBackend):
    name: ClassVar[str] = "ace"
    implemented_properties: ClassVar[tuple[str, ...]] = ("energy", "forces", "stress")

    def __init__(self, config: AceOracleConfig) -> None:
        if config.potential.suffix not in (".yace", ".yaml"):
            raise ValueError(f"{config.potential}: the ace backend evaluates .yace (or .yaml) potential files")
        if not config.potential.is_file():
            raise ValueError(f"{config.potential}: no such potential file")
        if config.active_set is not None:
            if config.potential.suffix != ".yaml":
                raise ValueError(f"{config.potential}: γ with an active set needs the .yaml potential, not the .yace")
            if not config.active_set.is_file():
                raise ValueError(f"{config.active_set}: no such active-set file")
        self.config = config
        self.digest = sha256_of_file(config.potential)
        # One loaded potential per server thread: building pyace's calculator costs ~0.7 s (measured on SN2,
        # 372 functions), evaluating it ~3 ms, so a fresh one per structure would make MD with the ACE crawl.
        # Per thread, so concurrent streams never share one; reset before each use, so no result carries over.
        self._local = threading.local()
        self._yaml_e0s = potential_e0s(config.potential) if config.potential.suffix == ".yaml" else {}
        # Per element symbol, the inverse of its active-set matrix (functions × functions).
        self._inverse_active_set = _inverse_active_set(config.active_set) if config.active_set is not None else {}
        self.processes = config.processes or len(os.sched_getaffinity(0))
        self._config_json = config.model_dump_json()  # what a worker process makes its backend from
        self.worker_pids: set[int] = set()  # the worker processes that have labelled a part of a batch

    @classmethod
    def unavailable_reason(cls) -> str | None:
        return _pyace_import_error()

    @property
    def level_of_theory(self) -> str:
        return f"ace:{self.digest[:16]}"

    def calculator(self, atoms: Atoms, attempt: int = 0) -> Calculator:
        calc = self._loaded()
        calc.reset()
        return calc

    def _loaded(self) -> Calculator:
        """This thread's pyace calculator of the potential (loaded on first use)."""
        calc: Calculator | None = getattr(self._local, "calculator", None)
        if calc is None:
            calc = self._load()
            self._local.calculator = calc
        return calc

    def _load(self) -> Calculator:
        from pyace import PyACECalculator

        if self.config.active_set is not None:
            # Projections only: γ is graded here (module docstring), pyace's own grading is not switched on.
            calc = PyACECalculator(str(self.config.potential))
            calc.compute_projections = True
            return calc
        # The recursive evaluator is pyace's fast one.
        return PyACECalculator(str(self.config.potential), recursive_evaluator=True, recursive=True)

    def label(self, atoms: Atoms, attempt: int = 0) -> Labels:
        """Energy, forces (and stress for a periodic cell) from pyace's evaluator directly, the same numbers as
        through `calculator` (module docstring); a failure becomes a FAILED label, as for every backend."""
        start = time.perf_counter()
        try:
            labels, projections = self._evaluate(atoms)
        except Exception as exc:  # one structure's failure is its label, never the oracle's
            reason = f"{type(exc).__name__}: {exc}"
            return Labels.failed(reason, self.level_of_theory, wall_time_s=time.perf_counter() - start, attempts=1)
        labels = replace(labels, wall_time_s=time.perf_counter() - start, attempts=1)
        return self._with_energy_and_grades(atoms, labels, projections)

    def _evaluate(self, atoms: Atoms) -> tuple[Labels, Any]:
        """What pyace's ASE calculator computes for `atoms` (energy without the .yaml's reference energies),
        and the projections when there is an active set to grade them against."""
        from pyace.atomicenvironment import aseatoms_to_atomicenvironment

        calc = self._loaded()
        try:
            environment = aseatoms_to_atomicenvironment(
                atoms,
                cutoff=calc.cutoff,  # type: ignore[attr-defined]
                elements_mapper_dict=calc.elements_mapper_dict,  # type: ignore[attr-defined]
            )
        except KeyError as exc:
            known = [str(name) for name in calc.basis.elements_name]  # type: ignore[attr-defined]
            raise ValueError(f"unsupported species {exc}; the potential has {known}") from None
        evaluator = calc.ace  # type: ignore[attr-defined]
        grading = bool(self._inverse_active_set)
        evaluator.compute(environment, compute_projections=grading)
        energy, forces, stress = float(evaluator.energy), np.array(evaluator.forces, dtype=np.float64), None
        if atoms.pbc.any() and atoms.cell.rank == 3:
            # pyace's virial (xx, yy, zz, xy, xz, yz) as ASE's Voigt stress (xx, yy, zz, yz, xz, xy), as its
            # calculator converts it.
            virial = np.array(evaluator.virial, dtype=np.float64)
            stress = virial[[0, 1, 2, 5, 4, 3]] / atoms.get_volume()
        check_finite({"energy": energy, "forces": forces, **({} if stress is None else {"stress": stress})})
        labels = Labels(
            LabelStatus.OK, energy=energy, forces=forces, stress=stress, level_of_theory=self.level_of_theory
        )
        return labels, evaluator.projections if grading else None

    def annotate(self, atoms: Atoms, labels: Labels) -> Labels:
        """The labels of the ASE path (`calculator`, as the base class labels with retries) completed like
        `label`'s."""
        assert atoms.calc is not None
        projections = atoms.calc.projections if self._inverse_active_set else None  # type: ignore[attr-defined]
        return self._with_energy_and_grades(atoms, labels, projections)

    def _with_energy_and_grades(self, atoms: Atoms, labels: Labels, projections: Any) -> Labels:
        """The .yaml's reference energies added to the energy; γ from pyace's projections (None: no active set),
        one row per atom of its element's length, graded at once or, inside `_label_here`, with the rest of the
        batch."""
        if self._yaml_e0s and labels.energy is not None:
            labels = replace(labels, energy=labels.energy + sum(self._yaml_e0s.get(int(z), 0.0) for z in atoms.numbers))
        if projections is None:
            return labels
        entry = (atoms.get_chemical_symbols(), [np.asarray(row, dtype=np.float64) for row in projections])
        pending: list[_Projections] | None = getattr(self._local, "pending", None)
        if pending is None:
            return self._graded(labels, self._grades([entry])[0])
        pending.append(entry)  # graded with the rest of its batch, in `label_batch`
        return labels

    def label_batch(self, frames: Sequence[Atoms]) -> Iterator[Labels]:
        """Labels in order; a batch large enough is shared among `processes` worker processes."""
        parts = min(self.processes, len(frames) // MIN_STRUCTURES_PER_PROCESS)
        if parts > 1:
            yield from self._label_in_processes(frames, parts)
        else:
            yield from self._label_here(frames)

    def _label_in_processes(self, frames: Sequence[Atoms], parts: int) -> Iterator[Labels]:
        """The parts of the batch in the worker processes. A part whose worker died (killed while idle, or by
        the part itself) goes once more to fresh workers: so a dead idle worker costs nothing, and a part that
        kills its worker again gets FAILED labels; the oracle lives on either way."""
        spans = list(itertools.pairwise(np.linspace(0, len(frames), parts + 1).round().astype(int).tolist()))
        pool = _WORKERS.pool(self.processes)
        outcomes = self._run_parts(pool, frames, spans)
        broken = [i for i, outcome in enumerate(outcomes) if isinstance(outcome, BrokenProcessPool)]
        if broken:
            _WORKERS.discard(self.processes, pool)
            pool = _WORKERS.pool(self.processes)
            for i, outcome in zip(broken, self._run_parts(pool, frames, [spans[i] for i in broken]), strict=True):
                outcomes[i] = outcome
            if any(isinstance(outcomes[i], BrokenProcessPool) for i in broken):
                _WORKERS.discard(self.processes, pool)
        for (a, b), outcome in zip(spans, outcomes, strict=True):
            if isinstance(outcome, BaseException):
                reason = f"the ace worker process failed on this part of the batch: {type(outcome).__name__}: {outcome}"
                yield from (Labels.failed(reason, self.level_of_theory) for _ in range(b - a))
            else:
                yield from outcome

    def _run_parts(
        self, pool: ProcessPoolExecutor, frames: Sequence[Atoms], spans: list[tuple[int, int]]
    ) -> list[list[Labels] | BaseException]:
        outcomes: list[list[Labels] | BaseException] = []
        try:
            futures = [pool.submit(_label_in_worker, self._config_json, list(frames[a:b])) for a, b in spans]
        except BrokenProcessPool as exc:
            return [exc] * len(spans)
        for future in futures:
            try:
                pid, labels = future.result()
            except Exception as exc:  # BrokenProcessPool (a worker died) or an error inside the worker
                outcomes.append(exc)
                continue
            self.worker_pids.add(pid)
            outcomes.append(labels)
        return outcomes

    def _label_here(self, frames: Sequence[Atoms]) -> Iterator[Labels]:
        """With an active set, the labels of up to GRADE_BATCH_ATOMS atoms at a time, graded together."""
        if not self._inverse_active_set:
            yield from super().label_batch(frames)
            return
        start = 0
        while start < len(frames):
            stop, atoms_count = start, 0
            while stop < len(frames) and (stop == start or atoms_count + len(frames[stop]) <= GRADE_BATCH_ATOMS):
                atoms_count += len(frames[stop])
                stop += 1
            self._local.pending = []
            try:
                batch = [self.label(atoms) for atoms in frames[start:stop]]
                grades = iter(self._grades(self._local.pending))
            finally:
                self._local.pending = None
            # The OK labels are exactly those that reached `annotate`, in order: a failed calculation never does.
            for labels in batch:
                yield self._graded(labels, next(grades)) if labels.ok else labels
            start = stop

    def _grades(self, pending: Sequence[_Projections]) -> list[np.ndarray | None]:
        """γ of every atom of each pending structure, one matrix product per element over all of them; None for
        every structure when the active set does not belong to the potential."""
        rows: dict[str, list[np.ndarray]] = {}
        for symbols, projections in pending:
            for symbol, row in zip(symbols, projections, strict=True):
                rows.setdefault(symbol, []).append(row)
        grades: dict[str, Iterator[float]] = {}
        for symbol, element_rows in rows.items():
            inverse = self._inverse_active_set.get(symbol)
            stacked = np.vstack(element_rows)
            if inverse is None or inverse.shape[0] != stacked.shape[1]:
                return [None] * len(pending)
            grades[symbol] = iter(np.abs(stacked @ inverse).max(axis=1).tolist())
        return [np.array([next(grades[symbol]) for symbol in symbols]) for symbols, _ in pending]

    def _graded(self, labels: Labels, grades: np.ndarray | None) -> Labels:
        """The labels with their atoms' γ, or FAILED when there is none (`grades` None: see `_grades`)."""
        if grades is None:
            reason = f"{self.config.active_set}: the active set does not belong to this potential"
            return Labels.failed(reason, self.level_of_theory, labels.wall_time_s, labels.attempts)
        uncertainty = replace(
            labels.uncertainty, extrapolation_grade=grades, max_extrapolation_grade=float(grades.max(initial=0.0))
        )
        return replace(labels, uncertainty=uncertainty)


class _SharedWorkers:
    """The worker processes of every ace backend in this oracle, one pool per size: started once, so a new potential
    (each refinement round has one) costs a load in the workers, not new processes (~3 s to start and import)."""

    def __init__(self) -> None:
        self._pools: dict[int, ProcessPoolExecutor] = {}
        self._lock = threading.Lock()

    def pool(self, size: int) -> ProcessPoolExecutor:
        with self._lock:
            if size not in self._pools:
                # spawn, not fork: the oracle runs gRPC threads, which a forked child must not inherit.
                self._pools[size] = ProcessPoolExecutor(size, mp_context=multiprocessing.get_context("spawn"))
            return self._pools[size]

    def discard(self, size: int, pool: ProcessPoolExecutor) -> None:
        """Drop a pool whose worker died; the next batch gets a fresh one."""
        with self._lock:
            if self._pools.get(size) is pool:
                del self._pools[size]
        pool.shutdown(wait=False, cancel_futures=True)


_WORKERS = _SharedWorkers()
# Potentials a worker keeps loaded: the current student and the one before it.
WORKER_BACKENDS = 2


@functools.lru_cache(maxsize=WORKER_BACKENDS)
def _worker_backend(config_json: str) -> AceBackend:
    config = AceOracleConfig.model_validate_json(config_json)
    return AceBackend(config.model_copy(update={"processes": 1}))


def _label_in_worker(config_json: str, frames: list[Atoms]) -> tuple[int, list[Labels]]:
    return os.getpid(), list(_worker_backend(config_json).label_batch(frames))


def _inverse_active_set(path: Path) -> dict[str, np.ndarray]:
    """The .asi file (pyace's format: one inverse active-set matrix per element symbol, numpy's npz)."""
    try:
        with np.load(path) as data:
            return {str(symbol): np.asarray(data[symbol], dtype=np.float64) for symbol in data.files}
    except (OSError, ValueError) as exc:
        raise ValueError(f"{path}: not an active-set file ({exc})") from None


@functools.cache
def _pyace_import_error() -> str | None:
    try:
        import pyace  # noqa: F401
    except ImportError as exc:
        return f"python-ace is not installed (pip install 'pyacemaker[trainer]'): {exc}"
    return None
