"""The PBS Pro / OpenPBS executor: one array job per batch (`qsub -J 0-(n-1)%throttle`), watched with
`qstat -t -x -f -F json`.

The array spec follows the OpenPBS qsub man page (`-J <range>[%<max subjobs>]`, which sets the job's
`max_run_subjobs`); PBS releases before 2020 reject the `%` part, so on those set `array_throttle` to at
least the batch size. PBS refuses a one-element range, so a batch of one is submitted as a plain job and the
job script reads index 0. The job's name is the batch name, for `qselect -N` after a crash.

Subjob states: Q queued, H held, W waiting, T transit, M moved, R running, S suspended, E exiting, B begun
(the array itself), X a finished subjob, F a finished job (with -x). A finished subjob's `Exit_status` tells
how it ended: 0..255 the script's own code, 256 + N killed by signal N (qdel), negative values PBS's own
reasons (-25 cpus, -26 vmem, -27 mem, -28 cput, -29 walltime exceeded: final; others are launch failures).
"""

from __future__ import annotations

import json
import logging
import re
import shlex
from collections.abc import Mapping
from pathlib import Path
from typing import Any, ClassVar

from pyacemaker.config import PbsExecutorConfig
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

FINISHED_STATES = frozenset({"X", "F"})
# PBS's own exit codes for a job killed at one of its resource limits (JOB_EXEC_KILL_*).
RESOURCE_LIMIT_EXITS = {-25: "cpu count", -26: "virtual memory", -27: "memory", -28: "cpu time", -29: "walltime"}


class PbsExecutor(Executor):
    scheduler: ClassVar[str] = "pbs"

    def __init__(self, config: PbsExecutorConfig, deployment: BatchExecutorDeployment | None = None) -> None:
        self.config = config
        self.deployment = deployment if deployment is not None else BatchExecutorDeployment()
        self.poll_interval_s = config.poll_interval_s

    def job_script(self, batch: Batch, task_list: Path) -> str:
        template, source = read_template(self.deployment.template, "pbs.sh")
        n_tasks = len(batch.task_dirs)
        config = self.config
        select = f"{config.nodes}:ncpus={config.ncpus}"
        select += f":mpiprocs={config.mpiprocs}" if config.mpiprocs > 1 else ""  # PBS's default is 1
        select += f":mem={config.memory}" if config.memory else ""
        directives = []
        if self.config.queue:
            directives.append(f"#PBS -q {self.config.queue}")
        for extra in self.deployment.extra_directives:
            directives.append(extra if extra.startswith("#PBS") else f"#PBS {extra}")
        values = {
            "job_name": batch.name,
            "array_directive": f"#PBS -J {array_range(n_tasks, self.config.array_throttle)}" if n_tasks > 1 else "",
            "job_dir": str(batch.job_dir),
            "task_list": shlex.quote(str(task_list)),
            "walltime": self.config.walltime,
            "select": select,
            "ncpus": str(self.config.ncpus),
            "threads_per_rank": str(max(1, self.config.ncpus // self.config.mpiprocs)),
            "directives": "\n".join(directives),
            "task_command": batch.task_command(),
        }
        return render_template(template, values, source)

    def submit(self, batch: Batch) -> str:
        task_list = write_task_list(batch)
        script = batch.job_dir / JOB_SCRIPT_FILE
        write_private(script, self.job_script(batch, task_list))
        result = run_command(["qsub", str(script)], cwd=batch.job_dir)
        job_id = result.stdout.strip()
        if result.returncode != 0 or not job_id:
            raise SubmissionError(f"qsub refused the job: {command_message(result)}")
        log.info("pbs job %s: %d subjob(s) submitted (%s)", job_id, len(batch.task_dirs), batch.name)
        return job_id

    def ended(self, job_id: str, task_dirs: Mapping[int, Path]) -> dict[int, TaskEnd] | None:
        result = run_command(["qstat", "-t", "-x", "-f", "-F", "json", job_id])
        if result.returncode != 0:
            if "Unknown Job Id" in result.stderr or "Job has finished" in result.stderr:
                return {i: TaskEnd("UNKNOWN", f"PBS no longer knows job {job_id}") for i in task_dirs}
            log.warning("qstat failed (will ask again): %s", command_message(result))
            return None
        try:
            subjobs = parse_qstat_json(result.stdout)
        except ValueError as exc:
            log.warning("qstat output not understood (will ask again): %s", exc)
            return None
        ends = {}
        for index in task_dirs:
            subjob = subjobs.get(index)
            if subjob is None:
                ends[index] = TaskEnd("UNKNOWN", f"PBS job {job_id} lists no subjob {index}")
            elif subjob.ended is not None:
                ends[index] = subjob.ended
        return ends

    def find_job(self, batch_name: str) -> str | None:
        result = run_command(["qselect", "-x", "-N", batch_name])
        ids = result.stdout.split() if result.returncode == 0 else []
        return ids[0] if ids else None

    def cancel(self, job_id: str) -> None:
        result = run_command(["qdel", job_id])
        if result.returncode != 0:
            raise SubmissionError(f"qdel refused to delete job {job_id}: {command_message(result)}")


class Subjob:
    """One subjob as qstat reports it."""

    def __init__(self, job_id: str, state: str, exit_status: int | None) -> None:
        self.job_id = job_id
        self.state = state
        self.exit_status = exit_status

    @property
    def ended(self) -> TaskEnd | None:
        """How the subjob ended, or None while it is queued or running."""
        if self.state not in FINISHED_STATES:
            return None
        code = self.exit_status
        if code in RESOURCE_LIMIT_EXITS:
            return TaskEnd("LIMIT", f"PBS {self.job_id} killed at its {RESOURCE_LIMIT_EXITS[code]} limit", final=True)
        if code is None:
            return TaskEnd(self.state, f"PBS {self.job_id} finished without an exit status")
        if code >= 256:
            return TaskEnd("KILLED", f"PBS {self.job_id} killed by signal {code - 256}")
        if code < 0:
            return TaskEnd("FAILED", f"PBS {self.job_id} could not run (PBS exit status {code})")
        return TaskEnd("EXITED", f"PBS {self.job_id} exited with code {code}")


_SUBJOB_INDEX = re.compile(r"\[(\d+)\]")


def parse_qstat_json(output: str) -> dict[int, Subjob]:
    """`qstat -t -x -f -F json` output → array index → subjob. The array's own entry (`123[].server`, state
    B or F) is skipped; a plain (non-array) job is index 0."""
    try:
        data: Any = json.loads(output)
    except json.JSONDecodeError as exc:
        raise ValueError(f"not JSON: {exc}") from None
    jobs = data.get("Jobs", {}) if isinstance(data, dict) else None
    if not isinstance(jobs, dict):
        raise ValueError("no 'Jobs' mapping")
    subjobs = {}
    for job_id, attributes in jobs.items():
        if "[]" in job_id:
            continue
        if "array_index" in attributes:
            index = int(attributes["array_index"])
        elif (match := _SUBJOB_INDEX.search(job_id)) is not None:
            index = int(match.group(1))
        else:
            index = 0
        exit_status = attributes.get("Exit_status")
        subjobs[index] = Subjob(
            job_id, str(attributes.get("job_state", "")), None if exit_status is None else int(exit_status)
        )
    return subjobs
