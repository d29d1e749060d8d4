"""The local executor behind a real oracle server: subprocess workers, per-task timeout, kept dirs of failed
calculations, re-attachment, and resubmission of a worker killed from outside. Real xTB calculations."""

from __future__ import annotations

import functools
import os
import signal
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest
from ase import Atoms
from ase.build import molecule

from pyacemaker.clients.oracle import backend_spec
from pyacemaker.labels import Labels, labels_from_proto
from pyacemaker.rpc import channel
from pyacemaker.services.oracle.gateway import JOB_TABLE_FILE
from pyacemaker.services.oracle.jobs import JobTable
from pyacemaker.services.oracle.server import add_to_server
from pyacemaker.services.oracle.task import PID_FILE, STRUCTURE_FILE, TASK_FILE
from pyacemaker.structures import atoms_to_structure, content_id
from pyacemaker.v1 import common_pb2, oracle_pb2, oracle_pb2_grpc
from tests.conftest import running_service, sn2_seeds

pytest.importorskip("tblite.ase", reason="tblite is not installed (pyacemaker[oracle])")

XTB_LEVEL = "xtb:GFN2-xTB"
STREAM_TIMEOUT_S = 120.0


def sn2_frames(seeds: Sequence[int]) -> list[Atoms]:
    """Rattled Cl⁻ ··· CH3Cl complexes (charge −1, singlet)."""
    frames = []
    for seed in seeds:
        atoms = sn2_seeds()[0]
        atoms.rattle(0.05, seed=seed)
        frames.append(atoms)
    return frames


def water_cluster(n: int = 5) -> Atoms:
    """n³ water molecules 3 Å apart: with n = 5 (375 atoms) an xTB calculation of about 100 s here."""
    cluster = Atoms()
    for i in range(n):
        for j in range(n):
            for k in range(n):
                water = molecule("H2O")
                water.translate([3.0 * i, 3.0 * j, 3.0 * k])
                cluster += water
    cluster.info["charge"] = 0
    return cluster


def tblite_reference(atoms: Atoms) -> tuple[float, np.ndarray]:
    from tblite.ase import TBLite

    reference = atoms.copy()
    reference.calc = TBLite(method="GFN2-xTB", charge=int(atoms.info.get("charge", 0)), multiplicity=1, verbosity=0)
    return reference.get_potential_energy(), reference.get_forces()


def assert_labels_equal_tblite(labels: common_pb2.Labels | Labels, atoms: Atoms) -> None:
    """`labels` as a raw Label stream sends them (the message) or as the clients hand them out (the value)."""
    if isinstance(labels, common_pb2.Labels):
        labels = labels_from_proto(labels, len(atoms))
    assert labels.ok, labels.reason
    energy, forces = tblite_reference(atoms)
    assert labels.energy == pytest.approx(energy, abs=1e-6)
    np.testing.assert_allclose(labels.required_forces(), forces, atol=1e-6)


def requests(spec: oracle_pb2.BackendSpec, batches: Sequence[Sequence[Atoms]]) -> Iterator[oracle_pb2.LabelRequest]:
    for number, frames in enumerate(batches):
        structures = [atoms_to_structure(atoms) for atoms in frames]
        yield oracle_pb2.LabelRequest(backend=spec if number == 0 else None, structures=structures)


def open_stream(address: str, spec: oracle_pb2.BackendSpec, batches: Sequence[Sequence[Atoms]]) -> Any:
    """A Label call; iterate it for LabelResponses, `.cancel()` it to drop the stream like a killed client."""
    stub = oracle_pb2_grpc.OracleServiceStub(grpc.insecure_channel(address))
    return stub.Label(requests(spec, batches), timeout=STREAM_TIMEOUT_S)


