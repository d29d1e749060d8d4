"""Training workers as scheduler jobs: one Slurm or PBS job per attempt, through the oracle's executors (the same
sbatch/qsub submission, job templates, deployment directives and squeue/sacct/qstat parsing as DFT tasks).

The job is an "array" of one task whose task dir is the trainer's job dir; the bundled templates run the worker
there and write its exit status to `exit_code`. The job's name carries the job id and attempt, so a trainer that
died between submitting and recording the scheduler's id finds the job again instead of submitting a second one.
The job table keeps the profile, scheduler and job id: a restarted trainer asks the scheduler about the job and
re-attaches while it is queued or running.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

from pyacemaker.config import PbsExecutorConfig, SlurmExecutorConfig
from pyacemaker.executors import create_executor, default_executor_config
from pyacemaker.executors.base import EXIT_CODE_FILE, Batch, Executor, SubmissionError
from pyacemaker.executors.deployment import BatchExecutorDeployment, ExecutorsDeployment
from pyacemaker.services.trainer.deployment import IMAGE_PYTHON, TrainerExecutorProfile
from pyacemaker.services.trainer.launcher import Launched, Launcher, WorkerEnd
from pyacemaker.services.trainer.table import JobRecord

log = logging.getLogger(__name__)


def batch_name(record: JobRecord) -> str:
    """The scheduler's name for the record's next attempt."""
    return f"pyacemaker-trainer-{record.job_id}-{record.attempt + 1}"


class SchedulerLauncher(Launcher):
    """Workers as jobs of the scheduler one deployment profile names."""

    limited = False

    def __init__(self, profile: TrainerExecutorProfile, binds: tuple[Path, ...] = ()) -> None:
        self.profile = profile
        self.binds = binds  # what an Apptainer image must see: the artifact store and the trainer's work dir
        config: SlurmExecutorConfig | PbsExecutorConfig = profile.executor
        settings = BatchExecutorDeployment(template=profile.template, extra_directives=profile.extra_directives)
        self.executor: Executor = create_executor(config, ExecutorsDeployment(**{config.kind: settings}))
        self.scheduler = config.kind
        self._last_asked: dict[str, float] = {}

    @classmethod
    def for_scheduler(cls, scheduler: str) -> SchedulerLauncher:
        """A launcher with the scheduler's defaults: enough to ask about (or cancel) a job whose profile has left
        the deployment since it was submitted."""
        config = default_executor_config(scheduler)
        assert isinstance(config, SlurmExecutorConfig | PbsExecutorConfig), scheduler
        return cls(TrainerExecutorProfile(executor=config))

    def command(self, argv: list[str]) -> tuple[str, ...]:
        """`argv` as the job runs it: inside the profile's Apptainer image when it names one."""
        if self.profile.apptainer_image is None:
            return tuple(argv)
        binds = [arg for path in self.binds for arg in ("--bind", str(path))]
        inside = [IMAGE_PYTHON, *argv[1:]]  # the image's Python, not the trainer host's
        return (
            "apptainer",
            "exec",
            *self.profile.apptainer_options,
            *binds,
            str(self.profile.apptainer_image),
            *inside,
        )

    def start(self, record: JobRecord, job_dir: Path, argv: list[str]) -> Launched:
        (job_dir / EXIT_CODE_FILE).unlink(missing_ok=True)
        name = batch_name(record)
        job_id = self.executor.find_job(name)  # submitted by a trainer that died before it could record the id
        if job_id is None:
            batch = Batch(name=name, job_dir=job_dir, task_dirs=(job_dir,), command=self.command(argv))
            job_id = self.executor.submit(batch)
        log.info("job %s (%s): %s job %s", record.job_id, record.kind, self.scheduler, job_id)
        return Launched(scheduler_job_id=job_id)

    def ended(self, record: JobRecord, job_dir: Path) -> WorkerEnd | None:
        code = _exit_code(job_dir)
        if code is not None:  # the job script's last word: no need to ask the scheduler
            return WorkerEnd(code, f"{self.scheduler} job {record.scheduler_job_id} exited with code {code}")
        now = time.monotonic()
        if now - self._last_asked.get(record.job_id, -float("inf")) < self.executor.poll_interval_s:
            return None
        self._last_asked[record.job_id] = now
        ends = self.executor.ended(record.scheduler_job_id, {0: job_dir})
        if not ends:  # queued, running, or the scheduler could not be asked
            return None
        self._last_asked.pop(record.job_id, None)
        return WorkerEnd(_exit_code(job_dir), ends[0].reason)

    def stop(self, record: JobRecord, force: bool) -> None:
        if not force:  # the scheduler itself follows its SIGTERM with SIGKILL
            try:
                self.executor.cancel(record.scheduler_job_id)
            except SubmissionError as exc:  # ended meanwhile, or the scheduler is away: `ended` tells which
                log.warning("job %s: %s", record.job_id, exc)
        self._last_asked.pop(record.job_id, None)

    def log_path(self, record: JobRecord, job_dir: Path) -> Path:
        matches = sorted(job_dir.glob(f"*{record.scheduler_job_id}*.out")) if record.scheduler_job_id else []
        return matches[-1] if matches else job_dir / f"{self.scheduler} output of job {record.scheduler_job_id}"


def _exit_code(job_dir: Path) -> int | None:
    try:
        return int((job_dir / EXIT_CODE_FILE).read_text().strip())
    except (OSError, ValueError):
        return None
