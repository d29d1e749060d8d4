"""DIRECT selection (Qi et al., npj Comput. Mater. 10, 43 (2024); the `maml` DIRECT sampler): features →
standardise → PCA, keeping the components with eigenvalue > 1 (Kaiser) weighted by their explained variance →
BIRCH clustering → stratified picks from every cluster.

Unlike maml, the selection here always has exactly `n_select` members (a DFT budget is counted in
structures): surplus picks are dropped from the largest clusters and a shortfall is filled by farthest-point
selection in the same weighted PC space.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from ase import Atoms
from sklearn.cluster import Birch
from sklearn.decomposition import PCA
from sklearn.exceptions import ConvergenceWarning
from sklearn.preprocessing import StandardScaler

# A column whose spread is below this fraction of its magnitude is constant up to rounding; standardising it
# would blow rounding noise up to unit variance.
_RELATIVE_VARIANCE_FLOOR = 1e-8
_MAX_BIRCH_ATTEMPTS = 100


@dataclass
class DirectSelection:
    # 0-based pool indices of the selection, ascending, exactly n_select of them.
    indices: np.ndarray
    # Principal components kept by Kaiser's rule (0 when no feature varies across the pool).
    n_components: int
    explained_variance_ratio: np.ndarray
    # Non-empty BIRCH clusters.
    n_clusters: int
    # Cluster label of every pool entry.
    cluster_labels: np.ndarray
    # Kept PC scores of the whole pool, each component multiplied by its explained-variance ratio; the space
    # in which clusters, distances and coverage are measured. Shape (n_pool, max(n_components, 1)).
    pc_scores: np.ndarray


def weighted_pc_scores(features: np.ndarray, random_seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Standardise the varying columns, run PCA, keep components with eigenvalue > 1 (at least one), and
    weight each kept score by its explained-variance ratio (as maml does). Returns (scores, kept ratios)."""
    n_rows = len(features)
    magnitude = np.abs(features).max(axis=0) if n_rows else np.zeros(features.shape[1])
    varying = features.std(axis=0) > _RELATIVE_VARIANCE_FLOOR * np.maximum(magnitude, np.finfo(float).tiny)
    if n_rows < 2 or not varying.any():
        return np.zeros((n_rows, 1)), np.zeros(0)
    standardised = StandardScaler().fit_transform(features[:, varying])
    pca = PCA(random_state=random_seed).fit(standardised)
    n_kept = max(1, int(np.count_nonzero(pca.explained_variance_ > 1.0)))
    ratios = pca.explained_variance_ratio_[:n_kept]
    return pca.transform(standardised)[:, :n_kept] * ratios, ratios


def birch_labels(scores: np.ndarray, n_clusters: int) -> np.ndarray:
    """BIRCH cluster labels with `n_clusters` global clusters.

    BIRCH can only form as many clusters as it has subclusters, so the subcluster threshold is lowered until
    there are enough (maml does the same). Identical points can never be split; then fewer clusters result.
    """
    n_points = len(scores)
    if n_clusters >= n_points:
        return np.arange(n_points)
    if n_clusters == 1:
        return np.zeros(n_points, dtype=np.int64)
    spread = float(np.sqrt(((scores - scores.mean(axis=0)) ** 2).sum(axis=1).mean()))
    if spread == 0.0:
        return np.zeros(n_points, dtype=np.int64)
    threshold = 0.5 * spread
    for _ in range(_MAX_BIRCH_ATTEMPTS):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", ConvergenceWarning)
            model = Birch(n_clusters=n_clusters, threshold=threshold).fit(scores)
        n_subclusters = len(model.subcluster_centers_)
        if n_subclusters >= n_clusters:
            break
        threshold *= min(n_subclusters / n_clusters, 0.7)
    return np.asarray(model.labels_, dtype=np.int64)


def _stratified_picks(members: np.ndarray, scores: np.ndarray, count: int) -> np.ndarray:
    """`count` members of one cluster at evenly spaced ranks of distance to the cluster centroid: the closest
    when count is 1, the closest and the farthest plus evenly spaced ones between for more (maml's
    "center" criterion)."""
    centroid = scores[members].mean(axis=0)
    order = np.argsort(np.linalg.norm(scores[members] - centroid, axis=1), kind="stable")
    ranks = np.linspace(0, len(members) - 1, count).astype(np.int64) if count > 1 else np.zeros(1, dtype=np.int64)
    return members[order[ranks]]


def _cluster_quotas(sizes: np.ndarray, k_per_cluster: int, n_select: int) -> np.ndarray:
    """Picks per cluster: k (or the whole cluster when smaller), then one fewer from the largest clusters in
    turn until the total fits n_select; every cluster keeps at least one pick."""
    quotas = np.minimum(sizes, k_per_cluster)
    by_size = np.argsort(-sizes, kind="stable")
    while quotas.sum() > n_select and (quotas > 1).any():
        for cluster in by_size:
            if quotas.sum() <= n_select:
                break
            if quotas[cluster] > 1:
                quotas[cluster] -= 1
    return quotas


