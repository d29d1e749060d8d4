"""Deployment settings files shared by the services: the executors' part (scratch dirs, job templates, scheduler
directives), the field types every deployment file uses, and reading and validating such a file.

A service's deployment file is the only place that names programs, templates and directories on its host; a
request may at most choose a named profile. Each service adds its own sections (the oracle's qe/vasp profiles,
the trainer's executor profiles) to these."""

from __future__ import annotations

import argparse
import os
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, TypeVar

import yaml
from pydantic import AfterValidator, BaseModel, ConfigDict, Field, StringConstraints, ValidationError

from pyacemaker.config import PROFILE_NAME, format_validation_error


class DeploymentError(ValueError):
    """A deployment file that cannot be used; the message names the file and the key."""


class StrictSettings(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


def _absolute(path: Path) -> Path:
    if not path.is_absolute():
        raise ValueError("must be an absolute path")
    return path


def _one_line(directive: str) -> str:
    if "\n" in directive or "\r" in directive:
        raise ValueError(f"{directive!r}: a directive is one line")
    return directive


AbsolutePath = Annotated[Path, AfterValidator(_absolute)]
ProfileName = Annotated[str, StringConstraints(pattern=PROFILE_NAME)]
# One scheduler line of a job script (#SBATCH / #PBS directive or its options).
Directive = Annotated[str, AfterValidator(_one_line)]


class LocalExecutorDeployment(StrictSettings):
    scratch_dir: AbsolutePath | None = Field(
        None, description="Root of the task and job dirs; default: the oracle's --work-dir."
    )


class BatchExecutorDeployment(LocalExecutorDeployment):
    template: AbsolutePath | None = Field(None, description="Job script template; default: the bundled one.")
    extra_directives: list[Directive] = Field(
        default_factory=list, description="Extra scheduler lines for every job, e.g. --account=chem42."
    )


class ExecutorsDeployment(StrictSettings):
    local: LocalExecutorDeployment = Field(default_factory=LocalExecutorDeployment)
    slurm: BatchExecutorDeployment = Field(default_factory=BatchExecutorDeployment)
    pbs: BatchExecutorDeployment = Field(default_factory=BatchExecutorDeployment)

    def of(self, kind: str) -> LocalExecutorDeployment:
        settings: LocalExecutorDeployment = getattr(self, kind)
        return settings


def add_deployment_argument(
    parser: argparse.ArgumentParser, load: Callable[[str | None], BaseModel], env: str, help: str, fallback: str
) -> None:
    """A service's `--deployment FILE` option (default: $`env`, else `fallback`, said in the help): the file is
    read and validated as the command line is parsed, so a bad one stops the service at start-up with one line
    naming the file and the key."""

    def parse(path: str) -> BaseModel:
        try:
            return load(path or None)
        except DeploymentError as exc:
            raise argparse.ArgumentTypeError(str(exc)) from None

    parser.add_argument(
        "--deployment",
        type=parse,
        default=os.environ.get(env, ""),
        metavar="FILE",
        help=f"{help} (default: ${env}, else {fallback})",
    )


SettingsModel = TypeVar("SettingsModel", bound=BaseModel)


def read_settings_file(path: str | Path | None, model: type[SettingsModel], what: str) -> SettingsModel:
    """A service's YAML settings file validated as `model` (its defaults for None); DeploymentError names `what`,
    the file and the key. Shared by the oracle's and the trainer's deployment files."""
    if path is None or str(path) == "":
        return model()
    path = Path(path)
    try:
        data = yaml.safe_load(path.read_text())
    except OSError as exc:
        raise DeploymentError(f"{what} {path}: cannot be read ({exc.strerror})") from None
    except yaml.YAMLError as exc:
        raise DeploymentError(f"{what} {path}: not valid YAML: {exc}") from None
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise DeploymentError(f"{what} {path}: must be a mapping of keys")
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        raise DeploymentError(format_validation_error(exc, data, f"{what} {path}")) from None
