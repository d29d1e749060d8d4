"""The trainer's deployment settings: where training workers run.

By default every job's worker is a local process of the trainer's host. A deployment file (`python -m
pyacemaker.services.trainer --deployment FILE`, or $PYACEMAKER_TRAINER_DEPLOYMENT) adds named executor profiles
that submit
the worker as a Slurm or PBS job instead, through the same executors (and job templates) as the oracle's DFT
calculations. Everything that names a program, a file or a scheduler setting lives here, on the server side: a
request (StartJobRequest.executor_profile) or a run config (`trainer.executor_profile`) may only name a profile.
See docs/deployment.md for the format and an example.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Annotated

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from pyacemaker.config import PbsExecutorConfig, SlurmExecutorConfig
from pyacemaker.executors.deployment import AbsolutePath, Directive, ProfileName, read_settings_file
from pyacemaker.rpc import InvalidInputError
from pyacemaker.services.trainer.table import LOCAL_PROFILE

DEPLOYMENT_ENV = "PYACEMAKER_TRAINER_DEPLOYMENT"
# The interpreter that runs the worker inside an Apptainer image (outside one: the trainer's own).
IMAGE_PYTHON = "python3"
TASK_COMMAND = re.compile(r"\{\{\s*task_command\s*\}\}")


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class TrainerExecutorProfile(_Strict):
    """One way to run training workers as scheduler jobs."""

    executor: Annotated[SlurmExecutorConfig | PbsExecutorConfig, Field(discriminator="kind")] = Field(
        description="The scheduler and its resources, as for the oracle's executors: {kind: slurm, partition, "
        "time_limit, cpus_per_task, memory, nodes, poll_interval_s} or {kind: pbs, queue, walltime, ncpus, ...}."
    )
    template: AbsolutePath | None = Field(None, description="Job script template; default: the bundled one.")
    extra_directives: list[Directive] = Field(
        default_factory=list, description="Extra scheduler lines for every job, e.g. --gres=gpu:1."
    )
    apptainer_image: AbsolutePath | None = Field(
        None,
        description="Run the worker inside this Apptainer image (`apptainer exec ... IMAGE python3 -m "
        "pyacemaker.services.trainer.worker`), with the artifact store and the trainer's work dir bound; default: the "
        "trainer's own Python on the compute node.",
    )
    apptainer_options: list[Directive] = Field(
        default_factory=list, description="Options of `apptainer exec`, one argument each, e.g. --nv for GPUs."
    )

    @field_validator("template")
    @classmethod
    def _runs_the_worker(cls, template: Path | None) -> Path | None:
        """A template that does not run `{{ task_command }}` (one written for the oracle's task runner, such as
        containers/apptainer/slurm_task.sh) would run something else than the training worker."""
        if template is None:
            return None
        try:
            text = template.read_text()
        except OSError as exc:
            raise ValueError(f"{template}: cannot be read ({exc.strerror})") from None
        if not TASK_COMMAND.search(text):
            raise ValueError(
                f"{template}: the job script must run the training worker through the {{{{ task_command }}}} "
                'placeholder (followed by "$task_dir"), as the bundled template does'
            )
        return template


class TrainerDeployment(_Strict):
    """The trainer's deployment file."""

    executors: dict[ProfileName, TrainerExecutorProfile] = Field(
        default_factory=dict,
        description=f"Named executor profiles; {LOCAL_PROFILE!r} (a local worker process) is always there.",
    )
    default_executor: ProfileName = Field(LOCAL_PROFILE, description="The profile of jobs whose request names none.")

    @model_validator(mode="after")
    def _known_default(self) -> TrainerDeployment:
        if LOCAL_PROFILE in self.executors:
            raise ValueError(f"executors.{LOCAL_PROFILE}: the name {LOCAL_PROFILE!r} is the local worker; pick another")
        if self.default_executor != LOCAL_PROFILE and self.default_executor not in self.executors:
            raise ValueError(
                f"default_executor: no executor profile {self.default_executor!r} (profiles: {self.known()})"
            )
        return self

    def profile_names(self) -> list[str]:
        return [LOCAL_PROFILE, *sorted(self.executors)]

    def known(self) -> str:
        return ", ".join(self.profile_names())

    def profile_name(self, requested: str) -> str:
        """The profile a job runs under: the requested one, else the deployment's default. An unknown name is an
        InvalidInputError naming the field."""
        name = requested or self.default_executor
        if name != LOCAL_PROFILE and name not in self.executors:
            raise InvalidInputError(
                f"executor_profile: this trainer's deployment has no executor profile {name!r} (it has: "
                f"{self.known()}); profiles are set in the trainer's deployment file (executors.<name>, see "
                "docs/deployment.md)"
            )
        return name


def load_trainer_deployment(path: str | None) -> TrainerDeployment:
    """The deployment file at `path` (YAML), or the defaults for None/''; DeploymentError names the file and key."""
    return read_settings_file(path, TrainerDeployment, "trainer deployment file")
