"""The local executor: a pool of worker subprocesses on this machine, `max_workers` at a time.

Each task runs as `python -m pyacemaker.services.oracle.task DIR` in its own process group, with its output in
`DIR/task.log`; a task still running after `timeout_s` has its whole group killed and ends TIMEOUT (final:
the same calculation would time out again). The pool lives as long as the oracle process, independent of
any Label stream, so a client that disconnects and comes back finds its calculations still running. Workers
run in sessions of their own and outlive an oracle that stops: their results stay in their task dirs.

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
from collections.abc import Mapping
from pathlib import Path
from typing import ClassVar

from pyacemaker.config import LocalExecutorConfig
from pyacemaker.executors.base import PID_FILE, Batch, Executor, TaskEnd, task_argv

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
        if returncode < 0:
            return TaskEnd("KILLED", f"worker killed by signal {-returncode} (see {task_dir / TASK_LOG_FILE})")
        return TaskEnd("EXITED", f"worker exited with code {returncode} (see {task_dir / TASK_LOG_FILE})")


def _kill_group(process: subprocess.Popen[bytes]) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, signal.SIGKILL)
    process.wait()


def _worker_alive(task_dir: Path) -> bool:
    """True while the worker named in the task's pid file runs (its command line names the task dir)."""
    try:
        pid = int((task_dir / PID_FILE).read_text())
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
    except (OSError, ValueError):
        return False
    return str(task_dir).encode() in cmdline.split(b"\0")
