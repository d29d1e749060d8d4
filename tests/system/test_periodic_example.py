"""The periodic example end to end (examples/si/config_quick.yaml): bulk Si through all seven steps and the
validation with real services (`pyacemaker up --ports auto`), Quantum ESPRESSO (pw.x) as DFT, and the example's
own teacher, which learnt a cheaper QE level. Checks what is particular to a crystal: stresses in the surrogate
labels, NPT cells that breathe, and an ACE whose E(V) curve (lattice constant and, with the DFT stresses in the
fits, bulk modulus) matches the DFT level's own."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import yaml

from examples.si.make_teacher import calculator_energy_function, equation_of_state, qe_energy_function
from pyacemaker.config import load_config
from pyacemaker.services.oracle.backends.qe import QeBackend
from pyacemaker.services.orchestrator.ledger import DftLedger
from pyacemaker.services.orchestrator.report import read_run
from pyacemaker.structures import read_structures
from tests.conftest import REPO_ROOT, cli

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(shutil.which("pw.x") is None, reason="needs Quantum ESPRESSO's pw.x (make install-system)"),
]
SI_DIR = REPO_ROOT / "examples" / "si"
# How far the final ACE's equilibrium lattice constant may lie from the DFT level's own. The teacher is 0.6 %
# off (5.449 against 5.418 Å; measured on whole quick runs: the final ACE 5.408 Å with stress in the fits, 5.448
# without, the base ACE 5.439-5.466 Å); one tiny iteration with 6 + 3 DFT labels is not expected to remove all
# of it, but a potential that lost the crystal's E(V) curve would miss by far more.
LATTICE_CONSTANT_TOLERANCE = 0.015
# What the few DFT cells of the quick run resolve of the lattice constant: the correction must move the crystal
# towards DFT's, unless the base is already closer than this (relative).
LATTICE_CONSTANT_RESOLUTION = 0.003
# How far the final ACE's bulk modulus may lie from the DFT level's E(V) one (QE 93.4 GPa). Measured on whole
# quick runs with the committee fine-tuned at lr 0.001 (config_quick.yaml): 93.2 GPa with the DFT cells' stresses
# in the fits (ace.stress_weight 0.01; base ACE 84.6), 92.5 without (stress_weight 0 in both fits; base 103.6).
# At mace's own rate 0.01, fine-tuning on 6 cells in batches of one was chaotic: the same commit gave members of
# 57 and 73 GPa (final ACE 78.8) on one machine and a final 92.2-92.9 on another.
# QE's own stresses at 18 Ry are not quite E(V)'s derivative (incomplete basis, Pulay stress: -1.2 GPa at its
# E(V) minimum, zero at 5.395 Å, a B of ~97 GPa from P(V)), so the fit cannot match both exactly.
BULK_MODULUS_TOLERANCE = 0.10
# The hold-out force RMSE the final ACE must reach (meV/Å) when it does not beat the base ACE outright: the
# teacher is ~80 meV/Å off on these hot frames (measured: base 76, final 80), and a broken fit (wrong cell
# handling, missing periodic images) is several hundred.
FORCE_RMSE_BOUND_MEV_PER_A = 150.0
# The final ACE's energy error on the hold-out, meV/atom: the quick run's few DFT cells set the level to about
# 10 meV/atom (measured 11 and 12 on two machines); a correction gone wrong is tens (the teacher: 22).
ENERGY_RMSE_BOUND_MEV_PER_ATOM = 15.0


def quick_config(directory: Path) -> Path:
    """The example's quick config, copied with its seeds so that the run directory lands in the temp dir; the
    teacher is the example's committed model."""
    directory.mkdir(parents=True, exist_ok=True)
    shutil.copytree(SI_DIR / "seeds", directory / "seeds")
    data = yaml.safe_load((SI_DIR / "config_quick.yaml").read_text())
    data["teacher"]["model"] = str(SI_DIR / data["teacher"]["model"])
    path = directory / "config_quick.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def test_quick_si_example_runs_all_steps_and_corrects_the_teacher(cli_env: dict[str, str], tmp_path: Path) -> None:
    env = cli_env
    from pyace import PyACECalculator

    config_path = quick_config(tmp_path / "si")
    config = load_config(config_path)
    assert cli(env, "up", "--ports", "auto").returncode == 0
    result = cli(env, "run", str(config_path))
    assert result.returncode == 0, result.stderr[-4000:]
    run_dir = config.run_dir
    assert run_dir is not None

    # The run completed one iteration within its DFT budget, and the ledger agrees with the summary.
    summary = json.loads((run_dir / "run_summary.json").read_text())
    assert summary["iterations"] == 1
    ledger = DftLedger(run_dir / "state.sqlite")
    try:
        assert summary["dft_calls"] == ledger.count() <= config.budget.max_dft_calls
    finally:
        ledger.close()
    iteration = run_dir / "iteration_01"
    al_record = json.loads((iteration / "step2_active_learning" / "iteration.json").read_text())
    # E0 came from the boxed atom at the DFT level: a Si atom is some 5 eV above a crystal atom (LDA overbinds).
    e0 = al_record["isolated_atom_energies_ev"]["14"]
    dft_set = read_structures(iteration / "step2_active_learning" / "dft.extxyz")
    crystal_energy = min(a.get_potential_energy() / len(a) for a in dft_set)
    assert 4.0 < e0 - crystal_energy < 7.0
    # DFT labels of periodic cells carry a stress.
    assert all(a.calc is not None and "stress" in a.calc.results for a in dft_set)

    # Step 4 ran NPT: the cells of the saved frames are not all the seeds' cells.
    frames = read_structures(iteration / "step4_surrogate_md" / "frames.extxyz")
    seed_volumes = {round(read_structures(p)[0].get_volume(), 3) for p in config.system.seeds}
    assert any(round(a.get_volume(), 3) not in seed_volumes for a in frames)

    # Step 5: every surrogate frame carries energy, forces and a stress (periodic cells), finite.
    shards = sorted((iteration / "step5_surrogate_labels").glob("*.extxyz"))
    labelled = [a for shard in shards for a in read_structures(shard)]
    assert len(labelled) == len(frames)
    for atoms in labelled:
        stress = np.asarray(atoms.calc.results["stress"])
        assert stress.shape in ((6,), (3, 3)) and np.all(np.isfinite(stress))

    # Validation: the final ACE on DFT labels of held-out MD frames.
    validation = json.loads((iteration / "validation" / "validation.json").read_text())
    models = validation["models"]
    final_forces = models["final_ace"]["forces_rmse_mev_per_a"]
    assert validation["n_holdout"] >= 2
    assert final_forces < models["base_ace"]["forces_rmse_mev_per_a"] or final_forces < FORCE_RMSE_BOUND_MEV_PER_A
    # Delta learning on the DFT set keeps the energies on the DFT level, away from the teacher's. Whether the base
    # is already near that level depends on where step 4's MD went, which floating-point differences between
    # machines change: measured base 72 -> final 11 meV/atom on an AMD EPYC, base 3.3 -> final 12.0 (teacher
    # 21.6) on an Intel Xeon, on a hold-out of 4 frames. So the bound is the teacher's error and an absolute one,
    # not the base's.
    final_energy = models["final_ace"]["energy_rmse_mev_per_atom"]
    assert final_energy < min(models["teacher"]["energy_rmse_mev_per_atom"], ENERGY_RMSE_BOUND_MEV_PER_ATOM)

    # The final ACE's E(V) curve against the DFT level's own, on the same 8-atom cells.
    final = PyACECalculator(str(iteration / "step7_delta" / "final.yace"))
    ace = equation_of_state(calculator_energy_function(final))
    base = equation_of_state(calculator_energy_function(PyACECalculator(str(iteration / "step6_base_ace/base.yace"))))
    scratch = tmp_path / "pw"
    scratch.mkdir()
    qe = equation_of_state(qe_energy_function(QeBackend(config.oracle), scratch))  # type: ignore[arg-type]
    fit_seconds = {
        step.name: step.metrics["fit_time_s"] for step in read_run(run_dir).steps if "fit_time_s" in step.metrics
    }
    print(
        f"lattice constant: final ACE {ace['lattice_constant_a']:.4f} Å, base ACE {base['lattice_constant_a']:.4f} Å,"
        f" QE {qe['lattice_constant_a']:.4f} Å; bulk modulus: final ACE {ace['bulk_modulus_gpa']:.1f} GPa, base ACE"
        f" {base['bulk_modulus_gpa']:.1f} GPa, QE {qe['bulk_modulus_gpa']:.1f} GPa; fit seconds {fit_seconds}"
    )
    assert abs(ace["lattice_constant_a"] / qe["lattice_constant_a"] - 1) < LATTICE_CONSTANT_TOLERANCE
    # The correction moved the crystal towards DFT (measured: 5.458 → 5.416 Å against 5.418 Å), or kept it within
    # LATTICE_CONSTANT_RESOLUTION where the base already was at DFT's (measured on another machine, where step
    # 4's MD went elsewhere: base 5.4195, final 5.4057 against 5.4176 Å).
    lattice_error = {
        name: abs(fit["lattice_constant_a"] - qe["lattice_constant_a"])
        for name, fit in [("final", ace), ("base", base)]
    }
    assert lattice_error["final"] < max(lattice_error["base"], LATTICE_CONSTANT_RESOLUTION * qe["lattice_constant_a"])
    # Absolute energies, since the ACE carries the DFT level's E0 (measured: 28 meV/atom above QE's minimum).
    assert abs(ace["energy_ev_per_atom"] - qe["energy_ev_per_atom"]) < 0.06
    # The bulk modulus is near the DFT level's (see BULK_MODULUS_TOLERANCE), and the correction with the DFT
    # cells' stresses moved it there from the base's (measured: 84.6 → 93.2 GPa).
    bulk_modulus_error = {
        name: abs(fit["bulk_modulus_gpa"] - qe["bulk_modulus_gpa"]) for name, fit in [("final", ace), ("base", base)]
    }
    assert bulk_modulus_error["final"] < BULK_MODULUS_TOLERANCE * qe["bulk_modulus_gpa"]
    assert bulk_modulus_error["final"] < bulk_modulus_error["base"]
    # A perfect crystal has zero forces by symmetry; a rattled one has restoring forces.
    crystal = read_structures(SI_DIR / "seeds" / "diamond.xyz")[0]
    crystal.calc = final
    assert np.abs(crystal.get_forces()).max() < 1e-6
    rattled = crystal.copy()
    rattled.positions[0] += [0.1, 0.0, 0.0]
    rattled.calc = final
    assert rattled.get_forces()[0, 0] < -0.5
