"""Step 5 through a real oracle (mace backend, a committee of two): shards hold mace's own committee labels,
a restarted step resumes after the last complete shard without relabelling it and ends with the same shards
as an uninterrupted run, an altered shard is found and relabelled, another key reuses nothing; spread over two
real oracle instances the shards are the same bytes, and an instance that fails drops out without failing the
step."""

from __future__ import annotations

import contextlib
import json
import socket
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import numpy as np
import pytest
from ase.build import molecule

from pyacemaker.artifacts import ArtifactStore
from pyacemaker.config import SurrogateLabellingConfig, load_config
from pyacemaker.services.oracle.server import OracleService
from pyacemaker.services.orchestrator.steps import RunCancelledError, StepContext, StepOutcome, step_key
from pyacemaker.services.orchestrator.steps.surrogate_labelling import SurrogateLabellingStep, shard_name, verify_shard
from pyacemaker.structures import CHARGE_KEY, SPIN_KEY, content_id, read_structures, write_extxyz
from pyacemaker.v1 import common_pb2, oracle_pb2, oracle_pb2_grpc
from tests.conftest import SN2_DIR, running_service
from tests.integration.test_mace_oracle import (  # noqa: F401  (committee_paths is a fixture)
    TOLERANCE,
    committee_paths,
    mace_calculator,
    periodic_frame,
    sn2_frames,
)

SHARD = 8
N_FRAMES = 36  # five shards, the last one short
STEP = SurrogateLabellingStep()


class CountingOracle(OracleService):
    """The real oracle servicer, counting the structures it is asked to label."""

    def __init__(self, store: ArtifactStore) -> None:
        super().__init__(store=store)
        self.labelled = 0

    def Label(self, request_iterator, context):  # type: ignore[no-untyped-def]
        def counted() -> Iterator[oracle_pb2.LabelRequest]:
            for request in request_iterator:
                self.labelled += len(request.structures)
                yield request

        yield from super().Label(counted(), context)


@pytest.fixture(scope="module")
def shared_store(tmp_path_factory: pytest.TempPathFactory) -> ArtifactStore:
    """The store the oracle and the step share (the oracle loads the committee from it)."""
    return ArtifactStore(tmp_path_factory.mktemp("store"))


@contextlib.contextmanager
def counting_oracle(store: ArtifactStore) -> Iterator[tuple[str, CountingOracle]]:
    """A real oracle server on a loopback port, serving from `store`."""
    servicer = CountingOracle(store)

    def register(server: grpc.Server) -> list[str]:
        oracle_pb2_grpc.add_OracleServiceServicer_to_server(servicer, server)
        return []

    with running_service(register) as address:
        yield address, servicer


@pytest.fixture(scope="module")
def oracle(shared_store: ArtifactStore) -> Iterator[tuple[str, CountingOracle]]:
    with counting_oracle(shared_store) as served:
        yield served


@dataclass
class Inputs:
    store: ArtifactStore
    frames: common_pb2.ArtifactRef
    committee: list[common_pb2.ArtifactRef]


@pytest.fixture
def inputs(tmp_path: Path, committee_paths: list[str], shared_store: ArtifactStore) -> Inputs:  # noqa: F811
    store = shared_store
    frames_file = tmp_path / "surrogate.extxyz"
    frames = sn2_frames(N_FRAMES)
    for step, atoms in enumerate(frames):
        atoms.info["md_step"] = step  # an MD frame's own info must survive labelling
    write_extxyz(frames_file, frames)
    return Inputs(
        store,
        store.put_file(frames_file, kind="structures"),
        [store.put_file(p, kind="model") for p in committee_paths],
    )


