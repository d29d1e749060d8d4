"""The run report, built from synthetic run directories written through the real RunState and DFT-ledger APIs,
a real artifact store and real extxyz files. The figures the report must show are computed here with numpy."""

from __future__ import annotations

import hashlib
import json
import shutil
import sqlite3
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from ase import units
from ase.calculators.singlepoint import SinglePointCalculator
from PIL import Image

from pyacemaker.artifacts import ArtifactStore
from pyacemaker.cli.main import EXIT_BAD_INPUT, EXIT_OK, main
from pyacemaker.run_layout import STATE_FILE
from pyacemaker.services.orchestrator.ledger import DftLedger
from pyacemaker.services.orchestrator.report import PLOTS, write_report
from pyacemaker.services.orchestrator.state import RunState, StepRow
from pyacemaker.structures import write_extxyz
from pyacemaker.v1 import common_pb2, orchestrator_pb2
from tests.conftest import sn2_seeds

LEVEL = "PBE/def2-SVP (pyscf)"
T0 = 1_790_000_000.0  # a fixed start time, so step durations are known
LOOPED_STEPS = ("mace_finetune", "surrogate_md", "surrogate_labelling", "ace_fit", "delta_fit", "validation")
# Noise (energy eV/atom, forces eV/Å) each model gets on top of the reference, per iteration.
NOISE = {
    1: {
        "teacher": (0.030, 0.40),
        "committee": (0.020, 0.25),
        "base_ace": (0.012, 0.15),
        "final_ace": (0.008, 0.12),
        "direct_ace": (0.009, 0.30),
    },
    2: {
        "teacher": (0.030, 0.40),
        "committee": (0.019, 0.24),
        "base_ace": (0.011, 0.14),
        "final_ace": (0.003, 0.08),
        "direct_ace": (0.006, 0.20),
    },
}
BARRIER_HEIGHT_EV = {"dft": 0.120, "teacher": 0.150, "base_ace": 0.131, "final_ace": 0.122, "direct_ace": 0.140}


@dataclass
class SyntheticRun:
    run_dir: Path
    # Figures computed here that the report must show.
    rmse: dict[int, dict[str, tuple[float, float]]] = field(default_factory=dict)  # iteration -> model -> (E, F)
    rmse_by_source: dict[tuple[int, str, str], tuple[float, float]] = field(default_factory=dict)
    barriers: dict[str, float] = field(default_factory=dict)
    digests: dict[str, str] = field(default_factory=dict)  # exported path -> sha256 of the file
    coverage: float = 0.0


class RunWriter:
    """Writes a run directory the way the orchestrator does: artifacts into the store, copies exported into
    the run directory, step rows and events through RunState."""

    def __init__(self, run_dir: Path, store: ArtifactStore) -> None:
        self.run_dir = run_dir
        self.store = store
        self.state = RunState(run_dir)
        self.clock = T0
        self.durations: dict[str, float] = {}

    def step(self, name: str, files: dict[str, tuple[Path, str, str]], duration_s: float, metrics=None) -> None:
        """files: output name -> (file, kind, path exported to in the run dir, "" for none)."""
        self.state.mark_step(name, f"key-{name}", orchestrator_pb2.STEP_STATE_RUNNING)
        self.state.add_event(orchestrator_pb2.RUN_EVENT_KIND_STEP_STARTED, step=name)
        outputs, exported = {}, {}
        for output, (path, kind, relative) in files.items():
            ref = self.store.put_file(path, kind=kind)
            outputs[output] = ref
            if relative:
                target = self.run_dir / relative
                target.parent.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(self.store.path(ref), target)
                exported[relative] = ref.sha256
        row = StepRow(name, f"key-{name}", orchestrator_pb2.STEP_STATE_COMPLETED, outputs, metrics or {}, exported)
        self.state.complete_step(row)
        self.state.add_event(orchestrator_pb2.RUN_EVENT_KIND_STEP_COMPLETED, step=name)
        self.durations[name] = duration_s

    def close(self) -> None:
        self.state.close()
        # RunState stamps the wall clock; put the steps on a known timeline instead.
        db = sqlite3.connect(self.run_dir / STATE_FILE)
        with db:
            for name, duration in self.durations.items():
                db.execute(
                    "UPDATE steps SET started=?, finished=? WHERE name=?", (self.clock, self.clock + duration, name)
                )
                self.clock += duration
        db.close()


def _json_file(tmp: Path, name: str, data: dict) -> Path:
    path = tmp / name
    path.write_text(json.dumps(data, indent=1))
    return path


