"""`python -m pyacemaker.services.trainer --port 0 --port-file F --store DIR [--work-dir DIR] [--deployment FILE]`
starts the trainer.

Its job table and job directories live in --work-dir (default: a "trainer" directory beside the store). The
deployment file names executor profiles that run workers as Slurm/PBS jobs (default: local processes).
Stopping the trainer leaves running jobs' workers alone; the next trainer on the same work dir re-attaches to
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
from pyacemaker.executors.deployment import add_deployment_argument
from pyacemaker.rpc import run_service_cli
from pyacemaker.services.trainer.deployment import DEPLOYMENT_ENV, load_trainer_deployment
from pyacemaker.services.trainer.server import add_to_server, create_manager


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--work-dir", type=Path, help="job table and job directories (default: <store>/../trainer)")
    parser.add_argument("--max-running-jobs", type=int, default=1, help="local workers that train at the same time")
    add_deployment_argument(
        parser,
        load_trainer_deployment,
        DEPLOYMENT_ENV,
        "YAML file of the trainer's deployment settings: executor profiles that run training workers as Slurm/PBS "
        "jobs (scheduler resources, job template, Apptainer image); see docs/deployment.md",
        "every worker a local process",
    )


def make_register(args: argparse.Namespace, store: ArtifactStore) -> Callable[[grpc.Server], list[str]]:
    manager = create_manager(store, args.work_dir, args.max_running_jobs, args.deployment)
    return functools.partial(add_to_server, manager=manager)


if __name__ == "__main__":
    sys.exit(run_service_cli("trainer", None, make_register, add_arguments))
