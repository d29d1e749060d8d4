"""Task processes forked from a warm process: `python -m pyacemaker.services.oracle.zygote`.

A local task used to be a fresh `python -m pyacemaker.services.oracle.task DIR`: the interpreter's start and the
imports (pyacemaker, numpy, ASE, PySCF) took 1.3 of the 7.2 s of every B3LYP call of the SN2 flagship. The zygote
imports all that once and forks one child per task instead (the local executor starts it,
`pyacemaker.executors.local`). Each task still runs in a process of its own, in a
session of its own (a timeout kills its whole group; a crash takes only that child down) with its output in its
task log, exactly as before; only the start is shared.

Protocol, one line per message on stdin / stdout:
- in: `TASK_DIR\\tLOG_FILE` — fork a child that runs the task runner on TASK_DIR, its stdout and stderr appended to
  LOG_FILE;
- out: `started PID` (in the order of the requests), `ended PID CODE` when a child ended (CODE as Popen's
  returncode: negative for a signal). `failed REASON` instead of `started` when no child could be forked.
The zygote ends when its stdin closes; children still running go on (their results are files in their task dirs).
"""

from __future__ import annotations

import contextlib
import importlib
import os
import select
import sys

# Imported before any fork: the task runner and what the calculations import (those not installed are skipped).
WARM_MODULES = (
    "pyacemaker.services.oracle.task",
    "pyacemaker.services.oracle.backends",
    "pyscf.dft",
    "pyscf.grad.rks",
    "pyscf.grad.uks",
)


def _warm_up() -> None:
    for name in WARM_MODULES:
        with contextlib.suppress(ImportError):
            importlib.import_module(name)


def _child(task_dir: str, log_file: str) -> None:
    """In the forked child: a session of its own, output to the task log, the task runner; never returns."""
    code = 1
    try:
        os.setsid()
        log_fd = os.open(log_file, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        null_fd = os.open(os.devnull, os.O_RDONLY)
        os.dup2(null_fd, 0)
        os.dup2(log_fd, 1)
        os.dup2(log_fd, 2)
        os.close(log_fd)
        os.close(null_fd)
        from pyacemaker.services.oracle.task import main

        code = main([task_dir])
    except BaseException as exc:  # the child must end here, whatever happened
        print(f"zygote child: {type(exc).__name__}: {exc}", file=sys.stderr)
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)


def serve(requests: int, replies: int) -> None:
    """Fork a child per request line read from fd `requests`; report to fd `replies` (module docstring)."""
    pending = b""
    running: set[int] = set()
    while True:
        readable, _, _ = select.select([requests], [], [], 0.1)
        if readable:
            chunk = os.read(requests, 65536)
            if not chunk:
                return
            pending += chunk
            while b"\n" in pending:
                line, pending = pending.split(b"\n", 1)
                task_dir, _, log_file = line.decode().partition("\t")
                try:
                    pid = os.fork()
                except OSError as exc:
                    os.write(replies, f"failed {exc}\n".encode())
                    continue
                if pid == 0:
                    _child(task_dir, log_file)
                running.add(pid)
                os.write(replies, f"started {pid}\n".encode())
        while running:
            pid, status = os.waitpid(-1, os.WNOHANG)
            if pid == 0:
                break
            running.discard(pid)
            os.write(replies, f"ended {pid} {os.waitstatus_to_exitcode(status)}\n".encode())


def main() -> int:
    _warm_up()
    serve(sys.stdin.fileno(), sys.stdout.fileno())
    return 0


if __name__ == "__main__":
    sys.exit(main())
