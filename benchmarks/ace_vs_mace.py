"""Evaluation cost of the ACE student (.yace) against its MACE teacher: same structures, same CPU core, one run.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/ace_vs_mace.py [--mace bundled|PATH] [--ace PATH.yace] [--n 300]

Both run as ASE calculators, one structure at a time, energy and forces (what MD does): ACE through pyace's
recursive C-tilde evaluator, MACE through mace's MACECalculator (float64). The process is pinned to one core
and torch to one thread; the two are timed alternately, best of three rounds each, after a warm-up. (MACE
batched through its own data loader is faster per structure but not usable for MD; see
benchmarks/mace_oracle_throughput.py.) Without --ace, a linear ACE is distilled from the teacher on the spot
(teacher-labelled SN2 frames, the trainer's step-6 fit). Structures: rattled Cl⁻ + CH3Cl frames (6 atoms) from
the example's seeds.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from ase import Atoms

REPO_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO_ROOT))

from linear_ace_sn2 import relabel_with_teacher  # noqa: E402  (benchmarks/ is on sys.path as the script's dir)

from pyacemaker.services.trainer.ace_fit import fit_linear_ace  # noqa: E402
from pyacemaker.services.trainer.evaluation import ace_calculator, mace_calculator  # noqa: E402
from pyacemaker.services.trainer.mace_finetune import load_model, model_atomic_energies  # noqa: E402
from tests.sn2_training_data import tiny_mace, xtb_frames  # noqa: E402


def seconds_per_pass(calculator, frames: list[Atoms]) -> float:
    start = time.perf_counter()
    for atoms in frames:
        work = atoms.copy()
        work.calc = calculator
        work.get_potential_energy()
        work.get_forces()
    return time.perf_counter() - start


def resolve_mace(name: str, scratch: Path) -> tuple[Path, str]:
    if name != "bundled":
        return Path(name), name
    try:
        from pyacemaker.teacher.resolve import resolve_teacher

        path = resolve_teacher("bundled")
        return path, f"bundled teacher {path.name}"
    except Exception:  # not built here: a tiny stand-in of the same architecture family
        return tiny_mace(scratch / "tiny_mace"), "tiny stand-in MACE (bundled teacher not built)"


def describe_mace(path: Path) -> str:
    model = load_model(path)
    parameters = sum(p.numel() for p in model.parameters())
    hidden = str(model.products[0].linear.irreps_out) if hasattr(model, "products") else "?"
    return f"{type(model).__name__}, {parameters} parameters, node irreps {hidden}, r_max {float(model.r_max):.1f} Å"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mace", default="bundled", help="MACE model file, or 'bundled' (the project's teacher)")
    parser.add_argument("--ace", type=Path, help="ACE .yace; default: distil one from the teacher here")
    parser.add_argument("--n", type=int, default=300, help="structures timed")
    parser.add_argument("--core", type=int, default=0, help="CPU core to pin the process to")
    args = parser.parse_args(argv)
    os.environ["OMP_NUM_THREADS"] = "1"
    os.sched_setaffinity(0, {args.core})
    import torch

    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as tmp:
        scratch = Path(tmp)
        mace_path, mace_name = resolve_mace(args.mace, scratch)
        if args.ace is not None:
            ace_path, ace_name = args.ace, str(args.ace)
        else:
            train = relabel_with_teacher(xtb_frames(30, 60, seed=0), mace_path)
            fit = fit_linear_ace(train, scratch / "ace", e0s=model_atomic_energies(load_model(mace_path)))
            ace_path = fit.yace_path
            ace_name = f"linear ACE distilled here from {len(train)} teacher-labelled frames"
            ace_name += f" ({fit.metrics['basis_functions_count']:.0f} functions, cutoff {fit.metrics['cutoff_a']} Å)"
        frames = xtb_frames(max(1, args.n // 9), 1, seed=7)[: args.n]
        ace, mace = ace_calculator(ace_path), mace_calculator([mace_path])
        for calculator in (ace, mace):
            seconds_per_pass(calculator, frames[:10])  # warm-up
        ace_best, mace_best = np.inf, np.inf
        for _ in range(3):
            ace_best = min(ace_best, seconds_per_pass(ace, frames))
            mace_best = min(mace_best, seconds_per_pass(mace, frames))
        agreement = []
        for atoms in frames[:50]:
            a, m = atoms.copy(), atoms.copy()
            a.calc, m.calc = ace, mace
            agreement.append((a.get_potential_energy() - m.get_potential_energy()) / len(atoms))
        n_atoms = sum(len(a) for a in frames)
        ace_us, mace_us = 1e6 * ace_best / n_atoms, 1e6 * mace_best / n_atoms
        print(f"structures:  {len(frames)} SN2 frames, {n_atoms} atoms; one core (#{args.core}), 1 thread")
        print(f"MACE:        {mace_name}: {describe_mace(mace_path)}")
        print(f"ACE:         {ace_name}")
        print(f"ACE  (.yace, pyace recursive, per structure): {ace_us:9.1f} µs/atom")
        print(f"MACE (MACECalculator, per structure):         {mace_us:9.1f} µs/atom")
        print(f"ratio MACE / ACE:                             {mace_us / ace_us:9.1f} x")
        print(f"ACE vs MACE energy RMSE on these frames: {1e3 * np.sqrt(np.mean(np.square(agreement))):.2f} meV/atom")
    return 0


if __name__ == "__main__":
    sys.exit(main())
