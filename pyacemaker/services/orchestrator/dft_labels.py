"""Labels from the run's DFT oracle, charged to the budget ledger.

Every structure gets a ledger row before it is sent; submissions (scheduler job ids) and results are written to
the ledger the moment they arrive. Calling `label` again after a crash re-sends only what is still pending; the
oracle re-attaches to jobs it already submitted, so nothing is computed or charged twice.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field

from ase import Atoms

from pyacemaker.artifacts import ArtifactStore
from pyacemaker.clients.oracle import backend_spec, model_files_as_artifacts
from pyacemaker.config import OracleConfig
from pyacemaker.labels import Labels, labels_from_proto
from pyacemaker.rpc import channel
from pyacemaker.services.orchestrator.ledger import DftLedger
from pyacemaker.structures import (
    CHARGE_KEY,
    SPIN_KEY,
    atom_ground_state_multiplicity,
    atoms_to_structure,
    attach_labels,
)
from pyacemaker.v1 import common_pb2, oracle_pb2, oracle_pb2_grpc

# A Slurm queue can hold DFT jobs for a long time; the deadline only guards against a stream that never ends.
DEFAULT_TIMEOUT_S = 7 * 24 * 3600.0


def oracle_spec(config: OracleConfig, store: ArtifactStore | None = None) -> oracle_pb2.BackendSpec:
    """The wire form of the config's `oracle:` section; model files it names (a mace or ace oracle) are put into
    `store` and sent as artifact references, the only form the oracle loads them in."""
    options = config.model_dump(mode="json", exclude={"backend"})
    if store is not None:
        options = model_files_as_artifacts(config.backend, options, store)
    return backend_spec(config.backend, options)


@dataclass
class BudgetedLabels:
    level_of_theory: str
    # content id → labels (ok or failed), computed now or reused from the ledger.
    labels: dict[str, Labels] = field(default_factory=dict)
    # Not labelled because max_dft_calls is spent.
    refused: list[str] = field(default_factory=list)
    # Sent to the oracle by this call (new, or pending from before a restart).
    sent: int = 0
    # Job ids the oracle reported for this call's structures.
    job_ids: set[str] = field(default_factory=set)


class DftLabeller:
    def __init__(
        self,
        ledger: DftLedger,
        oracle_address: str,
        backend: oracle_pb2.BackendSpec,
        max_calls: int,
        timeout_s: float = DEFAULT_TIMEOUT_S,
    ) -> None:
        self.ledger = ledger
        self.oracle_address = oracle_address
        self.backend = backend
        self.max_calls = max_calls
        self.timeout_s = timeout_s

    def label(
        self,
        structures: Sequence[common_pb2.Structure],
        on_result: Callable[[str, Labels], None] | None = None,
    ) -> BudgetedLabels:
        with channel(self.oracle_address) as ch:
            stub = oracle_pb2_grpc.OracleServiceStub(ch)
            level = stub.GetInfo(oracle_pb2.GetInfoRequest(backend=self.backend), timeout=60).level_of_theory
            outcome = BudgetedLabels(level_of_theory=level)
            ids = [s.content_id for s in structures]
            # The ledger stores the wire message (its bytes are what the digest covers); the atom counts turn it
            # and the oracle's answers into Labels.
            atom_counts = {s.content_id: len(s.atomic_numbers) for s in structures}
            reservation = self.ledger.reserve(ids, level, self.backend.name, self.max_calls)
            outcome.refused = reservation.refused
            for cid, row in reservation.done.items():
                if row.labels is not None:
                    outcome.labels[cid] = labels_from_proto(row.labels, atom_counts[cid])
            pending = set(reservation.to_compute)
            to_send = list({s.content_id: s for s in structures if s.content_id in pending}.values())
            outcome.sent = len(to_send)
            if not to_send:
                return outcome
            request = oracle_pb2.LabelRequest(backend=self.backend, structures=to_send)
            for response in stub.Label(iter([request]), timeout=self.timeout_s):
                for submission in response.submissions:
                    outcome.job_ids.add(submission.job_id)
                    for cid in submission.content_ids:
                        self.ledger.record_submission(cid, level, submission.scheduler, submission.job_id)
                for result in response.results:
                    cid = to_send[result.index].content_id
                    self.ledger.record_result(cid, level, result.labels)
                    labels = labels_from_proto(result.labels, atom_counts[cid])
                    outcome.labels[cid] = labels
                    if on_result is not None:
                        on_result(cid, labels)
        return outcome


def label_frames(
    dft: DftLabeller, frames: Sequence[Atoms], report: Callable[[common_pb2.Progress], None], stage: str
) -> list[Atoms]:
    """DFT-labelled copies of the frames that got an OK label (failed and refused ones are left out), with
    progress per result."""
    report(common_pb2.Progress(stage="dft", done=0, total=len(frames), message=stage))
    structures = [atoms_to_structure(a) for a in frames]
    done = [0]

    def progress(_cid: str, _labels: Labels) -> None:
        done[0] += 1
        report(common_pb2.Progress(stage="dft", done=done[0], total=len(frames), message=stage))

    outcome = dft.label(structures, on_result=progress)
    labelled = []
    for atoms, message in zip(frames, structures, strict=True):
        labels = outcome.labels.get(message.content_id)
        if labels is not None and labels.ok:
            labelled.append(attach_labels(atoms.copy(), labels))
    return labelled


# Edge of the cubic box an isolated atom sits in when the run's structures are periodic (Å). Plane-wave codes
# need a cell; the box's small effect on the atom's energy is a constant per element that every label of the
# run shares through E0, so energy differences and the fits do not see it.
ISOLATED_ATOM_BOX_A = 10.0


def isolated_atoms(numbers: Iterable[int], periodic: bool = False) -> list[Atoms]:
    """One neutral atom per element, in its ground-state multiplicity, sorted by atomic number: the structures
    whose energies are the per-element references E0. `periodic`: each atom at the centre of a periodic cubic
    box of ISOLATED_ATOM_BOX_A, for an oracle that labels periodic cells (pw.x has no molecular mode)."""
    atoms = []
    for z in sorted({int(z) for z in numbers}):
        atom = Atoms(numbers=[z], positions=[[0.0, 0.0, 0.0]])
        if periodic:
            atom.set_cell([ISOLATED_ATOM_BOX_A] * 3)
            atom.center()
            atom.pbc = True
        atom.info.update({CHARGE_KEY: 0, SPIN_KEY: atom_ground_state_multiplicity(z)})
        atoms.append(atom)
    return atoms


def isolated_atom_energies(
    dft: DftLabeller, numbers: Iterable[int], report: Callable[[common_pb2.Progress], None], periodic: bool = False
) -> dict[int, float]:
    """E0 per element at the DFT level (charged to the budget like any DFT call; computed once per run and
    level, then reused from the ledger); `periodic` as in `isolated_atoms`."""
    atoms = isolated_atoms(numbers, periodic)
    labelled = label_frames(dft, atoms, report, "isolated-atom reference energies")
    if len(labelled) != len(atoms):
        raise RuntimeError("the DFT oracle could not compute every isolated-atom reference energy (E0)")
    return {int(a.numbers[0]): float(a.get_potential_energy()) for a in labelled}
