"""Crash isolation for cheap backends whose native code can die (tblite): their calculations run in small,
persistent worker subprocesses, `python -m pyacemaker.services.oracle.workers`, one structure at a time per worker.

A worker that dies while labelling (a segfault or abort in native code, an allocation beyond its address-space
limit, an overrun of `WORKER_TIMEOUT_S`) takes only that structure with it: the structure gets a FAILED label
saying how the worker ended, a fresh worker takes the next structure, and the oracle process lives on. A worker
found dead before it was given a structure is replaced without failing anything.

Wire between the oracle and a worker (the worker's stdin and stdout): messages of a 4-byte big-endian length and
that many bytes. The first message to the worker is JSON {"backend": name, "options": {...}}; after that each
request is a serialized Structure and each answer a serialized Labels. The worker's stdout carries only these
answers: whatever the native code prints goes to its stderr, which is the oracle's.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import resource
import select
import signal
import struct
import subprocess
import sys
import threading
import time
import weakref
from collections import deque
from collections.abc import Iterable, Iterator, Mapping, Sequence
from typing import IO, Any

from ase import Atoms

from pyacemaker.labels import Labels, labels_from_proto, labels_to_proto
from pyacemaker.services.oracle.backends.base import OracleBackend
from pyacemaker.structures import atoms_to_structure, structure_to_atoms
from pyacemaker.v1 import common_pb2

log = logging.getLogger(__name__)

# One structure may take this long in a worker before the worker is killed and the structure FAILED.
WORKER_TIMEOUT_S = 900.0
# Address space of a worker: an allocation beyond it fails inside the worker (MemoryError or a crash), never
# the machine. Python + numpy + tblite map ~1 GB of address space before the first calculation.
WORKER_MEMORY_LIMIT_BYTES = 8 * 1024**3
# Requests queued ahead in a worker: enough to hide the round trip, few enough to lose little on a crash.
PIPELINE_DEPTH = 4
PIPELINE_BYTES = 32 * 1024  # well below a pipe's 64 KiB, so a write to the worker never blocks
# Workers found dead before taking a request, replaced in a row before the structure is sent anyway (and fails
# with the way the worker ended): a worker that cannot even start must not loop forever.
MAX_IDLE_DEATHS = 3
_HEADER = struct.Struct(">I")


class WorkerEndedError(RuntimeError):
    """The worker process is gone (or was killed for overrunning); the message says how it ended."""


def _send(stream: IO[bytes], payload: bytes) -> None:
    data = memoryview(_HEADER.pack(len(payload)) + payload)
    while data:  # an unbuffered stream may take a message in parts
        written = stream.write(data)
        data = data[written if written is not None else len(data) :]
    stream.flush()


def _read_exactly(stream: IO[bytes], size: int) -> bytes | None:
    data = b""
    while len(data) < size:
        chunk = stream.read(size - len(data))
        if not chunk:
            return None
        data += chunk
    return data


def _receive(stream: IO[bytes]) -> bytes | None:
    header = _read_exactly(stream, _HEADER.size)
    if header is None:
        return None
    return _read_exactly(stream, _HEADER.unpack(header)[0])


class _Worker:
    """One worker subprocess serving one backend configuration."""

    def __init__(self, backend: str, options: Mapping[str, Any], memory_limit: int) -> None:
        self.process = subprocess.Popen(
            [sys.executable, "-m", "pyacemaker.services.oracle.workers", str(memory_limit)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            # Unbuffered: `receive` selects on the pipe, so no answer may hide in a Python-side read buffer.
            bufsize=0,
        )
        assert self.process.stdin is not None and self.process.stdout is not None
        self._stdin = self.process.stdin
        self._stdout = self.process.stdout
        with contextlib.suppress(OSError):  # a worker that died at once is reported by its first call
            _send(self._stdin, json.dumps({"backend": backend, "options": dict(options)}).encode())

    def alive(self) -> bool:
        return self.process.poll() is None

    def send(self, payload: bytes) -> bool:
        """Queue a request; False when the worker is gone (its end shows in the next `receive`)."""
        try:
            _send(self._stdin, payload)
        except OSError:
            return False
        return True

    def receive(self, timeout: float) -> bytes:
        """The answer to the oldest unanswered request; WorkerEndedError when the worker dies first or
        overruns `timeout` (it is killed then)."""
        ready, _, _ = select.select([self._stdout], [], [], timeout)
        if not ready:
            self.kill()
            raise WorkerEndedError(f"timed out after {timeout:g} s and was killed")
        answer = _receive(self._stdout)
        if answer is None:
            raise WorkerEndedError(self._how_it_ended())
        return answer

    def _how_it_ended(self) -> str:
        try:
            code = self.process.wait(timeout=5.0)
        except subprocess.TimeoutExpired:
            self.kill()
            return "stopped answering and was killed"
        if code < 0:
            try:
                name = signal.Signals(-code).name
            except ValueError:
                name = f"signal {-code}"
            return f"was killed by {name}"
        return f"exited with code {code}"

    def kill(self) -> None:
        with contextlib.suppress(ProcessLookupError):
            self.process.kill()
        self.process.wait()

    def close(self) -> None:
        """End the worker: closing its stdin ends its loop; a worker that lingers is killed."""
        with contextlib.suppress(OSError):
            self._stdin.close()
        try:
            self.process.wait(timeout=2.0)
        except subprocess.TimeoutExpired:
            self.kill()
        with contextlib.suppress(OSError):
            self._stdout.close()


def _close_all(workers: list[_Worker]) -> None:
    for worker in workers:
        worker.close()


def _queued_bytes(requests: Iterable[tuple[bytes, int]]) -> int:
    return sum(len(payload) for payload, _ in requests)


class WorkerPool:
    """Labels structures for one backend configuration in up to `max_workers` worker subprocesses; the
    `label_batch` of the backend it stands for, with crashes turned into FAILED labels."""

    def __init__(
        self,
        backend: OracleBackend,
        options: Mapping[str, Any],
        max_workers: int | None = None,
        timeout_s: float = WORKER_TIMEOUT_S,
        memory_limit: int = WORKER_MEMORY_LIMIT_BYTES,
    ) -> None:
        self.backend = backend
        self.options = dict(options)
        self.max_workers = max_workers or os.cpu_count() or 1
        self.timeout_s = timeout_s
        self.memory_limit = memory_limit
        self.restarts = 0  # workers replaced after dying
        self._idle: list[_Worker] = []
        self._all: list[_Worker] = []
        self._available = threading.Condition()
        self._finalizer = weakref.finalize(self, _close_all, self._all)

    def close(self) -> None:
        self._finalizer()

    def worker_pids(self) -> list[int]:
        with self._available:
            return [worker.process.pid for worker in self._all]

    def label_batch(self, frames: Sequence[Atoms]) -> Iterator[Labels]:
        """Labels in order. Requests are pipelined (a few queued in the worker's stdin, never more than
        PIPELINE_BYTES, so neither pipe can fill up and block both sides), which hides the round trip. When the
        worker dies, the oldest unanswered structure is the one it was labelling: it gets the FAILED label and
        the structures queued behind it go to a fresh worker."""
        # (serialized Structure, its number of atoms): the count turns the flat answer back into (N, 3) forces.
        waiting = deque((atoms_to_structure(atoms).SerializeToString(), len(atoms)) for atoms in frames)
        in_flight: deque[tuple[bytes, int]] = deque()
        idle_deaths = 0
        worker = self._acquire()
        try:
            while waiting or in_flight:
                while (
                    waiting
                    and len(in_flight) < PIPELINE_DEPTH
                    and (not in_flight or _queued_bytes(in_flight) + len(waiting[0][0]) <= PIPELINE_BYTES)
                ):
                    if not worker.send(waiting[0][0]) and not in_flight and idle_deaths < MAX_IDLE_DEATHS:
                        idle_deaths += 1  # died while idle: nothing of ours was in it
                        worker = self._replace(worker)
                        continue
                    in_flight.append(waiting.popleft())
                start = time.perf_counter()
                try:
                    answer = worker.receive(self.timeout_s)
                except WorkerEndedError as exc:
                    in_flight.popleft()
                    waiting.extendleft(reversed(in_flight))
                    in_flight.clear()
                    worker = self._replace(worker)
                    yield self._crash_labels(str(exc), time.perf_counter() - start)
                    continue
                _, n_atoms = in_flight.popleft()
                idle_deaths = 0
                yield labels_from_proto(common_pb2.Labels.FromString(answer), n_atoms)  # the pipe carries the message
        finally:
            if in_flight:  # the consumer stopped early: answers are still due, so this worker cannot be reused
                self._discard(worker)
            else:
                self._release(worker)

    def label(self, atoms: Atoms) -> Labels:
        (labels,) = self.label_batch([atoms])
        return labels

    def _crash_labels(self, how: str, seconds: float) -> Labels:
        reason = f"the {self.backend.name} worker process {how} while labelling this structure"
        log.warning("%s; a new worker takes the next structure", reason)
        return Labels.failed(reason, self.backend.level_of_theory, wall_time_s=seconds, attempts=1)

    def _replace(self, worker: _Worker) -> _Worker:
        self._discard(worker)
        return self._acquire()

    def _acquire(self) -> _Worker:
        with self._available:
            while True:
                while self._idle:
                    worker = self._idle.pop()
                    if worker.alive():
                        return worker
                    self._forget(worker)  # died while idle (killed from outside): replace it, fail nothing
                    self.restarts += 1
                if len(self._all) < self.max_workers:
                    worker = _Worker(self.backend.name, self.options, self.memory_limit)
                    self._all.append(worker)
                    return worker
                self._available.wait()

    def _release(self, worker: _Worker) -> None:
        with self._available:
            self._idle.append(worker)
            self._available.notify()

    def _discard(self, worker: _Worker) -> None:
        with self._available:
            if worker in self._all:
                self._all.remove(worker)
            self.restarts += 1
            self._available.notify()
        worker.close()  # outside the lock: a live worker may take a moment to finish what it was given

    def _forget(self, worker: _Worker) -> None:
        worker.close()
        if worker in self._all:
            self._all.remove(worker)


def main(argv: list[str] | None = None) -> int:
    """The worker: read the backend spec, then label one Structure per request until stdin closes."""
    args = sys.argv[1:] if argv is None else argv
    answers = os.fdopen(os.dup(sys.stdout.fileno()), "wb")
    os.dup2(sys.stderr.fileno(), sys.stdout.fileno())  # native code's prints must not corrupt the answers
    sys.stdout = sys.stderr
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if args and int(args[0]) > 0:
        limit = int(args[0])
        resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
    requests = sys.stdin.buffer
    spec_bytes = _receive(requests)
    if spec_bytes is None:
        return 0
    from pyacemaker.services.oracle.backends import create_backend

    spec = json.loads(spec_bytes)
    backend = create_backend(spec["backend"], spec["options"])
    while (payload := _receive(requests)) is not None:
        try:
            labels = backend.label(structure_to_atoms(common_pb2.Structure.FromString(payload)))
        except Exception as exc:  # label() reports calculation failures itself; this is anything else
            labels = Labels.failed(f"{type(exc).__name__}: {exc}", backend.level_of_theory)
        _send(answers, labels_to_proto(labels).SerializeToString())  # the pipe carries the message
    return 0


if __name__ == "__main__":
    sys.exit(main())
