"""The local executor: a pool of worker subprocesses on this machine, `max_workers` at a time.

Each task runs the oracle's task runner on DIR in its own process group, with its output in `DIR/task.log`; a task
still running after `timeout_s` has its whole group killed and ends TIMEOUT (final: the same calculation would
time out again). The task processes are forked from a warm process that has imported the task runner and the
codes it calls (`pyacemaker.services.oracle.zygote`), which saves every task the interpreter's start and those imports;
should that process fail, tasks start as `python -m pyacemaker.services.oracle.task DIR` again. The pool lives as
long as the oracle process, independent of any Label stream, so a client that disconnects and comes back finds its
calculations still running. Workers run in sessions of their own and outlive an oracle that stops: their results
stay in their task dirs.

A batch submitted by an earlier oracle process (before a restart) is unknown to this pool; its tasks count as
running while the worker recorded in `worker.pid` is still alive, and as ended otherwise.
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import os
import queue
import signal
import subprocess
import threading
import time
from collections.abc import Mapping
from pathlib import Path
from typing import ClassVar

from pyacemaker.config import LocalExecutorConfig
from pyacemaker.executors.base import PID_FILE, Batch, Executor, TaskEnd, task_argv, zygote_argv

log = logging.getLogger(__name__)

TASK_LOG_FILE = "task.log"
# How often the gateway looks for results of local tasks; cheap (a stat per task), so short.
LOCAL_POLL_INTERVAL_S = 0.2


class LocalExecutor(Executor):
    scheduler: ClassVar[str] = "local"

    def __init__(self, config: LocalExecutorConfig) -> None:
        self.config = config
        self.poll_interval_s = LOCAL_POLL_INTERVAL_S
        self._queue: queue.Queue[tuple[str, int, Path]] = queue.Queue()
        self._lock = threading.Lock()
        self._ended: dict[str, dict[int, TaskEnd]] = {}
        self._batches: dict[str, str] = {}  # batch name -> job id
        self._sequence = itertools.count(1)
        self._workers: list[threading.Thread] = []
        self._zygote: Zygote | None = None

    def submit(self, batch: Batch) -> str:
        job_id = f"local-{os.getpid()}-{next(self._sequence)}"
        with self._lock:
            self._ended[job_id] = {}
            self._batches[batch.name] = job_id
            self._start_workers()
        for index, task_dir in enumerate(batch.task_dirs):
            self._queue.put((job_id, index, task_dir))
        log.info("local job %s: %d task(s) queued for %d worker(s)", job_id, len(batch.task_dirs), len(self._workers))
        return job_id

    def ended(self, job_id: str, task_dirs: Mapping[int, Path]) -> dict[int, TaskEnd] | None:
        with self._lock:
            known = self._ended.get(job_id)
            if known is not None:
                return {index: end for index, end in known.items() if index in task_dirs}
        # Submitted by an earlier oracle process: its worker may have outlived it.
        unknown = TaskEnd("UNKNOWN", f"local job {job_id} belongs to an oracle process that is gone")
        return {index: unknown for index, task_dir in task_dirs.items() if not _worker_alive(task_dir)}

    def find_job(self, batch_name: str) -> str | None:
        with self._lock:
            return self._batches.get(batch_name)

    def _start_workers(self) -> None:
        if self._zygote is None or not self._zygote.alive:
            try:
                self._zygote = Zygote()
            except OSError as exc:
                log.warning("no warm process to fork tasks from (%s); each task starts a new interpreter", exc)
                self._zygote = None
        while len(self._workers) < self.config.max_workers:
            thread = threading.Thread(target=self._work, name=f"local-executor-{len(self._workers)}", daemon=True)
            thread.start()
            self._workers.append(thread)

    def _work(self) -> None:
        while True:
            job_id, index, task_dir = self._queue.get()
            try:
                end = self._run(task_dir)
            except OSError as exc:  # the task dir vanished or the interpreter cannot start: never hang the stream
                end = TaskEnd("FAILED", f"could not start the worker: {exc}")
            with self._lock:
                self._ended[job_id][index] = end

    def _run(self, task_dir: Path) -> TaskEnd:
        zygote = self._zygote
        if zygote is not None and zygote.alive:
            try:
                pid = zygote.fork(task_dir, task_dir / TASK_LOG_FILE)
            except OSError as exc:
                log.warning("the warm process could not fork a task (%s); starting a new interpreter", exc)
            else:
                return self._wait_for_fork(zygote, pid, task_dir)
        command = [*task_argv(), str(task_dir)]
        with open(task_dir / TASK_LOG_FILE, "ab") as output:
            # A new session: the timeout kills the worker and everything the calculation started (mpirun, pw.x).
            process = subprocess.Popen(
                command, cwd=task_dir, stdin=subprocess.DEVNULL, stdout=output, stderr=output, start_new_session=True
            )
        try:
            returncode = process.wait(timeout=self.config.timeout_s)
        except subprocess.TimeoutExpired:
            _kill_group(process)
            return TaskEnd("TIMEOUT", f"timed out after {self.config.timeout_s:g} s", final=True)
        return _end_of(returncode, task_dir)

    def _wait_for_fork(self, zygote: Zygote, pid: int, task_dir: Path) -> TaskEnd:
        try:
            returncode = zygote.wait(pid, self.config.timeout_s)
        except TimeoutError:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(pid, signal.SIGKILL)
            with contextlib.suppress(TimeoutError):
                zygote.wait(pid, KILL_WAIT_S)
            return TaskEnd("TIMEOUT", f"timed out after {self.config.timeout_s:g} s", final=True)
        if returncode is None:  # the warm process is gone: its child runs on, watched through its pid file
            while _worker_alive(task_dir):
                time.sleep(LOCAL_POLL_INTERVAL_S)
            return TaskEnd("EXITED", f"worker ended, exit status unknown (see {task_dir / TASK_LOG_FILE})")
        return _end_of(returncode, task_dir)


def _end_of(returncode: int, task_dir: Path) -> TaskEnd:
    if returncode < 0:
        return TaskEnd("KILLED", f"worker killed by signal {-returncode} (see {task_dir / TASK_LOG_FILE})")
    return TaskEnd("EXITED", f"worker exited with code {returncode} (see {task_dir / TASK_LOG_FILE})")


# How long a killed task's end, and the zygote's answer to a fork, are waited for, s.
KILL_WAIT_S = 30.0


class Zygote:
    """The warm process the task processes are forked from (`pyacemaker.services.oracle.zygote`), and the thread that
    reads its reports. It ends when this object's process ends (its stdin closes)."""

    def __init__(self) -> None:
        self.process = subprocess.Popen(
            zygote_argv(),
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            start_new_session=True,  # not killed with this process's group: it exits when its stdin closes
        )
        self.alive = True
        self._request_lock = threading.Lock()
        self._started: queue.Queue[int | str] = queue.Queue()
        self._ends: dict[int, int] = {}
        self._changed = threading.Condition()
        threading.Thread(target=self._read, name="zygote-reports", daemon=True).start()

    def fork(self, task_dir: Path, log_file: Path) -> int:
        """Start a task process on `task_dir`; its pid. OSError when the zygote cannot."""
        if "\t" in str(task_dir) or "\n" in str(task_dir) or "\n" in str(log_file):
            raise OSError(f"a task dir the zygote's line protocol cannot carry: {str(task_dir)!r}")
        assert self.process.stdin is not None
        with self._request_lock:
            try:
                self.process.stdin.write(f"{task_dir}\t{log_file}\n".encode())
                self.process.stdin.flush()
                reply = self._started.get(timeout=KILL_WAIT_S)
            except (OSError, ValueError, queue.Empty) as exc:
                self.alive = False
                raise OSError(f"the zygote did not answer ({exc})") from None
        if isinstance(reply, str):
            raise OSError(reply)
        return reply

    def wait(self, pid: int, timeout: float) -> int | None:
        """The task's returncode; None when the zygote ended first; TimeoutError when `timeout` passed first."""
        deadline = time.monotonic() + timeout
        with self._changed:
            while pid not in self._ends:
                remaining = deadline - time.monotonic()
                if not self.alive:
                    return None
                if remaining <= 0:
                    raise TimeoutError(f"task process {pid} still runs after {timeout:g} s")
                self._changed.wait(min(remaining, 1.0))
            return self._ends.pop(pid)

    def _read(self) -> None:
        assert self.process.stdout is not None
        for raw in self.process.stdout:
            kind, _, rest = raw.decode().strip().partition(" ")
            if kind == "started":
                self._started.put(int(rest))
            elif kind == "failed":
                self._started.put(f"the zygote could not fork: {rest}")
            elif kind == "ended":
                pid, code = rest.split()
                with self._changed:
                    self._ends[int(pid)] = int(code)
                    self._changed.notify_all()
        self.alive = False
        self._started.put("the zygote ended")
        with self._changed:
            self._changed.notify_all()


def _kill_group(process: subprocess.Popen[bytes]) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, signal.SIGKILL)
    process.wait()


def _worker_alive(task_dir: Path) -> bool:
    """True while the worker named in the task's pid file runs: that process works in the task dir (the task
    runner changes into it), which tells it from a later process with the same pid. Not its command line: a task
    forked from the zygote carries the zygote's."""
    try:
        pid = int((task_dir / PID_FILE).read_text())
        cwd = Path(os.readlink(f"/proc/{pid}/cwd"))
    except (OSError, ValueError):
        return False
    return cwd == task_dir.resolve()
