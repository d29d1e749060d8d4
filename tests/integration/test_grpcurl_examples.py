"""The grpcurl examples of docs/deployment.md, made the way grpcurl makes them: through server reflection alone.

grpcurl is not installed here, so each documented command is read from the docs and carried out by a small
reflection client: `list` and `describe` from the reflection service, and a call's `-d` JSON turned into the
request message with the descriptors the server sent (not the generated code), against a real orchestrator and a
real oracle on loopback. The documented ports are mapped to the test's ports."""

from __future__ import annotations

import json
import shlex
from collections.abc import Iterator
from typing import Any

import grpc
import pytest
from google.protobuf import descriptor_pool, json_format, message_factory
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import ProtoReflectionDescriptorDatabase

from pyacemaker.artifacts import ArtifactStore
from pyacemaker.rpc import channel
from pyacemaker.services.oracle.server import add_to_server as add_oracle
from pyacemaker.services.orchestrator.runner import RunManager
from pyacemaker.services.orchestrator.server import add_to_server as add_orchestrator
from tests.conftest import REPO_ROOT, running_service

DOCUMENTED_PORTS = {"127.0.0.1:50051": "orchestrator", "127.0.0.1:50053": "oracle"}
# The documented oracle defaults for backend "lj" (LjOracleConfig): ε (eV), σ (Å), cutoff (Å).
LJ_EPSILON, LJ_SIGMA, LJ_CUTOFF = 0.0103, 3.40, 10.2


def documented_commands() -> list[list[str]]:
    text = (REPO_ROOT / "docs" / "deployment.md").read_text()
    section = text.split("## Calling the services directly: grpcurl", 1)[1].split("\n## ", 1)[0]
    block = section.split("```bash\n", 1)[1].split("```", 1)[0]
    return [shlex.split(line) for line in block.splitlines() if line.startswith("grpcurl ")]


@pytest.fixture(scope="module")
def addresses(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, str]]:
    store = ArtifactStore(tmp_path_factory.mktemp("store"))
    runs = RunManager(store, "127.0.0.1:1", "127.0.0.1:1", "127.0.0.1:1")
    try:
        with (
            running_service(lambda server: add_orchestrator(server, runs)) as orchestrator,
            running_service(lambda server: add_oracle(server, tmp_path_factory.mktemp("oracle"))) as oracle,
        ):
            yield {"orchestrator": orchestrator, "oracle": oracle}
    finally:
        runs.shutdown()


def grpcurl(command: list[str], addresses: dict[str, str]) -> Any:
    """What `grpcurl -plaintext [-d JSON] ADDRESS (list | describe NAME | SERVICE/METHOD)` prints, as data."""
    assert command[:2] == ["grpcurl", "-plaintext"], command
    rest = command[2:]
    data = None
    if rest[0] == "-d":
        data, rest = rest[1], rest[2:]
    address = addresses[DOCUMENTED_PORTS[rest[0]]]
    verb = rest[1:]
    with channel(address) as ch:
        database = ProtoReflectionDescriptorDatabase(ch)
        if verb == ["list"]:
            return sorted(database.get_services())
        pool = descriptor_pool.DescriptorPool(database)
        if verb[0] == "describe":
            return [method.name for method in pool.FindServiceByName(verb[1]).methods]
        service, method_name = verb[0].split("/")
        method = pool.FindServiceByName(service).methods_by_name[method_name]
        request = message_factory.GetMessageClass(method.input_type)()
        json_format.Parse(data or "{}", request)
        reply_class = message_factory.GetMessageClass(method.output_type)
        path = f"/{service}/{method_name}"
        kwargs = {
            "request_serializer": lambda m: m.SerializeToString(),
            "response_deserializer": reply_class.FromString,
        }
        if method.client_streaming and method.server_streaming:
            replies = list(ch.stream_stream(path, **kwargs)(iter([request]), timeout=60))
        elif method.server_streaming:
            replies = list(ch.unary_stream(path, **kwargs)(request, timeout=60))
        else:
            replies = [ch.unary_unary(path, **kwargs)(request, timeout=60)]
        return [json_format.MessageToDict(reply) for reply in replies]


def lennard_jones_dimer(r: float) -> float:
    def u(x: float) -> float:
        return 4 * LJ_EPSILON * ((LJ_SIGMA / x) ** 12 - (LJ_SIGMA / x) ** 6)

    return u(r) - u(LJ_CUTOFF)


def test_every_documented_grpcurl_call_works_through_reflection(addresses: dict[str, str]) -> None:
    commands = documented_commands()
    assert len(commands) == 6, "the test covers each documented call"
    results = [grpcurl(command, addresses) for command in commands]
    listed, described, health, runs, info, label = results
    assert {"pyacemaker.v1.OrchestratorService", "grpc.health.v1.Health"} <= set(listed)
    assert any(name.startswith("grpc.reflection.") for name in listed)
    assert {"StartRun", "WatchRun", "GetRun", "ListRuns", "CancelRun"} <= set(described)
    assert health == [{"status": "SERVING"}]
    assert runs == [{}], "a fresh orchestrator has no runs"
    assert "lj" in [backend["name"] for backend in info[0]["backends"]]
    assert info[0]["levelOfTheory"].startswith("lj")
    (result,) = [r for reply in label for r in reply.get("results", [])]
    assert result["labels"]["energy"] == pytest.approx(lennard_jones_dimer(3.8), rel=1e-9)
    forces = result["labels"]["forces"]
    assert forces[2] == pytest.approx(-forces[5]) and abs(forces[2]) > 0, json.dumps(result)[:300]


def test_a_call_without_reflection_knowledge_of_the_name_fails_as_grpcurl_would(addresses: dict[str, str]) -> None:
    with pytest.raises(KeyError):
        grpcurl(["grpcurl", "-plaintext", "127.0.0.1:50051", "describe", "pyacemaker.v1.NoSuchService"], addresses)
    with pytest.raises(grpc.RpcError) as caught:
        grpcurl(
            [
                "grpcurl",
                "-plaintext",
                "-d",
                '{"run_id": "nope"}',
                "127.0.0.1:50051",
                "pyacemaker.v1.OrchestratorService/GetRun",
            ],
            addresses,
        )
    assert caught.value.code() == grpc.StatusCode.NOT_FOUND
