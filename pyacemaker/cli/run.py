"""`pyacemaker run CONFIG`: validate locally, submit to the orchestrator, follow the run with a progress bar."""

from __future__ import annotations

import argparse
import sqlite3
from pathlib import Path

import grpc
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from pyacemaker.cli.main import EXIT_BAD_INPUT, EXIT_FAILED, EXIT_OK, EXIT_UNAVAILABLE, fail
from pyacemaker.cli.preflight import preflight_errors
from pyacemaker.cli.status import print_run
from pyacemaker.config import ConfigError, RunConfig, config_from_json, config_to_json, load_config
from pyacemaker.config_defaults import derive_defaults
from pyacemaker.deploy.local import service_address
from pyacemaker.rpc import channel, describe_rpc_error
from pyacemaker.run_layout import REPORT_DIR, REPORT_FILE, SUMMARY_FILE
from pyacemaker.run_records import RunSummary, read_record
from pyacemaker.seeds import load_seeds
from pyacemaker.services.orchestrator.state import saved_config_json
from pyacemaker.structures import StructureFileError, atoms_to_structure
from pyacemaker.v1 import common_pb2, orchestrator_pb2, orchestrator_pb2_grpc

_K = orchestrator_pb2


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("run", help="run the pipeline for a config (re-running skips verified steps)")
    parser.add_argument("config", nargs="?", help="YAML config")
    parser.add_argument(
        "--resume", metavar="RUN_DIR", help="continue the run in RUN_DIR with the config it was started with"
    )
    parser.add_argument("--orchestrator", help="orchestrator address (default: the local deployment)")
    parser.add_argument("--detach", action="store_true", help="submit and return; follow with `pyacemaker status`")
    parser.set_defaults(handler=run_pipeline)


def run_pipeline(args: argparse.Namespace) -> int:
    if (args.config is None) == (args.resume is None):
        return fail("give either a config file or --resume RUN_DIR", EXIT_BAD_INPUT)
    try:
        config = load_config(args.config) if args.config else config_from_json(saved_config_json(Path(args.resume)))
    except (ConfigError, StructureFileError, FileNotFoundError) as exc:
        return fail(str(exc), EXIT_BAD_INPUT)
    source = args.config or f"{args.resume} (its saved config)"
    try:
        seeds = load_seeds(config)
    except ConfigError as exc:  # a key of the config that the seeds contradict
        return fail(f"{source}: {exc}", EXIT_BAD_INPUT)
    except StructureFileError as exc:  # names the seed file
        return fail(str(exc), EXIT_BAD_INPUT)
    # Settings the config leaves out, from its seeds and budget (a saved config has them all already); the
    # orchestrator saves the config as sent, so a resume uses these values.
    config, derived = derive_defaults(config, seeds, None if args.resume else saved_run_config(config.run_dir))
    refused = preflight_errors(config, seeds, source, installed_extras=False)
    if refused:
        return fail(refused, EXIT_BAD_INPUT)
    address = args.orchestrator or service_address("orchestrator")
    console = Console(stderr=True, soft_wrap=True)
    for setting in derived:
        console.print(setting.line(), markup=False, highlight=False)
    request = orchestrator_pb2.StartRunRequest(
        config_json=config_to_json(config),
        seeds=[atoms_to_structure(atoms) for atoms in seeds],
        run_dir=str(config.run_dir),
    )
    try:
        with channel(address) as ch:
            stub = orchestrator_pb2_grpc.OrchestratorServiceStub(ch)
            run = stub.StartRun(request, timeout=60).run
            console.print(f"run {run.name} ({run.run_id}) started; outputs in {run.run_dir}")
            if args.detach:
                return EXIT_OK
            run = _follow(stub, run, console)
    except grpc.RpcError as exc:
        code = {grpc.StatusCode.UNAVAILABLE: EXIT_UNAVAILABLE, grpc.StatusCode.INVALID_ARGUMENT: EXIT_BAD_INPUT}
        return fail(describe_rpc_error(exc, address), code.get(exc.code(), EXIT_FAILED))
    except KeyboardInterrupt:
        console.print("detached; the run goes on in the orchestrator (`pyacemaker status` follows it)")
        return 130
    out = Console(soft_wrap=True)
    print_run(out, run)
    if run.state != common_pb2.JOB_STATE_SUCCEEDED:
        return fail(f"run {run.run_id} did not succeed: {run.error}", EXIT_FAILED)
    _print_outcome(out, Path(run.run_dir))
    return EXIT_OK


def saved_run_config(run_dir: Path | None) -> RunConfig | None:
    """The config a run in `run_dir` was last started with, when there is one and it still parses."""
    if run_dir is None:
        return None
    try:
        return config_from_json(saved_config_json(run_dir))
    except (FileNotFoundError, ConfigError, sqlite3.Error):
        return None


def _print_outcome(console: Console, run_dir: Path) -> None:
    """Why the run stopped and where its potential and report are (from run_summary.json, when there is one)."""
    summary_file = run_dir / SUMMARY_FILE
    if not summary_file.is_file():
        return
    summary = read_record(summary_file, RunSummary)
    console.print(
        f"stopped: {summary.stop_reason} after {summary.iterations} iteration(s); "
        f"{summary.dft_calls} of {summary.dft_budget} DFT calls"
    )
    if summary.final_potential:
        console.print(f"final potential: {run_dir / summary.final_potential}")
    report = run_dir / REPORT_DIR / REPORT_FILE
    if report.is_file():
        console.print(f"report: {report}")


def _follow(
    stub: orchestrator_pb2_grpc.OrchestratorServiceStub, started: orchestrator_pb2.Run, console: Console
) -> orchestrator_pb2.Run:
    """Print step events as lines and show progress as a bar, until the run ends."""
    run = None
    columns = [
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
    ]
    with Progress(*columns, console=console, transient=True) as bar:
        task = bar.add_task("waiting", total=None)
        for response in stub.WatchRun(
            orchestrator_pb2.WatchRunRequest(run_id=started.run_id, after_seq=started.first_seq)
        ):
            run, event = response.run, response.event
            if event.kind == _K.RUN_EVENT_KIND_STEP_PROGRESS:
                p = event.progress
                label = f"{event.step}: {p.stage}" + (f" ({p.message})" if p.message else "")
                bar.update(task, description=label, completed=p.done, total=p.total or None)
            elif event.kind != _K.RUN_EVENT_KIND_RUN_STARTED:
                kind = _K.RunEventKind.Name(event.kind).removeprefix("RUN_EVENT_KIND_").lower().replace("_", " ")
                where = f"{event.step}: " if event.step else ""
                console.print(f"{kind}: {where}{event.message}".rstrip(": "))
    if run is None:
        raise RuntimeError("the orchestrator closed the event stream without any event")
    return run
