"""Step 5: the surrogate MD frames labelled by the fine-tuned MACE committee, streamed into extxyz shards.

Frames stream from step 4's extxyz file through the oracle (mace backend over the committee of step 3) into
shards of `surrogate_labelling.shard_size` frames. With more than one oracle instance (the orchestrator's
`--labelling-oracle` addresses besides `--oracle`, e.g. one per GPU node, all sharing the artifact store), the
shards are spread over them: each instance labels one shard at a time and takes the next unlabelled one when it
is done, so a fast node does more. An instance that fails hands its shard back and drops out; the step fails
only when no instance is left. The shards, their order and their bytes do not depend on how many instances
labelled them. The step holds at most IN_FLIGHT_BATCHES request batches of
frames awaiting their labels (left to gRPC's flow control, megabytes of frames would pile up in both
processes) and one write buffer, never the whole set, so neither its memory nor the oracle's grows with the
frame count or the shard size; the oracle answers each request batch before it reads the next.
A labelled frame keeps its input info and gains energy (eV), forces (eV/Å), stress (eV/Å³, periodic cells
only), the committee spread (`energy_std`, `max_force_std` in info, per-atom `force_std`) and the level of
theory. A frame the committee cannot label is left out of its shard and listed in the summary.

Resume: shards are written into <run_dir>/.work/surrogate_labelling/<key[:16]>/ as a temp file renamed when
complete, followed by a small record (`shard_0000.json`: its input range, file digest, failed frames). A
restarted step with the same key checks every shard that has a record (digest equal, the content ids of its
frames equal to those of the input frames it covers) and labels only the ones missing or failing the check
(shards finish out of order when several instances label them); a different key (other frames, models or
settings) uses another dir, and the dirs of other keys are removed.
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
import queue
import shutil
import threading
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from itertools import islice, zip_longest
from pathlib import Path
from typing import Any

import grpc
from ase import Atoms

from pyacemaker.artifacts import sha256_of_file
from pyacemaker.clients.oracle import stream_labels
from pyacemaker.labels import Labels
from pyacemaker.rpc import channel
from pyacemaker.run_layout import SURROGATE_LABELS_DIR, StepName
from pyacemaker.services.orchestrator.steps import StepContext, StepOutcome
from pyacemaker.services.orchestrator.steps.mace_finetune import committee_models, committee_spec
from pyacemaker.structures import (
    StructureFileError,
    attach_labels,
    content_id,
    count_extxyz_frames,
    iter_extxyz,
    write_extxyz,
)
from pyacemaker.v1 import common_pb2, oracle_pb2

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
            labelling_oracles(ctx),
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


def labelling_oracles(ctx: StepContext) -> list[str]:
    """The oracle instances that label the shards: the run's oracle first, then the extra ones, each once."""
    return list(dict.fromkeys([ctx.oracle_address, *ctx.labelling_oracle_addresses]))


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
    oracle_addresses: Sequence[str],
    spec: oracle_pb2.BackendSpec,
    work_dir: Path,
    shard_size: int,
    batch_size: int,
    report: Callable[[common_pb2.Progress], None],
    timeout: float,
) -> tuple[list[ShardRecord], int]:
    """Label every frame of `frames_path` into complete shards in `work_dir`, spread over the oracle instances
    at `oracle_addresses` (reusing the shards a previous attempt completed there); returns the shard records in
    order and how many were reused."""
    total = count_extxyz_frames(frames_path)
    if total == 0:
        raise ValueError(f"{frames_path}: the surrogate frames file holds no frames")
    if not oracle_addresses:
        raise ValueError("no oracle address to label the surrogate frames with")
    n_shards = math.ceil(total / shard_size)
    done = _reusable_shards(frames_path, work_dir, shard_size, total, report)
    keep = {f"{r.name}{suffix}" for r in done.values() for suffix in (".extxyz", ".json")}
    for stale in work_dir.iterdir():  # partial files and shards that failed their check are redone
        if stale.name not in keep:
            stale.unlink()
    todo = [index for index in range(n_shards) if index not in done]
    if todo:
        relay = _ReportRelay(report)
        progress = _Progress(relay, total, done=sum(r.n_input for r in done.values()))
        shared = _SharedShards(todo)
        job = _ShardJob(frames_path, spec, work_dir, shard_size, total, batch_size, timeout)
        workers = [
            threading.Thread(
                target=_label_shards_through,
                args=(address, job, shared, progress, len(oracle_addresses) > 1),
                name=f"surrogate-labelling-{number}",
                daemon=True,
            )
            for number, address in enumerate(oracle_addresses)
        ]
        for worker in workers:
            worker.start()
        relay.serve(workers)
        if shared.remaining:
            raise shared.failures[0][1]  # every instance failed: the first failure says why
        done.update(shared.records)
    return [done[index] for index in range(n_shards)], n_shards - len(todo)


