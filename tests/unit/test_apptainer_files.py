"""What can be checked of the Apptainer deployment without Apptainer: the definitions bootstrap from exactly the
archives the build writes, the scripts are valid bash, the start script's dry run starts the right instances
with the right ports, binds and arguments, and the Slurm job template renders through the real executor."""

from __future__ import annotations

import os
import re
import subprocess
from pathlib import Path

import pytest

from pyacemaker.config import SlurmExecutorConfig
from pyacemaker.deploy import images
from pyacemaker.deploy.local import DEFAULT_PORTS
from pyacemaker.executors.base import Batch
from pyacemaker.executors.deployment import BatchExecutorDeployment
from pyacemaker.executors.slurm import SlurmExecutor
from pyacemaker.services.oracle.deployment import load_deployment
from tests.conftest import REPO_ROOT

APPTAINER_DIR = REPO_ROOT / "containers" / "apptainer"
START_SCRIPT = APPTAINER_DIR / "start_services.sh"
SLURM_TEMPLATE = APPTAINER_DIR / "slurm_task.sh"


def _header(definition: Path) -> dict[str, str]:
    """The `Key: value` header lines before the first %section, as Apptainer reads them."""
    header = {}
    for line in definition.read_text().splitlines():
        if line.startswith("%"):
            break
        match = re.match(r"^(\w+):\s*(\S.*)$", line)
        if match:
            header[match.group(1)] = match.group(2).strip()
    return header


def test_every_image_has_a_definition_bootstrapped_from_its_saved_archive() -> None:
    definitions = {path.stem: path for path in APPTAINER_DIR.glob("*.def")}
    assert set(definitions) == set(images.IMAGES)
    for name, definition in definitions.items():
        header = _header(definition)
        assert header["Bootstrap"] == "docker-archive", definition
        # Relative to the repository root, where the README tells to run `apptainer build`.
        assert header["From"] == str(images.archive_path(name).relative_to(REPO_ROOT)), definition
        text = definition.read_text()
        assert "%startscript" in text and "/opt/pyacemaker/bin/entrypoint.sh" in text
        assert f"io.pyacemaker.service {images.IMAGES[name].service}" in text


@pytest.mark.parametrize("script", [START_SCRIPT, SLURM_TEMPLATE], ids=lambda p: p.name)
def test_scripts_are_valid_bash(script: Path) -> None:
    result = subprocess.run(["bash", "-n", str(script)], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr


def test_start_script_dry_run_starts_the_instances_in_order_with_ports_binds_and_peers(tmp_path: Path) -> None:
    token = tmp_path / "token"
    token.write_text("t0k3n\n")
    home = tmp_path / "shared"
    env = {
        **os.environ,
        "PYACEMAKER_APPTAINER": "echo",
        "PYACEMAKER_HOME": str(home),
        "PYACEMAKER_SIF_DIR": str(tmp_path / "sif"),
        "PYACEMAKER_TOKEN_FILE": str(token),
    }
    result = subprocess.run([str(START_SCRIPT), "start"], env=env, capture_output=True, text=True, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    starts = [line.split() for line in result.stdout.splitlines() if line.startswith("instance start")]
    names = [next(w for w in words if w.startswith("pyacemaker-") and not w.endswith(".sif")) for words in starts]
    assert names == ["pyacemaker-oracle", "pyacemaker-sampler", "pyacemaker-trainer", "pyacemaker-orchestrator"]
    by_service = {name.removeprefix("pyacemaker-"): words for name, words in zip(names, starts, strict=True)}
    for service, words in by_service.items():
        assert f"PYACEMAKER_PORT={DEFAULT_PORTS[service]}" in words
        assert f"PYACEMAKER_STORE={home}/store" in words
        assert f"{token}:/run/pyacemaker/pyacemaker_token_file:ro" in words  # the token reaches every instance
    oracle = " ".join(by_service["oracle"])
    deployment = home / "oracle-deployment.yaml"
    assert f"pyacemaker-oracle --work-dir {home}/oracle --deployment {deployment}" in oracle
    assert f"--bind {deployment}:{deployment}:ro" in oracle
    # The default deployment sends array tasks through the Apptainer template, copied beside it.
    assert load_deployment(deployment).executors.slurm.template == home / "slurm_task.sh"
    assert (home / "slurm_task.sh").read_text() == SLURM_TEMPLATE.read_text()
    assert "/usr/bin/sbatch" in oracle and f"PYACEMAKER_ORACLE_SIF={tmp_path}/sif/pyacemaker-oracle-qe.sif" in oracle
    orchestrator = " ".join(by_service["orchestrator"])
    assert orchestrator.endswith("--sampler 127.0.0.1:50052 --oracle 127.0.0.1:50053 --trainer 127.0.0.1:50054")
    exports = (home / "apptainer.env").read_text()
    assert "export PYACEMAKER_ORCHESTRATOR_ADDRESS=127.0.0.1:50051" in exports
    assert (home / "store").is_dir() and (home / "oracle").is_dir()

    # Extra oracle instances for step 5 reach the orchestrator as --labelling-oracle, one each.
    env["PYACEMAKER_LABELLING_ORACLES"] = "gpu01:50060 gpu02:50060"
    env["PYACEMAKER_SERVICES"] = "orchestrator"
    result = subprocess.run([str(START_SCRIPT), "start"], env=env, capture_output=True, text=True, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    (start,) = [line for line in result.stdout.splitlines() if line.startswith("instance start")]
    assert start.endswith("--trainer 127.0.0.1:50054 --labelling-oracle gpu01:50060 --labelling-oracle gpu02:50060")


def test_start_script_refuses_a_missing_image(tmp_path: Path) -> None:
    env = {**os.environ, "PYACEMAKER_HOME": str(tmp_path), "PYACEMAKER_SIF_DIR": str(tmp_path / "sif")}
    env["PYACEMAKER_APPTAINER"] = "true"  # a runtime that is not the dry run: the images must exist
    result = subprocess.run([str(START_SCRIPT), "start"], env=env, capture_output=True, text=True)
    assert result.returncode == 1
    assert f"{tmp_path}/sif/pyacemaker-oracle-qe.sif is missing" in result.stderr


def test_slurm_template_renders_through_the_slurm_executor(tmp_path: Path) -> None:
    deployment = BatchExecutorDeployment(template=SLURM_TEMPLATE)
    executor = SlurmExecutor(SlurmExecutorConfig(kind="slurm", partition="short"), deployment)
    batch = Batch(name="pyacemaker-qe-1", job_dir=tmp_path / "job", task_dirs=(tmp_path / "t0", tmp_path / "t1"))
    script = executor.job_script(batch, tmp_path / "job" / "tasks.txt")
    assert "{{" not in script  # every placeholder was filled
    assert "#SBATCH --array=0-1\n" in script and "#SBATCH --partition=short" in script
    assert '"${PYACEMAKER_ORACLE_SIF:?}" python -m pyacemaker.services.oracle.task "$task_dir"' in script
    rendered = tmp_path / "job.sh"
    rendered.write_text(script)
    assert subprocess.run(["bash", "-n", str(rendered)], capture_output=True).returncode == 0