def collect(responses: Any) -> tuple[list[oracle_pb2.Submission], dict[int, common_pb2.Labels]]:
    """Every Submission and every result of a stream, checking that a job is announced before its results."""
    submissions: list[oracle_pb2.Submission] = []
    results: dict[int, common_pb2.Labels] = {}
    for response in responses:
        submissions.extend(response.submissions)
        for result in response.results:
            announced = {index for submission in submissions for index in submission.indices}
            refused = result.labels.reason.startswith("invalid structure: ")  # never submitted
            assert result.index in announced or refused, f"result {result.index} arrived before its Submission"
            assert result.index not in results, f"result {result.index} arrived twice"
            results[result.index] = result.labels
    return submissions, results


def xtb_spec(**options: Any) -> oracle_pb2.BackendSpec:
    executor = {"kind": "local", "max_workers": 2, "timeout_s": 60.0, **options.pop("executor", {})}
    return backend_spec("xtb", {"executor": executor, **options})


@pytest.fixture
def oracle(tmp_path: Path) -> Iterator[tuple[str, Path]]:
    work_dir = tmp_path / "oracle"
    with running_service(functools.partial(add_to_server, work_dir=work_dir)) as address:
        yield address, work_dir


def test_subprocess_workers_label_like_tblite_and_a_second_stream_re_attaches(oracle) -> None:
    address, work_dir = oracle
    frames = sn2_frames(range(4))
    submissions, results = collect(open_stream(address, xtb_spec(), [frames]))

    (submission,) = submissions
    assert (submission.scheduler, submission.reattached) == ("local", False)
    assert list(submission.indices) == [0, 1, 2, 3], "one request batch is one job"
    assert list(submission.content_ids) == [content_id(atoms) for atoms in frames]
    for index, atoms in enumerate(frames):
        assert_labels_equal_tblite(results[index], atoms)
        assert results[index].attempts == 1 and results[index].level_of_theory == XTB_LEVEL
    assert not any((work_dir / "tasks").rglob(TASK_FILE)), "successful calculation dirs are removed"

    again, repeated = collect(open_stream(address, xtb_spec(), [frames[2:], frames[:2]]))
    assert [(s.job_id, s.reattached) for s in again] == [(submission.job_id, True)] * len(again)
    assert sorted(index for s in again for index in s.indices) == [0, 1, 2, 3]
    assert {index: labels.energy for index, labels in repeated.items()} == {
        0: results[2].energy,
        1: results[3].energy,
        2: results[0].energy,
        3: results[1].energy,
    }
    assert JobTable(work_dir / JOB_TABLE_FILE).job_ids() == [submission.job_id], "nothing was computed twice"


def test_a_timeout_and_a_failed_calculation_are_labelled_and_their_dirs_kept(oracle) -> None:
    address, work_dir = oracle
    slow = water_cluster()
    (good,) = sn2_frames([7])
    impossible = good.copy()
    impossible.info["spin_multiplicity"] = 2  # 44 electrons cannot make a doublet
    # The timeout is per task and includes the worker's start (a fresh Python importing ASE and tblite): 10 s leaves
    # the good frame room on a loaded machine (two test workers on two cores) and stops the ~100 s one early.
    spec = xtb_spec(executor={"timeout_s": 10.0})
    start = time.monotonic()
    _, results = collect(open_stream(address, spec, [[slow, good, impossible]]))
    elapsed = time.monotonic() - start

    assert results[0].status == common_pb2.LABEL_STATUS_FAILED
    assert results[0].reason == "timed out after 10 s, without a result"
    assert_labels_equal_tblite(results[1], good)
    assert results[2].status == common_pb2.LABEL_STATUS_FAILED
    # Refused by the structure check before any task is written (pyacemaker.structure_checks).
    assert "invalid structure: spin_multiplicity 2 is impossible with 44 electrons" in results[2].reason
    assert elapsed < 40, f"the slow calculation was not stopped at its timeout ({elapsed:.0f} s)"

    table = JobTable(work_dir / JOB_TABLE_FILE)
    record = table.get((content_id(slow), XTB_LEVEL))
    assert record is not None and record.task_dir.is_dir(), "a failed calculation's dir is kept"
    assert (record.task_dir / STRUCTURE_FILE).is_file() and (record.task_dir / "task.log").is_file()
    assert table.get((content_id(impossible), XTB_LEVEL)) is None
    good_record = table.get((content_id(good), XTB_LEVEL))
    assert good_record is not None and not good_record.task_dir.exists()


