"""The `pyacemaker` console script against real service processes started by `pyacemaker up`."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml

from pyacemaker.deploy.local import SERVICES, pid_alive
from pyacemaker.rpc import channel, check_health
from pyacemaker.services.orchestrator.state import saved_config_json
from pyacemaker.structures import read_structures
from tests.conftest import SN2_DIR

CLI = str(Path(sys.executable).parent / "pyacemaker")
N_SELECT = 10


def cli(env: dict[str, str], *args: str, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    return subprocess.run([CLI, *args], env=env, capture_output=True, text=True, timeout=timeout)


@pytest.fixture
def env(tmp_path: Path) -> dict[str, str]:
    return {**os.environ, "PYACEMAKER_HOME": str(tmp_path / "home"), "OMP_NUM_THREADS": "1"}


@pytest.fixture
def services(env: dict[str, str]) -> Iterator[dict]:
    result = cli(env, "up", "--ports", "auto")
    registry_path = Path(env["PYACEMAKER_HOME"]) / "services.json"
    registry = json.loads(registry_path.read_text()) if registry_path.is_file() else {}
    try:
        assert result.returncode == 0, result.stderr + result.stdout
        yield registry
    finally:
        cli(env, "down")
        for entry in registry.values():  # never leave a daemon behind, whatever the test did
            if pid_alive(entry["pid"]):
                os.killpg(entry["pid"], 9)


def _small_config(tmp_path: Path, **direct) -> Path:
    shutil.copytree(SN2_DIR / "seeds", tmp_path / "seeds", dirs_exist_ok=True)
    data = yaml.safe_load((SN2_DIR / "config_quick.yaml").read_text())
    data["sampling"]["pool"].update(rattles_per_amplitude=4, interpolation_images=6, fragment_rotations_per_seed=4)
    data["sampling"]["direct"].update(n_select=N_SELECT, **direct)
    data["stop_after"] = "direct_sampling"
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def test_up_run_status_down(services, env, tmp_path):
    assert set(services) == set(SERVICES)
    for entry in services.values():
        assert pid_alive(entry["pid"]) and check_health(entry["address"])
    # Server reflection lists the application service next to health.
    from grpc_reflection.v1alpha.proto_reflection_descriptor_database import ProtoReflectionDescriptorDatabase

    with channel(services["sampler"]["address"]) as ch:
        names = ProtoReflectionDescriptorDatabase(ch).get_services()
    assert "pyacemaker.v1.SamplerService" in names and "grpc.health.v1.Health" in names

    config = _small_config(tmp_path)
    first = cli(env, "run", str(config))
    assert first.returncode == 0, first.stderr
    direct = tmp_path / "runs" / "sn2-quick" / "step1_direct" / "direct.extxyz"
    assert len(read_structures(direct)) == N_SELECT
    assert "coverage:" in first.stdout and str(direct) in first.stdout

    second = cli(env, "run", str(config))
    assert second.returncode == 0, second.stderr
    assert "step skipped: direct_sampling" in second.stderr

    # The recommended minimal config (name, seeds, charge, DFT level, budget): the DIRECT size comes from the
    # budget (35 % of 30 → 10) and reaches the sampler; the run dir's saved config holds the derived windows.
    minimal = tmp_path / "minimal.yaml"
    minimal.write_text(
        "name: minimal\n"
        "system: {seeds: [seeds/reactant_complex.xyz, seeds/transition_state.xyz, seeds/product_complex.xyz], "
        "charge: -1}\n"
        "oracle: {backend: xtb, method: GFN1-xTB}\n"
        "budget: {max_dft_calls: 30}\n"
        "sampling: {pool: {rattles_per_amplitude: 4, interpolation_images: 6, fragment_rotations_per_seed: 4}}\n"
        "stop_after: direct_sampling\n"
    )
    derived = cli(env, "run", str(minimal))
    assert derived.returncode == 0, derived.stderr
    assert "sampling.direct.n_select: 10, derived from budget.max_dft_calls 30 (35 %)" in derived.stderr
    assert len(read_structures(tmp_path / "runs" / "minimal" / "step1_direct" / "direct.extxyz")) == 10
    saved = json.loads(saved_config_json(tmp_path / "runs" / "minimal"))
    assert saved["md"]["windows"] == {
        "atoms": [4, 0, 5],
        "start": -1.5,
        "stop": 1.5,
        "count": 13,
        "force_constant": 5.0,
    }
    assert (saved["sampling"]["direct"]["n_select"], saved["validation"]["holdout_size"]) == (10, 4)

    status = cli(env, "status")
    assert status.returncode == 0, status.stderr
    assert status.stdout.count("SERVING") == len(SERVICES) and "run sn2" in status.stdout

    down = cli(env, "down")
    assert down.returncode == 0
    assert not any(pid_alive(entry["pid"]) for entry in services.values())
    assert not (Path(env["PYACEMAKER_HOME"]) / "services.json").exists()


@pytest.mark.parametrize(
    ("edit", "expected"),
    [
        (lambda d: d["sampling"]["direct"].update(n_selectt=3), "sampling.direct.n_selectt: unknown key"),
        (lambda d: d["md"].update(temperatures=[-300]), "md.temperatures.0: Input should be greater than 0"),
        (lambda d: d["system"]["seeds"].append("seeds/missing.xyz"), "seed file not found: "),
    ],
)
def test_malformed_config_gives_one_line_and_exit_2(env, tmp_path, edit, expected):
    path = _small_config(tmp_path)
    data = yaml.safe_load(path.read_text())
    edit(data)
    path.write_text(yaml.safe_dump(data))
    result = cli(env, "run", str(path))
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and expected in lines[0], result.stderr
    check = cli(env, "config", "check", str(path))
    assert check.returncode == 2 and expected in check.stderr


def test_malformed_xyz_to_label_gives_one_line_and_exit_2(env, tmp_path):
    bad = tmp_path / "broken.xyz"
    bad.write_text("2\n\nCl 0.0 0.0\n")
    result = cli(env, "label", "--backend", "xtb", str(bad), "-o", str(tmp_path / "out.xyz"))
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and str(bad) in lines[0], result.stderr


def test_run_without_services_says_so_and_exits_3(env, tmp_path):
    env = {**env, "PYACEMAKER_ORCHESTRATOR_ADDRESS": "127.0.0.1:1"}
    result = cli(env, "run", str(_small_config(tmp_path)))
    assert result.returncode == 3
    assert "service unavailable at 127.0.0.1:1" in result.stderr


def test_config_schema_prints_json(env):
    result = cli(env, "config", "schema")
    assert result.returncode == 0
    assert json.loads(result.stdout)["title"] == "RunConfig"
