"""What every executor does: run a batch of task dirs (one array job), say which of its tasks have ended,
and find a batch again by its name after a crash.

Executors know nothing about backends or labels: a task is a directory that a command turns into its result
(by default the oracle's task runner, `python -m pyacemaker.services.oracle.task`, named here, never imported, writes
`labels.json`; the trainer's worker writes `result.json`). Whether a task ended *with* a result is the caller's
question (it reads the file); the executor only reports how the scheduler saw it end, so the oracle's gateway
can tell a calculation that failed (it wrote a FAILED label) from a task killed before it could write anything.
"""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
from abc import ABC, abstractmethod
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

from pyacemaker.rpc import InvalidInputError

TASK_LIST_FILE = "tasks.txt"
JOB_SCRIPT_FILE = "job.sh"
# Written into the task dir by the bundled job templates once the task's command has ended: its exit status.
EXIT_CODE_FILE = "exit_code"
TEMPLATES_DIR = Path(__file__).resolve().parent / "templates"
# Written into the task dir by the process that runs a task (the oracle's task runner): its pid, so that a local
# executor can tell after a restart whether the task still runs.
PID_FILE = "worker.pid"
# Scheduler commands (sbatch, squeue, qsub, qstat) that take longer than this count as failed.
COMMAND_TIMEOUT_S = 60.0


@dataclass(frozen=True)
class Batch:
    """Tasks to run as one array job: task i of the array runs `task_dirs[i]`."""

    name: str  # unique; the scheduler's job name, so a batch can be found again after a crash
    job_dir: Path  # job script, task list and scheduler logs
    task_dirs: tuple[Path, ...]
    # What each task runs, its task dir appended; empty: the oracle's task runner (`task_argv`). The trainer
    # runs its training worker through the same executors with its own command here.
    command: tuple[str, ...] = ()

    def task_command(self) -> str:
        """The command for the job script (shell-quoted); the template appends the task dir."""
        return shlex.join(self.command) if self.command else task_command()


@dataclass(frozen=True)
class TaskEnd:
    """An array task that is no longer queued or running, as the scheduler (or the local pool) saw it end."""

    state: str  # the scheduler's word: COMPLETED, FAILED, CANCELLED, NODE_FAIL, TIMEOUT, ... or UNKNOWN
    reason: str  # for people: "Slurm job 12 task 3 ended NODE_FAIL", "timed out after 600 s"
    # True when running the task again cannot help (its time or memory limit was hit): no resubmission.
    final: bool = False


class Executor(ABC):
    scheduler: ClassVar[str]
    # Seconds between looks at the scheduler (and at the task dirs for results).
    poll_interval_s: float

    @abstractmethod
    def submit(self, batch: Batch) -> str:
        """Hand the batch to the scheduler and return its job id; raises SubmissionError when refused."""

    @abstractmethod
    def ended(self, job_id: str, task_dirs: Mapping[int, Path]) -> dict[int, TaskEnd] | None:
        """Which of the job's array tasks (index → task dir) have ended, and how; tasks still queued or
        running are left out. None when the scheduler cannot be asked right now (ask again later)."""

    @abstractmethod
    def find_job(self, batch_name: str) -> str | None:
        """The job id of a batch submitted under `batch_name`, if the scheduler knows one (for a batch whose
        submitter died before it could record the id)."""

    def cancel(self, job_id: str) -> None:
        """Ask the scheduler to end the job (all its tasks); raises SubmissionError when it refuses."""
        raise NotImplementedError(f"the {self.scheduler} executor cannot cancel a job")


class SubmissionError(RuntimeError):
    """The scheduler refused a job (bad partition, account, resources); the message is the scheduler's."""


def task_argv() -> list[str]:
    """The command that runs one task dir (its path follows), with this oracle's Python."""
    return [sys.executable, "-m", "pyacemaker.services.oracle.task"]


def zygote_argv() -> list[str]:
    """The warm process the local executor forks task processes from (named here, never imported)."""
    return [sys.executable, "-m", "pyacemaker.services.oracle.zygote"]


def task_command() -> str:
    """`task_argv` for a shell script."""
    return shlex.join(task_argv())


def write_task_list(batch: Batch) -> Path:
    """One task dir per line; array task i reads line i + 1."""
    batch.job_dir.mkdir(parents=True, exist_ok=True)
    path = batch.job_dir / TASK_LIST_FILE
    for task_dir in batch.task_dirs:
        if "\n" in str(task_dir):
            raise InvalidInputError(f"task dir {task_dir!r} contains a newline")
    path.write_text("".join(f"{task_dir}\n" for task_dir in batch.task_dirs))
    return path


_PLACEHOLDER = re.compile(r"\{\{\s*([A-Za-z_][A-Za-z0-9_]*)\s*\}\}")


def render_template(template: str, values: Mapping[str, str], source: str) -> str:
    """Fill `{{ name }}` placeholders. A line that held only a placeholder which came out empty is dropped
    (so optional directives leave no blank lines between #SBATCH lines); an unknown name is an error naming
    the template and the names it may use."""
    unknown = sorted({match.group(1) for match in _PLACEHOLDER.finditer(template)} - set(values))
    if unknown:
        known = ", ".join(sorted(values))
        raise InvalidInputError(
            f"job script template {source}: unknown placeholder(s) {', '.join(unknown)} (known: {known})"
        )
    lines = []
    for line in template.splitlines():
        rendered = _PLACEHOLDER.sub(lambda match: values[match.group(1)], line)
        if not rendered.strip() and _PLACEHOLDER.fullmatch(line.strip()):
            continue
        lines.append(rendered)
    return "\n".join(lines) + "\n"


def read_template(path: Path | None, bundled: str) -> tuple[str, str]:
    """The deployment's template (deployment file `executors.<kind>.template`) or the bundled one; returns
    (text, where it came from)."""
    source = path if path is not None else TEMPLATES_DIR / bundled
    try:
        return source.read_text(), str(source)
    except OSError as exc:
        raise InvalidInputError(f"job script template {source}: cannot be read ({exc.strerror})") from None


def write_private(path: Path, text: str) -> None:
    """Write a file only its owner can read: a job script may hold what a private template held (accounts,
    paths), and the scheduler reads it as the submitting user."""
    path.unlink(missing_ok=True)
    with open(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600), "w") as handle:
        handle.write(text)


def array_range(n_tasks: int, throttle: int) -> str:
    """`0-(n-1)%throttle`, the array spec Slurm and PBS Pro both read (a throttle at or above n is left out)."""
    spec = f"0-{n_tasks - 1}"
    return f"{spec}%{throttle}" if throttle < n_tasks else spec


def run_command(command: list[str], cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    """Run a scheduler command; a missing binary (127) or a hung one (124) comes back as a failed result
    whose stderr says so, like any other refusal, so callers handle one kind of failure."""
    try:
        return subprocess.run(command, cwd=cwd, capture_output=True, text=True, timeout=COMMAND_TIMEOUT_S)
    except FileNotFoundError:
        return subprocess.CompletedProcess(command, 127, "", f"{command[0]}: command not found on this host")
    except subprocess.TimeoutExpired:
        return subprocess.CompletedProcess(command, 124, "", f"{command[0]} timed out after {COMMAND_TIMEOUT_S:g} s")


def command_message(result: subprocess.CompletedProcess[str]) -> str:
    return (result.stderr or result.stdout).strip() or f"exit code {result.returncode}"
