"""Crash safety of a whole run: the orchestrator is SIGKILLed once inside each of steps 1-7 (with 6b, the student
refinement, and the validation), restarted with `pyacemaker up` and the run resumed with `pyacemaker run`; every
step completed before a kill is skipped (outputs verified) instead of redone, the run completes, and it spends
exactly the DFT calls of a run of the same config whose DFT steps were not interrupted (the trainer and the
oracle killed in steps 3 and 4 instead). Real services (`pyacemaker up`), xtb as DFT,
the bundled teacher."""

from __future__ import annotations

import json
import os
import shutil
import signal
import sqlite3
import subprocess
import time
from pathlib import Path

import pytest
import yaml

from pyacemaker.services.orchestrator.ledger import DftLedger
from pyacemaker.v1 import orchestrator_pb2
from tests.conftest import CLI, SN2_DIR, cli

pytestmark = pytest.mark.slow
STEPS = (
    "direct_sampling",
    "active_learning.1",
    "mace_finetune.1",
    "surrogate_md.1",
    "surrogate_labelling.1",
    "ace_fit.1",
    "student_refinement.1",
    "delta_fit.1",
    "validation.1",
)
_K = orchestrator_pb2


def tiny_config(directory: Path, name: str) -> Path:
    """The quick SN2 config cut down further: one iteration, a few structures per step."""
    directory.mkdir(parents=True, exist_ok=True)
    shutil.copytree(SN2_DIR / "seeds", directory / "seeds", dirs_exist_ok=True)
    data = yaml.safe_load((SN2_DIR / "config_quick.yaml").read_text())
    data["name"] = name
    data["budget"]["max_dft_calls"] = 24
    data["sampling"]["pool"].update(rattles_per_amplitude=4, interpolation_images=6, fragment_rotations_per_seed=4)
    data["sampling"]["direct"]["n_select"] = 8
    data["active_learning"].update(finetune_epochs=2, batch_size=3)
    data["mace_finetune"]["epochs"] = 3
    data["md"].update(steps=60, replicas=1, n_frames=40)
    data["md"]["windows"]["count"] = 3
    data["surrogate_labelling"]["shard_size"] = 10
    data["student_refinement"] = {"max_rounds": 1, "steps": 40, "max_frames_per_round": 20}
    data["validation"].update(holdout_size=4, max_iterations=1)
    data["validation"]["profile"]["count"] = 3
    path = directory / "config.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def started_steps(run_dir: Path) -> list[str]:
    path = run_dir / "state.sqlite"
    if not path.is_file():
        return []
    db = sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=5)
    try:
        rows = db.execute("SELECT step FROM events WHERE kind = ? ORDER BY seq", (_K.RUN_EVENT_KIND_STEP_STARTED,))
        return [row[0] for row in rows]
    except sqlite3.OperationalError:  # the schema is being created
        return []
    finally:
        db.close()


def step_state(run_dir: Path, name: str) -> int:
    db = sqlite3.connect(f"file:{run_dir / 'state.sqlite'}?mode=ro", uri=True, timeout=5)
    try:
        return int(db.execute("SELECT state FROM steps WHERE name = ?", (name,)).fetchone()[0])
    finally:
        db.close()


def service_pid(env: dict[str, str], name: str) -> int:
    registry = json.loads((Path(env["PYACEMAKER_HOME"]) / "services.json").read_text())
    return int(registry[name]["pid"])


def wait_for_step(run_dir: Path, step: str, follower: subprocess.Popen[bytes]) -> None:
    deadline = time.monotonic() + 300
    while step not in started_steps(run_dir):
        assert follower.poll() is None, f"the run ended before {step} started: {follower.stderr.read()!r}"  # type: ignore[union-attr]
        assert time.monotonic() < deadline, f"{step} did not start within 300 s"
        time.sleep(0.01)


def dft_calls(run_dir: Path) -> int:
    ledger = DftLedger(run_dir / "state.sqlite")
    try:
        return ledger.count()
    finally:
        ledger.close()


def test_killed_in_every_step_resumes_without_redoing_work(cli_env: dict[str, str], tmp_path: Path) -> None:
    env = cli_env
    assert cli(env, "up", "--ports", "auto").returncode == 0

    # The other services die first: the trainer while step 3 trains, the oracle while it gives the forces of step 4's
    # MD (to the sampler, which fails the step with UNAVAILABLE). Each comes back on its old address (`up`), and
    # the orchestrator, which stays up, retries the step with backoff. No step that charges DFT is interrupted, so
    # this run's DFT calls are those of an uninterrupted run: the reference for the orchestrator kills below.
    config = tiny_config(tmp_path / "services", "services")
    run_dir = tmp_path / "services" / "runs" / "services"
    follower = subprocess.Popen([CLI, "run", str(config)], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    for step, service in (("mace_finetune.1", "trainer"), ("surrogate_md.1", "oracle")):
        wait_for_step(run_dir, step, follower)
        time.sleep(0.3)
        address = json.loads((Path(env["PYACEMAKER_HOME"]) / "services.json").read_text())[service]["address"]
        os.kill(service_pid(env, service), signal.SIGKILL)
        assert cli(env, "up", "--ports", "auto").returncode == 0
        assert json.loads((Path(env["PYACEMAKER_HOME"]) / "services.json").read_text())[service]["address"] == address
    _, stderr = follower.communicate(timeout=900)
    assert follower.returncode == 0, stderr.decode()[-3000:]
    assert stderr.decode().count("retrying in") >= 2
    expected_calls = dft_calls(run_dir)
    assert expected_calls > 0

    config = tiny_config(tmp_path / "killed", "killed")
    run_dir = tmp_path / "killed" / "runs" / "killed"
    for target in STEPS:
        follower = subprocess.Popen([CLI, "run", str(config)], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        wait_for_step(run_dir, target, follower)
        os.kill(service_pid(env, "orchestrator"), signal.SIGKILL)
        assert step_state(run_dir, target) == _K.STEP_STATE_RUNNING, f"{target} was not in progress when killed"
        follower.communicate(timeout=60)
        assert follower.returncode != 0, f"the client did not notice the kill in {target}"
        assert cli(env, "up", "--ports", "auto").returncode == 0  # restarts the orchestrator only

    final = cli(env, "run", str(config))
    assert final.returncode == 0, final.stderr[-3000:]
    # Only the step killed last was redone; every step before it was skipped as verified.
    for step in STEPS[:-1]:
        assert f"step skipped: {step}: outputs verified" in final.stderr
    assert dft_calls(run_dir) == expected_calls
    summary = json.loads((run_dir / "run_summary.json").read_text())
    assert summary["dft_calls"] == expected_calls and summary["iterations"] == 1
    assert (run_dir / "iteration_01" / "step7_delta" / "final.yace").is_file()
    for name in ("input.yaml", "train.pckl.gzip"):  # the final fit as pacemaker reads it (docs/outputs.md)
        assert (run_dir / "iteration_01" / "step7_delta" / "pacemaker" / name).is_file()
