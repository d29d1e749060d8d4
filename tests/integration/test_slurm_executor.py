"""The Slurm executor against a REAL single-node Slurm (munged + slurmctld + slurmd, tests/slurm_cluster.py)
and a real oracle server: array jobs of real xTB (and, through the CLI, PySCF) calculations, re-attachment
after the client drops, retries of an unconvergeable SCF, and resubmission of a cancelled array task."""

from __future__ import annotations

import argparse
import contextlib
import functools
import re
import sqlite3
import stat
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from ase.io import read, write

from pyacemaker.cli import label
from pyacemaker.cli.main import EXIT_OK
from pyacemaker.clients.oracle import backend_spec
from pyacemaker.config import SlurmExecutorConfig
from pyacemaker.executors.base import JOB_SCRIPT_FILE, TEMPLATES_DIR, Batch
from pyacemaker.executors.slurm import SlurmExecutor
from pyacemaker.services.oracle.deployment import OracleDeployment
from pyacemaker.services.oracle.gateway import JOB_TABLE_FILE, ORPHAN_AGE_S
from pyacemaker.services.oracle.jobs import JobTable
from pyacemaker.services.oracle.server import add_to_server
from pyacemaker.services.oracle.task import write_task
from pyacemaker.structures import atoms_to_structure, content_id
from pyacemaker.v1 import common_pb2, oracle_pb2
from tests.conftest import running_service
from tests.integration.test_local_executor import (
    XTB_LEVEL,
    assert_labels_equal_tblite,
    collect,
    open_stream,
    sn2_frames,
)
from tests.slurm_cluster import SlurmCluster, slurm_cluster

pytest.importorskip("tblite.ase", reason="tblite is not installed (pyacemaker[oracle])")

pytestmark = pytest.mark.slow


def slurm_spec(array_throttle: int = 8, **options: Any) -> oracle_pb2.BackendSpec:
    executor = {"kind": "slurm", "array_throttle": array_throttle, "poll_interval_s": 0.5, "time_limit": "00:10:00"}
    return backend_spec("xtb", {"executor": executor, **options})


@pytest.fixture(scope="module")
def slurm(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SlurmCluster]:
    with slurm_cluster(tmp_path_factory.mktemp("slurm")) as cluster:
        yield cluster


# The deployment's own job template: the bundled one plus a line the test recognises, in a private file.
SITE_LINE = "# site template: account chem42"


@pytest.fixture(scope="module")
def oracle(slurm: SlurmCluster, tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, Path]]:
    work_dir = tmp_path_factory.mktemp("oracle")
    template = work_dir / "site_slurm.sh"
    shebang, rest = (TEMPLATES_DIR / "slurm.sh").read_text().split("\n", 1)
    template.write_text(f"{shebang}\n{SITE_LINE}\n{rest}")
    template.chmod(0o600)
    deployment = OracleDeployment.model_validate({"executors": {"slurm": {"template": str(template)}}})
    register = functools.partial(add_to_server, work_dir=work_dir, deployment=deployment)
    with running_service(register) as address:
        yield address, work_dir


def array_task_states(slurm: SlurmCluster, job_id: str) -> dict[int, str]:
    output = slurm.run("squeue", "-h", "-r", "-t", "all", "-j", job_id, "-o", "%K %T").stdout
    return {int(index): state for index, state in (line.split() for line in output.splitlines())}


def settled_states(slurm: SlurmCluster, job_id: str, timeout: float = 30.0) -> dict[int, str]:
    """Array task states once none is pending, running or completing any more."""
    deadline = time.monotonic() + timeout
    while True:
        states = array_task_states(slurm, job_id)
        active = {"PENDING", "CONFIGURING", "RUNNING", "COMPLETING"}
        if not active.intersection(states.values()) or time.monotonic() > deadline:
            return states
        time.sleep(0.2)


