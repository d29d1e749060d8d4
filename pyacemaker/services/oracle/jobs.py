"""The oracle's durable job table: which calculation runs (or ran) where, kept in SQLite in the work dir.

One row per (structure content id, level of theory): its task dir, the batch (one array job) it belongs to,
that batch's scheduler job id, its index in the array, how often it was submitted, and its labels once they
are in. A batch's row is written with its tasks BEFORE the scheduler is asked, and its job id right after
the scheduler answers, so an oracle (or orchestrator) that dies at any moment finds every calculation it
started: a Label stream that asks for a structure already in flight re-attaches to its job instead of
submitting it again, and one that asks for a finished structure gets the stored labels.

Several streams (threads) and several oracle processes may share one table; every change is a single
SQLite transaction whose WHERE clause states what the caller last saw, so two watchers of one lost task
cannot both resubmit it.
"""

from __future__ import annotations

import sqlite3
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path
from typing import Any

from pyacemaker.v1 import common_pb2

TaskKey = tuple[str, str]  # (content id, level of theory)

_SCHEMA = """
CREATE TABLE IF NOT EXISTS batches (
    batch TEXT PRIMARY KEY,        -- unique token; also the scheduler's job name
    scheduler TEXT NOT NULL,       -- local | slurm | pbs
    job_dir TEXT NOT NULL,
    job_id TEXT,                   -- NULL until the scheduler accepted the job
    n_tasks INTEGER NOT NULL,
    created_at REAL NOT NULL,
    submitted_at REAL
);
CREATE TABLE IF NOT EXISTS tasks (
    content_id TEXT NOT NULL,
    level_of_theory TEXT NOT NULL,
    run INTEGER NOT NULL,          -- bumped when a FAILED structure is asked for again
    task_dir TEXT NOT NULL,
    batch TEXT REFERENCES batches(batch),
    array_index INTEGER,
    state TEXT NOT NULL,           -- prepared | submitted | done
    submissions INTEGER NOT NULL DEFAULT 0,
    labels BLOB,                   -- serialized Labels once done
    updated_at REAL NOT NULL,
    PRIMARY KEY (content_id, level_of_theory)
);
CREATE INDEX IF NOT EXISTS tasks_by_batch ON tasks(batch);
"""


class TaskState(StrEnum):
    # In a batch whose job id is not recorded yet (being submitted, or the submitter died).
    PREPARED = "prepared"
    SUBMITTED = "submitted"
    DONE = "done"


@dataclass(frozen=True)
class TaskRecord:
    content_id: str
    level_of_theory: str
    run: int
    task_dir: Path
    batch: str | None
    array_index: int | None
    state: TaskState
    submissions: int
    labels: common_pb2.Labels | None
    # From the task's batch:
    scheduler: str | None
    job_id: str | None
    updated_at: float  # time.time() of the last change

    @property
    def key(self) -> TaskKey:
        return (self.content_id, self.level_of_theory)


@dataclass(frozen=True)
class BatchRecord:
    batch: str
    scheduler: str
    job_dir: Path
    job_id: str | None
    n_tasks: int


@dataclass(frozen=True)
class Claim:
    """What `JobTable.claim` found for one structure."""

    record: TaskRecord
    # True when the caller owns the task now and must write its task dir and submit it in its batch.
    mine: bool


_SELECT_TASK = (
    "SELECT t.content_id, t.level_of_theory, t.run, t.task_dir, t.batch, t.array_index, t.state, t.submissions, "
    "t.labels, b.scheduler, b.job_id, t.updated_at FROM tasks t LEFT JOIN batches b ON t.batch = b.batch "
    "WHERE t.content_id = ? AND t.level_of_theory = ?"
)


