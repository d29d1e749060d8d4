"""The Slurm job script (array spec, throttle, resources, the task command, user templates) and the parsing of
squeue / sacct output. The real scheduler is exercised in tests/integration/test_slurm_executor.py."""

from __future__ import annotations

import shlex
import sys
from pathlib import Path

import pytest
from pydantic import ValidationError

from pyacemaker.config import SlurmExecutorConfig, slurm_time_seconds
from pyacemaker.executors.base import Batch, array_range, render_template
from pyacemaker.executors.deployment import BatchExecutorDeployment
from pyacemaker.executors.slurm import SlurmExecutor, parse_sacct, parse_squeue
from pyacemaker.rpc import InvalidInputError


def batch_of(tmp_path: Path, n_tasks: int) -> Batch:
    return Batch(
        "pyace-0badcafe", tmp_path / "jobs" / "pyace-0badcafe", tuple(tmp_path / f"t{i}" for i in range(n_tasks))
    )


def directives(script: str) -> list[str]:
    return [line for line in script.splitlines() if line.startswith("#SBATCH")]


def test_the_script_asks_for_one_throttled_array_task_per_calculation(tmp_path: Path) -> None:
    config = SlurmExecutorConfig(
        kind="slurm",
        partition="short",
        array_throttle=3,
        time_limit="0-02:30:00",
        cpus_per_task=4,
        memory="8G",
    )
    deployment = BatchExecutorDeployment(extra_directives=["--account=chem42", "#SBATCH --qos=low"])
    batch = batch_of(tmp_path, 8)
    script = SlurmExecutor(config, deployment).job_script(batch, batch.job_dir / "tasks.txt")
    assert directives(script) == [
        "#SBATCH --job-name=pyace-0badcafe",
        "#SBATCH --array=0-7%3",
        f"#SBATCH --output={batch.job_dir}/slurm-%A_%a.out",
        "#SBATCH --time=0-02:30:00",
        "#SBATCH --cpus-per-task=4",
        "#SBATCH --ntasks=1",
        "#SBATCH --partition=short",
        "#SBATCH --mem=8G",
        "#SBATCH --account=chem42",
        "#SBATCH --qos=low",
    ]
    assert f'{shlex.quote(sys.executable)} -m pyacemaker.services.oracle.task "$task_dir"' in script
    assert '"$((SLURM_ARRAY_TASK_ID + 1))p"' in script, "array task i runs line i + 1 of the task list"
    assert "{{" not in script
    # sbatch reads directives only up to the first command: none may follow one.
    body = script.splitlines()
    first_command = next(i for i, line in enumerate(body) if line and not line.startswith("#"))
    assert all(not line.startswith("#SBATCH") for line in body[first_command:])


def test_mpi_ranks_and_nodes_are_settings_not_template_edits(tmp_path: Path) -> None:
    """An MPI pw.x (profile command `srun pw.x`) gets its ranks from the job's --ntasks; no edited template."""
    config = SlurmExecutorConfig(kind="slurm", time_limit="90", ntasks=64, nodes=2, cpus_per_task=2)
    batch = batch_of(tmp_path, 3)
    lines = directives(SlurmExecutor(config).job_script(batch, batch.job_dir / "tasks.txt"))
    assert {"#SBATCH --ntasks=64", "#SBATCH --nodes=2", "#SBATCH --cpus-per-task=2", "#SBATCH --time=90"} <= set(lines)
    assert "#SBATCH --ntasks=1" not in lines


# (sbatch form, seconds counted by hand)
SBATCH_TIMES = [
    ("90", 90 * 60),  # minutes
    ("30:45", 30 * 60 + 45),  # minutes:seconds
    ("02:30:00", 2 * 3600 + 30 * 60),  # hours:minutes:seconds
    ("3-12", 3 * 86400 + 12 * 3600),  # days-hours
    ("1-02:30", 86400 + 2 * 3600 + 30 * 60),  # days-hours:minutes
    ("0-02:30:15", 2 * 3600 + 30 * 60 + 15),  # days-hours:minutes:seconds
]


@pytest.mark.parametrize(("time_limit", "seconds"), SBATCH_TIMES)
def test_every_time_form_sbatch_documents_is_accepted(time_limit: str, seconds: int) -> None:
    assert SlurmExecutorConfig(kind="slurm", time_limit=time_limit).time_limit == time_limit
    assert slurm_time_seconds(time_limit) == seconds


