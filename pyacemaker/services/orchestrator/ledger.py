"""The DFT budget ledger: one row per DFT request of a run, in the run's state file.

A row is written BEFORE the structure is sent to the oracle, so the budget (`max_dft_calls`, counted in rows)
holds across crashes and restarts: a restarted orchestrator finds the row and re-sends the structure (the
oracle re-attaches to a job it already submitted) instead of charging the budget again. A structure that already
has a row at the same level of theory is never computed twice; its stored result is reused.
"""

from __future__ import annotations

import hashlib
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from pyacemaker.services.orchestrator.state import connect
from pyacemaker.v1 import common_pb2

_SCHEMA = """
CREATE TABLE IF NOT EXISTS dft_ledger (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    content_id TEXT NOT NULL,
    level_of_theory TEXT NOT NULL,
    backend TEXT NOT NULL,
    status TEXT NOT NULL CHECK (status IN ('requested', 'submitted', 'ok', 'failed')),
    scheduler TEXT NOT NULL DEFAULT '',
    job_id TEXT NOT NULL DEFAULT '',
    result_digest TEXT NOT NULL DEFAULT '',
    labels BLOB,
    reason TEXT NOT NULL DEFAULT '',
    created REAL NOT NULL,
    updated REAL NOT NULL,
    UNIQUE (content_id, level_of_theory)
);
"""

PENDING = ("requested", "submitted")


@dataclass(frozen=True)
class LedgerRow:
    content_id: str
    level_of_theory: str
    backend: str
    status: str
    scheduler: str
    job_id: str
    result_digest: str
    labels: common_pb2.Labels | None
    reason: str


@dataclass
class Reservation:
    """What a request for labels turned into."""

    # Structures to send to the oracle: newly charged to the budget, or charged earlier and still pending.
    to_compute: list[str]
    # Structures labelled earlier at this level of theory (ok or failed): their stored labels are reused.
    done: dict[str, LedgerRow]
    # Structures refused because the budget is spent.
    refused: list[str]


class DftLedger:
    def __init__(self, path: Path) -> None:
        self._lock = threading.Lock()
        self._db = connect(path)
        self._db.executescript(_SCHEMA)

    def close(self) -> None:
        with self._lock:
            self._db.close()

    def count(self) -> int:
        """DFT calls charged so far (every row, whatever its status)."""
        with self._lock:
            return int(self._db.execute("SELECT COUNT(*) FROM dft_ledger").fetchone()[0])

    def reserve(self, content_ids: list[str], level_of_theory: str, backend: str, max_calls: int) -> Reservation:
        """Charge new structures to the budget, in order, until it is spent; all in one transaction."""
        reservation = Reservation(to_compute=[], done={}, refused=[])
        now = time.time()
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                used = int(self._db.execute("SELECT COUNT(*) FROM dft_ledger").fetchone()[0])
                for cid in dict.fromkeys(content_ids):  # a structure asked for twice is charged once
                    row = self._row(cid, level_of_theory)
                    if row is not None and row.status in PENDING:
                        reservation.to_compute.append(cid)
                    elif row is not None:
                        reservation.done[cid] = row
                    elif used < max_calls:
                        self._db.execute(
                            "INSERT INTO dft_ledger (content_id, level_of_theory, backend, status, created, updated) "
                            "VALUES (?, ?, ?, 'requested', ?, ?)",
                            (cid, level_of_theory, backend, now, now),
                        )
                        used += 1
                        reservation.to_compute.append(cid)
                    else:
                        reservation.refused.append(cid)
                self._db.execute("COMMIT")
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
        return reservation

    def record_submission(self, content_id: str, level_of_theory: str, scheduler: str, job_id: str) -> None:
        with self._lock:
            self._db.execute(
                "UPDATE dft_ledger SET status='submitted', scheduler=?, job_id=?, updated=? "
                "WHERE content_id=? AND level_of_theory=? AND status IN ('requested', 'submitted')",
                (scheduler, job_id, time.time(), content_id, level_of_theory),
            )

    def record_result(self, content_id: str, level_of_theory: str, labels: common_pb2.Labels) -> None:
        """Store a result the moment it arrives; its digest lets a later reader check it is intact."""
        blob = labels.SerializeToString(deterministic=True)
        status = "ok" if labels.status == common_pb2.LABEL_STATUS_OK else "failed"
        with self._lock:
            self._db.execute(
                "UPDATE dft_ledger SET status=?, labels=?, result_digest=?, reason=?, updated=? "
                "WHERE content_id=? AND level_of_theory=?",
                (
                    status,
                    blob,
                    hashlib.sha256(blob).hexdigest(),
                    labels.reason,
                    time.time(),
                    content_id,
                    level_of_theory,
                ),
            )

    def row(self, content_id: str, level_of_theory: str) -> LedgerRow | None:
        with self._lock:
            return self._row(content_id, level_of_theory)

    def rows(self) -> list[LedgerRow]:
        with self._lock:
            keys = self._db.execute("SELECT content_id, level_of_theory FROM dft_ledger ORDER BY id").fetchall()
            return [row for cid, level in keys if (row := self._row(cid, level)) is not None]

    def _row(self, content_id: str, level_of_theory: str) -> LedgerRow | None:
        found = self._db.execute(
            "SELECT backend, status, scheduler, job_id, result_digest, labels, reason FROM dft_ledger "
            "WHERE content_id=? AND level_of_theory=?",
            (content_id, level_of_theory),
        ).fetchone()
        if found is None:
            return None
        backend, status, scheduler, job_id, digest, blob, reason = found
        labels = None
        if blob is not None:
            if hashlib.sha256(blob).hexdigest() != digest:
                raise RuntimeError(
                    f"ledger result of {content_id} does not match its digest; the state file is damaged"
                )
            labels = common_pb2.Labels.FromString(blob)
        return LedgerRow(content_id, level_of_theory, backend, status, scheduler, job_id, digest, labels, reason)
