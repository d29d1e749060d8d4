"""A linear ACE fit submitted by real `python -m pyacemaker.services.trainer` processes as a job of a REAL
single-node Slurm
(tests/slurm_cluster.py): the trainer is killed (SIGKILL) while the job runs, a new trainer on the same job table
re-attaches to the Slurm job, and the job finishes with the very model a local worker fits from the same request
and seed."""

from __future__ import annotations

import gzip
import json
import time
from pathlib import Path

import pytest
import yaml

from pyacemaker.artifacts import ArtifactStore
from pyacemaker.executors.base import JOB_SCRIPT_FILE
from pyacemaker.rpc import channel
from pyacemaker.services.trainer.progress import PROGRESS_FILE
from pyacemaker.services.trainer.table import JobTable
from pyacemaker.v1 import common_pb2, trainer_pb2, trainer_pb2_grpc
from tests.integration.test_trainer_restart import TrainerProcess, get_job, trainer_home, wait_for
from tests.integration.test_trainer_service import ace_fit_request
from tests.slurm_cluster import SlurmCluster, slurm_cluster

pytest.importorskip("pyace", reason="python-ace is not installed (pyacemaker[trainer])")
pytestmark = pytest.mark.slow

__all__ = ["trainer_home"]  # the fixture, imported for this module's test
TIMEOUT_S = 120.0
SITE_DIRECTIVE = "--comment=pyacemaker-trainer-test"


def squeue_state(slurm: SlurmCluster, job_id: str) -> str:
    return slurm.run("squeue", "-h", "-t", "all", "-j", job_id, "-o", "%T", check=False).stdout.strip()


def wait_until_ended(address: str, job_id: str) -> common_pb2.Job:
    active = (common_pb2.JOB_STATE_QUEUED, common_pb2.JOB_STATE_RUNNING)
    return wait_for(
        lambda: (job := get_job(address, job_id)).state not in active and job, f"job {job_id} ending", TIMEOUT_S
    )


