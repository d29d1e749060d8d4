"""Budgeted labelling through a real oracle service: exactly max_dft_calls structures are computed, also when
the orchestrator side restarts between requests."""

from __future__ import annotations

from pyacemaker.config import XtbOracleConfig
from pyacemaker.services.oracle.backends.xtb import XtbBackend
from pyacemaker.services.oracle.server import add_to_server
from pyacemaker.services.orchestrator.dft_labels import DftLabeller, oracle_spec
from pyacemaker.services.orchestrator.ledger import DftLedger
from pyacemaker.structures import atoms_to_structure, structure_to_atoms
from pyacemaker.v1 import common_pb2
from tests.conftest import running_service, sn2_seeds


def _structures(n: int) -> list[common_pb2.Structure]:
    frames = []
    for i in range(n):
        atoms = sn2_seeds()[i % 3]
        atoms.rattle(0.03, seed=i)
        frames.append(atoms_to_structure(atoms))
    return frames


def test_max_dft_calls_holds_across_a_restart(tmp_path):
    config = XtbOracleConfig(backend="xtb")
    structures = _structures(8)
    with running_service(add_to_server) as address:
        ledger = DftLedger(tmp_path / "state.sqlite")
        first = DftLabeller(ledger, address, oracle_spec(config), max_calls=5).label(structures)
        assert first.sent == 5 and len(first.refused) == 3
        assert first.level_of_theory == "xtb:GFN2-xTB"
        # Results equal a direct in-process calculation, so the ledger stores the oracle's real labels.
        direct = XtbBackend(config)
        for message in structures[:5]:
            expected = direct.label(structure_to_atoms(message)).energy
            assert abs(first.labels[message.content_id].energy - expected) < 1e-9
        ledger.close()

        restarted = DftLedger(tmp_path / "state.sqlite")
        second = DftLabeller(restarted, address, oracle_spec(config), max_calls=5).label(structures)
        assert second.sent == 0, "nothing is recomputed after a restart"
        assert len(second.labels) == 5 and len(second.refused) == 3
        assert restarted.count() == 5
        assert all(row.status == "ok" and row.result_digest for row in restarted.rows())
