"""DIRECT selection: exactly N distinct structures, Kaiser's rule against numpy's eigen-decomposition, the
coverage score against hand counts, and better coverage than random picks on clustered data."""

from __future__ import annotations

import numpy as np
import pytest

from pyacemaker.services.sampler.direct import coverage_score, select_direct


def clustered_features(seed: int = 0, n_features: int = 12) -> np.ndarray:
    """Correlated features from a 3-D latent space: four dense clusters and a sparse halo of rare points."""
    rng = np.random.default_rng(seed)
    centres = rng.normal(scale=6.0, size=(4, 3))
    dense = np.concatenate([centre + rng.normal(size=(120, 3)) for centre in centres])
    rare = rng.uniform(-15, 15, size=(30, 3))
    latent = np.concatenate([dense, rare])
    mixing = rng.normal(size=(3, n_features))
    return latent @ mixing + 0.05 * rng.normal(size=(len(latent), n_features))


def small_pool(seed: int = 1) -> np.ndarray:
    return clustered_features(seed)[::9]  # 57 rows


@pytest.mark.parametrize(
    ("n_select", "k_per_cluster"),
    [(1, 1), (5, 1), (10, 3), (17, 4), (20, 7), (23, 23), (56, 2), (57, 1), (57, 3), (57, 60)],
)
def test_exactly_n_distinct_sorted_indices(n_select: int, k_per_cluster: int) -> None:
    features = small_pool()
    selection = select_direct(features, n_select, k_per_cluster)
    indices = selection.indices
    assert len(indices) == n_select
    assert len(set(indices.tolist())) == n_select
    assert np.all(np.diff(indices) > 0)
    assert indices.min() >= 0 and indices.max() < len(features)
    assert selection.n_clusters <= -(-n_select // k_per_cluster)


def test_more_than_the_pool_is_a_clear_error() -> None:
    with pytest.raises(ValueError, match="cannot select 58 structures from a pool of 57"):
        select_direct(small_pool(), 58)


def test_kaiser_rule_and_weights_match_numpy_eigendecomposition() -> None:
    features = clustered_features(2)
    standardised = (features - features.mean(axis=0)) / features.std(axis=0)
    eigenvalues = np.sort(np.linalg.eigvalsh(np.cov(standardised, rowvar=False)))[::-1]
    n_kept = int(np.count_nonzero(eigenvalues > 1))
    selection = select_direct(features, 20)
    assert selection.n_components == n_kept
    np.testing.assert_allclose(selection.explained_variance_ratio, eigenvalues[:n_kept] / eigenvalues.sum(), rtol=1e-8)
    # Each kept score column has variance = its eigenvalue, then it is scaled by its explained-variance ratio.
    expected_std = np.sqrt(eigenvalues[:n_kept]) * eigenvalues[:n_kept] / eigenvalues.sum()
    np.testing.assert_allclose(selection.pc_scores.std(axis=0, ddof=1), expected_std, rtol=1e-8)


def test_constant_and_rounding_noise_columns_do_not_matter() -> None:
    features = small_pool()
    rng = np.random.default_rng(0)
    padded = np.column_stack([features, np.full(len(features), 3.0), 1.0 + 1e-17 * rng.normal(size=len(features))])
    plain, with_padding = select_direct(features, 12), select_direct(padded, 12)
    np.testing.assert_array_equal(with_padding.indices, plain.indices)
    np.testing.assert_allclose(with_padding.explained_variance_ratio, plain.explained_variance_ratio)


def test_one_per_cluster_takes_the_member_closest_to_each_centroid() -> None:
    selection = select_direct(clustered_features(3), 15, k_per_cluster=1)
    assert selection.n_clusters == 15
    for label in np.unique(selection.cluster_labels):
        members = np.flatnonzero(selection.cluster_labels == label)
        centroid = selection.pc_scores[members].mean(axis=0)
        closest = members[np.argmin(np.linalg.norm(selection.pc_scores[members] - centroid, axis=1))]
        assert closest in selection.indices


def test_no_cluster_gives_more_than_k() -> None:
    selection = select_direct(clustered_features(4), 22, k_per_cluster=5)  # 5 clusters, 3 picks too many
    labels = selection.cluster_labels[selection.indices]
    assert np.bincount(labels).max() <= 5
    assert len(selection.indices) == 22


def test_surplus_picks_come_off_the_largest_clusters() -> None:
    rng = np.random.default_rng(7)
    sizes = [100, 50, 20]
    blobs = [
        centre + rng.normal(size=(size, 2)) for centre, size in zip([(0, 0), (40, 0), (0, 40)], sizes, strict=True)
    ]
    features = np.concatenate(blobs) @ rng.normal(size=(2, 6))
    blob_of = np.repeat(np.arange(3), sizes)
    selection = select_direct(features, 7, k_per_cluster=3)  # 3 clusters × 3 = 9 picks, 2 too many
    assert selection.n_clusters == 3
    assert np.bincount(blob_of[selection.indices]).tolist() == [2, 2, 3]


def test_duplicate_rows_are_filled_up_with_distinct_structures() -> None:
    rng = np.random.default_rng(0)
    features = np.concatenate([np.zeros((50, 4)), rng.normal(size=(5, 4))])
    selection = select_direct(features, 10)
    assert len(set(selection.indices.tolist())) == 10
    # The five distinct rows are the farthest from everything else, so they are all in.
    assert set(range(50, 55)) <= set(selection.indices.tolist())


def test_a_pool_with_no_variation_still_gives_n() -> None:
    selection = select_direct(np.ones((8, 3)), 5)
    assert len(selection.indices) == 5
    assert selection.n_components == 0


def test_selection_is_deterministic() -> None:
    features = clustered_features(5)
    np.testing.assert_array_equal(select_direct(features, 25, 2).indices, select_direct(features, 25, 2).indices)


def test_coverage_matches_a_hand_count() -> None:
    # Column 0: 0..10 in 5 bins of width 2 → bins {0,1} {2,3} {4,5} {6,7} {8,9,10}; all 5 occupied.
    # Column 1: ten zeros and one 10 → only the first and last bins are occupied.
    pool = np.column_stack([np.arange(11.0), [0.0] * 10 + [10.0]])
    selected = np.array([0, 9])  # column 0: values 0 and 9 → bins 1 and 5 → 2/5; column 1: zeros → 1/2
    assert coverage_score(pool, selected, bins=5) == pytest.approx((2 / 5 + 1 / 2) / 2)
    assert coverage_score(pool, np.arange(11), bins=5) == 1.0
    assert coverage_score(pool, np.array([10]), bins=5) == pytest.approx((1 / 5 + 1 / 2) / 2)


def test_direct_covers_more_than_random_picks() -> None:
    features = clustered_features(6)
    n_select = 30
    selection = select_direct(features, n_select)
    direct = coverage_score(selection.pc_scores, selection.indices, bins=20)
    rng = np.random.default_rng(0)
    random = [
        coverage_score(selection.pc_scores, rng.choice(len(features), n_select, replace=False), bins=20)
        for _ in range(10)
    ]
    assert direct > np.mean(random) + 3 * np.std(random)


def test_direct_covers_the_sn2_pool_better_than_random_selection():
    """The issue's acceptance figure on real data: the SN2 example's pool, same N, DIRECT vs random draws."""
    from pyacemaker.config import load_config
    from pyacemaker.seeds import load_seeds
    from pyacemaker.services.sampler.features import get_featuriser
    from pyacemaker.services.sampler.pool import generate_pool
    from tests.conftest import SN2_DIR

    config = load_config(SN2_DIR / "config.yaml")
    pool = generate_pool(load_seeds(config), config.sampling.pool).structures
    features = get_featuriser("distribution")(pool)
    n = config.sampling.direct.n_select
    selection = select_direct(features, n)
    direct = coverage_score(selection.pc_scores, selection.indices, bins=20)
    rng = np.random.default_rng(0)
    random = [coverage_score(selection.pc_scores, rng.choice(len(pool), n, replace=False), bins=20) for _ in range(20)]
    print(f"SN2 pool of {len(pool)}, N={n}: DIRECT {direct:.3f}, random {np.mean(random):.3f} ± {np.std(random):.3f}")
    assert direct > max(random)
