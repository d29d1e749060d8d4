"""Step 5: the surrogate MD frames labelled by the fine-tuned MACE committee, streamed into extxyz shards.

Frames stream from step 4's extxyz file through the oracle (mace backend over the committee of step 3) into
shards of `surrogate_labelling.shard_size` frames. The step holds at most IN_FLIGHT_BATCHES request batches of
frames awaiting their labels (left to gRPC's flow control, megabytes of frames would pile up in both
processes) and one write buffer, never the whole set, so neither its memory nor the oracle's grows with the
frame count or the shard size; the oracle answers each request batch before it reads the next.
A labelled frame keeps its input info and gains energy (eV), forces (eV/Å), stress (eV/Å³, periodic cells
only), the committee spread (`energy_std`, `max_force_std` in info, per-atom `force_std`) and the level of
theory. A frame the committee cannot label is left out of its shard and listed in the summary.

Resume: shards are written into <run_dir>/.work/surrogate_labelling/<key[:16]>/ as a temp file renamed when
complete, followed by a small record (`shard_0000.json`: its input range, file digest, failed frames). A
restarted step with the same key checks the shards in order (record present, digest equal, the content ids
of its frames equal to those of the input frames it covers) and labels again from the first that fails; a
different key (other frames, models or settings) uses another dir, and the dirs of other keys are removed.
When every shard is done they move into the artifact store and the work dir is removed.

Exports: every shard and the summary go to the run dir (`step5_surrogate_labels/`), so the user has the
training set beside the other results. That doubles the shards' disk use: about 0.9 kB per 6-atom frame, so
~90 MB for 100 000 SN2 frames (the copy in the store is the one later steps read).
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import shutil
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from itertools import islice, zip_longest
from pathlib import Path
from typing import Any

import grpc
from ase import Atoms

from pyacemaker.artifacts import sha256_of_file
from pyacemaker.clients.oracle import stream_labels
from pyacemaker.rpc import channel
from pyacemaker.run_layout import SURROGATE_LABELS_DIR, StepName
from pyacemaker.structures import (
    StructureFileError,
    attach_labels,
    content_id,
    count_extxyz_frames,
    iter_extxyz,
    write_extxyz,
)
from pyacemaker.v1 import common_pb2, oracle_pb2
from services.orchestrator.steps import StepContext, StepOutcome
from services.orchestrator.steps.mace_finetune import committee_models, committee_spec

EXPORT_DIR = SURROGATE_LABELS_DIR
# Labelled frames written to the shard file at a time (bounds the write buffer, whatever the shard size).
WRITE_CHUNK = 256
# Structures sent to the oracle but not yet answered, in request batches: enough to keep the oracle busy
# while answers travel back, and a bound on what both processes hold whatever the shard size.
IN_FLIGHT_BATCHES = 4
# Progress is reported every this many frames, and when a shard is complete.
REPORT_EVERY = 1024
# Failed frames listed with their reasons in the summary at most (the shard records list every one).
SUMMARY_FAILED_LIMIT = 1000
_OK = common_pb2.LABEL_STATUS_OK


@dataclass
class ShardRecord:
    """What a complete shard holds; written beside it as JSON once the shard file is in place."""

    index: int
    first_frame: int  # index of its first input frame in the surrogate frames file
    n_input: int  # input frames it covers: shard_size, fewer for the last shard
    n_labelled: int
    sha256: str  # of the shard file
    level_of_theory: str
    max_force_std_max: float  # largest committee max_force_std over its frames, eV/Å
    max_force_std_sum: float  # for the mean over all shards
    # {"frame": input index, "content_id": ..., "reason": ...} for each frame the committee could not label.
    failed: list[dict[str, Any]] = field(default_factory=list)

    @property
    def name(self) -> str:
        return shard_name(self.index)


def shard_name(index: int) -> str:
    return f"shard_{index:04d}"


class SurrogateLabellingStep:
    name = StepName.SURROGATE_LABELLING
    version = 1

    def key_material(self, ctx: StepContext) -> dict[str, Any]:
        return {
            "frames": _frames_ref(ctx).sha256,
            "committee": [ref.sha256 for ref in committee_models(ctx)],
            "surrogate_labelling": ctx.config.surrogate_labelling.model_dump(mode="json"),
        }

    def run(self, ctx: StepContext) -> StepOutcome:
        settings = ctx.config.surrogate_labelling
        frames_path = ctx.store.path(_frames_ref(ctx))
        spec = committee_spec(ctx, committee_models(ctx), batch_size=settings.batch_size)
        work_dir = work_dir_for(ctx)
        records, reused = label_into_shards(
            frames_path,
            ctx.oracle_address,
            spec,
            work_dir,
            shard_size=settings.shard_size,
            batch_size=settings.batch_size,
            report=ctx.report,
            timeout=ctx.call_timeout_s,
        )
        n_labelled = sum(r.n_labelled for r in records)
        if n_labelled == 0:
            first = records[0].failed[0] if records and records[0].failed else {"reason": "no frames"}
            raise RuntimeError(
                f"the committee labelled none of the surrogate frames in {frames_path} (first failure: "
                f"{first['reason']})"
            )
        shards = {
            r.name: ctx.store.put_file(work_dir / f"{r.name}.extxyz", kind="structures", move=True) for r in records
        }
        summary = _summary(records, settings.shard_size, [ref.sha256 for ref in committee_models(ctx)])
        summary_ref = ctx.store.put_bytes(
            json.dumps(summary, indent=1).encode(), kind="labelling_summary", suffix=".json"
        )
        shutil.rmtree(work_dir)
        with contextlib.suppress(OSError):  # the step's dir under .work, unless another attempt uses it
            work_dir.parent.rmdir()
        outputs = {**shards, "summary": summary_ref}
        exports = {f"{ctx.export_prefix}{EXPORT_DIR}/{name}.extxyz": ref for name, ref in shards.items()}
        exports[f"{ctx.export_prefix}{EXPORT_DIR}/summary.json"] = summary_ref
        metrics = {
            "n_frames": float(summary["n_frames"]),
            "n_labelled": float(n_labelled),
            "n_failed": float(summary["n_failed"]),
            "n_shards": float(len(records)),
            "n_shards_reused": float(reused),
            "max_force_std_max_ev_per_a": summary["max_force_std_max_ev_per_a"],
            "max_force_std_mean_ev_per_a": summary["max_force_std_mean_ev_per_a"],
        }
        return StepOutcome(outputs=outputs, metrics=metrics, exports=exports)


def _frames_ref(ctx: StepContext) -> common_pb2.ArtifactRef:
    frames = ctx.previous.get(StepName.SURROGATE_MD, {}).get("frames")
    if frames is None:
        raise RuntimeError(
            f"step 5 needs the surrogate frames: output 'frames' of step '{StepName.SURROGATE_MD}' is missing"
        )
    return frames


def work_dir_for(ctx: StepContext) -> Path:
    """This key's shard dir; dirs left by attempts with other keys (other inputs or settings) are removed."""
    if not ctx.key:
        raise RuntimeError("the step key is not set (the runner sets ctx.key before running a step)")
    parent = ctx.run_dir / ".work" / SurrogateLabellingStep.name
    work_dir = parent / ctx.key[:16]
    if parent.is_dir():
        for stale in parent.iterdir():
            if stale != work_dir and stale.is_dir():
                shutil.rmtree(stale)
    work_dir.mkdir(parents=True, exist_ok=True)
    return work_dir


