"""Step 6b through real services: a linear ACE fitted on a few rattled SN2 frames runs MD itself (sampler, ace
oracle with its active set), its high-γ frames are labelled by a committee (the bundled teacher twice, served
by the mace oracle), the trainer refits, and the refitted student's MD is checked again. The record's γ figures
are compared with γ recomputed independently (pyace's calculator with the active set) on the added frames."""

from __future__ import annotations

import functools
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import yaml

from pyacemaker.config import load_config
from pyacemaker.seeds import load_seeds
from pyacemaker.services.oracle.server import add_to_server as add_oracle
from pyacemaker.services.orchestrator.steps import StepContext, step_key
from pyacemaker.services.orchestrator.steps.student_refinement import GAMMA_BIN_EDGES, StudentRefinementStep
from pyacemaker.services.sampler.server import add_to_server as add_sampler
from pyacemaker.services.trainer.ace_fit import NORMAL_EQUATIONS_KIND, EquationsReuse, fit_linear_ace
from pyacemaker.services.trainer.evaluation import extrapolation_grades
from pyacemaker.services.trainer.server import add_to_server as add_trainer
from pyacemaker.services.trainer.server import create_manager
from pyacemaker.structures import atoms_to_structure, read_structures, write_extxyz
from pyacemaker.teacher import resolve_teacher
from pyacemaker.v1 import common_pb2
from tests.conftest import SN2_DIR, running_service
from tests.sn2_training_data import xtb_e0s, xtb_frames

pytestmark = pytest.mark.slow
pytest.importorskip("pyace", reason="python-ace is not installed (pyacemaker[trainer])")


def _config(tmp_path: Path):
    shutil.copytree(SN2_DIR / "seeds", tmp_path / "seeds", dirs_exist_ok=True)
    data = yaml.safe_load((SN2_DIR / "config_quick.yaml").read_text())
    data["md"]["temperatures"] = [300.0, 600.0]
    data["md"]["windows"].update(start=-1.0, stop=1.0, count=2)
    data["student_refinement"] = {
        "max_rounds": 1,
        "steps": 40,
        "save_interval": 5,
        "gamma_threshold": 1.1,
        "stop_gamma": 50.0,
        "max_frames_per_round": 30,
    }
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(data))
    return load_config(path)