def test_eight_geometries_run_as_one_array_job(slurm: SlurmCluster, oracle) -> None:
    address, work_dir = oracle
    frames = sn2_frames(range(8))
    start = time.monotonic()
    submissions, results = collect(open_stream(address, slurm_spec(array_throttle=4), [frames]))
    wall_time = time.monotonic() - start

    (submission,) = submissions
    assert (submission.scheduler, submission.reattached) == ("slurm", False)
    assert list(submission.indices) == list(range(8)) and submission.job_id.isdigit()
    # The results are in before the last array tasks have quite finished (writing their exit file).
    assert settled_states(slurm, submission.job_id) == dict.fromkeys(range(8), "COMPLETED")
    for index, atoms in enumerate(frames):
        assert_labels_equal_tblite(results[index], atoms)
        assert results[index].attempts == 1
    table = JobTable(work_dir / JOB_TABLE_FILE)
    record = table.get((content_id(frames[0]), XTB_LEVEL))
    assert record is not None and record.job_id == submission.job_id
    batch = table.batch(record.batch or "")
    assert batch is not None
    script = batch.job_dir / JOB_SCRIPT_FILE
    assert "#SBATCH --array=0-7%4" in script.read_text() and SITE_LINE in script.read_text()
    assert stat.S_IMODE(script.stat().st_mode) == 0o600, "a job script from a private template stays private"
    print(f"\n8 SN2 geometries as Slurm array job {submission.job_id}: {wall_time:.1f} s wall time")


def test_a_new_stream_re_attaches_to_the_job_of_a_dropped_one(slurm: SlurmCluster, oracle) -> None:
    address, work_dir = oracle
    frames = sn2_frames(range(10, 14))
    spec = slurm_spec(array_throttle=1)  # one task at a time: the job is still running when the client returns
    jobs_before = slurm.job_ids()

    dropped = open_stream(address, spec, [frames])
    first = next(dropped)
    (submission,) = first.submissions
    dropped.cancel()  # the orchestrator is killed right after the submission
    in_flight = array_task_states(slurm, submission.job_id)
    assert any(state in ("PENDING", "RUNNING") for state in in_flight.values()), in_flight

    # The client comes back to a restarted oracle (a new server, nothing in memory) on the same work dir.
    with running_service(functools.partial(add_to_server, work_dir=work_dir)) as restarted:
        submissions, results = collect(open_stream(restarted, spec, [frames]))
    assert [(s.job_id, s.reattached, list(s.indices)) for s in submissions] == [(submission.job_id, True, [0, 1, 2, 3])]
    for index, atoms in enumerate(frames):
        assert_labels_equal_tblite(results[index], atoms)
    assert slurm.job_ids() == [*jobs_before, submission.job_id], "no second sbatch"
    job_ids = {JobTable(work_dir / JOB_TABLE_FILE).get((content_id(a), XTB_LEVEL)).job_id for a in frames}  # type: ignore[union-attr]
    assert job_ids == {submission.job_id}
    print(f"\nre-attached to Slurm job {submission.job_id}; Slurm jobs seen: {slurm.job_ids()}")


def test_unconvergeable_scf_fails_after_its_retries_and_a_cancelled_task_is_resubmitted(
    slurm: SlurmCluster, oracle
) -> None:
    address, work_dir = oracle
    frames = sn2_frames(range(20, 23))
    stretched = sn2_frames([23])[0]
    stretched.positions *= 2.5  # its SCC does not converge in 20 · 2² iterations
    spec = slurm_spec(array_throttle=1, max_iterations=20, retries={"max_retries": 2, "resubmit_lost_tasks": 1})
    submissions: list[oracle_pb2.Submission] = []
    results: dict[int, common_pb2.Labels] = {}
    for response in open_stream(address, spec, [[*frames, stretched]]):
        for submission in response.submissions:
            submissions.append(submission)
            if len(submissions) == 1:  # array task 2 is still queued behind the throttle: its "node dies"
                slurm.run("scancel", f"{submission.job_id}_2")
        results.update((result.index, result.labels) for result in response.results)

    first, again = submissions
    # A task cancelled while still queued leaves the array's record (squeue no longer lists it).
    assert settled_states(slurm, first.job_id).get(2, "gone") in ("CANCELLED", "gone")
    assert (list(again.indices), again.reattached) == ([2], False) and again.job_id != first.job_id
    for index, atoms in enumerate(frames):
        assert_labels_equal_tblite(results[index], atoms)
    assert [results[index].attempts for index in range(3)] == [1, 1, 2], "the resubmission counts as an attempt"
    failed = results[3]
    assert failed.status == common_pb2.LABEL_STATUS_FAILED and failed.attempts == 3
    assert "failed in all 3 attempts" in failed.reason and "SCF not converged in 80 cycles" in failed.reason
    record = JobTable(work_dir / JOB_TABLE_FILE).get((content_id(stretched), XTB_LEVEL))
    assert record is not None and record.task_dir.is_dir(), "the failed calculation's dir is kept"
    print(f"\ncancelled task 2 of Slurm job {first.job_id}, resubmitted as job {again.job_id}")


