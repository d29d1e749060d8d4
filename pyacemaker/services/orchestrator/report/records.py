"""Reading a run directory for the report: the state file (opened read-only: writing a report never changes a
run) and the JSON records the steps export (typed: pyacemaker.run_records). A record that is missing or malformed
is kept as a problem to show, not an error, so the report can be written for a run that is still going, stopped
early or failed."""

from __future__ import annotations

import json
import sqlite3
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Generic, TypeVar

from pyacemaker.run_layout import (
    ACTIVE_LEARNING_RECORD,
    SELECTION_RECORD,
    STATE_FILE,
    SUMMARY_FILE,
    TEACHER_BOOTSTRAP_RECORD,
    VALIDATION_RECORD,
    in_iteration,
    iteration_number,
)
from pyacemaker.run_records import (
    ActiveLearningRecord,
    RecordError,
    RunSummary,
    SelectionRecord,
    TeacherRecord,
    ValidationRecord,
    read_record,
)
from pyacemaker.services.orchestrator.state import RunState, StepRow
from pyacemaker.v1 import common_pb2, orchestrator_pb2

STEP_STATES = {v: k.removeprefix("STEP_STATE_").lower() for k, v in orchestrator_pb2.StepState.items()}


class ReportInputError(ValueError):
    """The directory is not a run directory (no state file) or its state file cannot be read."""


RecordT = TypeVar("RecordT")


@dataclass
class RecordFile(Generic[RecordT]):
    """One JSON record of the run: the record, or why there is none."""

    relative: str
    data: RecordT | None
    problem: str = ""


@dataclass
class StepRecord:
    """A step as the report shows it: its row of the state file and its state's name."""

    row: StepRow
    state: str

    @property
    def name(self) -> str:
        return self.row.name

    @property
    def outputs(self) -> dict[str, common_pb2.ArtifactRef]:
        return self.row.outputs

    @property
    def metrics(self) -> dict[str, float]:
        return self.row.metrics

    @property
    def exported(self) -> dict[str, str]:
        return self.row.exported

    @property
    def error(self) -> str:
        return self.row.error

    @property
    def started(self) -> float | None:
        return self.row.started

    @property
    def duration_s(self) -> float | None:
        return self.row.duration_s


@dataclass
class Iteration:
    number: int
    active_learning: RecordFile[ActiveLearningRecord]
    validation: RecordFile[ValidationRecord]


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
    # step0_teacher/teacher.json: the run's own teacher (teacher.bootstrap); missing when it uses teacher.model.
    teacher: RecordFile[TeacherRecord]
    selection: RecordFile[SelectionRecord]
    iterations: list[Iteration]
    summary: RecordFile[RunSummary]
    problems: list[str] = field(default_factory=list)

    def last_validation(self) -> Iteration | None:
        validated = [it for it in self.iterations if it.validation.data is not None]
        return validated[-1] if validated else None

    def handed_out_validation(self) -> Iteration | None:
        """The validation of the potential the run hands out: run_summary.json's best iteration when it was
        validated, else (a run still going, or one from before the choice existed) the last validation."""
        best = self.summary.data.best_iteration if self.summary.data is not None else None
        chosen = [it for it in self.iterations if it.number == best and it.validation.data is not None]
        return chosen[0] if chosen else self.last_validation()

    def budget(self) -> int | None:
        """The DFT budget: the run summary's, else the last validation's, else the config's."""
        if self.summary.data is not None:
            return self.summary.data.dft_budget
        for iteration in reversed(self.iterations):
            if iteration.validation.data is not None and iteration.validation.data.dft_budget is not None:
                return iteration.validation.data.dft_budget
        value = self.config.get("budget", {}).get("max_dft_calls")
        return int(value) if isinstance(value, int | float) else None


def read_run(run_dir: Path) -> RunRecord:
    """Read a run directory; raises ReportInputError when it has no readable state file."""
    state_path = run_dir / STATE_FILE
    if not state_path.is_file():
        raise ReportInputError(f"{run_dir} is not a run directory: it has no {STATE_FILE}")
    try:
        state = RunState.read_only(run_dir)
        try:
            info = state.run_info()
            steps = state.steps()
            events = state.events_after(0, with_progress=False)
            ledger = state.ledger_counts()
        finally:
            state.close()
    except sqlite3.Error as exc:
        raise ReportInputError(f"cannot read {state_path}: {exc}") from None
    problems = []
    name, config, created = run_dir.name, {}, None
    if info is not None:
        name, created = info[0], info[2]
        try:
            config = json.loads(info[1])
        except json.JSONDecodeError as exc:
            problems.append(f"the run's config in {STATE_FILE} is not valid JSON ({exc})")
    return RunRecord(
        run_dir=run_dir,
        name=name,
        config=config,
        created=created,
        steps=[StepRecord(row, STEP_STATES.get(row.state, str(row.state))) for row in steps],
        events=[(e.time.ToNanoseconds() / 1e9, int(e.kind), e.step, e.message) for e in events],
        ledger=ledger,
        teacher=read_record_file(run_dir, TEACHER_BOOTSTRAP_RECORD, TeacherRecord),
        selection=read_record_file(run_dir, SELECTION_RECORD, SelectionRecord),
        iterations=read_iterations(run_dir),
        summary=read_record_file(run_dir, SUMMARY_FILE, RunSummary),
        problems=problems,
    )


def read_record_file(run_dir: Path, relative: str, kind: type[RecordT]) -> RecordFile[RecordT]:
    path = run_dir / relative
    if not path.is_file():
        return RecordFile(relative, None, f"{relative} is missing")
    try:
        return RecordFile(relative, read_record(path, kind, relative))
    except OSError as exc:
        return RecordFile(relative, None, f"{relative} cannot be read ({exc})")
    except RecordError as exc:
        return RecordFile(relative, None, str(exc))


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
            read_record_file(run_dir, in_iteration(number, ACTIVE_LEARNING_RECORD), ActiveLearningRecord),
            read_record_file(run_dir, in_iteration(number, VALIDATION_RECORD), ValidationRecord),
        )
        for number in numbers
    ]
    if not iterations and (run_dir / ACTIVE_LEARNING_RECORD).is_file():
        iterations = [
            Iteration(
                1,
                read_record_file(run_dir, ACTIVE_LEARNING_RECORD, ActiveLearningRecord),
                read_record_file(run_dir, in_iteration(1, VALIDATION_RECORD), ValidationRecord),
            )
        ]
    return iterations
