"""Durable training jobs: the job manager, which starts, watches, cancels and resumes them.

Why this shape: training runs for minutes to hours, longer than any client connection and longer than the
trainer process may live. So a job is a row in SQLite (pyacemaker.services.trainer.table) plus a directory, and the work
happens in a worker (`python -m pyacemaker.services.trainer.worker`) that a launcher starts: a local process in its own
session (pyacemaker.services.trainer.processes) or a Slurm/PBS job (pyacemaker.services.trainer.scheduler), chosen
per job by an
executor profile of the trainer's deployment (pyacemaker.services.trainer.deployment). The worker writes progress,
checkpoints and finally `result.json` into the job directory. Nothing the client or the trainer does to its own
process (a disconnect, a restart, a crash) touches the worker:

- a client disconnect ends only its WatchJob stream;
- a trainer that stops leaves its workers running; the next trainer process re-attaches to a worker that still
  runs (a local one by pid and process start time, a scheduler job by its id) and reports a job whose worker is
  gone without a result as INTERRUPTED;
- ResumeJob continues an INTERRUPTED job from its last checkpoint (MACE) or restarts it (`restart=True`,
  and always for the linear fits, which have nothing to resume from).

Layout of `<work dir>/jobs/<job id>/`: request.pb (the StartJobRequest), progress.jsonl, worker.log (or the
scheduler's output file), result.json (written last, atomically), work/ (the job's scratch and checkpoints).
"""

from __future__ import annotations

import contextlib
import logging
import shutil
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

from google.protobuf.timestamp_pb2 import Timestamp

from pyacemaker.artifacts import ArtifactStore
from pyacemaker.executors.base import SubmissionError
from pyacemaker.rpc import InvalidInputError, WrongStateError
from pyacemaker.services.trainer.deployment import TrainerDeployment
from pyacemaker.services.trainer.launcher import Launcher, WorkerEnd, worker_argv
from pyacemaker.services.trainer.processes import WORK_SUBDIR, LocalLauncher
from pyacemaker.services.trainer.progress import PROGRESS_FILE, ProgressReader
from pyacemaker.services.trainer.results import RESULT_FILE, read_result
from pyacemaker.services.trainer.scheduler import SchedulerLauncher
from pyacemaker.services.trainer.table import LOCAL_PROFILE, JobNotFoundError, JobRecord, JobTable
from pyacemaker.services.trainer.worker import JOB_KINDS, job_kind
from pyacemaker.v1 import common_pb2, trainer_pb2

log = logging.getLogger(__name__)

REQUEST_FILE = "request.pb"
TERMINAL_STATES = {common_pb2.JOB_STATE_SUCCEEDED, common_pb2.JOB_STATE_FAILED, common_pb2.JOB_STATE_CANCELLED}
# How long CancelJob waits after SIGTERM (scancel) before it sends SIGKILL, and then for the worker's end.
CANCEL_GRACE_S = 5.0
CANCEL_WAIT_S = 60.0

__all__ = ["REQUEST_FILE", "WORK_SUBDIR", "JobManager", "JobNotFoundError"]


def _timestamp(seconds: float) -> Timestamp:
    stamp = Timestamp()
    stamp.FromNanoseconds(int(seconds * 1e9))
    return stamp


Validator = Callable[[trainer_pb2.StartJobRequest], None]


