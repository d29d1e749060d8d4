"""`pyacemaker status [RUN_ID]`: health of the services and the runs the orchestrator knows."""

from __future__ import annotations

import argparse

import grpc
from rich.console import Console
from rich.table import Table

from pyacemaker.cli.main import EXIT_FAILED, EXIT_OK, EXIT_UNAVAILABLE, fail
from pyacemaker.deploy import local
from pyacemaker.rpc import channel, check_health, describe_rpc_error
from pyacemaker.v1 import common_pb2, orchestrator_pb2, orchestrator_pb2_grpc

JOB_STATE_NAMES = {v: k.removeprefix("JOB_STATE_").lower() for k, v in common_pb2.JobState.items()}
STEP_STATE_NAMES = {v: k.removeprefix("STEP_STATE_").lower() for k, v in orchestrator_pb2.StepState.items()}


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("status", help="show service health and runs")
    parser.add_argument("run_id", nargs="?", help="show this run in detail")
    parser.add_argument("--orchestrator", help="orchestrator address (default: the local deployment)")
    parser.set_defaults(handler=run_status)


def print_run(console: Console, run: orchestrator_pb2.Run) -> None:
    """A run's steps, their figures and where their outputs are."""
    console.print(f"run {run.name} ({run.run_id}): {JOB_STATE_NAMES[run.state]}  [dim]{run.run_dir}[/dim]")
    if run.error:
        console.print(f"  error: {run.error}")
    for step in run.steps:
        console.print(f"  step {step.name}: {STEP_STATE_NAMES[step.state]}")
        for name, value in sorted(step.metrics.items()):
            console.print(f"    {name}: {value:g}")
        for relative in step.exported:
            console.print(f"    output: {run.run_dir}/{relative}")
        if step.error:
            console.print(f"    error: {step.error}")


def run_status(args: argparse.Namespace) -> int:
    console = Console(soft_wrap=True)
    table = Table(title="services")
    for column in ("service", "address", "pid", "health"):
        table.add_column(column)
    registry = local.read_registry()
    for name in local.SERVICES:
        address = args.orchestrator if name == "orchestrator" and args.orchestrator else local.service_address(name)
        proc = registry.get(name)
        healthy = check_health(address, timeout=1.0)
        table.add_row(name, address, str(proc.pid) if proc else "-", "SERVING" if healthy else "down")
    console.print(table)
    address = args.orchestrator or local.service_address("orchestrator")
    try:
        with channel(address) as ch:
            stub = orchestrator_pb2_grpc.OrchestratorServiceStub(ch)
            if args.run_id:
                runs = [stub.GetRun(orchestrator_pb2.GetRunRequest(run_id=args.run_id), timeout=10).run]
            else:
                runs = list(stub.ListRuns(orchestrator_pb2.ListRunsRequest(), timeout=10).runs)
    except grpc.RpcError as exc:
        code = EXIT_UNAVAILABLE if exc.code() == grpc.StatusCode.UNAVAILABLE else EXIT_FAILED
        return fail(describe_rpc_error(exc, address), code)
    if not runs:
        console.print("no runs on this orchestrator since it started")
    for run in runs:
        print_run(console, run)
    return EXIT_OK