def context(
    inputs: Inputs,
    address: str,
    run_dir: Path,
    report: Callable[[common_pb2.Progress], None] = lambda _progress: None,
    frames: common_pb2.ArtifactRef | None = None,
) -> StepContext:
    config = load_config(SN2_DIR / "config.yaml").model_copy(
        update={"surrogate_labelling": SurrogateLabellingConfig(shard_size=SHARD, batch_size=3)}
    )
    ctx = StepContext(
        config=config,
        store=inputs.store,
        run_dir=run_dir,
        seeds=[],
        sampler_address="",
        oracle_address=address,
        trainer_address="",
        report=report,
        previous={
            "surrogate_md": {"frames": frames or inputs.frames},
            "mace_finetune": {f"model_{i}": ref for i, ref in enumerate(inputs.committee)},
        },
        call_timeout_s=120,
    )
    ctx.key = step_key(STEP, ctx)
    return ctx


def cancel_after(shards: int, work_parent: Path) -> Callable[[common_pb2.Progress], None]:
    """A report callback that cancels the run once `shards` shards are complete (as a cancelled run does)."""

    def report(_progress: common_pb2.Progress) -> None:
        if len(list(work_parent.glob("*/shard_*.json"))) >= shards:
            raise RunCancelledError()

    return report


def shard_refs(outcome: StepOutcome) -> dict[str, str]:
    return {name: ref.sha256 for name, ref in outcome.outputs.items()}


def test_shards_hold_the_committee_labels_of_mace_calculator(
    oracle: tuple[str, CountingOracle],
    inputs: Inputs,
    committee_paths: list[str],  # noqa: F811
    tmp_path: Path,
) -> None:
    water = molecule("H2O")  # oxygen is not in the model: this frame fails and is left out
    water.info.update({CHARGE_KEY: 0, SPIN_KEY: 1})
    frames = [*sn2_frames(10, seed=3), periodic_frame(), water, *sn2_frames(2, seed=4)]
    frames_file = tmp_path / "mixed.extxyz"
    write_extxyz(frames_file, frames)
    ctx = context(inputs, oracle[0], tmp_path / "run", frames=inputs.store.put_file(frames_file, kind="structures"))

    outcome = STEP.run(ctx)

    assert sorted(outcome.outputs) == ["shard_0000", "shard_0001", "summary"]
    assert sorted(outcome.exports) == [
        "step5_surrogate_labels/shard_0000.extxyz",
        "step5_surrogate_labels/shard_0001.extxyz",
        "step5_surrogate_labels/summary.json",
    ]
    labelled = [
        a for name in ("shard_0000", "shard_0001") for a in read_structures(inputs.store.path(outcome.outputs[name]))
    ]
    expected_frames = [a for a in frames if a is not water]
    assert [content_id(a) for a in labelled] == [content_id(a) for a in expected_frames]
    summary = json.loads(inputs.store.path(outcome.outputs["summary"]).read_text())
    assert (summary["n_frames"], summary["n_labelled"], summary["n_failed"]) == (14, 13, 1)
    assert summary["failed_frames"][0]["frame"] == 11 and "O is not supported" in summary["failed_frames"][0]["reason"]
    assert [s["n_labelled"] for s in summary["shards"]] == [8, 5]
    assert not (tmp_path / "run" / ".work" / STEP.name).exists() or not any(
        (tmp_path / "run" / ".work" / STEP.name).iterdir()
    )

    calc = mace_calculator(committee_paths)
    for index in (0, 7, 10, 12):  # both shards, the periodic frame (stress), a frame after the failed one
        atoms, reference = labelled[index], expected_frames[index].copy()
        reference.calc = calc
        reference.get_potential_energy()
        expected = calc.results
        assert atoms.get_potential_energy() == pytest.approx(expected["energy"], abs=TOLERANCE)
        np.testing.assert_allclose(atoms.get_forces(), expected["forces"], atol=TOLERANCE)
        assert atoms.info["energy_std"] == pytest.approx(np.sqrt(expected["energy_var"]), abs=TOLERANCE)
        np.testing.assert_allclose(
            atoms.arrays["force_std"], np.sqrt(expected["forces_var"].sum(axis=1)), atol=TOLERANCE
        )
        assert atoms.info["max_force_std"] > 1e-4  # the two members differ
        if reference.pbc.any():
            np.testing.assert_allclose(atoms.get_stress(), expected["stress"], atol=TOLERANCE)
        else:
            assert "stress" not in atoms.calc.results
        assert atoms.info["level_of_theory"].startswith("mace:") and "wall_time_s" not in atoms.info
    assert labelled[0].info["charge"] == -1 and labelled[10].info["charge"] == 0


