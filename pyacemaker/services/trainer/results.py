"""What a finished job leaves behind: `result.json` in its job directory, written once, atomically, by the
worker as its last act. The trainer reads it to learn the outcome even when it was not the process that
started the worker."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path

from pyacemaker.v1 import common_pb2

RESULT_FILE = "result.json"


@dataclass
class JobResult:
    """Figures of merit (each name ends in its unit) and the artifacts a job produced."""

    metrics: dict[str, float] = field(default_factory=dict)
    outputs: list[common_pb2.ArtifactRef] = field(default_factory=list)
    succeeded: bool = True
    error: str = ""


def write_result(job_dir: Path, result: JobResult) -> None:
    data = {
        "succeeded": result.succeeded,
        "error": result.error,
        "metrics": {name: float(value) for name, value in result.metrics.items()},
        "outputs": [{"uri": r.uri, "sha256": r.sha256, "size": r.size, "kind": r.kind} for r in result.outputs],
    }
    staging = job_dir / (RESULT_FILE + ".tmp")
    staging.write_text(json.dumps(data, indent=2, sort_keys=True))
    os.replace(staging, job_dir / RESULT_FILE)


def read_result(job_dir: Path) -> JobResult | None:
    """The job's result, or None when the worker never got to write one."""
    try:
        data = json.loads((job_dir / RESULT_FILE).read_text())
    except (OSError, json.JSONDecodeError):
        return None
    return JobResult(
        metrics={name: float(value) for name, value in data.get("metrics", {}).items()},
        outputs=[
            common_pb2.ArtifactRef(uri=o["uri"], sha256=o["sha256"], size=int(o["size"]), kind=o["kind"])
            for o in data.get("outputs", [])
        ],
        succeeded=bool(data.get("succeeded")),
        error=str(data.get("error", "")),
    )
