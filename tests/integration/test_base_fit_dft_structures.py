"""Step 6 through real services: the base ACE's training data holds step 5's shards AND the fine-tuned
committee's labels of the DFT training structures (the bundled teacher twice, served by the mace oracle), so
step 7's delta is fitted on structures the base has seen. The labels are checked against the teacher evaluated
directly with MACECalculator; the base's extrapolation grade on the DFT structures (pyace's calculator with the
active set) must say they are inside its data."""

from __future__ import annotations

import functools
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import yaml
from ase.calculators.singlepoint import SinglePointCalculator

from pyacemaker.config import load_config
from pyacemaker.seeds import load_seeds
from pyacemaker.services.oracle.server import add_to_server as add_oracle
from pyacemaker.services.orchestrator.steps import StepContext
from pyacemaker.services.orchestrator.steps.ace_fit import DFT_STRUCTURES_OUTPUT, AceFitStep
from pyacemaker.services.trainer.evaluation import extrapolation_grades
from pyacemaker.services.trainer.server import add_to_server as add_trainer
from pyacemaker.services.trainer.server import create_manager
from pyacemaker.structures import atoms_to_structure, read_structures, write_extxyz
from pyacemaker.teacher import resolve_teacher
from tests.conftest import SN2_DIR, running_service
from tests.sn2_training_data import xtb_e0s, xtb_frames

pytestmark = pytest.mark.slow
pytest.importorskip("pyace", reason="python-ace is not installed (pyacemaker[trainer])")
pytest.importorskip("mace", reason="mace-torch is not installed (pyacemaker[mace])")


def _put(store, path: Path, frames) -> object:
    write_extxyz(path, frames)
    return store.put_file(path, kind="structures")


def _labelled(atoms):
    atoms.calc = SinglePointCalculator(atoms, energy=0.0, forces=np.zeros((len(atoms), 3)))
    return atoms


def test_the_base_is_fitted_on_the_committee_labels_of_the_dft_structures(artifact_store, tmp_path):
    shutil.copytree(SN2_DIR / "seeds", tmp_path / "seeds", dirs_exist_ok=True)
    data = yaml.safe_load((SN2_DIR / "config_quick.yaml").read_text())
    data["ace"] = {"basis_size": 30}
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(data))
    config = load_config(tmp_path / "config.yaml")
    md_like = xtb_frames()[:40]
    # "DFT" structures the MD frames do not hold (another pool seed), with their GFN2-xTB labels; a
    # near-collision (committee forces far above the cap) and an isolated atom (not a training structure).
    dft = xtb_frames(rattles_per_amplitude=2, interpolation_images=0, seed=7)[-4:]
    collision = _labelled(dft[0].copy())
    collision.positions[1] = collision.positions[0] + [0.35, 0.0, 0.0]
    dft_set = [*dft, collision, _labelled(dft[0][:1].copy())]
    teacher = artifact_store.put_file(resolve_teacher("bundled"), kind="model")
    iteration = {"isolated_atom_energies_ev": {str(z): e for z, e in xtb_e0s().items()}}
    previous = {
        "surrogate_labelling": {"shard_0000": _put(artifact_store, tmp_path / "shard.extxyz", md_like)},
        "mace_finetune": {"model_0": teacher, "model_1": teacher},
        "active_learning": {
            "iteration": artifact_store.put_bytes(json.dumps(iteration).encode(), "record", ".json"),
            "dft": _put(artifact_store, tmp_path / "dft.extxyz", dft_set),
        },
    }
    manager = create_manager(artifact_store, tmp_path / "trainer")
    try:
        with (
            running_service(lambda s: add_oracle(s, work_dir=tmp_path / "oracle", store=artifact_store)) as oracle,
            running_service(functools.partial(add_trainer, manager=manager)) as trainer,
        ):
            ctx = StepContext(
                config=config,
                store=artifact_store,
                run_dir=tmp_path / "run",
                seeds=[atoms_to_structure(a) for a in load_seeds(config)],
                sampler_address="",
                oracle_address=oracle,
                trainer_address=trainer,
                report=lambda _: None,
                previous=previous,
                iteration=1,
                export_prefix="iteration_01/",
            )
            outcome = AceFitStep().run(ctx)
    finally:
        manager.shutdown(stop_workers=True)

    added = read_structures(artifact_store.path(outcome.outputs[DFT_STRUCTURES_OUTPUT]))
    # The 4 sane structures; the collision is left out and counted; the isolated atom is no training structure.
    assert len(added) == 4
    assert outcome.metrics["dft_structures_count"] == 4 and outcome.metrics["dft_structures_left_out_count"] == 1
    assert outcome.metrics["structures_count"] == len(md_like) + 4  # the trainer fitted on both shards
    assert "iteration_01/step6_base_ace/dft_structures_committee.extxyz" in outcome.exports
    # The committee's labels (two copies of the teacher: its own energy and forces), not DFT's.
    from mace.calculators import MACECalculator

    calc = MACECalculator(model_paths=[str(resolve_teacher("bundled"))], device="cpu", default_dtype="float64")
    for original, labelled in zip(dft, added, strict=True):
        np.testing.assert_allclose(labelled.positions, original.positions, atol=1e-7)  # extxyz's 8 digits
        probe = labelled.copy()
        probe.calc = calc
        assert labelled.get_potential_energy() == pytest.approx(probe.get_potential_energy(), abs=1e-5)
        np.testing.assert_allclose(labelled.get_forces(), probe.get_forces(), atol=1e-5)
        assert not np.allclose(labelled.get_forces(), original.get_forces(), atol=1e-3)
        assert labelled.info["level_of_theory"].startswith("mace")
    assert len({a.info["fit_group"] for a in added}) == 4  # each its own cross-validation group
    # Inside the base's data: its active set spans them (γ ≤ 1 up to the maxvol tolerance).
    grades = extrapolation_grades(
        artifact_store.path(outcome.outputs["yaml"]), artifact_store.path(outcome.outputs["asi"]), dft
    )
    assert grades.max() <= 1.01 + 1e-6
