"""The checks that decide whether an MD run of a potential survived, against geometries built by hand."""

from __future__ import annotations

import numpy as np
from ase import Atoms

from services.orchestrator.md_stability import (
    StabilityRun,
    frame_problem,
    nearest_neighbour_distances,
    stability_summary,
)


def _chain(spacings: list[float]) -> Atoms:
    return Atoms("H" * (len(spacings) + 1), positions=[[x, 0.0, 0.0] for x in np.cumsum([0.0, *spacings])])


def test_nearest_neighbour_distances_with_and_without_a_periodic_cell():
    assert np.allclose(nearest_neighbour_distances(_chain([1.0, 3.0])), [1.0, 1.0, 3.0])
    periodic = Atoms("H2", positions=[[0.2, 0, 0], [3.8, 0, 0]], cell=[4.0, 4.0, 4.0], pbc=True)
    assert np.allclose(nearest_neighbour_distances(periodic), [0.4, 0.4])  # through the boundary


def test_frame_problem_names_collapse_escape_and_non_finite_energy():
    assert frame_problem(_chain([1.0, 1.2]), -3.0, 0.5, 8.0) is None
    assert "within 0.300 Å" in frame_problem(_chain([0.3, 1.2]), -3.0, 0.5, 8.0)
    assert "atom 2 drifted 9.00 Å" in frame_problem(_chain([1.0, 9.0]), -3.0, 0.5, 8.0)
    assert "not finite" in frame_problem(_chain([1.0, 1.2]), float("nan"), 0.5, 8.0)


def test_stability_summary_counts_survivors_per_temperature():
    runs = [
        StabilityRun(0, 300.0, 100),
        StabilityRun(1, 300.0, 40, "step 40: collapse"),
        StabilityRun(0, 600.0, 100),
    ]
    summary = stability_summary(runs, 100, 0.5)
    assert summary["n_runs"] == 3 and summary["n_survivors"] == 2
    assert summary["survivors_by_temperature"] == {"300": [1, 2], "600": [1, 1]}
    assert summary["runs"][1]["survived"] is False
