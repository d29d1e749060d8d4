"""How the job manager starts a training worker and learns that it ended: the launcher interface, implemented by
a local process (pyacemaker.services.trainer.processes) and a scheduler job (pyacemaker.services.trainer.scheduler).

Either way the worker is `python -m pyacemaker.services.trainer.worker --store ROOT [--resume] --job-dir DIR`: it
reads the
request from the job dir and leaves result.json there, so the manager judges how a job went from the job dir;
the launcher only says whether the worker still runs and, when it ended without a result, what happened to it.
"""

from __future__ import annotations

import sys
from abc import ABC, abstractmethod
from dataclasses import dataclass
from pathlib import Path

from pyacemaker.services.trainer.table import JobRecord

LOG_FILE = "worker.log"


@dataclass(frozen=True)
class Launched:
    """Where a started worker runs: a local pid (and its start time) or a scheduler's job id."""

    pid: int = 0
    pid_start: str = ""
    scheduler_job_id: str = ""


@dataclass(frozen=True)
class WorkerEnd:
    """A worker that no longer runs: its exit status where known, and for people how it ended."""

    exit_code: int | None
    how: str


class Launcher(ABC):
    scheduler: str  # "local", "slurm", "pbs"
    # Whether the trainer's --max-running-jobs limits these workers (local ones share the trainer's host; a
    # scheduler queues its jobs itself).
    limited: bool

    @abstractmethod
    def start(self, record: JobRecord, job_dir: Path, argv: list[str]) -> Launched:
        """Start `argv` + [job_dir] for the record's next attempt; raises SubmissionError when refused."""

    @abstractmethod
    def ended(self, record: JobRecord, job_dir: Path) -> WorkerEnd | None:
        """None while the record's worker is queued or running (or the scheduler cannot be asked right now)."""

    @abstractmethod
    def stop(self, record: JobRecord, force: bool) -> None:
        """Ask the worker to stop (SIGTERM, scancel); `force` after the grace time (SIGKILL)."""

    @abstractmethod
    def log_path(self, record: JobRecord, job_dir: Path) -> Path:
        """The worker's output."""


def worker_argv(store_root: Path, resume: bool, python: str = sys.executable) -> list[str]:
    """The worker's command without its job dir, which the launcher appends (`--job-dir` comes last)."""
    argv = [python, "-m", "pyacemaker.services.trainer.worker", "--store", str(store_root)]
    if resume:
        argv.append("--resume")
    return [*argv, "--job-dir"]