def test_a_worker_killed_from_outside_is_resubmitted_once_then_failed(oracle) -> None:
    address, work_dir = oracle
    slow = water_cluster()
    table = JobTable(work_dir / JOB_TABLE_FILE)
    spec = xtb_spec(retries={"max_retries": 0, "resubmit_lost_tasks": 1})
    submissions: list[oracle_pb2.Submission] = []
    results: dict[int, common_pb2.Labels] = {}
    killed: set[int] = set()
    for response in open_stream(address, spec, [[slow]]):
        for submission in response.submissions:
            submissions.append(submission)
            record = table.get((content_id(slow), XTB_LEVEL))
            assert record is not None
            # The resubmission reuses the task dir: wait for the new worker's pid, not the killed one's.
            pid = wait_for_worker(record.task_dir, exclude=killed)
            os.kill(pid, signal.SIGKILL)  # the node "dies" under the calculation
            killed.add(pid)
        results.update((result.index, result.labels) for result in response.results)

    assert [s.reattached for s in submissions] == [False, False]
    assert len({s.job_id for s in submissions}) == 2, "the lost task went out again as a new job"
    assert results[0].status == common_pb2.LABEL_STATUS_FAILED
    assert "killed by signal 9" in results[0].reason and "(submitted 2 times)" in results[0].reason
    assert results[0].attempts == 2


def wait_for_worker(task_dir: Path, timeout: float = 30.0, exclude: set[int] | None = None) -> int:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            pid = int((task_dir / PID_FILE).read_text())
            if pid not in (exclude or set()):
                return pid
        except (OSError, ValueError):
            pass
        time.sleep(0.05)
    raise AssertionError(f"no worker started in {task_dir} within {timeout:.0f} s")


def test_an_oracle_without_a_work_dir_still_runs_executor_backends() -> None:
    (atoms,) = sn2_frames([9])
    with running_service(add_to_server) as address, channel(address) as ch:
        stub = oracle_pb2_grpc.OracleServiceStub(ch)
        request = oracle_pb2.LabelRequest(backend=xtb_spec(), structures=[atoms_to_structure(atoms)])
        submissions, results = collect(stub.Label(iter([request]), timeout=STREAM_TIMEOUT_S))
    assert len(submissions) == 1
    assert_labels_equal_tblite(results[0], atoms)


def test_tasks_are_forked_from_the_warm_process_and_killed_alone(tmp_path: Path) -> None:
    """The zygote forks each task into a process of its own (its parent is the zygote, its session its own),
    reports how it ended, and a task killed from outside takes nothing else down."""
    import subprocess
    import sys

    from pyacemaker.services.oracle.task import RESULT_FILE, write_task

    zygote = subprocess.Popen(
        [sys.executable, "-m", "pyacemaker.services.oracle.zygote"], stdin=subprocess.PIPE, stdout=subprocess.PIPE
    )
    assert zygote.stdin is not None and zygote.stdout is not None
    try:
        slow, quick = tmp_path / "slow", tmp_path / "quick"
        write_task(slow, atoms_to_structure(water_cluster(3)), "xtb", {}, 0)
        write_task(quick, atoms_to_structure(sn2_frames([1])[0]), "xtb", {}, 0)
        for task_dir in (slow, quick):
            zygote.stdin.write(f"{task_dir}\t{task_dir / 'task.log'}\n".encode())
        zygote.stdin.flush()
        pids = [int(zygote.stdout.readline().split()[1]) for _ in range(2)]
        deadline = time.monotonic() + 10
        while True:  # the child makes its session first thing; poll until it has
            stat = Path(f"/proc/{pids[0]}/stat").read_text().rsplit(")", 1)[-1].split()
            if int(stat[3]) == pids[0] or time.monotonic() > deadline:
                break
            time.sleep(0.01)
        assert int(stat[1]) == zygote.pid  # forked by the zygote
        assert int(stat[3]) == pids[0]  # the leader of its own session
        os.kill(pids[0], signal.SIGKILL)
        ends = dict(zygote.stdout.readline().decode().split()[1:] for _ in range(2))
        assert ends == {str(pids[0]): "-9", str(pids[1]): "0"}
        assert not (slow / RESULT_FILE).exists()
        assert_labels_equal_tblite(read_result_labels(quick), sn2_frames([1])[0])
        assert "ok after 1 attempt" in (quick / "task.log").read_text()
    finally:
        zygote.stdin.close()
        assert zygote.wait(timeout=10) == 0  # it ends when its stdin closes