class _StepStoppedError(Exception):
    """Raised in a shard worker once the step is stopping (the run was cancelled)."""


class _ReportRelay:
    """Progress from the shard workers, reported by the step's own thread: the runner's report records it in
    the run's state and raises RunCancelledError there once the run is cancelled. A worker waits until its report
    was made, so every worker stops at its next frame after a cancel, as a single-threaded step would."""

    def __init__(self, report: Callable[[common_pb2.Progress], None]) -> None:
        self._report = report
        self._queue: queue.Queue[tuple[common_pb2.Progress, threading.Event]] = queue.Queue()
        self.stopped = threading.Event()
        self._error: BaseException | None = None

    def __call__(self, progress: common_pb2.Progress) -> None:
        """From a worker: report `progress` and wait until it was; _StepStoppedError once the step stops."""
        self.check()
        reported = threading.Event()
        self._queue.put((progress, reported))
        reported.wait()
        self.check()

    def report_here(self, progress: common_pb2.Progress) -> None:
        """From the step's own thread, before the workers start."""
        self._report(progress)

    def check(self) -> None:
        if self.stopped.is_set():
            raise _StepStoppedError()

    def serve(self, workers: list[threading.Thread]) -> None:
        """In the step's thread: report for the workers until all of them have ended; then raise what the
        report raised (RunCancelledError), if anything."""
        while any(worker.is_alive() for worker in workers) or not self._queue.empty():
            try:
                progress, reported = self._queue.get(timeout=0.2)
            except queue.Empty:
                continue
            try:
                if self._error is None:
                    self._report(progress)
            except BaseException as exc:  # RunCancelledError, or a report that failed: stop every worker
                self._error = exc
                self.stopped.set()
            finally:
                reported.set()
        if self._error is not None:
            raise self._error


class _Progress:
    def __init__(self, relay: _ReportRelay, total: int, done: int) -> None:
        self.relay, self.total, self.done = relay, total, done
        self._lock = threading.Lock()
        relay.report_here(self._message(f"labelling from frame {done}"))

    def _message(self, text: str) -> common_pb2.Progress:
        return common_pb2.Progress(stage="surrogate_labelling", done=self.done, total=self.total, message=text)

    def frame_done(self) -> None:
        self.relay.check()
        with self._lock:
            self.done += 1
            message = self._message("surrogate labels") if self.done % REPORT_EVERY == 0 else None
        if message is not None:
            self.relay(message)

    def shard_written(self, index: int, n_shards: int, by: str = "") -> None:
        self.relay(self._message(f"shard {index + 1} of {n_shards} written{f' by oracle {by}' if by else ''}"))

    def say(self, text: str) -> None:
        self.relay(self._message(text))


@dataclass(frozen=True)
class _ShardJob:
    """What every shard worker needs to label a shard."""

    frames_path: Path
    spec: oracle_pb2.BackendSpec
    work_dir: Path
    shard_size: int
    total: int
    batch_size: int
    timeout: float

    def frames(self, index: int) -> Iterator[Atoms]:
        first = index * self.shard_size
        return islice(iter_extxyz(self.frames_path, start=first), min(self.shard_size, self.total - first))


