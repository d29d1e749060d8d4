"""A real single-node Slurm for tests: munged, slurmctld and slurmd started from scratch in a temp dir.

Everything the daemons write (state, spool, logs, pid files, the munge key and socket) lives in private
directories, the ports are picked free, and client commands find the cluster through SLURM_CONF, so the
cluster neither needs nor touches /etc/slurm, /etc/munge or a system munged. Teardown cancels the jobs, stops
the daemons and kills every process still carrying this cluster's SLURM_CONF (job steps that outlived
slurmd), also when the test failed.

Needs root (munged runs as user munge, slurmd as root) and the Debian packages slurm-wlm and munge; without
them `slurm_cluster` skips the test with a message that names what is missing.
"""

from __future__ import annotations

import contextlib
import os
import pwd
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

REQUIRED_BINARIES = ("munged", "slurmctld", "slurmd", "sbatch", "squeue", "scancel", "sinfo", "scontrol")
START_TIMEOUT_S = 30.0


@dataclass
class SlurmCluster:
    """A running cluster; `env` is what client commands (sbatch, squeue, ...) need to reach it."""

    root: Path
    conf: Path
    env: dict[str, str]
    processes: dict[str, subprocess.Popen[bytes]] = field(default_factory=dict)

    def run(self, *command: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        return subprocess.run(command, env=self.env, capture_output=True, text=True, timeout=30, check=check)

    def job_ids(self) -> list[str]:
        """Ids of every job slurmctld still knows (pending, running or recently ended), array tasks folded."""
        output = self.run("squeue", "-h", "-t", "all", "-o", "%F").stdout
        return sorted(set(output.split()), key=int)

    def logs(self) -> str:
        parts = []
        for name in ("slurmctld.log", "slurmd.log", "munged.log"):
            path = self.root / name
            if path.is_file():
                parts.append(f"--- {name} (last lines)\n" + "\n".join(path.read_text().splitlines()[-30:]))
        return "\n".join(parts)


def missing_requirement() -> str | None:
    """Why a real Slurm cannot be started here, or None when it can."""
    missing = [name for name in REQUIRED_BINARIES if shutil.which(name) is None]
    if missing:
        return f"Slurm test cluster: missing {', '.join(missing)} (Debian packages slurm-wlm and munge; `make install`)"
    if os.geteuid() != 0:
        return "Slurm test cluster: needs root (munged runs as user munge, slurmd as root)"
    try:
        pwd.getpwnam("munge")
    except KeyError:
        return "Slurm test cluster: missing the system user 'munge' (Debian package munge)"
    return None


def _free_ports(count: int) -> list[int]:
    sockets = []
    try:
        for _ in range(count):
            sock = socket.socket()
            sock.bind(("127.0.0.1", 0))
            sockets.append(sock)
        return [sock.getsockname()[1] for sock in sockets]
    finally:
        for sock in sockets:
            sock.close()


def _slurm_conf(root: Path, munge_socket: Path, ctld_port: int, slurmd_port: int) -> str:
    cpus = os.cpu_count() or 1
    return f"""\
ClusterName=pyacemaker-test
SlurmctldHost=localhost
SlurmctldPort={ctld_port}
SlurmdPort={slurmd_port}
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket={munge_socket}
SlurmUser=root
SlurmdUser=root
StateSaveLocation={root}/state
SlurmdSpoolDir={root}/spool
SlurmctldPidFile={root}/slurmctld.pid
SlurmdPidFile={root}/slurmd.pid
SlurmctldLogFile={root}/slurmctld.log
SlurmdLogFile={root}/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
SchedulerType=sched/builtin
SchedulerParameters=batch_sched_delay=0,sched_interval=1,sched_min_interval=100000
ReturnToService=2
MpiDefault=none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
KillWait=2
MinJobAge=600
NodeName=localhost NodeAddr=127.0.0.1 CPUs={cpus} State=UNKNOWN
PartitionName=debug Nodes=localhost Default=YES MaxTime=INFINITE State=UP
"""


def _wait_for(condition, what: str, cluster: SlurmCluster) -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + START_TIMEOUT_S
    while not condition():
        for name, process in cluster.processes.items():
            if process.poll() is not None:
                raise RuntimeError(
                    f"{name} exited with {process.returncode} while waiting for {what}\n{cluster.logs()}"
                )
        if time.monotonic() > deadline:
            raise RuntimeError(
                f"Slurm test cluster: {what} not reached within {START_TIMEOUT_S:.0f} s\n{cluster.logs()}"
            )
        time.sleep(0.1)


def _start_munged(munge_dir: Path, cluster: SlurmCluster) -> Path:
    """munged as user munge with a fresh key, all its files in `munge_dir` (which munge must own)."""
    user = pwd.getpwnam("munge")
    key = munge_dir / "munge.key"
    key.write_bytes(os.urandom(1024))
    key.chmod(0o400)
    for path in (munge_dir, key):
        os.chown(path, user.pw_uid, user.pw_gid)
    munge_dir.chmod(0o711)  # clients of every user must reach the socket; nothing else is readable
    munge_socket = munge_dir / "munge.socket"
    command = [
        "munged",
        "--foreground",
        f"--socket={munge_socket}",
        f"--key-file={key}",
        f"--pid-file={munge_dir / 'munged.pid'}",
        f"--seed-file={munge_dir / 'munged.seed'}",
    ]
    with open(cluster.root / "munged.log", "wb") as log:  # in the foreground munged logs to stderr
        cluster.processes["munged"] = subprocess.Popen(
            command, user=user.pw_uid, group=user.pw_gid, stdout=subprocess.DEVNULL, stderr=log
        )
    _wait_for(munge_socket.exists, "the munge socket", cluster)
    return munge_socket


def _node_state(cluster: SlurmCluster) -> str:
    result = cluster.run("sinfo", "-h", "-N", "-o", "%t", check=False)
    return result.stdout.strip() if result.returncode == 0 else ""


def _processes_with_env(name: str, value: str) -> list[int]:
    """Pids of processes whose environment has name=value (job steps of this cluster carry its SLURM_CONF)."""
    needle = f"{name}={value}".encode()
    pids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            environ = (entry / "environ").read_bytes()
        except OSError:
            continue
        if needle in environ.split(b"\0"):
            pids.append(int(entry.name))
    return pids


def _stop(cluster: SlurmCluster) -> None:
    if "slurmd" in cluster.processes and cluster.processes["slurmd"].poll() is None:
        with contextlib.suppress(subprocess.SubprocessError, OSError):
            cluster.run("scancel", "--partition=debug", check=False)
            deadline = time.monotonic() + 10
            while cluster.run("squeue", "-h", "-o", "%i", check=False).stdout.strip() and time.monotonic() < deadline:
                time.sleep(0.2)
    for name in ("slurmd", "slurmctld", "munged"):
        process = cluster.processes.get(name)
        if process is None or process.poll() is not None:
            continue
        process.terminate()
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
    # Job steps (slurmstepd and the job's own processes) are not children of slurmd once started.
    for pid in _processes_with_env("SLURM_CONF", str(cluster.conf)):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)


