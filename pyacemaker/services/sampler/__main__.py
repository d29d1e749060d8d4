"""`python -m pyacemaker.services.sampler --port 0 --port-file F --store DIR` starts the sampler service."""

from __future__ import annotations

import argparse
import functools
import sys
from collections.abc import Callable

import grpc

from pyacemaker.artifacts import ArtifactStore
from pyacemaker.rpc import run_service_cli
from pyacemaker.services.sampler.server import add_to_server


def make_register(args: argparse.Namespace, store: ArtifactStore) -> Callable[[grpc.Server], list[str]]:
    return functools.partial(add_to_server, store=store)


if __name__ == "__main__":
    sys.exit(run_service_cli("sampler", None, make_register))
