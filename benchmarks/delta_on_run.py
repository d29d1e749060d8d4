"""Delta learning re-done on a finished run's own data: does the correction move the potential to the DFT level?

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/delta_on_run.py RUN_DIR [--iteration 1] [--max-dft-gamma G]

Takes the iteration's base (the student refinement's refined base when it ran, else step 6's), its DFT set
(step 2), its anchor frames (step 5's shards and the refinement's frames) and the validation's DFT-labelled
hold-out and profile, fits the delta again with the current code, and prints for base, the run's own final
and the re-fitted final: energy/force RMSE on the DFT training set and on the hold-out, and the central barrier
of the profile against DFT's. Nothing is charged: every label comes from the run directory.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import numpy as np

REPO_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO_ROOT))

from pyacemaker.services.orchestrator.reaction_profile import central_barrier_kcal  # noqa: E402
from pyacemaker.services.trainer.delta import MAX_DFT_GAMMA, fit_linear_delta  # noqa: E402
from pyacemaker.services.trainer.evaluation import evaluate_potential  # noqa: E402
from pyacemaker.structures import read_structures  # noqa: E402


def _scores(potential: Path, frames: list, profile: list) -> dict[str, float]:
    out: dict[str, float] = {}
    if frames:
        errors = evaluate_potential(potential, frames).errors
        out["energy_mev_per_atom"] = 1000 * errors.energy_rmse_per_atom
        out["forces_mev_per_a"] = 1000 * errors.forces_rmse
    if profile:
        energies = evaluate_potential(potential, profile).predictions.energies
        out["barrier_kcal"] = central_barrier_kcal(list(energies))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run_dir", type=Path)
    parser.add_argument("--iteration", type=int, default=1)
    parser.add_argument(
        "--max-dft-gamma", type=float, default=MAX_DFT_GAMMA, help="γ limit for the DFT structures (0: none)"
    )
    args = parser.parse_args()
    it = args.run_dir / f"iteration_{args.iteration:02d}"
    refined = it / "step6b_student_refinement" / "refined.yaml"
    base = refined if refined.is_file() else it / "step6_base_ace" / "base.yaml"
    dft = [a for a in read_structures(it / "step2_active_learning" / "dft.extxyz") if len(a) > 1]
    anchor = [
        a for path in sorted((it / "step5_surrogate_labels").glob("shard_*.extxyz")) for a in read_structures(path)
    ]
    student = it / "step6b_student_refinement" / "student_frames.extxyz"
    if student.is_file():
        anchor += read_structures(student)
    holdout_path, profile_path = it / "validation" / "holdout.extxyz", it / "validation" / "profile.extxyz"
    holdout = read_structures(holdout_path) if holdout_path.is_file() else []
    profile = read_structures(profile_path) if profile_path.is_file() else []
    print(
        f"base {base.relative_to(args.run_dir)}; {len(dft)} DFT, {len(anchor)} anchor, {len(holdout)} hold-out, "
        f"{len(profile)} profile frames"
    )
    if profile:
        print(f"DFT barrier {central_barrier_kcal([a.get_potential_energy() for a in profile]):.2f} kcal/mol")
    with tempfile.TemporaryDirectory() as tmp:
        refit = fit_linear_delta(base, dft, anchor, Path(tmp), max_dft_gamma=args.max_dft_gamma)
        print(
            "re-fitted delta:",
            {
                k: round(v, 5)
                for k, v in refit.metrics.items()
                if any(word in k for word in ("rmse", "weight", "lambda", "share", "beyond", "gamma"))
            },
        )
        rows = {
            "base": base.with_suffix(".yace"),
            "run final": it / "step7_delta" / "final.yace",
            "re-fitted final": refit.yace_path,
        }
        for name, path in rows.items():
            train = _scores(path, dft, [])
            held = _scores(path, holdout, profile)
            print(
                f"{name:16s} DFT-train E {train['energy_mev_per_atom']:7.2f} meV/atom "
                f"F {train['forces_mev_per_a']:7.1f} meV/Å | "
                f"hold-out E {held.get('energy_mev_per_atom', np.nan):7.2f} F "
                f"{held.get('forces_mev_per_a', np.nan):7.1f} | barrier {held.get('barrier_kcal', np.nan):6.2f}"
            )


if __name__ == "__main__":
    main()
