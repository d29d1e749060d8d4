"""Delta learning on SN2: a base ACE trained on level A (GFN2-xTB), corrected with a few level-B labels,
judged on held-out level-B frames.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/delta_learning.py [--level-b pbe|scaled] [--dft 30]

Level B: real DFT, PySCF PBE/6-31G with density fitting (default; a few seconds a frame, run in two
processes), or `scaled`, a systematically different variant of xTB (binding energies and forces × 1.15,
isolated atoms +0.05 eV). Frames: rattled and interpolated Cl⁻ + CH3Cl geometries from the example's seeds;
the surrogate set, the DFT set and the held-out set are drawn independently. Prints, on the held-out B frames,
the errors of the base and of the final (delta-corrected) potential: energy per atom (absolute, and after
removing the mean offset, i.e. energy differences) and forces.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
from ase import Atoms

REPO_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO_ROOT))

from pyacemaker.config import PyscfOracleConfig  # noqa: E402
from pyacemaker.services.trainer.ace_fit import fit_linear_ace  # noqa: E402
from pyacemaker.services.trainer.delta import fit_linear_delta  # noqa: E402
from pyacemaker.services.trainer.evaluation import evaluate_potential  # noqa: E402
from pyacemaker.structures import attach_labels  # noqa: E402
from tests.sn2_training_data import level_b, xtb_e0s, xtb_frames  # noqa: E402

PYSCF = PyscfOracleConfig(backend="pyscf", functional="PBE", basis="6-31G", density_fit=True)


def _pyscf_label(atoms: Atoms) -> Atoms:
    from pyacemaker.services.oracle.backends.pyscf import PyscfBackend

    return attach_labels(atoms.copy(), PyscfBackend(PYSCF).label(atoms))


def pyscf_frames(frames: list[Atoms], workers: int) -> list[Atoms]:
    with ProcessPoolExecutor(max_workers=workers) as pool:
        labelled = list(pool.map(_pyscf_label, frames))
    return [a for a in labelled if a.info.get("label_status") == "ok"]


def errors(path: Path, frames: list[Atoms]) -> dict[str, float]:
    evaluation = evaluate_potential(path, frames)
    n_atoms = np.array([len(a) for a in frames])
    reference = np.array([a.get_potential_energy() for a in frames])
    error = (evaluation.predictions.energies - reference) / n_atoms
    return {
        "energy": 1e3 * evaluation.errors.energy_rmse_per_atom,
        "relative": 1e3 * float(np.sqrt(np.mean((error - error.mean()) ** 2))),
        "forces": 1e3 * evaluation.errors.forces_rmse,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--level-b", choices=["pbe", "scaled"], default="pbe")
    parser.add_argument("--dft", type=int, default=30, help="level-B frames for the correction")
    parser.add_argument("--held-out", type=int, default=40, help="level-B frames for judging")
    parser.add_argument("--workers", type=int, default=2, help="processes for the PySCF labels")
    args = parser.parse_args(argv)
    os.environ.setdefault("OMP_NUM_THREADS", "1")

    surrogate = xtb_frames(40, 80, seed=0)
    candidates = xtb_frames(20, 40, seed=2)[: args.dft + args.held_out]
    start = time.perf_counter()
    if args.level_b == "pbe":
        labelled = pyscf_frames(candidates, args.workers)
        level = f"PySCF {PYSCF.functional}/{PYSCF.basis} (density fitting)"
    else:
        labelled = level_b(candidates)
        level = "scaled xTB (binding energies and forces x 1.15, E0 + 0.05 eV)"
    label_seconds = time.perf_counter() - start
    dft, held_out = labelled[: args.dft], labelled[args.dft :]
    with tempfile.TemporaryDirectory() as tmp:
        base = fit_linear_ace(surrogate, Path(tmp) / "base", e0s=xtb_e0s())
        final = fit_linear_delta(base.yaml_path, dft, surrogate, Path(tmp) / "final")
        before, after = errors(base.yace_path, held_out), errors(final.yace_path, held_out)
        a_errors = errors(base.yace_path, xtb_frames(20, 40, seed=2)[args.dft + args.held_out :][:40])
    functions = base.metrics["basis_functions_count"]
    print(f"level A (base):   GFN2-xTB, {len(surrogate)} surrogate frames, {functions:.0f} functions")
    print(f"level B:          {level}; {len(dft)} frames for the correction, {len(held_out)} held out")
    print(f"                  (labelling took {label_seconds:.0f} s)")
    print(
        f"delta fit:        surrogate weight {final.metrics['surrogate_weight_relative']:.2g}, "
        f"ridge λ {final.metrics['ridge_lambda_relative']:.0e} (CV over the level-B frames), "
        f"{final.metrics['fit_time_s']:.1f} s"
    )
    print(f"base on level A (its own level, 40 fresh frames): forces {a_errors['forces']:.0f} meV/Å")
    print("held-out level B           energy meV/atom   energy (offset removed) meV/atom   forces meV/Å")
    print(f"  base  (xTB-trained)   {before['energy']:16.1f}   {before['relative']:32.2f}   {before['forces']:12.1f}")
    print(f"  final (delta)         {after['energy']:16.1f}   {after['relative']:32.2f}   {after['forces']:12.1f}")
    lower = after["energy"] < before["energy"] and after["forces"] < before["forces"]
    print(f"final lower than base on energy and forces: {'yes' if lower else 'NO'}")
    return 0 if lower else 1


if __name__ == "__main__":
    sys.exit(main())