class _SharedShards:
    """The shards still to label (lowest first), the records of those labelled, and each instance's failure."""

    def __init__(self, todo: list[int]) -> None:
        self._todo = deque(todo)
        self._lock = threading.Lock()
        self.records: dict[int, ShardRecord] = {}
        self.failures: list[tuple[str, Exception]] = []

    def take(self) -> int | None:
        with self._lock:
            return self._todo.popleft() if self._todo else None

    def give_back(self, index: int | None, address: str, exc: Exception) -> None:
        """The instance at `address` failed with `exc`, on shard `index` (None: before taking one)."""
        with self._lock:
            if index is not None:
                self._todo.appendleft(index)
            self.failures.append((address, exc))

    def done(self, record: ShardRecord) -> None:
        with self._lock:
            self.records[record.index] = record

    @property
    def remaining(self) -> int:
        with self._lock:
            return len(self._todo)


def _label_shards_through(
    address: str, job: _ShardJob, shared: _SharedShards, progress: _Progress, name_oracle: bool
) -> None:
    """A worker: label shards through the oracle at `address` until none is left, the step stops, or the oracle
    fails (then its shard goes back for the other instances and this worker ends)."""
    n_shards = math.ceil(job.total / job.shard_size)
    index: int | None = None
    try:
        with channel(address) as ch:
            while (index := shared.take()) is not None:
                record = _label_shard(ch, job, index, progress)
                shared.done(record)
                index = None
                progress.shard_written(record.index, n_shards, address if name_oracle else "")
    except _StepStoppedError:
        return
    except Exception as exc:  # the oracle or the frames file: the other instances may still succeed
        shared.give_back(index, address, exc)
        if name_oracle:
            where = f" on {shard_name(index)}" if index is not None else ""
            with contextlib.suppress(_StepStoppedError):
                progress.say(f"oracle {address} failed{where} and drops out: {exc}")


def _label_shard(ch: grpc.Channel, job: _ShardJob, index: int, progress: _Progress) -> ShardRecord:
    """One shard through one oracle stream, written in input order to a temp file that is renamed into place
    once complete; then its record."""
    first_frame = index * job.shard_size
    frames = job.frames(index)
    path = job.work_dir / f"{shard_name(index)}.extxyz"
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
    answered: dict[int, Labels] = {}  # labels that came back ahead of an earlier frame's
    buffer: list[Atoms] = []
    # closing(): a stopped step (a cancelled run) cancels the oracle call at once, not when garbage-collected.
    with contextlib.closing(
        stream_labels(
            ch,
            job.spec,
            outgoing(),
            batch_size=job.batch_size,
            timeout=job.timeout,
            max_in_flight=IN_FLIGHT_BATCHES * job.batch_size,
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
    _write_json_atomically(job.work_dir / f"{record.name}.json", asdict(record))
    return record


def _add_frame(record: ShardRecord, atoms: Atoms, labels: Labels, buffer: list[Atoms]) -> None:
    frame = record.first_frame + record.n_input
    record.n_input += 1
    if not labels.ok:
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
) -> dict[int, ShardRecord]:
    """The complete shards of an earlier attempt that still verify, by index; any shard with a record is checked
    (with several instances they complete out of order)."""
    n_shards = math.ceil(total / shard_size)
    recorded = [index for index in range(n_shards) if (work_dir / f"{shard_name(index)}.json").is_file()]
    records: dict[int, ShardRecord] = {}
    if not recorded:
        return records
    frames = iter_extxyz(frames_path)
    position = 0
    for index in recorded:
        first = index * shard_size
        for _ in islice(frames, first - position):  # frames of shards without a record: not needed here
            pass
        expected = [content_id(atoms) for atoms in islice(frames, min(shard_size, total - first))]
        position = first + len(expected)
        record, problem = verify_shard(work_dir, index, first, expected)
        if record is None:
            report(
                common_pb2.Progress(stage="surrogate_labelling", message=f"relabelling {shard_name(index)}: {problem}")
            )
            continue
        records[index] = record
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
