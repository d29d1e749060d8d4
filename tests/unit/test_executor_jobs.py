"""The durable job table: who owns a structure's calculation, re-attachment, and exactly-once resubmission."""

from __future__ import annotations

import threading
from pathlib import Path

from pyacemaker.labels import Labels, labels_to_proto
from pyacemaker.services.oracle.jobs import JobTable, TaskState
from pyacemaker.v1 import common_pb2

LEVEL = "xtb:GFN2-xTB"


def ok_labels(energy: float) -> common_pb2.Labels:
    return common_pb2.Labels(status=common_pb2.LABEL_STATUS_OK, energy=energy, level_of_theory=LEVEL, attempts=1)


def task_dir_for(root: Path, content_id: str):  # type: ignore[no-untyped-def]
    return lambda run: root / f"{content_id}.{run}"


def test_a_structure_is_claimed_once_and_later_requests_re_attach(tmp_path: Path) -> None:
    table = JobTable(tmp_path / "jobs.sqlite")
    key = ("cid-a", LEVEL)
    first = table.claim(key, "batch-1", 0, task_dir_for(tmp_path, "cid-a"))
    assert first.mine and first.record.state == TaskState.PREPARED and first.record.job_id is None
    again = table.claim(key, "batch-2", 0, task_dir_for(tmp_path, "cid-a"))
    assert not again.mine and again.record.batch == "batch-1", "a structure in flight is not claimed twice"

    table.create_batch("batch-1", "slurm", tmp_path / "jobs" / "batch-1", 1)
    table.record_submission("batch-1", "4242")
    record = table.get(key)
    assert record is not None
    assert (record.state, record.job_id, record.scheduler, record.submissions) == (
        TaskState.SUBMITTED,
        "4242",
        "slurm",
        1,
    )

    assert table.record_result(key, ok_labels(-1.5))
    assert not table.record_result(key, ok_labels(-9.9)), "labels are stored once, by whoever sees them first"
    done = table.claim(key, "batch-3", 0, task_dir_for(tmp_path, "cid-a"))
    assert not done.mine and done.record.labels is not None and done.record.labels.energy == -1.5
    assert done.record.job_id == "4242", "a finished structure still names the job that computed it"
    # Another level of theory is another calculation.
    assert table.claim(("cid-a", "pyscf:PBE/def2-SVP"), "batch-3", 0, task_dir_for(tmp_path, "cid-a")).mine


def test_a_failed_structure_asked_for_again_starts_a_new_run_in_a_new_dir(tmp_path: Path) -> None:
    table = JobTable(tmp_path / "jobs.sqlite")
    key = ("cid-b", LEVEL)
    table.claim(key, "batch-1", 0, task_dir_for(tmp_path, "cid-b"))
    table.create_batch("batch-1", "local", tmp_path, 1)
    table.record_submission("batch-1", "local-1-1")
    table.record_result(key, labels_to_proto(Labels.failed("SCF not converged", LEVEL)))
    retry = table.claim(key, "batch-2", 0, task_dir_for(tmp_path, "cid-b"))
    assert retry.mine
    assert (retry.record.run, retry.record.task_dir, retry.record.submissions) == (1, tmp_path / "cid-b.1", 0)
    assert retry.record.labels is None and retry.record.job_id is None


def test_only_one_of_two_watchers_moves_a_lost_task(tmp_path: Path) -> None:
    table = JobTable(tmp_path / "jobs.sqlite")
    keys = [(f"cid-{i}", LEVEL) for i in range(3)]
    for index, key in enumerate(keys):
        table.claim(key, "batch-1", index, task_dir_for(tmp_path, key[0]))
    table.create_batch("batch-1", "slurm", tmp_path, 3)
    table.record_submission("batch-1", "77")
    table.record_result(keys[0], ok_labels(-1.0))

    moved: dict[str, list] = {}

    def watcher(batch: str) -> None:
        moved[batch] = table.move_to_batch([(key, "batch-1") for key in keys], batch)

    threads = [threading.Thread(target=watcher, args=(f"retry-{n}",)) for n in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    winners = [batch for batch, keys_moved in moved.items() if keys_moved]
    assert len(winners) == 1, moved
    assert moved[winners[0]] == keys[1:], "the finished task stays; the others move, at indices 0, 1"
    assert [table.get(key).array_index for key in keys[1:]] == [0, 1]  # type: ignore[union-attr]

    table.create_batch(winners[0], "slurm", tmp_path, 2)
    table.record_submission(winners[0], "78")
    resubmitted = table.get(keys[1])
    assert resubmitted is not None and (resubmitted.job_id, resubmitted.submissions) == ("78", 2)
    assert table.job_ids() == ["77", "78"]


def test_a_refused_batch_leaves_nothing_behind(tmp_path: Path) -> None:
    table = JobTable(tmp_path / "jobs.sqlite")
    key = ("cid-c", LEVEL)
    table.claim(key, "batch-1", 0, task_dir_for(tmp_path, "cid-c"))
    table.create_batch("batch-1", "slurm", tmp_path, 1)
    table.forget_batch("batch-1")
    assert table.get(key) is None and table.batch("batch-1") is None
    assert table.claim(key, "batch-2", 0, task_dir_for(tmp_path, "cid-c")).mine, "a later request submits afresh"


def test_the_table_survives_a_restart(tmp_path: Path) -> None:
    path = tmp_path / "jobs.sqlite"
    table = JobTable(path)
    table.claim(("cid-d", LEVEL), "batch-1", 0, task_dir_for(tmp_path, "cid-d"))
    table.create_batch("batch-1", "pbs", tmp_path, 1)
    table.record_submission("batch-1", "4711[].pbs01")
    table.close()
    reopened = JobTable(path).get(("cid-d", LEVEL))
    assert reopened is not None and (reopened.job_id, reopened.scheduler) == ("4711[].pbs01", "pbs")
