"""Real podman containers from the real images (`make images`): step 1 of a run across the orchestrator,
sampler and oracle containers, and an oracle swapped by redeploying one container.

The images are built (or found up to date in podman's layer cache) by the module fixture, with the same code
`make images` runs. Without podman the tests are skipped with what to install; CI installs it
(`make install-system`), so there they run.
"""

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

from pyacemaker.clients.oracle import backend_spec
from pyacemaker.deploy import images, podman
from pyacemaker.deploy.local import SERVICES, read_registry
from pyacemaker.rpc import ENV_TLS_CA, ENV_TLS_CERT, ENV_TLS_KEY, ENV_TOKEN_FILE, channel
from pyacemaker.structures import LEVEL_KEY, content_id, read_structures
from pyacemaker.v1 import oracle_pb2, oracle_pb2_grpc
from tests.conftest import REPO_ROOT, SN2_DIR
from tests.pki import make_pki

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(
        not podman.podman_available() or shutil.which("debootstrap") is None or os.geteuid() != 0,
        reason="needs rootful podman and debootstrap: apt-get install podman runc debootstrap (as root; "
        "`make install-system` does it)",
    ),
]

IMAGES = ("orchestrator", "sampler", "oracle", "oracle-qe")
SI_PSEUDO = "Si.pbe-rrkj.UPF"  # in Debian's quantum-espresso-data, installed in the oracle-qe image


@pytest.fixture(scope="module")
def built_images() -> None:
    images.build_images(list(IMAGES))


@pytest.fixture
def deployment(built_images: None, tmp_path: Path) -> Iterator[Path]:
    """A home with the orchestrator, sampler and oracle (lean image) as containers on auto ports."""
    home = tmp_path / "home"
    env = {"PYACEMAKER_HOME": str(home)}
    started = _up_lean_trio(tmp_path, env)
    try:
        assert started.returncode == 0, started.stderr
        yield home
    finally:
        stopped = _cli("down", env=env, cwd=tmp_path)
        assert stopped.returncode == 0, stopped.stderr
        name = podman.deployment_name(home)
        left = subprocess.run(podman.podman("ps", "--all", "--format", "{{.Names}}"), capture_output=True, text=True)
        assert name not in left.stdout  # every container of the deployment is gone
        assert subprocess.run(podman.podman("network", "exists", name)).returncode != 0  # and its network


def _cli(*args: str, env: dict[str, str], cwd: Path) -> subprocess.CompletedProcess[str]:
    full_env = {**os.environ, "PYTHONPATH": str(REPO_ROOT), "OMP_NUM_THREADS": "1", **env}
    command = [sys.executable, "-m", "pyacemaker.cli.main", *args]
    return subprocess.run(command, env=full_env, cwd=cwd, capture_output=True, text=True, timeout=600)


