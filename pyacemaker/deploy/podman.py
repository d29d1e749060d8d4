"""The podman runtime: every service as a container on a private podman network, tracked in the same
$PYACEMAKER_HOME/services.json as the local runtime, so `pyacemaker run/status/label` work unchanged.

Inside the network each service listens on port 50051 of its own container and is reached by its name
(`sampler:50051`, `oracle:50051`, ...); each port is also published on 127.0.0.1 of the host, and those
addresses go into services.json. Every container mounts:

- `$PYACEMAKER_HOME/store` at /data/store: the artifact store (ArtifactRefs are relative to its root, so the
  mount point does not matter);
- `$PYACEMAKER_HOME/oracle` and `$PYACEMAKER_HOME/trainer` at /data/oracle and /data/trainer (the oracle's and
  the trainer's durable work dirs);
- the work dir (default: the current directory) at the same path, so a run dir under it, given by the CLI as
  an absolute host path, is the same path for the orchestrator in its container;
- the oracle's deployment file, when `up` is given one, read-only at /run/pyacemaker/oracle-deployment.yaml
  (the programs and directories it names must exist inside the oracle's image or its mounts).

Containers run as the calling user (uid:gid), so the files they write belong to the caller. Security files
named by PYACEMAKER_TLS_* / PYACEMAKER_TOKEN_FILE at `up` are mounted read-only and passed on, so the
services in the containers use the same TLS and token as the host's clients.

Swapping a backend is a redeployment: `up` with another image for one service (e.g. `--image
oracle=localhost/pyacemaker-oracle-qe:latest`) replaces only that container, on the same network name and
published port; the others keep running.
"""

from __future__ import annotations

import hashlib
import json
import os
import shlex
import shutil
import subprocess
import time
from collections.abc import Iterable, Mapping
from pathlib import Path

from pyacemaker.deploy.local import (
    DEFAULT_PORTS,
    SERVICES,
    DeployError,
    ServiceProcess,
    home_dir,
    read_registry,
    registry_path,
    store_dir,
    write_registry,
)
from pyacemaker.rpc import (
    SECURITY_FILE_VARIABLES,
    SECURITY_VALUE_VARIABLES,
    Security,
    check_health,
)

# runc: measured to work here (rootful). The storage driver is left to podman's configuration (it picks overlay
# where the file system allows; vfs works too but copies the whole image for every step and container, ~20 s
# each): an explicit --storage-driver is refused by a storage first used without one ("database storage graph
# driver "" does not match"), as happens on a fresh machine after a plain `podman images`.
# PYACEMAKER_PODMAN_OPTIONS replaces these global options ("" uses podman's configuration alone).
DEFAULT_PODMAN_OPTIONS = "--runtime runc"
# runc refuses the host's unlimited defaults here; these are ample for one service per container.
ULIMITS = ("--ulimit", "nofile=1024:1024", "--ulimit", "nproc=1024:1024")
CONTAINER_PORT = 50051
SECRETS_DIR = "/run/pyacemaker"
ORACLE_DEPLOYMENT_PATH = f"{SECRETS_DIR}/oracle-deployment.yaml"


class PodmanError(RuntimeError):
    """A podman command failed; the message names it."""


def podman(*args: str) -> list[str]:
    """The podman command line with this deployment's global options."""
    options = os.environ.get("PYACEMAKER_PODMAN_OPTIONS", DEFAULT_PODMAN_OPTIONS)
    return ["podman", *shlex.split(options), *args]


def podman_available() -> bool:
    return shutil.which("podman") is not None and shutil.which("runc") is not None


def _podman(*args: str, check: bool = True, timeout: float = 120.0) -> subprocess.CompletedProcess[str]:
    result = subprocess.run(podman(*args), capture_output=True, text=True, timeout=timeout, check=False)
    if check and result.returncode != 0:
        raise PodmanError(f"`{' '.join(podman(*args))}` failed: {result.stderr.strip() or result.stdout.strip()}")
    return result


def image_exists(tag: str) -> bool:
    return _podman("image", "exists", tag, check=False).returncode == 0


def image_size(tag: str) -> int:
    """Bytes of the image's layers (what `podman images` shows)."""
    return int(_podman("image", "inspect", "--format", "{{.Size}}", tag).stdout.strip())


def deployment_name(home: Path) -> str:
    """Network and container-name prefix of the deployment kept in `home` (several homes can coexist)."""
    return "pyacemaker-" + hashlib.sha256(str(home).encode()).hexdigest()[:8]


IMAGE_PREFIX = "localhost/pyacemaker-"
# The image `up` starts for each service unless --image names another: the oracle must serve mace (the teacher)
# and ace (validation) besides the DFT backend for a whole run, so it is the torch variant.
SERVICE_IMAGES = {"orchestrator": "orchestrator", "sampler": "sampler", "oracle": "oracle-mace", "trainer": "trainer"}


