"""Training jobs from the orchestrator's side: start (idempotently), follow, and fail with the trainer's reason.

The idempotency key is the run directory plus the digest of the job's spec, so a restarted orchestrator that
asks again for the same job re-attaches to the one already running (or finished) instead of training twice.
"""

from __future__ import annotations

import hashlib
from pathlib import PurePosixPath

from pyacemaker.artifacts import PACEMAKER_DATASET_KIND, PACEMAKER_INPUT_KIND
from pyacemaker.rpc import channel
from pyacemaker.services.orchestrator.steps import StepContext
from pyacemaker.v1 import common_pb2, trainer_pb2, trainer_pb2_grpc

# The pacemaker export's artifact kinds and the names its files get in the run directory.
PACEMAKER_FILES = {PACEMAKER_DATASET_KIND: "train.pckl.gzip", PACEMAKER_INPUT_KIND: "input.yaml"}

_START_TIMEOUT_S = 60.0
# Resumptions of one job after trainer restarts before the step gives up.
_MAX_RESUMES = 3


# Job kinds whose work is BLAS on the normal equations: they get `trainer.fit_threads` threads.
LINEAR_FIT_JOBS = ("ace_fit", "delta_fit")


def run_trainer_job(ctx: StepContext, request: trainer_pb2.StartJobRequest, stage: str) -> common_pb2.Job:
    """Start the job (or find the one with the same spec), stream its progress into the run's events, and return
    the finished job; raises RuntimeError when it did not succeed."""
    spec = request.WhichOneof("spec")
    if spec is None:
        raise ValueError("StartJobRequest without a spec")
    request.executor_profile = ctx.config.trainer.executor or ""  # empty: the trainer deployment's default
    if spec in LINEAR_FIT_JOBS and not request.HasField("threads"):
        # The pipeline runs its fits when nothing else computes: they may take the trainer's cores.
        request.threads = ctx.config.trainer.fit_threads
    digest = hashlib.sha256(request.SerializeToString(deterministic=True)).hexdigest()
    request.idempotency_key = f"{ctx.run_dir}:{spec}:{digest}"
    with channel(ctx.trainer_address) as ch:
        stub = trainer_pb2_grpc.TrainerServiceStub(ch)
        job = stub.StartJob(request, timeout=_START_TIMEOUT_S).job
        for _ in range(_MAX_RESUMES + 1):
            if job.state == common_pb2.JOB_STATE_INTERRUPTED:
                # The trainer restarted while the job ran: continue it from its last checkpoint.
                job = stub.ResumeJob(trainer_pb2.ResumeJobRequest(job_id=job.job_id), timeout=_START_TIMEOUT_S).job
            for update in stub.WatchJob(trainer_pb2.WatchJobRequest(job_id=job.job_id), timeout=ctx.call_timeout_s):
                job = update.job
                ctx.report(
                    common_pb2.Progress(
                        stage=stage,
                        done=job.progress.done,
                        total=job.progress.total,
                        message=job.progress.message or job.progress.stage,
                    )
                )
            # The stream can end without the final state (the trainer went away); ask once more.
            job = stub.GetJob(trainer_pb2.GetJobRequest(job_id=job.job_id), timeout=_START_TIMEOUT_S).job
            if job.state != common_pb2.JOB_STATE_INTERRUPTED:
                break
    if job.state != common_pb2.JOB_STATE_SUCCEEDED:
        state = common_pb2.JobState.Name(job.state)
        raise RuntimeError(f"{stage} (trainer job {job.job_id}) ended {state}: {job.error or 'no reason given'}")
    return job


def outputs_by_suffix(job: common_pb2.Job) -> dict[str, common_pb2.ArtifactRef]:
    """A fit's potential files by suffix (".yaml", ".yace", ".asi", ".json"); the pacemaker export (its own
    .yaml among them) is left out, see `pacemaker_outputs`."""
    return {PurePosixPath(ref.uri).suffix: ref for ref in job.outputs if ref.kind not in PACEMAKER_FILES}


def pacemaker_outputs(job: common_pb2.Job) -> dict[str, common_pb2.ArtifactRef]:
    """A linear fit's pacemaker export by file name ("train.pckl.gzip", "input.yaml"); empty for other fits."""
    return {PACEMAKER_FILES[ref.kind]: ref for ref in job.outputs if ref.kind in PACEMAKER_FILES}
