"""`pyacemaker up` and `pyacemaker down`: the local deployment (all services as processes on 127.0.0.1)."""

from __future__ import annotations

import argparse

from rich.console import Console
from rich.table import Table

from pyacemaker.cli.main import EXIT_FAILED, EXIT_OK, fail
from pyacemaker.deploy import local


def register(subparsers: argparse._SubParsersAction) -> None:
    up = subparsers.add_parser("up", help="start all services as local processes and wait until healthy")
    up.add_argument(
        "--ports",
        choices=["default", "auto"],
        default="default",
        help="default: the well-known ports 50051-50054; auto: any free ports (recorded for the other commands)",
    )
    up.add_argument("--timeout", type=float, default=120.0, help="seconds to wait for each service (default 120)")
    up.set_defaults(handler=run_up)
    down = subparsers.add_parser("down", help="stop every service that `up` started")
    down.set_defaults(handler=run_down)


def run_up(args: argparse.Namespace) -> int:
    ports = dict.fromkeys(local.SERVICES, 0) if args.ports == "auto" else None
    try:
        processes = local.up(ports=ports, timeout=args.timeout)
    except (local.DeployError, TimeoutError, OSError) as exc:
        return fail(str(exc), EXIT_FAILED)
    table = Table(title=f"PyAceMaker services (home: {local.home_dir()})")
    for column in ("service", "address", "pid", "log"):
        table.add_column(column)
    for proc in processes.values():
        table.add_row(proc.name, proc.address, str(proc.pid), proc.log)
    Console().print(table)
    return EXIT_OK


def run_down(args: argparse.Namespace) -> int:
    stopped = local.down()
    print(f"stopped: {', '.join(stopped)}" if stopped else "no services were running")
    return EXIT_OK
