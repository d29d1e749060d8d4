"""Self-healing in OracleBackend.label_with_retries, on real calculations: GFN2-xTB with too few SCC iterations
(a retry doubles them, nothing else) heals after a known number of attempts, and a structure no setting can
treat stops at once."""

from __future__ import annotations

import pytest
from ase import Atoms

from pyacemaker.config import LjOracleConfig, XtbOracleConfig
from pyacemaker.labels import LabelStatus
from pyacemaker.services.oracle.backends import BACKENDS
from pyacemaker.services.oracle.backends.lj import LennardJonesBackend
from pyacemaker.services.oracle.backends.xtb import XtbBackend
from tests.conftest import sn2_seeds

pytest.importorskip("tblite.ase", reason="tblite is not installed (pyacemaker[oracle])")

OK, FAILED = LabelStatus.OK, LabelStatus.FAILED


def sn2_complex() -> Atoms:
    atoms = sn2_seeds()[0]
    atoms.rattle(0.05, seed=3)
    return atoms


def needed_iterations(atoms: Atoms) -> int:
    """The fewest SCC iterations with which GFN2-xTB converges on this structure, found by trying."""
    for iterations in range(1, 100):
        if XtbBackend(XtbOracleConfig(backend="xtb", max_iterations=iterations)).label(atoms).status == OK:
            return iterations
    raise AssertionError("GFN2-xTB did not converge in 100 iterations")


def test_a_retry_heals_an_scf_that_ran_out_of_iterations() -> None:
    atoms = sn2_complex()
    needed = needed_iterations(atoms)
    assert needed > 2, "the test needs a structure that does not converge in one or two iterations"
    starved = XtbBackend(XtbOracleConfig(backend="xtb", max_iterations=1))
    # Attempt k runs 2**k iterations, so the first one that converges is known in advance.
    first_success = (needed - 1).bit_length()
    labels = starved.label_with_retries(atoms, max_retries=first_success + 3)
    assert labels.status == OK, labels.reason
    assert labels.attempts == first_success + 1
    reference = XtbBackend(XtbOracleConfig(backend="xtb")).label(atoms)
    assert labels.energy == pytest.approx(reference.energy, abs=1e-6)
    assert labels.level_of_theory == reference.level_of_theory == "xtb:GFN2-xTB"
    assert labels.wall_time_s > 0


def test_running_out_of_retries_lists_every_attempt() -> None:
    labels = XtbBackend(XtbOracleConfig(backend="xtb", max_iterations=1)).label_with_retries(sn2_complex(), 1)
    assert labels.status == FAILED
    assert labels.attempts == 2
    assert labels.reason.startswith("failed in all 2 attempts")
    assert "attempt 1: " in labels.reason and "not converged in 1 cycles" in labels.reason
    assert "attempt 2: " in labels.reason and "not converged in 2 cycles" in labels.reason
    assert labels.level_of_theory == "xtb:GFN2-xTB"
    assert labels.energy is None and labels.forces is None


def test_without_retries_the_single_failure_is_the_reason() -> None:
    labels = XtbBackend(XtbOracleConfig(backend="xtb", max_iterations=1)).label_with_retries(sn2_complex(), 0)
    assert (labels.status, labels.attempts) == (FAILED, 1)
    assert "not converged in 1 cycles" in labels.reason and "attempt" not in labels.reason


def test_a_structure_no_setting_can_treat_is_not_retried() -> None:
    atoms = sn2_complex()
    atoms.info["spin_multiplicity"] = 2  # 44 electrons cannot form a doublet
    labels = XtbBackend(XtbOracleConfig(backend="xtb")).label_with_retries(atoms, max_retries=5)
    assert (labels.status, labels.attempts) == (FAILED, 1)
    assert "spin multiplicity 2 is impossible" in labels.reason


def test_a_first_success_counts_one_attempt() -> None:
    labels = LennardJonesBackend(LjOracleConfig(backend="lj")).label_with_retries(sn2_complex(), max_retries=3)
    assert (labels.status, labels.attempts) == (OK, 1)
    assert LennardJonesBackend(LjOracleConfig(backend="lj")).label(sn2_complex()).attempts == 1


def test_negative_retries_are_refused() -> None:
    with pytest.raises(ValueError, match="max_retries"):
        LennardJonesBackend(LjOracleConfig(backend="lj")).label_with_retries(sn2_complex(), max_retries=-1)


def test_only_the_dft_backends_go_through_an_executor() -> None:
    through_executor = {name for name, cls in BACKENDS.items() if cls.uses_executor}
    assert through_executor == {"pyscf", "qe", "vasp"}


def test_the_executor_and_retries_come_from_the_backend_config() -> None:
    from pyacemaker.config import PyscfOracleConfig, RetryConfig, SlurmExecutorConfig
    from pyacemaker.services.oracle.backends.pyscf import PyscfBackend
    from pyacemaker.services.oracle.gateway import executor_config_of

    # A cheap backend labels in the oracle's own process, with one attempt.
    lj = LennardJonesBackend(LjOracleConfig(backend="lj"))
    assert executor_config_of(lj) is None
    assert (lj.retry_config().max_retries, lj.retry_config().resubmit_lost_tasks) == (0, 1)
    # xtb runs as tasks only when its options name an executor.
    assert executor_config_of(XtbBackend(XtbOracleConfig(backend="xtb"))) is None
    slurm = SlurmExecutorConfig(kind="slurm", partition="debug")
    xtb = XtbBackend(XtbOracleConfig(backend="xtb", executor=slurm, retries=RetryConfig(max_retries=5)))
    assert executor_config_of(xtb) == slurm and xtb.retry_config().max_retries == 5
    # A DFT backend always has one: the config's, local by default.
    pyscf = PyscfBackend(PyscfOracleConfig(backend="pyscf", functional="PBE", basis="sto-3g"))
    assert executor_config_of(pyscf) is not None and executor_config_of(pyscf).kind == "local"  # type: ignore[union-attr]
    assert pyscf.retry_config().max_retries == 2


def test_a_backend_without_descriptors_says_so_by_name() -> None:
    with pytest.raises(NotImplementedError, match="oracle backend 'lj' computes no descriptors"):
        next(LennardJonesBackend(LjOracleConfig(backend="lj")).describe_batch([sn2_complex()]))
