"""The validation's ablation through a real trainer: the run's ACE fitted on the DFT training labels alone (no
teacher, no surrogate data), with step 6's settings, cutoff and reference energies; and the distillation gain
that run_summary.json reports from a validation's figures."""

from __future__ import annotations

import functools
import json
from pathlib import Path

import numpy as np
import pytest

from pyacemaker.artifacts import ArtifactStore
from pyacemaker.config import parse_config
from pyacemaker.services.orchestrator.steps import StepContext
from pyacemaker.services.orchestrator.steps.validation import ABLATION_STEM, distillation_gain, fit_direct_ace
from pyacemaker.services.trainer.server import add_to_server, create_manager
from tests.conftest import SN2_DIR, running_service
from tests.sn2_training_data import write_frames, xtb_e0s, xtb_frames

pytest.importorskip("pyace", reason="python-ace is not installed (pyacemaker[trainer])")


def _context(tmp_path: Path, store: ArtifactStore, trainer_address: str, basis_size: int) -> StepContext:
    config = parse_config(
        {
            "name": "ablation",
            "system": {"seeds": [str(SN2_DIR / "seeds" / "transition_state.xyz")], "charge": -1},
            "oracle": {"backend": "xtb"},
            "ace": {"basis_size": basis_size},
        },
        tmp_path,
    )
    dft = store.put_file(write_frames(tmp_path / "dft.extxyz", xtb_frames()[:30]), "structures")
    record = {"isolated_atom_energies_ev": {str(z): e for z, e in xtb_e0s().items()}}
    base_metrics = {"metrics": {"cutoff_a": 4.5}}
    return StepContext(
        config=config,
        store=store,
        run_dir=tmp_path / "run",
        seeds=[],
        sampler_address="",
        oracle_address="",
        trainer_address=trainer_address,
        report=lambda progress: None,
        previous={
            "active_learning": {
                "dft": dft,
                "iteration": store.put_bytes(json.dumps(record).encode(), kind="al_iteration", suffix=".json"),
            },
            "ace_fit": {
                "metrics": store.put_bytes(json.dumps(base_metrics).encode(), kind="report", suffix=".json"),
                # Not read by the ablation: a step 6 always records its potential's files.
                **{name: store.put_bytes(b"unused", kind="potential", suffix=f".{name}") for name in ("yaml", "yace")},
            },
        },
    )


def test_the_ablation_is_the_same_ace_fitted_on_the_dft_labels_alone(tmp_path: Path) -> None:
    from pyace import PyACECalculator

    store = ArtifactStore(tmp_path / "store")
    manager = create_manager(store, tmp_path / "trainer", max_running=1)
    try:
        with running_service(functools.partial(add_to_server, manager=manager)) as address:
            fit = fit_direct_ace(_context(tmp_path, store, address, basis_size=0))
            # A basis far beyond what 30 structures determine is refused by the trainer: recorded, not fatal.
            refused = fit_direct_ace(_context(tmp_path, store, address, basis_size=3000))
    finally:
        manager.shutdown(stop_workers=True)
    assert fit.error == "" and fit.potential is not None
    assert set(fit.files) >= {"yaml", "yace", "asi"}
    assert fit.n_training == 30 and fit.metrics["structures_count"] == 30
    assert fit.metrics["cutoff_a"] == pytest.approx(4.5)  # the base's cutoff, not one inferred again
    # Fitted to the DFT labels: pyace's own evaluation of the written potential reproduces them closely.
    frames = xtb_frames()[:30]
    calc = PyACECalculator(str(store.path(fit.files["yaml"])))
    errors = []
    for atoms in frames:
        reference = atoms.get_forces()
        probe = atoms.copy()
        probe.calc = calc
        errors.append(probe.get_forces() - reference)
    rmse = float(np.sqrt(np.mean(np.concatenate(errors) ** 2)))
    assert rmse == pytest.approx(fit.metrics["train_forces_rmse_ev_per_a"], rel=0.05, abs=1e-3)
    # ... and it learned them: well below the forces' own RMS (the error of a potential that predicts nothing).
    force_rms = float(np.sqrt(np.mean(np.concatenate([a.get_forces() for a in frames]) ** 2)))
    assert rmse < 0.5 * force_rms
    assert refused.potential is None and "trainer job" in refused.error and refused.n_training == 30
    assert ABLATION_STEM == "direct_ace"


def test_distillation_gain_from_a_validation_s_figures() -> None:
    metrics = {
        "final_ace_forces_rmse_mev_per_a": 60.0,
        "direct_ace_forces_rmse_mev_per_a": 120.0,
        "final_ace_energy_rmse_mev_per_atom": 3.0,
        "direct_ace_energy_rmse_mev_per_atom": 2.0,
        "dft_barrier_kcal_per_mol": 7.0,
        "final_ace_barrier_kcal_per_mol": 6.5,
        "direct_ace_barrier_kcal_per_mol": 7.75,
    }
    gain = distillation_gain(metrics)
    assert gain is not None
    assert gain.forces_rmse_ratio_final_over_direct == pytest.approx(0.5)
    assert gain.energy_rmse_ratio_final_over_direct == pytest.approx(1.5)
    assert gain.barrier_error_kcal_per_mol == pytest.approx({"final_ace": 0.5, "direct_ace": 0.75})
    # Without the ablation's figures (its fit was refused) there is no gain to state.
    assert distillation_gain({"final_ace_forces_rmse_mev_per_a": 60.0}) is None