def read_result_labels(task_dir: Path) -> common_pb2.Labels:
    from pyacemaker.services.oracle.task import read_result

    labels = read_result(task_dir)
    assert labels is not None
    return labels


def test_tasks_run_on_when_the_warm_process_dies_or_cannot_start(tmp_path: Path, monkeypatch) -> None:
    from pyacemaker.config import LocalExecutorConfig
    from pyacemaker.executors import local
    from pyacemaker.executors.base import Batch
    from pyacemaker.services.oracle.task import write_task

    frames = sn2_frames([3, 4, 5])

    def run(executor: local.LocalExecutor, number: int) -> common_pb2.Labels:
        task_dir = tmp_path / f"task{number}"
        write_task(task_dir, atoms_to_structure(frames[number]), "xtb", {}, 0)
        job = executor.submit(Batch(f"batch{number}", tmp_path / f"job{number}", (task_dir,)))
        deadline = time.monotonic() + STREAM_TIMEOUT_S
        while not (ended := executor.ended(job, {0: task_dir})):
            assert time.monotonic() < deadline, "the task did not end"
            time.sleep(0.1)
        assert ended[0].state == "EXITED" and "code 0" in ended[0].reason, ended[0]
        return read_result_labels(task_dir)

    executor = local.LocalExecutor(LocalExecutorConfig(max_workers=1, timeout_s=60))
    assert_labels_equal_tblite(run(executor, 0), frames[0])
    assert executor._zygote is not None
    executor._zygote.process.kill()  # the warm process dies: the next batch gets a new one
    executor._zygote.process.wait()
    assert_labels_equal_tblite(run(executor, 1), frames[1])

    def no_zygote() -> None:
        raise OSError("no fork here")

    monkeypatch.setattr(local, "Zygote", no_zygote)  # none can start: a new interpreter per task, as before
    fresh = local.LocalExecutor(LocalExecutorConfig(max_workers=1, timeout_s=60))
    assert_labels_equal_tblite(run(fresh, 2), frames[2])
    assert fresh._zygote is None


def test_a_task_of_an_earlier_oracle_counts_as_running_while_its_forked_worker_runs(tmp_path: Path) -> None:
    """After a restart the pool knows a task only by its pid file. A worker forked from the zygote carries the
    zygote's command line, not the task dir; it is known by working in the task dir."""
    import subprocess

    from pyacemaker.config import LocalExecutorConfig
    from pyacemaker.executors.local import LocalExecutor

    task_dir, elsewhere = tmp_path / "task", tmp_path / "elsewhere"
    task_dir.mkdir()
    elsewhere.mkdir()
    executor = LocalExecutor(LocalExecutorConfig(max_workers=1, timeout_s=60))
    worker = subprocess.Popen(["sleep", "60"], cwd=task_dir)
    stranger = subprocess.Popen(["sleep", "60"], cwd=elsewhere)  # the pid file's pid reused by another process
    try:
        (task_dir / PID_FILE).write_text(str(worker.pid))
        assert executor.ended("local-1-1", {0: task_dir}) == {}  # still running
        (task_dir / PID_FILE).write_text(str(stranger.pid))
        assert executor.ended("local-1-1", {0: task_dir})[0].state == "UNKNOWN"
        (task_dir / PID_FILE).write_text(str(worker.pid))
        worker.kill()
        worker.wait()
        assert executor.ended("local-1-1", {0: task_dir})[0].state == "UNKNOWN"
    finally:
        for process in (worker, stranger):
            process.kill()
            process.wait()
