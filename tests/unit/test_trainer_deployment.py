"""The trainer's deployment file and the run config's `trainer.executor`: a bad setting is one clear error that
names the file and the key; a job whose profile has gone fails saying so; an older job table gains the new
columns; a scheduler profile renders a job script that runs the training worker (inside an Apptainer image when
the profile names one). No scheduler needed: the job script is rendered, not submitted."""

from __future__ import annotations

import functools
import shlex
import sqlite3
from dataclasses import replace
from pathlib import Path

import grpc
import pytest
import yaml

from pyacemaker.artifacts import ArtifactStore
from pyacemaker.config import ConfigError, load_config
from pyacemaker.executors.base import TEMPLATES_DIR, Batch
from pyacemaker.executors.deployment import DeploymentError
from pyacemaker.executors.slurm import SlurmExecutor
from pyacemaker.rpc import InvalidInputError
from pyacemaker.services.orchestrator.steps import StepContext
from pyacemaker.services.orchestrator.trainer_jobs import run_trainer_job
from pyacemaker.services.trainer.deployment import TrainerDeployment, load_trainer_deployment
from pyacemaker.services.trainer.jobs import JobManager
from pyacemaker.services.trainer.launcher import worker_argv
from pyacemaker.services.trainer.scheduler import SchedulerLauncher
from pyacemaker.services.trainer.server import add_to_server, create_manager
from pyacemaker.services.trainer.table import JobRecord, JobTable
from pyacemaker.v1 import common_pb2, trainer_pb2
from tests.conftest import running_service
from tests.unit.test_config import _minimal, _write

GPU = {"executor": {"kind": "slurm", "partition": "gpu", "time_limit": "12:00:00", "cpus_per_task": 8}}


def _file(tmp_path: Path, data: object) -> Path:
    path = tmp_path / "trainer-deployment.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


@pytest.mark.parametrize(
    ("data", "expected"),
    [
        ({"default_executor": "gpu"}, "default_executor: no executor profile 'gpu' (profiles: local)"),
        ({"executors": {"local": GPU}}, "executors.local: the name 'local' is the local worker"),
        ({"executors": {"gpu": {"executor": {"kind": "lsf"}}}}, "executors.gpu.executor: Input tag 'lsf'"),
        (
            {"executors": {"gpu": {**GPU, "template": "slurm.sh"}}},
            "executors.gpu.template: must be an absolute path (got 'slurm.sh')",
        ),
        ({"executors": {"gpu": {**GPU, "extra_directives": ["--gres=gpu:1\nrm -rf /"]}}}, "a directive is one line"),
        ({"executors": {"gpu": {**GPU, "partiton": "x"}}}, "executors.gpu.partiton: unknown key"),
        ({"executors": {"gpu": {"executor": {**GPU["executor"], "time_limit": "1:2:3:4"}}}}, "is not a time limit"),
    ],
)
def test_bad_deployment_settings_name_the_file_and_key(tmp_path: Path, data: dict, expected: str) -> None:
    path = _file(tmp_path, data)
    with pytest.raises(DeploymentError) as info:
        load_trainer_deployment(str(path))
    assert str(info.value).startswith(f"trainer deployment file {path}")
    assert expected in str(info.value)


def test_a_template_must_run_the_worker(tmp_path: Path) -> None:
    oracle_only = tmp_path / "slurm_task.sh"  # runs the oracle's task runner, as containers/apptainer's does
    oracle_only.write_text('#!/bin/bash\n{{ directives }}\npython -m pyacemaker.services.oracle.task "$task_dir"\n')
    path = _file(tmp_path, {"executors": {"gpu": {**GPU, "template": str(oracle_only)}}})
    with pytest.raises(DeploymentError) as info:
        load_trainer_deployment(str(path))
    assert f"executors.gpu.template: {oracle_only}: the job script must run the training worker" in str(info.value)
    path = _file(tmp_path, {"executors": {"gpu": {**GPU, "template": str(tmp_path / "gone.sh")}}})
    with pytest.raises(DeploymentError, match=r"executors\.gpu\.template: .*gone\.sh: cannot be read"):
        load_trainer_deployment(str(path))
    own = tmp_path / "own.sh"
    own.write_text(TEMPLATES_DIR.joinpath("slurm.sh").read_text())
    path = _file(tmp_path, {"executors": {"gpu": {**GPU, "template": str(own)}}})
    assert load_trainer_deployment(str(path)).executors["gpu"].template == own


def test_an_unknown_profile_in_a_request_names_the_field_and_the_known_profiles() -> None:
    deployment = TrainerDeployment.model_validate({"executors": {"gpu": GPU}})
    assert deployment.profile_name("") == "local" and deployment.profile_name("gpu") == "gpu"
    with pytest.raises(InvalidInputError) as info:
        deployment.profile_name("gpu2")
    assert str(info.value).startswith("executor_profile: this trainer's deployment has no executor profile 'gpu2'")
    assert "(it has: local, gpu)" in str(info.value)
    assert (
        TrainerDeployment.model_validate({"executors": {"gpu": GPU}, "default_executor": "gpu"}).profile_name("")
        == "gpu"
    )


def test_the_run_config_names_a_profile_and_refuses_scheduler_settings(tmp_path: Path) -> None:
    assert load_config(_write(tmp_path, _minimal())).trainer.executor is None
    assert load_config(_write(tmp_path, _minimal(trainer={"executor": "gpu"}))).trainer.executor == "gpu"
    with pytest.raises(ConfigError) as info:
        load_config(_write(tmp_path, _minimal(trainer={"executor": {"kind": "slurm", "partition": "gpu"}})))
    assert "trainer.executor: give the name of an executor profile of the trainer's deployment file" in str(info.value)
    assert "executors.<name>" in str(info.value)