def farthest_point_fill(scores: np.ndarray, selected: np.ndarray, n_total: int) -> np.ndarray:
    """Extend `selected` to `n_total` indices, each time adding the point with the largest distance to its
    nearest already-selected point."""
    chosen = list(selected)
    if not chosen:
        chosen.append(0)
    nearest = np.min(np.linalg.norm(scores[:, None, :] - scores[None, chosen, :], axis=-1), axis=1)
    nearest[chosen] = -np.inf
    while len(chosen) < n_total:
        pick = int(np.argmax(nearest))
        chosen.append(pick)
        nearest = np.minimum(nearest, np.linalg.norm(scores - scores[pick], axis=1))
        nearest[chosen] = -np.inf
    return np.array(chosen, dtype=np.int64)


def select_direct(features: np.ndarray, n_select: int, k_per_cluster: int = 1, random_seed: int = 0) -> DirectSelection:
    """Pick exactly `n_select` diverse rows of `features` (n_pool × n_features) by DIRECT."""
    features = np.asarray(features, dtype=np.float64)
    if features.ndim != 2:
        raise ValueError(f"features must be a 2-D array (structures × features), got shape {features.shape}")
    if not np.isfinite(features).all():
        raise ValueError("features contain NaN or infinite values")
    n_pool = len(features)
    if n_select < 1:
        raise ValueError(f"n_select must be at least 1, got {n_select}")
    if n_select > n_pool:
        raise ValueError(
            f"cannot select {n_select} structures from a pool of {n_pool}; lower n_select or grow the pool"
        )
    if k_per_cluster < 1:
        raise ValueError(f"k_per_cluster must be at least 1, got {k_per_cluster}")

    scores, ratios = weighted_pc_scores(features, random_seed)
    labels = birch_labels(scores, math.ceil(n_select / k_per_cluster))
    clusters, sizes = np.unique(labels, return_counts=True)
    quotas = _cluster_quotas(sizes, k_per_cluster, n_select)
    picks = [
        _stratified_picks(np.flatnonzero(labels == cluster), scores, int(quota))
        for cluster, quota in zip(clusters, quotas, strict=True)
    ]
    selected = np.concatenate(picks)
    if len(selected) < n_select:
        selected = farthest_point_fill(scores, selected, n_select)
    return DirectSelection(
        indices=np.sort(selected),
        n_components=len(ratios),
        explained_variance_ratio=ratios,
        n_clusters=len(clusters),
        cluster_labels=labels,
        pc_scores=scores,
    )


def coverage_score(pool_scores: np.ndarray, selected: np.ndarray, bins: int) -> float:
    """How much of the pool's spread the selection reaches: per component, the pool's range is cut into `bins`
    equal bins; the score is the fraction of the pool's occupied bins that the selection also occupies,
    averaged over components (1 = every populated region is represented)."""
    if bins < 1:
        raise ValueError(f"bins must be at least 1, got {bins}")
    pool_scores = np.asarray(pool_scores, dtype=np.float64)
    if pool_scores.ndim == 1:
        pool_scores = pool_scores[:, None]
    selected = np.asarray(selected, dtype=np.int64)
    fractions = []
    for column in pool_scores.T:
        edges = np.histogram_bin_edges(column, bins=bins)
        pool_counts, _ = np.histogram(column, bins=edges)
        selected_counts, _ = np.histogram(column[selected], bins=edges)
        occupied = pool_counts > 0
        fractions.append(np.count_nonzero(selected_counts[occupied] > 0) / np.count_nonzero(occupied))
    return float(np.mean(fractions))


@dataclass
class DirectSample:
    """A DIRECT selection of a pool: the chosen structures (each with its `pool_index` in `info`), the
    selection itself and its coverage of the pool's PC space."""

    selected: list[Atoms]
    selection: DirectSelection
    coverage: float


def direct_sample(
    frames: Sequence[Atoms],
    features: np.ndarray,
    n_select: int,
    k_per_cluster: int = 1,
    coverage_bins: int = 10,
    random_seed: int = 0,
) -> DirectSample:
    """Select `n_select` of `frames` by DIRECT on their `features` (one row per frame) and score the coverage."""
    selection = select_direct(features, n_select, k_per_cluster, random_seed)
    coverage = coverage_score(selection.pc_scores, selection.indices, coverage_bins)
    selected = []
    for index in selection.indices:
        atoms = frames[int(index)]
        atoms.info["pool_index"] = int(index)
        selected.append(atoms)
    return DirectSample(selected, selection, coverage)
