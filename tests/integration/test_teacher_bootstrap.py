"""teacher.bootstrap through real services: F⁻ + CH3Cl, which the bundled C/H/Cl teacher cannot describe, gets
its own teacher trained from GFN2-xTB labels (sampler pool + xTB MD, oracle labels, trainer mace_train job), and
step 1 then runs on that teacher."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml
from ase import Atoms

from pyacemaker.config import XtbOracleConfig
from pyacemaker.services.oracle.backends.xtb import XtbBackend
from pyacemaker.services.orchestrator.report import write_report
from pyacemaker.services.trainer.mace_finetune import load_model, model_atomic_energies
from pyacemaker.structures import CHARGE_KEY, SPIN_KEY, read_structures
from pyacemaker.v1 import common_pb2, orchestrator_pb2
from tests.conftest import SN2_DIR
from tests.integration.test_orchestrator_step1 import _kinds, _run

pytestmark = pytest.mark.slow
_K = orchestrator_pb2
SEEDS = ("reactant_complex.xyz", "transition_state.xyz", "product_complex.xyz")


def _fluoride_config(tmp_path: Path) -> Path:
    """The quick SN2 config on F⁻ + CH3Cl seeds (the incoming chloride replaced by fluorine), teacher bootstrapped
    small, stopping after step 1."""
    (tmp_path / "seeds").mkdir()
    for name in SEEDS:
        lines = (SN2_DIR / "seeds" / name).read_text().splitlines()
        assert lines[6].startswith("Cl ")
        lines[6] = "F " + lines[6][3:]
        (tmp_path / "seeds" / name).write_text("\n".join(lines) + "\n")
    data = yaml.safe_load((SN2_DIR / "config_quick.yaml").read_text())
    data["name"] = "fluoride"
    data["teacher"] = {
        "bootstrap": {
            "pool": {"rattle_amplitudes": [0.03, 0.08], "rattles_per_amplitude": 4, "interpolation_images": 4},
            "md_steps": 40,
            "md_frames": 10,
            "max_epochs": 4,
        }
    }
    data["sampling"]["pool"].update(rattles_per_amplitude=4, interpolation_images=4, fragment_rotations_per_seed=2)
    data["sampling"]["direct"]["n_select"] = 6
    data["stop_after"] = "direct_sampling"
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def test_a_bootstrapped_teacher_knows_fluorine_and_step1_runs_on_it(all_services, tmp_path):
    config = _fluoride_config(tmp_path)
    run, events = _run(all_services, config)
    assert run.state == common_pb2.JOB_STATE_SUCCEEDED, run.error
    run_dir = tmp_path / "runs" / "fluoride"
    teacher_dir = run_dir / "step0_teacher"
    record = json.loads((teacher_dir / "teacher.json").read_text())
    train = read_structures(teacher_dir / "train.extxyz")
    assert record["n_labelled"] == len(train) > 10
    assert record["n_labelled"] + record["n_failed"] + record["n_above_max_force"] == (
        len(SEEDS) + record["n_pool"] + record["n_md_frames"]
    )
    assert record["n_md_frames"] == 10 and record["level_of_theory"].startswith("xtb")
    # The default replicas: each of the 7 windows at each of the 2 temperatures once (md.replicas is for step 4).
    assert record["n_md_replicas"] == 7 * 2
    assert {"energy_rmse_ev_per_atom", "forces_rmse_ev_per_a"} <= set(record)

    # The teacher's E0s are GFN2-xTB's isolated neutral atoms, computed here independently.
    xtb = XtbBackend(XtbOracleConfig(backend="xtb", method="GFN2-xTB"))
    multiplicity = {1: 2, 6: 3, 9: 2, 17: 2}
    expected = {}
    for z, spin in multiplicity.items():
        atom = Atoms(numbers=[z])
        atom.info.update({CHARGE_KEY: 0, SPIN_KEY: spin})
        expected[z] = xtb.label(atom).energy
    e0s = model_atomic_energies(load_model(teacher_dir / "teacher.model"))
    assert e0s == pytest.approx(expected, abs=1e-6)
    assert record["isolated_atom_energies_ev"] == pytest.approx({str(z): e for z, e in expected.items()}, abs=1e-9)

    # Step 1 ran on it: the bundled teacher would have refused fluorine.
    selected = read_structures(run_dir / "step1_direct" / "direct.extxyz")
    assert len(selected) == 6 and all("F" in a.get_chemical_symbols() for a in selected)
    assert _K.RUN_EVENT_KIND_STEP_COMPLETED in _kinds(events, "teacher_bootstrap")

    # The report's teacher section gives the record's figures.
    page = write_report(run_dir).read_text()
    teacher_section = page[page.index("<h2>The teacher</h2>") : page.index("<h2>Step 1: DIRECT sampling</h2>")]
    assert "The run trained its own teacher" in teacher_section
    assert f"<th>Labelled (trained on and validated)</th><td>{len(train)}</td>" in teacher_section
    assert f"H {expected[1]:.4f}, C {expected[6]:.4f}, F {expected[9]:.4f}" in teacher_section  # E0s, eV

    # Started again: both steps are found done and skipped.
    run, events = _run(all_services, config)
    assert run.state == common_pb2.JOB_STATE_SUCCEEDED, run.error
    assert _kinds(events, "teacher_bootstrap") == [_K.RUN_EVENT_KIND_STEP_SKIPPED]
    assert _kinds(events, "direct_sampling") == [_K.RUN_EVENT_KIND_STEP_SKIPPED]