@pytest.mark.parametrize(
    ("time_limit", "message"),
    [
        ("1:60", "out of range"),
        ("2-24", "out of range"),
        ("0", "above zero"),
        ("UNLIMITED", "not a time limit"),
        ("-5", "not a time limit"),
        ("1:2:3:4", "not a time limit"),
        ("1h", "not a time limit"),
    ],
)
def test_a_time_limit_sbatch_would_refuse_or_read_as_no_limit_is_refused(time_limit: str, message: str) -> None:
    with pytest.raises(ValidationError, match=message) as caught:
        SlurmExecutorConfig(kind="slurm", time_limit=time_limit)
    assert "time_limit" in str(caught.value)


def test_optional_directives_leave_no_blank_line_and_a_loose_throttle_is_dropped(tmp_path: Path) -> None:
    batch = batch_of(tmp_path, 4)
    script = SlurmExecutor(SlurmExecutorConfig(kind="slurm", array_throttle=8)).job_script(batch, tmp_path / "t.txt")
    assert "#SBATCH --array=0-3" in directives(script)
    assert not any("partition" in line or "--mem" in line for line in directives(script))
    lines = script.splitlines()
    last_directive = max(i for i, line in enumerate(lines) if line.startswith("#SBATCH"))
    assert all(line.startswith("#") for line in lines[:last_directive]), "no blank line inside the directives"


def test_the_deployments_template_is_used_and_an_unknown_placeholder_is_named(tmp_path: Path) -> None:
    template = tmp_path / "my_job.sh"
    template.write_text(
        "#!/bin/bash\n#SBATCH --array={{ array }}\nmodule load chem\n{{task_command}} $(sed -n 1p {{task_list}})\n"
    )
    config = SlurmExecutorConfig(kind="slurm", array_throttle=2)
    deployment = BatchExecutorDeployment(template=template)
    script = SlurmExecutor(config, deployment).job_script(batch_of(tmp_path, 5), tmp_path / "tasks.txt")
    assert script.splitlines()[1:3] == ["#SBATCH --array=0-4%2", "module load chem"]

    template.write_text("#SBATCH --array={{ array }}\n{{ module_list }}\n")
    with pytest.raises(InvalidInputError, match=r"unknown placeholder\(s\) module_list .*known: array"):
        SlurmExecutor(config, deployment).job_script(batch_of(tmp_path, 5), tmp_path / "tasks.txt")
    missing = BatchExecutorDeployment(template=tmp_path / "nowhere.sh")
    with pytest.raises(InvalidInputError, match=r"nowhere\.sh: cannot be read"):
        SlurmExecutor(config, missing).job_script(batch_of(tmp_path, 1), tmp_path / "tasks.txt")


def test_array_range_and_rendering_rules() -> None:
    assert array_range(1, 8) == "0-0"
    assert array_range(8, 8) == "0-7"
    assert array_range(100, 16) == "0-99%16"
    assert render_template("a {{x}}\n  {{ y }}  \nb", {"x": "1", "y": ""}, "t") == "a 1\nb\n"


def test_squeue_lines_become_states_per_array_task() -> None:
    # `squeue -h -r -t all -j 12 -o '%K|%T|%r'` as printed by slurm-wlm 22.05 on the test cluster.
    output = "2|PENDING|Resources\n3|PENDING|JobArrayTaskLimit\n1|RUNNING|None\n0|COMPLETED|None\n5|NODE_FAIL|None\n"
    assert parse_squeue(output) == {0: "COMPLETED", 1: "RUNNING", 2: "PENDING", 3: "PENDING", 5: "NODE_FAIL"}
    assert parse_squeue("N/A|RUNNING|None\n") == {}, "a plain (non-array) job has no array index"


def test_sacct_lines_become_states_and_unstarted_ranges_are_skipped() -> None:
    output = "12_0|COMPLETED\n12_3|CANCELLED by 0\n12_[4-7%2]|PENDING\n12_1|TIMEOUT\n"
    assert parse_sacct(output) == {0: "COMPLETED", 1: "TIMEOUT", 3: "CANCELLED"}