class JobManager:
    """Starts, watches, cancels and resumes jobs; one per trainer process and work dir."""

    def __init__(
        self,
        store: ArtifactStore,
        work_dir: Path,
        validate: Validator | None = None,
        max_running: int = 1,
        poll_interval_s: float = 0.25,
        deployment: TrainerDeployment | None = None,
    ) -> None:
        self.store = store
        self.work_dir = Path(work_dir).resolve()
        self.jobs_dir = self.work_dir / "jobs"
        self.jobs_dir.mkdir(parents=True, exist_ok=True)
        self.table = JobTable(self.work_dir / "jobs.sqlite")
        self.validate = validate
        self.max_running = max(1, max_running)
        self.poll_interval_s = poll_interval_s
        self.deployment = deployment if deployment is not None else TrainerDeployment()
        # One launcher per executor profile ("local" always); scheduler jobs may run inside an Apptainer image,
        # which must see the store and the job dirs.
        binds = (self.store.root.resolve(), self.work_dir)
        self.launchers: dict[str, Launcher] = {LOCAL_PROFILE: LocalLauncher()}
        for name, profile in self.deployment.executors.items():
            self.launchers[name] = SchedulerLauncher(profile, binds)
        self._stage_readers: dict[str, ProgressReader] = {}
        self._lock = threading.RLock()
        self._stop = threading.Event()
        self.recover()
        self._launch_ready()
        self._monitor = threading.Thread(target=self._monitor_loop, name="trainer-job-monitor", daemon=True)
        self._monitor.start()

    # ----------------------------------------------------------------------------------------------- paths
    def job_dir(self, job_id: str) -> Path:
        return self.jobs_dir / job_id

    # ------------------------------------------------------------------------------------------ public API
    def start(self, request: trainer_pb2.StartJobRequest) -> common_pb2.Job:
        kind, _ = job_kind(request)
        serialized = request.SerializeToString(deterministic=True)
        if request.idempotency_key:
            with contextlib.suppress(JobNotFoundError):
                existing = self.table.by_key(request.idempotency_key)
                if existing.request != serialized:
                    raise InvalidInputError(
                        f"idempotency key {request.idempotency_key!r} already names job {existing.job_id} with a "
                        "different request; use a new key for a new job"
                    )
                return self.job(existing.job_id)
        profile = self.deployment.profile_name(request.executor_profile)
        if self.validate is not None:
            self.validate(request)
        now = time.time()
        record = JobRecord(
            job_id=f"job-{uuid.uuid4().hex[:12]}",
            kind=kind,
            state=common_pb2.JOB_STATE_QUEUED,
            request=serialized,
            idempotency_key=request.idempotency_key,
            created=now,
            updated=now,
            profile=profile,
            scheduler=self.launchers[profile].scheduler,
        )
        with self._lock:
            stored = self.table.insert(record)
            if stored.job_id == record.job_id:
                job_dir = self.job_dir(record.job_id)
                (job_dir / WORK_SUBDIR).mkdir(parents=True, exist_ok=True)
                (job_dir / REQUEST_FILE).write_bytes(serialized)
                self._launch_ready()
        return self.job(stored.job_id)

    def job(self, job_id: str) -> common_pb2.Job:
        return self._to_message(self.table.get(job_id))

    def cancel(self, job_id: str) -> common_pb2.Job:
        """Stop a job for good. Cancelling a finished job changes nothing and returns it as it is."""
        with self._lock:
            record = self.table.get(job_id)
            if record.state in TERMINAL_STATES:
                return self._to_message(record)
            if record.state != common_pb2.JOB_STATE_RUNNING:
                self.table.update(job_id, state=common_pb2.JOB_STATE_CANCELLED, error="cancelled before it ran")
                return self.job(job_id)
            self.table.update(job_id, cancel_requested=True)
            launcher = self._launcher(record)
            launcher.stop(record, force=False)
        end = self._wait_for_end(record, CANCEL_GRACE_S)
        if end is None:
            launcher.stop(record, force=True)
            end = self._wait_for_end(record, CANCEL_WAIT_S)
        with self._lock:
            record = self.table.get(job_id)
            if record.state == common_pb2.JOB_STATE_RUNNING:
                self._finalize(record, end or WorkerEnd(None, "the worker did not stop"))
        return self.job(job_id)

    def resume(self, job_id: str, restart: bool) -> common_pb2.Job:
        """Continue an INTERRUPTED job from its last checkpoint, or (restart) run any job that did not succeed
        again from scratch."""
        with self._lock:
            record = self.table.get(job_id)
            allowed = {common_pb2.JOB_STATE_INTERRUPTED}
            if restart:
                allowed |= {common_pb2.JOB_STATE_FAILED, common_pb2.JOB_STATE_CANCELLED}
            if record.state not in allowed:
                state = common_pb2.JobState.Name(record.state)
                hint = "" if restart else " (set restart to run a failed or cancelled job again)"
                raise WrongStateError(f"job {job_id} is {state}; only an interrupted job can be resumed{hint}")
            from_checkpoint = not restart and JOB_KINDS[record.kind].resumable
            job_dir = self.job_dir(job_id)
            if not from_checkpoint:
                shutil.rmtree(job_dir / WORK_SUBDIR, ignore_errors=True)
                (job_dir / WORK_SUBDIR).mkdir(parents=True, exist_ok=True)
                (job_dir / PROGRESS_FILE).unlink(missing_ok=True)
                self._stage_readers.pop(job_id, None)
            self.table.update(
                job_id,
                state=common_pb2.JOB_STATE_QUEUED,
                error="",
                resume=from_checkpoint,
                cancel_requested=False,
                metrics={},
                outputs=[],
            )
            self._launch_ready()
        return self.job(job_id)

    def watch(
        self, job_id: str, is_active: Callable[[], bool] = lambda: True
    ) -> Iterator[tuple[common_pb2.Job, trainer_pb2.TrainingProgress | None]]:
        """The job now, then every training line the worker has written (from the start, so a reconnecting
        client sees the whole history) and every change of the job, until the job ends or `is_active` turns
        false. Only this generator stops when the client goes away; the job does not notice."""
        reader = ProgressReader(self.job_dir(job_id) / PROGRESS_FILE)
        last_sent: bytes | None = None
        while True:
            record = self.table.get(job_id)
            lines = reader.read_new()
            job = self._to_message(record)
            for line in lines:
                yield job, line
            snapshot = job.SerializeToString(deterministic=True)
            if snapshot != last_sent:
                last_sent = snapshot
                yield job, None
            if record.state in TERMINAL_STATES | {common_pb2.JOB_STATE_INTERRUPTED} and not lines:
                return
            if not is_active():
                return
            time.sleep(self.poll_interval_s)

    def shutdown(self, stop_workers: bool = False) -> None:
        """Stop monitoring. Workers keep running (a later trainer re-adopts them) unless `stop_workers`, which
        tests use so that nothing outlives them."""
        self._stop.set()
        self._monitor.join(timeout=5.0)
        if stop_workers:
            for record in self.table.with_states(common_pb2.JOB_STATE_RUNNING, common_pb2.JOB_STATE_QUEUED):
                self.cancel(record.job_id)

    # ------------------------------------------------------------------------------------------- internals
    def _to_message(self, record: JobRecord) -> common_pb2.Job:
        with self._lock:
            reader = self._stage_readers.setdefault(
                record.job_id, ProgressReader(self.job_dir(record.job_id) / PROGRESS_FILE)
            )
            reader.read_new()
            progress = reader.latest_stage
        return common_pb2.Job(
            job_id=record.job_id,
            kind=record.kind,
            state=record.state,  # type: ignore[arg-type]
            progress=progress,
            error=record.error,
            metrics=record.metrics,
            outputs=record.outputs,
            created=_timestamp(record.created),
            updated=_timestamp(record.updated),
        )

    def recover(self) -> None:
        """Reconcile RUNNING rows with reality after a (re)start: finished workers are finalised, running ones
        (local processes, scheduler jobs) re-attached, vanished ones reported INTERRUPTED."""
        with self._lock:
            for record in self.table.with_states(common_pb2.JOB_STATE_RUNNING):
                end = self._launcher(record).ended(record, self.job_dir(record.job_id))
                if end is None:
                    where = f"pid {record.pid}" if record.scheduler == LocalLauncher.scheduler else ""
                    where = where or f"{record.scheduler} job {record.scheduler_job_id}"
                    log.info("re-attached to job %s (%s)", record.job_id, where)
                    continue
                self._finalize(record, end)

    def _launcher(self, record: JobRecord) -> Launcher:
        """The launcher of the record's profile; for a profile that has left the deployment since the job was
        submitted (or now names another scheduler), one with its scheduler's defaults, enough to ask about and
        cancel the job."""
        launcher = self.launchers.get(record.profile)
        if launcher is not None and launcher.scheduler == record.scheduler:
            return launcher
        if record.scheduler == LocalLauncher.scheduler:
            return self.launchers[LOCAL_PROFILE]
        key = f"{record.profile} (as submitted: {record.scheduler})"
        if key not in self.launchers:
            self.launchers[key] = SchedulerLauncher.for_scheduler(record.scheduler)
        return self.launchers[key]

    def _launch_ready(self) -> None:
        with self._lock:
            running = sum(self._launcher(r).limited for r in self.table.with_states(common_pb2.JOB_STATE_RUNNING))
            for record in self.table.with_states(common_pb2.JOB_STATE_QUEUED):
                if record.profile != LOCAL_PROFILE and record.profile not in self.deployment.executors:
                    error = (
                        f"executor profile {record.profile!r} is no longer in this trainer's deployment (it has: "
                        f"{self.deployment.known()}); start the job again with another profile"
                    )
                    self.table.update(record.job_id, state=common_pb2.JOB_STATE_FAILED, error=error)
                    continue
                launcher = self.launchers[record.profile]  # as the deployment says now
                if launcher.limited and running >= self.max_running:
                    continue
                self._launch(record, launcher)
                running += launcher.limited

    def _launch(self, record: JobRecord, launcher: Launcher) -> None:
        job_dir = self.job_dir(record.job_id)
        (job_dir / WORK_SUBDIR).mkdir(parents=True, exist_ok=True)
        (job_dir / RESULT_FILE).unlink(missing_ok=True)
        argv = worker_argv(self.store.root, record.resume)
        try:
            launched = launcher.start(record, job_dir, argv)
        except SubmissionError as exc:
            self.table.update(
                record.job_id, state=common_pb2.JOB_STATE_FAILED, error=str(exc), attempt=record.attempt + 1
            )
            log.warning("job %s could not start: %s", record.job_id, exc)
            return
        self.table.update(
            record.job_id,
            state=common_pb2.JOB_STATE_RUNNING,
            pid=launched.pid,
            pid_start=launched.pid_start,
            scheduler=launcher.scheduler,
            scheduler_job_id=launched.scheduler_job_id,
            attempt=record.attempt + 1,
        )

    def _wait_for_end(self, record: JobRecord, timeout_s: float) -> WorkerEnd | None:
        launcher = self._launcher(record)
        deadline = time.monotonic() + timeout_s
        while True:
            end = launcher.ended(record, self.job_dir(record.job_id))
            if end is not None or time.monotonic() > deadline:
                return end
            time.sleep(0.05)

    def _finalize(self, record: JobRecord, end: WorkerEnd) -> None:
        """Record how a job whose worker is no longer running ended."""
        result = read_result(self.job_dir(record.job_id))
        if result is not None and result.succeeded:
            self.table.update(
                record.job_id,
                state=common_pb2.JOB_STATE_SUCCEEDED,
                error="",
                metrics=result.metrics,
                outputs=result.outputs,
                pid=0,
            )
        elif record.cancel_requested:
            self.table.update(record.job_id, state=common_pb2.JOB_STATE_CANCELLED, error="cancelled", pid=0)
        elif result is not None:
            self.table.update(record.job_id, state=common_pb2.JOB_STATE_FAILED, error=result.error, pid=0)
        elif end.exit_code is not None and end.exit_code > 0:
            self.table.update(
                record.job_id,
                state=common_pb2.JOB_STATE_FAILED,
                error=f"worker exited with code {end.exit_code} without a result; {self._log_tail(record)}",
                pid=0,
            )
        else:
            self.table.update(
                record.job_id,
                state=common_pb2.JOB_STATE_INTERRUPTED,
                error=f"{end.how}; ResumeJob continues it (from the last checkpoint where the job kind has one) "
                "or restarts it",
                pid=0,
            )
        log.info("job %s ended: %s", record.job_id, common_pb2.JobState.Name(self.table.get(record.job_id).state))

    def _log_tail(self, record: JobRecord, lines: int = 5) -> str:
        path = self._launcher(record).log_path(record, self.job_dir(record.job_id))
        try:
            tail = path.read_text(errors="replace").strip().splitlines()[-lines:]
        except OSError:
            return f"no log at {path}"
        return f"last lines of {path}: " + " | ".join(tail)

    def _monitor_loop(self) -> None:
        while not self._stop.wait(self.poll_interval_s):
            try:
                for record in self.table.with_states(common_pb2.JOB_STATE_RUNNING):
                    # Outside the lock: asking a scheduler (squeue) may take a while, and StartJob must not wait.
                    end = self._launcher(record).ended(record, self.job_dir(record.job_id))
                    if end is None:
                        continue
                    with self._lock:
                        record = self.table.get(record.job_id)
                        if record.state == common_pb2.JOB_STATE_RUNNING:
                            self._finalize(record, end)
                with self._lock:
                    self._launch_ready()
            except Exception:  # the monitor must survive a transient SQLite or file error
                log.exception("trainer job monitor")
