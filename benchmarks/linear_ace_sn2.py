"""Linear ACE on ~1000 SN2 surrogate frames: fit time and held-out RMSE against the labels.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/linear_ace_sn2.py [--labels teacher|xtb] [--rattles 80]

The frames stand in for step 4's MD frames: rattled (0.03/0.06/0.1 Å) and interpolated (rattled 0.05 Å) Cl⁻ +
CH3Cl geometries from the example's seeds. Labels: the bundled MACE teacher (step 5's surrogate labels) when
it is present, else GFN2-xTB. The held-out frames are drawn separately (another random seed). The fit is the
trainer's step-6 default: cutoff and basis size inferred, ridge strength by 5-fold cross-validation; fit time
covers design rows, cross-validation and the final solve; the active set is timed apart. The held-out errors are
also given for the frames the active set grades as inside the training data (γ ≤ 2).
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

from pyacemaker.services.trainer.ace_fit import fit_linear_ace  # noqa: E402
from pyacemaker.services.trainer.evaluation import Predictions, error_metrics, evaluate_potential  # noqa: E402
from pyacemaker.structures import labelled_copies  # noqa: E402
from tests.sn2_training_data import xtb_e0s, xtb_frames  # noqa: E402

# Extrapolation grade up to which a structure counts as inside the training data's span.
GAMMA_INSIDE = 2.0


def _subset(predictions: Predictions, mask: np.ndarray) -> Predictions:
    keep = np.flatnonzero(mask)
    return Predictions(
        predictions.energies[keep],
        [predictions.forces[i] for i in keep],
        [predictions.stresses[i] for i in keep],
        predictions.gamma_max[keep],
    )


def relabel_with_teacher(frames: list[Atoms], model: Path) -> list[Atoms]:
    from pyacemaker.services.trainer.evaluation import mace_calculator

    calculator = mace_calculator([model])
    return labelled_copies(calculator, frames)


def teacher_model() -> tuple[Path | None, dict[int, float] | None]:
    """The bundled teacher and its E0s, or (None, None) when it has not been built."""
    try:
        import json

        from pyacemaker.teacher.resolve import BUNDLED_METRICS, resolve_teacher

        path = resolve_teacher("bundled")
        e0s = {int(z): float(e) for z, e in json.loads(BUNDLED_METRICS.read_text())["e0s_ev"].items()}
        return path, e0s
    except Exception:  # the teacher is optional here: fall back to xTB labels
        return None, None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--labels", choices=["teacher", "xtb"], default="teacher", help="teacher falls back to xtb")
    parser.add_argument("--rattles", type=int, default=80, help="rattles per seed and amplitude (3 seeds × 3)")
    parser.add_argument("--images", type=int, default=140, help="interpolated images per seed pair (2 pairs)")
    args = parser.parse_args(argv)
    os.environ.setdefault("OMP_NUM_THREADS", "1")

    train = xtb_frames(args.rattles, args.images, seed=0)
    held_out = xtb_frames(max(1, args.rattles // 4), max(1, args.images // 4), seed=1)
    e0s = xtb_e0s()
    source = "GFN2-xTB (tblite)"
    if args.labels == "teacher":
        model, teacher_e0s = teacher_model()
        if model is not None and teacher_e0s is not None:
            start = time.perf_counter()
            train, held_out = relabel_with_teacher(train, model), relabel_with_teacher(held_out, model)
            e0s, source = teacher_e0s, f"bundled MACE teacher {model.name} ({time.perf_counter() - start:.0f} s)"
    with tempfile.TemporaryDirectory() as tmp:
        start = time.perf_counter()
        fit = fit_linear_ace(train, Path(tmp), e0s=e0s, seed=0)
        total = time.perf_counter() - start
        scores = evaluate_potential(fit.yace_path, held_out).errors.report()
        graded = evaluate_potential(fit.yaml_path, held_out, fit.asi_path)
    inside = graded.predictions.gamma_max <= GAMMA_INSIDE
    in_domain = error_metrics(
        [a for a, k in zip(held_out, inside, strict=True) if k], _subset(graded.predictions, inside)
    )
    metrics = fit.metrics
    print(f"training frames:   {len(train)} (6 atoms; rattled + interpolated SN2 geometries, stand-in for MD frames)")
    print(f"held-out frames:   {len(held_out)} (drawn with another seed)")
    print(f"labels:            {source}")
    print(
        f"basis:             {metrics['basis_functions_count']:.0f} functions, cutoff {metrics['cutoff_a']:.2f} Å, "
        f"ridge λ {metrics['ridge_lambda_relative']:.0e} (5-fold CV)"
    )
    print(f"fit time:          {metrics['fit_time_s']:.1f} s  (with active set: {total:.1f} s; 1 thread)")
    print(
        f"CV RMSE:           energy {1e3 * metrics['cv_energy_rmse_ev_per_atom']:.2f} meV/atom, "
        f"forces {1e3 * metrics['cv_forces_rmse_ev_per_a']:.1f} meV/Å"
    )
    print(
        f"held-out RMSE:     energy {scores['energy_rmse_mev_per_atom']:.2f} meV/atom, "
        f"forces {scores['forces_rmse_mev_per_a']:.1f} meV/Å  (MAE {scores['energy_mae_mev_per_atom']:.2f} / "
        f"{scores['forces_mae_mev_per_a']:.1f})"
    )
    print(
        f"  of which γ ≤ {GAMMA_INSIDE:g} ({inside.sum()} frames): energy {1e3 * in_domain.energy_rmse_per_atom:.2f} "
        f"meV/atom, forces {1e3 * in_domain.forces_rmse:.1f} meV/Å; the other {(~inside).sum()} are extrapolative "
        f"(largest γ {graded.predictions.gamma_max.max():.0f})"
    )
    spread = np.concatenate([a.get_forces().ravel() for a in held_out]).std()
    print(f"held-out force spread (std of components): {1e3 * spread:.0f} meV/Å")
    return 0


if __name__ == "__main__":
    sys.exit(main())