def test_a_restarted_step_resumes_after_the_last_complete_shard(
    oracle: tuple[str, CountingOracle], inputs: Inputs, tmp_path: Path
) -> None:
    address, servicer = oracle
    reference = STEP.run(context(inputs, address, tmp_path / "uninterrupted"))
    assert sorted(reference.outputs) == [shard_name(i) for i in range(5)] + ["summary"]
    frames = [a for i in range(5) for a in read_structures(inputs.store.path(reference.outputs[shard_name(i)]))]
    assert [a.info["md_step"] for a in frames] == list(range(N_FRAMES))

    run_dir = tmp_path / "run"
    work_parent = run_dir / ".work" / STEP.name
    with pytest.raises(RunCancelledError):
        STEP.run(context(inputs, address, run_dir, report=cancel_after(2, work_parent)))
    (work_dir,) = work_parent.iterdir()
    assert sorted(p.name for p in work_dir.glob("shard_*.json")) == ["shard_0000.json", "shard_0001.json"]
    written = {p.name: p.stat().st_mtime_ns for p in work_dir.glob("shard_000[01].extxyz")}

    servicer.labelled = 0
    resumed_ctx = context(inputs, address, run_dir, report=cancel_after(5, work_parent))
    assert resumed_ctx.key == context(inputs, address, run_dir).key
    with pytest.raises(RunCancelledError):  # stop again before the end, to look at the work dir
        STEP.run(resumed_ctx)
    assert servicer.labelled == N_FRAMES - 2 * SHARD  # shards 0 and 1 were not labelled again
    assert {p.name: p.stat().st_mtime_ns for p in work_dir.glob("shard_000[01].extxyz")} == written
    servicer.labelled = 0
    resumed = STEP.run(context(inputs, address, run_dir))
    assert servicer.labelled == 0  # all five shards were complete: nothing relabelled
    assert resumed.metrics["n_shards_reused"] == 5
    assert shard_refs(resumed) == shard_refs(reference)  # same bytes: energies, forces, spreads, order


def test_an_altered_shard_is_relabelled_and_another_key_reuses_nothing(
    oracle: tuple[str, CountingOracle], inputs: Inputs, tmp_path: Path
) -> None:
    address, servicer = oracle
    reference = STEP.run(context(inputs, address, tmp_path / "uninterrupted"))
    run_dir = tmp_path / "run"
    work_parent = run_dir / ".work" / STEP.name
    with pytest.raises(RunCancelledError):
        STEP.run(context(inputs, address, run_dir, report=cancel_after(3, work_parent)))
    (work_dir,) = work_parent.iterdir()
    shard = work_dir / "shard_0001.extxyz"
    text = shard.read_text()
    energy = text.split("energy=")[1].split()[0]
    shard.write_text(text.replace(f"energy={energy}", f"energy={float(energy) + 0.5:.8f}", 1))

    first_ids = [content_id(a) for a in read_structures(inputs.store.path(inputs.frames))][SHARD : 2 * SHARD]
    record, problem = verify_shard(work_dir, 1, SHARD, first_ids)
    assert record is None and "altered" in problem
    record, problem = verify_shard(work_dir, 2, 2 * SHARD, first_ids)  # shard 2 does not hold these frames
    assert record is None and "frame 0" in problem
    assert verify_shard(work_dir, 0, 0, first_ids)[0] is None  # nor does shard 0

    servicer.labelled = 0
    progress: list[str] = []
    resumed = STEP.run(context(inputs, address, run_dir, report=lambda p: progress.append(p.message)))
    # Shards 0 and 2 reused; 1 (altered) relabelled, and 3 and 4, which were never done.
    assert servicer.labelled == SHARD + N_FRAMES - 3 * SHARD
    assert resumed.metrics["n_shards_reused"] == 2
    assert any("relabelling shard_0001" in m and "altered" in m for m in progress)
    assert shard_refs(resumed) == shard_refs(reference)

    # A different key (here: other settings) never reuses another key's shards, and removes them.
    with pytest.raises(RunCancelledError):
        STEP.run(context(inputs, address, run_dir, report=cancel_after(2, work_parent)))
    other = context(inputs, address, run_dir)
    other.key = "0" * 64
    servicer.labelled = 0
    STEP.run(other)
    assert servicer.labelled == N_FRAMES
    assert not work_parent.exists() or not any(work_parent.iterdir())