def label_into_shards(
    frames_path: Path,
    oracle_address: str,
    spec: oracle_pb2.BackendSpec,
    work_dir: Path,
    shard_size: int,
    batch_size: int,
    report: Callable[[common_pb2.Progress], None],
    timeout: float,
) -> tuple[list[ShardRecord], int]:
    """Label every frame of `frames_path` through the oracle into complete shards in `work_dir` (reusing the
    ones a previous attempt completed there); returns the shard records and how many were reused."""
    total = count_extxyz_frames(frames_path)
    if total == 0:
        raise ValueError(f"{frames_path}: the surrogate frames file holds no frames")
    n_shards = math.ceil(total / shard_size)
    records = _reusable_shards(frames_path, work_dir, shard_size, total, report)
    reused = len(records)
    keep = {f"{r.name}{suffix}" for r in records for suffix in (".extxyz", ".json")}
    for stale in work_dir.iterdir():  # what comes after the last good shard is redone
        if stale.name not in keep:
            stale.unlink()
    if reused == n_shards:
        return records, reused
    frames = iter_extxyz(frames_path, start=reused * shard_size)
    progress = _Progress(report, total, done=reused * shard_size)
    with channel(oracle_address) as ch:
        for index in range(reused, n_shards):
            first = index * shard_size
            chunk = islice(frames, min(shard_size, total - first))
            records.append(_label_shard(ch, spec, chunk, index, first, work_dir, batch_size, timeout, progress))
            progress.shard_written(index, n_shards)
    return records, reused


