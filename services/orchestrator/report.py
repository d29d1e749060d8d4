"""The run report: `RUN_DIR/report/index.html` with PNG plots beside it.

Built only from what a run leaves in its run directory: `state.sqlite` (steps, events, the DFT ledger), the
step records exported as JSON (`step1_direct/selection.json`, `iteration_NN/step2_active_learning/iteration.json`,
`iteration_NN/validation/validation.json`) and `run_summary.json`. So it can be written for a run that is still
going, stopped early or failed: a section whose data is missing says so instead of failing the report.

The state file is opened read-only: writing a report never changes a run.
"""

from __future__ import annotations

import html
import json
import math
import sqlite3
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib.axes import Axes
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from pyacemaker.run_layout import (
    ACTIVE_LEARNING_RECORD,
    REPORT_DIR,
    REPORT_FILE,
    SELECTION_RECORD,
    STATE_FILE,
    SUMMARY_FILE,
    VALIDATION_RECORD,
    in_iteration,
    iteration_number,
)
from pyacemaker.v1 import orchestrator_pb2
from services.orchestrator.reaction_profile import KCAL_PER_MOL_PER_EV

# The models validation compares, in plotting order: key in validation.json, label, colour.
MODELS = (
    ("teacher", "teacher (MACE)", "tab:gray"),
    ("committee", "fine-tuned committee", "tab:purple"),
    ("base_ace", "base ACE", "tab:blue"),
    ("final_ace", "final ACE", "tab:red"),
    ("direct_ace", "direct ACE (no teacher)", "tab:green"),
)
_DFT_COLOUR = "black"
_STEP_STATES = {v: k.removeprefix("STEP_STATE_").lower() for k, v in orchestrator_pb2.StepState.items()}
_RUN_FAILED = orchestrator_pb2.RUN_EVENT_KIND_RUN_FAILED
_VERDICT: dict[Any, str] = {True: '<b class="good">target met</b>', False: '<b class="bad">target not met</b>'}
_RUN_LEVEL_EVENTS = {
    orchestrator_pb2.RUN_EVENT_KIND_RUN_STARTED,
    orchestrator_pb2.RUN_EVENT_KIND_RUN_COMPLETED,
    _RUN_FAILED,
}
_STATE_COLOURS = {"completed": "tab:green", "failed": "tab:red", "running": "tab:orange"}

# Every plot this module writes; removed before a rewrite so a section that lost its data shows no stale plot.
PLOTS = ("dft_calls.png", "uncertainty.png", "parity.png", "learning_curve.png", "profile.png", "step_times.png")

_CSS = """
body { font-family: sans-serif; max-width: 70em; margin: 1em auto; padding: 0 1em; color: #222; }
h1 { border-bottom: 2px solid #444; } h2 { border-bottom: 1px solid #bbb; margin-top: 1.6em; }
table { border-collapse: collapse; margin: 0.6em 0; font-size: 0.92em; }
th, td { border: 1px solid #ccc; padding: 0.2em 0.6em; text-align: left; }
td.num { text-align: right; font-variant-numeric: tabular-nums; }
th { background: #f0f0f0; } code { font-size: 0.92em; }
.missing { color: #a15c00; font-style: italic; } .bad { color: #b00020; } .good { color: #1b7a1b; }
img { max-width: 100%; display: block; margin: 0.6em 0; }
"""


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


# -- reading the run directory --------------------------------------------------------------------------------


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
        run_row = _query(db, "SELECT name, config_json, created FROM run WHERE id = 1")
        step_rows = _query(
            db,
            "SELECT name, state, outputs_json, metrics_json, exported_json, error, started, finished FROM steps "
            "ORDER BY started, name",
        )
        event_rows = _query(
            db,
            "SELECT time, kind, step, message FROM events WHERE kind != ? ORDER BY seq",
            (orchestrator_pb2.RUN_EVENT_KIND_STEP_PROGRESS,),
        )
        ledger_rows = _query(db, "SELECT level_of_theory, status, COUNT(*) FROM dft_ledger GROUP BY 1, 2")
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
            state=_STEP_STATES.get(row[1], str(row[1])),
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
        selection=_read_json(run_dir, SELECTION_RECORD),
        iterations=_read_iterations(run_dir),
        summary=_read_json(run_dir, SUMMARY_FILE),
        problems=problems,
    )


def _query(db: sqlite3.Connection, sql: str, params: Sequence[Any] = ()) -> list[tuple[Any, ...]] | None:
    """Rows of a query; None when its table does not exist yet (a run that stopped before creating it)."""
    try:
        return db.execute(sql, params).fetchall()
    except sqlite3.OperationalError as exc:
        if "no such table" in str(exc):
            return None
        raise


def _read_json(run_dir: Path, relative: str) -> JsonRecord:
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


