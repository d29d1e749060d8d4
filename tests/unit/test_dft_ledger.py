"""The DFT budget ledger: the budget is counted in rows, never exceeded, never charged twice."""

from __future__ import annotations

import sqlite3

import pytest

from pyacemaker.services.orchestrator.ledger import DftLedger
from pyacemaker.v1 import common_pb2

LEVEL = "pyscf:PBE/def2-SVP"


def ok(energy: float) -> common_pb2.Labels:
    return common_pb2.Labels(status=common_pb2.LABEL_STATUS_OK, energy=energy, level_of_theory=LEVEL)


def test_budget_is_never_exceeded_and_survives_reopening(tmp_path):
    ledger = DftLedger(tmp_path / "state.sqlite")
    ids = [f"s{i}" for i in range(8)]
    first = ledger.reserve(ids, LEVEL, "pyscf", max_calls=5)
    assert first.to_compute == ids[:5] and first.refused == ids[5:]
    ledger.close()

    reopened = DftLedger(tmp_path / "state.sqlite")  # a restarted orchestrator
    again = reopened.reserve(ids, LEVEL, "pyscf", max_calls=5)
    assert again.to_compute == ids[:5], "pending requests are re-sent, not charged again"
    assert again.refused == ids[5:]
    assert reopened.count() == 5


def test_done_structures_are_reused_and_failed_ones_not_retried(tmp_path):
    ledger = DftLedger(tmp_path / "state.sqlite")
    ledger.reserve(["a", "b"], LEVEL, "pyscf", max_calls=10)
    ledger.record_submission("a", LEVEL, "slurm", "1234")
    ledger.record_result("a", LEVEL, ok(-1.5))
    ledger.record_result("b", LEVEL, common_pb2.Labels(status=common_pb2.LABEL_STATUS_FAILED, reason="SCF"))
    again = ledger.reserve(["a", "b", "c"], LEVEL, "pyscf", max_calls=10)
    assert again.to_compute == ["c"]
    assert again.done["a"].labels.energy == -1.5 and again.done["a"].job_id == "1234"
    assert again.done["b"].status == "failed" and again.done["b"].reason == "SCF"
    assert ledger.count() == 3


def test_other_level_of_theory_is_a_new_request_and_duplicates_count_once(tmp_path):
    ledger = DftLedger(tmp_path / "state.sqlite")
    ledger.reserve(["a", "a"], LEVEL, "pyscf", max_calls=10)
    other = ledger.reserve(["a"], "pyscf:B3LYP/def2-SVP", "pyscf", max_calls=10)
    assert other.to_compute == ["a"]
    assert ledger.count() == 2


def test_a_damaged_result_is_detected(tmp_path):
    path = tmp_path / "state.sqlite"
    ledger = DftLedger(path)
    ledger.reserve(["a"], LEVEL, "pyscf", max_calls=1)
    ledger.record_result("a", LEVEL, ok(-1.0))
    with sqlite3.connect(path) as db:
        db.execute("UPDATE dft_ledger SET labels=? WHERE content_id='a'", (ok(-2.0).SerializeToString(),))
    with pytest.raises(RuntimeError, match="does not match its digest"):
        ledger.row("a", LEVEL)
