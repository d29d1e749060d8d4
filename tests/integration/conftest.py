"""Fixtures of the integration tests that need every service."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import ExitStack

import pytest

from pyacemaker.rpc import channel
from pyacemaker.services.oracle.server import add_to_server as add_oracle
from pyacemaker.services.orchestrator.runner import RunManager
from pyacemaker.services.orchestrator.server import add_to_server as add_orchestrator
from pyacemaker.services.sampler.server import add_to_server as add_sampler
from pyacemaker.services.trainer.server import add_to_server as add_trainer
from pyacemaker.services.trainer.server import create_manager
from pyacemaker.v1 import orchestrator_pb2_grpc
from tests.conftest import running_service


@pytest.fixture
def all_services(artifact_store, tmp_path) -> Iterator[orchestrator_pb2_grpc.OrchestratorServiceStub]:
    """The orchestrator's stub, with the oracle, sampler and trainer beside it on loopback."""
    with ExitStack() as stack:
        oracle = stack.enter_context(
            running_service(lambda s: add_oracle(s, work_dir=tmp_path / "oracle", store=artifact_store))
        )
        sampler = stack.enter_context(running_service(lambda s: add_sampler(s, artifact_store)))
        manager = create_manager(artifact_store, tmp_path / "trainer")
        stack.callback(manager.shutdown)
        trainer = stack.enter_context(running_service(lambda s: add_trainer(s, manager)))
        runs = RunManager(artifact_store, sampler, oracle, trainer)
        stack.callback(runs.shutdown)
        address = stack.enter_context(running_service(lambda s: add_orchestrator(s, runs)))
        yield orchestrator_pb2_grpc.OrchestratorServiceStub(stack.enter_context(channel(address)))