def _read_iterations(run_dir: Path) -> list[Iteration]:
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
            _read_json(run_dir, in_iteration(number, ACTIVE_LEARNING_RECORD)),
            _read_json(run_dir, in_iteration(number, VALIDATION_RECORD)),
        )
        for number in numbers
    ]
    if not iterations and (run_dir / ACTIVE_LEARNING_RECORD).is_file():
        iterations = [
            Iteration(
                1, _read_json(run_dir, ACTIVE_LEARNING_RECORD), _read_json(run_dir, in_iteration(1, VALIDATION_RECORD))
            )
        ]
    return iterations


# -- writing the report ----------------------------------------------------------------------------------------


def write_report(run_dir: Path) -> Path:
    """Write `run_dir/report/index.html` and its PNG plots; returns the HTML file's path.

    Raises ReportInputError when run_dir has no readable state file; any other missing or malformed record
    only empties its own section, which then says what is missing.
    """
    run_dir = Path(run_dir)
    run = read_run(run_dir)
    out_dir = run_dir / REPORT_DIR
    out_dir.mkdir(parents=True, exist_ok=True)
    for name in PLOTS:
        (out_dir / name).unlink(missing_ok=True)
    sections = [
        ("Summary", _headline, [SUMMARY_FILE, STATE_FILE]),
        ("Step 1: DIRECT sampling", _selection_section, [SELECTION_RECORD]),
        (
            "Active learning: DFT calls and uncertainty",
            _active_learning_section,
            [f"iteration_NN/{ACTIVE_LEARNING_RECORD}"],
        ),
        ("Validation on the DFT hold-out", _validation_section, [f"iteration_NN/{VALIDATION_RECORD}"]),
        ("Ablation: is distillation earning its place?", _ablation_section, [f"iteration_NN/{VALIDATION_RECORD}"]),
        ("Learning curve", _learning_curve_section, [f"iteration_NN/{VALIDATION_RECORD}"]),
        ("Energy profile along ξ", _profile_section, [f"iteration_NN/{VALIDATION_RECORD}"]),
        ("Time per step", _time_section, [STATE_FILE]),
        ("Artifacts", _artifacts_section, [STATE_FILE]),
    ]
    body = [f"<h1>PyAceMaker run report: {_e(run.name)}</h1>"]
    body.append(
        f"<p>Run directory <code>{_e(str(run_dir.resolve()))}</code>; report written {_e(_utc(time.time()))} UTC.</p>"
    )
    for problem in run.problems:
        body.append(f'<p class="bad">{_e(problem)}</p>')
    for title, build, sources in sections:
        body.append(f"<h2>{_e(title)}</h2>")
        try:
            body.append(build(run, out_dir))
        except (KeyError, TypeError, ValueError, IndexError) as exc:
            body.append(_missing(f"this section could not be drawn from {', '.join(sources)}: {_problem(exc)}"))
    page = (
        '<!DOCTYPE html>\n<html lang="en">\n<head>\n<meta charset="utf-8">\n'
        f"<title>PyAceMaker report: {_e(run.name)}</title>\n<style>{_CSS}</style>\n</head>\n<body>\n"
        + "\n".join(body)
        + "\n</body>\n</html>\n"
    )
    target = out_dir / REPORT_FILE
    staging = target.with_name(target.name + ".partial")
    staging.write_text(page, encoding="utf-8")
    staging.replace(target)
    return target


# -- sections ----------------------------------------------------------------------------------------------------


def _headline(run: RunRecord, out_dir: Path) -> str:
    summary = run.summary.data
    rows: list[tuple[str, str]] = []
    if summary is not None:
        rows.append(("Stop reason", f"<b>{_e(str(summary['stop_reason']))}</b>"))
        rows.append(("Iterations", _e(str(summary.get("iterations", len(run.iterations))))))
        rows.append(("Final potential", _final_potential(run, str(summary.get("final_potential", "")))))
    else:
        rows.append(("Stop reason", f'<span class="missing">{_e(_unfinished_state(run))}</span>'))
        rows.append(("Iterations", f"{len(run.iterations)} started"))
    used = summary.get("dft_calls") if summary is not None else _ledger_total(run)
    rows.append(("DFT calls", f"{_fmt(used, 0)} of a budget of {_fmt(run.budget(), 0)}"))
    if run.ledger:
        rows.append(("DFT ledger", _e(_ledger_text(run.ledger))))
    if summary is not None and "dft_calls_not_trained_on" in summary:
        wasted = int(summary["dft_calls_not_trained_on"])
        css = "good" if wasted == 0 else "bad"
        rows.append(
            (
                "DFT calls charged but not trained on",
                f'<b class="{css}">{wasted}</b> (DFT forces above active_learning.max_candidate_force)',
            )
        )
    if summary is not None and "wall_time_s" in summary:
        rows.append(("Wall time", _duration(float(summary["wall_time_s"]))))
    elif run.created is not None and run.events:
        elapsed = _duration(run.events[-1][0] - run.created)
        rows.append(("Elapsed", f"{elapsed} (from the run's start to its last event)"))
    for step in run.steps:
        if step.state == "failed":
            rows.append((f"Step {step.name} failed", f'<span class="bad">{_e(step.error)}</span>'))
    last = run.handed_out_validation()
    if last is None:
        rows.append(("Final ACE vs DFT hold-out", _missing("no validation yet")))
    else:
        validation = last.validation.data
        assert validation is not None
        try:
            accuracy = _accuracy_sentence(last.number, validation)
        except (KeyError, TypeError, ValueError) as exc:
            accuracy = _missing(f"{in_iteration(last.number, VALIDATION_RECORD)} is incomplete: {_problem(exc)}")
        rows.append(("Final ACE vs DFT hold-out", accuracy))
    return _key_value_table(rows)


