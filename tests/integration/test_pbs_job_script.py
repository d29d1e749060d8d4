"""The generated PBS job script run for real, the way a PBS MoM would run subjob 1 of the array (bash with
PBS_ARRAY_INDEX set; no PBS server exists here): it must pick its task dir from the task list and leave the
labels of a real xTB calculation there."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

from pyacemaker.config import PbsExecutorConfig
from pyacemaker.executors.base import Batch, write_task_list
from pyacemaker.executors.pbs import PbsExecutor
from pyacemaker.services.oracle.task import read_result, write_task
from pyacemaker.structures import atoms_to_structure
from pyacemaker.v1 import common_pb2
from tests.integration.test_local_executor import assert_labels_equal_tblite, sn2_frames

pytest.importorskip("tblite.ase", reason="tblite is not installed (pyacemaker[oracle])")


def test_subjob_one_labels_the_second_task_dir(tmp_path: Path) -> None:
    frames = sn2_frames([50, 51, 52])
    task_dirs = tuple(tmp_path / "tasks" / f"t{i}" for i in range(len(frames)))
    for task_dir, atoms in zip(task_dirs, frames, strict=True):
        write_task(task_dir, atoms_to_structure(atoms), "xtb", {}, max_retries=0)
    batch = Batch("pyace-5c41b0a7", tmp_path / "jobs" / "pyace-5c41b0a7", task_dirs)
    script = PbsExecutor(PbsExecutorConfig(kind="pbs", array_throttle=2)).job_script(batch, write_task_list(batch))
    assert "#PBS -J 0-2%2" in script

    env = {**os.environ, "PBS_ARRAY_INDEX": "1"}
    run = subprocess.run(["bash", "-c", script], env=env, cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    labels = read_result(task_dirs[1])
    assert labels is not None and labels.status == common_pb2.LABEL_STATUS_OK
    assert_labels_equal_tblite(labels, frames[1])
    assert (task_dirs[1] / "exit_code").read_text().strip() == "0"
    assert read_result(task_dirs[0]) is None and read_result(task_dirs[2]) is None, "other subjobs' dirs untouched"