def _labelled_frames(rng: np.random.Generator, n: int) -> list:
    seeds = sn2_seeds()
    frames = []
    for i in range(n):
        atoms = seeds[i % len(seeds)].copy()
        atoms.rattle(0.05, seed=int(rng.integers(1 << 30)))
        forces = rng.normal(0.0, 1.0, (len(atoms), 3))
        atoms.calc = SinglePointCalculator(atoms, energy=-12000.0 + rng.normal(0, 0.1), forces=forces)
        frames.append(atoms)
    return frames


def _write_step1(writer: RunWriter, scratch: Path, rng: np.random.Generator) -> float:
    pool, direct = scratch / "pool.extxyz", scratch / "direct.extxyz"
    frames = _labelled_frames(rng, 12)
    write_extxyz(pool, frames)
    write_extxyz(direct, frames[:6])
    coverage = 0.8734
    summary = {
        "n_pool": 12,
        "n_rejected": 3,
        "n_selected": 6,
        "coverage": coverage,
        "n_components": 4,
        "explained_variance_ratio": [0.5, 0.2, 0.1, 0.05],
        "n_clusters": 6,
        "featuriser": "oracle",
        "selected_pool_indices": [0, 1, 2, 3, 4, 5],
    }
    writer.state.add_event(orchestrator_pb2.RUN_EVENT_KIND_RUN_STARTED, message="run sn2-demo")
    writer.step(
        "direct_sampling",
        {
            "pool": (pool, "structures", "step1_direct/pool.extxyz"),
            "direct": (direct, "structures", "step1_direct/direct.extxyz"),
            "summary": (
                _json_file(scratch, "selection.json", summary),
                "selection_summary",
                "step1_direct/selection.json",
            ),
        },
        duration_s=42.0,
        metrics={"coverage": coverage},
    )
    return coverage


def _validation_record(iteration: int, rng: np.random.Generator, run: SyntheticRun, dft_calls: int) -> dict:
    n, n_atoms = 10, 6
    ref_energy = -75.0 + 0.05 * rng.standard_normal(n)
    ref_forces = rng.normal(0.0, 1.5, (n * n_atoms, 3))
    models = {}
    run.rmse[iteration] = {}
    sources = np.array(["surrogate_md"] * 6 + ["teacher_md"] * 4)
    for model, (e_noise, f_noise) in NOISE[iteration].items():
        energy = ref_energy + e_noise * rng.standard_normal(n)
        forces = ref_forces + f_noise * rng.standard_normal(ref_forces.shape)
        e_rmse = 1000 * float(np.sqrt(np.mean((energy - ref_energy) ** 2)))
        f_rmse = 1000 * float(np.sqrt(np.mean((forces - ref_forces) ** 2)))
        run.rmse[iteration][model] = (e_rmse, f_rmse)
        by_source = {}
        for src in ("surrogate_md", "teacher_md"):
            frames = sources == src
            rows = np.repeat(frames, n_atoms)
            by_source[src] = {
                "n": int(frames.sum()),
                "energy_rmse_mev_per_atom": 1000 * float(np.sqrt(np.mean((energy - ref_energy)[frames] ** 2))),
                "forces_rmse_mev_per_a": 1000 * float(np.sqrt(np.mean((forces - ref_forces)[rows] ** 2))),
            }
            run.rmse_by_source[(iteration, model, src)] = (
                by_source[src]["energy_rmse_mev_per_atom"],
                by_source[src]["forces_rmse_mev_per_a"],
            )
        models[model] = {
            "max_gamma": 3.5e6 if model == "direct_ace" else 1.25,
            "energy_rmse_mev_per_atom": e_rmse,
            "forces_rmse_mev_per_a": f_rmse,
            "energy_per_atom_ev": energy.tolist(),
            "forces_ev_per_a": forces.tolist(),
            "by_source": by_source,
        }
    xi = np.linspace(-1.2, 1.2, 13)
    energies, barriers = {}, {}
    for method, height in BARRIER_HEIGHT_EV.items():
        curve = -2000.0 + height * np.exp(-(xi**2) / 0.2)  # each method on its own energy zero
        energies[method] = curve.tolist()
        barriers[method] = float((curve.max() - curve.min()) / (units.kcal / units.mol))
    run.barriers = barriers
    final = run.rmse[iteration]["final_ace"]
    direct = run.rmse[iteration]["direct_ace"]
    ablation = {
        "model": "direct_ace",
        "n_training_structures": 8,
        "fit": {},
        "error": "",
        "gain": {
            "forces_rmse_ratio_final_over_direct": final[1] / direct[1],
            "energy_rmse_ratio_final_over_direct": final[0] / direct[0],
        },
    }
    return {
        "iteration": iteration,
        "level_of_theory": LEVEL,
        "n_holdout": n,
        "n_holdout_by_source": {"surrogate_md": 6, "teacher_md": 4},
        "dft_calls_total": dft_calls,
        "dft_budget": 60,
        "target": {"energy_mev_per_atom": 5.0, "forces_mev_per_a": 100.0},
        "target_met": final[0] < 5.0 and final[1] < 100.0,
        "reference": {"energy_per_atom_ev": ref_energy.tolist(), "forces_ev_per_a": ref_forces.tolist()},
        "models": models,
        "profile": {"xi_a": xi.tolist(), "energies_ev": energies, "central_barrier_kcal_per_mol": barriers},
        "ablation": ablation,
        "md_stability": {
            "steps": 400,
            "timestep_fs": 0.5,
            "n_runs": 6,
            "n_survivors": 6 if iteration == 1 else 5,
            "survivors_by_temperature": {"300": [3, 3], "600": [3 if iteration == 1 else 2, 3]},
            "runs": [
                {"seed": 0, "temperature_k": 600.0, "steps_done": 120, "survived": False, "problem": "step 120: boom"},
                {
                    "seed": 2,
                    "temperature_k": 600.0,
                    "steps_done": 400,
                    "survived": True,
                    "problem": None,
                    "dissociation": "at 150 fs into CH3Cl + Cl (atom 4 8.01 Å from its nearest neighbour)",
                },
            ]
            if iteration == 2
            else [],
        },
    }


