"""Issue 15's defects, each reproduced against real services on loopback: one bad structure never takes a
service down or ends a Label stream, xtb crashes are contained in worker processes, and malformed requests get
INVALID_ARGUMENT naming the field instead of UNKNOWN."""

from __future__ import annotations

import functools
import math
import os
import signal
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import numpy as np
import pytest
from ase import Atoms
from ase.io import write

from pyacemaker.artifacts import ArtifactStore
from pyacemaker.cli.main import EXIT_BAD_INPUT
from pyacemaker.rpc import channel, check_health
from pyacemaker.services.oracle.server import add_to_server as add_oracle
from pyacemaker.services.orchestrator.runner import RunManager
from pyacemaker.services.orchestrator.server import add_to_server as add_orchestrator
from pyacemaker.services.sampler.server import add_to_server as add_sampler
from pyacemaker.structures import atoms_to_structure
from pyacemaker.v1 import (
    common_pb2,
    oracle_pb2,
    oracle_pb2_grpc,
    orchestrator_pb2,
    orchestrator_pb2_grpc,
    sampler_pb2,
    sampler_pb2_grpc,
    trainer_pb2,
    trainer_pb2_grpc,
)
from tests.conftest import running_service, sn2_seeds
from tests.integration.test_oracle_label_cli import run as run_cli

pytestmark = pytest.mark.slow
OK, FAILED = common_pb2.LABEL_STATUS_OK, common_pb2.LABEL_STATUS_FAILED


@pytest.fixture
def oracle() -> Iterator[tuple[str, oracle_pb2_grpc.OracleServiceStub]]:
    with running_service(add_oracle) as address, channel(address) as ch:
        yield address, oracle_pb2_grpc.OracleServiceStub(ch)


def water() -> Atoms:
    return Atoms("OH2", positions=[[0, 0, 0], [0.96, 0, 0], [-0.24, 0.93, 0]])


def raw(numbers: list[int], positions: list[float], **fields: object) -> common_pb2.Structure:
    return common_pb2.Structure(atomic_numbers=numbers, positions=positions, **fields)  # type: ignore[arg-type]


def label(stub: oracle_pb2_grpc.OracleServiceStub, backend: str, structures: list) -> list[oracle_pb2.LabelResult]:
    request = oracle_pb2.LabelRequest(backend=oracle_pb2.BackendSpec(name=backend), structures=structures)
    results = [r for response in stub.Label(iter([request]), timeout=120) for r in response.results]
    return sorted(results, key=lambda r: r.index)


def worker_pids() -> list[int]:
    """This process's xtb worker subprocesses (the in-process oracle's pool)."""
    pids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text().rsplit(")", 1)[1].split()
            cmdline = (entry / "cmdline").read_bytes()
        except OSError:
            continue
        if int(stat[1]) == os.getpid() and b"pyacemaker.services.oracle.workers" in cmdline:
            pids.append(int(entry.name))
    return pids


def test_bad_structures_in_an_xtb_stream_fail_alone_and_the_oracle_lives(oracle) -> None:
    from tblite.ase import TBLite

    address, stub = oracle
    h2 = [0.0, 0.0, 0.0, 0.0, 0.0, 0.74]
    structures = [
        atoms_to_structure(water()),
        raw([1, 1], h2, charge=-(2**31)),  # segfaulted tblite, 4 of 4 tries
        raw([0, 1], h2),  # xtb ignored the Z = 0 atom and returned OK
        raw([-1, 1], h2),
        raw([119, 1], h2),
        raw([], []),  # labelled E = 0, "1 of 1"
        raw([1, 1], h2, cell=[0.01, 0, 0, 0, 0.01, 0, 0, 0, 0.01], pbc=[True] * 3),  # died allocating 3.6 GB
        raw([1, 1], [0, 0, 0, 0, 0, math.nan]),
        raw([1, 1], h2, info_json="{"),
        atoms_to_structure(water()),
    ]
    start = time.perf_counter()
    results = label(stub, "xtb", structures)
    assert time.perf_counter() - start < 60
    assert [r.index for r in results] == list(range(len(structures)))
    assert [r.labels.status for r in results] == [OK] + [FAILED] * 8 + [OK]
    reasons = [r.labels.reason for r in results[1:9]]
    for reason, expected in zip(
        reasons,
        [
            "charge -2147483648 adds",
            "atomic_numbers: 0 is not an element",
            "atomic_numbers: -1 is not an element",
            "atomic_numbers: 119 is not an element",
            "the structure has no atoms",
            "the cell is far too small",
            "positions: atom 1 has a non-finite coordinate",
            "info_json is not a valid JSON object",
        ],
        strict=True,
    ):
        assert reason.startswith("invalid structure: ") and expected in reason, reason
    reference = water()
    reference.calc = TBLite(method="GFN2-xTB", charge=0, multiplicity=1, verbosity=0)
    assert results[0].labels.energy == pytest.approx(reference.get_potential_energy(), abs=1e-6)
    assert results[9].labels.energy == results[0].labels.energy
    assert check_health(address)


