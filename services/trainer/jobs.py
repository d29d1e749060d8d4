"""Durable training jobs: a SQLite job table in the trainer's work dir and one worker process per job.

Why this shape: training runs for minutes to hours, longer than any client connection and longer than the
trainer process may live. So a job is a row in SQLite plus a directory, and the work happens in a worker
process started in its own session (`python -m services.trainer.worker`), which writes progress, checkpoints
and finally `result.json` into the job directory. Nothing the client or the trainer does to its own process
(a disconnect, a restart, a crash) touches the worker:

- a client disconnect ends only its WatchJob stream;
- a trainer that stops leaves its workers running; the next trainer process re-adopts a worker that is still
  alive (same pid *and* same process start time, so a recycled pid is never mistaken for it) and reports a
  job whose worker is gone as INTERRUPTED;
- ResumeJob continues an INTERRUPTED job from its last checkpoint (MACE) or restarts it (`restart=True`,
  and always for the linear fits, which have nothing to resume from).

Layout of `<work dir>/jobs/<job id>/`: request.pb (the StartJobRequest), progress.jsonl, worker.log,
result.json (written last, atomically), work/ (the job's scratch and checkpoints).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import signal
import sqlite3
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from google.protobuf.timestamp_pb2 import Timestamp

from pyacemaker.artifacts import ArtifactStore
from pyacemaker.rpc import InvalidInputError, WrongStateError
from pyacemaker.v1 import common_pb2, trainer_pb2
from services.trainer.progress import PROGRESS_FILE, ProgressReader
from services.trainer.results import RESULT_FILE, read_result

log = logging.getLogger(__name__)

REQUEST_FILE = "request.pb"
LOG_FILE = "worker.log"
WORK_SUBDIR = "work"
# Kinds whose worker can continue from a checkpoint; the others always start over on ResumeJob.
RESUMABLE_KINDS = {"mace_finetune"}
TERMINAL_STATES = {common_pb2.JOB_STATE_SUCCEEDED, common_pb2.JOB_STATE_FAILED, common_pb2.JOB_STATE_CANCELLED}
# How long CancelJob waits after SIGTERM before it sends SIGKILL.
CANCEL_GRACE_S = 5.0


class JobNotFoundError(KeyError):
    """No job with this id: becomes NOT_FOUND."""


@dataclass
class JobRecord:
    job_id: str
    kind: str
    state: int
    request: bytes
    idempotency_key: str = ""
    error: str = ""
    metrics: dict[str, float] = field(default_factory=dict)
    outputs: list[common_pb2.ArtifactRef] = field(default_factory=list)
    created: float = 0.0
    updated: float = 0.0
    pid: int = 0
    pid_start: str = ""
    attempt: int = 0
    resume: bool = False
    cancel_requested: bool = False


_SCHEMA = """
CREATE TABLE IF NOT EXISTS jobs (
    job_id TEXT PRIMARY KEY,
    idempotency_key TEXT UNIQUE,
    kind TEXT NOT NULL,
    state INTEGER NOT NULL,
    request BLOB NOT NULL,
    error TEXT NOT NULL DEFAULT '',
    metrics TEXT NOT NULL DEFAULT '{}',
    outputs TEXT NOT NULL DEFAULT '[]',
    created REAL NOT NULL,
    updated REAL NOT NULL,
    pid INTEGER NOT NULL DEFAULT 0,
    pid_start TEXT NOT NULL DEFAULT '',
    attempt INTEGER NOT NULL DEFAULT 0,
    resume INTEGER NOT NULL DEFAULT 0,
    cancel_requested INTEGER NOT NULL DEFAULT 0
)
"""
_COLUMNS = (
    "job_id, idempotency_key, kind, state, request, error, metrics, outputs, created, updated, pid, pid_start, "
    "attempt, resume, cancel_requested"
)


def _ref_to_json(ref: common_pb2.ArtifactRef) -> dict[str, object]:
    return {"uri": ref.uri, "sha256": ref.sha256, "size": ref.size, "kind": ref.kind}


def _ref_from_json(data: dict[str, Any]) -> common_pb2.ArtifactRef:
    return common_pb2.ArtifactRef(uri=data["uri"], sha256=data["sha256"], size=int(data["size"]), kind=data["kind"])


class JobTable:
    """The job rows. Every call opens its own connection, so server threads and the monitor thread never
    share one; SQLite's own locking (WAL) serialises writers."""

    def __init__(self, path: Path) -> None:
        self.path = path
        path.parent.mkdir(parents=True, exist_ok=True)
        with self._connect() as connection:
            connection.execute("PRAGMA journal_mode=WAL")
            connection.execute(_SCHEMA)

    @contextlib.contextmanager
    def _connect(self) -> Iterator[sqlite3.Connection]:
        connection = sqlite3.connect(self.path, timeout=30.0)
        try:
            with connection:
                yield connection
        finally:
            connection.close()

    @staticmethod
    def _record(row: tuple) -> JobRecord:
        (job_id, key, kind, state, request, error, metrics, outputs, created, updated, pid, pid_start, attempt) = row[
            :13
        ]
        return JobRecord(
            job_id=job_id,
            idempotency_key=key or "",
            kind=kind,
            state=state,
            request=bytes(request),
            error=error,
            metrics={k: float(v) for k, v in json.loads(metrics).items()},
            outputs=[_ref_from_json(item) for item in json.loads(outputs)],
            created=created,
            updated=updated,
            pid=pid,
            pid_start=pid_start,
            attempt=attempt,
            resume=bool(row[13]),
            cancel_requested=bool(row[14]),
        )

    def insert(self, record: JobRecord) -> JobRecord:
        """Insert a new job; with an idempotency key already present, return that job instead."""
        with self._connect() as connection:
            if record.idempotency_key:
                row = connection.execute(
                    f"SELECT {_COLUMNS} FROM jobs WHERE idempotency_key = ?", (record.idempotency_key,)
                ).fetchone()
                if row is not None:
                    return self._record(row)
            connection.execute(
                f"INSERT INTO jobs ({_COLUMNS}) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (
                    record.job_id,
                    record.idempotency_key or None,
                    record.kind,
                    record.state,
                    record.request,
                    record.error,
                    json.dumps(record.metrics),
                    json.dumps([_ref_to_json(r) for r in record.outputs]),
                    record.created,
                    record.updated,
                    record.pid,
                    record.pid_start,
                    record.attempt,
                    int(record.resume),
                    int(record.cancel_requested),
                ),
            )
        return record

    def get(self, job_id: str) -> JobRecord:
        with self._connect() as connection:
            row = connection.execute(f"SELECT {_COLUMNS} FROM jobs WHERE job_id = ?", (job_id,)).fetchone()
        if row is None:
            raise JobNotFoundError(f"no trainer job {job_id!r}")
        return self._record(row)

    def by_key(self, key: str) -> JobRecord:
        with self._connect() as connection:
            row = connection.execute(f"SELECT {_COLUMNS} FROM jobs WHERE idempotency_key = ?", (key,)).fetchone()
        if row is None:
            raise JobNotFoundError(f"no trainer job with idempotency key {key!r}")
        return self._record(row)

    def with_states(self, *states: int) -> list[JobRecord]:
        marks = ", ".join("?" for _ in states)
        with self._connect() as connection:
            rows = connection.execute(
                f"SELECT {_COLUMNS} FROM jobs WHERE state IN ({marks}) ORDER BY created", states
            ).fetchall()
        return [self._record(row) for row in rows]

    def update(self, job_id: str, **fields: object) -> JobRecord:
        encoded: dict[str, object] = {}
        for name, value in fields.items():
            if name == "metrics":
                encoded[name] = json.dumps(value)
            elif name == "outputs":
                encoded[name] = json.dumps([_ref_to_json(r) for r in value])  # type: ignore[attr-defined]
            elif isinstance(value, bool):
                encoded[name] = int(value)
            else:
                encoded[name] = value
        encoded["updated"] = time.time()
        assignments = ", ".join(f"{name} = ?" for name in encoded)
        with self._connect() as connection:
            connection.execute(f"UPDATE jobs SET {assignments} WHERE job_id = ?", (*encoded.values(), job_id))
        return self.get(job_id)


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
    ) -> None:
        self.store = store
        self.work_dir = Path(work_dir).resolve()
        self.jobs_dir = self.work_dir / "jobs"
        self.jobs_dir.mkdir(parents=True, exist_ok=True)
        self.table = JobTable(self.work_dir / "jobs.sqlite")
        self.validate = validate
        self.max_running = max(1, max_running)
        self.poll_interval_s = poll_interval_s
        self._children: dict[str, subprocess.Popen] = {}
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
        kind = request.WhichOneof("spec")
        if kind is None:
            raise InvalidInputError("StartJobRequest has no spec; set one of mace_finetune, ace_fit, delta_fit")
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
            self._signal_worker(record, signal.SIGTERM)
        deadline = time.monotonic() + CANCEL_GRACE_S
        while time.monotonic() < deadline and self._worker_running(record):
            time.sleep(0.05)
        if self._worker_running(record):
            self._signal_worker(record, signal.SIGKILL)
            while self._worker_running(record):
                time.sleep(0.05)
        with self._lock:
            record = self.table.get(job_id)
            if record.state == common_pb2.JOB_STATE_RUNNING:
                self._finalize(record)
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
            from_checkpoint = not restart and record.kind in RESUMABLE_KINDS
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
        """Reconcile RUNNING rows with reality after a (re)start: finished workers are finalised, live ones
        re-adopted, vanished ones reported INTERRUPTED."""
        with self._lock:
            for record in self.table.with_states(common_pb2.JOB_STATE_RUNNING):
                if record.job_id in self._children:
                    continue
                if worker_alive(record.pid, record.pid_start):
                    log.info("re-adopting job %s (worker pid %d still running)", record.job_id, record.pid)
                    continue
                self._finalize(record, trainer_restarted=True)

    def _worker_command(self, record: JobRecord) -> list[str]:
        command = [sys.executable, "-m", "services.trainer.worker", "--job-dir", str(self.job_dir(record.job_id))]
        command += ["--store", str(self.store.root)]
        if record.resume:
            command.append("--resume")
        return command

    def _launch_ready(self) -> None:
        with self._lock:
            running = len(self.table.with_states(common_pb2.JOB_STATE_RUNNING))
            for record in self.table.with_states(common_pb2.JOB_STATE_QUEUED):
                if running >= self.max_running:
                    return
                self._launch(record)
                running += 1

    def _launch(self, record: JobRecord) -> None:
        job_dir = self.job_dir(record.job_id)
        (job_dir / WORK_SUBDIR).mkdir(parents=True, exist_ok=True)
        (job_dir / RESULT_FILE).unlink(missing_ok=True)
        env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1"), "PYTHONUNBUFFERED": "1"}
        repo_root = str(Path(__file__).resolve().parents[2])
        env["PYTHONPATH"] = os.pathsep.join(p for p in (repo_root, env.get("PYTHONPATH", "")) if p)
        with open(job_dir / LOG_FILE, "ab") as log_handle:
            process = subprocess.Popen(
                self._worker_command(record),
                cwd=job_dir / WORK_SUBDIR,
                stdout=log_handle,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                env=env,
                start_new_session=True,  # its own process group: survives the trainer and its signals
            )
        self._children[record.job_id] = process
        self.table.update(
            record.job_id,
            state=common_pb2.JOB_STATE_RUNNING,
            pid=process.pid,
            pid_start=process_start_time(process.pid),
            attempt=record.attempt + 1,
        )
        log.info("job %s (%s) started: worker pid %d", record.job_id, record.kind, process.pid)

    def _worker_running(self, record: JobRecord) -> bool:
        child = self._children.get(record.job_id)
        if child is not None:
            return child.poll() is None
        return worker_alive(record.pid, record.pid_start)

    def _signal_worker(self, record: JobRecord, signum: int) -> None:
        if not self._worker_running(record):
            return
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(record.pid, signum)  # the worker leads its own session: this reaches its children too

    def _finalize(self, record: JobRecord, trainer_restarted: bool = False) -> None:
        """Record how a job whose worker is no longer running ended."""
        child = self._children.pop(record.job_id, None)
        exit_code = child.wait() if child is not None else None
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
        elif exit_code is not None and exit_code > 0:
            self.table.update(
                record.job_id,
                state=common_pb2.JOB_STATE_FAILED,
                error=f"worker exited with code {exit_code} without a result; {self._log_tail(record.job_id)}",
                pid=0,
            )
        else:
            how = (
                "the trainer restarted and the worker is gone"
                if trainer_restarted or exit_code is None
                else f"the worker was killed by signal {-exit_code}"
            )
            self.table.update(
                record.job_id,
                state=common_pb2.JOB_STATE_INTERRUPTED,
                error=f"{how}; ResumeJob continues it (from the last checkpoint where the job kind has one) "
                "or restarts it",
                pid=0,
            )
        log.info("job %s ended: %s", record.job_id, common_pb2.JobState.Name(self.table.get(record.job_id).state))

    def _log_tail(self, job_id: str, lines: int = 5) -> str:
        path = self.job_dir(job_id) / LOG_FILE
        try:
            tail = path.read_text(errors="replace").strip().splitlines()[-lines:]
        except OSError:
            return f"no log at {path}"
        return f"last lines of {path}: " + " | ".join(tail)

    def _monitor_loop(self) -> None:
        while not self._stop.wait(self.poll_interval_s):
            try:
                with self._lock:
                    for record in self.table.with_states(common_pb2.JOB_STATE_RUNNING):
                        if not self._worker_running(record):
                            self._finalize(record)
                    self._launch_ready()
            except Exception:  # the monitor must survive a transient SQLite or file error
                log.exception("trainer job monitor")
