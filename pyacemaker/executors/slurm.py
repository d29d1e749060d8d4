"""The Slurm executor: one array job per batch (`sbatch --parsable`), watched with squeue (and sacct where
the cluster keeps accounting).

The job script comes from a template the oracle's deployment can replace (deployment file
`executors.slurm.template`; the bundled one is templates/slurm.sh): array task i runs the task dir on line i + 1
of the batch's task list. The job's name is the batch name, so a batch whose submitter died between sbatch and
recording the job id is found again with `squeue --name`.
"""

from __future__ import annotations

import logging
import re
import shlex
from collections.abc import Mapping
from pathlib import Path
from typing import ClassVar

from pyacemaker.config import SlurmExecutorConfig
from pyacemaker.executors.base import (
    JOB_SCRIPT_FILE,
    Batch,
    Executor,
    SubmissionError,
    TaskEnd,
    array_range,
    command_message,
    read_template,
    render_template,
    run_command,
    write_private,
    write_task_list,
)
from pyacemaker.executors.deployment import BatchExecutorDeployment

log = logging.getLogger(__name__)

# Job states in which a task may still produce its result (squeue's long names).
ACTIVE_STATES = frozenset(
    {
        "PENDING",
        "CONFIGURING",
        "RUNNING",
        "COMPLETING",
        "SUSPENDED",
        "STOPPED",
        "REQUEUED",
        "REQUEUE_FED",
        "REQUEUE_HOLD",
        "RESIZING",
        "SIGNALING",
        "STAGE_OUT",
        "RESV_DEL_HOLD",
    }
)
# Ends that running the same task again would repeat: it hit its own limits.
FINAL_STATES = frozenset({"TIMEOUT", "OUT_OF_MEMORY", "DEADLINE"})


class SlurmExecutor(Executor):
    scheduler: ClassVar[str] = "slurm"

    def __init__(self, config: SlurmExecutorConfig, deployment: BatchExecutorDeployment | None = None) -> None:
        self.config = config
        self.deployment = deployment if deployment is not None else BatchExecutorDeployment()
        self.poll_interval_s = config.poll_interval_s
        self._sacct_works: bool | None = None  # unknown until tried; clusters without accounting say so once

    def job_script(self, batch: Batch, task_list: Path) -> str:
        template, source = read_template(self.deployment.template, "slurm.sh")
        directives = []
        if self.config.partition:
            directives.append(f"#SBATCH --partition={self.config.partition}")
        if self.config.nodes is not None:
            directives.append(f"#SBATCH --nodes={self.config.nodes}")
        if self.config.memory:
            directives.append(f"#SBATCH --mem={self.config.memory}")
        for extra in self.deployment.extra_directives:
            directives.append(extra if extra.startswith("#SBATCH") else f"#SBATCH {extra}")
        values = {
            "job_name": batch.name,
            "array": array_range(len(batch.task_dirs), self.config.array_throttle),
            "job_dir": str(batch.job_dir),
            "task_list": shlex.quote(str(task_list)),
            "time_limit": self.config.time_limit,
            "cpus_per_task": str(self.config.cpus_per_task),
            "ntasks": str(self.config.ntasks),
            "directives": "\n".join(directives),
            "task_command": batch.task_command(),
        }
        return render_template(template, values, source)

    def submit(self, batch: Batch) -> str:
        task_list = write_task_list(batch)
        script = batch.job_dir / JOB_SCRIPT_FILE
        write_private(script, self.job_script(batch, task_list))
        result = run_command(["sbatch", "--parsable", str(script)], cwd=batch.job_dir)
        if result.returncode != 0:
            raise SubmissionError(f"sbatch refused the job: {command_message(result)}")
        # --parsable prints "jobid" or "jobid;cluster".
        job_id = result.stdout.strip().split(";")[0]
        if not job_id.isdigit():
            raise SubmissionError(f"sbatch printed no job id: {result.stdout.strip()!r}")
        log.info("slurm job %s: %d array task(s) submitted (%s)", job_id, len(batch.task_dirs), batch.name)
        return job_id

    def ended(self, job_id: str, task_dirs: Mapping[int, Path]) -> dict[int, TaskEnd] | None:
        result = run_command(["squeue", "-h", "-r", "-t", "all", "-j", job_id, "-o", "%K|%T|%r"])
        if result.returncode != 0 and "Invalid job id" not in result.stderr:
            log.warning("squeue failed (will ask again): %s", command_message(result))
            return None
        states = parse_squeue(result.stdout) if result.returncode == 0 else {}
        missing = [index for index in task_dirs if index not in states]
        if missing:
            # slurmctld forgot them (MinJobAge passed): accounting, where the cluster has it, still knows.
            states = {**self._sacct_states(job_id), **states}
        ends = {}
        for index in task_dirs:
            state = states.get(index, "UNKNOWN")
            if state in ACTIVE_STATES:
                continue
            reason = f"Slurm job {job_id} array task {index} ended {state}"
            if state == "UNKNOWN":
                reason = f"Slurm no longer knows job {job_id} array task {index}"
            ends[index] = TaskEnd(state, reason, final=state in FINAL_STATES)
        return ends

    def find_job(self, batch_name: str) -> str | None:
        result = run_command(["squeue", "-h", "-t", "all", f"--name={batch_name}", "-o", "%F"])
        ids = result.stdout.split() if result.returncode == 0 else []
        return ids[0] if ids else None

    def cancel(self, job_id: str) -> None:
        result = run_command(["scancel", job_id])
        if result.returncode != 0:
            raise SubmissionError(f"scancel refused to cancel job {job_id}: {command_message(result)}")

    def _sacct_states(self, job_id: str) -> dict[int, str]:
        if self._sacct_works is False:
            return {}
        result = run_command(["sacct", "-n", "-P", "-X", "-j", job_id, "-o", "JobID,State"])
        if result.returncode != 0:
            if self._sacct_works is None:
                log.info("sacct unavailable (%s); relying on squeue", command_message(result))
            self._sacct_works = False
            return {}
        self._sacct_works = True
        return parse_sacct(result.stdout)


def parse_squeue(output: str) -> dict[int, str]:
    """`squeue -r -o '%K|%T|%r'` lines → array index → state."""
    states = {}
    for line in output.splitlines():
        fields = line.strip().split("|")
        if len(fields) >= 2 and fields[0].isdigit():
            states[int(fields[0])] = fields[1].strip()
    return states


_SACCT_TASK = re.compile(r"^\d+_(\d+)$")


def parse_sacct(output: str) -> dict[int, str]:
    """`sacct -P -X -o JobID,State` lines (`12_3|CANCELLED by 0`) → array index → state; ranges of tasks
    that never started (`12_[4-7]`) are pending and left out."""
    states = {}
    for line in output.splitlines():
        job, _, state = line.strip().partition("|")
        match = _SACCT_TASK.match(job)
        if match and state:
            states[int(match.group(1))] = state.split()[0]
    return states
