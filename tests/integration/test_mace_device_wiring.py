"""mace_finetune.device from a run's config to where the MACE work runs, through real services: the
orchestrator's committee fine-tuning (step 2's and step 3's call) reaches the trainer's worker with it, and the
committee/teacher backend the orchestrator asks the oracle for carries it to the oracle's mace backend. On this
machine without a GPU, 'cuda' is refused at both ends naming the setting, and 'cpu' labels as before."""

from __future__ import annotations

import functools
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest

from pyacemaker.artifacts import ArtifactStore
from pyacemaker.config import load_config
from pyacemaker.services.oracle.server import OracleService
from pyacemaker.services.orchestrator.model_labels import model_labels
from pyacemaker.services.orchestrator.steps import StepContext
from pyacemaker.services.orchestrator.steps.mace_finetune import committee_spec, finetune_committee, teacher_model
from pyacemaker.services.trainer.server import add_to_server, create_manager
from pyacemaker.structures import write_extxyz
from pyacemaker.v1 import oracle_pb2_grpc
from tests.conftest import SN2_DIR, running_service, sn2_seeds

torch = pytest.importorskip("torch", reason="torch is not installed (pyacemaker[mace])")
pytest.importorskip("mace", reason="mace-torch is not installed (pyacemaker[trainer])")
pytestmark = pytest.mark.skipif(torch.cuda.is_available(), reason="a CUDA GPU is visible: this checks its absence")


@pytest.fixture
def services(artifact_store: ArtifactStore, tmp_path: Path) -> Iterator[tuple[str, str]]:
    """(oracle, trainer) addresses: the real servicers on loopback, sharing the store."""

    def register_oracle(server: grpc.Server) -> list[str]:
        oracle_pb2_grpc.add_OracleServiceServicer_to_server(OracleService(store=artifact_store), server)
        return []

    manager = create_manager(artifact_store, tmp_path / "trainer")
    try:
        with (
            running_service(register_oracle) as oracle,
            running_service(functools.partial(add_to_server, manager=manager)) as trainer,
        ):
            yield oracle, trainer
    finally:
        manager.shutdown(stop_workers=True)


def context(device: str, store: ArtifactStore, run_dir: Path, oracle: str, trainer: str) -> StepContext:
    config = load_config(SN2_DIR / "config.yaml")
    return StepContext(
        config=config.model_copy(update={"mace_finetune": config.mace_finetune.model_copy(update={"device": device})}),
        store=store,
        run_dir=run_dir,
        seeds=[],
        sampler_address="",
        oracle_address=oracle,
        trainer_address=trainer,
        report=lambda _progress: None,
        call_timeout_s=120,
    )


def test_cuda_is_refused_by_the_trainer_and_the_oracle_naming_the_setting_and_cpu_labels(
    services: tuple[str, str], artifact_store: ArtifactStore, tmp_path: Path
) -> None:
    oracle, trainer = services
    ctx = context("cuda", artifact_store, tmp_path / "run", oracle, trainer)
    frames = sn2_seeds()
    for atoms in frames:  # labelled, as step 2 hands the trainer its DFT labels
        atoms.calc = None
    on_cpu = context("cpu", artifact_store, tmp_path / "run", oracle, trainer)
    labels = model_labels(on_cpu, committee_spec(on_cpu, [teacher_model(on_cpu)]), frames, "teacher labels")
    assert len(labels) == 3 and all(label.energy < 0 for label in labels)
    with pytest.raises(grpc.RpcError) as refused:
        model_labels(ctx, committee_spec(ctx, [teacher_model(ctx)]), frames, "teacher forces on the pool")
    assert refused.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "option 'device': 'cuda' requested, but this process sees no CUDA GPU" in refused.value.details()

    train = tmp_path / "dft.extxyz"
    write_extxyz(train, frames)
    with pytest.raises(RuntimeError) as failed:
        finetune_committee(ctx, artifact_store.put_file(train, "structures"), {}, 0, 2, "committee")
    assert "committee (trainer job" in str(failed.value) and "ended JOB_STATE_FAILED" in str(failed.value)
    assert "mace_finetune.device: 'cuda' requested, but this process sees no CUDA GPU" in str(failed.value)
