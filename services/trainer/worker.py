"""The process that runs one trainer job: `python -m services.trainer.worker --job-dir DIR --store ROOT
[--resume]`.

It reads the StartJobRequest from the job directory, runs the job's science (MACE fine-tuning, linear ACE
fit, delta fit), reports through progress.jsonl and ends by writing result.json. The trainer starts it in a
session of its own, so it finishes its work whatever happens to the trainer or to the client.
"""

from __future__ import annotations

import argparse
import logging
import sys
import traceback
from pathlib import Path

from pyacemaker.artifacts import ArtifactStore
from pyacemaker.rpc import InvalidInputError
from pyacemaker.v1 import trainer_pb2
from services.trainer.progress import PROGRESS_FILE, ProgressWriter
from services.trainer.results import JobResult, write_result

log = logging.getLogger("services.trainer.worker")


def validate_request(request: trainer_pb2.StartJobRequest, store: ArtifactStore) -> None:
    """Checks that need no heavy library, run by the trainer before it accepts a job, so that bad input is an
    INVALID_ARGUMENT at once rather than a FAILED job later."""
    kind = request.WhichOneof("spec")
    if kind == "mace_finetune":
        from services.trainer.mace_finetune import validate_mace_finetune

        validate_mace_finetune(request.mace_finetune, store)
    elif kind == "ace_fit":
        from services.trainer.ace_fit import validate_ace_fit

        validate_ace_fit(request.ace_fit, store)
    elif kind == "delta_fit":
        from services.trainer.delta import validate_delta_fit

        validate_delta_fit(request.delta_fit, store)
    else:
        raise InvalidInputError("StartJobRequest has no spec; set one of mace_finetune, ace_fit, delta_fit")


def run_request(
    request: trainer_pb2.StartJobRequest, store: ArtifactStore, work_dir: Path, progress: ProgressWriter, resume: bool
) -> JobResult:
    kind = request.WhichOneof("spec")
    if kind == "mace_finetune":
        from services.trainer.mace_finetune import run_mace_finetune

        return run_mace_finetune(request.mace_finetune, store, work_dir, progress, resume)
    if kind == "ace_fit":
        from services.trainer.ace_fit import run_ace_fit

        return run_ace_fit(request.ace_fit, store, work_dir, progress)
    if kind == "delta_fit":
        from services.trainer.delta import run_delta_fit

        return run_delta_fit(request.delta_fit, store, work_dir, progress)
    raise InvalidInputError(f"unknown job kind {kind!r}")


def main(argv: list[str] | None = None) -> int:
    from services.trainer.jobs import REQUEST_FILE, WORK_SUBDIR

    parser = argparse.ArgumentParser(prog="python -m services.trainer.worker", description=__doc__.splitlines()[0])
    parser.add_argument("--job-dir", type=Path, required=True)
    parser.add_argument("--store", type=Path, required=True)
    parser.add_argument("--resume", action="store_true", help="continue from the job's last checkpoint")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    job_dir = args.job_dir.resolve()
    progress = ProgressWriter(job_dir / PROGRESS_FILE)
    try:
        request = trainer_pb2.StartJobRequest.FromString((job_dir / REQUEST_FILE).read_bytes())
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