def test_answers_that_arrive_together_from_an_xtb_worker_are_all_read(oracle) -> None:
    """Coinciding atoms fail in microseconds, so several answers reach the oracle in one read (found by the
    fuzz campaign: a buffered pipe hid them from select and the stream hung)."""
    _, stub = oracle
    coinciding = raw([1, 1], [0.0] * 6)
    start = time.perf_counter()
    results = label(stub, "xtb", [coinciding] * 6)
    assert time.perf_counter() - start < 60
    assert [r.labels.status for r in results] == [FAILED] * 6
    assert all("Too close interatomic distances" in r.labels.reason for r in results)


def test_an_element_xtb_does_not_know_fails_naming_it(oracle) -> None:
    _, stub = oracle
    (result,) = label(stub, "xtb", [raw([88, 1], [0, 0, 0, 0, 0, 2.0], spin_multiplicity=2)])
    assert result.labels.status == FAILED
    assert "Ra is not supported by oracle backend 'xtb' (it knows H-Rn)" in result.labels.reason


@pytest.mark.parametrize("side", [0.1, 0.01])
def test_a_tiny_cell_fails_at_once_with_lj(oracle, side: float) -> None:
    _, stub = oracle
    cell = [side, 0, 0, 0, side, 0, 0, 0, side]
    start = time.perf_counter()
    (result,) = label(stub, "lj", [raw([18, 18], [0, 0, 0, 0, 0, side / 2], cell=cell, pbc=[True] * 3)])
    assert time.perf_counter() - start < 5  # was > 60 s and 2 GB
    assert result.labels.status == FAILED and "the cell is far too small" in result.labels.reason


def test_a_crashing_xtb_worker_fails_one_structure_and_is_replaced(oracle) -> None:
    """A worker killed mid-label (as a native crash would) fails that structure with how it died; the next
    structure goes to a fresh worker. A worker found dead while idle is replaced without failing anything."""
    address, stub = oracle
    request = oracle_pb2.LabelRequest(
        backend=oracle_pb2.BackendSpec(name="xtb"), structures=[atoms_to_structure(water())] * 2
    )
    earlier = set(worker_pids())  # of servers that other tests stopped, until they are collected
    responses = stub.Label(iter([request]), timeout=120)
    deadline = time.monotonic() + 30
    while not set(worker_pids()) - earlier and time.monotonic() < deadline:  # still importing tblite
        time.sleep(0.005)
    (first,) = set(worker_pids()) - earlier
    os.kill(first, signal.SIGSEGV)
    results = sorted((r for response in responses for r in response.results), key=lambda r: r.index)
    assert [r.labels.status for r in results] == [FAILED, OK]
    assert "the xtb worker process was killed by SIGSEGV while labelling this structure" in results[0].labels.reason
    (second,) = set(worker_pids()) - earlier
    assert second != first
    os.kill(second, signal.SIGKILL)
    time.sleep(0.2)
    assert [r.labels.status for r in label(stub, "xtb", [atoms_to_structure(water())])] == [OK]
    assert check_health(address)


def test_describe_refuses_a_tiny_cell_before_building_the_graph(oracle) -> None:
    pytest.importorskip("mace", reason="mace-torch is not installed (pyacemaker[mace])")
    _, stub = oracle
    spec = oracle_pb2.BackendSpec(name="mace")
    spec.options.update({"models": ["bundled"]})
    good = atoms_to_structure(sn2_seeds()[0])
    tiny = raw([6, 1], [0, 0, 0, 0, 0, 0.005], cell=[0.01, 0, 0, 0, 0.01, 0, 0, 0, 0.01], pbc=[True] * 3)
    with pytest.raises(grpc.RpcError) as error:
        list(stub.Describe(iter([oracle_pb2.DescribeRequest(backend=spec, structures=[good, tiny])]), timeout=120))
    assert error.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    details = error.value.details()
    assert "structure 1 cannot be described: cell:" in details and "far too small" in details


