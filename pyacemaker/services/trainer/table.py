"""The trainer's durable job table: one SQLite row per job in `<work dir>/jobs.sqlite`.

A row says what the job is (its kind and StartJobRequest), how far it got (state, error, metrics, outputs) and
where its worker runs, so that a trainer started later finds it again: a local worker by pid and process start
time, a scheduler job by its executor profile, scheduler and job id.
"""

from __future__ import annotations

import contextlib
import json
import sqlite3
import time
from collections.abc import Iterator
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from pyacemaker.v1 import common_pb2

LOCAL_PROFILE = "local"


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
    # Where the worker runs: the trainer deployment's executor profile, its scheduler ("local", "slurm", "pbs")
    # and the scheduler's job id ('' for a local worker, which the pid and its start time name instead).
    profile: str = LOCAL_PROFILE
    scheduler: str = "local"
    scheduler_job_id: str = ""


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
    cancel_requested INTEGER NOT NULL DEFAULT 0,
    profile TEXT NOT NULL DEFAULT 'local',
    scheduler TEXT NOT NULL DEFAULT 'local',
    scheduler_job_id TEXT NOT NULL DEFAULT ''
)
"""
# Columns added after the first release, with their definitions: a table written by an older trainer gains them.
_ADDED_COLUMNS = {
    "profile": "TEXT NOT NULL DEFAULT 'local'",
    "scheduler": "TEXT NOT NULL DEFAULT 'local'",
    "scheduler_job_id": "TEXT NOT NULL DEFAULT ''",
}
_FIELDS = tuple(f.name for f in fields(JobRecord))
_COLUMNS = ", ".join(_FIELDS)


def _ref_to_json(ref: common_pb2.ArtifactRef) -> dict[str, object]:
    return {"uri": ref.uri, "sha256": ref.sha256, "size": ref.size, "kind": ref.kind}


def _ref_from_json(data: dict[str, Any]) -> common_pb2.ArtifactRef:
    return common_pb2.ArtifactRef(uri=data["uri"], sha256=data["sha256"], size=int(data["size"]), kind=data["kind"])


def _encode(name: str, value: object) -> object:
    if name == "metrics":
        return json.dumps(value)
    if name == "outputs":
        return json.dumps([_ref_to_json(r) for r in value])  # type: ignore[attr-defined]
    if name == "idempotency_key":
        return value or None  # NULLs do not collide in the UNIQUE index
    if isinstance(value, bool):
        return int(value)
    return value


class JobTable:
    """The job rows. Every call opens its own connection, so server threads and the monitor thread never
    share one; SQLite's own locking (WAL) serialises writers."""

    def __init__(self, path: Path) -> None:
        self.path = path
        path.parent.mkdir(parents=True, exist_ok=True)
        with self._connect() as connection:
            connection.execute("PRAGMA journal_mode=WAL")
            connection.execute(_SCHEMA)
            present = {row[1] for row in connection.execute("PRAGMA table_info(jobs)")}
            for name, definition in _ADDED_COLUMNS.items():
                if name not in present:
                    connection.execute(f"ALTER TABLE jobs ADD COLUMN {name} {definition}")

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
        values = dict(zip(_FIELDS, row, strict=True))
        values["idempotency_key"] = values["idempotency_key"] or ""
        values["request"] = bytes(values["request"])
        values["metrics"] = {k: float(v) for k, v in json.loads(values["metrics"]).items()}
        values["outputs"] = [_ref_from_json(item) for item in json.loads(values["outputs"])]
        values["resume"] = bool(values["resume"])
        values["cancel_requested"] = bool(values["cancel_requested"])
        return JobRecord(**values)

    def insert(self, record: JobRecord) -> JobRecord:
        """Insert a new job; with an idempotency key already present, return that job instead."""
        with self._connect() as connection:
            if record.idempotency_key:
                row = connection.execute(
                    f"SELECT {_COLUMNS} FROM jobs WHERE idempotency_key = ?", (record.idempotency_key,)
                ).fetchone()
                if row is not None:
                    return self._record(row)
            marks = ", ".join("?" for _ in _FIELDS)
            connection.execute(
                f"INSERT INTO jobs ({_COLUMNS}) VALUES ({marks})",
                tuple(_encode(name, getattr(record, name)) for name in _FIELDS),
            )
        return record

    def get(self, job_id: str) -> JobRecord:
        return self._one("job_id", job_id, f"no trainer job {job_id!r}")

    def by_key(self, key: str) -> JobRecord:
        return self._one("idempotency_key", key, f"no trainer job with idempotency key {key!r}")

    def _one(self, column: str, value: str, missing: str) -> JobRecord:
        with self._connect() as connection:
            row = connection.execute(f"SELECT {_COLUMNS} FROM jobs WHERE {column} = ?", (value,)).fetchone()
        if row is None:
            raise JobNotFoundError(missing)
        return self._record(row)

    def with_states(self, *states: int) -> list[JobRecord]:
        marks = ", ".join("?" for _ in states)
        with self._connect() as connection:
            rows = connection.execute(
                f"SELECT {_COLUMNS} FROM jobs WHERE state IN ({marks}) ORDER BY created", states
            ).fetchall()
        return [self._record(row) for row in rows]

    def update(self, job_id: str, **changes: object) -> JobRecord:
        unknown = set(changes) - set(_FIELDS)
        if unknown:
            raise ValueError(f"no job table column(s) {', '.join(sorted(unknown))}")
        encoded = {name: _encode(name, value) for name, value in changes.items()}
        encoded["updated"] = time.time()
        assignments = ", ".join(f"{name} = ?" for name in encoded)
        with self._connect() as connection:
            connection.execute(f"UPDATE jobs SET {assignments} WHERE job_id = ?", (*encoded.values(), job_id))
        return self.get(job_id)
