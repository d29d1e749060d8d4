"""The process that runs one trainer job: `python -m pyacemaker.services.trainer.worker --job-dir DIR --store ROOT
[--resume]`.

It reads the StartJobRequest from the job directory, runs the job's science (MACE fine-tuning or training,
linear ACE fit, delta fit), reports through progress.jsonl and ends by writing result.json. The trainer starts it in a
session of its own, so it finishes its work whatever happens to the trainer or to the client.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import os
import sys
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import cast

from pyacemaker.artifacts import ArtifactStore
from pyacemaker.rpc import InvalidInputError
from pyacemaker.services.trainer.progress import PROGRESS_FILE, ProgressWriter
from pyacemaker.services.trainer.results import JobResult, write_result
from pyacemaker.v1 import trainer_pb2

log = logging.getLogger("pyacemaker.services.trainer.worker")


@dataclass(frozen=True)
class JobKind:
    """One kind of trainer job: its module (imported only when such a job comes: torch, mace and pyace are heavy)
    with a `validate` run by the trainer before it accepts the job and a `run` run by the worker."""

    module: str
    validate: str
    run: str
    # Whether `run` takes `resume` (a job that continues from its checkpoint after the worker was killed).
    resumable: bool = False


# The StartJobRequest.spec field of each kind -> how to check and run it.
JOB_KINDS: dict[str, JobKind] = {
    "mace_finetune": JobKind(
        "pyacemaker.services.trainer.mace_finetune", "validate_mace_finetune", "run_mace_finetune", True
    ),
    "mace_train": JobKind("pyacemaker.services.trainer.mace_train", "validate_mace_train", "run_mace_train"),
    "ace_fit": JobKind("pyacemaker.services.trainer.ace_fit", "validate_ace_fit", "run_ace_fit"),
    "delta_fit": JobKind("pyacemaker.services.trainer.delta", "validate_delta_fit", "run_delta_fit"),
}


def job_kind(request: trainer_pb2.StartJobRequest) -> tuple[str, JobKind]:
    kind = request.WhichOneof("spec")
    if kind is None:
        raise InvalidInputError(f"StartJobRequest has no spec; set one of {', '.join(JOB_KINDS)}")
    return kind, JOB_KINDS[kind]


def validate_request(request: trainer_pb2.StartJobRequest, store: ArtifactStore) -> None:
    """Checks that need no heavy library, run by the trainer before it accepts a job, so that bad input is an
    INVALID_ARGUMENT at once rather than a FAILED job later."""
    kind, entry = job_kind(request)
    getattr(importlib.import_module(entry.module), entry.validate)(getattr(request, kind), store)


def run_request(
    request: trainer_pb2.StartJobRequest, store: ArtifactStore, work_dir: Path, progress: ProgressWriter, resume: bool
) -> JobResult:
    kind, entry = job_kind(request)
    run = getattr(importlib.import_module(entry.module), entry.run)
    if entry.resumable:
        return cast(JobResult, run(getattr(request, kind), store, work_dir, progress, resume))
    return cast(JobResult, run(getattr(request, kind), store, work_dir, progress))


def limit_threads(requested: int) -> int:
    """Let BLAS/OpenMP use `requested` threads (0: every core this process may run on, never more); returns
    the number set. Set at run time (threadpoolctl), since numpy's BLAS started with the trainer's
    OMP_NUM_THREADS; exported too, for anything the job starts."""
    from threadpoolctl import threadpool_limits

    cores = len(os.sched_getaffinity(0))
    threads = cores if requested == 0 else min(requested, cores)
    threadpool_limits(limits=threads)
    os.environ["OMP_NUM_THREADS"] = str(threads)
    return threads


def main(argv: list[str] | None = None) -> int:
    from pyacemaker.services.trainer.jobs import REQUEST_FILE, WORK_SUBDIR

    parser = argparse.ArgumentParser(
        prog="python -m pyacemaker.services.trainer.worker", description=__doc__.splitlines()[0]
    )
    parser.add_argument("--job-dir", type=Path, required=True)
    parser.add_argument("--store", type=Path, required=True)
    parser.add_argument("--resume", action="store_true", help="continue from the job's last checkpoint")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    job_dir = args.job_dir.resolve()
    progress = ProgressWriter(job_dir / PROGRESS_FILE)
    try:
        request = trainer_pb2.StartJobRequest.FromString((job_dir / REQUEST_FILE).read_bytes())
        if request.HasField("threads"):
            log.info("%d CPU threads for this job", limit_threads(request.threads))
        progress.stage("start", message="resuming from the last checkpoint" if args.resume else "starting")
        result = run_request(request, ArtifactStore(args.store), job_dir / WORK_SUBDIR, progress, args.resume)
    except Exception as exc:  # every failure becomes the job's error message
        log.error("job failed:\n%s", traceback.format_exc())
        write_result(job_dir, JobResult(succeeded=False, error=f"{type(exc).__name__}: {exc}"))
        return 1
    progress.stage("done", message="finished")
    write_result(job_dir, result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