def test_a_job_whose_id_never_reached_the_table_is_found_by_name_not_resubmitted(slurm: SlurmCluster, oracle) -> None:
    """The oracle died between sbatch and recording the job id: the next stream finds the job by its name."""
    address, work_dir = oracle
    frames = sn2_frames(range(40, 42))
    table = JobTable(work_dir / JOB_TABLE_FILE)
    batch_name = "pyace-c0ffee00"
    task_dirs = []
    for index, atoms in enumerate(frames):
        key = (content_id(atoms), XTB_LEVEL)
        claim = table.claim(key, batch_name, index, lambda run, i=index: work_dir / "crashed" / f"t{i}.{run}")
        write_task(claim.record.task_dir, atoms_to_structure(atoms), "xtb", {}, max_retries=0)
        task_dirs.append(claim.record.task_dir)
    table.create_batch(batch_name, "slurm", work_dir / "jobs" / batch_name, len(frames))
    executor = SlurmExecutor(SlurmExecutorConfig(kind="slurm", time_limit="00:10:00"))
    job_id = executor.submit(Batch(batch_name, work_dir / "jobs" / batch_name, tuple(task_dirs)))
    # ... and the oracle died here, long enough ago for the batch to count as orphaned.
    with sqlite3.connect(work_dir / JOB_TABLE_FILE) as db:
        db.execute("UPDATE tasks SET updated_at = updated_at - ? WHERE batch = ?", (2 * ORPHAN_AGE_S, batch_name))
    jobs_before = slurm.job_ids()

    submissions, results = collect(open_stream(address, slurm_spec(), [frames]))
    assert [(s.job_id, s.reattached, list(s.indices)) for s in submissions] == [(job_id, True, [0, 1])]
    for index, atoms in enumerate(frames):
        assert_labels_equal_tblite(results[index], atoms)
    assert slurm.job_ids() == jobs_before, "nothing was submitted again"