def test_a_slurm_training_job_survives_a_killed_trainer_and_fits_the_local_model(
    tmp_path: Path, tmp_path_factory: pytest.TempPathFactory, trainer_home
) -> None:
    store_dir, work_dir, processes = trainer_home
    store = ArtifactStore(store_dir)
    deployment = tmp_path / "trainer-deployment.yaml"
    profile = {"executor": {"kind": "slurm", "partition": "debug", "time_limit": "10", "poll_interval_s": 0.5}}
    profile["extra_directives"] = [SITE_DIRECTIVE]
    nowhere = {"executor": {"kind": "slurm", "partition": "nosuch"}}
    executors = {"cpu": profile, "nowhere": nowhere}
    deployment.write_text(yaml.safe_dump({"default_executor": "cpu", "executors": executors}))
    request = ace_fit_request(store, tmp_path, key="slurm-fit")
    local_request = trainer_pb2.StartJobRequest()
    local_request.CopyFrom(request)
    local_request.idempotency_key, local_request.executor_profile = "local-fit", "local"

    with slurm_cluster(tmp_path_factory.mktemp("slurm")) as slurm:
        first = TrainerProcess(store_dir, work_dir, tmp_path, "trainer-1", "--deployment", str(deployment))
        processes.append(first)
        started = time.monotonic()
        with channel(first.address) as ch:
            job = trainer_pb2_grpc.TrainerServiceStub(ch).StartJob(request, timeout=60).job
        record = JobTable(work_dir / "jobs.sqlite").get(job.job_id)
        assert (record.profile, record.scheduler, record.pid) == ("cpu", "slurm", 0)
        slurm_id = record.scheduler_job_id
        assert slurm_id.isdigit() and slurm_id in slurm.job_ids()
        job_dir = work_dir / "jobs" / job.job_id
        script = (job_dir / JOB_SCRIPT_FILE).read_text()
        assert "#SBATCH --partition=debug" in script and f"#SBATCH {SITE_DIRECTIVE}" in script
        assert "-m pyacemaker.services.trainer.worker" in script

        # Freeze the worker once it has started (SIGSTOP through Slurm), so the kill surely lands mid-job.
        progress = job_dir / PROGRESS_FILE
        wait_for(lambda: squeue_state(slurm, slurm_id) == "RUNNING" and progress.exists(), "the worker's start", 60)
        slurm.run("scontrol", "suspend", slurm_id)
        first.kill()

        second = TrainerProcess(store_dir, work_dir, tmp_path, "trainer-2", "--deployment", str(deployment))
        processes.append(second)
        assert get_job(second.address, job.job_id).state == common_pb2.JOB_STATE_RUNNING
        assert f"re-attached to job {job.job_id} (slurm job {slurm_id})" in second.log.read_text()
        assert squeue_state(slurm, slurm_id) == "SUSPENDED"
        slurm.run("scontrol", "resume", slurm_id)
        finished = wait_until_ended(second.address, job.job_id)
        slurm_seconds = time.monotonic() - started
        assert finished.state == common_pb2.JOB_STATE_SUCCEEDED, finished.error
        assert JobTable(work_dir / "jobs.sqlite").get(job.job_id).attempt == 1  # re-attached, never resubmitted
        assert (job_dir / "exit_code").read_text().strip() == "0"
        stages = [json.loads(line).get("stage") for line in progress.read_text().splitlines()]
        assert stages[0] == "start" and stages[-1] == "done"

        # The same request and seed through a local worker: the very same model file.
        started = time.monotonic()
        with channel(second.address) as ch:
            local = trainer_pb2_grpc.TrainerServiceStub(ch).StartJob(local_request, timeout=60).job
        local = wait_until_ended(second.address, local.job_id)
        local_seconds = time.monotonic() - started
        assert local.state == common_pb2.JOB_STATE_SUCCEEDED, local.error
        assert JobTable(work_dir / "jobs.sqlite").get(local.job_id).scheduler == "local"

        # CancelJob scancels the Slurm job; a partition Slurm does not have fails the job with sbatch's words.
        with channel(second.address) as ch:
            stub = trainer_pb2_grpc.TrainerServiceStub(ch)
            other = trainer_pb2.StartJobRequest()
            other.CopyFrom(request)
            other.idempotency_key = "to-cancel"
            to_cancel = stub.StartJob(other, timeout=60).job
            cancelled = stub.CancelJob(trainer_pb2.CancelJobRequest(job_id=to_cancel.job_id), timeout=120).job
            assert cancelled.state == common_pb2.JOB_STATE_CANCELLED, cancelled.error
            cancelled_id = JobTable(work_dir / "jobs.sqlite").get(to_cancel.job_id).scheduler_job_id
            assert squeue_state(slurm, cancelled_id) == "CANCELLED"
            other.idempotency_key, other.executor_profile = "nowhere", "nowhere"
            refused = wait_until_ended(second.address, stub.StartJob(other, timeout=60).job.job_id)
        assert refused.state == common_pb2.JOB_STATE_FAILED
        assert refused.error.startswith("sbatch refused the job:") and "partition" in refused.error

    # Potential (.yaml, .yace), active set and pacemaker's files: byte for byte the same. The report and the metrics
    # too, but for the fit's wall-clock time.
    kinds = [ref.kind for ref in finished.outputs]
    assert kinds == [ref.kind for ref in local.outputs] and kinds[:4] == [
        "potential",
        "potential",
        "active_set",
        "report",
    ]
    for ours, theirs in zip(finished.outputs, local.outputs, strict=True):
        if ours.kind == "pacemaker_dataset":  # gzip stamps the time of writing into its header: compare the data
            contents = [gzip.decompress(store.path(ref).read_bytes()) for ref in (ours, theirs)]
            assert contents[0] == contents[1], "the Slurm job's pacemaker dataset differs from the local one"
        elif ours.kind != "report":
            assert ours.sha256 == theirs.sha256, f"{ours.kind}: the Slurm job's file differs from the local one"
    reports = [json.loads(store.path(job.outputs[3]).read_text()) for job in (finished, local)]
    for report in reports:
        assert report["metrics"].pop("fit_time_s") > 0
    assert reports[0] == reports[1]
    assert {k: v for k, v in finished.metrics.items() if k != "fit_time_s"} == {
        k: v for k, v in local.metrics.items() if k != "fit_time_s"
    }
    print(
        f"\nlinear ACE fit as Slurm job {slurm_id}: {slurm_seconds:.1f} s (trainer killed and replaced meanwhile), "
        f"locally {local_seconds:.1f} s; potential (.yaml, .yace) and active set byte-identical (.yace sha256 "
        f"{finished.outputs[1].sha256[:16]}...), pacemaker dataset identical once decompressed, report identical "
        "but for fit_time_s"
    )
