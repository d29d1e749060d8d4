"""`python -m services.trainer --port 0 --port-file F --store DIR [--work-dir DIR]` starts the trainer.

Its job table and job directories live in --work-dir (default: a "trainer" directory beside the store).
Stopping the trainer leaves running jobs' workers alone; the next trainer on the same work dir re-adopts
them, or reports them INTERRUPTED when they are gone.
"""

from __future__ import annotations

import argparse
import functools
import sys
from collections.abc import Callable
from pathlib import Path

import grpc

from pyacemaker.artifacts import ArtifactStore
from pyacemaker.rpc import run_service_cli
from services.trainer.server import add_to_server, create_manager


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--work-dir", type=Path, help="job table and job directories (default: <store>/../trainer)")
    parser.add_argument("--max-running-jobs", type=int, default=1, help="jobs that train at the same time")


def make_register(args: argparse.Namespace, store: ArtifactStore) -> Callable[[grpc.Server], list[str]]:
    manager = create_manager(store, args.work_dir, args.max_running_jobs)
    return functools.partial(add_to_server, manager=manager)


if __name__ == "__main__":
    sys.exit(run_service_cli("trainer", None, make_register, add_arguments))
