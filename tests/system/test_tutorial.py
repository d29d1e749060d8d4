"""The tutorial's quick variant end to end, as README describes it (`python UAT_AND_TUTORIAL.py --quick`): all
seven steps, validation and the loop back to step 2 through real services, xtb as DFT, the bundled teacher."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml

from pyacemaker.services.orchestrator.ledger import DftLedger
from pyacemaker.structures import atoms_to_structure, read_structures
from tests.conftest import SN2_DIR

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[2]


def test_quick_tutorial_runs_the_loop_and_passes_its_checks(tmp_path: Path) -> None:
    env = {**os.environ, "PYACEMAKER_HOME": str(tmp_path / "home"), "OMP_NUM_THREADS": "1"}
    work = tmp_path / "tutorial"
    result = subprocess.run(
        [sys.executable, str(ROOT / "UAT_AND_TUTORIAL.py"), "--quick", "--work-dir", str(work)],
        env=env,
        capture_output=True,
        text=True,
        timeout=1500,
        cwd=tmp_path,
    )
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]
    assert "FAIL" not in result.stdout and result.stdout.count("PASS: ") >= 5
    assert "stopped: " in result.stdout  # the services the tutorial started were stopped again

    config = yaml.safe_load((SN2_DIR / "config_quick.yaml").read_text())
    run_dir = work / "runs" / config["name"]
    summary = json.loads((run_dir / "run_summary.json").read_text())
    # The quick config's force target is out of reach, so the loop goes round again until budget or iterations end.
    assert summary["iterations"] == 2
    assert summary["stop_reason"] in ("budget spent", "max iterations")
    ledger = DftLedger(run_dir / "state.sqlite")
    try:
        assert summary["dft_calls"] == ledger.count() <= config["budget"]["max_dft_calls"]
    finally:
        ledger.close()

    first, second = (
        json.loads((run_dir / f"iteration_0{i}" / "validation" / "validation.json").read_text()) for i in (1, 2)
    )
    # The hold-out is drawn once and reused, so the iterations' figures compare.
    holdouts = [
        [atoms_to_structure(a).content_id for a in read_structures(run_dir / f"iteration_0{i}" / "validation" / name)]
        for i, name in ((1, "holdout.extxyz"), (2, "holdout.extxyz"))
    ]
    assert holdouts[0] == holdouts[1] and len(holdouts[0]) == first["n_holdout"] == second["n_holdout"]
    # The RMSEs in the record are those of the parity data it stores.
    for record in (first, second):
        reference = np.array(record["reference"]["forces_ev_per_a"])
        final = record["models"]["final_ace"]
        rmse = np.sqrt(np.mean((np.array(final["forces_ev_per_a"]) - reference) ** 2))
        assert final["forces_rmse_mev_per_a"] == pytest.approx(1000 * rmse)
    # Iteration 2 scored the pool plus iteration 1's MD frames, with the committee step 3 fine-tuned.
    record = json.loads((run_dir / "iteration_02/step2_active_learning/iteration.json").read_text())
    assert record["n_candidates"] > record["n_pool"]
    # ... and held the pool to the largest force the MD visited (never above the configured cap).
    assert record["candidate_force_cap_ev_per_a"] <= record["max_candidate_force_ev_per_a"]
    # Iteration 1 scored the pool plus a short teacher MD (config_quick: active_learning.md_candidate_steps 100).
    al_first = json.loads((run_dir / "iteration_01/step2_active_learning/iteration.json").read_text())
    md_candidates = read_structures(run_dir / "iteration_01/step2_active_learning/md_candidates.extxyz")
    assert al_first["n_md_candidates"] == len(md_candidates) == al_first["n_candidates"] - al_first["n_pool"] > 0
    assert {a.info["md_step"] for a in md_candidates} <= set(range(1, 101))
    assert al_first["candidate_force_cap_ev_per_a"] <= al_first["max_candidate_force_ev_per_a"]
    first_dft = read_structures(run_dir / "iteration_01" / "step2_active_learning" / "dft.extxyz")
    assert record["n_dft_labelled_before"] == len(first_dft)
    # The report shows both iterations.
    html = (run_dir / "report" / "index.html").read_text()
    assert f"{second['models']['final_ace']['forces_rmse_mev_per_a']:.1f}" in html
