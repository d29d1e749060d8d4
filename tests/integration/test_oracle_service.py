"""The oracle as a real gRPC server: streaming labels, errors as status codes, health and reflection."""

from __future__ import annotations

import threading
from collections.abc import Iterator

import grpc
import numpy as np
import pytest
from ase import Atoms
from ase.build import bulk
from ase.calculators.lj import LennardJones
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import ProtoReflectionDescriptorDatabase

from pyacemaker.clients.oracle import backend_spec, label_requests, stream_labels
from pyacemaker.rpc import channel
from pyacemaker.services.oracle.server import SERVICE_NAME, add_to_server
from pyacemaker.structures import atoms_to_structure
from pyacemaker.v1 import common_pb2, oracle_pb2, oracle_pb2_grpc
from tests.conftest import running_service

LJ_OPTIONS = {"epsilon": 0.0104, "sigma": 3.4, "cutoff": 7.0}


@pytest.fixture(scope="module")
def oracle() -> Iterator[grpc.Channel]:
    with running_service(add_to_server) as address, channel(address) as ch:
        yield ch


def argon(seed: int, periodic: bool = False) -> Atoms:
    atoms = bulk("Ar", "fcc", a=5.3, cubic=True)
    if not periodic:
        atoms.pbc = False
        atoms.cell = np.zeros((3, 3))
    atoms.rattle(0.2, seed=seed)
    return atoms


def direct_lj_energy(atoms: Atoms) -> float:
    calc = LennardJones(epsilon=LJ_OPTIONS["epsilon"], sigma=LJ_OPTIONS["sigma"], rc=LJ_OPTIONS["cutoff"])
    return float(calc.get_potential_energy(atoms.copy()))


def test_three_batches_come_back_complete_and_correct(oracle: grpc.Channel) -> None:
    frames = [argon(seed, periodic=seed % 2 == 0) for seed in range(12)]
    spec = backend_spec("lj", LJ_OPTIONS)
    assert len(list(label_requests(spec, frames, batch_size=4))) == 3
    results = list(stream_labels(oracle, spec, frames, batch_size=4, timeout=30))
    assert sorted(index for index, _ in results) == list(range(12))
    for index, labels in results:
        assert labels.ok, labels.reason
        assert labels.energy == pytest.approx(direct_lj_energy(frames[index]), rel=1e-12, abs=1e-12)
        assert labels.forces is not None and labels.forces.shape == (len(frames[index]), 3)
        assert (labels.stress is not None) == frames[index].pbc.any()
        assert labels.level_of_theory == "lj:eps=0.0104,sigma=3.4,rc=7.0"


def test_results_carry_the_content_id_of_their_structure(oracle: grpc.Channel) -> None:
    frames = [argon(seed) for seed in range(3)]
    stub = oracle_pb2_grpc.OracleServiceStub(oracle)
    requests = label_requests(backend_spec("lj", LJ_OPTIONS), frames, batch_size=2)
    results = [result for response in stub.Label(requests, timeout=30) for result in response.results]
    assert [r.content_id for r in results] == [atoms_to_structure(a).content_id for a in frames]


def test_a_failed_structure_mid_stream_leaves_the_others_labelled(oracle: grpc.Channel) -> None:
    frames = [argon(seed) for seed in range(5)]
    frames[2].positions[1] = frames[2].positions[0]
    malformed = atoms_to_structure(argon(9))
    del malformed.positions[-1]
    stub = oracle_pb2_grpc.OracleServiceStub(oracle)
    requests = [
        oracle_pb2.LabelRequest(
            backend=backend_spec("lj", LJ_OPTIONS), structures=[atoms_to_structure(a) for a in frames[:3]]
        ),
        oracle_pb2.LabelRequest(structures=[malformed, *(atoms_to_structure(a) for a in frames[3:])]),
    ]
    results = {r.index: r.labels for response in stub.Label(iter(requests), timeout=30) for r in response.results}
    assert sorted(results) == [0, 1, 2, 3, 4, 5]
    assert results[2].status == common_pb2.LABEL_STATUS_FAILED and "not finite" in results[2].reason
    assert results[3].status == common_pb2.LABEL_STATUS_FAILED and "invalid structure" in results[3].reason
    for index, atoms in [(0, frames[0]), (1, frames[1]), (4, frames[3]), (5, frames[4])]:
        assert results[index].status == common_pb2.LABEL_STATUS_OK
        assert results[index].energy == pytest.approx(direct_lj_energy(atoms), rel=1e-12, abs=1e-12)


