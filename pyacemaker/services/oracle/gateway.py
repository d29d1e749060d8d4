"""The Label path of backends that run through an executor (pyscf, qe, vasp; xtb when configured so).

One Label stream: each request batch's new structures become one task dir each and ONE array job; the job
table records the batch before the scheduler is asked and its job id right after, and the stream announces
it with a Submission before any result. Structures already in flight or done at the same level of theory
are not submitted again: the stream re-attaches (Submission with reattached=true and the original job id)
and streams their results when they appear. A task whose job ended without a result is resubmitted (up to
`retries.resubmit_lost_tasks` times) unless it hit its own time or memory limit; then it gets a FAILED
label saying why. Jobs keep running when a client disconnects: the next stream that asks re-attaches.

Requests are read on a thread of their own, so a long stream's later batches are submitted while earlier
ones compute.

Labels stay wire messages here: the gateway only relays them, from the task's result file into the job table and
the response, all of which hold the message; the FAILED labels it makes itself are converted where made.
"""

from __future__ import annotations

import functools
import hashlib
import logging
import queue
import secrets
import shutil
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pyacemaker.config import ExecutorConfig, LocalExecutorConfig
from pyacemaker.executors import create_executor, default_executor_config
from pyacemaker.executors.base import Batch, Executor, SubmissionError, TaskEnd
from pyacemaker.labels import Labels, labels_to_proto
from pyacemaker.rpc import WrongStateError
from pyacemaker.services.oracle.backends import OracleBackend
from pyacemaker.services.oracle.deployment import OracleDeployment
from pyacemaker.services.oracle.jobs import JobTable, TaskKey, TaskRecord, TaskState
from pyacemaker.services.oracle.task import read_result, write_task
from pyacemaker.structure_checks import check_structure
from pyacemaker.structures import content_id, structure_to_atoms
from pyacemaker.v1 import common_pb2, oracle_pb2

log = logging.getLogger(__name__)

JOB_TABLE_FILE = "jobs.sqlite"
# A batch whose tasks sit PREPARED this long without a job id, and that no stream of this process is
# submitting, was left by a submitter that died: it is looked up by name, or submitted again.
ORPHAN_AGE_S = 30.0


def executor_config_of(backend: OracleBackend) -> ExecutorConfig | None:
    """The executor a backend's labels run through, or None for an in-process backend (lj, mace, and xtb
    unless its options name an executor)."""
    executor = backend.executor_config()
    if executor is None and backend.uses_executor:
        return LocalExecutorConfig()
    return executor


class LabelGateway:
    """Shared by all Label streams of one oracle process: the job table and one executor per configuration
    (so a local worker pool outlives the stream that started it)."""

    def __init__(self, work_dir: Path, deployment: OracleDeployment | None = None) -> None:
        self.work_dir = Path(work_dir)
        self.deployment = deployment if deployment is not None else OracleDeployment()
        self.work_dir.mkdir(parents=True, exist_ok=True)
        self.jobs = JobTable(self.work_dir / JOB_TABLE_FILE)
        self._lock = threading.Lock()
        self._executors: dict[str, Executor] = {}
        self._submitting: set[str] = set()

    def executor(self, config: ExecutorConfig) -> Executor:
        key = config.model_dump_json()
        with self._lock:
            if key not in self._executors:
                self._executors[key] = create_executor(config, self.deployment.executors)
            return self._executors[key]

    def label_stream(
        self,
        backend: OracleBackend,
        options: Mapping[str, Any],
        batches: Iterator[Sequence[common_pb2.Structure]],
        is_active: Callable[[], bool],
    ) -> Iterator[oracle_pb2.LabelResponse]:
        """LabelResponses (Submissions, then results as they arrive) for the structures of `batches`,
        indexed by position in the stream; `is_active` turning False (client gone) ends the stream, not
        the jobs."""
        config = executor_config_of(backend)
        if config is None:
            raise WrongStateError(f"oracle backend {backend.name!r} runs in process, not through an executor")
        return _Stream(self, backend, dict(options), self.executor(config), config).run(batches, is_active)

    @contextmanager
    def submitting(self, batch: str) -> Iterator[None]:
        """Marks a batch as being submitted by this process, so no stream takes it for an orphan meanwhile."""
        with self._lock:
            self._submitting.add(batch)
        try:
            yield
        finally:
            with self._lock:
                self._submitting.discard(batch)

    def is_submitting(self, batch: str) -> bool:
        with self._lock:
            return batch in self._submitting

    def scratch_root(self, config: ExecutorConfig) -> Path:
        """Where the task and job dirs of `config`'s executor go: the deployment's scratch_dir for its kind, else
        the work dir. Never chosen by a request."""
        scratch = self.deployment.executors.of(config.kind).scratch_dir
        return scratch if scratch is not None else self.work_dir

    def executor_for(self, scheduler: str, current: Executor) -> Executor:
        """The executor that can ask about a job of `scheduler` (a re-attached task may have been submitted
        under another executor configuration)."""
        if scheduler == current.scheduler:
            return current
        return self.executor(default_executor_config(scheduler))