def write_synthetic_run(
    run_dir: Path, store: ArtifactStore, iterations: int, best_iteration: int | None = None
) -> SyntheticRun:
    """A run with step 1 and `iterations` full iterations (iterations=0: a run that stopped after step 1)."""
    rng = np.random.default_rng(7)
    scratch = run_dir.parent / f"{run_dir.name}-scratch"
    scratch.mkdir()
    run = SyntheticRun(run_dir)
    writer = RunWriter(run_dir, store)
    config = {"name": "sn2-demo", "budget": {"max_dft_calls": 60}}
    writer.state.save_config("sn2-demo", json.dumps(config))
    run.coverage = _write_step1(writer, scratch, rng)
    ledger = DftLedger(run_dir / STATE_FILE)
    charged = {1: (40, 50), 2: (56, 56)}  # iteration -> DFT calls charged by the end of step 2, of validation
    for it in range(1, iterations + 1):
        prefix = f"iteration_{it:02d}"
        after_step2, after_validation = charged[it]
        ids = [f"structure-{i}" for i in range(after_validation)]
        ledger.reserve(ids, LEVEL, "pyscf", max_calls=60)
        for cid in ids[:-2]:
            ledger.record_result(cid, LEVEL, common_pb2.Labels(status=common_pb2.LABEL_STATUS_OK, energy=-1.0))
        if it == iterations:  # one failed SCF, one still pending when the run stopped
            ledger.record_result(ids[-2], LEVEL, common_pb2.Labels(status=common_pb2.LABEL_STATUS_FAILED, reason="SCF"))
        else:
            for cid in ids[-2:]:
                ledger.record_result(cid, LEVEL, common_pb2.Labels(status=common_pb2.LABEL_STATUS_OK, energy=-1.0))
        pool_std = rng.lognormal(np.log(0.03), 0.8, 200)
        factor = 3.2 if it == 1 else 2.5
        order = np.argsort(-pool_std)
        record = {
            "calibration_factor": factor,
            "force_error_threshold_ev_per_a": 0.1,
            "pool_committee_max_force_std_ev_per_a": pool_std.tolist(),
            "chosen_pool_indices": order[:10].tolist(),
            "excluded_by_force_pool_indices": [int(order[0])] if it == 1 else [],
            "dft_calls_charged": after_step2,
        }
        dft = scratch / f"dft_{it}.extxyz"
        write_extxyz(dft, _labelled_frames(rng, 8))
        writer.step(
            f"active_learning.{it}",
            {
                "dft": (dft, "structures", f"{prefix}/step2_active_learning/dft.extxyz"),
                "iteration": (
                    _json_file(scratch, f"al_{it}.json", record),
                    "al_iteration",
                    f"{prefix}/step2_active_learning/iteration.json",
                ),
            },
            duration_s=125.0 if it == 1 else 95.0,
            metrics={"calibration_factor": factor},
        )
        for number, name in enumerate(LOOPED_STEPS, start=3):
            if name == "validation":
                data = _validation_record(it, rng, run, after_validation)
                files = {
                    "validation": (
                        _json_file(scratch, f"val_{it}.json", data),
                        "validation",
                        f"{prefix}/validation/validation.json",
                    )
                }
            else:
                path = scratch / f"{name}_{it}.txt"
                path.write_text(f"{name} output of iteration {it}\n")
                exported = f"{prefix}/step7_delta/final.yace" if name == "delta_fit" else ""
                files = {
                    "potential" if name == "delta_fit" else "output": (
                        path,
                        "potential" if exported else "data",
                        exported,
                    )
                }
            writer.step(f"{name}.{it}", files, duration_s=10.0 * number)
    ledger.close()
    if iterations:
        best = best_iteration or iterations
        final = f"iteration_{best:02d}/step7_delta/final.yace"
        summary = {
            "stop_reason": "target met",
            "iterations": iterations,
            "best_iteration": best,
            "final_potential": final,
            "dft_calls": charged[iterations][1],
            "dft_budget": 60,
            "wall_time_s": 1234.0,
            "dft_calls_not_trained_on": 2,
        }
        (run_dir / "run_summary.json").write_text(json.dumps(summary))
        writer.state.add_event(orchestrator_pb2.RUN_EVENT_KIND_RUN_COMPLETED, message="done")
    writer.close()
    for path in run_dir.rglob("*"):
        if path.is_file() and path.suffix in {".extxyz", ".json", ".yace"}:
            run.digests[str(path.relative_to(run_dir))] = hashlib.sha256(path.read_bytes()).hexdigest()
    return run


