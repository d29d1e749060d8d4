"""Property-based fuzzing of every RPC against the four real services on loopback (see rpc_fuzz.py).

For every drawn request: no UNKNOWN or INTERNAL status, a bounded status message, an answer within 30 s, no
service process dies, and a Label stream that succeeds returns one result per structure sent. After each RPC's
examples the service still answers its health check. Deterministic (derandomized) and bounded: the whole suite
takes about a minute on two cores. A larger campaign: benchmarks/rpc_fuzz_campaign.py.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.fuzz.rpc_fuzz import Services, call, request_strategies, running_services, violations

# Examples per RPC: the cheap ones more, the ones that run real work (MD steps, xtb, pools) fewer.
EXAMPLES = {
    "OracleService.Label": 25,
    "OracleService.Describe": 8,
    "SamplerService.GeneratePool": 12,
    "SamplerService.SelectDirect": 15,
    "SamplerService.RunMd": 15,
    "TrainerService.StartJob": 20,
    "OrchestratorService.StartRun": 20,
}
DEFAULT_EXAMPLES = 10
RPCS = [
    "OracleService.GetInfo",
    "OracleService.Label",
    "OracleService.Describe",
    "SamplerService.GeneratePool",
    "SamplerService.SelectDirect",
    "SamplerService.RunMd",
    "TrainerService.StartJob",
    "TrainerService.GetJob",
    "TrainerService.WatchJob",
    "TrainerService.CancelJob",
    "TrainerService.ResumeJob",
    "TrainerService.GetTrainerInfo",
    "OrchestratorService.StartRun",
    "OrchestratorService.WatchRun",
    "OrchestratorService.GetRun",
    "OrchestratorService.ListRuns",
    "OrchestratorService.CancelRun",
]

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def services() -> Iterator[Services]:
    with running_services() as running:
        yield running


@pytest.mark.parametrize("rpc", RPCS)
def test_rpc_survives_malformed_requests(services: Services, rpc: str) -> None:
    strategy = request_strategies(services)[rpc]

    @settings(
        max_examples=EXAMPLES.get(rpc, DEFAULT_EXAMPLES),
        derandomize=True,
        deadline=None,
        database=None,
        suppress_health_check=list(HealthCheck),
    )
    @given(data=st.data())
    def fuzz(data: st.DataObject) -> None:
        outcome = call(services, rpc, data.draw(strategy, label="request"))
        assert not violations(outcome), violations(outcome)

    fuzz()
    service = {"Oracle": "oracle", "Sampler": "sampler", "Trainer": "trainer", "Orchestrator": "orchestrator"}[
        rpc.split("Service.")[0]
    ]
    assert services.healthy(service), f"{service} no longer answers its health check"