def test_the_label_cli_refuses_a_fractional_charge_and_an_absurd_one(tmp_path: Path, capsys) -> None:
    source = tmp_path / "h2.xyz"
    frame = Atoms("H2", positions=[[0, 0, 0], [0, 0, 0.74]])
    frame.info["charge"] = 1.5  # was computed as 1 and written back as 1.5
    write(source, [frame], format="extxyz")
    out = str(tmp_path / "out.xyz")
    assert run_cli(["label", "--backend", "xtb", str(source), "-o", out, "--oracle", "127.0.0.1:1"]) == EXIT_BAD_INPUT
    assert f"{source}: frame 0: charge must be an integer, got 1.5" in capsys.readouterr().err
    argv = ["label", "--backend", "xtb", str(source), "-o", out, "--oracle", "127.0.0.1:1", "--charge", "-2147483648"]
    assert run_cli(argv) == EXIT_BAD_INPUT
    assert "charge -2147483648 adds 2147483648 electrons" in capsys.readouterr().err


# -- sampler ------------------------------------------------------------------------------------------------------


@pytest.fixture
def sampler(artifact_store: ArtifactStore) -> Iterator[sampler_pb2_grpc.SamplerServiceStub]:
    with running_service(lambda server: add_sampler(server, artifact_store)) as address, channel(address) as ch:
        yield sampler_pb2_grpc.SamplerServiceStub(ch)


def md_error(stub: sampler_pb2_grpc.SamplerServiceStub, request: sampler_pb2.RunMdRequest) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as error:
        list(stub.RunMd(request, timeout=60))
    return error.value


@pytest.mark.parametrize(
    ("settings", "expected"),
    [
        (sampler_pb2.MdSettings(temperatures_k=[math.nan]), "settings.temperatures_k must be positive and at most"),
        (sampler_pb2.MdSettings(temperatures_k=[300, math.inf]), "settings.temperatures_k must be positive"),
        (sampler_pb2.MdSettings(timestep_fs=1e308), "settings.timestep_fs must be at most 20 fs, got 1e+308"),
        (sampler_pb2.MdSettings(timestep_fs=math.nan), "settings.timestep_fs must be positive and finite, got nan"),
        (sampler_pb2.MdSettings(random_seed=-1), "settings.random_seed must not be negative"),
        (sampler_pb2.MdSettings(pressure_gpa=math.nan), "settings.pressure_gpa must be finite"),
    ],
)
def test_md_settings_out_of_range_are_invalid_argument(sampler, settings, expected: str) -> None:
    request = sampler_pb2.RunMdRequest(
        starts=[atoms_to_structure(water())],
        settings=settings,
        oracle_address="127.0.0.1:1",
        force_backend=oracle_pb2.BackendSpec(name="lj"),
    )
    error = md_error(sampler, request)
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert expected in error.details()


def test_md_start_with_nan_positions_is_invalid_argument(sampler) -> None:
    start = raw([8, 1, 1], [0, 0, 0, 0.96, 0, 0, -0.24, math.nan, 0])
    request = sampler_pb2.RunMdRequest(
        starts=[start], oracle_address="127.0.0.1:1", force_backend=oracle_pb2.BackendSpec(name="lj")
    )
    error = md_error(sampler, request)
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "start 0: positions: atom 2 has a non-finite coordinate" in error.details()


def test_pool_settings_that_would_fill_the_memory_are_invalid_argument(sampler) -> None:
    request = sampler_pb2.GeneratePoolRequest(
        seeds=[atoms_to_structure(water())],
        settings=sampler_pb2.PoolSettings(
            # Each setting within its own bound; together 10^6 rattles of one seed.
            rattle_amplitudes=[0.1] * 10,
            rattles_per_amplitude=100_000,
            max_rotation_deg=30,
            min_distance=0.5,
        ),
    )
    with pytest.raises(grpc.RpcError) as error:
        list(sampler.GeneratePool(request, timeout=60))
    assert error.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "settings: these settings plan up to 1000001 candidates" in error.value.details()