def image_tag(name: str) -> str:
    """The tag `make images` gives an image (a service name, or a variant such as oracle-qe)."""
    return f"{IMAGE_PREFIX}{name}:latest"


def missing_images_message(missing: Iterable[str]) -> str:
    """What `up` says when images are absent from podman's storage: each one, and the command that builds it."""
    missing = list(missing)
    ours = [tag for tag in missing if tag.startswith(IMAGE_PREFIX)]
    foreign = [tag for tag in missing if not tag.startswith(IMAGE_PREFIX)]
    parts = []
    if ours:
        parts.append(f"image(s) not built: {', '.join(ours)} (build them with `make images`)")
    if foreign:
        parts.append(
            f"image(s) not in podman's storage: {', '.join(foreign)} (not built by `make images`: build or load "
            "them with podman, or name another image with --image SERVICE=IMAGE)"
        )
    return "; ".join(parts)


def _image_id(image: str) -> str:
    return _podman("image", "inspect", "--format", "{{.Id}}", image).stdout.strip()


def _inspect(container: str) -> dict | None:
    result = _podman("container", "inspect", container, check=False)
    if result.returncode != 0:
        return None
    return json.loads(result.stdout)[0]


def _security_arguments(environ: Mapping[str, str]) -> list[str]:
    """Mounts and environment that give the containers the caller's TLS files and token."""
    Security.from_env(environ)  # a bad setting fails here, naming the variable, not inside a container
    arguments = []
    for variable in SECURITY_FILE_VARIABLES:
        value = environ.get(variable)
        if value:
            inside = f"{SECRETS_DIR}/{variable.lower()}"
            arguments += [
                "--volume",
                f"{Path(value).expanduser().resolve()}:{inside}:ro",
                "--env",
                f"{variable}={inside}",
            ]
    for variable in SECURITY_VALUE_VARIABLES:
        if environ.get(variable):
            arguments += ["--env", f"{variable}={environ[variable]}"]
    return arguments


def _service_arguments(service: str, oracle_deployment: Path | None = None) -> list[str]:
    if service == "orchestrator":
        peers = ("sampler", "oracle", "trainer")
        return [arg for peer in peers for arg in (f"--{peer}", f"{peer}:{CONTAINER_PORT}")]
    if service == "oracle" and oracle_deployment is not None:
        return ["--work-dir", "/data/oracle", "--deployment", ORACLE_DEPLOYMENT_PATH]
    if service in ("oracle", "trainer"):
        return ["--work-dir", f"/data/{service}"]
    return []


def _start_one(
    service: str,
    image: str,
    port: int,
    home: Path,
    workdir: Path,
    network: str,
    timeout: float,
    oracle_deployment: Path | None = None,
) -> ServiceProcess:
    container = f"{deployment_name(home)}-{service}"
    _podman("rm", "--force", "--ignore", container)
    publish = f"127.0.0.1:{port}:{CONTAINER_PORT}" if port else f"127.0.0.1::{CONTAINER_PORT}"
    mounts = ["--volume", f"{store_dir(home)}:/data/store", "--volume", f"{workdir}:{workdir}"]
    if service in ("oracle", "trainer"):
        (home / service).mkdir(parents=True, exist_ok=True)
        mounts += ["--volume", f"{home / service}:/data/{service}"]
    if service == "oracle" and oracle_deployment is not None:
        mounts += ["--volume", f"{oracle_deployment.resolve()}:{ORACLE_DEPLOYMENT_PATH}:ro"]
    command = podman("run", "--detach", "--name", container, "--network", network, "--network-alias", service)
    command += ["--publish", publish, "--user", f"{os.getuid()}:{os.getgid()}", *ULIMITS, *mounts]
    command += ["--label", f"io.pyacemaker.home={home}", "--label", f"io.pyacemaker.service={service}"]
    command += ["--env", f"OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', '1')}"]
    if not Path("/run/systemd/private").exists():
        # podman schedules the image's periodic HEALTHCHECK through systemd; without it, keep the check for
        # `podman healthcheck run` only (up waits on health itself).
        command += ["--health-interval", "disable"]
    command += [*_security_arguments(os.environ), image, *_service_arguments(service, oracle_deployment)]
    started = subprocess.run(command, capture_output=True, text=True, timeout=120, check=False)
    if started.returncode != 0:
        raise DeployError(f"{service}: podman run failed: {started.stderr.strip()}")
    deadline = time.monotonic() + timeout
    address = _published_address(container)
    security = Security.from_env()
    while not check_health(address, timeout=1.0, security=security):
        state = (_inspect(container) or {}).get("State", {})
        if not state.get("Running", False):
            raise DeployError(
                f"{service} container {container} exited with code {state.get('ExitCode')} at start-up; "
                f"last log lines:\n{_log_tail(container)}"
            )
        if time.monotonic() > deadline:
            raise DeployError(f"{service} container {container} did not report SERVING within {timeout:.0f} s")
        time.sleep(0.2)
    pid = int((_inspect(container) or {}).get("State", {}).get("Pid", 0))
    return ServiceProcess(
        name=service,
        pid=pid,
        address=address,
        log=f"podman logs {container}",
        runtime="podman",
        container=container,
        image=image,
    )