def test_two_oracle_instances_share_the_shards_and_give_the_same_bytes(
    oracle: tuple[str, CountingOracle], inputs: Inputs, shared_store: ArtifactStore, tmp_path: Path
) -> None:
    address, servicer = oracle
    reference = STEP.run(context(inputs, address, tmp_path / "one"))
    servicer.labelled = 0
    progress: list[str] = []
    with counting_oracle(shared_store) as (second_address, second):
        ctx = context(inputs, address, tmp_path / "two", report=lambda p: progress.append(p.message))
        ctx.labelling_oracle_addresses = (second_address, address)  # the run's oracle listed again: used once
        spread = STEP.run(ctx)
    assert servicer.labelled + second.labelled == N_FRAMES  # every frame labelled once
    assert servicer.labelled > 0 and second.labelled > 0, (servicer.labelled, second.labelled)
    assert shard_refs(spread) == shard_refs(reference)
    written_by = [m.rsplit(" by oracle ", 1)[1] for m in progress if " written by oracle " in m]
    assert sorted(set(written_by)) == sorted({address, second_address}) and len(written_by) == 5


def _unused_address() -> str:
    """A loopback port where nothing listens: an oracle instance that is down."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return f"127.0.0.1:{sock.getsockname()[1]}"


def test_an_instance_that_fails_drops_out_and_the_others_finish(
    oracle: tuple[str, CountingOracle], inputs: Inputs, tmp_path: Path
) -> None:
    address, servicer = oracle
    reference = STEP.run(context(inputs, address, tmp_path / "one"))
    down = _unused_address()
    servicer.labelled = 0
    progress: list[str] = []
    ctx = context(inputs, address, tmp_path / "run", report=lambda p: progress.append(p.message))
    ctx.labelling_oracle_addresses = (down,)
    outcome = STEP.run(ctx)
    assert servicer.labelled == N_FRAMES
    assert shard_refs(outcome) == shard_refs(reference)
    assert any(m.startswith(f"oracle {down} failed on shard_") and "drops out" in m for m in progress), progress

    # When every instance fails, the step fails with the first failure and keeps nothing half-done.
    ctx = context(inputs, down, tmp_path / "none")
    with pytest.raises(grpc.RpcError) as failure:
        STEP.run(ctx)
    assert failure.value.code() == grpc.StatusCode.UNAVAILABLE
    assert not list((tmp_path / "none").glob(".work/*/*/shard_*.json"))


def test_missing_inputs_name_the_step(oracle: tuple[str, CountingOracle], inputs: Inputs, tmp_path: Path) -> None:
    ctx = context(inputs, oracle[0], tmp_path / "run")
    del ctx.previous["mace_finetune"]
    with pytest.raises(RuntimeError, match="mace_finetune"):
        STEP.run(ctx)
    empty = tmp_path / "empty.extxyz"
    empty.write_text("")
    ctx = context(inputs, oracle[0], tmp_path / "run", frames=inputs.store.put_file(empty, kind="structures"))
    with pytest.raises(ValueError, match="no frames"):
        STEP.run(ctx)