def run_cli(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="pyacemaker")
    label.register(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    return int(args.handler(args))


def test_cli_labels_with_pyscf_through_slurm(slurm: SlurmCluster, oracle, tmp_path: Path, capsys) -> None:
    pytest.importorskip("pyscf", reason="pyscf is not installed (pyacemaker[oracle])")
    from pyacemaker.config import PyscfOracleConfig
    from pyacemaker.services.oracle.backends.pyscf import PyscfBackend

    address, _ = oracle
    frames = sn2_frames([30, 31])
    source = tmp_path / "in.xyz"
    write(source, frames, format="xyz")  # plain xyz: the charge comes from --charge
    output = tmp_path / "out.xyz"
    code = run_cli(
        [
            *("label", "--backend", "pyscf", "--option", "basis=3-21g", "--charge", "-1"),
            *("--executor", "slurm", "--executor-option", "poll_interval_s=0.5"),
            *("--executor-option", "time_limit=00:10:00", "--oracle", address, str(source), "-o", str(output)),
        ]
    )
    err = capsys.readouterr().err
    assert code == EXIT_OK, err
    assert "submitted slurm job" in err and "(2 structures)" in err
    in_process = PyscfBackend(PyscfOracleConfig(backend="pyscf", basis="3-21g"))
    for atoms, labelled in zip(frames, read(output, index=":"), strict=True):
        assert labelled.info["level_of_theory"] == "pyscf:PBE/3-21g" and labelled.info["charge"] == -1
        reference = in_process.label(atoms)
        assert labelled.get_potential_energy() == pytest.approx(reference.energy, abs=1e-6)
        np.testing.assert_allclose(labelled.get_forces(), reference.forces, atol=1e-5)


_KILLABLE_ORCHESTRATOR = """
import sys
from pathlib import Path
from pyacemaker.structures import atoms_to_structure, read_structures
from pyacemaker.clients.oracle import backend_spec
from pyacemaker.services.orchestrator.dft_labels import DftLabeller
from pyacemaker.services.orchestrator.ledger import DftLedger

state, address, frames = sys.argv[1:4]
executor = {"kind": "slurm", "array_throttle": 2, "poll_interval_s": 0.5, "time_limit": "00:10:00"}
spec = backend_spec("xtb", {"executor": executor})
structures = [atoms_to_structure(a) for a in read_structures(frames)]
DftLabeller(DftLedger(Path(state)), address, spec, max_calls=8).label(structures)
"""


def test_orchestrator_killed_after_submission_is_reconciled_not_resubmitted(
    slurm: SlurmCluster, oracle, tmp_path: Path
) -> None:
    """The orchestrator side (budget ledger + labeller) is SIGKILLed once the job id is in its ledger; a
    restarted one re-sends the pending structures and the gateway re-attaches: 8 ledger rows, one job id."""
    import os
    import signal
    import subprocess
    import sys

    from pyacemaker.services.orchestrator.dft_labels import DftLabeller
    from pyacemaker.services.orchestrator.ledger import DftLedger

    address, work_dir = oracle
    frames = sn2_frames(range(100, 108))
    frames_path = tmp_path / "frames.extxyz"
    write(frames_path, frames, format="extxyz")
    state = tmp_path / "state.sqlite"
    process = subprocess.Popen(
        [sys.executable, "-c", _KILLABLE_ORCHESTRATOR, str(state), address, str(frames_path)],
        env={**os.environ, "SLURM_CONF": os.environ.get("SLURM_CONF", "")},
    )
    try:
        deadline = time.monotonic() + 120  # generous: CI machines can be busy
        submitted = 0
        while time.monotonic() < deadline and submitted < 8:
            if state.exists():
                with sqlite3.connect(state) as db, contextlib.suppress(sqlite3.OperationalError):
                    # (the file exists a moment before its table does)
                    submitted = db.execute("SELECT COUNT(*) FROM dft_ledger WHERE job_id != ''").fetchone()[0]
            time.sleep(0.05)
        assert submitted == 8, "the job id never reached the ledger"
        process.send_signal(signal.SIGKILL)
        process.wait(10)
    finally:
        if process.poll() is None:
            process.kill()
    ledger = DftLedger(state)
    assert any(row.status == "submitted" for row in ledger.rows()), "killed before any result, as intended"
    spec = slurm_spec(array_throttle=2)
    frames = read(frames_path, index=":")  # exactly what the killed process sent
    outcome = DftLabeller(ledger, address, spec, max_calls=8).label([atoms_to_structure(a) for a in frames])
    rows = ledger.rows()
    assert len(rows) == 8 and ledger.count() == 8
    assert len({row.job_id for row in rows}) == 1
    assert all(row.status == "ok" for row in rows)
    assert outcome.job_ids == {rows[0].job_id}
    # The gateway's own records: every structure ran in that one job, submitted once (no resubmission).
    # (Other tests of this module share the oracle, so the cluster-wide job list is not ours alone.)
    table = JobTable(work_dir / JOB_TABLE_FILE)
    records = [table.get((row.content_id, row.level_of_theory)) for row in rows]
    assert {r.job_id for r in records if r is not None} == {rows[0].job_id}
    assert all(r is not None and r.submissions == 1 for r in records)
    for atoms in frames:
        assert_labels_equal_tblite(outcome.labels[content_id(atoms)], atoms)


def scontrol_fields(slurm: SlurmCluster, job_id: str) -> dict[str, str]:
    """`scontrol show job -o` of one job as key → value."""
    line = slurm.run("scontrol", "show", "job", "-o", job_id).stdout.split("\n")[0]
    return dict(item.split("=", 1) for item in line.split() if "=" in item)


def slurm_seconds(shown: str) -> int:
    """Seconds of a TimeLimit as scontrol prints it: [D-]HH:MM:SS."""
    days, _, clock = shown.rpartition("-")
    hours, minutes, seconds = (int(part) for part in clock.split(":"))
    return ((int(days or 0) * 24 + hours) * 60 + minutes) * 60 + seconds


def test_every_time_limit_form_means_to_slurm_what_it_means_to_the_config(slurm: SlurmCluster, tmp_path: Path) -> None:
    """Each form the config accepts goes through the bundled template into a real sbatch (held, never run), and
    slurmctld's TimeLimit equals the config's reading, rounded up to whole minutes as Slurm documents."""
    from tests.unit.test_executor_slurm import SBATCH_TIMES

    for index, (time_limit, seconds) in enumerate(SBATCH_TIMES):
        config = SlurmExecutorConfig(kind="slurm", time_limit=time_limit, ntasks=2)
        batch = Batch(f"pyace-time{index}", tmp_path / f"job{index}", (tmp_path / "t0",))
        script = batch.job_dir / JOB_SCRIPT_FILE
        batch.job_dir.mkdir(parents=True)
        script.write_text(SlurmExecutor(config).job_script(batch, tmp_path / "tasks.txt"))
        job_id = slurm.run("sbatch", "--parsable", "--hold", str(script)).stdout.strip().split(";")[0]
        try:
            fields = scontrol_fields(slurm, job_id)
        finally:
            slurm.run("scancel", job_id, check=False)
        assert slurm_seconds(fields["TimeLimit"]) == -(-seconds // 60) * 60, (time_limit, fields["TimeLimit"])
        assert fields["NumTasks"] == "2", "the template's --ntasks comes from the config"


def test_mpi_pw_x_runs_on_the_jobs_ranks_with_the_bundled_template(slurm: SlurmCluster, tmp_path: Path) -> None:
    """MPI DFT without an edited template: the launcher is in the deployment's qe profile, the ranks are the run
    config's `ntasks`; pw.x reports two MPI processes and the energy of a serial pw.x run."""
    import shutil

    from ase.build import bulk

    from pyacemaker.services.oracle.deployment import DEBIAN_PSEUDO_DIR

    if shutil.which("pw.x") is None or shutil.which("mpirun") is None:
        pytest.skip("needs Quantum ESPRESSO's pw.x and Open MPI's mpirun (make install-system)")
    deployment = OracleDeployment.model_validate(
        {
            "qe": {
                "profiles": {
                    "mpi": {"command": "mpirun --allow-run-as-root pw.x", "pseudo_dir": str(DEBIAN_PSEUDO_DIR)}
                }
            }
        }
    )
    level = {"pseudopotentials": {"Si": "Si.pz-vbc.UPF"}, "ecutwfc_ry": 12.0, "kpoint_spacing": 0.5}
    silicon = bulk("Si", "diamond", a=5.43)
    silicon.positions[1] += (0.05, 0.0, 0.0)  # off the minimum: forces to compare too
    register = functools.partial(add_to_server, work_dir=tmp_path / "oracle", deployment=deployment)
    with running_service(register) as address:
        executor = {"kind": "slurm", "ntasks": 2, "time_limit": "10", "poll_interval_s": 0.5, "keep_finished": True}
        _, mpi = collect(
            open_stream(address, backend_spec("qe", {**level, "profile": "mpi", "executor": executor}), [[silicon]])
        )
        _, serial = collect(open_stream(address, backend_spec("qe", level), [[silicon]]))
    assert mpi[0].status == common_pb2.LABEL_STATUS_OK, mpi[0].reason
    assert mpi[0].energy == pytest.approx(serial[0].energy, abs=1e-5)
    np.testing.assert_allclose(mpi[0].forces, serial[0].forces, atol=1e-4)
    (output,) = [p.read_text() for p in (tmp_path / "oracle").rglob("*.pwo")]  # the Slurm task's (kept)
    assert re.search(r"Parallel version \(MPI\), running on\s+2 processors", output), output[:1500]
