"""`pyacemaker up` and `pyacemaker down`: the services as local processes on 127.0.0.1 (default) or as podman
containers on a private network (`--runtime podman`, see pyacemaker/deploy/podman.py)."""

from __future__ import annotations

import argparse
import os
from pathlib import Path

from rich.console import Console
from rich.table import Table

from pyacemaker.cli.main import EXIT_BAD_INPUT, EXIT_FAILED, EXIT_OK, fail
from pyacemaker.deploy import local, podman
from pyacemaker.executors.deployment import DeploymentError
from pyacemaker.rpc import SecurityConfigError
from pyacemaker.services.oracle.deployment import DEPLOYMENT_ENV, load_deployment
from pyacemaker.services.trainer.deployment import DEPLOYMENT_ENV as TRAINER_DEPLOYMENT_ENV
from pyacemaker.services.trainer.deployment import load_trainer_deployment


def register(subparsers: argparse._SubParsersAction) -> None:
    up = subparsers.add_parser(
        "up",
        help="start the services (local processes or containers) and wait until healthy",
        description="Start the four services (orchestrator, sampler, oracle, trainer) and wait until each answers "
        "its health check; services already running and healthy are kept. Local processes bind 127.0.0.1 on "
        "ports 50051-50054 (--ports auto: any free ports); the addresses are recorded in $PYACEMAKER_HOME/"
        "services.json (default ~/.pyacemaker), where `run`, `status`, `label` and `down` find them, and the logs "
        "go to $PYACEMAKER_HOME/logs. Prints a table of the services, their addresses and pids (or containers).",
    )
    up.add_argument(
        "--runtime",
        choices=["local", "podman"],
        default="local",
        help="local: processes on 127.0.0.1 (default); podman: containers on a private network, published on "
        "127.0.0.1 (images from `make images`)",
    )
    up.add_argument(
        "--ports",
        choices=["default", "auto"],
        default="default",
        help="default: the well-known ports 50051-50054; auto: any free ports (recorded for the other commands)",
    )
    up.add_argument("--timeout", type=float, default=120.0, help="seconds to wait for each service (default 120)")
    up.add_argument(
        "--services",
        help=f"podman: comma-separated services to start (default: all of {','.join(local.SERVICES)})",
    )
    up.add_argument(
        "--image",
        action="append",
        default=[],
        metavar="SERVICE=IMAGE",
        help="podman: the image of one service (repeatable), e.g. oracle=localhost/pyacemaker-oracle-qe:latest; a "
        "running service with another image is replaced",
    )
    up.add_argument(
        "--workdir",
        type=Path,
        help="podman: directory mounted at the same path in the containers; run dirs must lie under it "
        "(default: the current directory)",
    )
    up.add_argument(
        "--oracle-deployment",
        type=Path,
        metavar="FILE",
        help="the oracle's deployment file: qe/vasp profiles (commands, pseudopotential and POTCAR dirs), job "
        "templates and scratch dirs of its executors; see docs/deployment.md (default: "
        "$PYACEMAKER_ORACLE_DEPLOYMENT, else the oracle's defaults)",
    )
    up.add_argument(
        "--trainer-deployment",
        type=Path,
        metavar="FILE",
        help="local runtime: the trainer's deployment file, its executor profiles (Slurm/PBS settings, job "
        "template, Apptainer image); see docs/deployment.md (default: $PYACEMAKER_TRAINER_DEPLOYMENT, else every "
        "training job runs as a local process)",
    )
    up.set_defaults(handler=run_up)
    down = subparsers.add_parser(
        "down",
        help="stop every service that `up` started (processes or containers)",
        description="Stop every service recorded in $PYACEMAKER_HOME/services.json by `up` (processes or podman "
        "containers) and clear the record. Training jobs the trainer started run in their own processes and "
        "finish; a trainer started again re-adopts them. Runs in progress stop with the "
        "orchestrator: `pyacemaker run --resume RUN_DIR` continues them after the next `up`.",
    )
    down.set_defaults(handler=run_down)


def _images(pairs: list[str]) -> dict[str, str]:
    images = {}
    for pair in pairs:
        service, sep, image = pair.partition("=")
        if not sep or not image or service not in local.SERVICES:
            raise ValueError(
                f"--image {pair!r}: expected SERVICE=IMAGE with SERVICE one of {', '.join(local.SERVICES)}"
            )
        images[service] = image
    return images


def run_up(args: argparse.Namespace) -> int:
    ports = dict.fromkeys(local.SERVICES, 0) if args.ports == "auto" else None
    if args.runtime == "local" and (args.services or args.image or args.workdir):
        return fail("--services, --image and --workdir apply to --runtime podman only", EXIT_BAD_INPUT)
    if args.trainer_deployment is not None:
        if args.runtime != "local":
            return fail("--trainer-deployment applies to --runtime local only", EXIT_BAD_INPUT)
        try:
            load_trainer_deployment(str(args.trainer_deployment))
        except DeploymentError as exc:
            return fail(str(exc), EXIT_BAD_INPUT)
        # The trainer reads it from its environment, which the local processes inherit.
        os.environ[TRAINER_DEPLOYMENT_ENV] = str(args.trainer_deployment.resolve())
    deployment = args.oracle_deployment or (
        Path(os.environ[DEPLOYMENT_ENV]) if os.environ.get(DEPLOYMENT_ENV) else None
    )
    if deployment is not None:
        try:
            load_deployment(deployment)  # a bad file is one line here, not a service that dies at start-up
        except DeploymentError as exc:
            return fail(str(exc), EXIT_BAD_INPUT)
        deployment = deployment.resolve()
    try:
        if args.runtime == "podman":
            services = [s.strip() for s in args.services.split(",") if s.strip()] if args.services else None
            processes = podman.up(
                services=services,
                images=_images(args.image),
                ports=ports,
                workdir=args.workdir,
                timeout=args.timeout,
                oracle_deployment=deployment,
            )
        else:
            processes = local.up(ports=ports, timeout=args.timeout, oracle_deployment=deployment)
    except (ValueError, SecurityConfigError) as exc:
        return fail(str(exc), EXIT_BAD_INPUT)
    except (local.DeployError, podman.PodmanError, TimeoutError, OSError) as exc:
        return fail(str(exc), EXIT_FAILED)
    table = Table(title=f"PyAceMaker services ({args.runtime}; home: {local.home_dir()})")
    # Containers: their name (for `podman logs`) and image instead of pid and log file.
    columns = ("container", "image") if args.runtime == "podman" else ("pid", "log")
    for column in ("service", "address", *columns):
        table.add_column(column, overflow="fold")
    for proc in processes.values():
        cells = (proc.container, proc.image) if args.runtime == "podman" else (str(proc.pid), proc.log)
        table.add_row(proc.name, proc.address, *cells)
    Console().print(table)
    return EXIT_OK


def run_down(args: argparse.Namespace) -> int:
    recorded = local.read_registry()
    if any(proc.runtime == "podman" for proc in recorded.values()):
        try:
            stopped = podman.down()
        except podman.PodmanError as exc:
            return fail(str(exc), EXIT_FAILED)
    else:
        stopped = local.down()
    print(f"stopped: {', '.join(stopped)}" if stopped else "no services were running")
    return EXIT_OK
