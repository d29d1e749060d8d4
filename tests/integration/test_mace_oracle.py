"""The mace oracle over real gRPC: committee mean and spread equal mace's own MACECalculator, descriptors are
invariant and equal MACECalculator.get_descriptors averaged per element, bad options are INVALID_ARGUMENT."""

from __future__ import annotations

import functools
from collections.abc import Iterator
from typing import Any

import grpc
import numpy as np
import pytest
from ase import Atoms
from ase.build import molecule

from pyacemaker.artifacts import ArtifactStore
from pyacemaker.clients.oracle import artifact_option, backend_spec, stream_labels
from pyacemaker.rpc import channel
from pyacemaker.services.oracle.server import add_to_server
from pyacemaker.structures import CHARGE_KEY, SPIN_KEY, atoms_to_structure
from pyacemaker.teacher import resolve_teacher
from pyacemaker.v1 import oracle_pb2, oracle_pb2_grpc
from tests.conftest import running_service, sn2_seeds

TIMEOUT_S = 120
TOLERANCE = 1e-6  # what the issue asks; float64 agreement is ~1e-13


@pytest.fixture(scope="module")
def committee_paths(tmp_path_factory: pytest.TempPathFactory) -> list[str]:
    """The bundled teacher and a second member: the teacher with one weight tensor perturbed (a different model
    with the same elements and cutoff, as a fine-tuned committee member would be)."""
    import torch

    teacher = resolve_teacher("bundled")
    model = torch.load(teacher, weights_only=False)
    generator = torch.Generator().manual_seed(7)
    with torch.no_grad():
        weight = next(model.interactions[0].parameters())
        weight.add_(0.05 * torch.randn(weight.shape, generator=generator, dtype=weight.dtype))
    member = tmp_path_factory.mktemp("committee") / "perturbed.model"
    torch.save(model, member)
    return [str(teacher), str(member)]


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> ArtifactStore:
    return ArtifactStore(tmp_path_factory.mktemp("store"))


@pytest.fixture(scope="module")
def oracle(store: ArtifactStore) -> Iterator[grpc.Channel]:
    with running_service(functools.partial(add_to_server, store=store)) as address, channel(address) as ch:
        yield ch


def as_artifacts(store: ArtifactStore, paths: list[str]) -> list[dict[str, object]]:
    """Model files as the oracle takes them: references into the shared store."""
    return [artifact_option(store.put_file(path, kind="model")) for path in paths]


def sn2_frames(count: int, seed: int = 0) -> list[Atoms]:
    """Rattled copies of the three SN2 seeds (charge −1)."""
    rng = np.random.default_rng(seed)
    seeds = sn2_seeds()
    frames = []
    for i in range(count):
        atoms = seeds[i % 3].copy()
        atoms.positions += rng.normal(0.0, 0.05, atoms.positions.shape)
        frames.append(atoms)
    return frames


def periodic_frame() -> Atoms:
    """CH3Cl in a small periodic box, so stress is computed and images interact."""
    atoms = molecule("CH3Cl")
    atoms.cell = np.diag([6.0, 6.5, 7.0])
    atoms.pbc = True
    atoms.center()
    atoms.rattle(0.03, seed=1)
    atoms.info.update({CHARGE_KEY: 0, SPIN_KEY: 1})
    return atoms


def mace_calculator(paths: list[str]):  # type: ignore[no-untyped-def]
    from mace.calculators import MACECalculator

    return MACECalculator(model_paths=paths, device="cpu", default_dtype="float64")


