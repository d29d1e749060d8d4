"""Where work runs: a local process pool, or Slurm / PBS (array) jobs. Shared by the oracle (DFT calculations,
through pyacemaker/services/oracle/gateway.py) and the trainer (training workers, through
pyacemaker/services/trainer/scheduler.py);
see base.py for the interface and deployment.py for the settings a service's deployment file gives them."""

from __future__ import annotations

from pyacemaker.config import ExecutorConfig, LocalExecutorConfig, PbsExecutorConfig, SlurmExecutorConfig
from pyacemaker.executors.base import Batch, Executor, SubmissionError, TaskEnd
from pyacemaker.executors.deployment import ExecutorsDeployment
from pyacemaker.executors.local import LocalExecutor
from pyacemaker.executors.pbs import PbsExecutor
from pyacemaker.executors.slurm import SlurmExecutor

__all__ = [
    "Batch",
    "Executor",
    "LocalExecutor",
    "PbsExecutor",
    "SlurmExecutor",
    "SubmissionError",
    "TaskEnd",
    "create_executor",
    "default_executor_config",
]


def create_executor(config: ExecutorConfig, deployment: ExecutorsDeployment | None = None) -> Executor:
    """The executor for one `oracle.executor` config section, with the oracle deployment's settings for its kind
    (job template, extra directives)."""
    deployment = deployment if deployment is not None else ExecutorsDeployment()
    if isinstance(config, LocalExecutorConfig):
        return LocalExecutor(config)
    if isinstance(config, SlurmExecutorConfig):
        return SlurmExecutor(config, deployment.slurm)
    if isinstance(config, PbsExecutorConfig):
        return PbsExecutor(config, deployment.pbs)
    raise TypeError(f"no executor for {type(config).__name__}")


def default_executor_config(scheduler: str) -> ExecutorConfig:
    """Defaults for `scheduler`: enough to ask it about a job submitted under another configuration."""
    configs: dict[str, ExecutorConfig] = {
        "local": LocalExecutorConfig(),
        "slurm": SlurmExecutorConfig(kind="slurm"),
        "pbs": PbsExecutorConfig(kind="pbs"),
    }
    if scheduler not in configs:
        raise ValueError(f"unknown scheduler {scheduler!r} (known: {', '.join(configs)})")
    return configs[scheduler]