# -- trainer ------------------------------------------------------------------------------------------------------


@pytest.fixture
def trainer(tmp_path: Path, artifact_store: ArtifactStore) -> Iterator[trainer_pb2_grpc.TrainerServiceStub]:
    from pyacemaker.services.trainer.server import add_to_server, create_manager

    manager = create_manager(artifact_store, tmp_path / "trainer")
    try:
        with running_service(functools.partial(add_to_server, manager=manager)) as address, channel(address) as ch:
            yield trainer_pb2_grpc.TrainerServiceStub(ch)
    finally:
        manager.shutdown(stop_workers=True)


def start_job_error(stub: trainer_pb2_grpc.TrainerServiceStub, request: trainer_pb2.StartJobRequest) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as error:
        stub.StartJob(request, timeout=30)
    return error.value


def test_trainer_refuses_random_bytes_and_a_nan_cutoff(trainer, artifact_store: ArtifactStore, tmp_path) -> None:
    noise = tmp_path / "noise.extxyz"
    noise.write_bytes(np.random.default_rng(0).integers(0, 256, 4096, dtype=np.uint8).tobytes())
    noise_ref = artifact_store.put_file(noise, "structures")
    error = start_job_error(
        trainer, trainer_pb2.StartJobRequest(ace_fit=trainer_pb2.AceFitSpec(train_data=[noise_ref]))
    )
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "ace_fit.train_data[0]: not an extxyz structure file" in error.details()

    shard = tmp_path / "shard.extxyz"
    write(shard, [water()], format="extxyz")
    shard_ref = artifact_store.put_file(shard, "structures")
    spec = trainer_pb2.AceFitSpec(train_data=[shard_ref], cutoff=math.nan)
    error = start_job_error(trainer, trainer_pb2.StartJobRequest(ace_fit=spec))
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "ace_fit.cutoff must be a finite number, got nan" in error.details()

    model = trainer_pb2.MaceFinetuneSpec(foundation_model=noise_ref, train_data=[shard_ref])
    error = start_job_error(trainer, trainer_pb2.StartJobRequest(mace_finetune=model))
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "mace_finetune.foundation_model: not a PyTorch model file" in error.details()


# -- orchestrator -------------------------------------------------------------------------------------------------


@pytest.fixture
def orchestrator(artifact_store: ArtifactStore) -> Iterator[orchestrator_pb2_grpc.OrchestratorServiceStub]:
    runs = RunManager(artifact_store, "127.0.0.1:1", "127.0.0.1:1", "127.0.0.1:1")
    try:
        with running_service(lambda server: add_orchestrator(server, runs)) as address, channel(address) as ch:
            yield orchestrator_pb2_grpc.OrchestratorServiceStub(ch)
    finally:
        runs.shutdown()


@pytest.mark.parametrize(
    ("config", "seeds", "run_dir", "expected"),
    [
        ("not json", "good", "/tmp/x", "config: not valid JSON (JSONDecodeError)"),
        ("valid", "good", "/dev/null", "run_dir '/dev/null' exists and is not a directory"),
        ("valid", "good", "/tmp/a\x00b", "run_dir must be an absolute path, got '/tmp/a\\x00b'"),
        ("valid", "Z=119", "/tmp/x", "seeds[0]: atomic_numbers: 119 is not an element"),
    ],
)
def test_start_run_refuses_bad_input_naming_it(
    orchestrator, tmp_path: Path, config: str, seeds: str, run_dir: str, expected: str
) -> None:
    from pyacemaker.config import load_config

    config_file = tmp_path / "config.yaml"
    write(tmp_path / "seed.xyz", [water()], format="extxyz")
    config_file.write_text("name: t\nsystem:\n  seeds: [seed.xyz]\noracle:\n  backend: lj\n")
    config_json = load_config(config_file).model_dump_json() if config == "valid" else config
    seed = raw([119, 1], [0, 0, 0, 0, 0, 1.0]) if seeds == "Z=119" else atoms_to_structure(water())
    request = orchestrator_pb2.StartRunRequest(config_json=config_json, seeds=[seed], run_dir=run_dir)
    with pytest.raises(grpc.RpcError) as error:
        orchestrator.StartRun(request, timeout=30)
    assert error.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert expected in error.value.details()