def _up_lean_trio(work_dir: Path, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    """`pyacemaker up --runtime podman` of the orchestrator, sampler and the lean oracle (no torch) on auto ports,
    with work_dir mounted at the same path in the containers."""
    services = ("--services", "orchestrator,sampler,oracle", "--workdir", str(work_dir))
    lean_oracle = ("--image", f"oracle={images.image_tag('oracle')}")
    return _cli("up", "--runtime", "podman", "--ports", "auto", *services, *lean_oracle, env=env, cwd=work_dir)


def _step1_config(directory: Path, oracle: dict, run: str = "run") -> Path:
    """A small step-1-only config: an SN2 seed, a small pool, DIRECT on the distribution features. The seed is
    copied under the work dir: the orchestrator checks the config's paths in its container."""
    seed = directory / "reactant_complex.xyz"
    shutil.copyfile(SN2_DIR / "seeds" / seed.name, seed)
    config = {
        "name": "containers",
        "run_dir": str(directory / run),
        "system": {"seeds": [str(seed)], "charge": -1, "spin_multiplicity": 1},
        "oracle": oracle,
        "teacher": {"model": "bundled"},
        "budget": {"max_dft_calls": 10},
        "sampling": {
            "pool": {
                "rattle_amplitudes": [0.05, 0.1],
                "rattles_per_amplitude": 10,
                "interpolation_images": 0,
                "fragment_rotations_per_seed": 0,
                "random_seed": 0,
            },
            "direct": {"featuriser": "distribution", "n_select": 5},
        },
        "stop_after": "direct_sampling",
    }
    path = directory / f"{run}.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def _inspect(container: str, template: str) -> str:
    command = podman.podman("container", "inspect", "--format", template, container)
    return subprocess.run(command, capture_output=True, text=True, check=True).stdout.strip()


def test_step1_runs_across_containers(deployment: Path, tmp_path: Path) -> None:
    env = {"PYACEMAKER_HOME": str(deployment)}
    registry = read_registry(deployment)
    assert set(registry) == {"orchestrator", "sampler", "oracle"}
    assert all(p.runtime == "podman" and p.address.startswith("127.0.0.1:") for p in registry.values())
    # Non-root image user by default; the deployment runs the containers as the caller.
    assert _inspect(registry["sampler"].container, "{{.Config.User}}") == f"{os.getuid()}:{os.getgid()}"
    # The image's HEALTHCHECK (a grpc.health.v1 probe inside the container) passes.
    probe = podman.podman("healthcheck", "run", registry["oracle"].container)
    health = subprocess.run(probe, capture_output=True, text=True)
    assert health.returncode == 0, health.stdout + health.stderr
    # The lean images hold no torch.
    has_torch = subprocess.run(
        podman.podman(
            "exec",
            registry["sampler"].container,
            "python",
            "-c",
            "import importlib.util as u; print(u.find_spec('torch') is not None)",
        ),
        capture_output=True,
        text=True,
        check=True,
    )
    assert has_torch.stdout.strip() == "False"

    config = _step1_config(tmp_path, {"backend": "xtb"})
    run = _cli("run", str(config), env=env, cwd=tmp_path)
    assert run.returncode == 0, run.stdout + run.stderr
    selected = read_structures(tmp_path / "run" / "step1_direct" / "direct.extxyz")
    assert len(selected) == 5
    pool = read_structures(tmp_path / "run" / "step1_direct" / "pool.extxyz")
    # DIRECT picked from the pool the sampler container generated (compared by content, not by file).
    assert {content_id(a) for a in selected} <= {content_id(a) for a in pool}
    assert len(pool) > len(selected)
    selection = json.loads((tmp_path / "run" / "step1_direct" / "selection.json").read_text())
    assert selection  # the DIRECT summary the orchestrator exported through the shared store
    # Written by the orchestrator container into the caller's directory, owned by the caller.
    assert (tmp_path / "run" / "step1_direct" / "direct.extxyz").stat().st_uid == os.getuid()


def _label(env: dict[str, str], cwd: Path, structures: Path, output: Path, *options: str):
    return _cli("label", str(structures), "-o", str(output), *options, "--timeout", "300", env=env, cwd=cwd)


def test_an_oracle_is_swapped_by_redeploying_its_container(deployment: Path, tmp_path: Path) -> None:
    env = {"PYACEMAKER_HOME": str(deployment)}
    before = read_registry(deployment)
    si = tmp_path / "si.xyz"
    si.write_text(
        '2\nLattice="0.0 2.715 2.715 2.715 0.0 2.715 2.715 2.715 0.0" Properties=species:S:1:pos:R:3 pbc="T T T"\n'
        "Si 0.0 0.0 0.0\nSi 1.3575 1.3575 1.3575\n"
    )
    qe = ("--backend", "qe", "--option", f"pseudopotentials={{Si: {SI_PSEUDO}}}", "--option", "ecutwfc_ry=20")

    # The lean oracle image labels with GFN2-xTB and has no Quantum ESPRESSO: the qe label fails.
    seeds = SN2_DIR / "seeds" / "reactant_complex.xyz"
    labelled = _label(env, tmp_path, seeds, tmp_path / "xtb.extxyz", "--backend", "xtb", "--charge", "-1")
    assert labelled.returncode == 0, labelled.stderr
    assert read_structures(tmp_path / "xtb.extxyz")[0].info[LEVEL_KEY] == "xtb:GFN2-xTB"
    refused = _label(env, tmp_path, si, tmp_path / "refused.extxyz", *qe)
    assert refused.returncode == 1
    assert f"pseudopotential file /usr/share/espresso/pseudo/{SI_PSEUDO} does not exist" in refused.stderr

    # Redeploy only the oracle, from the image with Quantum ESPRESSO; config, code and orchestrator unchanged.
    swapped = _cli(
        "up",
        "--runtime",
        "podman",
        "--services",
        "oracle",
        "--image",
        f"oracle={images.image_tag('oracle-qe')}",
        env=env,
        cwd=tmp_path,
    )
    assert swapped.returncode == 0, swapped.stderr
    after = read_registry(deployment)
    assert after["oracle"].image == images.image_tag("oracle-qe") != before["oracle"].image
    assert after["oracle"].address == before["oracle"].address  # same published address
    assert after["orchestrator"].pid == before["orchestrator"].pid  # the orchestrator kept running

    with channel(after["oracle"].address) as ch:
        info = oracle_pb2_grpc.OracleServiceStub(ch).GetInfo(
            oracle_pb2.GetInfoRequest(backend=backend_spec("qe", {"pseudopotentials": {"Si": SI_PSEUDO}})), timeout=60
        )
    assert info.level_of_theory.startswith(f"qe:Si={SI_PSEUDO}")
    # The same request, to the same address, now gets a QE label (the failure is not re-served from the
    # oracle's durable job table, which lives on the host and survives the swap).
    labelled = _label(env, tmp_path, si, tmp_path / "qe.extxyz", *qe)
    assert labelled.returncode == 0, labelled.stderr
    frame = read_structures(tmp_path / "qe.extxyz")[0]
    assert frame.info[LEVEL_KEY].startswith(f"qe:Si={SI_PSEUDO};ecutwfc=20.0Ry")
    assert frame.get_potential_energy() < -200  # eV: Si2 in the diamond cell is about -15.7 Ry = -214 eV here
    # A run through the unchanged orchestrator checks the new oracle's backends and completes step 1.
    qe_config = _step1_config(tmp_path, {"backend": "qe", "pseudopotentials": {"Si": SI_PSEUDO}}, run="run-qe")
    run = _cli("run", str(qe_config), env=env, cwd=tmp_path)
    assert run.returncode == 0, run.stdout + run.stderr


def test_tls_and_token_secure_the_containers_and_refuse_a_client_without_the_token(
    built_images: None, tmp_path: Path
) -> None:
    """The caller's TLS files and token reach every container; the services talk to each other over TLS by
    their network names, the CLI with the token gets through, a client without it is refused."""
    names = "DNS:localhost,IP:127.0.0.1,DNS:orchestrator,DNS:sampler,DNS:oracle,DNS:trainer"
    (tmp_path / "pki").mkdir()
    pki = make_pki(tmp_path / "pki", names)
    (pki / "token").write_text("container-token\n")
    env = {
        "PYACEMAKER_HOME": str(tmp_path / "home"),
        ENV_TLS_CERT: str(pki / "server.pem"),
        ENV_TLS_KEY: str(pki / "server.key"),
        ENV_TLS_CA: str(pki / "ca.pem"),
        ENV_TOKEN_FILE: str(pki / "token"),
    }
    started = _up_lean_trio(tmp_path, env)
    try:
        assert started.returncode == 0, started.stderr
        registry = read_registry(tmp_path / "home")
        # The HEALTHCHECK inside the container speaks TLS (health needs no token).
        probe = podman.podman("healthcheck", "run", registry["sampler"].container)
        assert subprocess.run(probe, capture_output=True, text=True).returncode == 0
        # Step 1 across the containers: orchestrator -> sampler and oracle over TLS with the token.
        run = _cli("run", str(_step1_config(tmp_path, {"backend": "xtb"})), env=env, cwd=tmp_path)
        assert run.returncode == 0, run.stdout + run.stderr
        assert len(read_structures(tmp_path / "run" / "step1_direct" / "direct.extxyz")) == 5

        without_token = {k: v for k, v in env.items() if k != ENV_TOKEN_FILE}
        refused = _cli("status", env=without_token, cwd=tmp_path)
        assert refused.returncode != 0
        assert "missing token" in refused.stderr and "PYACEMAKER_TOKEN_FILE" in refused.stderr
        plain = {"PYACEMAKER_HOME": env["PYACEMAKER_HOME"], ENV_TOKEN_FILE: env[ENV_TOKEN_FILE]}
        assert _cli("status", env=plain, cwd=tmp_path).returncode != 0  # plain text to a TLS server
    finally:
        stopped = _cli("down", env=env, cwd=tmp_path)
        assert stopped.returncode == 0, stopped.stderr


def test_a_service_that_cannot_start_is_reported_with_its_log_and_nothing_is_left(
    built_images: None, tmp_path: Path
) -> None:
    env = {"PYACEMAKER_HOME": str(tmp_path / "home")}
    no_image = "oracle=localhost/no-such-image:latest"
    missing = _cli("up", "--runtime", "podman", "--services", "oracle", "--image", no_image, env=env, cwd=tmp_path)
    assert missing.returncode == 1
    assert (
        "error: image(s) not in podman's storage: localhost/no-such-image:latest (not built by `make images`"
        in missing.stderr
    )
    assert "not built:" not in missing.stderr  # only the image this test named is checked

    # The orchestrator's image started as the sampler: the orchestrator refuses to start without its peers.
    wrong = _cli(
        "up",
        "--runtime",
        "podman",
        "--ports",
        "auto",
        "--services",
        "sampler",
        "--image",
        f"sampler={images.image_tag('orchestrator')}",
        "--workdir",
        str(tmp_path),
        env=env,
        cwd=tmp_path,
    )
    assert wrong.returncode == 1
    assert "sampler container" in wrong.stderr and "exited with code 2 at start-up" in wrong.stderr
    assert "the following arguments are required: --sampler" in wrong.stderr  # the container's own log
    name = podman.deployment_name(tmp_path / "home")
    left = subprocess.run(podman.podman("ps", "--all", "--format", "{{.Names}}"), capture_output=True, text=True)
    assert name not in left.stdout
    assert not (tmp_path / "home" / "services.json").exists()


def test_on_empty_podman_storage_up_names_every_image_it_needs_and_the_command_that_builds_them(
    tmp_path: Path,
) -> None:
    """A fresh machine: podman's storage holds no image (a storage of the test's own, whatever the machine's holds)."""
    storage = tmp_path / "storage.conf"
    storage.write_text(
        f'[storage]\ndriver = "overlay"\ngraphroot = "{tmp_path / "graph"}"\nrunroot = "{tmp_path / "run"}"\n'
    )
    env = {"PYACEMAKER_HOME": str(tmp_path / "home"), "CONTAINERS_STORAGE_CONF": str(storage)}
    try:
        missing = _cli("up", "--runtime", "podman", env=env, cwd=tmp_path)
    finally:
        subprocess.run(["umount", "-l", str(tmp_path / "graph" / "overlay")], capture_output=True)
    assert missing.returncode == 1
    wanted = ", ".join(images.image_tag(podman.SERVICE_IMAGES[s]) for s in SERVICES)
    assert f"error: image(s) not built: {wanted} (build them with `make images`)" in missing.stderr
    assert set(podman.SERVICE_IMAGES.values()) <= set(images.DEFAULT_IMAGES)  # and `make images` builds each
    assert not (tmp_path / "home" / "services.json").exists()
    network = podman.deployment_name(tmp_path / "home")
    assert subprocess.run(podman.podman("network", "exists", network)).returncode != 0


def test_the_apptainer_definition_bootstraps_from_the_archive_the_build_saves(built_images: None) -> None:
    (archive,) = images.save_archives(["orchestrator"])
    definition = (REPO_ROOT / "containers" / "apptainer" / "orchestrator.def").read_text()
    assert f"From: {archive.relative_to(REPO_ROOT)}" in definition.splitlines()
    # A docker-archive as Apptainer's docker-archive bootstrap reads it: manifest.json naming the image.
    manifest = json.loads(
        subprocess.run(["tar", "-xOf", str(archive), "manifest.json"], capture_output=True, check=True).stdout
    )
    assert manifest[0]["RepoTags"] == [images.image_tag("orchestrator")]
    assert len(manifest[0]["Layers"]) >= 2
