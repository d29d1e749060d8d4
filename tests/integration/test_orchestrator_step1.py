"""Step 1 through real gRPC services: orchestrator → sampler (pool + DIRECT), oracle preflight.

Checks exactly-N selection, that a repeated run skips the step, and that a deleted or edited output makes it
run again.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Iterator
from contextlib import ExitStack
from pathlib import Path

import grpc
import numpy as np
import pytest
import yaml

from pyacemaker.config import config_to_json, load_config
from pyacemaker.rpc import channel
from pyacemaker.seeds import load_seeds
from pyacemaker.services.oracle.server import add_to_server as add_oracle
from pyacemaker.services.orchestrator.runner import RunManager
from pyacemaker.services.orchestrator.server import add_to_server as add_orchestrator
from pyacemaker.services.orchestrator.steps.direct_sampling import TEACHER_FORCE_MARGIN
from pyacemaker.services.sampler.server import add_to_server as add_sampler
from pyacemaker.structures import atoms_to_structure, read_structures
from pyacemaker.v1 import common_pb2, orchestrator_pb2, orchestrator_pb2_grpc
from tests.conftest import SN2_DIR, running_service

N_SELECT = 12
_K = orchestrator_pb2


@pytest.fixture
def orchestrator(artifact_store) -> Iterator[orchestrator_pb2_grpc.OrchestratorServiceStub]:
    with ExitStack() as stack:
        oracle = stack.enter_context(running_service(lambda s: add_oracle(s, store=artifact_store)))
        sampler = stack.enter_context(running_service(lambda s: add_sampler(s, artifact_store)))
        runs = RunManager(artifact_store, sampler, oracle)
        stack.callback(runs.shutdown)
        address = stack.enter_context(running_service(lambda s: add_orchestrator(s, runs)))
        ch = stack.enter_context(channel(address))
        yield orchestrator_pb2_grpc.OrchestratorServiceStub(ch)


def _config_file(tmp_path: Path, n_select: int = N_SELECT) -> Path:
    shutil.copytree(SN2_DIR / "seeds", tmp_path / "seeds", dirs_exist_ok=True)
    data = yaml.safe_load((SN2_DIR / "config_quick.yaml").read_text())
    data["sampling"]["pool"].update(rattles_per_amplitude=5, interpolation_images=8, fragment_rotations_per_seed=5)
    data["sampling"]["direct"]["n_select"] = n_select
    data["stop_after"] = "direct_sampling"
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def _run(stub, config_path: Path) -> tuple[orchestrator_pb2.Run, list[orchestrator_pb2.RunEvent]]:
    config = load_config(config_path)
    request = orchestrator_pb2.StartRunRequest(
        config_json=config_to_json(config),
        seeds=[atoms_to_structure(a) for a in load_seeds(config)],
        run_dir=str(config.run_dir),
    )
    run = stub.StartRun(request, timeout=30).run
    events, last = [], run
    for response in stub.WatchRun(
        orchestrator_pb2.WatchRunRequest(run_id=run.run_id, after_seq=run.first_seq), timeout=300
    ):
        events.append(response.event)
        last = response.run
    return last, events


def _kinds(events, step="direct_sampling"):
    return [e.kind for e in events if e.step == step]


def test_step1_selects_exactly_n_then_skips_then_redoes(orchestrator, tmp_path):
    config_path = _config_file(tmp_path)
    run, events = _run(orchestrator, config_path)
    assert run.state == common_pb2.JOB_STATE_SUCCEEDED, run.error
    direct = tmp_path / "runs" / "sn2-quick" / "step1_direct" / "direct.extxyz"
    selected = read_structures(direct)
    assert len(selected) == N_SELECT
    assert all(a.info["charge"] == -1 and len(a) == 6 for a in selected)
    summary = json.loads(direct.with_name("selection.json").read_text())
    assert 0 < summary["coverage"] <= 1 and summary["n_selected"] == N_SELECT
    pool = read_structures(direct.with_name("pool.extxyz"))
    assert len(pool) == summary["n_pool"] > N_SELECT
    assert _K.RUN_EVENT_KIND_STEP_PROGRESS in _kinds(events)
    assert _kinds(events)[-1] == _K.RUN_EVENT_KIND_STEP_COMPLETED
    assert [e.seq for e in events] == sorted({e.seq for e in events})  # each event once, in order

    # Same config again: the step is skipped and its files are untouched.
    before = direct.stat().st_mtime_ns
    run, events = _run(orchestrator, config_path)
    assert run.state == common_pb2.JOB_STATE_SUCCEEDED
    assert _K.RUN_EVENT_KIND_STEP_SKIPPED in _kinds(events)
    assert _K.RUN_EVENT_KIND_STEP_STARTED not in _kinds(events)
    assert direct.stat().st_mtime_ns == before

    # Deleted output: redone, and the file is back.
    direct.unlink()
    run, events = _run(orchestrator, config_path)
    assert _K.RUN_EVENT_KIND_STEP_STARTED in _kinds(events)
    assert any("was deleted" in e.message for e in events)
    assert len(read_structures(direct)) == N_SELECT

    # Edited output: redone, and the edit is replaced by the real selection.
    direct.write_text(direct.read_text().replace("-1", "-2", 1))
    run, events = _run(orchestrator, config_path)
    assert any("was altered" in e.message for e in events)
    assert _K.RUN_EVENT_KIND_STEP_COMPLETED in _kinds(events)
    assert len(read_structures(direct)) == N_SELECT

    # A changed step config changes the key: redone with the new N.
    run, events = _run(orchestrator, _config_file(tmp_path, n_select=N_SELECT + 3))
    assert _K.RUN_EVENT_KIND_STEP_STARTED in _kinds(events)
    assert len(read_structures(direct)) == N_SELECT + 3


def test_the_pool_is_rid_of_structures_the_teacher_calls_unphysical_before_direct(orchestrator, tmp_path):
    from mace.calculators import MACECalculator

    from pyacemaker.teacher import resolve_teacher

    path = _config_file(tmp_path)
    data = yaml.safe_load(path.read_text())
    cap = 4.0  # eV/Å: low enough that some of the quick pool's rattles and rotations exceed it
    data["active_learning"]["max_candidate_force"] = cap
    data["sampling"]["pool"].pop("rattle_amplitudes")  # thermal ones from md.temperatures [300, 600] K
    path.write_text(yaml.safe_dump(data))
    run, _ = _run(orchestrator, path)
    assert run.state == common_pb2.JOB_STATE_SUCCEEDED, run.error
    step1 = tmp_path / "runs" / "sn2-quick" / "step1_direct"
    summary = json.loads((step1 / "selection.json").read_text())
    # sqrt(k_B T / 10 eV/Å²) at 300, 600 and 1.25 × 600 K.
    assert summary["rattle_amplitudes_a"] == pytest.approx([0.0508, 0.0719, 0.0804], abs=1e-4)
    pool = read_structures(step1 / "pool.extxyz")
    assert summary["n_rejected_teacher_force"] > 0 and len(pool) == summary["n_pool"]
    # The teacher, evaluated here directly, puts every remaining structure below its share of the cap.
    teacher = MACECalculator(model_paths=[str(resolve_teacher("bundled"))], device="cpu", default_dtype="float64")
    for atoms in pool:
        atoms.calc = teacher
        assert np.linalg.norm(atoms.get_forces(), axis=1).max() <= TEACHER_FORCE_MARGIN * cap + 1e-6


def test_invalid_config_is_refused_with_the_key(orchestrator, tmp_path):
    config = load_config(_config_file(tmp_path))
    data = json.loads(config_to_json(config))
    data["sampling"]["direct"]["k_per_cluster"] = 0
    request = orchestrator_pb2.StartRunRequest(
        config_json=json.dumps(data),
        seeds=[atoms_to_structure(a) for a in load_seeds(config)],
        run_dir=str(config.run_dir),
    )
    with pytest.raises(grpc.RpcError) as info:
        orchestrator.StartRun(request, timeout=30)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "sampling.direct.k_per_cluster" in info.value.details()


def test_n_select_larger_than_the_pool_fails_the_run_with_a_clear_reason(orchestrator, tmp_path):
    run, _ = _run(orchestrator, _config_file(tmp_path, n_select=100000))
    assert run.state == common_pb2.JOB_STATE_FAILED
    assert "sampling.direct.n_select" in run.error