class _Progress:
    def __init__(self, report: Callable[[common_pb2.Progress], None], total: int, done: int) -> None:
        self.report, self.total, self.done = report, total, done
        self.report(self._message(f"labelling from frame {done}"))

    def _message(self, text: str) -> common_pb2.Progress:
        return common_pb2.Progress(stage="surrogate_labelling", done=self.done, total=self.total, message=text)

    def frame_done(self) -> None:
        self.done += 1
        if self.done % REPORT_EVERY == 0:
            self.report(self._message("surrogate labels"))

    def shard_written(self, index: int, n_shards: int) -> None:
        self.report(self._message(f"shard {index + 1} of {n_shards} written"))


def _label_shard(
    ch: grpc.Channel,
    spec: oracle_pb2.BackendSpec,
    frames: Iterator[Atoms],
    index: int,
    first_frame: int,
    work_dir: Path,
    batch_size: int,
    timeout: float,
    progress: _Progress,
) -> ShardRecord:
    """One shard through one oracle stream, written in input order to a temp file that is renamed into place
    once complete; then its record."""
    path = work_dir / f"{shard_name(index)}.extxyz"
    partial = path.with_name(path.name + ".partial")
    partial.write_bytes(b"")
    in_flight: dict[int, Atoms] = {}  # sent, not yet answered: at most IN_FLIGHT_BATCHES batches
    read_errors: list[Exception] = []

    def outgoing() -> Iterator[Atoms]:
        # Runs in gRPC's request thread: an exception here would only cancel the call, so it ends the stream
        # and is raised below, in the step's thread, with its own message.
        try:
            for offset, atoms in enumerate(frames):
                in_flight[offset] = atoms
                yield atoms
        except Exception as exc:
            read_errors.append(exc)

    record = ShardRecord(index, first_frame, 0, 0, "", "", 0.0, 0.0)
    answered: dict[int, common_pb2.Labels] = {}  # labels that came back ahead of an earlier frame's
    buffer: list[Atoms] = []
    # closing(): a cancelled run (report raising) cancels the oracle call at once, not when garbage-collected.
    with contextlib.closing(
        stream_labels(
            ch,
            spec,
            outgoing(),
            batch_size=batch_size,
            timeout=timeout,
            max_in_flight=IN_FLIGHT_BATCHES * batch_size,
        )
    ) as results:
        for offset, labels in results:
            answered[offset] = labels
            while record.n_input in answered:
                _add_frame(record, in_flight.pop(record.n_input), answered.pop(record.n_input), buffer)
                progress.frame_done()
                if len(buffer) >= WRITE_CHUNK:
                    write_extxyz(partial, buffer, append=True)
                    buffer.clear()
    if read_errors:
        raise read_errors[0]
    if in_flight:
        raise RuntimeError(f"the oracle returned no label for surrogate frame {first_frame + min(in_flight)}")
    write_extxyz(partial, buffer, append=True)
    with open(partial, "rb+") as handle:
        os.fsync(handle.fileno())  # on disk before the rename marks it complete
    os.replace(partial, path)
    record.sha256 = sha256_of_file(path)
    _write_json_atomically(work_dir / f"{record.name}.json", asdict(record))
    return record


def _add_frame(record: ShardRecord, atoms: Atoms, labels: common_pb2.Labels, buffer: list[Atoms]) -> None:
    frame = record.first_frame + record.n_input
    record.n_input += 1
    if labels.status != _OK:
        record.failed.append({"frame": frame, "content_id": content_id(atoms), "reason": labels.reason})
        return
    labelled = attach_labels(atoms, labels)
    # Timing differs run to run; without it a shard's bytes depend only on its frames and the committee.
    labelled.info.pop("wall_time_s", None)
    record.n_labelled += 1
    record.level_of_theory = labels.level_of_theory
    record.max_force_std_max = max(record.max_force_std_max, labels.uncertainty.max_force_std)
    record.max_force_std_sum += labels.uncertainty.max_force_std
    buffer.append(labelled)


