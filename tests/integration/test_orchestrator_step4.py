"""Step 4 through real services: the sampler runs SN2 restraint windows with forces from a committee (the
bundled teacher twice, standing in for step 3's fine-tuned committee) served by a real mace oracle; the step
records the ξ histogram of every window and exports the selected frames."""

from __future__ import annotations

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
from pyacemaker.services.orchestrator.steps.surrogate_md import SurrogateMdStep
from pyacemaker.services.sampler.server import add_to_server as add_sampler
from pyacemaker.structures import atoms_to_structure, read_structures
from pyacemaker.teacher import resolve_teacher
from pyacemaker.v1 import common_pb2
from tests.conftest import SN2_DIR, running_service

pytestmark = pytest.mark.slow
STEPS, SAVE_INTERVAL, REPLICAS, WINDOWS, N_FRAMES = 20, 5, 2, 3, 10


def _config(tmp_path: Path):
    shutil.copytree(SN2_DIR / "seeds", tmp_path / "seeds", dirs_exist_ok=True)
    data = yaml.safe_load((SN2_DIR / "config.yaml").read_text())
    data["md"].update(
        steps=STEPS, save_interval=SAVE_INTERVAL, replicas=REPLICAS, n_frames=N_FRAMES, frame_selection="stride"
    )
    data["md"]["windows"].update(start=-1.0, stop=1.0, count=WINDOWS)
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(data))
    return load_config(path)


def test_surrogate_md_step_runs_windows_and_records_them(artifact_store, tmp_path):
    config = _config(tmp_path)
    teacher = artifact_store.put_file(resolve_teacher("bundled"), kind="model")
    progress: list[common_pb2.Progress] = []
    with (
        running_service(lambda s: add_oracle(s, work_dir=tmp_path / "oracle", store=artifact_store)) as oracle,
        running_service(lambda s: add_sampler(s, artifact_store)) as sampler,
    ):
        ctx = StepContext(
            config=config,
            store=artifact_store,
            run_dir=tmp_path / "run",
            seeds=[atoms_to_structure(a) for a in load_seeds(config)],
            sampler_address=sampler,
            oracle_address=oracle,
            trainer_address="",
            report=progress.append,
            previous={"mace_finetune": {"model_0": teacher, "model_1": teacher}},
            iteration=2,
            export_prefix="iteration_02/",
        )
        step = SurrogateMdStep()
        outcome = step.run(ctx)

    assert set(outcome.exports) == {
        "iteration_02/step4_surrogate_md/frames.extxyz",
        "iteration_02/step4_surrogate_md/md_record.json",
    }
    frames = read_structures(artifact_store.path(outcome.outputs["frames"]))
    assert len(frames) == N_FRAMES
    assert all(a.info["charge"] == -1 and a.info["spin_multiplicity"] == 1 for a in frames)
    record = json.loads(artifact_store.path(outcome.outputs["md_record"]).read_text())
    n_saved = WINDOWS * REPLICAS * (STEPS // SAVE_INTERVAL)
    assert record["n_frames_saved"] == n_saved and record["n_frames_selected"] == N_FRAMES
    assert record["steps"] == STEPS and record["oracle_calls"] == STEPS + 1 and record["replicas_stopped"] == 0
    assert len(record["replicas"]) == WINDOWS * REPLICAS and all(r["stop_reason"] is None for r in record["replicas"])
    # ξ recomputed from the trajectory's positions agrees with the record's histograms.
    trajectory = read_structures(artifact_store.path(outcome.outputs["trajectory"]))
    xi = np.array(
        [
            np.linalg.norm(a.positions[4] - a.positions[0]) - np.linalg.norm(a.positions[0] - a.positions[5])
            for a in trajectory
        ]
    )
    windows = np.array([a.info["md_window"] for a in trajectory])
    for window in record["windows"]:
        mine = xi[windows == window["window"]]
        assert window["n_frames"] == len(mine) == sum(window["xi_counts"])
        assert window["xi_mean_a"] == pytest.approx(mine.mean())
        assert abs(window["xi_mean_a"] - window["center_a"]) < 0.5
    # The smallest distance is an independent pdist over every saved frame.
    smallest = min(
        np.linalg.norm(a.positions[:, None] - a.positions[None], axis=-1)[np.triu_indices(6, 1)].min()
        for a in trajectory
    )
    assert record["min_distance_a"] == pytest.approx(smallest)
    assert progress[-1].stage == "md" and progress[-1].done == STEPS
    assert outcome.metrics["n_frames_selected"] == N_FRAMES

    # The key changes with the committee and the md settings.
    other = artifact_store.put_bytes(b"not a model", kind="model")
    key = step_key(step, ctx)
    ctx.previous = {"mace_finetune": {"model_0": teacher, "model_1": other}}
    assert step_key(step, ctx) != key


def test_surrogate_md_step_needs_the_committee(artifact_store, tmp_path):
    config = _config(tmp_path)
    ctx = StepContext(
        config=config,
        store=artifact_store,
        run_dir=tmp_path / "run",
        seeds=[],
        sampler_address="",
        oracle_address="",
        trainer_address="",
        report=lambda p: None,
        previous={"mace_finetune": {"dft": common_pb2.ArtifactRef()}},
    )
    with pytest.raises(RuntimeError, match=r"needs the fine-tuned committee; step 'mace_finetune' has no models"):
        SurrogateMdStep().run(ctx)
