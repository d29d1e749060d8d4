"""The normal equations of many structures from forked worker processes.

A linear fit's rows come from pyace, which hands every structure's B-gradients over as nested Python lists: one
core's work that BLAS threads do not share (measured on the SN2 flagship's base fit, 2036 frames and 3000
functions: 15 of the 18 ms per frame, 36 s of its 74). With W processes, process w computes the rows of chunks w,
w + W, w + 2W, ... (`linear_ace.chunks`) and sums them into normal equations of its own, in memory it shares with
the parent; the parent then adds the W sums in process order. So the result does not depend on which process was
faster (it is the same on every run with W processes) and equals the one-process sums to round-off.

Costs: W more copies of the equations while they are summed (W is cut to what GRAM_MEMORY_BYTES leaves room
for); each process runs BLAS on one thread and the parent only waits, so W processes use W cores. The processes
are forked: they inherit the design (pyace's evaluator) and the frames instead of receiving them.
"""

from __future__ import annotations

import logging
import mmap
import multiprocessing
import os
import time
import traceback
from collections.abc import Sequence

import numpy as np
from ase import Atoms

from pyacemaker.services.trainer import linear_ace

log = logging.getLogger(__name__)

# Below this many structures per process the fork and the extra copies of the equations cost more than they save.
MIN_STRUCTURES_PER_PROCESS = 128
# How often the parent reports the processes' progress, s.
_POLL_S = 0.5


def job_cores() -> int:
    """The cores this job may use: OMP_NUM_THREADS as the trainer's worker sets it for the job (its `threads`),
    never more than the process may run on."""
    requested = os.environ.get("OMP_NUM_THREADS", "")
    cores = len(os.sched_getaffinity(0))
    return min(int(requested), cores) if requested.isdigit() and int(requested) > 0 else 1


def _shared_like(array: np.ndarray) -> np.ndarray:
    """Zeros shaped and typed like `array` in anonymous shared memory: what a forked child writes there, the parent
    sees."""
    buffer = mmap.mmap(-1, max(array.nbytes, 1))
    return np.frombuffer(buffer, dtype=array.dtype, count=array.size).reshape(array.shape)


def _shared_equations(n_columns: int, n_folds: int, with_stress: bool) -> linear_ace.FoldedNormalEquations:
    equations = linear_ace.FoldedNormalEquations(n_columns, n_folds, with_stress=with_stress)
    for name in linear_ace.EQUATION_ARRAYS:
        setattr(equations, name, _shared_like(getattr(equations, name)))
    return equations


def processes_for(n_structures: int, n_columns: int, n_folds: int, with_stress: bool, cores: int) -> int:
    """Worker processes for a set: one per core, as many as leave MIN_STRUCTURES_PER_PROCESS each and whose
    copies of the equations fit GRAM_MEMORY_BYTES beside the result's; 1: no process, the caller's own."""
    per_copy = 8 * n_columns**2 * n_folds * (3 if with_stress else 2)
    by_memory = max(1, linear_ace.GRAM_MEMORY_BYTES // per_copy - 1)
    return max(1, min(cores, n_structures // MIN_STRUCTURES_PER_PROCESS, by_memory))


def accumulate_in_processes(
    design: linear_ace.AceDesign,
    frames: Sequence[Atoms],
    targets: linear_ace.Targets,
    folds: np.ndarray,
    n_folds: int,
    progress: linear_ace.ProgressCallback | None = None,
    stage: str = "design",
    with_references: bool = True,
    into: linear_ace.FoldedNormalEquations | None = None,
    cores: int | None = None,
) -> linear_ace.FoldedNormalEquations:
    """`linear_ace.accumulate` on `cores` processes (default: `job_cores`), as many as `processes_for` allows;
    in this process when that is one."""
    with_stress = targets.has_stress if into is None else into.with_stress
    workers = processes_for(len(frames), design.n_columns, n_folds, with_stress, cores or job_cores())
    if workers == 1 or "fork" not in multiprocessing.get_all_start_methods():
        return linear_ace.accumulate(design, frames, targets, folds, n_folds, progress, stage, with_references, into)
    context = multiprocessing.get_context("fork")
    shares = [_shared_equations(design.n_columns, n_folds, with_stress) for _ in range(workers)]
    done = context.Value("q", 0)
    failures = context.SimpleQueue()

    def work(worker: int) -> None:
        from threadpoolctl import threadpool_limits

        code = 0
        try:
            with threadpool_limits(limits=1), linear_ace.garbage_collection_paused():
                for number, structures in enumerate(linear_ace.chunks([len(a) for a in frames])):
                    if number % workers != worker:
                        continue
                    linear_ace.accumulate_chunk(
                        shares[worker], design, frames, targets, folds, structures, with_references
                    )
                    with done.get_lock():
                        done.value += len(structures)
        except BaseException as exc:  # everything must reach the parent, then the process ends
            failures.put(f"{type(exc).__name__}: {exc}\n{traceback.format_exc()}")
            code = 1
        os._exit(code)  # no atexit handlers, no flushing of the parent's inherited buffers

    children = [context.Process(target=work, args=(worker,), daemon=True) for worker in range(workers)]
    log.info("rows of %d structures in %d processes", len(frames), workers)
    for child in children:
        child.start()
    try:
        while any(child.is_alive() for child in children):
            time.sleep(_POLL_S)
            if progress is not None:
                progress(int(done.value), len(frames), f"{stage}: rows of {int(done.value)}/{len(frames)} structures")
    finally:
        for child in children:
            if child.is_alive():
                child.terminate()
            child.join()
    if not failures.empty() or any(child.exitcode != 0 for child in children):
        reason = failures.get() if not failures.empty() else f"exit codes {[c.exitcode for c in children]}"
        raise linear_ace.LinearAceError(f"a process computing design rows failed: {reason}")
    result = into or linear_ace.FoldedNormalEquations(design.n_columns, n_folds, with_stress=with_stress)
    for share in shares:
        result.add_equations(share)
    if progress is not None:
        progress(len(frames), len(frames), f"{stage}: rows of {len(frames)}/{len(frames)} structures")
    return result