def test_the_student_md_adds_high_gamma_frames_refits_and_checks_again(artifact_store, tmp_path):
    config = _config(tmp_path)
    train = xtb_frames()[:50]
    shard = artifact_store.put_file(write_extxyz_file(tmp_path / "shard.extxyz", train), kind="structures")
    # The base keeps its normal equations, as step 6 does when the refinement is on.
    kept = EquationsReuse(keep=tmp_path / "base_equations.npz", metadata={"shards": [shard.sha256]})
    base = fit_linear_ace(train, tmp_path / "base", e0s=xtb_e0s(), functions_per_element=10, reuse=kept)
    teacher = artifact_store.put_file(resolve_teacher("bundled"), kind="model")
    iteration = {
        "isolated_atom_energies_ev": {str(z): e for z, e in xtb_e0s().items()},
        "calibration_factor": 3.0,
        "force_error_threshold_ev_per_a": 0.05,
    }
    previous = {
        "ace_fit": {
            "yaml": artifact_store.put_file(base.yaml_path, "potential"),
            "yace": artifact_store.put_file(base.yace_path, "potential"),
            "asi": artifact_store.put_file(base.asi_path, "active_set"),
            "metrics": artifact_store.put_bytes(b"{}", "report", ".json"),
            "normal_equations": artifact_store.put_file(tmp_path / "base_equations.npz", NORMAL_EQUATIONS_KIND),
        },
        "surrogate_labelling": {"shard_0000": shard},
        "mace_finetune": {"model_0": teacher, "model_1": teacher},
        "active_learning": {
            "iteration": artifact_store.put_bytes(json.dumps(iteration).encode(), "record", ".json"),
            "dft": artifact_store.put_bytes(b"unused", "structures", ".extxyz"),  # not read by the refinement
        },
    }
    manager = create_manager(artifact_store, tmp_path / "trainer")
    progress: list[common_pb2.Progress] = []
    try:
        with (
            running_service(lambda s: add_oracle(s, work_dir=tmp_path / "oracle", store=artifact_store)) as oracle,
            running_service(lambda s: add_sampler(s, artifact_store)) as sampler,
            running_service(functools.partial(add_trainer, manager=manager)) as trainer,
        ):
            ctx = StepContext(
                config=config,
                store=artifact_store,
                run_dir=tmp_path / "run",
                seeds=[atoms_to_structure(a) for a in load_seeds(config)],
                sampler_address=sampler,
                oracle_address=oracle,
                trainer_address=trainer,
                report=progress.append,
                previous=previous,
                iteration=1,
                export_prefix="iteration_01/",
            )
            step = StudentRefinementStep()
            ctx.key = step_key(step, ctx)
            outcome = step.run(ctx)
    finally:
        manager.shutdown(stop_workers=True)

    record = json.loads(artifact_store.path(outcome.outputs["record"]).read_text())
    assert record["temperatures_k"] == [300.0, 600.0, 750.0]  # one hotter: 1.25 × the highest
    first = record["rounds"][0]
    # Plain MD: 3 seeds × 3 temperatures; windows: 2 × 3 temperatures; every replica saves 40/5 frames.
    assert first["replicas"] == 15
    assert first["frames_saved"] + 0 <= 15 * 8 and sum(first["gamma_histogram"]) == first["frames_saved"]
    assert len(first["gamma_histogram"]) == len(GAMMA_BIN_EDGES) + 1
    # A base fitted on 50 rattled frames leaves their span in its own MD at 750 K: frames above the threshold
    # (γ 1: the edge of the data; measured max γ 1.29 with the one-standard-error ridge, above 2 at the CV minimum).
    assert first["max_gamma"] > 1.1 and first["frames_above_threshold"] > 0
    assert 0 < first["frames_added"] <= 30 and first["refit_metrics"]["structures_count"] == 50 + first["frames_added"]
    # The refit kept the base's basis and took the base's 50 frames from its normal equations.
    assert first["refit_metrics"]["reused_equations_structures_count"] == 50
    assert first["refit_metrics"]["basis_functions_count"] == base.metrics["basis_functions_count"]
    # The added frames carry the committee's labels and their own trajectory groups; the base's γ on them
    # (recomputed with pyace directly) is above the threshold, except for structures where a replica stopped.
    added = read_structures(artifact_store.path(outcome.outputs["student_frames"]))
    assert len(added) == first["frames_added"]
    assert all(a.info["source"] == "student_md" and a.info["fit_group"].startswith("student:1:") for a in added)
    assert all(a.info["level_of_theory"].startswith("mace") for a in added)
    gammas = extrapolation_grades(base.yaml_path, base.asi_path, added)
    assert np.sum(gammas > 1.1) >= first["frames_added"] - first["replicas_stopped"]
    # Round 2 ran the refitted student (the step's potential) again and recorded it; max_rounds 1: no refit.
    assert len(record["rounds"]) == 2 and not record["rounds"][1]["refit_metrics"]
    assert outcome.outputs["yace"].sha256 != previous["ace_fit"]["yace"].sha256
    refined_gammas = extrapolation_grades(
        artifact_store.path(outcome.outputs["yaml"]), artifact_store.path(outcome.outputs["asi"]), added
    )
    assert refined_gammas.max() <= 1.01 + 1e-6  # the frames it was refitted on are inside its active set now
    assert "iteration_01/step6b_student_refinement/refined.yace" in outcome.exports
    assert outcome.metrics["frames_added"] == first["frames_added"]
    assert not (tmp_path / "run" / ".work" / "student_refinement").exists()
    assert any(p.stage == "student_refinement" for p in progress)


def write_extxyz_file(path: Path, frames) -> Path:
    write_extxyz(path, frames)
    return path
