"""Multihead replay fine-tuning through the trainer service: mace trains a pretraining head on replay data
the run already has (teacher-labelled frames) beside the fine-tuned head, and the delivered model's
fine-tuned head predicts the labels' level with the labels' reference energies. And mace's own options
(extra_args) reach mace's training, while a job that asks for a GPU this machine lacks fails at its start, naming
the setting."""

from __future__ import annotations

import functools
import json
from pathlib import Path

import pytest

from pyacemaker.artifacts import ArtifactStore
from pyacemaker.rpc import channel
from pyacemaker.services.trainer.server import add_to_server, create_manager
from pyacemaker.v1 import common_pb2, trainer_pb2, trainer_pb2_grpc
from tests.conftest import running_service
from tests.sn2_training_data import level_b, level_b_e0s, tiny_mace, write_frames, xtb_frames

pytest.importorskip("mace", reason="mace-torch is not installed (pyacemaker[trainer])")
pytestmark = pytest.mark.slow  # trains MACE models in worker processes (~20 s)

OFFSET_PER_ATOM = 1.0


def test_multihead_replay_finetuning(tmp_path: Path, artifact_store: ArtifactStore, tmp_path_factory) -> None:
    teacher = tiny_mace(tmp_path_factory.getbasetemp() / "tiny_mace")
    xtb = xtb_frames()
    labels = level_b(xtb[:30], offset_per_atom=OFFSET_PER_ATOM)
    e0s = level_b_e0s(OFFSET_PER_ATOM)
    spec = trainer_pb2.MaceFinetuneSpec(
        foundation_model=artifact_store.put_file(teacher, "model"),
        train_data=[artifact_store.put_file(write_frames(tmp_path / "dft.extxyz", labels[:24]), "structures")],
        validation_data=[artifact_store.put_file(write_frames(tmp_path / "v.extxyz", labels[24:]), "structures")],
        committee_size=1,
        random_seed=5,
        max_epochs=3,
        e0s=[trainer_pb2.AtomicEnergy(atomic_number=z, energy=e) for z, e in sorted(e0s.items())],
        multihead_replay=True,
        replay_data=[artifact_store.put_file(write_frames(tmp_path / "replay.extxyz", xtb[30:70]), "structures")],
    )
    manager = create_manager(artifact_store, tmp_path / "trainer")
    try:
        with running_service(functools.partial(add_to_server, manager=manager)) as address, channel(address) as ch:
            stub = trainer_pb2_grpc.TrainerServiceStub(ch)
            job = stub.StartJob(trainer_pb2.StartJobRequest(mace_finetune=spec), timeout=60).job
            messages = list(stub.WatchJob(trainer_pb2.WatchJobRequest(job_id=job.job_id), timeout=300))
    finally:
        manager.shutdown(stop_workers=True)
    final = messages[-1].job
    assert final.state == common_pb2.JOB_STATE_SUCCEEDED, final.error
    work = manager.job_dir(job.job_id) / "work"
    arguments = (work / "member_0" / "logs").glob("*.log")
    assert any("pt_head" in path.read_text() for path in arguments)  # mace trained the replay head too
    reported = [m.training.energy_rmse for m in messages if m.HasField("training")]
    assert len(reported) == 3  # one evaluation per epoch, of the fine-tuned head only
    delivered = final.metrics["member_0_energy_rmse_ev_per_atom"]
    assert min(abs(delivered - value) for value in reported) < 1e-6 * max(1.0, delivered)
    assert json.loads((work / "mace_0.json").read_text())["member_0_energy_rmse_ev_per_atom"] == delivered


def test_mace_options_reach_mace_and_a_missing_gpu_fails_the_job_naming_the_key(
    tmp_path: Path, artifact_store: ArtifactStore, tmp_path_factory
) -> None:
    teacher = tiny_mace(tmp_path_factory.getbasetemp() / "tiny_mace")
    labels = level_b(xtb_frames()[:16], offset_per_atom=OFFSET_PER_ATOM)
    spec = trainer_pb2.MaceFinetuneSpec(
        foundation_model=artifact_store.put_file(teacher, "model"),
        train_data=[artifact_store.put_file(write_frames(tmp_path / "dft.extxyz", labels[:12]), "structures")],
        validation_data=[artifact_store.put_file(write_frames(tmp_path / "v.extxyz", labels[12:]), "structures")],
        committee_size=1,
        random_seed=5,
        max_epochs=2,
        e0s=[trainer_pb2.AtomicEnergy(atomic_number=z, energy=e) for z, e in sorted(level_b_e0s(1.0).items())],
        # The trainer's own choice for 12 frames would be lr 0.01 and batches of 3 (4 steps an epoch).
        extra_args={"lr": "0.004", "weight_decay": "1e-07", "batch_size": "6"},
    )
    gpu_spec = trainer_pb2.MaceFinetuneSpec()
    gpu_spec.CopyFrom(spec)
    gpu_spec.device = "cuda"
    manager = create_manager(artifact_store, tmp_path / "trainer")
    try:
        with running_service(functools.partial(add_to_server, manager=manager)) as address, channel(address) as ch:
            stub = trainer_pb2_grpc.TrainerServiceStub(ch)

            def run(job_spec: trainer_pb2.MaceFinetuneSpec) -> tuple[str, list[trainer_pb2.WatchJobResponse]]:
                job = stub.StartJob(trainer_pb2.StartJobRequest(mace_finetune=job_spec), timeout=60).job
                return job.job_id, list(stub.WatchJob(trainer_pb2.WatchJobRequest(job_id=job.job_id), timeout=300))

            gpu_job = None if torch_sees_gpu() else run(gpu_spec)
            job_id, messages = run(spec)
    finally:
        manager.shutdown(stop_workers=True)
    if gpu_job is not None:
        failed = gpu_job[1][-1].job
        assert failed.state == common_pb2.JOB_STATE_FAILED
        assert failed.error.startswith(
            "WrongStateError: mace_finetune.device: 'cuda' requested, but this process sees no CUDA GPU"
        ), failed.error
        assert "Traceback" not in failed.error
    final = messages[-1].job
    assert final.state == common_pb2.JOB_STATE_SUCCEEDED, final.error
    member = manager.job_dir(job_id) / "work" / "member_0"
    log_text = "\n".join(path.read_text() for path in (member / "logs").glob("*.log"))
    assert "Learning rate: 0.004, weight decay: 1e-07" in log_text  # mace's own account of its optimiser
    # 12 frames in batches of 6: 2 optimiser steps an epoch, as mace's per-step records count them.
    iterations = [m.training.iteration for m in messages if m.HasField("training")]
    assert iterations == [2, 4]


def torch_sees_gpu() -> bool:
    import torch

    return bool(torch.cuda.is_available())