@contextlib.contextmanager
def slurm_cluster(root: Path) -> Iterator[SlurmCluster]:
    """Start munged, slurmctld and slurmd (node `localhost`, partition `debug`), wait until the node is idle,
    and point SLURM_CONF of this process at the cluster; everything is stopped and restored on exit."""
    reason = missing_requirement()
    if reason is not None:
        pytest.skip(reason)
    root.mkdir(parents=True, exist_ok=True)
    for name in ("state", "spool"):
        (root / name).mkdir(exist_ok=True)
    # munged refuses files in directories others can write and must reach its own: a private dir it owns.
    munge_dir = Path(tempfile.mkdtemp(prefix="pyacemaker-munge-"))
    conf = root / "slurm.conf"
    cluster = SlurmCluster(root, conf, {**os.environ, "SLURM_CONF": str(conf)})
    try:
        munge_socket = _start_munged(munge_dir, cluster)
        conf.write_text(_slurm_conf(root, munge_socket, *_free_ports(2)))
        cluster.processes["slurmctld"] = subprocess.Popen(
            ["slurmctld", "-D", "-i", "-f", str(conf)],
            env=cluster.env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.STDOUT,
        )
        _wait_for(lambda: cluster.run("scontrol", "ping", check=False).stdout.count("UP") > 0, "slurmctld UP", cluster)
        cluster.processes["slurmd"] = subprocess.Popen(
            ["slurmd", "-D", "-N", "localhost", "-f", str(conf)],
            env=cluster.env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.STDOUT,
        )
        _wait_for(lambda: _node_state(cluster) == "idle", "node localhost idle", cluster)
        # Client commands run by the code under test (sbatch, squeue) find this cluster too.
        previous_conf = os.environ.get("SLURM_CONF")
        os.environ["SLURM_CONF"] = str(conf)
        try:
            yield cluster
        finally:
            if previous_conf is None:
                os.environ.pop("SLURM_CONF", None)
            else:
                os.environ["SLURM_CONF"] = previous_conf
    finally:
        _stop(cluster)
        shutil.rmtree(munge_dir, ignore_errors=True)
