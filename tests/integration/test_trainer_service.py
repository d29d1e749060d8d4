"""The trainer over real gRPC with real worker processes: a linear ACE fit and a delta fit end to end,
idempotent StartJob, status codes for bad requests, cancel and restart, and a client that disconnects
without stopping the job."""

from __future__ import annotations

import functools
import os
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import numpy as np
import pytest
from ase import Atoms

from pyacemaker.artifacts import ArtifactStore
from pyacemaker.rpc import channel
from pyacemaker.services.trainer import linear_ace
from pyacemaker.services.trainer.jobs import JobManager
from pyacemaker.services.trainer.processes import process_start_time
from pyacemaker.services.trainer.server import add_to_server, create_manager
from pyacemaker.v1 import common_pb2, trainer_pb2, trainer_pb2_grpc
from tests.conftest import running_service
from tests.sn2_training_data import level_b, write_frames, xtb_e0s, xtb_frames

pytest.importorskip("pyace", reason="python-ace is not installed (pyacemaker[trainer])")

TIMEOUT_S = 120.0


@pytest.fixture
def trainer(
    tmp_path: Path, artifact_store: ArtifactStore
) -> Iterator[tuple[trainer_pb2_grpc.TrainerServiceStub, JobManager]]:
    manager = create_manager(artifact_store, tmp_path / "trainer", max_running=2)
    try:
        with running_service(functools.partial(add_to_server, manager=manager)) as address, channel(address) as ch:
            yield trainer_pb2_grpc.TrainerServiceStub(ch), manager
    finally:
        manager.shutdown(stop_workers=True)


def put_frames(store: ArtifactStore, tmp_path: Path, name: str, frames: list[Atoms]) -> common_pb2.ArtifactRef:
    return store.put_file(write_frames(tmp_path / f"{name}.extxyz", frames), "structures")


def e0_entries(e0s: dict[int, float]) -> list[trainer_pb2.AtomicEnergy]:
    return [trainer_pb2.AtomicEnergy(atomic_number=z, energy=e) for z, e in sorted(e0s.items())]


def wait_until_done(stub: trainer_pb2_grpc.TrainerServiceStub, job_id: str) -> common_pb2.Job:
    deadline = time.monotonic() + TIMEOUT_S
    while time.monotonic() < deadline:
        job = stub.GetJob(trainer_pb2.GetJobRequest(job_id=job_id), timeout=10).job
        if job.state not in (common_pb2.JOB_STATE_QUEUED, common_pb2.JOB_STATE_RUNNING):
            return job
        time.sleep(0.2)
    raise TimeoutError(f"job {job_id} did not finish within {TIMEOUT_S} s")


def ace_fit_request(store: ArtifactStore, tmp_path: Path, key: str = "") -> trainer_pb2.StartJobRequest:
    frames = xtb_frames()
    return trainer_pb2.StartJobRequest(
        idempotency_key=key,
        ace_fit=trainer_pb2.AceFitSpec(
            train_data=[put_frames(store, tmp_path, "train", frames[:80])],
            validation_data=[put_frames(store, tmp_path, "valid", frames[80:])],
            e0s=e0_entries(xtb_e0s()),
            model_kind="linear",
            random_seed=1,
        ),
    )


def test_ace_fit_then_delta_fit_through_the_service(trainer, artifact_store: ArtifactStore, tmp_path: Path) -> None:
    stub, manager = trainer
    request = ace_fit_request(artifact_store, tmp_path, key="base-fit-1")
    started = stub.StartJob(request, timeout=30).job
    assert stub.StartJob(request, timeout=30).job.job_id == started.job_id  # same key, same job
    messages = list(stub.WatchJob(trainer_pb2.WatchJobRequest(job_id=started.job_id), timeout=TIMEOUT_S))
    job = messages[-1].job
    assert job.state == common_pb2.JOB_STATE_SUCCEEDED, job.error
    assert {m.job.progress.stage for m in messages} >= {"done"}
    # The stream carried the cross-validation table: one line per ridge strength tried.
    assert len([m for m in messages if m.HasField("training")]) == len(linear_ace.DEFAULT_LAMBDAS)
    assert manager.table.get(job.job_id).pid == 0  # finished: no worker recorded any more
    assert (manager.job_dir(job.job_id) / "worker.log").is_file()  # it ran in a worker process
    kinds = sorted(ref.kind for ref in job.outputs)
    assert kinds == ["active_set", "pacemaker_dataset", "pacemaker_input", "potential", "potential", "report"]
    assert all(artifact_store.verify(ref) for ref in job.outputs)
    yace = next(artifact_store.path(r) for r in job.outputs if r.uri.endswith(".yace"))
    # The reported validation error, recomputed here with pyace's calculator on the validation frames.
    from pyace import PyACECalculator

    errors = []
    for atoms in xtb_frames()[80:]:
        probe = atoms.copy()
        probe.calc = PyACECalculator(str(yace))
        errors.append((probe.get_potential_energy() - atoms.get_potential_energy()) / len(atoms))
    assert job.metrics["validation_energy_rmse_ev_per_atom"] == pytest.approx(np.sqrt(np.mean(np.square(errors))))

    base_yaml = next(r for r in job.outputs if r.uri.endswith(".yaml") and r.kind == "potential")
    b_frames = level_b(xtb_frames()[80:])
    delta = stub.StartJob(
        trainer_pb2.StartJobRequest(
            delta_fit=trainer_pb2.DeltaFitSpec(
                base_potential=base_yaml,
                dft_data=[put_frames(artifact_store, tmp_path, "dft", b_frames[:20])],
                surrogate_data=request.ace_fit.train_data,
                random_seed=1,
            ),
            threads=0,  # every core the worker may run on
        ),
        timeout=30,
    ).job
    delta = wait_until_done(stub, delta.job_id)
    assert delta.state == common_pb2.JOB_STATE_SUCCEEDED, delta.error
    # The delta's worker took the cores; the base fit, sent without threads, kept the trainer's setting.
    cores = len(os.sched_getaffinity(0))
    assert f"{cores} CPU threads for this job" in (manager.job_dir(delta.job_id) / "worker.log").read_text()
    assert "CPU threads for this job" not in (manager.job_dir(job.job_id) / "worker.log").read_text()
    assert len([r for r in delta.outputs if r.uri.endswith(".yace")]) == 1  # one self-contained potential
    assert {r.kind for r in delta.outputs} >= {"pacemaker_dataset", "pacemaker_input"}
    assert delta.metrics["final_dft_energy_rmse_ev_per_atom"] < delta.metrics["base_dft_energy_rmse_ev_per_atom"]