def _published_address(container: str) -> str:
    mapping = _podman("port", container, f"{CONTAINER_PORT}/tcp").stdout.strip().splitlines()
    if not mapping:
        raise DeployError(f"container {container} publishes no port")
    host, _, port = mapping[0].rpartition(":")
    return f"{host or '127.0.0.1'}:{port}"


def _log_tail(container: str, lines: int = 20) -> str:
    result = _podman("logs", "--tail", str(lines), container, check=False)
    return (result.stdout + result.stderr).strip()


def _running_healthy(proc: ServiceProcess, image: str) -> bool:
    """Running from `image` (compared by image id, so any name of it matches) and SERVING."""
    info = _inspect(proc.container) if proc.container else None
    if info is None or not info.get("State", {}).get("Running", False):
        return False
    return info.get("Image", "") == _image_id(image) and check_health(proc.address)


def up(
    home: Path | None = None,
    services: Iterable[str] | None = None,
    images: Mapping[str, str] | None = None,
    ports: Mapping[str, int] | None = None,
    workdir: Path | None = None,
    timeout: float = 120.0,
    oracle_deployment: Path | None = None,
) -> dict[str, ServiceProcess]:
    """Start the named services (default: all) as containers, each from `images[name]` (default: the image of
    SERVICE_IMAGES, e.g. localhost/pyacemaker-oracle-mace:latest for the oracle), unless one is already running
    healthy from that image; a service running from another image is replaced. `ports` maps names to published
    host ports (0: any free one). `oracle_deployment` is the oracle's deployment file, mounted read-only into
    its container."""
    if not podman_available():
        raise DeployError("podman and runc are needed for --runtime podman: apt-get install podman runc")
    home = home or home_dir()
    home.mkdir(parents=True, exist_ok=True)
    store_dir(home).mkdir(parents=True, exist_ok=True)
    workdir = (workdir or Path.cwd()).resolve()
    if workdir == Path(workdir.anchor):
        raise DeployError("the work dir is mounted into every container: give --workdir a project directory, not /")
    wanted = list(services or SERVICES)
    unknown = [name for name in wanted if name not in SERVICES]
    if unknown:
        raise DeployError(f"unknown service(s) {', '.join(unknown)}; known: {', '.join(SERVICES)}")
    chosen = {name: (images or {}).get(name) or image_tag(SERVICE_IMAGES[name]) for name in wanted}
    missing = [image for image in chosen.values() if not image_exists(image)]
    if missing:
        raise DeployError(missing_images_message(missing))
    ports = {**DEFAULT_PORTS, **(ports or {})}
    registry = read_registry(home)
    local = [p.name for p in registry.values() if p.runtime != "podman"]
    if local:
        raise DeployError(f"a local deployment is recorded in {home} ({', '.join(local)}); run `pyacemaker down`")
    network = deployment_name(home)
    if _podman("network", "exists", network, check=False).returncode != 0:
        _podman("network", "create", network)
    try:
        for name in SERVICES:  # dependency order: the orchestrator last
            if name not in chosen:
                continue
            current = registry.get(name)
            if current is not None and _running_healthy(current, chosen[name]):
                continue
            # A replaced service keeps its published port, so recorded addresses stay valid.
            port = int(current.address.rpartition(":")[2]) if current is not None else ports[name]
            registry[name] = _start_one(name, chosen[name], port, home, workdir, network, timeout, oracle_deployment)
            write_registry(home, registry)
    except Exception:
        down(home)
        raise
    return {name: registry[name] for name in SERVICES if name in registry}


def down(home: Path | None = None) -> list[str]:
    """Remove every container of this deployment (recorded or labelled with this home) and its network;
    returns the services that were running."""
    home = home or home_dir()
    registry = read_registry(home)
    labelled = _podman(
        "ps", "--all", "--filter", f"label=io.pyacemaker.home={home}", "--format", "{{.Names}}", check=False
    ).stdout.split()
    containers = {p.container for p in registry.values() if p.runtime == "podman" and p.container}
    containers.update(labelled)
    running = [p.name for p in registry.values() if p.runtime == "podman" and _is_running(p.container)]
    if containers:
        _podman("rm", "--force", "--ignore", "--time", "10", *sorted(containers), timeout=120)
    _podman("network", "rm", "--force", deployment_name(home), check=False)
    registry_path(home).unlink(missing_ok=True)
    return [name for name in reversed(SERVICES) if name in running]


def _is_running(container: str) -> bool:
    info = _inspect(container) if container else None
    return bool(info and info.get("State", {}).get("Running", False))
