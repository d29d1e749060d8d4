"""How the linear ACE fit chooses its ridge strength: the one-standard-error rule against fold-by-fold losses
recomputed here from separate per-fold normal equations."""

from __future__ import annotations

import numpy as np
import pytest

from pyacemaker.services.trainer import linear_ace
from pyacemaker.services.trainer.ace_fit import basis_config
from tests.sn2_training_data import xtb_frames

pyace = pytest.importorskip("pyace", reason="python-ace is not installed (pyacemaker[trainer])")

LAMBDAS = tuple(10.0 ** (p / 2) for p in range(-18, 1))


def test_one_standard_error_rule_takes_the_largest_lambda_within_one_error_of_the_best() -> None:
    frames = xtb_frames()[:60]
    design = linear_ace.AceDesign(pyace.ACEBBasisSet(basis_config(["H", "C", "Cl"], 5.0, 12)))
    targets = linear_ace.Targets(np.array([a.get_potential_energy() for a in frames]), [a.get_forces() for a in frames])
    folds = np.arange(len(frames)) % 5
    equations = linear_ace.accumulate(design, frames, targets, folds, 5)
    best = linear_ace.fit_ridge_cv(equations, lambdas=LAMBDAS)
    chosen = linear_ace.fit_ridge_cv(equations, lambdas=LAMBDAS, one_standard_error=True)

    # Each fold's loss at the best λ, from that fold's own equations and a fit without it.
    share = linear_ace.DEFAULT_FORCES_SHARE
    losses = []
    for fold in range(5):
        inside = [a for a, f in zip(frames, folds, strict=True) if f != fold]
        outside = [a for a, f in zip(frames, folds, strict=True) if f == fold]

        def equations_of(subset: list) -> linear_ace.FoldedNormalEquations:
            subset_targets = linear_ace.Targets(
                np.array([a.get_potential_energy() for a in subset]), [a.get_forces() for a in subset]
            )
            return linear_ace.accumulate(design, subset, subset_targets, np.zeros(len(subset), dtype=int), 1)

        gram, rhs = equations_of(inside).total(share)
        full_gram, _ = equations.total(share)
        coeffs = linear_ace._ScaledRidge(gram, rhs, linear_ace._column_scale(full_gram)).solve(best.lam)
        energy, forces, _ = linear_ace.fit_errors(equations_of(outside), coeffs)
        losses.append((1 - share) * energy**2 + share * forces**2)
    standard_error = np.std(losses, ddof=1) / np.sqrt(5)

    loss = {row["lambda"]: row["cv_loss"] for row in chosen.table}
    assert chosen.lam >= best.lam
    assert loss[chosen.lam] <= loss[best.lam] + standard_error * (1 + 1e-9)
    # It is the largest such λ: every larger one is worse than the best by more than one error.
    assert all(loss[lam] > loss[best.lam] + standard_error for lam in LAMBDAS if lam > chosen.lam)
    assert chosen.lam > best.lam  # on these 60 frames the rule does regularise more than the minimum


def _fit(loss: float, error: float) -> linear_ace.RidgeFit:
    return linear_ace.RidgeFit(
        coeffs=np.zeros(1),
        lam=1e-5,
        cv_energy_rmse=0.0,
        cv_forces_rmse=0.0,
        table=[],
        best_cv_loss=loss,
        best_cv_loss_standard_error=error,
    )


def test_delta_takes_the_strongest_anchor_the_dft_set_cannot_tell_from_the_best() -> None:
    from pyacemaker.services.trainer.delta import smallest_correction

    # ω = 1 is best (6.4e-4 ± 0.6e-4); ω = 3 lies within one error of it, ω = 10 beyond.
    fits = [(1.0, _fit(6.4e-4, 0.6e-4)), (3.0, _fit(6.9e-4, 0.3e-4)), (10.0, _fit(7.8e-4, 0.2e-4))]
    weight, fit = smallest_correction(fits)
    assert weight == 3.0 and fit is fits[1][1]
    # With a sharper best, the weakest anchor stays.
    assert smallest_correction([(1.0, _fit(6.4e-4, 0.1e-4)), (3.0, _fit(6.9e-4, 0.1e-4))])[0] == 1.0


def test_one_solve_gives_the_decomposition_s_solution() -> None:
    """The final fit at the chosen λ is one linear solve; it equals the eigendecomposition's solution, with and
    without unpenalised columns (one stoichiometry: only the references' sum is determined)."""
    rng = np.random.default_rng(3)
    rows = rng.normal(size=(400, 60))
    rows[:, -2:] = np.outer(rng.integers(1, 4, size=400), [1.0, 2.0])  # two reference columns, one composition
    targets = rows @ rng.normal(size=60) + 0.01 * rng.normal(size=400)
    gram, rhs = rows.T @ rows, rows.T @ targets
    scale = linear_ace._column_scale(gram)
    for n_free in (0, 2):
        ridge = linear_ace._ScaledRidge(gram, rhs, scale, n_free)
        for lam in (1e-6, 1e-3, 1.0):
            np.testing.assert_allclose(ridge.solve_once(lam), ridge.solve(lam), rtol=1e-8, atol=1e-10)


def test_a_given_lambda_is_cross_validated_by_one_solve_per_fold_with_the_grid_s_figures() -> None:
    """A refit that keeps its base's λ: the cross-validation at that λ alone (a linear solve per fold) gives the
    grid's figures and coefficients at that λ."""
    frames = xtb_frames()[:60]
    design = linear_ace.AceDesign(pyace.ACEBBasisSet(basis_config(["H", "C", "Cl"], 5.0, 12)))
    targets = linear_ace.Targets(
        np.array([f.get_potential_energy() / len(f) for f in frames]), [f.get_forces() for f in frames]
    )
    equations = linear_ace.accumulate(design, frames, targets, np.arange(len(frames)) % 5, 5)
    grid = linear_ace.fit_ridge_cv(equations, lambdas=LAMBDAS)
    lam = LAMBDAS[3]
    alone = linear_ace.fit_ridge_cv(equations, lambdas=[lam], one_standard_error=True)
    assert alone.lam == lam
    row = next(r for r in grid.table if r["lambda"] == lam)
    assert alone.table[0]["cv_forces_rmse_ev_per_a"] == pytest.approx(row["cv_forces_rmse_ev_per_a"], rel=1e-6)
    assert alone.table[0]["cv_loss"] == pytest.approx(row["cv_loss"], rel=1e-6)
    at_lam = linear_ace.fit_ridge_cv(equations, lambdas=[lam, lam * 1.0000001])  # decomposition path, same λ
    np.testing.assert_allclose(alone.coeffs, at_lam.coeffs, rtol=1e-5, atol=1e-8 * np.abs(at_lam.coeffs).max())
