"""The progress file a worker appends to and the trainer reads: one JSON object per line in
`<job dir>/progress.jsonl`.

A file (not a pipe or a socket) because the worker must outlive the trainer: whichever trainer process is
running reads what the worker wrote, also after a restart. Two kinds of line:

    {"kind": "stage", "stage": "fit", "done": 3, "total": 5, "message": "..."}
    {"kind": "training", "epoch": 4, "iteration": 40, "loss": 0.1, "energy_rmse": 0.002, "forces_rmse": 0.05,
     "member": 0}

Each line is written with one `write` call and flushed, so a reader sees whole lines or a trailing fragment
that it leaves for the next read.
"""

from __future__ import annotations

import json
import threading
from dataclasses import dataclass, field
from pathlib import Path

from pyacemaker.v1 import common_pb2, trainer_pb2

PROGRESS_FILE = "progress.jsonl"


class ProgressWriter:
    """Appends progress lines for one job; safe to call from several threads of the worker."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._lock = threading.Lock()

    def _append(self, record: dict[str, object]) -> None:
        line = json.dumps(record, sort_keys=True) + "\n"
        with self._lock, open(self.path, "a", encoding="utf-8") as handle:
            handle.write(line)
            handle.flush()

    def stage(self, stage: str, done: int = 0, total: int = 0, message: str = "") -> None:
        self._append({"kind": "stage", "stage": stage, "done": int(done), "total": int(total), "message": message})

    def training(
        self,
        epoch: int,
        iteration: int,
        loss: float,
        energy_rmse: float,
        forces_rmse: float,
        member: int = 0,
    ) -> None:
        """One evaluation of the model during training: validation RMSEs in eV/atom and eV/Å."""
        self._append(
            {
                "kind": "training",
                "epoch": int(epoch),
                "iteration": int(iteration),
                "loss": float(loss),
                "energy_rmse": float(energy_rmse),
                "forces_rmse": float(forces_rmse),
                "member": int(member),
            }
        )


@dataclass
class ProgressReader:
    """Incremental reader of one progress file: `read_new` returns the training lines added since the last
    call and keeps the latest stage line."""

    path: Path
    offset: int = 0
    latest_stage: common_pb2.Progress = field(default_factory=common_pb2.Progress)

    def read_new(self) -> list[trainer_pb2.TrainingProgress]:
        try:
            with open(self.path, "rb") as handle:
                handle.seek(self.offset)
                chunk = handle.read()
        except FileNotFoundError:
            return []
        end = chunk.rfind(b"\n")
        if end < 0:
            return []
        self.offset += end + 1
        training = []
        for raw in chunk[: end + 1].splitlines():
            try:
                record = json.loads(raw)
            except json.JSONDecodeError:
                continue  # a line from a worker killed mid-write is skipped, not fatal
            if record.get("kind") == "stage":
                self.latest_stage = common_pb2.Progress(
                    stage=str(record.get("stage", "")),
                    done=int(record.get("done", 0)),
                    total=int(record.get("total", 0)),
                    message=str(record.get("message", "")),
                )
            elif record.get("kind") == "training":
                training.append(
                    trainer_pb2.TrainingProgress(
                        epoch=int(record["epoch"]),
                        iteration=int(record["iteration"]),
                        loss=float(record["loss"]),
                        energy_rmse=float(record["energy_rmse"]),
                        forces_rmse=float(record["forces_rmse"]),
                        member=int(record.get("member", 0)),
                    )
                )
        return training
