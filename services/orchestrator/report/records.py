"""Reading a run directory for the report: the state file (opened read-only: writing a report never changes a
run) and the JSON records the steps export. A record that is missing or malformed is kept as a problem to show,
not an error, so the report can be written for a run that is still going, stopped early or failed."""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pyacemaker.run_layout import (
    ACTIVE_LEARNING_RECORD,
    SELECTION_RECORD,
    STATE_FILE,
    SUMMARY_FILE,
    VALIDATION_RECORD,
    in_iteration,
    iteration_number,
)
from pyacemaker.v1 import orchestrator_pb2

STEP_STATES = {v: k.removeprefix("STEP_STATE_").lower() for k, v in orchestrator_pb2.StepState.items()}


class ReportInputError(ValueError):
    """The directory is not a run directory (no state file) or its state file cannot be read."""


@dataclass
class JsonRecord:
    """One JSON file of the run: its data, or why there is none."""

    relative: str
    data: dict[str, Any] | None
    problem: str = ""


@dataclass
class StepRecord:
    name: str
    state: str
    outputs: dict[str, dict[str, Any]]
    metrics: dict[str, float]
    exported: dict[str, str]
    error: str
    started: float | None
    finished: float | None

    @property
    def duration_s(self) -> float | None:
        if self.started is None or self.finished is None:
            return None
        return self.finished - self.started


@dataclass
class Iteration:
    number: int
    active_learning: JsonRecord
    validation: JsonRecord


@dataclass
class RunRecord:
    """Everything the report reads from a run directory."""

    run_dir: Path
    name: str
    config: dict[str, Any]
    created: float | None
    steps: list[StepRecord]
    # (time, kind, step, message) of every event except progress, in order.
    events: list[tuple[float, int, str, str]]
    # (level of theory, status) -> rows; None when the run has no ledger yet.
    ledger: dict[tuple[str, str], int] | None
    selection: JsonRecord
    iterations: list[Iteration]
    summary: JsonRecord
    problems: list[str] = field(default_factory=list)

    def last_validation(self) -> Iteration | None:
        validated = [it for it in self.iterations if it.validation.data is not None]
        return validated[-1] if validated else None

    def handed_out_validation(self) -> Iteration | None:
        """The validation of the potential the run hands out: run_summary.json's best iteration when it was
        validated, else (a run still going, or one from before the choice existed) the last validation."""
        best = self.summary.data.get("best_iteration") if self.summary.data is not None else None
        chosen = [it for it in self.iterations if it.number == best and it.validation.data is not None]
        return chosen[0] if chosen else self.last_validation()

    def budget(self) -> int | None:
        """The DFT budget: the run summary's, else the last validation's, else the config's."""
        for record in [self.summary, *(it.validation for it in reversed(self.iterations))]:
            if record.data is not None and isinstance(record.data.get("dft_budget"), int | float):
                return int(record.data["dft_budget"])
        value = self.config.get("budget", {}).get("max_dft_calls")
        return int(value) if isinstance(value, int | float) else None


def read_run(run_dir: Path) -> RunRecord:
    """Read a run directory; raises ReportInputError when it has no readable state file."""
    state_path = run_dir / STATE_FILE
    if not state_path.is_file():
        raise ReportInputError(f"{run_dir} is not a run directory: it has no {STATE_FILE}")
    try:
        db = sqlite3.connect(f"{state_path.resolve().as_uri()}?mode=ro", uri=True)
    except sqlite3.Error as exc:
        raise ReportInputError(f"cannot open {state_path}: {exc}") from None
    try:
        run_row = query(db, "SELECT name, config_json, created FROM run WHERE id = 1")
        step_rows = query(
            db,
            "SELECT name, state, outputs_json, metrics_json, exported_json, error, started, finished FROM steps "
            "ORDER BY started, name",
        )
        event_rows = query(
            db,
            "SELECT time, kind, step, message FROM events WHERE kind != ? ORDER BY seq",
            (orchestrator_pb2.RUN_EVENT_KIND_STEP_PROGRESS,),
        )
        ledger_rows = query(db, "SELECT level_of_theory, status, COUNT(*) FROM dft_ledger GROUP BY 1, 2")
    except sqlite3.DatabaseError as exc:
        raise ReportInputError(f"cannot read {state_path}: {exc}") from None
    finally:
        db.close()
    problems = []
    name, config, created = run_dir.name, {}, None
    if run_row:
        name, created = run_row[0][0], run_row[0][2]
        try:
            config = json.loads(run_row[0][1])
        except json.JSONDecodeError as exc:
            problems.append(f"the run's config in {STATE_FILE} is not valid JSON ({exc})")
    steps = [
        StepRecord(
            name=row[0],
            state=STEP_STATES.get(row[1], str(row[1])),
            outputs=json.loads(row[2] or "{}"),
            metrics=json.loads(row[3] or "{}"),
            exported=json.loads(row[4] or "{}"),
            error=row[5] or "",
            started=row[6],
            finished=row[7],
        )
        for row in step_rows or []
    ]
    ledger = None if ledger_rows is None else {(level, status): count for level, status, count in ledger_rows}
    return RunRecord(
        run_dir=run_dir,
        name=name,
        config=config,
        created=created,
        steps=steps,
        events=[tuple(row) for row in event_rows or []],  # type: ignore[misc]
        ledger=ledger,
        selection=read_json(run_dir, SELECTION_RECORD),
        iterations=read_iterations(run_dir),
        summary=read_json(run_dir, SUMMARY_FILE),
        problems=problems,
    )


def query(db: sqlite3.Connection, sql: str, params: Sequence[Any] = ()) -> list[tuple[Any, ...]] | None:
    """Rows of a query; None when its table does not exist yet (a run that stopped before creating it)."""
    try:
        return db.execute(sql, params).fetchall()
    except sqlite3.OperationalError as exc:
        if "no such table" in str(exc):
            return None
        raise


def read_json(run_dir: Path, relative: str) -> JsonRecord:
    path = run_dir / relative
    if not path.is_file():
        return JsonRecord(relative, None, f"{relative} is missing")
    try:
        data = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        return JsonRecord(relative, None, f"{relative} cannot be read ({exc})")
    if not isinstance(data, dict):
        return JsonRecord(relative, None, f"{relative} does not hold a JSON object")
    return JsonRecord(relative, data)


def read_iterations(run_dir: Path) -> list[Iteration]:
    """The active-learning iterations, from the `iteration_NN` directories (a run from before the loop existed
    exported its one step-2 record at the top level: that counts as iteration 1)."""
    numbers = sorted(
        number
        for entry in (run_dir.iterdir() if run_dir.is_dir() else [])
        if entry.is_dir() and (number := iteration_number(entry.name)) is not None
    )
    iterations = [
        Iteration(
            number,
            read_json(run_dir, in_iteration(number, ACTIVE_LEARNING_RECORD)),
            read_json(run_dir, in_iteration(number, VALIDATION_RECORD)),
        )
        for number in numbers
    ]
    if not iterations and (run_dir / ACTIVE_LEARNING_RECORD).is_file():
        iterations = [
            Iteration(
                1, read_json(run_dir, ACTIVE_LEARNING_RECORD), read_json(run_dir, in_iteration(1, VALIDATION_RECORD))
            )
        ]
    return iterations
