"""The run report: `RUN_DIR/report/index.html` with PNG plots beside it.

`records` reads the run directory, `sections` turns what was read into HTML, `plots` draws the figures and `html`
holds the HTML pieces and number formats; `write_report` (here) puts the page together.

Built only from what a run leaves in its run directory: `state.sqlite` (steps, events, the DFT ledger), the
step records exported as JSON (`step1_direct/selection.json`, `iteration_NN/step2_active_learning/iteration.json`,
`iteration_NN/validation/validation.json`) and `run_summary.json`. So it can be written for a run that is still
going, stopped early or failed: a section whose data is missing says so instead of failing the report.

The state file is opened read-only: writing a report never changes a run.
"""

from __future__ import annotations

import time
from pathlib import Path

from pyacemaker.run_layout import (
    ACTIVE_LEARNING_RECORD,
    REPORT_DIR,
    REPORT_FILE,
    SELECTION_RECORD,
    STATE_FILE,
    SUMMARY_FILE,
    TEACHER_BOOTSTRAP_RECORD,
    VALIDATION_RECORD,
)
from pyacemaker.services.orchestrator.report.html import CSS, escape, format_utc, missing_note
from pyacemaker.services.orchestrator.report.records import ReportInputError, RunRecord, read_run
from pyacemaker.services.orchestrator.report.sections import (
    ablation_section,
    active_learning_section,
    artifacts_section,
    headline,
    learning_curve_section,
    problem_of,
    profile_section,
    selection_section,
    teacher_section,
    time_section,
    validation_section,
)

__all__ = ["PLOTS", "ReportInputError", "RunRecord", "read_run", "write_report"]

# Every plot the report writes; removed before a rewrite so a section that lost its data shows no stale plot.
PLOTS = ("dft_calls.png", "uncertainty.png", "parity.png", "learning_curve.png", "profile.png", "step_times.png")


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
        ("Summary", headline, [SUMMARY_FILE, STATE_FILE]),
        ("The teacher", teacher_section, [TEACHER_BOOTSTRAP_RECORD]),
        ("Step 1: DIRECT sampling", selection_section, [SELECTION_RECORD]),
        (
            "Active learning: DFT calls and uncertainty",
            active_learning_section,
            [f"iteration_NN/{ACTIVE_LEARNING_RECORD}"],
        ),
        ("Validation on the DFT hold-out", validation_section, [f"iteration_NN/{VALIDATION_RECORD}"]),
        ("Ablation: is distillation earning its place?", ablation_section, [f"iteration_NN/{VALIDATION_RECORD}"]),
        ("Learning curve", learning_curve_section, [f"iteration_NN/{VALIDATION_RECORD}"]),
        ("Energy profile along ξ", profile_section, [f"iteration_NN/{VALIDATION_RECORD}"]),
        ("Time per step", time_section, [STATE_FILE]),
        ("Artifacts", artifacts_section, [STATE_FILE]),
    ]
    body = [f"<h1>PyAceMaker run report: {escape(run.name)}</h1>"]
    body.append(
        f"<p>Run directory <code>{escape(str(run_dir.resolve()))}</code>; "
        f"report written {escape(format_utc(time.time()))} UTC.</p>"
    )
    for problem in run.problems:
        body.append(f'<p class="bad">{escape(problem)}</p>')
    for title, build, sources in sections:
        body.append(f"<h2>{escape(title)}</h2>")
        try:
            body.append(build(run, out_dir))
        except (KeyError, TypeError, ValueError, IndexError) as exc:
            body.append(missing_note(f"this section could not be drawn from {', '.join(sources)}: {problem_of(exc)}"))
    page = (
        '<!DOCTYPE html>\n<html lang="en">\n<head>\n<meta charset="utf-8">\n'
        f"<title>PyAceMaker report: {escape(run.name)}</title>\n<style>{CSS}</style>\n</head>\n<body>\n"
        + "\n".join(body)
        + "\n</body>\n</html>\n"
    )
    target = out_dir / REPORT_FILE
    staging = target.with_name(target.name + ".partial")
    staging.write_text(page, encoding="utf-8")
    staging.replace(target)
    return target
