"""`python -m pyacemaker.services.oracle --port 0 --port-file F --store DIR [--work-dir DIR] [--deployment FILE]`
starts the oracle service."""

from __future__ import annotations

import argparse
import functools
import sys
from collections.abc import Callable
from pathlib import Path

import grpc

from pyacemaker.artifacts import ArtifactStore
from pyacemaker.executors.deployment import add_deployment_argument
from pyacemaker.rpc import run_service_cli
from pyacemaker.services.oracle.deployment import DEPLOYMENT_ENV, load_deployment
from pyacemaker.services.oracle.server import add_to_server


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--work-dir",
        type=Path,
        help="calculation dirs and the durable job table of DFT backends; must survive restarts, and be visible "
        "on the compute nodes for slurm/pbs (default: 'oracle' beside the --store dir)",
    )
    add_deployment_argument(
        parser,
        load_deployment,
        DEPLOYMENT_ENV,
        "YAML file of the oracle's deployment settings: qe/vasp profiles (commands, pseudopotential and POTCAR "
        "dirs), job templates, extra directives and scratch dirs of the executors; see docs/deployment.md",
        "pw.x on PATH, the bundled templates, scratch in --work-dir",
    )


def work_dir_of(args: argparse.Namespace) -> Path:
    return (args.work_dir or args.store.resolve().parent / "oracle").resolve()


def make_register(args: argparse.Namespace, store: ArtifactStore) -> Callable[[grpc.Server], list[str]]:
    # Model files (mace, ace) only as verified artifacts of the store; programs and dirs only from the deployment.
    return functools.partial(add_to_server, work_dir=work_dir_of(args), store=store, deployment=args.deployment)


if __name__ == "__main__":
    sys.exit(run_service_cli("oracle", None, make_register, add_arguments))