def test_a_slurm_profile_with_an_image_runs_the_worker_inside_it(tmp_path: Path) -> None:
    image = tmp_path / "pyacemaker.sif"
    profile = TrainerDeployment.model_validate(
        {
            "executors": {
                "gpu": {
                    **GPU,
                    "extra_directives": ["--gres=gpu:1"],
                    "apptainer_image": str(image),
                    "apptainer_options": ["--nv"],
                }
            }
        }
    ).executors["gpu"]
    store, work = tmp_path / "store", tmp_path / "trainer"
    launcher = SchedulerLauncher(profile, binds=(store, work))
    assert isinstance(launcher.executor, SlurmExecutor) and launcher.scheduler == "slurm" and not launcher.limited
    job_dir = work / "jobs" / "job-1"
    batch = Batch("pyacemaker-trainer-job-1-1", job_dir, (job_dir,), launcher.command(worker_argv(store, resume=True)))
    script = launcher.executor.job_script(batch, job_dir / "tasks.txt")
    for line in (
        "#SBATCH --partition=gpu",
        "#SBATCH --time=12:00:00",
        "#SBATCH --cpus-per-task=8",
        "#SBATCH --gres=gpu:1",
    ):
        assert line in script.splitlines()
    inside = ["python3", "-m", "pyacemaker.services.trainer.worker", "--store", str(store), "--resume", "--job-dir"]
    command = ["apptainer", "exec", "--nv", "--bind", str(store), "--bind", str(work), str(image), *inside]
    assert f'{shlex.join(command)} "$task_dir"' in script.splitlines()

    # Without an image: the trainer's own Python, the oracle's task runner nowhere.
    plain = SchedulerLauncher(TrainerDeployment.model_validate({"executors": {"cpu": GPU}}).executors["cpu"])
    batch = Batch("b", job_dir, (job_dir,), plain.command(worker_argv(store, resume=False)))
    script = plain.executor.job_script(batch, job_dir / "tasks.txt")
    assert "-m pyacemaker.services.trainer.worker --store" in script and "pyacemaker.services.oracle.task" not in script


def test_the_orchestrator_sends_the_run_configs_profile_and_the_trainer_refuses_an_unknown_one(
    tmp_path: Path, artifact_store: ArtifactStore
) -> None:
    config = load_config(_write(tmp_path, _minimal(trainer={"executor": "gpu2"})))
    deployment = TrainerDeployment.model_validate({"executors": {"gpu": GPU}})
    manager = create_manager(artifact_store, tmp_path / "trainer", deployment=deployment)
    try:
        with running_service(functools.partial(add_to_server, manager=manager)) as address:
            ctx = StepContext(config, artifact_store, tmp_path / "run", [], "", "", address, lambda _: None)
            with pytest.raises(grpc.RpcError) as info:
                run_trainer_job(ctx, trainer_pb2.StartJobRequest(ace_fit=trainer_pb2.AceFitSpec()), "fit")
    finally:
        manager.shutdown()
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert info.value.details().startswith("executor_profile: this trainer's deployment has no executor profile 'gpu2'")
    assert not list((tmp_path / "trainer" / "jobs").iterdir()), "a refused request leaves no job behind"


def test_a_queued_job_whose_profile_left_the_deployment_fails_saying_so(
    tmp_path: Path, artifact_store: ArtifactStore
) -> None:
    table = JobTable(tmp_path / "trainer" / "jobs.sqlite")
    request = trainer_pb2.StartJobRequest(ace_fit=trainer_pb2.AceFitSpec(), executor_profile="gpu")
    record = JobRecord("job-1", "ace_fit", common_pb2.JOB_STATE_QUEUED, request.SerializeToString(), profile="gpu")
    table.insert(replace(record, scheduler="slurm"))
    manager = JobManager(artifact_store, tmp_path / "trainer", deployment=TrainerDeployment())
    manager.shutdown()
    job = manager.job("job-1")
    assert job.state == common_pb2.JOB_STATE_FAILED
    assert job.error.startswith("executor profile 'gpu' is no longer in this trainer's deployment (it has: local)")


def test_a_job_table_of_an_older_trainer_gains_the_executor_columns(tmp_path: Path) -> None:
    path = tmp_path / "jobs.sqlite"
    with sqlite3.connect(path) as connection:  # the table as the trainer wrote it before executor profiles
        connection.execute(
            "CREATE TABLE jobs (job_id TEXT PRIMARY KEY, idempotency_key TEXT UNIQUE, kind TEXT NOT NULL, state "
            "INTEGER NOT NULL, request BLOB NOT NULL, error TEXT NOT NULL DEFAULT '', metrics TEXT NOT NULL DEFAULT "
            "'{}', outputs TEXT NOT NULL DEFAULT '[]', created REAL NOT NULL, updated REAL NOT NULL, pid INTEGER NOT "
            "NULL DEFAULT 0, pid_start TEXT NOT NULL DEFAULT '', attempt INTEGER NOT NULL DEFAULT 0, resume INTEGER "
            "NOT NULL DEFAULT 0, cancel_requested INTEGER NOT NULL DEFAULT 0)"
        )
        connection.execute(
            "INSERT INTO jobs (job_id, kind, state, request, created, updated, pid, pid_start, attempt) "
            "VALUES ('job-old', 'ace_fit', 2, x'', 1.0, 2.0, 4242, '777', 1)"
        )
    connection.close()
    record = JobTable(path).get("job-old")
    assert (record.profile, record.scheduler, record.scheduler_job_id) == ("local", "local", "")
    assert (record.pid, record.pid_start, record.attempt, record.idempotency_key) == (4242, "777", 1, "")
    assert JobTable(path).update("job-old", scheduler_job_id="12").scheduler_job_id == "12"
