"""`python -m services.oracle --port 0 --port-file F --store DIR [--work-dir DIR]` starts the oracle service."""

from __future__ import annotations

import argparse
import functools
import sys
from collections.abc import Callable
from pathlib import Path

import grpc

from pyacemaker.artifacts import ArtifactStore
from pyacemaker.rpc import run_service_cli
from services.oracle.server import add_to_server


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--work-dir",
        type=Path,
        help="calculation dirs and the durable job table of DFT backends; must survive restarts, and be visible "
        "on the compute nodes for slurm/pbs (default: 'oracle' beside the --store dir)",
    )


def work_dir_of(args: argparse.Namespace) -> Path:
    return (args.work_dir or args.store.resolve().parent / "oracle").resolve()


def make_register(args: argparse.Namespace, store: ArtifactStore) -> Callable[[grpc.Server], list[str]]:
    # No backend reads the store yet: mace loads the model files its options name (keep the oracle on loopback).
    return functools.partial(add_to_server, work_dir=work_dir_of(args))


if __name__ == "__main__":
    sys.exit(run_service_cli("oracle", None, make_register, add_arguments))
