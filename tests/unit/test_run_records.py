"""The typed run records: each reads the JSON its step writes and writes it back byte for byte (the steps'
records are content-addressed, so their bytes feed later steps' keys); older records without the optional keys
still read; a malformed one is refused with its file and key named."""

from __future__ import annotations

import json
import math

import pytest

from pyacemaker.run_records import (
    ActiveLearningRecord,
    RecordError,
    RunSummary,
    SelectionRecord,
    TeacherRecord,
    ValidationRecord,
    read_record,
    record_from_json,
    record_text,
)

# The dicts the steps wrote before the types existed, in their key order, with values of the kinds they hold.
TEACHER = {
    "level_of_theory": "GFN2-xTB (tblite)",
    "n_pool": 120,
    "n_md_frames": 40,
    "n_md_replicas": 4,
    "n_labelled": 150,
    "n_failed": 2,
    "n_above_max_force": 8,
    "isolated_atom_energies_ev": {"1": -10.7, "6": -48.9},
    "member_0_energy_rmse_ev_per_atom": 0.004,
    "energy_rmse_ev_per_atom": 0.004,
    "forces_rmse_ev_per_a": 0.11,
    "epochs_count": 30.0,
}
SELECTION = {
    "n_pool": 300,
    "n_rejected": 3,
    "n_rejected_teacher_force": 7,
    "rattle_amplitudes_a": [0.0508, 0.0719],
    "n_selected": 40,
    "coverage": 0.87,
    "n_components": 4,
    "explained_variance_ratio": [0.5, 0.2, 0.1, 0.05],
    "n_clusters": 40,
    "featuriser": "oracle",
    "selected_pool_indices": [0, 5, 9],
}
ACTIVE_LEARNING = {
    "iteration": 1,
    "calibration_factor": 3.2,
    "force_error_threshold_ev_per_a": 0.1,
    "labelled_max_force_error_ev_per_a": [0.05, 0.2],
    "labelled_committee_max_force_std_ev_per_a": [0.01, 0.06],
    "n_pool": 3,
    "n_md_candidates": 2,
    "n_candidates": 5,
    "pool_committee_max_force_std_ev_per_a": [0.01, 0.02, 0.2],
    "chosen_pool_indices": [2],
    "max_candidate_force_ev_per_a": 20.0,
    "candidate_force_cap_ev_per_a": 12.5,
    "excluded_by_force_pool_indices": [],
    "excluded_by_energy_pool_indices": [1],
    "chosen_content_ids": ["abc"],
    "isolated_atom_energies_ev": {"1": -13.6},
    "n_dft_labelled_before": 40,
    "n_dft_added": 1,
    "excluded_by_dft_force_content_ids": [],
    "dft_calls_charged": 41,
    "dft_allowance": 50,
}


def _scores(with_gamma: bool) -> dict:
    scores = {
        "energy_rmse_mev_per_atom": 3.1,
        "forces_rmse_mev_per_a": 95.0,
        "energy_per_atom_ev": [-75.01, -75.02],
        "forces_ev_per_a": [[0.1, 0.2, 0.3], [0.0, -0.1, 0.2]],
        "by_source": {"surrogate_md": {"n": 1, "energy_rmse_mev_per_atom": 2.0, "forces_rmse_mev_per_a": 90.0}},
    }
    if with_gamma:
        scores.update({"max_gamma_per_structure": [1.1, 1.3], "max_gamma": 1.3, "max_gamma_by_source": {"x": 1.3}})
    return scores


VALIDATION = {
    "iteration": 2,
    "level_of_theory": "PBE/def2-SVP (pyscf)",
    "n_holdout": 2,
    "n_holdout_by_source": {"surrogate_md": 1, "teacher_md": 1},
    "holdout_sources": ["surrogate_md", "teacher_md"],
    "dft_calls_total": 56,
    "dft_budget": 60,
    "target": {"energy_mev_per_atom": 5.0, "forces_mev_per_a": 100.0},
    "target_met": True,
    "reference": {"energy_per_atom_ev": [-75.0, -75.0], "forces_ev_per_a": [[0.1, 0.2, 0.3], [0.0, 0.0, 0.1]]},
    "models": {"teacher": _scores(with_gamma=False), "final_ace": _scores(with_gamma=True)},
    "profile": {
        "xi_a": [-1.0, 0.0, 1.0],
        "energies_ev": {"dft": [0.0, 0.12, 0.01], "final_ace": [0.0, 0.11, 0.0]},
        "central_barrier_kcal_per_mol": {"dft": 2.77, "final_ace": 2.54},
    },
    "md_stability": {
        "steps": 400,
        "timestep_fs": 0.5,
        "n_runs": 2,
        "n_survivors": 1,
        "n_dissociated": 1,
        "survivors_by_temperature": {"300": [1, 2]},
        "runs": [
            {
                "seed": 0,
                "temperature_k": 300.0,
                "steps_done": 120,
                "survived": False,
                "problem": "step 120: boom",
                "dissociation": None,
            },
            {
                "seed": 1,
                "temperature_k": 300.0,
                "steps_done": 400,
                "survived": True,
                "problem": None,
                "dissociation": "at 150 fs into CH3Cl + Cl",
            },
        ],
    },
    "ablation": {
        "model": "direct_ace",
        "trained_on": "the iteration's DFT training labels only (no teacher, no surrogate data)",
        "n_training_structures": 8,
        "fit": {"cutoff_a": 5.0},
        "error": "",
        "gain": {
            "forces_rmse_ratio_final_over_direct": 0.5,
            "energy_rmse_ratio_final_over_direct": math.inf,
            "final_ace_forces_rmse_mev_per_a": 60.0,
            "direct_ace_forces_rmse_mev_per_a": 120.0,
            "final_ace_energy_rmse_mev_per_atom": 3.0,
            "direct_ace_energy_rmse_mev_per_atom": 0.0,
            "barrier_error_kcal_per_mol": {"final_ace": 0.5},
        },
    },
}
SUMMARY = {
    "stop_reason": "max iterations",
    "iterations": 2,
    "best_iteration": 1,
    "final_potential": "iteration_01/step7_delta/final.yace",
    "dft_calls": 56,
    "dft_budget": 60,
    "wall_time_s": 1234.5,
    "dft_calls_not_trained_on": 0,
    "final_potential_figures": {"forces_rmse_mev_per_a": 95.0, "n_holdout": 2.0},
    "distillation_gain": None,
}