@dataclass
class _Watch:
    """A structure this stream waits for: its positions in the stream and the content id the client gave."""

    entries: list[tuple[int, str]] = field(default_factory=list)
    announced_job: str | None = None


class _Stream:
    def __init__(
        self,
        gateway: LabelGateway,
        backend: OracleBackend,
        options: dict[str, Any],
        executor: Executor,
        config: ExecutorConfig,
    ) -> None:
        self.gateway = gateway
        self.jobs = gateway.jobs
        self.backend = backend
        self.options = options
        self.executor = executor
        self.level = backend.level_of_theory
        retries = backend.retry_config()
        self.max_retries = retries.max_retries
        self.resubmit_lost = retries.resubmit_lost_tasks
        self.keep_finished = bool(getattr(config, "keep_finished", False))
        root = gateway.scratch_root(config)
        self.task_root = root / "tasks" / hashlib.sha256(self.level.encode()).hexdigest()[:12]
        self.job_root = root / "jobs"
        self.watches: dict[TaskKey, _Watch] = {}
        self.own_jobs: set[str] = set()
        self.events: queue.Queue[tuple[str, Any]] = queue.Queue()
        self.next_scheduler_poll = 0.0

    # -- the response side ------------------------------------------------------------------------------------

    def run(
        self, batches: Iterator[Sequence[common_pb2.Structure]], is_active: Callable[[], bool]
    ) -> Iterator[oracle_pb2.LabelResponse]:
        reader = threading.Thread(target=self._read, args=(batches,), name="label-stream-reader", daemon=True)
        reader.start()
        reading = True
        wait = 0.0
        while True:
            for kind, payload in self._events(wait):
                if kind == "result":
                    yield oracle_pb2.LabelResponse(results=[payload])
                elif kind == "watch":
                    key, index, reported_id = payload
                    self.watches.setdefault(key, _Watch()).entries.append((index, reported_id))
                elif kind == "error":
                    raise payload
                elif kind == "end":
                    reading = False
            yield from self._collect()
            if not reading and not self.watches:
                return
            if not is_active():
                log.info("label stream closed by the client; %d structure(s) keep computing", len(self.watches))
                return
            wait = self.executor.poll_interval_s

    def _events(self, wait: float) -> Iterator[tuple[str, Any]]:
        """Whatever the reader posted, waiting up to `wait` s for the first event."""
        try:
            yield self.events.get(timeout=wait) if wait > 0 else self.events.get_nowait()
        except queue.Empty:
            return
        while True:
            try:
                yield self.events.get_nowait()
            except queue.Empty:
                return

    def _collect(self) -> Iterator[oracle_pb2.LabelResponse]:
        """Announce newly known job ids, then stream the results that are in; every so often ask the
        scheduler about tasks that may have ended without a result."""
        records = self.jobs.get_many(self.watches)
        for key in self.watches.keys() - records.keys():
            # Its row is gone: the stream that was submitting it had the submission refused (and said why).
            watch = self.watches.pop(key)
            labels = self._failed("its submission was refused by the scheduler (see the oracle log)")
            for index, reported_id in watch.entries:
                yield oracle_pb2.LabelResponse(
                    results=[oracle_pb2.LabelResult(index=index, content_id=reported_id, labels=labels)]
                )
        for key, record in records.items():
            if record.state != TaskState.DONE and (found := read_result(record.task_dir)) is not None:
                records[key] = self._finish(record, found)
        submissions: dict[tuple[str, str], oracle_pb2.Submission] = {}
        results = []
        for key, record in records.items():
            watch = self.watches[key]
            if record.job_id is not None and record.scheduler is not None and watch.announced_job != record.job_id:
                submission = submissions.setdefault(
                    (record.scheduler, record.job_id),
                    oracle_pb2.Submission(
                        scheduler=record.scheduler, job_id=record.job_id, reattached=record.job_id not in self.own_jobs
                    ),
                )
                for index, reported_id in watch.entries:
                    submission.indices.append(index)
                    submission.content_ids.append(reported_id)
                watch.announced_job = record.job_id
            if record.state == TaskState.DONE and record.labels is not None:
                for index, reported_id in watch.entries:
                    results.append(oracle_pb2.LabelResult(index=index, content_id=reported_id, labels=record.labels))
                del self.watches[key]
        if submissions:
            yield oracle_pb2.LabelResponse(submissions=list(submissions.values()))
        for result in results:
            if result.labels.status != common_pb2.LABEL_STATUS_OK:
                log.warning("structure %d failed: %s", result.index, result.labels.reason)
            yield oracle_pb2.LabelResponse(results=[result])
        if time.monotonic() >= self.next_scheduler_poll:
            self._check_scheduler({key: r for key, r in records.items() if r.state != TaskState.DONE})
            self.next_scheduler_poll = time.monotonic() + self.executor.poll_interval_s

    def _finish(self, record: TaskRecord, labels: common_pb2.Labels) -> TaskRecord:
        """Store a task's labels (once, whoever sees them first) and tidy its dir; returns the stored row."""
        # Each resubmission of a lost task was an attempt too.
        labels.attempts = max(labels.attempts, 1) + max(record.submissions - 1, 0)
        if not labels.level_of_theory:
            labels.level_of_theory = self.level
        if self.jobs.record_result(record.key, labels):
            ok = labels.status == common_pb2.LABEL_STATUS_OK
            if ok and not self.keep_finished:
                shutil.rmtree(record.task_dir, ignore_errors=True)
            elif not ok:
                log.info("kept the dir of failed task %s: %s", record.key[0][:12], record.task_dir)
        stored = self.jobs.get(record.key)
        return stored if stored is not None else record

    def _failed(self, reason: str, attempts: int = 0) -> common_pb2.Labels:
        return labels_to_proto(Labels.failed(reason, self.level, attempts=attempts))  # relayed as the message

    # -- lost and orphaned tasks ------------------------------------------------------------------------------

    def _check_scheduler(self, pending: Mapping[TaskKey, TaskRecord]) -> None:
        by_job: dict[tuple[str, str], dict[int, TaskRecord]] = {}
        resubmit: list[TaskRecord] = []
        now = time.time()
        for record in pending.values():
            if (
                record.state == TaskState.SUBMITTED
                and record.job_id
                and record.scheduler
                and record.array_index is not None
            ):
                by_job.setdefault((record.scheduler, record.job_id), {})[record.array_index] = record
            elif record.state == TaskState.PREPARED and self._orphaned(record, now):
                resubmit.extend(self._adopt_orphan(record))
        for (scheduler, job_id), tasks in by_job.items():
            executor = self.gateway.executor_for(scheduler, self.executor)
            ends = executor.ended(job_id, {index: record.task_dir for index, record in tasks.items()})
            for index, end in (ends or {}).items():
                record = tasks[index]
                if read_result(record.task_dir) is not None:
                    continue  # it wrote its result just now; the next pass collects it
                if self._gives_up(record, end):
                    continue
                resubmit.append(record)
        if resubmit:
            self._resubmit(resubmit)

    def _orphaned(self, record: TaskRecord, now: float) -> bool:
        return (
            record.batch is not None
            and now - record.updated_at > ORPHAN_AGE_S
            and not self.gateway.is_submitting(record.batch)
        )

    def _gives_up(self, record: TaskRecord, end: TaskEnd) -> bool:
        """FAILED label for a task that ended without a result and is not to be resubmitted."""
        if end.final:
            reason = f"{end.reason}, without a result"
        elif record.submissions > self.resubmit_lost:
            reason = f"{end.reason}, without a result (submitted {record.submissions} times)"
        else:
            log.warning("%s without a result: resubmitting (%s)", end.reason, record.task_dir)
            return False
        # attempts: this submission's; `_finish` adds the earlier submissions.
        self._finish(record, self._failed(reason, attempts=1))
        return True

    def _adopt_orphan(self, record: TaskRecord) -> list[TaskRecord]:
        """A batch left PREPARED by a submitter that died: record its job if the scheduler has it, else
        resubmit its tasks."""
        assert record.batch is not None
        batch = self.jobs.batch(record.batch)
        executor = self.gateway.executor_for(batch.scheduler, self.executor) if batch else self.executor
        job_id = executor.find_job(record.batch)
        if job_id is not None:
            log.info("found job %s of orphaned batch %s; recording it", job_id, record.batch)
            self.jobs.record_submission(record.batch, job_id)
            return []
        return [record]

    def _resubmit(self, records: Sequence[TaskRecord]) -> None:
        name, job_dir = self._new_batch()
        with self.gateway.submitting(name):
            moved = self.jobs.move_to_batch([(r.key, r.batch or "") for r in records], name)
            if not moved:
                return
            task_dirs = {r.key: r.task_dir for r in records}
            self._submit(name, job_dir, [task_dirs[key] for key in moved], moved)

    # -- the request side (reader thread) ---------------------------------------------------------------------

    def _read(self, batches: Iterator[Sequence[common_pb2.Structure]]) -> None:
        index = 0
        try:
            for structures in batches:
                self._add_batch(structures, index)
                index += len(structures)
            self.events.put(("end", None))
        except Exception as exc:  # handed to the response side, which raises it into the RPC
            self.events.put(("error", exc))

    def _add_batch(self, structures: Sequence[common_pb2.Structure], first_index: int) -> None:
        name, job_dir = self._new_batch()
        watches = []
        mine: list[tuple[TaskKey, Path]] = []
        with self.gateway.submitting(name):
            for offset, message in enumerate(structures):
                index = first_index + offset
                try:
                    atoms = structure_to_atoms(message)
                    check_structure(atoms, self.backend.structure_limits())
                except ValueError as exc:
                    labels = self._failed(f"invalid structure: {exc}")
                    self.events.put(
                        ("result", oracle_pb2.LabelResult(index=index, content_id=message.content_id, labels=labels))
                    )
                    continue
                structure_id = content_id(atoms)
                key = (structure_id, self.level)
                claim = self.jobs.claim(key, name, len(mine), functools.partial(self._task_dir, structure_id))
                if claim.mine:
                    write_task(
                        claim.record.task_dir,
                        message,
                        self.backend.name,
                        self.options,
                        self.max_retries,
                        self.gateway.deployment,
                    )
                    mine.append((key, claim.record.task_dir))
                watches.append((key, index, message.content_id or structure_id))
            if mine:
                self._submit(name, job_dir, [task_dir for _, task_dir in mine], [key for key, _ in mine])
        for watch in watches:
            self.events.put(("watch", watch))

    def _task_dir(self, structure_id: str, run: int) -> Path:
        return self.task_root / f"{structure_id[:24]}.{run}"

    def _new_batch(self) -> tuple[str, Path]:
        name = f"pyace-{secrets.token_hex(4)}"
        return name, self.job_root / name

    def _submit(self, name: str, job_dir: Path, task_dirs: list[Path], keys: list[TaskKey]) -> None:
        """Record the batch, hand it to the scheduler, record the job id: in this order, so a crash anywhere
        leaves a trace that the next stream reconciles."""
        self.jobs.create_batch(name, self.executor.scheduler, job_dir, len(task_dirs))
        try:
            job_id = self.executor.submit(Batch(name, job_dir, tuple(task_dirs)))
        except SubmissionError as exc:
            self.jobs.forget_batch(name)
            for key in keys:  # tasks that ran before and were moved here for resubmission
                record = self.jobs.get(key)
                if record is not None and record.batch == name:
                    self._finish(record, self._failed(f"resubmission refused: {exc}"))
            raise WrongStateError(f"{self.executor.scheduler} refused the calculations: {exc}") from None
        self.own_jobs.add(job_id)
        self.jobs.record_submission(name, job_id)
