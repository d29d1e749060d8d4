"""Training workers as local processes: each in a session of its own, so that it outlives the trainer; a later
trainer knows it again by its pid *and* the process's start time, so a recycled pid is never mistaken for it."""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import subprocess
from pathlib import Path

from pyacemaker.services.trainer.launcher import LOG_FILE, Launched, Launcher, WorkerEnd
from pyacemaker.services.trainer.table import JobRecord

log = logging.getLogger(__name__)

WORK_SUBDIR = "work"


def process_start_time(pid: int) -> str:
    """The kernel's start time of a process (clock ticks since boot), '' when it does not exist. Together with
    the pid it names one process for good: a pid reused later has another start time."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return ""
    fields = stat.rsplit(")", 1)[-1].split()
    if fields[0] == "Z":  # a zombie has finished its work
        return ""
    return fields[19]  # field 22 of stat; fields[0] is field 3


def worker_alive(pid: int, pid_start: str) -> bool:
    return pid > 0 and bool(pid_start) and process_start_time(pid) == pid_start


class LocalLauncher(Launcher):
    """Workers as child processes of this trainer (or, after a restart, of an earlier one)."""

    scheduler = "local"
    limited = True

    def __init__(self) -> None:
        self._children: dict[str, subprocess.Popen[bytes]] = {}

    def start(self, record: JobRecord, job_dir: Path, argv: list[str]) -> Launched:
        env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1"), "PYTHONUNBUFFERED": "1"}
        repo_root = str(Path(__file__).resolve().parents[2])
        env["PYTHONPATH"] = os.pathsep.join(p for p in (repo_root, env.get("PYTHONPATH", "")) if p)
        with open(job_dir / LOG_FILE, "ab") as log_handle:
            process = subprocess.Popen(
                [*argv, str(job_dir)],
                cwd=job_dir / WORK_SUBDIR,
                stdout=log_handle,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                env=env,
                start_new_session=True,  # its own process group: survives the trainer and its signals
            )
        self._children[record.job_id] = process
        log.info("job %s (%s): worker pid %d", record.job_id, record.kind, process.pid)
        return Launched(pid=process.pid, pid_start=process_start_time(process.pid))

    def ended(self, record: JobRecord, job_dir: Path) -> WorkerEnd | None:
        child = self._children.get(record.job_id)
        if child is None:  # started by an earlier trainer process
            if worker_alive(record.pid, record.pid_start):
                return None
            return WorkerEnd(None, "the trainer restarted and the worker is gone")
        code = child.poll()
        if code is None:
            return None
        self._children.pop(record.job_id, None)  # cancel and the monitor may both ask
        if code < 0:
            return WorkerEnd(code, f"the worker was killed by signal {-code}")
        return WorkerEnd(code, f"the worker exited with code {code}")

    def stop(self, record: JobRecord, force: bool) -> None:
        if self.ended_quietly(record):
            return
        with contextlib.suppress(ProcessLookupError, PermissionError):
            # the worker leads its own session: this reaches its children too
            os.killpg(record.pid, signal.SIGKILL if force else signal.SIGTERM)

    def ended_quietly(self, record: JobRecord) -> bool:
        """Whether the worker is gone, without reaping it (the next `ended` reports how)."""
        child = self._children.get(record.job_id)
        if child is not None:
            return child.poll() is not None
        return not worker_alive(record.pid, record.pid_start)

    def log_path(self, record: JobRecord, job_dir: Path) -> Path:
        return job_dir / LOG_FILE
