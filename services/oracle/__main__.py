"""`python -m services.oracle --port 0 --port-file F --store DIR` starts the oracle service."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable

import grpc

from pyacemaker.artifacts import ArtifactStore
from pyacemaker.rpc import run_service_cli
from services.oracle.server import add_to_server


def make_register(args: argparse.Namespace, store: ArtifactStore) -> Callable[[grpc.Server], list[str]]:
    # The lj and xtb backends need no artifacts; the mace backend will load its models from `store`.
    return add_to_server


if __name__ == "__main__":
    sys.exit(run_service_cli("oracle", None, make_register))
