"""The sampler over real gRPC: GeneratePool then SelectDirect through the artifact store, and the error codes
for bad settings and bad references."""

from __future__ import annotations

from collections.abc import Iterator

import grpc
import pytest

from pyacemaker.artifacts import ArtifactStore, sha256_of_file
from pyacemaker.rpc import channel
from pyacemaker.services.sampler.server import add_to_server
from pyacemaker.structures import atoms_to_structure, content_id, read_structures
from pyacemaker.v1 import common_pb2, sampler_pb2, sampler_pb2_grpc
from tests.conftest import running_service, sn2_seeds

TIMEOUT_S = 60
SETTINGS = sampler_pb2.PoolSettings(
    rattle_amplitudes=[0.03, 0.1],
    rattles_per_amplitude=10,
    max_strain=0.0,
    strains_per_seed=0,
    interpolation_images=5,
    fragment_rotations_per_seed=4,
    max_rotation_deg=30.0,
    min_distance=0.6,
    random_seed=3,
    interpolation_rattle=0.02,
)


@pytest.fixture
def sampler(artifact_store: ArtifactStore) -> Iterator[sampler_pb2_grpc.SamplerServiceStub]:
    with running_service(lambda server: add_to_server(server, artifact_store)) as address, channel(address) as ch:
        yield sampler_pb2_grpc.SamplerServiceStub(ch)


def split(responses: Iterator) -> tuple[list[common_pb2.Progress], object]:
    progress, results = [], []
    for response in responses:
        if response.HasField("progress"):
            progress.append(response.progress)
        else:
            results.append(response.result)
    assert len(results) == 1
    return progress, results[0]


def generate(sampler, settings=SETTINGS) -> tuple[list[common_pb2.Progress], sampler_pb2.GeneratePoolResult]:
    request = sampler_pb2.GeneratePoolRequest(seeds=[atoms_to_structure(a) for a in sn2_seeds()], settings=settings)
    return split(sampler.GeneratePool(request, timeout=TIMEOUT_S))


def test_pool_then_direct_selects_exactly_n(sampler, artifact_store: ArtifactStore) -> None:
    progress, pool = generate(sampler)
    assert progress and progress[-1].done == progress[-1].total > 0
    assert all(p.stage == "generate_pool" for p in progress)
    pool_path = artifact_store.path(pool.pool)
    assert sha256_of_file(pool_path) == pool.pool.sha256 and pool.pool.kind == "structures"
    pool_frames = read_structures(pool_path)
    assert len(pool_frames) == pool.n_structures
    assert pool.n_structures + pool.n_rejected == 3 * (1 + 2 * 10 + 4) + 2 * 5
    assert all(a.info["charge"] == -1 and a.info["spin_multiplicity"] == 1 for a in pool_frames)
    assert {a.info["operation"] for a in pool_frames} == {"seed", "rattle", "interpolate", "rotate_fragment"}
    seed_ids = {content_id(a) for a in sn2_seeds()}
    assert all(a.info["parent_id"] in seed_ids for a in pool_frames if a.info["operation"] != "seed")

    n_select = 13
    request = sampler_pb2.SelectDirectRequest(
        pool=pool.pool, n_select=n_select, k_per_cluster=2, featuriser="distribution", coverage_bins=10
    )
    progress, selection = split(sampler.SelectDirect(request, timeout=TIMEOUT_S))
    assert {p.stage for p in progress} >= {"featurise", "cluster"}
    selected_path = artifact_store.path(selection.selected)
    assert sha256_of_file(selected_path) == selection.selected.sha256
    selected = read_structures(selected_path)
    assert len(selected) == len(selection.indices) == n_select
    assert list(selection.indices) == sorted(set(selection.indices))
    # The artifact holds the pool's structures at those indices, in pool order.
    assert [content_id(a) for a in selected] == [content_id(pool_frames[i]) for i in selection.indices]
    assert all(a.info["charge"] == -1 for a in selected)
    assert 0 < selection.coverage <= 1
    assert selection.n_components == len(selection.explained_variance_ratio) >= 1
    assert 1 <= selection.n_clusters <= 7


def test_invalid_setting_is_invalid_argument_naming_it(sampler) -> None:
    settings = sampler_pb2.PoolSettings()
    settings.CopyFrom(SETTINGS)
    settings.min_distance = -0.5
    with pytest.raises(grpc.RpcError) as info:
        generate(sampler, settings)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "min_distance" in info.value.details()


def test_pool_ref_with_a_wrong_digest_is_invalid_argument(sampler) -> None:
    _, pool = generate(sampler)
    forged = common_pb2.ArtifactRef()
    forged.CopyFrom(pool.pool)
    forged.sha256 = "0" * 64
    with pytest.raises(grpc.RpcError) as info:
        split(sampler.SelectDirect(sampler_pb2.SelectDirectRequest(pool=forged, n_select=3), timeout=TIMEOUT_S))
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "sha256" in info.value.details()


def test_selecting_more_than_the_pool_is_invalid_argument(sampler) -> None:
    _, pool = generate(sampler)
    request = sampler_pb2.SelectDirectRequest(pool=pool.pool, n_select=pool.n_structures + 1)
    with pytest.raises(grpc.RpcError) as info:
        split(sampler.SelectDirect(request, timeout=TIMEOUT_S))
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "exceeds the pool size" in info.value.details()


def test_oracle_features_and_md_need_their_inputs(sampler) -> None:
    _, pool = generate(sampler)
    request = sampler_pb2.SelectDirectRequest(pool=pool.pool, n_select=3, featuriser="oracle")
    with pytest.raises(grpc.RpcError) as info:
        split(sampler.SelectDirect(request, timeout=TIMEOUT_S))
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "oracle_address" in info.value.details()
    with pytest.raises(grpc.RpcError) as info:
        list(sampler.RunMd(sampler_pb2.RunMdRequest(), timeout=TIMEOUT_S))
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "RunMdRequest has no starts" in info.value.details()