@pytest.mark.parametrize("threads", [1, 2], ids=["members-in-turn", "members-at-once"])
def test_committee_mean_and_spread_equal_mace_calculator(
    oracle: grpc.Channel, store: ArtifactStore, committee_paths: list[str], threads: int
) -> None:
    frames = [*sn2_frames(9), periodic_frame()]
    options = {"models": as_artifacts(store, committee_paths), "batch_size": 4, "threads": threads}
    spec = backend_spec("mace", options)
    results = dict(stream_labels(oracle, spec, frames, batch_size=5, timeout=TIMEOUT_S))
    assert sorted(results) == list(range(len(frames)))
    calc = mace_calculator(committee_paths)
    for index, atoms in enumerate(frames):
        labels = results[index]
        assert labels.ok, labels.reason
        reference = atoms.copy()
        reference.calc = calc
        reference.get_potential_energy()
        expected = calc.results
        assert labels.energy == pytest.approx(expected["energy"], abs=TOLERANCE)
        np.testing.assert_allclose(labels.forces, expected["forces"], atol=TOLERANCE)
        uncertainty = labels.uncertainty
        assert uncertainty.energy_std == pytest.approx(np.sqrt(expected["energy_var"]), abs=TOLERANCE)
        assert uncertainty.energy_std > 1e-4  # the members really differ
        force_std = np.sqrt(expected["forces_var"].sum(axis=1))  # norm over x, y, z of the per-component std
        np.testing.assert_allclose(uncertainty.force_std, force_std, atol=TOLERANCE)
        assert uncertainty.max_force_std == pytest.approx(force_std.max(), abs=TOLERANCE)
        if atoms.pbc.any():
            np.testing.assert_allclose(labels.stress, expected["stress"], atol=TOLERANCE)
        else:
            assert labels.stress is None
        assert labels.level_of_theory.startswith("mace:") and "+" in labels.level_of_theory


