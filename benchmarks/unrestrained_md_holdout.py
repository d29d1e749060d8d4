"""Unrestrained MD at a run's own DFT level: does the handed-out potential hold on trajectories the pipeline never ran?

    OMP_NUM_THREADS=1 PYTHONPATH=. .venv/bin/python benchmarks/unrestrained_md_holdout.py RUN_DIR
        [--temperatures 300 600] [--steps 840] [--equilibration 200] [--every 40]

The frames: ASE Langevin MD (0.5 fs, friction 0.002 fs⁻¹) driven by the run's own oracle backend (the config's
`oracle` section, in this process), with no restraints, from every seed at every temperature; a frame every
`--every` steps after `--equilibration`. The MD itself is at the DFT level, so each frame is labelled as it is
made. The pipeline never makes such frames: it samples with the MACE committee and the ACE, in restraint windows
along ξ, with a thermostat. An exothermic reaction started at its TS gives hot products here (the released
energy in the new bond), which window MD does not visit. The frames are written to
build/unrestrained_md/<run name>.extxyz and reused on the next call.

Scored: the handed-out final ACE, the same iteration's base (refined when the refinement ran) and its no-teacher
ablation (validation/direct_ace): force RMSE (meV/Å), energy RMSE (meV/atom), the frames whose own force RMSE
exceeds 1 eV/Å, and the largest extrapolation grade γ.

Cost: seeds × temperatures × steps calls of the DFT level: a minute for xTB on a small molecule, hours for a
hybrid functional (give fewer --steps there).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
from ase import Atoms, units
from ase.calculators.singlepoint import SinglePointCalculator
from ase.md.langevin import Langevin
from ase.md.velocitydistribution import MaxwellBoltzmannDistribution, Stationary

REPO_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO_ROOT))

from pyacemaker.config import config_from_json  # noqa: E402
from pyacemaker.seeds import load_seeds  # noqa: E402
from pyacemaker.services.oracle.backends import create_backend  # noqa: E402
from pyacemaker.services.orchestrator.state import saved_config_json  # noqa: E402
from pyacemaker.services.trainer.evaluation import evaluate_potential, extrapolation_grades  # noqa: E402
from pyacemaker.structures import read_structures, write_extxyz  # noqa: E402

OUT_DIR = REPO_ROOT / "build" / "unrestrained_md"
TIMESTEP_FS = 0.5
FRICTION_PER_FS = 0.002  # weak: the products keep the released energy for a while, as in a dilute gas
CATASTROPHIC_FORCE_RMSE = 1.0  # eV/Å, a frame's own force RMSE


def build_frames(run_dir: Path, temperatures: list[float], steps: int, equilibration: int, every: int) -> list[Atoms]:
    config = config_from_json(saved_config_json(run_dir))
    options = config.oracle.model_dump(mode="json", exclude={"backend"})
    backend = create_backend(config.oracle.backend, options)
    frames = []
    for seed_index, seed in enumerate(load_seeds(config)):
        for temperature in temperatures:
            started = time.perf_counter()
            atoms = seed.copy()
            atoms.calc = backend.calculator(atoms)
            rng = np.random.default_rng(1000 * seed_index + int(temperature))
            MaxwellBoltzmannDistribution(atoms, temperature_K=temperature, rng=rng)
            Stationary(atoms)
            dynamics = Langevin(
                atoms, TIMESTEP_FS * units.fs, temperature_K=temperature, friction=FRICTION_PER_FS / units.fs, rng=rng
            )
            for step in range(1, steps + 1):
                dynamics.run(1)
                if step > equilibration and step % every == 0:
                    frame = atoms.copy()
                    frame.calc = SinglePointCalculator(
                        frame, energy=atoms.get_potential_energy(), forces=atoms.get_forces()
                    )
                    frame.info.update(seed.info, md_source=f"{seed.info.get('source', seed_index)}@{temperature:g}K")
                    frames.append(frame)
            print(
                f"  {seed.info.get('source', seed_index)} at {temperature:g} K: {time.perf_counter() - started:.0f} s"
            )
    return frames


def run_potentials(run_dir: Path) -> dict[str, Path]:
    summary = json.loads((run_dir / "run_summary.json").read_text())
    iteration = run_dir / f"iteration_{int(summary['best_iteration']):02d}"
    refined = iteration / "step6b_student_refinement" / "refined.yace"
    candidates = {
        "handed-out final ACE": run_dir / summary["final_potential"],
        "its base ACE": refined if refined.is_file() else iteration / "step6_base_ace" / "base.yace",
        "its no-teacher ablation": iteration / "validation" / "direct_ace.yace",
    }
    return {name: path for name, path in candidates.items() if path.is_file()}


def score(name: str, potential: Path, frames: list[Atoms]) -> None:
    evaluation = evaluate_potential(potential, frames)
    per_frame = [
        float(np.sqrt(np.mean((predicted - atoms.get_forces()) ** 2)))
        for atoms, predicted in zip(frames, evaluation.predictions.forces, strict=True)
    ]
    bad = [rmse > CATASTROPHIC_FORCE_RMSE for rmse in per_frame]
    rest = np.concatenate(
        [
            (predicted - atoms.get_forces()).ravel()
            for atoms, predicted, is_bad in zip(frames, evaluation.predictions.forces, bad, strict=True)
            if not is_bad
        ]
    )
    yaml, asi = potential.with_suffix(".yaml"), potential.with_suffix(".asi")
    gamma = f"{extrapolation_grades(yaml, asi, frames).max():.3g}" if yaml.is_file() and asi.is_file() else "–"
    print(
        f"{name:24s} F {1000 * evaluation.errors.forces_rmse:8.1f} meV/Å"
        f" (frames ≤ 1 eV/Å: {1000 * np.sqrt(np.mean(rest**2)):6.1f})"
        f"  E {1000 * evaluation.errors.energy_rmse_per_atom:7.2f} meV/atom"
        f"  frames > 1 eV/Å {sum(bad)}/{len(frames)}  max γ {gamma}"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run_dir", type=Path)
    parser.add_argument("--temperatures", type=float, nargs="+", default=[300.0, 600.0], help="K")
    parser.add_argument("--steps", type=int, default=840, help="MD steps of 0.5 fs per seed and temperature")
    parser.add_argument("--equilibration", type=int, default=200, help="steps before the first frame")
    parser.add_argument("--every", type=int, default=40, help="steps between frames")
    args = parser.parse_args()
    run_dir = args.run_dir.resolve()
    path = OUT_DIR / f"{run_dir.name}.extxyz"
    if path.is_file():
        frames = read_structures(path)
        print(f"{len(frames)} frames from {path}")
    else:
        frames = build_frames(run_dir, args.temperatures, args.steps, args.equilibration, args.every)
        OUT_DIR.mkdir(parents=True, exist_ok=True)
        write_extxyz(path, frames)
        print(f"{len(frames)} frames -> {path}")
    for name, potential in run_potentials(run_dir).items():
        score(name, potential, frames)


if __name__ == "__main__":
    main()
