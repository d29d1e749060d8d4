"""One calculation as a directory, and the worker that runs it: `python -m pyacemaker.services.oracle.task TASK_DIR`.

Every executor (local process pool, Slurm or PBS array task) runs this same worker, so a calculation behaves
the same wherever it runs. The task dir holds what the worker needs and what it leaves behind:

- `task.json`: the backend name and options, the number of SCF retries and the oracle's deployment settings
  (the worker runs the programs the deployment names, whatever the scheduler's environment);
- `structure.json`: the Structure message (exact doubles, charge and spin included);
- `labels.json`: the Labels, written atomically once the calculation ended, OK or FAILED;
- `worker.pid`: the worker's process id while it runs (lets a restarted local oracle see it still running);
- whatever the backend's code writes (the worker runs inside the dir), and the executor's logs.

The worker writes a label for every outcome it lives to see, a FAILED one included, and exits 0. A task
without `labels.json` after its process ended was killed from outside (time limit, node failure, cancel).
"""

from __future__ import annotations

import json
import logging
import os
import sys
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from google.protobuf import json_format

from pyacemaker.executors.base import PID_FILE
from pyacemaker.labels import Labels, labels_to_proto
from pyacemaker.services.oracle.deployment import OracleDeployment
from pyacemaker.structures import structure_to_atoms
from pyacemaker.v1 import common_pb2

log = logging.getLogger(__name__)

TASK_FILE = "task.json"
STRUCTURE_FILE = "structure.json"
RESULT_FILE = "labels.json"


def write_task(
    task_dir: Path,
    structure: common_pb2.Structure,
    backend: str,
    options: Mapping[str, Any],
    max_retries: int,
    deployment: OracleDeployment | None = None,
) -> None:
    """Fill a fresh task dir; a result left by an earlier run in the same dir is removed."""
    task_dir.mkdir(parents=True, exist_ok=True)
    (task_dir / RESULT_FILE).unlink(missing_ok=True)
    deployment = deployment if deployment is not None else OracleDeployment()
    spec = {
        "backend": backend,
        "options": dict(options),
        "max_retries": max_retries,
        "deployment": deployment.model_dump(mode="json"),
    }
    _write_atomically(task_dir / TASK_FILE, json.dumps(spec, indent=1, sort_keys=True))
    _write_atomically(task_dir / STRUCTURE_FILE, json_format.MessageToJson(structure))


def read_result(task_dir: Path) -> common_pb2.Labels | None:
    """The task's labels, or None while it has none (running, or killed before it could write them). A
    result file that is not valid Labels (written by something else) is a FAILED label saying so. The stored
    message, not a Labels value: the gateway only relays it, into the job table and the response."""
    try:
        text = (task_dir / RESULT_FILE).read_text()
    except FileNotFoundError:
        return None
    try:
        return json_format.Parse(text, common_pb2.Labels())
    except json_format.ParseError as exc:
        return labels_to_proto(Labels.failed(f"unreadable {task_dir / RESULT_FILE}: {exc}"))


def write_result(task_dir: Path, labels: common_pb2.Labels) -> None:
    _write_atomically(task_dir / RESULT_FILE, json_format.MessageToJson(labels))


def _write_atomically(path: Path, text: str) -> None:
    """Readers (the gateway polling a shared file system) see the whole file or none of it."""
    staging = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    staging.write_text(text)
    staging.replace(path)


def run_task(task_dir: Path) -> Labels:
    """Run the task's calculation (in the current directory) and return its labels; never raises for a
    failed calculation or a task the backend cannot run, which become FAILED labels saying why."""
    from pyacemaker.services.oracle.backends import create_backend

    spec = json.loads((task_dir / TASK_FILE).read_text())
    structure = json_format.Parse((task_dir / STRUCTURE_FILE).read_text(), common_pb2.Structure())
    level = ""
    start = time.perf_counter()
    try:
        deployment = OracleDeployment.model_validate(spec.get("deployment", {}))
        backend = create_backend(spec["backend"], spec["options"], deployment)
        level = backend.level_of_theory
        atoms = structure_to_atoms(structure)
        return backend.label_with_retries(atoms, int(spec["max_retries"]))
    except Exception as exc:  # a worker that cannot even start the calculation still reports why
        log.exception("task %s failed outside the calculation", task_dir)
        reason = f"task worker: {type(exc).__name__}: {exc}"
        return Labels.failed(reason, level, wall_time_s=time.perf_counter() - start, attempts=1)


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1:
        print("usage: python -m pyacemaker.services.oracle.task TASK_DIR", file=sys.stderr)
        return 2
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    task_dir = Path(args[0]).resolve()
    # Codes that write files (pw.x, VASP, PySCF's chkfile) write them here, next to the task's logs.
    os.chdir(task_dir)
    (task_dir / PID_FILE).write_text(str(os.getpid()))
    labels = run_task(task_dir)
    write_result(task_dir, labels_to_proto(labels))  # the result file holds the message
    status = "ok" if labels.ok else f"FAILED: {labels.reason}"
    log.info("task %s: %s after %d attempt(s), %.1f s", task_dir.name, status, labels.attempts, labels.wall_time_s)
    (task_dir / PID_FILE).unlink(missing_ok=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
