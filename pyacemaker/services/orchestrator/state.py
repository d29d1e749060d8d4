"""A run's durable state: one SQLite file inside the run directory.

Tables: `run` (the config), `steps` (one row per step: its key, state, outputs, metrics, exported files) and
`events` (the append-only event log clients replay). Every write commits at once, so a killed orchestrator
loses at most the step in flight.
"""

from __future__ import annotations

import json
import sqlite3
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from google.protobuf.json_format import MessageToDict, ParseDict

from pyacemaker.run_layout import STATE_FILE
from pyacemaker.v1 import common_pb2, orchestrator_pb2

_SCHEMA = """
CREATE TABLE IF NOT EXISTS run (
    id INTEGER PRIMARY KEY CHECK (id = 1),
    name TEXT NOT NULL,
    config_json TEXT NOT NULL,
    created REAL NOT NULL,
    updated REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS steps (
    name TEXT PRIMARY KEY,
    key TEXT NOT NULL,
    state INTEGER NOT NULL,
    outputs_json TEXT NOT NULL DEFAULT '{}',
    metrics_json TEXT NOT NULL DEFAULT '{}',
    exported_json TEXT NOT NULL DEFAULT '{}',
    error TEXT NOT NULL DEFAULT '',
    started REAL,
    finished REAL
);
CREATE TABLE IF NOT EXISTS events (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    time REAL NOT NULL,
    kind INTEGER NOT NULL,
    step TEXT NOT NULL DEFAULT '',
    progress_json TEXT NOT NULL DEFAULT '',
    message TEXT NOT NULL DEFAULT ''
);
"""


@dataclass
class StepRow:
    """What the state file knows about one step."""

    name: str
    key: str
    state: int
    outputs: dict[str, common_pb2.ArtifactRef] = field(default_factory=dict)
    metrics: dict[str, float] = field(default_factory=dict)
    # Files exported into the run directory: path relative to it -> sha256.
    exported: dict[str, str] = field(default_factory=dict)
    error: str = ""
    # When the step last started and finished (epoch s); None while it has not.
    started: float | None = None
    finished: float | None = None

    @property
    def duration_s(self) -> float | None:
        if self.started is None or self.finished is None:
            return None
        return self.finished - self.started

    def to_proto(self) -> orchestrator_pb2.StepRecord:
        return orchestrator_pb2.StepRecord(
            name=self.name,
            key=self.key,
            state=self.state,  # type: ignore[arg-type]  # the stored int of a StepState
            outputs=list(self.outputs.values()),
            metrics=self.metrics,
            exported=sorted(self.exported),
            error=self.error,
        )


def _ref_to_dict(ref: common_pb2.ArtifactRef) -> dict:
    return MessageToDict(ref, preserving_proto_field_name=True)


def _ref_from_dict(data: dict) -> common_pb2.ArtifactRef:
    return ParseDict(data, common_pb2.ArtifactRef())


def connect(path: Path) -> sqlite3.Connection:
    """The run's state file, shared by several threads (callers hold their own lock), every commit durable."""
    db = sqlite3.connect(path, check_same_thread=False, isolation_level=None, timeout=30)
    db.execute("PRAGMA journal_mode=WAL")
    db.execute("PRAGMA synchronous=FULL")
    return db


