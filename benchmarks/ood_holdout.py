"""An independent SN2 hold-out: does a potential hold outside the pipeline's own training MD?

    OMP_NUM_THREADS=1 PYTHONPATH=. .venv/bin/python benchmarks/ood_holdout.py build --level gfn1
    ... benchmarks/ood_holdout.py score --level gfn1 --run RUN_DIR [--potential NAME=FILE ...]
    ... benchmarks/ood_holdout.py md-stability [RUN_DIR] [--potential NAME=FILE.yace] [--steps 4000] [--ablation]

build: MD of Cl⁻ + CH3Cl with a method the pipeline does not sample with (GFN1-xTB through tblite by default,
`--md-method`), ASE Langevin (fixcm=False + FixCom) at 300/600/1000 K in loose restraint windows on
ξ = d(Cl1–C) − d(C–Cl2) (pyacemaker.restraints, k = 1 eV/Å², ξ₀ = −1, 0, +1 Å), each window started from the
seed nearest its ξ₀; after an equilibration, a frame every `--stride` steps. The frames are labelled at
`--level` (gfn1: GFN1-xTB, the quick config's "DFT"; b3lyp: PySCF B3LYP/def2-SVP, the flagship's level) through
the oracle's own backends and written to build/ood_holdout/<level>.extxyz, the level in each frame's info.

score: every potential on that set: force RMSE (meV/Å), energy RMSE (meV/atom), the frames whose own force RMSE
exceeds 1 eV/Å (and the force RMSE on the rest, and the worst frame's), and for an ACE with its .yaml and .asi
beside it the largest extrapolation grade γ. `--run RUN_DIR`
adds the run's handed-out final ACE (run_summary.json), its ablation (the same iteration's validation/direct_ace)
and its fine-tuned committee (step 3 of that iteration; energies aligned to the level by one fitted constant,
as the validation does for the teacher, since a MACE's energy zero is its own).

md-stability: the run's final ACE (and with --ablation its direct_ace) from reactant, TS and product at
300/600/1000 K for --steps of 0.5 fs, judged every 10 steps by pyacemaker.services.orchestrator.md_stability's
TrajectoryJudge as the pipeline's validation judges (collapse below 0.5 Å, a non-finite energy, an atom moving
faster than thermal motion allows, a split beyond 8 Å into pieces that are no seed's fragments): the survivors,
and which of them dissociated into the seeds' own fragments.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
from ase import Atoms, units
from ase.calculators.calculator import Calculator, all_changes
from ase.constraints import FixCom
from ase.md.langevin import Langevin
from ase.md.velocitydistribution import MaxwellBoltzmannDistribution

from pyacemaker.config import PyscfOracleConfig, XtbOracleConfig
from pyacemaker.restraints import DistanceDifferenceRestraint
from pyacemaker.services.orchestrator.md_stability import TrajectoryJudge, seed_fragments
from pyacemaker.services.orchestrator.steps.validation import reference_alignment
from pyacemaker.structures import LEVEL_KEY, attach_labels, read_structures, write_extxyz

REPO_ROOT = Path(__file__).resolve().parent.parent
SEEDS = [REPO_ROOT / "examples" / "sn2" / "seeds" / f"{n}.xyz" for n in ("reactant_complex", "transition_state")]
SEEDS.append(SEEDS[0].with_name("product_complex.xyz"))
OUT_DIR = REPO_ROOT / "build" / "ood_holdout"
XI_ATOMS = (4, 0, 5)  # Cl1, C, Cl2
TEMPERATURES_K = (300.0, 600.0, 1000.0)
TIMESTEP_FS = 0.5
WINDOW_CENTERS_A = (-1.0, 0.0, 1.0)
FORCE_CONSTANT = 1.0  # eV/Å²: loose, the windows overlap
CATASTROPHIC_FORCE_RMSE = 1.0  # eV/Å per frame
LEVELS = {
    "gfn1": lambda: XtbOracleConfig(backend="xtb", method="GFN1-xTB"),
    "b3lyp": lambda: PyscfOracleConfig(backend="pyscf", functional="B3LYP", basis="def2-SVP"),
}


class Restrained(Calculator):
    """A calculator plus the harmonic ξ restraint (the bias moves the dynamics; the saved frames are relabelled)."""

    implemented_properties: ClassVar[list[str]] = ["energy", "forces"]

    def __init__(self, inner: Calculator, restraint: DistanceDifferenceRestraint) -> None:
        super().__init__()
        self.inner, self.restraint = inner, restraint

    def calculate(self, atoms: Atoms | None = None, properties: Any = None, system_changes: Any = all_changes) -> None:
        super().calculate(atoms, properties, system_changes)
        assert self.atoms is not None
        probe = self.atoms.copy()
        probe.calc = self.inner
        bias_energy, bias_forces = self.restraint.energy_and_forces(probe.positions)
        self.results = {
            "energy": probe.get_potential_energy() + bias_energy,
            "forces": probe.get_forces() + bias_forces,
        }


def _seeds() -> list[Atoms]:
    return [read_structures(path)[0] for path in SEEDS]


def _md_calculator(method: str) -> Calculator:
    from tblite.ase import TBLite

    return TBLite(method=method, charge=-1, verbosity=0)


def _langevin(atoms: Atoms, temperature: float, seed: int) -> Langevin:
    atoms.set_constraint(FixCom())
    MaxwellBoltzmannDistribution(atoms, temperature_K=temperature, rng=np.random.default_rng(seed))
    return Langevin(
        atoms,
        TIMESTEP_FS * units.fs,
        temperature_K=temperature,
        friction=0.01 / units.fs,
        fixcm=False,
        rng=np.random.default_rng(seed + 1),
    )


def build(args: argparse.Namespace) -> Path:
    seeds = _seeds()
    restraint_of = {
        center: DistanceDifferenceRestraint(*XI_ATOMS, center=center, force_constant=FORCE_CONSTANT)
        for center in WINDOW_CENTERS_A
    }
    frames: list[Atoms] = []
    started = time.perf_counter()
    for t_index, temperature in enumerate(TEMPERATURES_K):
        for w_index, center in enumerate(WINDOW_CENTERS_A):
            restraint = restraint_of[center]
            start = min(seeds, key=lambda s: abs(restraint.value(s.positions) - center))
            atoms = start.copy()
            atoms.calc = Restrained(_md_calculator(args.md_method), restraint)
            dynamics = _langevin(atoms, temperature, seed=100 * t_index + w_index)
            dynamics.run(args.equilibration)
            for index in range(args.frames_per_window):
                dynamics.run(args.stride)
                frame = atoms.copy()
                frame.set_constraint()
                frame.calc = None
                frame.info.update(
                    {
                        "md_method": args.md_method,
                        "md_temperature_k": temperature,
                        "xi_center_a": center,
                        "xi_a": restraint.value(frame.positions),
                        "frame_in_window": index,
                    }
                )
                frames.append(frame)
            print(
                f"  MD {temperature:g} K, ξ₀ {center:+.1f} Å: {args.frames_per_window} frames "
                f"({time.perf_counter() - started:.0f} s)",
                flush=True,
            )
    backend = _backend(args.level)
    labelled = []
    for frame in frames:
        labels = backend.label_with_retries(frame, max_retries=2)
        if not labels.ok:
            print(f"  labelling failed, frame left out: {labels.reason}")
            continue
        atoms = attach_labels(frame.copy(), labels)
        atoms.info[LEVEL_KEY] = labels.level_of_theory
        labelled.append(atoms)
    OUT_DIR.mkdir(parents=True, exist_ok=True)
    path = OUT_DIR / f"{args.level}.extxyz"
    write_extxyz(path, labelled)
    print(f"{len(labelled)} frames at {labelled[0].info[LEVEL_KEY]} -> {path} ({time.perf_counter() - started:.0f} s)")
    return path


def _backend(level: str) -> Any:
    config = LEVELS[level]()
    if isinstance(config, XtbOracleConfig):
        from pyacemaker.services.oracle.backends.xtb import XtbBackend

        return XtbBackend(config)
    from pyacemaker.services.oracle.backends.pyscf import PyscfBackend

    return PyscfBackend(config)


# -- scoring -----------------------------------------------------------------------------------------------------


def _ace_calculator(path: Path, gamma: bool) -> Calculator:
    from pyace import PyACECalculator

    if gamma:
        calc = PyACECalculator(str(path.with_suffix(".yaml")))
        calc.set_active_set(str(path.with_suffix(".asi")))
        return calc
    return PyACECalculator(str(path), recursive_evaluator=True, recursive=True)


def run_potentials(run_dir: Path) -> dict[str, list[Path]]:
    summary = json.loads((run_dir / "run_summary.json").read_text())
    iteration = int(summary["best_iteration"])
    prefix = run_dir / f"iteration_{iteration:02d}"
    potentials = {f"final ACE (iteration {iteration})": [run_dir / summary["final_potential"]]}
    direct = prefix / "validation" / "direct_ace.yace"
    if direct.is_file():
        potentials[f"ablation: direct ACE (iteration {iteration})"] = [direct]
    committee = sorted((prefix / "step3_mace_finetune").glob("mace_*.model"))
    if committee:
        potentials[f"fine-tuned committee (iteration {iteration})"] = committee
    return potentials


def named_potentials(items: list[str] | None) -> dict[str, list[Path]]:
    """The --potential NAME=FILE options as name → [file]."""
    return {name: [Path(file)] for name, _, file in (item.partition("=") for item in items or [])}


def score_one(paths: list[Path], frames: list[Atoms]) -> dict[str, float]:
    is_ace = paths[0].suffix in (".yace", ".yaml")
    gamma = is_ace and paths[0].with_suffix(".yaml").is_file() and paths[0].with_suffix(".asi").is_file()
    grader = _ace_calculator(paths[0], gamma=True) if gamma else None
    if is_ace:
        calc = _ace_calculator(paths[0], gamma=False)
    else:
        from mace.calculators import MACECalculator

        calc = MACECalculator(model_paths=[str(p) for p in paths], device="cpu", default_dtype="float64")
    energies, forces, grades = [], [], []
    for frame in frames:
        probe = frame.copy()
        probe.calc = calc
        energies.append(probe.get_potential_energy())
        forces.append(probe.get_forces())
        if grader is not None:  # the .yaml with its active set (its energies lack E0: only γ is taken)
            graded = frame.copy()
            graded.calc = grader
            graded.get_potential_energy()
            grades.append(float(np.max(grader.results["gamma"])))
    ref_e = np.array([f.get_potential_energy() for f in frames])
    model_e = np.array(energies)
    if not is_ace:  # a MACE's energy zero is its own: align by the fitted per-element shifts (one constant here)
        model_e = model_e + reference_alignment(frames, model_e, ref_e)
    n_atoms = np.array([len(f) for f in frames])
    ref_f = [f.get_forces() for f in frames]
    per_frame = np.array([np.sqrt(np.mean((p - r) ** 2)) for p, r in zip(forces, ref_f, strict=True)])
    all_errors = np.concatenate([(p - r).ravel() for p, r in zip(forces, ref_f, strict=True)])
    sane = per_frame <= CATASTROPHIC_FORCE_RMSE
    rest = np.concatenate([(p - r).ravel() for p, r, ok in zip(forces, ref_f, sane, strict=True) if ok] or [[]])
    return {
        "forces_rmse_mev_per_a": 1000 * float(np.sqrt(np.mean(all_errors**2))),
        "forces_rmse_rest_mev_per_a": 1000 * float(np.sqrt(np.mean(rest**2))) if rest.size else float("nan"),
        "worst_frame_forces_rmse_ev_per_a": float(per_frame.max()),
        "energy_rmse_mev_per_atom": 1000 * float(np.sqrt(np.mean(((model_e - ref_e) / n_atoms) ** 2))),
        "frames_above_1_ev_per_a": int(np.count_nonzero(per_frame > CATASTROPHIC_FORCE_RMSE)),
        "n_frames": len(frames),
        "max_gamma": max(grades) if grades else float("nan"),
    }


def score(args: argparse.Namespace) -> dict[str, dict[str, float]]:
    path = OUT_DIR / f"{args.level}.extxyz"
    if not path.is_file():
        raise SystemExit(f"{path} does not exist: run `benchmarks/ood_holdout.py build --level {args.level}` first")
    frames = read_structures(path)
    potentials: dict[str, list[Path]] = {}
    if args.run:
        potentials.update(run_potentials(args.run))
    potentials.update(named_potentials(args.potential))
    print(f"hold-out: {len(frames)} frames at {frames[0].info.get(LEVEL_KEY)} ({path})")
    print(
        f"{'potential':<42} {'F RMSE meV/Å':>13} {'E RMSE meV/atom':>16} {'frames >1 eV/Å':>15} {'max γ':>10} "
        f"{'F RMSE rest':>12} {'worst frame eV/Å':>17}"
    )
    results = {}
    for name, paths in potentials.items():
        figures = score_one(paths, frames)
        results[name] = figures
        print(
            f"{name:<42} {figures['forces_rmse_mev_per_a']:>13.1f} {figures['energy_rmse_mev_per_atom']:>16.2f} "
            f"{figures['frames_above_1_ev_per_a']:>8d} of {figures['n_frames']:<4d} {figures['max_gamma']:>10.3g} "
            f"{figures['forces_rmse_rest_mev_per_a']:>12.1f} {figures['worst_frame_forces_rmse_ev_per_a']:>17.3g}"
        )
    return results


# -- MD stability --------------------------------------------------------------------------------------------------


def md_stability(args: argparse.Namespace) -> dict[str, Any]:
    potentials: dict[str, list[Path]] = {}
    if args.run_dir:
        potentials = {k: v for k, v in run_potentials(args.run_dir).items() if "committee" not in k}
        if not args.ablation:
            potentials = {k: v for k, v in potentials.items() if k.startswith("final")}
    potentials.update(named_potentials(args.potential))
    if not potentials:
        raise SystemExit("md-stability needs a run directory or --potential NAME=FILE")
    names = ("reactant", "TS", "product")
    results: dict[str, Any] = {}
    seeds = _seeds()
    allowed = seed_fragments(seeds)
    for name, (path,) in potentials.items():
        survivors, runs = 0, []
        for s_index, seed in enumerate(seeds):
            for temperature in TEMPERATURES_K:
                atoms = seed.copy()
                atoms.calc = _ace_calculator(path, gamma=False)
                dynamics = _langevin(atoms, temperature, seed=7 * s_index + int(temperature))
                judge = TrajectoryJudge(allowed, temperature, min_distance=0.5, max_neighbour_distance=8.0)
                problem = None
                for block in range(args.steps // 10):
                    dynamics.run(10)
                    step = 10 * (block + 1)
                    problem = judge.judge(atoms, atoms.get_potential_energy(), step * TIMESTEP_FS)
                    if problem is not None:
                        problem = f"step {step}: {problem}"
                        break
                survivors += problem is None
                outcome = problem or (
                    f"survived, dissociated {judge.dissociation}" if judge.dissociation else "survived"
                )
                runs.append(f"{names[s_index]} {temperature:g} K: {outcome}")
        results[name] = {"survivors": survivors, "runs": len(runs), "detail": runs}
        print(f"{name}: {survivors}/{len(runs)} runs survive {args.steps} steps of 0.5 fs")
        for line in runs:
            print(f"    {line}")
    return results


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    b = sub.add_parser("build", help="MD of an independent method, labelled at --level")
    b.add_argument("--level", choices=sorted(LEVELS), default="gfn1")
    b.add_argument("--md-method", default="GFN1-xTB", help="tblite method that drives the MD")
    b.add_argument("--equilibration", type=int, default=200, help="steps before the first frame of a window")
    b.add_argument("--stride", type=int, default=60, help="steps between frames")
    b.add_argument("--frames-per-window", type=int, default=6, help="frames per window and temperature")
    s = sub.add_parser("score", help="score potentials on the built hold-out")
    s.add_argument("--level", choices=sorted(LEVELS), default="gfn1")
    s.add_argument("--run", type=Path, help="a run directory: its final ACE, ablation and committee")
    s.add_argument("--potential", action="append", help="NAME=FILE (.yace, with .yaml/.asi beside for γ)")
    m = sub.add_parser("md-stability", help="MD stability of a run's final ACE")
    m.add_argument("run_dir", type=Path, nargs="?", help="a finished run (run_summary.json)")
    m.add_argument("--potential", action="append", help="NAME=FILE.yace, also (or instead of a run)")
    m.add_argument("--steps", type=int, default=4000)
    m.add_argument("--ablation", action="store_true", help="also the run's ablation (direct_ace)")
    args = parser.parse_args()
    if args.command == "build":
        build(args)
    elif args.command == "score":
        score(args)
    else:
        md_stability(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