def _problem(exc: Exception) -> str:
    return f"missing key {exc}" if isinstance(exc, KeyError) else f"{type(exc).__name__}: {exc}"


def _rmse_pair(energy_mev_per_atom: Any, forces_mev_per_a: Any) -> str:
    return f"{_fmt(energy_mev_per_atom, 1)} meV/atom, {_fmt(forces_mev_per_a, 1)} meV/Å"


def _unfinished_state(run: RunRecord) -> str:
    """What the event log says about a run without a summary: failed, cancelled, or not finished (yet)."""
    run_level = [e for e in run.events if e[1] in _RUN_LEVEL_EVENTS]
    if run_level and run_level[-1][1] == _RUN_FAILED:
        return f"the run failed: {run_level[-1][3]} (no {SUMMARY_FILE})"
    if run_level and run_level[-1][1] == orchestrator_pb2.RUN_EVENT_KIND_RUN_COMPLETED:
        return f"the run completed without a {SUMMARY_FILE} (it stopped after an earlier step: config stop_after)"
    return f"the run has not finished ({run.summary.problem}): still running, or killed"


def _accuracy_sentence(number: int, validation: dict[str, Any]) -> str:
    target = validation["target"]
    final = validation["models"]["final_ace"]
    met = validation.get("target_met")
    verdict = _VERDICT.get(met, "")
    others = "; ".join(
        f"{label} {_rmse_pair(model['energy_rmse_mev_per_atom'], model['forces_rmse_mev_per_a'])}"
        for key, label, _colour in MODELS
        if key != "final_ace" and (model := validation["models"].get(key)) is not None
    )
    stability = validation.get("md_stability")
    stable = (
        f" MD stability: {stability['n_survivors']}/{stability['n_runs']} runs survive {stability['steps']} steps."
        if stability
        else ""
    )
    return (
        f"<b>{_rmse_pair(final['energy_rmse_mev_per_atom'], final['forces_rmse_mev_per_a'])}</b> "
        f"(target {_rmse_pair(target['energy_mev_per_atom'], target['forces_mev_per_a'])}): "
        f"{verdict}. For comparison: {_e(others)}. Iteration {number}, {_e(str(validation.get('n_holdout', '?')))} "
        f"hold-out structures at {_e(str(validation.get('level_of_theory', '?')))}.{_e(stable)}"
    )


def _selection_section(run: RunRecord, out_dir: Path) -> str:
    data = run.selection.data
    if data is None:
        return _missing(f"no DIRECT selection record: {run.selection.problem}")
    variance = data.get("explained_variance_ratio") or []
    rows = [
        ("Pool structures", _fmt(data.get("n_pool"), 0)),
        ("Rejected while building the pool", _fmt(data.get("n_rejected"), 0)),
        ("Dropped for teacher forces above the cap", _fmt(data.get("n_rejected_teacher_force"), 0)),
        ("Rattle amplitudes (Å)", _e(", ".join(f"{a:g}" for a in data.get("rattle_amplitudes_a") or []))),
        ("Selected by DIRECT", _fmt(data["n_selected"], 0)),
        ("Coverage of the pool's feature space", _fmt(data["coverage"], 3)),
        ("Featuriser", _e(str(data.get("featuriser", "?")))),
        (
            "Principal components (explained variance)",
            f"{_fmt(data.get('n_components'), 0)} ({_fmt(sum(variance), 3)})",
        ),
        ("Clusters", _fmt(data.get("n_clusters"), 0)),
    ]
    return _key_value_table(rows)