def test_labels_stream_back_before_the_request_stream_ends(oracle: grpc.Channel) -> None:
    """The server answers each batch as it goes instead of collecting the whole stream first."""
    first_result_seen = threading.Event()
    waited_in_vain = threading.Event()

    def requests() -> Iterator[oracle_pb2.LabelRequest]:
        yield oracle_pb2.LabelRequest(backend=backend_spec("lj", LJ_OPTIONS), structures=[atoms_to_structure(argon(0))])
        if not first_result_seen.wait(timeout=20):
            waited_in_vain.set()
        yield oracle_pb2.LabelRequest(structures=[atoms_to_structure(argon(1))])

    indices = []
    for response in oracle_pb2_grpc.OracleServiceStub(oracle).Label(requests(), timeout=30):
        indices.extend(r.index for r in response.results)
        first_result_seen.set()
    assert not waited_in_vain.is_set()
    assert indices == [0, 1]


@pytest.mark.parametrize(
    ("spec", "named"),
    [
        (backend_spec("dftb", {}), "'dftb'"),
        (backend_spec("lj", {"epsilon": -1.0}), "epsilon"),
        (backend_spec("xtb", {"mehtod": "GFN2-xTB"}), "mehtod"),
    ],
)
def test_bad_backend_is_invalid_argument_naming_it(oracle: grpc.Channel, spec, named: str) -> None:
    with pytest.raises(grpc.RpcError) as caught:
        list(stream_labels(oracle, spec, [argon(0)], timeout=30))
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert named in caught.value.details()


def test_a_stream_without_a_backend_is_invalid_argument(oracle: grpc.Channel) -> None:
    request = oracle_pb2.LabelRequest(structures=[atoms_to_structure(argon(0))])
    with pytest.raises(grpc.RpcError) as caught:
        list(oracle_pb2_grpc.OracleServiceStub(oracle).Label(iter([request]), timeout=30))
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "backend" in caught.value.details()


def test_xtb_through_the_server_uses_the_structure_charge(oracle: grpc.Channel) -> None:
    from tblite.ase import TBLite

    anion = Atoms("ClCCl", positions=[[-1.8, 0, 0], [0, 0, 0], [1.8, 0, 0]])
    anion.info["charge"] = -1
    ((_, labels),) = stream_labels(oracle, backend_spec("xtb", {}), [anion], timeout=30)
    reference = anion.copy()
    reference.calc = TBLite(method="GFN2-xTB", charge=-1, multiplicity=2, verbosity=0)
    assert labels.ok, labels.reason
    assert labels.energy == pytest.approx(reference.get_potential_energy(), abs=1e-6)


def test_concurrent_streams_sharing_a_backend_give_the_serial_labels(oracle: grpc.Channel) -> None:
    """The server hands one cached backend to every stream with the same settings; labels must not depend on
    what other streams compute at the same time."""
    molecules = []
    for seed in range(12):
        molecule = Atoms("ClCCl", positions=[[-1.8, 0, 0], [0, 0, 0], [1.8, 0, 0]])
        molecule.info["charge"] = -1
        molecule.rattle(0.05, seed=seed)
        molecules.append(molecule)
    spec = backend_spec("xtb", {})
    serial = {index: labels.energy for index, labels in stream_labels(oracle, spec, molecules, timeout=30)}
    concurrent: list[dict[int, float]] = [{} for _ in range(3)]

    def label_all(slot: int) -> None:
        for index, labels in stream_labels(oracle, spec, molecules, batch_size=5, timeout=30):
            concurrent[slot][index] = labels.energy

    threads = [threading.Thread(target=label_all, args=(slot,)) for slot in range(3)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    assert len(set(serial.values())) == len(molecules)
    for energies in concurrent:
        assert energies.keys() == serial.keys()
        for index, energy in energies.items():
            assert energy == pytest.approx(serial[index], abs=1e-8)


def test_get_info_lists_lj_and_xtb(oracle: grpc.Channel) -> None:
    response = oracle_pb2_grpc.OracleServiceStub(oracle).GetInfo(oracle_pb2.GetInfoRequest(), timeout=10)
    infos = {info.name: info for info in response.backends}
    assert {"lj", "xtb"} <= set(infos)
    assert infos["xtb"].available and infos["lj"].available
    assert "stress" in infos["lj"].implemented_properties


def test_describe_is_unimplemented_for_lj(oracle: grpc.Channel) -> None:
    request = oracle_pb2.DescribeRequest(backend=backend_spec("lj", {}), structures=[atoms_to_structure(argon(0))])
    with pytest.raises(grpc.RpcError) as caught:
        list(oracle_pb2_grpc.OracleServiceStub(oracle).Describe(iter([request]), timeout=10))
    assert caught.value.code() == grpc.StatusCode.UNIMPLEMENTED
    assert "'lj' has no descriptors" in caught.value.details()


def test_health_reports_serving_and_reflection_lists_the_service(oracle: grpc.Channel) -> None:
    health = health_pb2_grpc.HealthStub(oracle)
    for service in ("", SERVICE_NAME):
        response = health.Check(health_pb2.HealthCheckRequest(service=service), timeout=10)
        assert response.status == health_pb2.HealthCheckResponse.SERVING
    services = ProtoReflectionDescriptorDatabase(oracle).get_services()
    assert "pyacemaker.v1.OracleService" in services
    assert SERVICE_NAME == "pyacemaker.v1.OracleService"