def _assert_valid_png(path: Path) -> None:
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n", f"{path.name} is not a PNG"
    assert len(data) > 5000, f"{path.name} is only {len(data)} bytes"
    with Image.open(path) as image:
        image.verify()  # decodes every chunk and checks the CRCs
    with Image.open(path) as image:
        assert image.width >= 400 and image.height >= 200, f"{path.name} is {image.size}"


def test_report_shows_the_runs_figures_and_plots(tmp_path, artifact_store):
    run = write_synthetic_run(tmp_path / "run", artifact_store, iterations=2)

    html_path = write_report(run.run_dir)

    assert html_path == run.run_dir / "report" / "index.html"
    page = html_path.read_text()
    assert "target met" in page and "sn2-demo" in page
    for e_rmse, f_rmse in run.rmse[2].values():
        assert f'<td class="num">{e_rmse:.1f}</td><td class="num">{f_rmse:.1f}</td>' in page
    assert f"{run.rmse[1]['final_ace'][1]:.1f}" in page, "the learning curve table lists iteration 1's RMSE"
    for barrier in run.barriers.values():
        assert f"{barrier:.2f}" in page
    assert f"{run.barriers['final_ace'] - run.barriers['dft']:.2f}" in page
    assert f"{run.coverage:.3f}" in page
    final_digest = run.digests["iteration_02/step7_delta/final.yace"]
    assert f'<code title="{final_digest}">{final_digest[:12]}</code>' in page
    assert run.digests["step1_direct/pool.extxyz"][:12] in page
    assert "56 of a budget of 60" in page
    assert '<th>DFT calls charged but not trained on</th><td><b class="bad">2</b>' in page
    assert "5/6 runs survive" in page and "seed 0 at 600 K: step 120: boom" in page
    assert "seed 2 at 600 K survived and dissociated at 150 fs into CH3Cl + Cl" in page
    assert "56 at PBE/def2-SVP (pyscf) (failed 1, ok 54, requested 1)" in page
    assert "2 min 05 s" in page, "active_learning.1 took 125 s"
    assert "20 min 34 s" in page, "the run summary's wall time"
    for name in PLOTS:
        _assert_valid_png(run.run_dir / "report" / name)
        assert f'src="{name}"' in page