def _active_learning_section(run: RunRecord, out_dir: Path) -> str:
    if not run.iterations:
        return _missing(f"no active-learning iteration yet (no iteration_NN/{ACTIVE_LEARNING_RECORD})")
    out = []
    header = [
        "iteration",
        "new DFT calls",
        "DFT calls after step 2",
        "DFT calls after validation",
        "calibration factor",
        "pool",
        "above threshold",
        "excluded (force)",
        "chosen",
        "max calibrated σ (eV/Å)",
    ]
    rows = []
    cumulative: list[tuple[int, float]] = []  # (iteration, DFT calls charged by its end)
    previous = 0.0
    histograms = []
    for iteration in run.iterations:
        record = iteration.active_learning.data
        validation = iteration.validation.data
        after_validation = validation.get("dft_calls_total") if validation is not None else None
        if record is None:
            rows.append([str(iteration.number), *[_missing(iteration.active_learning.problem)], *[""] * 8])
            continue
        factor = float(record["calibration_factor"])
        calibrated = factor * np.asarray(record["pool_committee_max_force_std_ev_per_a"], dtype=np.float64)
        threshold = float(record["force_error_threshold_ev_per_a"])
        chosen = np.asarray(record.get("chosen_pool_indices", []), dtype=np.int64)
        end = float(after_validation if after_validation is not None else record["dft_calls_charged"])
        cumulative.append((iteration.number, end))
        rows.append(
            [
                str(iteration.number),
                _fmt(end - previous, 0),
                _fmt(record["dft_calls_charged"], 0),
                _fmt(after_validation, 0),
                _fmt(factor, 2),
                _fmt(len(calibrated), 0),
                _fmt(int((calibrated > threshold).sum()), 0),
                _fmt(len(record.get("excluded_by_force_pool_indices", [])), 0),
                _fmt(len(chosen), 0),
                _fmt(calibrated.max() if len(calibrated) else None, 3),
            ]
        )
        previous = end
        histograms.append((iteration.number, calibrated, chosen, threshold))
    out.append(_table(header, rows))
    if cumulative:
        out.append(_plot_dft_calls(cumulative, run.budget(), out_dir))
    if histograms:
        out.append(
            "<p>Pool uncertainty: committee max force spread × the iteration's calibration factor (an estimate of "
            "the largest force error); candidates above the threshold are labelled, most uncertain first, within "
            "the budget and the diversity guard.</p>"
        )
        out.append(_plot_uncertainty(histograms, out_dir))
    return "\n".join(out)


def _validation_section(run: RunRecord, out_dir: Path) -> str:
    last = run.handed_out_validation()
    if last is None:
        return _missing("validation is missing: " + _validation_problems(run))
    validation = last.validation.data
    assert validation is not None
    reference = validation["reference"]
    ref_energy = np.asarray(reference["energy_per_atom_ev"], dtype=np.float64)
    ref_forces = np.asarray(reference["forces_ev_per_a"], dtype=np.float64).reshape(-1)
    fig, (energy_ax, force_ax) = _figure(ncols=2, size=(11, 5))
    for key, label, colour in MODELS:
        model = validation["models"].get(key)
        if model is None:
            continue
        energy = np.asarray(model["energy_per_atom_ev"], dtype=np.float64)
        forces = np.asarray(model["forces_ev_per_a"], dtype=np.float64).reshape(-1)
        if energy.shape != ref_energy.shape or forces.shape != ref_forces.shape:
            raise ValueError(
                f"{key}: {len(energy)} energies / {len(forces)} force components, the reference has "
                f"{len(ref_energy)} / {len(ref_forces)}"
            )
        energy_ax.scatter(
            ref_energy,
            energy,
            s=18,
            color=colour,
            alpha=0.75,
            label=f"{label}: RMSE {_fmt(model['energy_rmse_mev_per_atom'], 1)} meV/atom",
        )
        force_ax.scatter(
            ref_forces,
            forces,
            s=8,
            color=colour,
            alpha=0.5,
            label=f"{label}: RMSE {_fmt(model['forces_rmse_mev_per_a'], 1)} meV/Å",
        )
    _parity_axes(energy_ax, "energy per atom (eV/atom)")
    _parity_axes(force_ax, "force component (eV/Å)")
    fig.suptitle(f"Iteration {last.number}: models vs the DFT hold-out ({validation.get('level_of_theory', '')})")
    intro = (
        f"<p>Iteration {last.number}: {_e(str(validation.get('n_holdout', '?')))} hold-out structures labelled at "
        f"{_e(str(validation.get('level_of_theory', '?')))}, never used for training. "
        f"{_VERDICT.get(validation.get('target_met'), '')}</p>"
    )
    return (
        intro
        + _rmse_table(validation)
        + _source_table(validation)
        + _stability_text(validation)
        + _save(fig, out_dir, "parity.png", "parity plots of energies and forces")
    )


