"""kcal/mol conversions come from ase.units, in one place per package, and agree with the SI definition."""

from __future__ import annotations

import pytest

# 1 eV in kcal/mol from the exact SI constants: e · N_A / (4184 J/kcal).
ELEMENTARY_CHARGE_C = 1.602176634e-19
AVOGADRO_PER_MOL = 6.02214076e23
KCAL_PER_MOL_PER_EV_SI = ELEMENTARY_CHARGE_C * AVOGADRO_PER_MOL / 4184.0  # 23.0605...


def test_the_barrier_in_kcal_per_mol_uses_the_codata_conversion() -> None:
    from pyacemaker.services.orchestrator.reaction_profile import central_barrier_kcal

    # ASE's default constants are CODATA 2014; they differ from the 2019 SI values by ~1e-8 relative.
    assert central_barrier_kcal([0.3, 0.8, 0.5]) == pytest.approx(0.5 * KCAL_PER_MOL_PER_EV_SI, rel=1e-7)


def test_the_report_and_the_teacher_build_share_ases_constant() -> None:
    from pyacemaker.services.orchestrator import reaction_profile
    from pyacemaker.services.orchestrator.report import sections

    assert sections.KCAL_PER_MOL_PER_EV is reaction_profile.KCAL_PER_MOL_PER_EV
    from pyacemaker.teacher import build

    kcal_per_mol_per_ev = 1.0 / build.EV_PER_KCAL_MOL
    assert kcal_per_mol_per_ev == pytest.approx(KCAL_PER_MOL_PER_EV_SI, rel=1e-7)