def test_report_headline_and_ablation_give_the_handed_out_iteration_s_figures(tmp_path, artifact_store):
    run = write_synthetic_run(tmp_path / "run", artifact_store, iterations=2, best_iteration=1)

    page = write_report(run.run_dir).read_text()

    headline = page.split("<h2>Step 1")[0]
    final_1, final_2 = run.rmse[1]["final_ace"], run.rmse[2]["final_ace"]
    assert "iteration_01/step7_delta/final.yace" in headline
    assert f"<b>{final_1[0]:.1f} meV/atom, {final_1[1]:.1f} meV/Å</b>" in headline
    assert f"<b>{final_2[0]:.1f} meV/atom, {final_2[1]:.1f} meV/Å</b>" not in headline, "another iteration's figures"
    ablation = page.split("<h2>Ablation: is distillation earning its place?</h2>")[1].split("<h2>")[0]
    direct_1 = run.rmse[1]["direct_ace"]
    assert f"{final_1[1] / direct_1[1]:.2f}" in ablation and f"{final_1[0] / direct_1[0]:.2f}" in ablation
    assert "the distillation earns its place on forces" in ablation  # 0.12 vs 0.30 eV/Å of noise
    assert "8 DFT training structures of iteration 1" in ablation
    assert "3.50e+06" in ablation and "1.25" in ablation
    assert "MD stability: 6/6 runs survive 400 steps." in headline
    validation = page.split("<h2>Validation on the DFT hold-out</h2>")[1].split("<h2>")[0]
    e_rmse, f_rmse = run.rmse_by_source[(1, "final_ace", "teacher_md")]
    assert f"{e_rmse:.1f} meV/atom, {f_rmse:.1f} meV/Å" in validation
    assert "an independent MD (the teacher, other seed, hotter) (4)" in validation
    assert f"{abs(run.barriers['direct_ace'] - run.barriers['dft']):.2f}" in ablation


def test_report_of_a_run_that_stopped_after_step_1_says_what_is_missing(tmp_path, artifact_store):
    run = write_synthetic_run(tmp_path / "run", artifact_store, iterations=0)

    page = write_report(run.run_dir).read_text()

    assert "validation is missing" in page
    assert "no active-learning iteration yet" in page
    assert "the run has not finished (run_summary.json is missing)" in page
    assert run.digests["step1_direct/direct.extxyz"][:12] in page
    assert "42.0 s" in page
    assert not (run.run_dir / "report" / "parity.png").exists()
    _assert_valid_png(run.run_dir / "report" / "step_times.png")


def test_a_malformed_validation_record_empties_only_its_sections(tmp_path, artifact_store):
    run = write_synthetic_run(tmp_path / "run", artifact_store, iterations=1)
    record = run.run_dir / "iteration_01/validation/validation.json"
    data = json.loads(record.read_text())
    del data["models"]
    record.write_text(json.dumps(data))

    page = write_report(run.run_dir).read_text()

    # The record is read whole: each of its sections names the file and the key it lacks.
    problem = "iteration_01/validation/validation.json: missing key &#x27;models&#x27;"
    headline = page.split("<h2>The teacher")[0]
    assert f"no validation yet: {problem}" in headline
    for section in ("Validation on the DFT hold-out", "Ablation", "Learning curve", "Energy profile along ξ"):
        assert problem in page.split(f"<h2>{section}")[1].split("<h2>")[0], section
    assert "<b>target met</b>" in page, "the summary still shows the stop reason"
    _assert_valid_png(run.run_dir / "report" / "dft_calls.png")


def test_cli_reports_a_run_and_refuses_a_directory_without_state(tmp_path, artifact_store, capsys):
    run = write_synthetic_run(tmp_path / "run", artifact_store, iterations=0)
    assert main(["report", str(run.run_dir), "--open-path"]) == EXIT_OK
    assert capsys.readouterr().out.strip() == str((run.run_dir / "report" / "index.html").resolve())

    empty = tmp_path / "not-a-run"
    empty.mkdir()
    assert main(["report", str(empty)]) == EXIT_BAD_INPUT
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"error: {empty} is not a run directory: it has no state.sqlite"]
    assert not (empty / "report").exists()


def test_report_of_a_failed_run_names_the_failure(tmp_path, artifact_store):
    run = write_synthetic_run(tmp_path / "run", artifact_store, iterations=0)
    state = RunState(run.run_dir)
    state.mark_step("active_learning.1", "key", orchestrator_pb2.STEP_STATE_RUNNING)
    state.mark_step("active_learning.1", "key", orchestrator_pb2.STEP_STATE_FAILED, error="UNAVAILABLE: oracle down")
    state.add_event(orchestrator_pb2.RUN_EVENT_KIND_RUN_FAILED, step="active_learning.1", message="oracle down")
    state.close()

    page = write_report(run.run_dir).read_text()

    assert "the run failed: oracle down (no run_summary.json)" in page
    assert 'Step active_learning.1 failed</th><td><span class="bad">UNAVAILABLE: oracle down</span>' in page
