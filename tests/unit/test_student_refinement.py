"""The student refinement's plain parts: the temperatures it runs (one hotter than the md section's), how it
spreads the frames it labels over the trajectories that produced them, when its rounds end, and its config's
checks."""

from __future__ import annotations

import pytest
from ase import Atoms
from pydantic import ValidationError

from pyacemaker.config import MdConfig, StudentRefinementConfig
from pyacemaker.services.orchestrator.steps.student_refinement import (
    RoundRecord,
    refinement_done,
    refinement_temperatures,
    spread_over_trajectories,
)


def test_one_temperature_above_the_hottest_is_added() -> None:
    assert refinement_temperatures(MdConfig(temperatures=[300.0, 600.0, 900.0]), 1.25) == [300.0, 600.0, 900.0, 1125.0]
    assert refinement_temperatures(MdConfig(temperatures=[300.0]), 1.0) == [300.0]  # no margin: nothing new


def test_frames_are_taken_in_turns_from_every_trajectory_highest_gamma_first() -> None:
    def frame(tag: int) -> Atoms:
        return Atoms("H", info={"tag": tag})

    # Trajectory "a" ran away (many high-γ frames and a stop structure, γ = inf); "b" and "c" had one each.
    picked = [(4.0 + i, "a", frame(i)) for i in range(6)]
    picked += [(float("inf"), "a", frame(99)), (3.5, "b", frame(10)), (8.0, "c", frame(20))]
    chosen = spread_over_trajectories(picked, limit=5)
    assert [(name, atoms.info["tag"]) for name, atoms in chosen] == [
        ("a", 99),
        ("b", 10),
        ("c", 20),
        ("a", 5),
        ("a", 4),
    ]
    assert len(spread_over_trajectories(picked, limit=100)) == len(picked)
    assert spread_over_trajectories([], limit=5) == []


def test_stop_gamma_must_exceed_the_threshold() -> None:
    with pytest.raises(ValidationError, match=r"stop_gamma \(3.0\) must exceed gamma_threshold \(3.0\)"):
        StudentRefinementConfig(gamma_threshold=3.0, stop_gamma=3.0)


def test_rounds_end_after_the_last_refit_or_the_round_that_checks_it() -> None:
    unsettled = RoundRecord(round=1, frames_above_threshold=5)
    settled = RoundRecord(round=1)  # nothing above the threshold, no replica stopped
    checked = StudentRefinementConfig(max_rounds=2)
    unchecked = StudentRefinementConfig(max_rounds=2, final_check=False)
    assert checked.final_check  # the default keeps the round that records the last student's MD
    assert not refinement_done([], unchecked)
    assert refinement_done([settled], unchecked) and refinement_done([settled], checked)
    # Two refits: done without the check round; with it, one more round runs.
    assert refinement_done([unsettled, unsettled], unchecked)
    assert not refinement_done([unsettled, unsettled], checked)
    assert refinement_done([unsettled, unsettled, unsettled], checked)