@pytest.mark.parametrize(
    ("kind", "data", "indent"),
    [
        (TeacherRecord, TEACHER, 1),
        (SelectionRecord, SELECTION, 2),
        (ActiveLearningRecord, ACTIVE_LEARNING, 1),
        (ValidationRecord, VALIDATION, None),
        (RunSummary, SUMMARY, 1),
        (
            RunSummary,
            {k: v for k, v in SUMMARY.items() if k not in ("final_potential_figures", "distillation_gain")},
            1,
        ),
        (ValidationRecord, {**VALIDATION, "profile": None, "md_stability": None}, None),
    ],
)
def test_each_record_reads_and_writes_back_the_steps_bytes(kind, data, indent, tmp_path):
    written = json.dumps(data, indent=indent)
    path = tmp_path / "record.json"
    path.write_text(written)

    record = read_record(path, kind)

    assert isinstance(record, kind)
    assert record_text(record) == written


def test_typed_fields_of_a_read_record():
    validation = record_from_json(ValidationRecord, VALIDATION, "validation.json")
    assert validation.models["final_ace"].by_source["surrogate_md"].forces_rmse_mev_per_a == 90.0
    assert validation.models["teacher"].max_gamma is None
    assert validation.md_stability is not None and validation.md_stability.runs[1].survived
    assert validation.ablation is not None and validation.ablation.gain is not None
    assert validation.ablation.gain.energy_rmse_ratio_final_over_direct == math.inf
    teacher = record_from_json(TeacherRecord, TEACHER, "teacher.json")
    assert teacher.validation_rmse() == (0.004, 0.11)
    assert teacher.training_metrics["epochs_count"] == 30.0


def test_an_older_record_without_the_optional_keys_still_reads():
    old = {k: ACTIVE_LEARNING[k] for k in ("calibration_factor", "force_error_threshold_ev_per_a", "dft_calls_charged")}
    old["pool_committee_max_force_std_ev_per_a"] = [0.1]
    record = record_from_json(ActiveLearningRecord, old, "iteration.json")
    assert record.iteration is None and record.chosen_pool_indices == []
    summary = record_from_json(
        RunSummary, {k: SUMMARY[k] for k in ("stop_reason", "iterations", "dft_calls", "dft_budget")}, "s"
    )
    assert summary.best_iteration is None and summary.final_potential == ""


@pytest.mark.parametrize(
    ("broken", "message"),
    [
        (lambda d: d.pop("models"), "validation.json: missing key 'models'"),
        (
            lambda d: d["models"]["final_ace"].pop("forces_rmse_mev_per_a"),
            "validation.json: missing key 'models.final_ace.forces_rmse_mev_per_a'",
        ),
        (
            lambda d: d["md_stability"]["runs"][1].update(steps_done="400"),
            "validation.json: key 'md_stability.runs[1].steps_done' holds str, expected int",
        ),
        (lambda d: d.update(target_met=1), "validation.json: key 'target_met' holds int, expected bool"),
        (lambda d: d.update(models=[]), "validation.json: key 'models' holds list, expected a JSON object"),
    ],
)
def test_a_malformed_record_names_its_file_and_key(broken, message):
    data = json.loads(json.dumps(VALIDATION))
    broken(data)
    with pytest.raises(RecordError) as error:
        record_from_json(ValidationRecord, data, "validation.json")
    assert str(error.value) == message


def test_a_record_that_is_not_json_names_its_file(tmp_path):
    path = tmp_path / "run_summary.json"
    path.write_text("{")
    with pytest.raises(RecordError) as error:
        read_record(path, RunSummary, "run_summary.json")
    assert str(error.value).startswith("run_summary.json is not valid JSON")
    path.write_text("[]")
    with pytest.raises(RecordError) as error:
        read_record(path, RunSummary, "run_summary.json")
    assert str(error.value) == "run_summary.json: the record holds list, expected a JSON object"