def _write_json_atomically(path: Path, data: Any) -> None:
    staging = path.with_name(path.name + ".partial")
    staging.write_text(json.dumps(data, indent=1))
    os.replace(staging, path)


def _reusable_shards(
    frames_path: Path, work_dir: Path, shard_size: int, total: int, report: Callable[[common_pb2.Progress], None]
) -> list[ShardRecord]:
    """The complete shards of an earlier attempt that still verify, from shard 0 up to the first that does not."""
    records: list[ShardRecord] = []
    if not (work_dir / f"{shard_name(0)}.json").is_file():
        return records
    frames = iter_extxyz(frames_path)
    for index in range(math.ceil(total / shard_size)):
        first = index * shard_size
        expected = [content_id(atoms) for atoms in islice(frames, min(shard_size, total - first))]
        record, problem = verify_shard(work_dir, index, first, expected)
        if record is None:
            report(
                common_pb2.Progress(stage="surrogate_labelling", message=f"redoing from {shard_name(index)}: {problem}")
            )
            break
        records.append(record)
        report(
            common_pb2.Progress(
                stage="surrogate_labelling",
                done=first + len(expected),
                total=total,
                message=f"{shard_name(index)} from an earlier attempt verified",
            )
        )
    return records


def verify_shard(work_dir: Path, index: int, first_frame: int, input_ids: list[str]) -> tuple[ShardRecord | None, str]:
    """(record, "") when shard `index` in `work_dir` is complete and covers exactly the input frames whose
    content ids are `input_ids` (starting at `first_frame`), else (None, what is wrong)."""
    name = shard_name(index)
    shard, record_path = work_dir / f"{name}.extxyz", work_dir / f"{name}.json"
    if not shard.is_file() or not record_path.is_file():
        return None, f"{name} is incomplete"
    try:
        record = ShardRecord(**json.loads(record_path.read_text()))
    except (ValueError, TypeError) as exc:
        return None, f"{record_path.name} is unreadable ({exc})"
    if record.index != index or record.first_frame != first_frame or record.n_input != len(input_ids):
        return (
            None,
            f"{name} covers frames {record.first_frame}+{record.n_input}, expected {first_frame}+{len(input_ids)}",
        )
    if sha256_of_file(shard) != record.sha256:
        return None, f"{shard.name} was altered after it was written"
    failed = {entry["frame"] - first_frame: entry["content_id"] for entry in record.failed}
    if any(input_ids[offset] != cid for offset, cid in failed.items() if 0 <= offset < len(input_ids)):
        return None, f"{name}'s failed frames are not the input frames at their indices"
    wanted = [cid for offset, cid in enumerate(input_ids) if offset not in failed]
    if record.n_labelled != len(wanted):
        return None, f"{record_path.name} counts {record.n_labelled} labelled frames, expected {len(wanted)}"
    try:
        held = (content_id(atoms) for atoms in iter_extxyz(shard))
        for position, (got, expected) in enumerate(zip_longest(held, wanted)):
            if got != expected:
                return None, f"{name} frame {position} is not the input frame it should hold"
    except StructureFileError as exc:
        return None, str(exc)
    return record, ""


def _summary(records: list[ShardRecord], shard_size: int, models: list[str]) -> dict[str, Any]:
    """The labelling in numbers; the same for a resumed and an uninterrupted run (no timings, no reuse counts)."""
    n_labelled = sum(r.n_labelled for r in records)
    failed = [entry for r in records for entry in r.failed]
    return {
        "n_frames": sum(r.n_input for r in records),
        "n_labelled": n_labelled,
        "n_failed": len(failed),
        "shard_size": shard_size,
        "committee_sha256": models,
        "level_of_theory": next((r.level_of_theory for r in records if r.level_of_theory), ""),
        "max_force_std_max_ev_per_a": max(r.max_force_std_max for r in records),
        "max_force_std_mean_ev_per_a": sum(r.max_force_std_sum for r in records) / max(n_labelled, 1),
        "shards": [
            {
                "name": r.name,
                "first_frame": r.first_frame,
                "n_input": r.n_input,
                "n_labelled": r.n_labelled,
                "n_failed": len(r.failed),
                "sha256": r.sha256,
            }
            for r in records
        ],
        "failed_frames": failed[:SUMMARY_FAILED_LIMIT],
    }
