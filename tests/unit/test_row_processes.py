"""Design rows from forked processes (`row_processes`): the same normal equations as one process, the same on
every run, a failure in a process raised in the parent, and the processes cut to the cores, data and memory."""

from __future__ import annotations

import numpy as np
import pytest
from pyace import ACEBBasisSet

from pyacemaker.services.trainer import linear_ace, row_processes
from pyacemaker.services.trainer.ace_fit import basis_config, linear_targets
from tests.sn2_training_data import xtb_e0s, xtb_frames


@pytest.fixture
def small_chunks(monkeypatch: pytest.MonkeyPatch) -> None:
    """Chunks of 3 structures and processes from 8 structures each, so a small set spreads over processes."""
    monkeypatch.setattr(linear_ace, "CHUNK_STRUCTURES", 3)
    monkeypatch.setattr(row_processes, "MIN_STRUCTURES_PER_PROCESS", 8)


def test_processes_give_the_one_process_equations_the_same_on_every_run(small_chunks: None) -> None:
    frames = xtb_frames()[:40]
    design = linear_ace.AceDesign(ACEBBasisSet(basis_config(["H", "C", "Cl"], 4.5, 10)), reference_elements=["H"])
    targets = linear_targets(frames, xtb_e0s(), design)
    folds = np.arange(len(frames)) % 3
    reports: list[tuple[int, int]] = []
    for with_references in (True, False):
        alone = linear_ace.accumulate(design, frames, targets, folds, 3, with_references=with_references)
        runs = [
            row_processes.accumulate_in_processes(
                design,
                frames,
                targets,
                folds,
                3,
                lambda d, t, _m: reports.append((d, t)),
                "design",
                with_references,
                cores=2,
            )
            for _ in range(2)
        ]
        for name in linear_ace.EQUATION_ARRAYS:
            expected = getattr(alone, name)
            np.testing.assert_allclose(getattr(runs[0], name), expected, rtol=1e-12, atol=1e-12, err_msg=name)
            np.testing.assert_array_equal(getattr(runs[1], name), getattr(runs[0], name), err_msg=name)
        if not with_references:
            assert not runs[0].gram_energy[:, -1, :].any()  # the reference column stayed empty
    assert reports[-1] == (len(frames), len(frames))
    # Into equations of other structures, as a refit adds its new frames' rows.
    everything = linear_ace.accumulate(design, frames, targets, folds, 3)
    base = linear_ace.accumulate(design, frames[:20], targets, folds, 3)
    first = base.gram_forces.copy()
    both = row_processes.accumulate_in_processes(design, frames, targets, folds, 3, into=base, cores=2)
    assert both is base
    np.testing.assert_allclose(both.gram_forces, everything.gram_forces + first, rtol=1e-12, atol=1e-12)


def test_a_failing_process_is_an_error_that_names_the_cause(small_chunks: None) -> None:
    frames = xtb_frames()[:30]
    design = linear_ace.AceDesign(ACEBBasisSet(basis_config(["H", "C", "Cl"], 4.5, 10)))
    targets = linear_targets(frames, xtb_e0s(), design)

    def broken(atoms):  # type: ignore[no-untyped-def]
        raise ValueError("pyace could not evaluate this structure")

    design.rows = broken  # type: ignore[method-assign]
    with pytest.raises(linear_ace.LinearAceError, match="pyace could not evaluate this structure"):
        row_processes.accumulate_in_processes(design, frames, targets, np.zeros(30, dtype=int), 1, cores=2)


def test_processes_are_cut_to_the_cores_the_data_and_the_memory() -> None:
    many = 10 * row_processes.MIN_STRUCTURES_PER_PROCESS
    assert row_processes.processes_for(many, 100, 5, False, cores=2) == 2
    assert row_processes.processes_for(many, 100, 5, False, cores=1) == 1
    assert row_processes.processes_for(row_processes.MIN_STRUCTURES_PER_PROCESS, 100, 5, False, cores=8) == 1
    # 5 folds of two 10 000-function matrices are 8 GB: no room for a copy beside the result.
    assert row_processes.processes_for(many, 10_000, 5, False, cores=8) == 1