def _ablation_section(run: RunRecord, out_dir: Path) -> str:
    chosen = run.handed_out_validation()
    if chosen is None:
        return _missing("no validation yet, so no ablation: " + _validation_problems(run))
    validation = chosen.validation.data
    assert validation is not None
    ablation = validation.get("ablation")
    if not ablation:
        return _missing(
            f"{in_iteration(chosen.number, VALIDATION_RECORD)} has no ablation (a run from before the ablation)"
        )
    intro = (
        f"<p>The ablation: the same ACE (settings, cutoff, fit) fitted directly on the "
        f"{_fmt(ablation.get('n_training_structures'), 0)} DFT training structures of iteration {chosen.number} "
        "— no teacher, no surrogate data — and scored on the same hold-out and profile as the run's models.</p>"
    )
    if ablation.get("error"):
        return intro + f'<p class="bad">The direct fit could not be made: {_e(str(ablation["error"]))}</p>'
    profile = validation.get("profile") or {}
    barriers = profile.get("central_barrier_kcal_per_mol", {})
    dft = barriers.get("dft")
    rows = []
    for key, label, _colour in MODELS:
        model = validation["models"].get(key)
        if model is None:
            continue
        barrier = barriers.get(key)
        error = None if barrier is None or dft is None else abs(barrier - dft)
        name = f"<b>{_e(label)}</b>" if key in ("final_ace", "direct_ace") else _e(label)
        rows.append(
            [
                name,
                _fmt(model["energy_rmse_mev_per_atom"], 1),
                _fmt(model["forces_rmse_mev_per_a"], 1),
                _fmt(barrier, 2),
                _fmt(error, 2),
                _gamma(model.get("max_gamma")),
            ]
        )
    header = [
        "model",
        "energy RMSE (meV/atom)",
        "force RMSE (meV/Å)",
        "barrier (kcal/mol)",
        "|barrier − DFT|",
        "max γ on the hold-out",
    ]
    table = _table(header, rows)
    gain = ablation.get("gain")
    if not gain:
        return intro + table
    ratio = float(gain["forces_rmse_ratio_final_over_direct"])
    energy_ratio = float(gain["energy_rmse_ratio_final_over_direct"])
    verdict = (
        '<b class="good">the distillation earns its place on forces</b>'
        if ratio < 1
        else '<b class="bad">the distillation does not beat a plain fit of the DFT labels on forces</b>'
    )
    sentence = (
        f"<p>Final ACE / direct ACE: force RMSE ratio <b>{_fmt(ratio, 2)}</b>, energy RMSE ratio "
        f"<b>{_fmt(energy_ratio, 2)}</b> (below 1: the distillation helps): {verdict}.</p>"
    )
    return intro + table + sentence


def _learning_curve_section(run: RunRecord, out_dir: Path) -> str:
    validated = [it for it in run.iterations if it.validation.data is not None]
    if not validated:
        return _missing("no validation yet, so no learning curve: " + _validation_problems(run))
    numbers = [it.number for it in validated]
    records = [it.validation.data for it in validated]
    assert all(r is not None for r in records)
    fig, (force_ax, energy_ax) = _figure(ncols=2, size=(11, 4))
    header = ["iteration"]
    for _key, label, _colour in MODELS:
        header += [f"{label}: E (meV/atom)", f"{label}: F (meV/Å)"]
    rows = [[str(n)] for n in numbers]
    for key, label, colour in MODELS:
        energies = [_rmse(r, key, "energy_rmse_mev_per_atom") for r in records]  # type: ignore[arg-type]
        forces = [_rmse(r, key, "forces_rmse_mev_per_a") for r in records]  # type: ignore[arg-type]
        for row, e, f in zip(rows, energies, forces, strict=True):
            row += [_fmt(e, 1), _fmt(f, 1)]
        force_ax.plot(numbers, [math.nan if f is None else f for f in forces], "o-", color=colour, label=label)
        energy_ax.plot(numbers, [math.nan if e is None else e for e in energies], "o-", color=colour, label=label)
    target = records[-1]["target"]  # type: ignore[index]
    force_ax.axhline(float(target["forces_mev_per_a"]), color="black", ls="--", label="target")
    energy_ax.axhline(float(target["energy_mev_per_atom"]), color="black", ls="--", label="target")
    force_ax.set(xlabel="iteration", ylabel="force RMSE (meV/Å)", title="forces")
    energy_ax.set(xlabel="iteration", ylabel="energy RMSE (meV/atom)", title="energies")
    for ax in (force_ax, energy_ax):
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_ylim(bottom=0)
        ax.legend()
    return _table(header, rows) + _save(fig, out_dir, "learning_curve.png", "RMSE per model against the iteration")


