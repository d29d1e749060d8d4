"""The local runtime: every service as a process on 127.0.0.1, tracked in $PYACEMAKER_HOME/services.json.

`up` starts the services in dependency order, waits until each reports SERVING through grpc.health.v1 and
records pid, address and log file; `down` stops them (SIGTERM, then SIGKILL after a grace period) so nothing
is left running.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from pyacemaker.rpc import check_health, wait_for_health

# Start order matters: the orchestrator is told where the others listen.
SERVICES = ("oracle", "sampler", "trainer", "orchestrator")
DEFAULT_PORTS = {"orchestrator": 50051, "sampler": 50052, "oracle": 50053, "trainer": 50054}


class DeployError(RuntimeError):
    """A service could not be started; the message says which and points at its log."""


@dataclass
class ServiceProcess:
    name: str
    pid: int
    address: str
    log: str
    # "local" (a process) or "podman" (a container: its name and image; `pid` is its main process).
    runtime: str = "local"
    container: str = ""
    image: str = ""


def home_dir() -> Path:
    return Path(os.environ.get("PYACEMAKER_HOME", Path.home() / ".pyacemaker")).expanduser().resolve()


def registry_path(home: Path) -> Path:
    return home / "services.json"


def read_registry(home: Path | None = None) -> dict[str, ServiceProcess]:
    path = registry_path(home or home_dir())
    if not path.is_file():
        return {}
    return {name: ServiceProcess(**entry) for name, entry in json.loads(path.read_text()).items()}


def write_registry(home: Path, processes: dict[str, ServiceProcess]) -> None:
    staging = registry_path(home).with_suffix(".tmp")
    staging.write_text(json.dumps({n: asdict(p) for n, p in processes.items()}, indent=2))
    staging.replace(registry_path(home))


def service_address(name: str, home: Path | None = None) -> str:
    """Where a service listens: $PYACEMAKER_<NAME>_ADDRESS, else the running local deployment, else the
    default port on loopback."""
    override = os.environ.get(f"PYACEMAKER_{name.upper()}_ADDRESS")
    if override:
        return override
    registry = read_registry(home)
    if name in registry:
        return registry[name].address
    return f"127.0.0.1:{DEFAULT_PORTS[name]}"


def store_dir(home: Path | None = None) -> Path:
    return (home or home_dir()) / "store"


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # A zombie child still answers kill(0); treat it as gone.
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[-1].split()[0] != "Z"


def _service_command(
    name: str,
    port: int,
    port_file: Path,
    store: Path,
    started: dict[str, ServiceProcess],
    oracle_deployment: Path | None = None,
):
    command = [sys.executable, "-m", f"pyacemaker.services.{name}", "--port", str(port), "--port-file", str(port_file)]
    command += ["--store", str(store)]
    if name == "oracle" and oracle_deployment is not None:
        command += ["--deployment", str(oracle_deployment)]
    if name == "orchestrator":
        command += ["--sampler", started["sampler"].address, "--oracle", started["oracle"].address]
        command += ["--trainer", started["trainer"].address]
    return command


def _start_one(
    name: str,
    port: int,
    home: Path,
    started: dict[str, ServiceProcess],
    timeout: float,
    oracle_deployment: Path | None = None,
):
    logs = home / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    log_path = logs / f"{name}.log"
    port_file = home / "run" / f"{name}.port"
    port_file.parent.mkdir(parents=True, exist_ok=True)
    port_file.unlink(missing_ok=True)
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1"), "PYTHONUNBUFFERED": "1"}
    with open(log_path, "ab") as log_handle:
        process = subprocess.Popen(
            _service_command(name, port, port_file, store_dir(home), started, oracle_deployment),
            stdout=log_handle,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            env=env,
            start_new_session=True,  # `down` signals the whole group; a Ctrl-C in the shell does not
        )
    deadline = time.monotonic() + timeout
    while not port_file.is_file():
        if process.poll() is not None:
            raise DeployError(f"{name} exited with code {process.returncode} at start-up; see {log_path}")
        if time.monotonic() > deadline:
            _terminate(process.pid)
            raise DeployError(f"{name} did not start within {timeout:.0f} s; see {log_path}")
        time.sleep(0.05)
    address = f"127.0.0.1:{int(port_file.read_text())}"
    wait_for_health(address, timeout=max(1.0, deadline - time.monotonic()))
    return ServiceProcess(name=name, pid=process.pid, address=address, log=str(log_path))


def _restart_or_start(
    name: str,
    port: int,
    previous: ServiceProcess | None,
    home: Path,
    started: dict[str, ServiceProcess],
    timeout: float,
    oracle_deployment: Path | None = None,
) -> ServiceProcess:
    """A service that died comes back on its old address when no port was asked for, so the services that
    talk to it (the orchestrator keeps its peers' addresses) reconnect by themselves; when that port is taken,
    any free one."""
    if port == 0 and previous is not None and previous.runtime == "local":
        try:
            port = int(previous.address.rsplit(":", 1)[1])
            return _start_one(name, port, home, started, timeout, oracle_deployment)
        except DeployError:
            pass
    return _start_one(name, port, home, started, timeout, oracle_deployment)


def up(
    home: Path | None = None,
    ports: dict[str, int] | None = None,
    timeout: float = 60.0,
    oracle_deployment: Path | None = None,
) -> dict[str, ServiceProcess]:
    """Start every service not already running and healthy. `ports` maps names to ports (0 = any free one);
    default: the well-known ports. `oracle_deployment` is the oracle's deployment file (--deployment; without
    it the oracle reads $PYACEMAKER_ORACLE_DEPLOYMENT, else uses its defaults)."""
    home = home or home_dir()
    home.mkdir(parents=True, exist_ok=True)
    ports = {**DEFAULT_PORTS, **(ports or {})}
    other = sorted({p.runtime for p in read_registry(home).values()} - {"local"})
    if other:
        raise DeployError(f"a {other[0]} deployment is recorded in {home}; run `pyacemaker down` first")
    recorded = read_registry(home)
    processes = {name: proc for name, proc in recorded.items() if pid_alive(proc.pid) and check_health(proc.address)}
    try:
        for name in SERVICES:
            if name not in processes:
                processes[name] = _restart_or_start(
                    name, ports[name], recorded.get(name), home, processes, timeout, oracle_deployment
                )
                write_registry(home, processes)
    except Exception:
        down(home)
        raise
    return processes


def _terminate(pid: int, grace: float = 10.0) -> None:
    try:
        os.killpg(pid, signal.SIGTERM)
    except ProcessLookupError:
        return
    deadline = time.monotonic() + grace
    while time.monotonic() < deadline and pid_alive(pid):
        time.sleep(0.05)
    if pid_alive(pid):
        with contextlib.suppress(ProcessLookupError):
            os.killpg(pid, signal.SIGKILL)


def down(home: Path | None = None) -> list[str]:
    """Stop every service of this deployment; returns the names that were running."""
    home = home or home_dir()
    processes = read_registry(home)
    stopped = []
    for name in reversed(SERVICES):
        proc = processes.get(name)
        if proc is None or proc.runtime != "local":  # containers are removed by their runtime's down()
            continue
        if pid_alive(proc.pid):
            _terminate(proc.pid)
            stopped.append(name)
    registry_path(home).unlink(missing_ok=True)
    return stopped
