"""The PBS executor without a PBS server: the generated job script, and qstat's JSON (tests/data/pbs, in the
layout OpenPBS prints; see its README) turned into subjob states."""

from __future__ import annotations

import shlex
import sys
from pathlib import Path

import pytest
from pydantic import ValidationError

from pyacemaker.config import PbsExecutorConfig, pbs_walltime_seconds
from pyacemaker.executors.base import Batch
from pyacemaker.executors.deployment import BatchExecutorDeployment
from pyacemaker.executors.pbs import PbsExecutor, parse_qstat_json
from tests.conftest import REPO_ROOT

PBS_DATA = REPO_ROOT / "tests" / "data" / "pbs"


def batch_of(tmp_path: Path, n_tasks: int) -> Batch:
    return Batch(
        "pyace-1a2b3c4d", tmp_path / "jobs" / "pyace-1a2b3c4d", tuple(tmp_path / f"t{i}" for i in range(n_tasks))
    )


def directives(script: str) -> list[str]:
    return [line for line in script.splitlines() if line.startswith("#PBS")]


def test_the_script_asks_for_a_throttled_array_with_the_resources(tmp_path: Path) -> None:
    config = PbsExecutorConfig(
        kind="pbs",
        queue="short",
        array_throttle=2,
        walltime="00:10:00",
        ncpus=4,
        memory="4gb",
    )
    deployment = BatchExecutorDeployment(extra_directives=["-A proj42", "#PBS -l place=scatter"])
    batch = batch_of(tmp_path, 6)
    script = PbsExecutor(config, deployment).job_script(batch, batch.job_dir / "tasks.txt")
    assert directives(script) == [
        "#PBS -N pyace-1a2b3c4d",
        "#PBS -J 0-5%2",
        "#PBS -l walltime=00:10:00",
        "#PBS -l select=1:ncpus=4:mem=4gb",
        "#PBS -j oe",
        f"#PBS -o {batch.job_dir}/",
        "#PBS -q short",
        "#PBS -A proj42",
        "#PBS -l place=scatter",
    ]
    assert "export OMP_NUM_THREADS=4" in script
    assert f'{shlex.quote(sys.executable)} -m pyacemaker.services.oracle.task "$task_dir"' in script
    assert '"$((${PBS_ARRAY_INDEX:-0} + 1))p"' in script, "subjob i runs line i + 1 of the task list"


def test_mpi_ranks_and_chunks_are_settings_not_template_edits(tmp_path: Path) -> None:
    """An MPI pw.x (profile command `mpirun pw.x`) gets its ranks from the chunks PBS hands out."""
    config = PbsExecutorConfig(kind="pbs", walltime="1:30:00", ncpus=32, mpiprocs=16, nodes=2)
    batch = batch_of(tmp_path, 3)
    script = PbsExecutor(config).job_script(batch, batch.job_dir / "tasks.txt")
    assert "#PBS -l select=2:ncpus=32:mpiprocs=16" in directives(script)
    assert "#PBS -l walltime=1:30:00" in directives(script)
    assert "export OMP_NUM_THREADS=2" in script, "32 CPUs per chunk over 16 ranks: 2 threads each"


@pytest.mark.parametrize(
    ("walltime", "seconds"),
    [("45", 45.0), ("90:30", 5430.0), ("100:00:00", 360000.0), ("01:00:00", 3600.0), ("0:00:10.5", 10.5)],
)
def test_every_duration_form_pbs_takes_is_accepted(walltime: str, seconds: float) -> None:
    # PBS durations: [[hours:]minutes:]seconds[.milliseconds]; the seconds are an independent hand count.
    assert PbsExecutorConfig(kind="pbs", walltime=walltime).walltime == walltime
    assert pbs_walltime_seconds(walltime) == seconds


@pytest.mark.parametrize(
    ("walltime", "message"),
    [("1-00:00:00", "not a time limit"), ("10:75", "below 60"), ("0", "above zero"), ("1:2:3:4", "not a time")],
)
def test_a_walltime_pbs_would_refuse_is_refused_at_config_time(walltime: str, message: str) -> None:
    with pytest.raises(ValidationError, match=message) as caught:
        PbsExecutorConfig(kind="pbs", walltime=walltime)
    assert "walltime" in str(caught.value)


def test_more_ranks_than_cpus_in_a_chunk_is_refused() -> None:
    with pytest.raises(ValidationError, match=r"mpiprocs \(8\) must not exceed ncpus \(4\)"):
        PbsExecutorConfig(kind="pbs", ncpus=4, mpiprocs=8)


def test_one_task_is_a_plain_job_and_a_loose_throttle_is_dropped(tmp_path: Path) -> None:
    executor = PbsExecutor(PbsExecutorConfig(kind="pbs", array_throttle=8))
    single = executor.job_script(batch_of(tmp_path, 1), tmp_path / "tasks.txt")
    assert not any(line.startswith("#PBS -J") for line in single.splitlines()), "PBS refuses a one-element range"
    assert "#PBS -J 0-2" in directives(executor.job_script(batch_of(tmp_path, 3), tmp_path / "tasks.txt"))
    assert "#PBS -l select=1:ncpus=1" in directives(single)


def test_a_running_array_job_gives_each_subjob_its_state() -> None:
    subjobs = parse_qstat_json((PBS_DATA / "qstat_array_running.json").read_text())
    assert sorted(subjobs) == [0, 1, 2, 3, 4, 5], "the array's own entry 4711[] is not a subjob"
    assert [subjobs[i].state for i in range(6)] == ["X", "X", "X", "R", "Q", "Q"]
    assert subjobs[3].ended is None and subjobs[4].ended is None, "running and queued subjobs have not ended"

    finished = subjobs[0].ended
    assert finished is not None and finished.state == "EXITED" and not finished.final
    deleted = subjobs[1].ended
    assert deleted is not None and deleted.state == "KILLED" and "signal 15" in deleted.reason
    assert not deleted.final, "a deleted subjob may be resubmitted"
    walltime = subjobs[2].ended
    assert walltime is not None and walltime.final, "a subjob killed at its walltime would be again"
    assert "4711[2].pbs01" in walltime.reason and "walltime" in walltime.reason


def test_a_finished_array_job_reports_a_launch_failure() -> None:
    subjobs = parse_qstat_json((PBS_DATA / "qstat_array_finished.json").read_text())
    ends = {index: subjob.ended for index, subjob in subjobs.items()}
    assert [ends[i].state for i in range(3)] == ["EXITED", "EXITED", "FAILED"]  # type: ignore[union-attr]
    assert "could not run" in ends[2].reason and not ends[2].final  # type: ignore[union-attr]


def test_a_plain_job_is_index_zero_and_garbage_is_refused() -> None:
    plain = '{"Jobs": {"815.pbs01": {"job_state": "F", "Exit_status": 0}}}'
    subjobs = parse_qstat_json(plain)
    assert list(subjobs) == [0] and subjobs[0].ended is not None
    with pytest.raises(ValueError, match="not JSON"):
        parse_qstat_json("qstat: Unknown Job Id 815.pbs01")
    # qstat leaves out "Jobs" when no job matches: no subjobs, not an error.
    assert parse_qstat_json('{"timestamp": 1732794811, "pbs_version": "22.05.11", "pbs_server": "pbs01"}') == {}
    with pytest.raises(ValueError, match="no 'Jobs' mapping"):
        parse_qstat_json('{"Jobs": []}')