def _profile_section(run: RunRecord, out_dir: Path) -> str:
    last = run.handed_out_validation()
    if last is None:
        return _missing("no validation yet, so no energy profile: " + _validation_problems(run))
    validation = last.validation.data
    assert validation is not None
    profile = validation.get("profile")
    if not profile:
        return _missing(
            "no energy profile was computed for this system "
            f"(profile is null in iteration_{last.number:02d}/{VALIDATION_RECORD})"
        )
    xi = np.asarray(profile["xi_a"], dtype=np.float64)
    barriers = profile.get("central_barrier_kcal_per_mol", {})
    fig, (ax,) = _figure(ncols=1, size=(7, 4.5))
    curves = [("dft", "DFT", _DFT_COLOUR), *MODELS]
    for key, label, colour in curves:
        energies = profile["energies_ev"].get(key)
        if energies is None:
            continue
        energies = np.asarray(energies, dtype=np.float64)
        if energies.shape != xi.shape:
            raise ValueError(f"profile {key}: {len(energies)} energies for {len(xi)} points of ξ")
        relative = (energies - energies.min()) * KCAL_PER_MOL_PER_EV
        style = "s-" if key == "dft" else "o-"
        ax.plot(
            xi, relative, style, color=colour, ms=4, label=f"{label}: barrier {_fmt(barriers.get(key), 2)} kcal/mol"
        )
    ax.set(xlabel="ξ (Å)", ylabel="E − E_min (kcal/mol)", title=f"Energy profile along ξ (iteration {last.number})")
    ax.legend(fontsize="small", loc="upper left")
    dft = barriers.get("dft")
    rows = []
    for key, label, _colour in curves:
        value = barriers.get(key)
        delta = None if value is None or dft is None or key == "dft" else value - dft
        rows.append([label, _fmt(value, 2), _fmt(delta, 2)])
    table = _table(["method", "central barrier (kcal/mol)", "minus DFT (kcal/mol)"], rows)
    return table + _save(fig, out_dir, "profile.png", "energy profile along the reaction coordinate")


def _time_section(run: RunRecord, out_dir: Path) -> str:
    if not run.steps:
        return _missing(f"no step has started (the steps table of {STATE_FILE} is empty)")
    rows = [
        [
            _e(s.name),
            _e(s.state),
            _e(_utc(s.started)) if s.started is not None else "",
            _duration(s.duration_s) if s.duration_s is not None else '<span class="missing">not finished</span>',
            _e(s.error),
        ]
        for s in run.steps
    ]
    timed = [s for s in run.steps if s.duration_s is not None]
    rows.append(["<b>all steps</b>", "", "", f"<b>{_duration(sum(s.duration_s or 0.0 for s in timed))}</b>", ""])
    out = [_table(["step", "state", "started (UTC)", "time", "error"], rows)]
    if timed:
        fig, (ax,) = _figure(ncols=1, size=(8, max(2.5, 0.8 + 0.35 * len(timed))))
        names = [s.name for s in timed][::-1]
        seconds = [s.duration_s or 0.0 for s in timed][::-1]
        colours = [_STATE_COLOURS.get(s.state, "tab:gray") for s in timed][::-1]
        ax.barh(names, seconds, color=colours)
        ax.set(xlabel="time (s)", title="Time per step")
        out.append(_save(fig, out_dir, "step_times.png", "time per step"))
    return "\n".join(out)


def _artifacts_section(run: RunRecord, out_dir: Path) -> str:
    rows = []
    for step in run.steps:
        by_digest: dict[str, list[str]] = {}
        for relative, digest in step.exported.items():
            by_digest.setdefault(digest, []).append(relative)
        for name, ref in sorted(step.outputs.items()):
            digest = str(ref.get("sha256", ""))
            exported = ", ".join(
                f'<a href="../{_e(p)}"><code>{_e(p)}</code></a>' for p in sorted(by_digest.get(digest, []))
            )
            rows.append(
                [
                    _e(step.name),
                    _e(name),
                    _e(str(ref.get("kind", ""))),
                    _size(int(ref.get("size", 0))),
                    f'<code title="{_e(digest)}">{_e(digest[:12])}</code>',
                    exported,
                ]
            )
    if not rows:
        return _missing("no step has recorded outputs yet")
    note = "<p>Outputs of every step in the content-addressed store (sha256, first 12 hex digits; hover for all).</p>"
    return note + _table(["step", "output", "kind", "size", "sha256", "exported to"], rows)


# -- section pieces ----------------------------------------------------------------------------------------------


def _rmse_table(validation: dict[str, Any]) -> str:
    target = validation["target"]
    rows = []
    for key, label, _colour in MODELS:
        model = validation["models"].get(key)
        if model is None:
            rows.append([label, _missing("not validated"), ""])
            continue
        rows.append([label, _fmt(model["energy_rmse_mev_per_atom"], 1), _fmt(model["forces_rmse_mev_per_a"], 1)])
    rows.append(["<i>target</i>", _fmt(target["energy_mev_per_atom"], 1), _fmt(target["forces_mev_per_a"], 1)])
    return _table(["model", "energy RMSE (meV/atom)", "force RMSE (meV/Å)"], rows)


_SOURCE_LABELS = {
    "surrogate_md": "the run's own surrogate MD",
    "teacher_md": "an independent MD (the teacher, other seed, hotter)",
}


