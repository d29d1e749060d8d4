"""A run that names a trainer executor profile the trainer's deployment lacks fails at its start, naming the key and
the profiles there are, before any step (not at the first training job, after step 2's DFT)."""

from __future__ import annotations

import shutil
import time
from contextlib import ExitStack
from pathlib import Path

import yaml

from pyacemaker.config import config_to_json, load_config
from pyacemaker.rpc import channel
from pyacemaker.seeds import load_seeds
from pyacemaker.services.oracle.server import add_to_server as add_oracle
from pyacemaker.services.orchestrator.runner import RunManager
from pyacemaker.services.trainer.deployment import TrainerDeployment
from pyacemaker.services.trainer.server import add_to_server as add_trainer
from pyacemaker.services.trainer.server import create_manager
from pyacemaker.structures import atoms_to_structure
from pyacemaker.v1 import common_pb2, trainer_pb2, trainer_pb2_grpc
from tests.conftest import SN2_DIR, running_service


def test_an_unknown_trainer_profile_fails_the_run_before_any_step(artifact_store, tmp_path: Path) -> None:
    shutil.copytree(SN2_DIR / "seeds", tmp_path / "seeds")
    data = yaml.safe_load((SN2_DIR / "config_quick.yaml").read_text())
    data["trainer"] = {"executor": "gpu2"}
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(data))
    config = load_config(tmp_path / "config.yaml")
    deployment = TrainerDeployment.model_validate(
        {
            "executors": {
                "gpu": {"executor": {"kind": "slurm", "partition": "gpu"}},
                "cpu": {"executor": {"kind": "slurm"}},
            }
        }
    )
    manager = create_manager(artifact_store, tmp_path / "trainer", deployment=deployment)
    with ExitStack() as stack:
        stack.callback(manager.shutdown)
        oracle = stack.enter_context(running_service(lambda s: add_oracle(s, store=artifact_store)))
        trainer = stack.enter_context(running_service(lambda s: add_trainer(s, manager=manager)))
        with channel(trainer) as ch:
            info = trainer_pb2_grpc.TrainerServiceStub(ch).GetTrainerInfo(
                trainer_pb2.GetTrainerInfoRequest(), timeout=30
            )
        assert list(info.executor_profiles) == ["local", "cpu", "gpu"] and info.default_executor == "local"
        runs = RunManager(artifact_store, "127.0.0.1:1", oracle, trainer)  # no sampler: no step may start
        stack.callback(runs.shutdown)
        handle = runs.start(
            config_to_json(config), [atoms_to_structure(a) for a in load_seeds(config)], str(tmp_path / "run")
        )
        deadline = time.monotonic() + 60
        while handle.job_state not in (common_pb2.JOB_STATE_FAILED, common_pb2.JOB_STATE_SUCCEEDED):
            assert time.monotonic() < deadline, "the run did not end"
            time.sleep(0.1)
    assert handle.job_state == common_pb2.JOB_STATE_FAILED
    assert "trainer.executor" in handle.error and "no executor profile 'gpu2' (it has: local, cpu, gpu)" in handle.error
    assert handle.state.step("direct_sampling") is None  # nothing ran