def test_graph_batches_are_bounded_by_atoms_and_give_the_same_labels(
    oracle: grpc.Channel, store: ArtifactStore, committee_paths: list[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Large cells must not pile tens of thousands of atoms into one graph batch: with the bound at 13 atoms,
    batches of 8 six-atom frames become batches of 2, and every label is what one big batch gives."""
    from pyacemaker.services.oracle.backends import mace

    frames = sn2_frames(9, seed=7)
    spec = backend_spec("mace", {"models": as_artifacts(store, committee_paths), "batch_size": 8})
    whole = dict(stream_labels(oracle, spec, frames, batch_size=9, timeout=TIMEOUT_S))
    monkeypatch.setattr(mace, "MAX_BATCH_ATOMS", 13)
    assert [len(batch) for batch in mace._chunks(frames, 8)] == [2, 2, 2, 2, 1]
    split = dict(stream_labels(oracle, spec, frames, batch_size=9, timeout=TIMEOUT_S))
    for index in range(len(frames)):
        assert split[index].energy == pytest.approx(whole[index].energy, abs=1e-9)
        np.testing.assert_allclose(split[index].forces, whole[index].forces, atol=1e-9)
        np.testing.assert_allclose(split[index].uncertainty.force_std, whole[index].uncertainty.force_std, atol=1e-9)


def test_a_single_model_has_zero_spread_and_unknown_elements_fail_alone(oracle: grpc.Channel) -> None:
    water = molecule("H2O")
    water.info.update({CHARGE_KEY: 0, SPIN_KEY: 1})
    frames = [*sn2_frames(2), water, *sn2_frames(1, seed=5)]
    spec = backend_spec("mace", {"models": ["bundled"], "batch_size": 2})
    results = dict(stream_labels(oracle, spec, frames, batch_size=4, timeout=TIMEOUT_S))
    assert not results[2].ok
    assert "O is not supported by oracle backend 'mace' (it knows H, C, Cl)" in results[2].reason
    for index in (0, 1, 3):
        assert results[index].ok, results[index].reason
        assert results[index].uncertainty.energy_std == 0.0 and results[index].uncertainty.max_force_std == 0.0
        assert len(results[index].uncertainty.force_std) == 6


def describe(oracle: grpc.Channel, models: list[Any], frames: list[Atoms], batch: int = 4) -> np.ndarray:
    spec = backend_spec("mace", {"models": models, "batch_size": 3})
    requests = [
        oracle_pb2.DescribeRequest(
            backend=spec if start == 0 else None,
            structures=[atoms_to_structure(a) for a in frames[start : start + batch]],
        )
        for start in range(0, len(frames), batch)
    ]
    responses = list(oracle_pb2_grpc.OracleServiceStub(oracle).Describe(iter(requests), timeout=TIMEOUT_S))
    assert len(responses) == len(requests)  # one response per request batch
    descriptors = [d for response in responses for d in response.descriptors]
    assert [d.index for d in descriptors] == list(range(len(frames)))
    for d, atoms in zip(descriptors, frames, strict=True):
        assert d.content_id == atoms_to_structure(atoms).content_id
    return np.array([d.values for d in descriptors])


def rotation(seed: int) -> np.ndarray:
    q, r = np.linalg.qr(np.random.default_rng(seed).normal(size=(3, 3)))
    return q * np.sign(np.diag(r))


def test_descriptors_are_invariant_and_equal_mace_descriptors_per_element(
    oracle: grpc.Channel, store: ArtifactStore, committee_paths: list[str]
) -> None:
    base = sn2_frames(3, seed=11)
    moved = []
    for i, atoms in enumerate(base):
        copy = atoms.copy()
        copy.positions = copy.positions @ rotation(i).T + np.array([1.5, -2.0, 0.7])
        order = [0, 3, 1, 2, 5, 4]  # swap the hydrogens and the two chlorines
        moved.append(copy[order])
    chloride = Atoms("Cl", info={CHARGE_KEY: -1, SPIN_KEY: 1})  # no carbon, no hydrogen: zero blocks
    values = describe(oracle, as_artifacts(store, committee_paths), [*base, *moved, chloride])
    assert values.shape[0] == 7 and values.shape[1] > 0
    np.testing.assert_allclose(values[3:6], values[0:3], atol=1e-8)
    assert np.abs(values[0] - values[1]).max() > 1e-3  # different structures differ

    calc = mace_calculator(committee_paths[:1])  # descriptors come from the first member (the teacher)
    zs = [int(z) for z in calc.models[0].atomic_numbers]
    for atoms, row in zip([*base, chloride], [*values[:3], values[6]], strict=True):
        per_atom = calc.get_descriptors(atoms)
        expected = [
            per_atom[atoms.numbers == z].mean(axis=0) if (atoms.numbers == z).any() else np.zeros(per_atom.shape[1])
            for z in zs
        ]
        np.testing.assert_allclose(row, np.concatenate(expected), atol=1e-10)


def test_bad_options_and_undescribable_structures_are_invalid_argument(oracle: grpc.Channel) -> None:
    stub = oracle_pb2_grpc.OracleServiceStub(oracle)
    absent = {"uri": "objects/00/absent.model", "sha256": "0" * 64}
    for options, text in (({"models": []}, "'models' is empty"), ({"models": [absent]}, "absent.model is missing")):
        request = oracle_pb2.LabelRequest(
            backend=backend_spec("mace", options), structures=[atoms_to_structure(sn2_frames(1)[0])]
        )
        with pytest.raises(grpc.RpcError) as caught:
            list(stub.Label(iter([request]), timeout=TIMEOUT_S))
        assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert text in caught.value.details()
    water = molecule("H2O")
    with pytest.raises(grpc.RpcError) as caught:
        describe(oracle, ["bundled"], [*sn2_frames(2), water])
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "structure 2 cannot be described" in caught.value.details()


def test_get_info_reports_mace_with_descriptors(oracle: grpc.Channel) -> None:
    response = oracle_pb2_grpc.OracleServiceStub(oracle).GetInfo(oracle_pb2.GetInfoRequest(), timeout=10)
    info = {backend.name: backend for backend in response.backends}["mace"]
    assert info.available and info.descriptors
    assert set(info.implemented_properties) == {"energy", "forces", "stress"}