def _source_table(validation: dict[str, Any]) -> str:
    """Force and energy RMSE per hold-out source: the run's own MD against the independent one."""
    sources = sorted(validation.get("n_holdout_by_source") or {})
    if len(sources) < 2:
        return ""
    header = ["model"] + [
        f"{_SOURCE_LABELS.get(src, src)} ({validation['n_holdout_by_source'][src]}): E, F" for src in sources
    ]
    rows = []
    for key, label, _colour in MODELS:
        by_source = validation["models"].get(key, {}).get("by_source")
        if not by_source:
            continue
        rows.append(
            [_e(label)]
            + [
                _rmse_pair(by_source[src]["energy_rmse_mev_per_atom"], by_source[src]["forces_rmse_mev_per_a"])
                if src in by_source
                else "–"
                for src in sources
            ]
        )
    return "<p>By source of the hold-out structures:</p>" + _table(header, rows)


def _stability_text(validation: dict[str, Any]) -> str:
    stability = validation.get("md_stability")
    if not stability:
        return ""
    n_runs, survivors = int(stability["n_runs"]), int(stability["n_survivors"])
    css = "good" if survivors == n_runs else "bad"
    per_t = ", ".join(f"{t} K: {s}/{n}" for t, (s, n) in stability["survivors_by_temperature"].items())
    lost = [
        f"seed {run['seed']} at {_fmt(run['temperature_k'], 0)} K: {run['problem']}"
        for run in stability["runs"]
        if not run["survived"]
    ]
    text = (
        f'<p>MD stability of the final ACE: <b class="{css}">{survivors}/{n_runs} runs survive</b> '
        f"{_e(str(stability['steps']))} steps of {_fmt(stability['timestep_fs'], 2)} fs ({_e(per_t)}).</p>"
    )
    # A survivor that split into the seeds' own fragments (Cl⁻ leaving CH3Cl at 1000 K) is physics, named so.
    dissociated = [
        f"seed {run['seed']} at {_fmt(run['temperature_k'], 0)} K survived and dissociated {run['dissociation']}"
        for run in stability["runs"]
        if run["survived"] and run.get("dissociation")
    ]
    if lost or dissociated:
        text += "<ul>" + "".join(f"<li>{_e(item)}</li>" for item in [*lost, *dissociated]) + "</ul>"
    return text


def _gamma(value: Any) -> str:
    """An extrapolation grade: 2 decimals near 1, scientific notation when huge; "–" when not computed."""
    if value is None:
        return "–"
    number = float(value)
    return f"{number:.2f}" if number < 1000 else f"{number:.2e}"


def _rmse(validation: dict[str, Any], model: str, key: str) -> float | None:
    value = validation["models"].get(model, {}).get(key)
    return None if value is None else float(value)


def _validation_problems(run: RunRecord) -> str:
    if not run.iterations:
        return f"no iteration_NN/{VALIDATION_RECORD} (the run has no active-learning iteration yet)"
    return "; ".join(it.validation.problem for it in run.iterations)


def _final_potential(run: RunRecord, relative: str) -> str:
    if not relative:
        return _missing("none recorded")
    digest = next((s.exported[relative] for s in run.steps if relative in s.exported), "")
    present = (run.run_dir / relative).is_file()
    text = f'<a href="../{_e(relative)}"><code>{_e(relative)}</code></a>'
    if digest:
        text += f' (sha256 <code title="{_e(digest)}">{_e(digest[:12])}</code>)'
    return text if present else text + ' <span class="bad">(file missing)</span>'


def _ledger_total(run: RunRecord) -> int | None:
    return None if run.ledger is None else sum(run.ledger.values())


def _ledger_text(ledger: dict[tuple[str, str], int]) -> str:
    parts = []
    for level in sorted({level for level, _status in ledger}):
        counts = {status: n for (lev, status), n in ledger.items() if lev == level}
        detail = ", ".join(f"{status} {n}" for status, n in sorted(counts.items()))
        parts.append(f"{sum(counts.values())} at {level} ({detail})")
    return "; ".join(parts)


# -- plots ---------------------------------------------------------------------------------------------------------


def _figure(ncols: int, size: tuple[float, float]) -> tuple[Figure, list[Axes]]:
    """A figure drawn by the Agg canvas directly: no pyplot, no global state, safe in the orchestrator's threads."""
    fig = Figure(figsize=size, layout="constrained")
    FigureCanvasAgg(fig)
    return fig, list(fig.subplots(1, ncols, squeeze=False)[0])


def _save(fig: Figure, out_dir: Path, name: str, alt: str) -> str:
    fig.savefig(out_dir / name, dpi=100)
    return f'<img src="{_e(name)}" alt="{_e(alt)}">'


def _parity_axes(ax: Axes, quantity: str) -> None:
    low, high = ax.dataLim.intervalx
    low, high = min(low, ax.dataLim.intervaly[0]), max(high, ax.dataLim.intervaly[1])
    pad = 0.05 * (high - low or 1.0)
    ax.plot([low - pad, high + pad], [low - pad, high + pad], color=_DFT_COLOUR, lw=0.8, ls="--")
    ax.set(
        xlabel=f"DFT {quantity}", ylabel=f"model {quantity}", xlim=(low - pad, high + pad), ylim=(low - pad, high + pad)
    )
    ax.set_aspect("equal")
    ax.legend(fontsize="small", loc="upper left")


