"""RunMd over real gRPC: the sampler drives replicas with forces from a real oracle server (Lennard-Jones, and
the bundled MACE teacher as a committee), one Label call per step for all replicas, frames streamed and stored,
guard rails, and clear errors for bad requests."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import grpc
import numpy as np
import pytest
from ase import Atoms
from ase.calculators.lj import LennardJones

from pyacemaker.artifacts import ArtifactStore, sha256_of_file
from pyacemaker.clients.oracle import artifact_option, backend_spec
from pyacemaker.clients.sampler import run_md
from pyacemaker.rpc import channel
from pyacemaker.services.oracle.server import OracleService
from pyacemaker.services.sampler.server import add_to_server as add_sampler
from pyacemaker.structures import CHARGE_KEY, SPIN_KEY, atoms_to_structure, read_structures, structure_to_atoms
from pyacemaker.teacher import resolve_teacher
from pyacemaker.v1 import oracle_pb2_grpc, sampler_pb2
from tests.conftest import running_service, sn2_seeds
from tests.unit.test_md import ARGON, argon_octahedron

TIMEOUT_S = 120
LJ = backend_spec("lj", {**ARGON, "cutoff": 10.2})


class CountingOracle(OracleService):
    """The real oracle servicer, recording the structures of every Label call it serves."""

    def __init__(self, store: ArtifactStore) -> None:
        super().__init__(store=store)
        self.label_calls: list[list[Atoms]] = []

    def Label(self, request_iterator, context):
        structures: list[Atoms] = []
        self.label_calls.append(structures)

        def recorded():
            for request in request_iterator:
                structures.extend(structure_to_atoms(s) for s in request.structures)
                yield request

        yield from super().Label(recorded(), context)


@pytest.fixture
def services(artifact_store: ArtifactStore) -> Iterator[tuple[CountingOracle, str]]:
    oracle = CountingOracle(artifact_store)

    def register_oracle(server: grpc.Server) -> list[str]:
        oracle_pb2_grpc.add_OracleServiceServicer_to_server(oracle, server)
        return ["pyacemaker.v1.OracleService"]

    with (
        running_service(register_oracle) as oracle_address,
        running_service(lambda s: add_sampler(s, artifact_store)) as sampler_address,
    ):
        yield oracle, oracle_address, sampler_address


def charged_cluster() -> Atoms:
    atoms = argon_octahedron()
    atoms.info.update({CHARGE_KEY: -1, SPIN_KEY: 2})
    return atoms


def events_of(sampler_address: str, request: sampler_pb2.RunMdRequest) -> dict[str, list]:
    kinds: dict[str, list] = {"progress": [], "frame": [], "stopped": [], "result": []}
    with channel(sampler_address) as ch:
        for event in run_md(ch, request, timeout=TIMEOUT_S):
            kind = event.WhichOneof("event")
            kinds[kind].append(getattr(event, kind))
    assert len(kinds["result"]) == 1
    return kinds


def lj_request(oracle_address: str, **settings) -> sampler_pb2.RunMdRequest:
    base = dict(temperatures_k=[20.0, 40.0], timestep_fs=5.0, steps=20, save_interval=5, replicas=4, min_distance=2.0)
    base.update(settings)
    return sampler_pb2.RunMdRequest(
        starts=[atoms_to_structure(charged_cluster())],
        settings=sampler_pb2.MdSettings(**base),
        oracle_address=oracle_address,
        force_backend=LJ,
        selection=sampler_pb2.FrameSelection(n_frames=6, method="stride"),
    )


def test_run_md_batches_every_replica_into_one_oracle_call_per_step(services, artifact_store):
    oracle, oracle_address, sampler_address = services
    events = events_of(sampler_address, lj_request(oracle_address))
    result = events["result"][0]
    # One Label call before the first step and one per step, each with all 4 replicas, charge and spin intact.
    assert [len(call) for call in oracle.label_calls] == [4] * 21
    assert result.oracle_calls == 21 and result.steps == 20
    assert all(a.info[CHARGE_KEY] == -1 and a.info[SPIN_KEY] == 2 for call in oracle.label_calls for a in call)

    frames = events["frame"]
    assert len(frames) == result.n_frames == 4 * 4 and not events["stopped"]
    assert sorted({f.target_temperature_k for f in frames}) == [20.0, 40.0]
    assert all(f.structure.charge == -1 and f.structure.spin_multiplicity == 2 for f in frames)
    assert events["progress"][-1].done == events["progress"][-1].total == 20

    trajectory = read_structures(artifact_store.path(result.trajectory))
    assert sha256_of_file(artifact_store.path(result.trajectory)) == result.trajectory.sha256
    assert len(trajectory) == 16
    reference = LennardJones(**ARGON, rc=10.2, smooth=False)
    for streamed, stored in zip(frames, trajectory, strict=True):
        np.testing.assert_allclose(stored.positions, np.reshape(streamed.structure.positions, (-1, 3)), atol=1e-8)
        check = stored.copy()
        check.calc = reference
        assert stored.get_potential_energy() == pytest.approx(check.get_potential_energy(), abs=1e-8)
        assert streamed.labels.energy == pytest.approx(check.get_potential_energy(), abs=1e-8)
        assert stored.info[CHARGE_KEY] == -1
    selected = read_structures(artifact_store.path(result.selected))
    assert len(selected) == len(result.selected_indices) == 6
    for index, atoms in zip(result.selected_indices, selected, strict=True):
        np.testing.assert_allclose(atoms.positions, trajectory[index].positions)


def test_one_call_per_replica_when_asked(services):
    oracle, oracle_address, sampler_address = services
    events_of(sampler_address, lj_request(oracle_address, steps=3, replicas_per_oracle_call=1))
    assert [len(call) for call in oracle.label_calls] == [1] * 4 * 4


def test_guard_stops_replicas_with_the_reason_and_keeps_earlier_frames(services):
    oracle, oracle_address, sampler_address = services
    events = events_of(sampler_address, lj_request(oracle_address, min_distance=100.0))
    stops = events["stopped"]
    assert [s.replica for s in stops] == [0, 1, 2, 3] and {s.step for s in stops} == {0}
    assert all("fell below min_distance 100.0 Å" in s.reason for s in stops)
    result = events["result"][0]
    assert result.replicas_stopped == 4 and result.n_frames == 0 and not result.HasField("trajectory")
    assert oracle.label_calls == []


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda r: r.settings.__setattr__("timestep_fs", -1.0), "settings.timestep_fs must be positive"),
        (lambda r: r.ClearField("starts"), "RunMdRequest has no starts"),
        (lambda r: r.selection.__setattr__("method", "random"), "selection.method 'random' is unknown"),
        (lambda r: r.settings.__setattr__("pressure_gpa", 0.0), "pressure_gpa (NPT) needs periodic cells"),
        (
            lambda r: r.windows.add(atom_a=0, atom_b=1, atom_c=7, center=0.0, force_constant=1.0),
            "window 0, start 0: restraint atoms [0, 1, 7] are out of range",
        ),
    ],
)
def test_bad_requests_are_invalid_argument_naming_the_field(services, change, message):
    _oracle, oracle_address, sampler_address = services
    request = lj_request(oracle_address)
    change(request)
    with pytest.raises(grpc.RpcError) as caught:
        events_of(sampler_address, request)
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert message in caught.value.details()


def perturbed_teacher(directory: Path) -> Path:
    """A second committee member: the bundled teacher with its weights scaled by a few per cent (a real
    MACE model whose forces differ, so the committee has a spread)."""
    import torch

    model = torch.load(resolve_teacher("bundled"), map_location="cpu", weights_only=False)
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.mul_(1 + 0.05 * torch.randn(parameter.shape, generator=generator, dtype=parameter.dtype))
    path = directory / "perturbed.model"
    torch.save(model, path)
    return path


@pytest.mark.slow
def test_sn2_window_with_the_mace_committee_stops_on_committee_spread(services, tmp_path, artifact_store):
    """The bundled teacher plus a perturbed copy as committee over gRPC, one restraint window per SN2 seed; a
    tiny max_force_std stops every replica with the spread as reason, a loose one lets them run."""
    _oracle, oracle_address, sampler_address = services
    perturbed = artifact_option(artifact_store.put_file(perturbed_teacher(tmp_path), kind="model"))
    committee = backend_spec("mace", {"models": ["bundled", perturbed]})
    request = sampler_pb2.RunMdRequest(
        starts=[atoms_to_structure(a) for a in sn2_seeds()],
        settings=sampler_pb2.MdSettings(
            temperatures_k=[300.0], timestep_fs=0.5, steps=10, save_interval=5, replicas=2, max_force_std=5.0
        ),
        oracle_address=oracle_address,
        force_backend=committee,
        windows=[
            sampler_pb2.DistanceDifferenceRestraint(atom_a=4, atom_b=0, atom_c=5, center=c, force_constant=5.0)
            for c in (-1.2, 0.0, 1.2)
        ],
    )
    loose = events_of(sampler_address, request)
    assert not loose["stopped"] and len(loose["frame"]) == 3 * 2 * 2
    spreads = [f.labels.uncertainty.max_force_std for f in loose["frame"]]
    assert min(spreads) > 0.0
    assert all(f.structure.charge == -1 for f in loose["frame"])
    # ξ starts from the seed nearest each window's centre (reactant, TS, product) and stays on its side.
    for frame in loose["frame"]:
        assert abs(frame.collective_variable - (-1.2, 0.0, 1.2)[frame.window]) < 0.5

    request.settings.max_force_std = min(spreads) / 10
    tight = events_of(sampler_address, request)
    assert len(tight["stopped"]) == 6 and not tight["frame"]
    assert all("committee max force std" in s.reason and "exceeds max_force_std" in s.reason for s in tight["stopped"])