class RunState:
    """The SQLite state of one run; safe to use from several threads. The orchestrator opens it to write; the
    report and the CLI open it with `read_only`, which never changes a run (sqlite3.Error when it cannot be
    read)."""

    def __init__(self, run_dir: Path, db: sqlite3.Connection | None = None) -> None:
        self.run_dir = run_dir
        self._lock = threading.Lock()
        if db is None:
            run_dir.mkdir(parents=True, exist_ok=True)
            db = connect(run_dir / STATE_FILE)
            db.executescript(_SCHEMA)
        self._db = db

    @classmethod
    def read_only(cls, run_dir: Path) -> RunState:
        path = (run_dir / STATE_FILE).resolve()
        return cls(run_dir, sqlite3.connect(f"{path.as_uri()}?mode=ro", uri=True, check_same_thread=False))

    def run_info(self) -> tuple[str, str, float] | None:
        """(name, config JSON, creation time) of the run; None before its config was saved."""
        with self._lock:
            row = self._db.execute("SELECT name, config_json, created FROM run WHERE id = 1").fetchone()
        return None if row is None else (str(row[0]), str(row[1]), float(row[2]))

    def close(self) -> None:
        with self._lock:
            self._db.close()

    def save_config(self, name: str, config_json: str) -> None:
        now = time.time()
        with self._lock:
            self._db.execute(
                "INSERT INTO run (id, name, config_json, created, updated) VALUES (1, ?, ?, ?, ?) "
                "ON CONFLICT(id) DO UPDATE SET name=excluded.name, config_json=excluded.config_json, "
                "updated=excluded.updated",
                (name, config_json, now, now),
            )

    def config_json(self) -> str | None:
        """The config saved by the last start of this run (None for a new run dir)."""
        info = self.run_info()
        return None if info is None else info[1]

    def step(self, name: str) -> StepRow | None:
        with self._lock:
            row = self._db.execute(
                "SELECT name, key, state, outputs_json, metrics_json, exported_json, error, started, finished "
                "FROM steps WHERE name=?",
                (name,),
            ).fetchone()
        if row is None:
            return None
        outputs = {k: _ref_from_dict(v) for k, v in json.loads(row[3]).items()}
        return StepRow(row[0], row[1], row[2], outputs, json.loads(row[4]), json.loads(row[5]), row[6], row[7], row[8])

    def steps(self) -> list[StepRow]:
        with self._lock:
            names = [r[0] for r in self._db.execute("SELECT name FROM steps ORDER BY started, name").fetchall()]
        return [row for name in names if (row := self.step(name)) is not None]

    def mark_step(self, name: str, key: str, state: int, error: str = "") -> None:
        """Record that a step started, failed or was skipped (outputs of a started step are cleared)."""
        now = time.time()
        with self._lock:
            if state == orchestrator_pb2.STEP_STATE_RUNNING:
                self._db.execute(
                    "INSERT INTO steps (name, key, state, started) VALUES (?, ?, ?, ?) ON CONFLICT(name) DO UPDATE "
                    "SET key=excluded.key, state=excluded.state, outputs_json='{}', metrics_json='{}', "
                    "exported_json='{}', error='', started=excluded.started, finished=NULL",
                    (name, key, state, now),
                )
            else:
                self._db.execute(
                    "UPDATE steps SET state=?, error=?, finished=? WHERE name=?", (state, error, now, name)
                )

    def complete_step(self, row: StepRow) -> None:
        with self._lock:
            self._db.execute(
                "UPDATE steps SET key=?, state=?, outputs_json=?, metrics_json=?, exported_json=?, error='', "
                "finished=? WHERE name=?",
                (
                    row.key,
                    orchestrator_pb2.STEP_STATE_COMPLETED,
                    json.dumps({k: _ref_to_dict(v) for k, v in row.outputs.items()}, sort_keys=True),
                    json.dumps(row.metrics, sort_keys=True),
                    json.dumps(row.exported, sort_keys=True),
                    time.time(),
                    row.name,
                ),
            )

    def add_event(
        self, kind: int, step: str = "", message: str = "", progress: common_pb2.Progress | None = None
    ) -> orchestrator_pb2.RunEvent:
        now = time.time()
        progress_json = json.dumps(MessageToDict(progress, preserving_proto_field_name=True)) if progress else ""
        with self._lock:
            cursor = self._db.execute(
                "INSERT INTO events (time, kind, step, progress_json, message) VALUES (?, ?, ?, ?, ?)",
                (now, kind, step, progress_json, message),
            )
            seq = int(cursor.lastrowid or 0)
        return self._event(seq, now, kind, step, progress_json, message)

    def events_after(self, seq: int, with_progress: bool = True) -> list[orchestrator_pb2.RunEvent]:
        """The events after `seq`, in order; without the (many) progress events when `with_progress` is False."""
        skipped = -1 if with_progress else orchestrator_pb2.RUN_EVENT_KIND_STEP_PROGRESS
        with self._lock:
            rows = self._db.execute(
                "SELECT seq, time, kind, step, progress_json, message FROM events WHERE seq > ? AND kind != ? "
                "ORDER BY seq",
                (seq, skipped),
            ).fetchall()
        return [self._event(*row) for row in rows]

    def ledger_counts(self) -> dict[tuple[str, str], int] | None:
        """Rows of the DFT ledger (pyacemaker.services.orchestrator.ledger, a table of this file) by (level of theory,
        status); None before the ledger's table exists."""
        with self._lock:
            try:
                rows = self._db.execute(
                    "SELECT level_of_theory, status, COUNT(*) FROM dft_ledger GROUP BY 1, 2"
                ).fetchall()
            except sqlite3.OperationalError as exc:
                if "no such table" in str(exc):
                    return None
                raise
        return {(level, status): int(count) for level, status, count in rows}

    @staticmethod
    def _event(
        seq: int, when: float, kind: int, step: str, progress_json: str, message: str
    ) -> orchestrator_pb2.RunEvent:
        event = orchestrator_pb2.RunEvent(seq=seq, kind=kind, step=step, message=message)  # type: ignore[arg-type]
        event.time.FromNanoseconds(int(when * 1e9))
        if progress_json:
            ParseDict(json.loads(progress_json), event.progress)
        return event


def saved_config_json(run_dir: Path) -> str:
    """The config a run was started with, read without writing (for `pyacemaker run --resume RUN_DIR`);
    FileNotFoundError when RUN_DIR holds no run."""
    path = Path(run_dir) / STATE_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{run_dir}: no run here (no {STATE_FILE})")
    state = RunState.read_only(Path(run_dir))
    try:
        config_json = state.config_json()
    finally:
        state.close()
    if config_json is None:
        raise FileNotFoundError(f"{path}: the run's config was never saved")
    return config_json
