"""DIRECT with the "oracle" featuriser: the sampler streams the pool to the mace oracle's Describe and selects
on the teacher's descriptors; oracle failures reach the client with the oracle's status code."""

from __future__ import annotations

from collections.abc import Iterator

import grpc
import numpy as np
import pytest

from pyacemaker.artifacts import ArtifactStore
from pyacemaker.clients.oracle import backend_spec
from pyacemaker.rpc import channel
from pyacemaker.services.oracle.server import add_to_server as add_oracle
from pyacemaker.services.sampler.direct import select_direct
from pyacemaker.services.sampler.oracle_features import OracleFeaturiser
from pyacemaker.services.sampler.server import add_to_server as add_sampler
from pyacemaker.structures import atoms_to_structure, read_structures
from pyacemaker.teacher import resolve_teacher
from pyacemaker.v1 import sampler_pb2, sampler_pb2_grpc
from tests.conftest import running_service, sn2_seeds

TIMEOUT_S = 120
N_SELECT = 8
SETTINGS = sampler_pb2.PoolSettings(
    rattle_amplitudes=[0.03, 0.1],
    rattles_per_amplitude=6,
    interpolation_images=4,
    interpolation_rattle=0.02,
    fragment_rotations_per_seed=2,
    max_rotation_deg=30.0,
    min_distance=0.6,
    random_seed=5,
)


@pytest.fixture
def services(artifact_store: ArtifactStore) -> Iterator[tuple[sampler_pb2_grpc.SamplerServiceStub, str]]:
    with (
        running_service(add_oracle) as oracle_address,
        running_service(lambda server: add_sampler(server, artifact_store)) as sampler_address,
        channel(sampler_address) as ch,
    ):
        yield sampler_pb2_grpc.SamplerServiceStub(ch), oracle_address


def only_result(responses: Iterator) -> object:
    results = [r.result for r in responses if r.HasField("result")]
    assert len(results) == 1
    return results[0]


def teacher_descriptors(frames: list) -> np.ndarray:
    """The reference: mace's own per-atom descriptors of the teacher, averaged per element (H, C, Cl)."""
    from mace.calculators import MACECalculator

    calc = MACECalculator(model_paths=str(resolve_teacher("bundled")), device="cpu", default_dtype="float64")
    zs = [int(z) for z in calc.models[0].atomic_numbers]
    rows = []
    for atoms in frames:
        per_atom = calc.get_descriptors(atoms)
        rows.append(
            np.concatenate(
                [
                    per_atom[atoms.numbers == z].mean(axis=0)
                    if (atoms.numbers == z).any()
                    else np.zeros(per_atom.shape[1])
                    for z in zs
                ]
            )
        )
    return np.array(rows)


def test_direct_selects_on_the_oracle_descriptors_which_equal_the_teacher_descriptors(
    services: tuple[sampler_pb2_grpc.SamplerServiceStub, str], artifact_store: ArtifactStore
) -> None:
    sampler, oracle_address = services
    pool = only_result(
        sampler.GeneratePool(
            sampler_pb2.GeneratePoolRequest(seeds=[atoms_to_structure(a) for a in sn2_seeds()], settings=SETTINGS),
            timeout=TIMEOUT_S,
        )
    )
    spec = backend_spec("mace", {"models": ["bundled"], "batch_size": 16})
    request = sampler_pb2.SelectDirectRequest(
        pool=pool.pool,
        n_select=N_SELECT,
        featuriser="oracle",
        oracle_address=oracle_address,
        descriptor_backend=spec,
        random_seed=2,
    )
    responses = list(sampler.SelectDirect(request, timeout=TIMEOUT_S))
    result = only_result(iter(responses))
    featurise = [r.progress for r in responses if r.HasField("progress") and r.progress.stage == "featurise"]
    assert featurise[-1].done == pool.n_structures

    # The descriptors the oracle streams are mace's own, per element ...
    frames = read_structures(artifact_store.path(pool.pool))
    features = OracleFeaturiser(oracle_address, spec)(frames)
    np.testing.assert_allclose(features, teacher_descriptors(frames), atol=1e-10)
    # ... and the sampler selected on exactly those (the oracle is deterministic). Not compared with a selection
    # on the reference features: DIRECT's picks can flip under a 1e-16 change of the features.
    expected = select_direct(features, N_SELECT, 1, 2)
    assert list(result.indices) == [int(i) for i in expected.indices]
    assert len(set(result.indices)) == N_SELECT and result.n_components == expected.n_components


def test_oracle_failures_keep_their_status_code(services: tuple[sampler_pb2_grpc.SamplerServiceStub, str]) -> None:
    sampler, oracle_address = services
    pool = only_result(
        sampler.GeneratePool(
            sampler_pb2.GeneratePoolRequest(seeds=[atoms_to_structure(a) for a in sn2_seeds()], settings=SETTINGS),
            timeout=TIMEOUT_S,
        )
    )
    cases = [
        (oracle_address, backend_spec("lj", {}), grpc.StatusCode.UNIMPLEMENTED, "'lj' has no descriptors"),
        (oracle_address, backend_spec("mace", {"models": []}), grpc.StatusCode.INVALID_ARGUMENT, "'models' is empty"),
        ("127.0.0.1:1", backend_spec("mace", {"models": ["bundled"]}), grpc.StatusCode.UNAVAILABLE, "127.0.0.1:1"),
    ]
    for address, spec, code, text in cases:
        request = sampler_pb2.SelectDirectRequest(
            pool=pool.pool, n_select=3, featuriser="oracle", oracle_address=address, descriptor_backend=spec
        )
        with pytest.raises(grpc.RpcError) as caught:
            list(sampler.SelectDirect(request, timeout=TIMEOUT_S))
        assert caught.value.code() == code
        assert text in caught.value.details()