def test_bad_requests_get_clear_status_codes(trainer, artifact_store: ArtifactStore, tmp_path: Path) -> None:
    stub, _ = trainer
    request = ace_fit_request(artifact_store, tmp_path, key="k")
    altered = trainer_pb2.StartJobRequest()
    altered.CopyFrom(request)
    altered.ace_fit.train_data[0].sha256 = "0" * 64
    with pytest.raises(grpc.RpcError) as error:
        stub.StartJob(altered, timeout=30)
    assert error.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "ace_fit.train_data[0]" in error.value.details() and "sha256" in error.value.details()

    nonlinear = trainer_pb2.StartJobRequest()
    nonlinear.CopyFrom(request)
    nonlinear.idempotency_key = ""
    nonlinear.ace_fit.model_kind = "nonlinear"
    from pyacemaker.services.trainer.pacemaker_nonlinear import tensorflow_missing

    if tensorflow_missing() is not None:
        with pytest.raises(grpc.RpcError) as error:
            stub.StartJob(nonlinear, timeout=30)
        assert error.value.code() == grpc.StatusCode.FAILED_PRECONDITION
        assert "TensorFlow" in error.value.details()

    with pytest.raises(grpc.RpcError) as error:
        stub.GetJob(trainer_pb2.GetJobRequest(job_id="job-nope"), timeout=10)
    assert error.value.code() == grpc.StatusCode.NOT_FOUND

    job = stub.StartJob(request, timeout=30).job
    other = trainer_pb2.StartJobRequest()
    other.CopyFrom(request)
    other.ace_fit.random_seed = 2
    with pytest.raises(grpc.RpcError) as error:
        stub.StartJob(other, timeout=30)  # the key already names a different request
    assert error.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert wait_until_done(stub, job.job_id).state == common_pb2.JOB_STATE_SUCCEEDED
    with pytest.raises(grpc.RpcError) as error:
        stub.ResumeJob(trainer_pb2.ResumeJobRequest(job_id=job.job_id), timeout=10)
    assert error.value.code() == grpc.StatusCode.FAILED_PRECONDITION


def test_cancel_stops_the_worker_and_restart_runs_the_job_again(
    trainer, artifact_store: ArtifactStore, tmp_path: Path
) -> None:
    stub, manager = trainer
    job = stub.StartJob(ace_fit_request(artifact_store, tmp_path), timeout=30).job
    record = manager.table.get(job.job_id)
    assert record.state == common_pb2.JOB_STATE_RUNNING and record.pid > 0
    cancelled = stub.CancelJob(trainer_pb2.CancelJobRequest(job_id=job.job_id), timeout=30).job
    assert cancelled.state == common_pb2.JOB_STATE_CANCELLED
    assert process_start_time(record.pid) == ""  # the worker process is gone
    with pytest.raises(grpc.RpcError) as error:  # a cancelled job is not interrupted: no checkpoint resume
        stub.ResumeJob(trainer_pb2.ResumeJobRequest(job_id=job.job_id), timeout=10)
    assert error.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    restarted = stub.ResumeJob(trainer_pb2.ResumeJobRequest(job_id=job.job_id, restart=True), timeout=10).job
    assert restarted.state in (common_pb2.JOB_STATE_QUEUED, common_pb2.JOB_STATE_RUNNING)
    finished = wait_until_done(stub, job.job_id)
    assert finished.state == common_pb2.JOB_STATE_SUCCEEDED, finished.error
    assert manager.table.get(job.job_id).attempt == 2


def test_a_client_that_disconnects_does_not_stop_the_job(
    trainer, artifact_store: ArtifactStore, tmp_path: Path
) -> None:
    stub, manager = trainer
    job = stub.StartJob(ace_fit_request(artifact_store, tmp_path), timeout=30).job
    stream = stub.WatchJob(trainer_pb2.WatchJobRequest(job_id=job.job_id), timeout=TIMEOUT_S)
    first = next(stream)
    assert first.job.state == common_pb2.JOB_STATE_RUNNING
    worker_pid = manager.table.get(job.job_id).pid
    stream.cancel()  # the client goes away mid-job
    time.sleep(0.5)
    assert process_start_time(worker_pid) != "" or manager.table.get(job.job_id).state != common_pb2.JOB_STATE_RUNNING
    finished = wait_until_done(stub, job.job_id)
    assert finished.state == common_pb2.JOB_STATE_SUCCEEDED, finished.error
    assert worker_pid != os.getpid()
    # A new watcher replays the finished job from the start and ends at once.
    replay = list(stub.WatchJob(trainer_pb2.WatchJobRequest(job_id=job.job_id), timeout=30))
    assert replay[-1].job.state == common_pb2.JOB_STATE_SUCCEEDED
