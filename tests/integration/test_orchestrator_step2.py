"""Step 2 through real services: DFT (xtb standing in) labels for the DIRECT set via the budget ledger, a MACE
committee fine-tuned from the bundled teacher by the trainer, calibrated committee uncertainty on the pool, and
the uncertain candidates sent to DFT within max_dft_calls."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import yaml

from pyacemaker.services.orchestrator.ledger import DftLedger
from pyacemaker.structures import read_structures
from pyacemaker.v1 import common_pb2, orchestrator_pb2
from tests.conftest import SN2_DIR
from tests.integration.test_orchestrator_step1 import _kinds, _run

pytestmark = pytest.mark.slow
N_DIRECT, AL_BUDGET, HOLDOUT = 8, 14, 2  # 3 isolated atoms + 8 DIRECT + at most 3 uncertain candidates
BUDGET = AL_BUDGET + HOLDOUT  # step 2 keeps the hold-out's share free for the validation


def _config(tmp_path: Path) -> Path:
    shutil.copytree(SN2_DIR / "seeds", tmp_path / "seeds", dirs_exist_ok=True)
    data = yaml.safe_load((SN2_DIR / "config_quick.yaml").read_text())
    data["sampling"]["pool"].update(rattles_per_amplitude=5, interpolation_images=8, fragment_rotations_per_seed=5)
    data["sampling"]["direct"]["n_select"] = N_DIRECT
    data["budget"]["max_dft_calls"] = BUDGET
    data["validation"] = {"holdout_size": HOLDOUT}
    data["stop_after"] = "active_learning"
    data["active_learning"] = {
        "committee_size": 2,
        "finetune_epochs": 3,
        "batch_size": 5,
        "force_error_threshold": 0.02,
    }
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def test_one_active_learning_iteration_within_the_budget(all_services, tmp_path):
    config = _config(tmp_path)
    run, events = _run(all_services, config)
    assert run.state == common_pb2.JOB_STATE_SUCCEEDED, run.error
    out = tmp_path / "runs" / "sn2-quick" / "iteration_01" / "step2_active_learning"
    record = json.loads((out / "iteration.json").read_text())
    ledger = DftLedger(tmp_path / "runs" / "sn2-quick" / "state.sqlite")
    rows = ledger.rows()
    assert len(rows) == record["dft_calls_charged"] <= AL_BUDGET == record["dft_allowance"]
    chosen = record["chosen_pool_indices"]
    assert len(rows) == 3 + N_DIRECT + len(chosen) and len(chosen) <= AL_BUDGET - 3 - N_DIRECT
    excluded = record["excluded_by_dft_force_content_ids"]  # labelled near-collisions, not trained on
    assert len(read_structures(out / "dft.extxyz")) == N_DIRECT + len(chosen) - len(excluded)
    assert {row.content_id for row in rows} >= set(record["chosen_content_ids"])

    # The chosen ones are the most uncertain candidates after calibration, above the threshold.
    calibrated = record["calibration_factor"] * np.array(record["pool_committee_max_force_std_ev_per_a"])
    assert record["calibration_factor"] >= 1.0
    assert all(calibrated[i] > record["force_error_threshold_ev_per_a"] for i in chosen)
    assert chosen == sorted(chosen, key=lambda i: -calibrated[i])
    assert not set(chosen) & set(record["excluded_by_force_pool_indices"])

    # Again: the step is skipped and no DFT call is made or charged.
    run, events = _run(all_services, config)
    assert run.state == common_pb2.JOB_STATE_SUCCEEDED, run.error
    assert orchestrator_pb2.RUN_EVENT_KIND_STEP_SKIPPED in _kinds(events, "active_learning.1")
    assert ledger.count() == len(rows)
