"""`pyacemaker report RUN_DIR`: write a run's HTML report (plots, figures, artifacts) into RUN_DIR/report."""

from __future__ import annotations

import argparse
from pathlib import Path

from pyacemaker.cli.main import EXIT_BAD_INPUT, EXIT_FAILED, EXIT_OK, fail


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "report", help="write a run's HTML report with plots into RUN_DIR/report (works for unfinished runs too)"
    )
    parser.add_argument("run_dir", help="the run directory (the one holding state.sqlite)")
    parser.add_argument(
        "--open-path",
        action="store_true",
        help="print only the report's absolute path, e.g. for `xdg-open $(pyacemaker report RUN --open-path)`",
    )
    parser.set_defaults(handler=write_run_report)


def write_run_report(args: argparse.Namespace) -> int:
    # Imported here: matplotlib costs a second and only this command needs it.
    from pyacemaker.services.orchestrator.report import ReportInputError, write_report

    try:
        path = write_report(Path(args.run_dir)).resolve()
    except ReportInputError as exc:
        return fail(str(exc), EXIT_BAD_INPUT)
    except OSError as exc:  # e.g. a read-only run directory
        return fail(f"cannot write the report into {args.run_dir}: {exc}", EXIT_FAILED)
    print(path if args.open_path else f"report written: {path}")
    return EXIT_OK