def _task_from_row(row: Sequence[Any]) -> TaskRecord:
    labels = None
    if row[8] is not None:
        labels = common_pb2.Labels()
        labels.ParseFromString(bytes(row[8]))
    return TaskRecord(
        content_id=str(row[0]),
        level_of_theory=str(row[1]),
        run=int(row[2]),
        task_dir=Path(str(row[3])),
        batch=None if row[4] is None else str(row[4]),
        array_index=None if row[5] is None else int(row[5]),
        state=TaskState(str(row[6])),
        submissions=int(row[7]),
        labels=labels,
        scheduler=None if row[9] is None else str(row[9]),
        job_id=None if row[10] is None else str(row[10]),
        updated_at=float(row[11]),
    )


class JobTable:
    """The SQLite table; safe to share between threads of one process and between processes."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        # isolation_level=None: transactions are explicit (BEGIN IMMEDIATE), so a read-modify-write is atomic
        # across processes too.
        self._db = sqlite3.connect(self.path, timeout=60.0, isolation_level=None, check_same_thread=False)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA busy_timeout=60000")
        with self._lock:
            self._db.executescript(_SCHEMA)

    def close(self) -> None:
        with self._lock:
            self._db.close()

    def _transaction(self) -> _Transaction:
        return _Transaction(self)

    # -- reading ----------------------------------------------------------------------------------------------

    def get(self, key: TaskKey) -> TaskRecord | None:
        with self._lock:
            row = self._db.execute(_SELECT_TASK, key).fetchone()
        return None if row is None else _task_from_row(row)

    def get_many(self, keys: Iterable[TaskKey]) -> dict[TaskKey, TaskRecord]:
        return {key: record for key in keys if (record := self.get(key)) is not None}

    def batch(self, batch: str) -> BatchRecord | None:
        with self._lock:
            row = self._db.execute(
                "SELECT batch, scheduler, job_dir, job_id, n_tasks FROM batches WHERE batch = ?", (batch,)
            ).fetchone()
        if row is None:
            return None
        return BatchRecord(str(row[0]), str(row[1]), Path(row[2]), row[3], int(row[4]))

    def job_ids(self, scheduler: str | None = None) -> list[str]:
        """Every job id ever recorded (one per submitted batch), oldest first."""
        query = "SELECT job_id FROM batches WHERE job_id IS NOT NULL"
        params: tuple[str, ...] = ()
        if scheduler is not None:
            query += " AND scheduler = ?"
            params = (scheduler,)
        with self._lock:
            rows = self._db.execute(query + " ORDER BY submitted_at", params).fetchall()
        return [str(row[0]) for row in rows]

    # -- writing ----------------------------------------------------------------------------------------------

    def create_batch(self, batch: str, scheduler: str, job_dir: Path, n_tasks: int) -> None:
        """Record a batch about to be submitted (its tasks were claimed or moved into it already)."""
        with self._transaction() as db:
            db.execute(
                "INSERT INTO batches (batch, scheduler, job_dir, job_id, n_tasks, created_at) "
                "VALUES (?, ?, ?, NULL, ?, ?)",
                (batch, scheduler, str(job_dir), n_tasks, time.time()),
            )

    def claim(
        self,
        key: TaskKey,
        batch: str,
        array_index: int,
        task_dir_for: Callable[[int], Path],
    ) -> Claim:
        """Put the structure into `batch` at `array_index` unless it is already in flight or done.

        The caller owns the task (`mine`) when there was no row or when the last run ended FAILED (then a new
        run starts in a new task dir, `task_dir_for(run)`). Otherwise the existing row comes back for the
        caller to re-attach to: in flight, or done with OK labels."""
        with self._transaction() as db:
            row = db.execute(
                "SELECT run, state, labels FROM tasks WHERE content_id = ? AND level_of_theory = ?", key
            ).fetchone()
            take = row is None
            if row is not None and row[1] == TaskState.DONE:
                labels = common_pb2.Labels()
                labels.ParseFromString(bytes(row[2] or b""))
                take = labels.status != common_pb2.LABEL_STATUS_OK
            if take:
                run = 0 if row is None else int(row[0]) + 1
                db.execute(
                    "INSERT OR REPLACE INTO tasks (content_id, level_of_theory, run, task_dir, batch, array_index, "
                    "state, submissions, labels, updated_at) VALUES (?, ?, ?, ?, ?, ?, ?, 0, NULL, ?)",
                    (*key, run, str(task_dir_for(run)), batch, array_index, TaskState.PREPARED, time.time()),
                )
            record = db.execute(_SELECT_TASK, key).fetchone()
        return Claim(_task_from_row(record), mine=take)

    def move_to_batch(self, moves: Sequence[tuple[TaskKey, str]], batch: str) -> list[TaskKey]:
        """Move unfinished tasks, each given as (key, the batch it was seen in), into the new `batch` for
        resubmission, at array indices 0, 1, ... in the order moved; returns the moved keys in index order.
        A task that another watcher moved already, or that finished meanwhile, is left alone."""
        moved: list[TaskKey] = []
        now = time.time()
        with self._transaction() as db:
            for key, old_batch in moves:
                cursor = db.execute(
                    "UPDATE tasks SET batch = ?, array_index = ?, state = ?, updated_at = ? "
                    "WHERE content_id = ? AND level_of_theory = ? AND batch = ? AND state != ?",
                    (batch, len(moved), TaskState.PREPARED, now, *key, old_batch, TaskState.DONE),
                )
                if cursor.rowcount:
                    moved.append(key)
        return moved

    def record_submission(self, batch: str, job_id: str) -> None:
        """The scheduler accepted `batch` as `job_id`: its tasks are submitted (once more)."""
        now = time.time()
        with self._transaction() as db:
            db.execute("UPDATE batches SET job_id = ?, submitted_at = ? WHERE batch = ?", (job_id, now, batch))
            db.execute(
                "UPDATE tasks SET state = ?, submissions = submissions + 1, updated_at = ? "
                "WHERE batch = ? AND state = ?",
                (TaskState.SUBMITTED, now, batch, TaskState.PREPARED),
            )

    def forget_batch(self, batch: str) -> None:
        """The scheduler refused `batch`: drop its tasks that were never submitted (a later request, after the
        configuration is fixed, submits them afresh) and, once it holds no task, the batch itself. Tasks that
        ran before (moved here to be resubmitted) stay for the caller to finish with a FAILED label."""
        with self._transaction() as db:
            db.execute("DELETE FROM tasks WHERE batch = ? AND state != ? AND submissions = 0", (batch, TaskState.DONE))
            if db.execute("SELECT COUNT(*) FROM tasks WHERE batch = ?", (batch,)).fetchone()[0] == 0:
                db.execute("DELETE FROM batches WHERE batch = ?", (batch,))

    def record_result(self, key: TaskKey, labels: common_pb2.Labels) -> bool:
        """Store the labels of a finished task; False when they were already stored (by another watcher)."""
        with self._transaction() as db:
            cursor = db.execute(
                "UPDATE tasks SET state = ?, labels = ?, updated_at = ? "
                "WHERE content_id = ? AND level_of_theory = ? AND state != ?",
                (TaskState.DONE, labels.SerializeToString(), time.time(), *key, TaskState.DONE),
            )
            return cursor.rowcount > 0


class _Transaction:
    """BEGIN IMMEDIATE ... COMMIT under the table's thread lock; rolls back on an exception."""

    def __init__(self, table: JobTable) -> None:
        self.table = table

    def __enter__(self) -> sqlite3.Connection:
        self.table._lock.acquire()
        try:
            self.table._db.execute("BEGIN IMMEDIATE")
        except BaseException:
            self.table._lock.release()
            raise
        return self.table._db

    def __exit__(self, exc_type: object, exc: object, traceback: object) -> None:
        try:
            self.table._db.execute("ROLLBACK" if exc_type is not None else "COMMIT")
        finally:
            self.table._lock.release()