def _plot_dft_calls(cumulative: list[tuple[int, float]], budget: int | None, out_dir: Path) -> str:
    fig, (ax,) = _figure(ncols=1, size=(7, 4))
    numbers = [n for n, _ in cumulative]
    totals = [c for _, c in cumulative]
    new = np.diff([0.0, *totals])
    ax.bar(numbers, new, color="tab:blue", alpha=0.6, label="DFT calls in the iteration")
    ax.plot(numbers, totals, "o-", color="tab:blue", label="cumulative")
    if budget is not None:
        ax.axhline(budget, color="tab:red", ls="--", label=f"budget ({budget})")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set(xlabel="iteration", ylabel="DFT calls", title="DFT calls per iteration")
    ax.legend()
    return _save(fig, out_dir, "dft_calls.png", "DFT calls per iteration against the budget")


def _plot_uncertainty(histograms: list[tuple[int, np.ndarray, np.ndarray, float]], out_dir: Path) -> str:
    fig, (ax,) = _figure(ncols=1, size=(8, 4.5))
    values = np.concatenate([h[1] for h in histograms])
    thresholds = sorted({h[3] for h in histograms})
    positive = values[values > 0]
    logarithmic = len(positive) > 1 and positive.max() > 10 * positive.min()
    if logarithmic:
        low = min(positive.min(), *thresholds)
        high = max(positive.max(), *thresholds)
        bins = np.geomspace(low, high * 1.0001, 41)
        ax.set_xscale("log")
    else:
        bins = np.linspace(
            min(values.min(initial=0.0), *thresholds), max(values.max(initial=0.0), *thresholds) * 1.0001, 41
        )
    colours = [f"C{i % 10}" for i in range(len(histograms))]
    for (number, calibrated, chosen, threshold), colour in zip(histograms, colours, strict=True):
        above = int((calibrated > threshold).sum())
        ax.hist(
            calibrated,
            bins=bins.tolist(),
            histtype="step",
            lw=1.5,
            color=colour,
            label=f"iteration {number}: pool {len(calibrated)}, {above} above threshold, {len(chosen)} chosen",
        )
        if len(chosen):
            ax.plot(calibrated[chosen], np.zeros(len(chosen)), "|", color=colour, ms=18, mew=2)
    for threshold in thresholds:
        ax.axvline(threshold, color="black", ls="--", label=f"threshold {threshold:g} eV/Å")
    ax.set(
        xlabel="calibrated uncertainty: max force error estimate (eV/Å)",
        ylabel="pool structures",
        title="Pool uncertainty per iteration (ticks: chosen for DFT)",
    )
    ax.legend(fontsize="small")
    return _save(fig, out_dir, "uncertainty.png", "distribution of the calibrated pool uncertainty")


# -- HTML and number formatting -----------------------------------------------------------------------------------


def _e(text: str) -> str:
    return html.escape(text, quote=True)


def _missing(text: str) -> str:
    return f'<p class="missing">{_e(text)}</p>'


def _table(header: list[str], rows: list[list[str]]) -> str:
    """Header cells are text (escaped); row cells are HTML already. Numeric-looking cells align right."""
    head = "".join(f"<th>{_e(h)}</th>" for h in header)
    body = "".join(
        "<tr>" + "".join(f'<td class="num">{c}</td>' if _is_number(c) else f"<td>{c}</td>" for c in row) + "</tr>"
        for row in rows
    )
    return f"<table><tr>{head}</tr>{body}</table>"


def _key_value_table(rows: list[tuple[str, str]]) -> str:
    return "<table>" + "".join(f"<tr><th>{_e(k)}</th><td>{v}</td></tr>" for k, v in rows) + "</table>"


def _is_number(cell: str) -> bool:
    try:
        float(cell.replace(",", ""))
    except ValueError:
        return False
    return True


def _fmt(value: Any, digits: int) -> str:
    """A number with `digits` decimals; "–" for a missing or non-finite one."""
    if value is None or isinstance(value, bool):
        return "–"
    try:
        number = float(value)
    except (TypeError, ValueError):
        return _e(str(value))
    if not math.isfinite(number):
        return "–"
    return f"{number:.{digits}f}"


def _duration(seconds: float) -> str:
    if seconds < 60:
        return f"{seconds:.1f} s"
    minutes, secs = divmod(round(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours} h {minutes:02d} min" if hours else f"{minutes} min {secs:02d} s"


def _size(n_bytes: int) -> str:
    if n_bytes < 1000:
        return f"{n_bytes} B"
    exponent = min(int(math.log10(n_bytes)) // 3, 4)
    return f"{n_bytes / 1000**exponent:.1f} {('kB', 'MB', 'GB', 'TB')[exponent - 1]}"


def _utc(epoch: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(epoch))
