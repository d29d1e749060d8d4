"""The Labels value type and its one conversion to and from the wire message."""

from __future__ import annotations

import numpy as np
import pytest

from pyacemaker.labels import (
    MAX_REASON_CHARS,
    Labels,
    LabelStatus,
    Uncertainty,
    labels_from_proto,
    labels_to_proto,
)
from pyacemaker.v1 import common_pb2


def _committee_labels() -> Labels:
    return Labels(
        LabelStatus.OK,
        energy=-12.5,
        forces=np.arange(6.0).reshape(2, 3),
        stress=np.array([0.1, 0.2, 0.3, 0.01, 0.02, 0.03]),
        uncertainty=Uncertainty(energy_std=0.05, force_std=[0.1, 0.3], max_force_std=0.3),
        level_of_theory="mace:committee",
        wall_time_s=1.5,
        attempts=1,
    )


def test_round_trip_keeps_every_field() -> None:
    labels = _committee_labels()
    message = labels_to_proto(labels)
    assert list(message.forces) == [0.0, 1.0, 2.0, 3.0, 4.0, 5.0]  # row-major n_atoms × 3 on the wire
    back = labels_from_proto(message, n_atoms=2)
    assert back.ok and back.status is LabelStatus.OK
    assert back.energy == -12.5
    assert back.forces is not None and back.forces.shape == (2, 3)
    np.testing.assert_array_equal(back.forces, labels.forces)
    np.testing.assert_array_equal(back.stress, labels.stress)
    np.testing.assert_array_equal(back.uncertainty.force_std, [0.1, 0.3])
    assert back.uncertainty.energy_std == 0.05 and back.uncertainty.max_force_std == 0.3
    assert back.uncertainty.extrapolation_grade is None
    assert (back.level_of_theory, back.wall_time_s, back.attempts) == ("mace:committee", 1.5, 1)
    assert labels_to_proto(back) == message


def test_arrays_are_read_only_copies() -> None:
    forces = np.zeros((1, 3))
    labels = Labels(LabelStatus.OK, energy=0.0, forces=forces)
    forces[0, 0] = 1.0
    assert labels.forces is not None and labels.forces[0, 0] == 0.0
    with pytest.raises(ValueError):
        labels.forces[0, 0] = 2.0


def test_failed_labels_carry_no_results_and_a_bounded_reason() -> None:
    failed = Labels.failed("x" * (MAX_REASON_CHARS + 10), "xtb:GFN2-xTB")
    assert not failed.ok and failed.status is LabelStatus.FAILED
    assert len(failed.reason) == MAX_REASON_CHARS and failed.reason.endswith("...")
    assert failed.energy is None and failed.forces is None and failed.stress is None
    message = labels_to_proto(failed)
    assert message.status == common_pb2.LABEL_STATUS_FAILED and not message.HasField("energy")
    back = labels_from_proto(message, n_atoms=5)
    assert not back.ok and back.reason == failed.reason and back.forces is None


def test_an_unspecified_status_is_not_ok() -> None:
    assert not labels_from_proto(common_pb2.Labels(), n_atoms=1).ok


def test_a_molecule_has_no_stress() -> None:
    molecule = Labels(LabelStatus.OK, energy=-1.0, forces=np.zeros((3, 3)))
    message = labels_to_proto(molecule)
    assert len(message.stress) == 0
    assert labels_from_proto(message, n_atoms=3).stress is None


def test_a_label_without_uncertainty_serializes_without_it() -> None:
    message = labels_to_proto(Labels(LabelStatus.OK, energy=-1.0, forces=np.zeros((1, 3))))
    assert not message.HasField("uncertainty")


def test_forces_that_are_not_three_per_atom_are_refused() -> None:
    message = common_pb2.Labels(status=common_pb2.LABEL_STATUS_OK, energy=0.0, forces=[0.0] * 7)
    with pytest.raises(ValueError, match="7 force values for 2 atoms"):
        labels_from_proto(message, n_atoms=2)


def test_per_atom_uncertainty_must_match_the_atoms() -> None:
    message = common_pb2.Labels(status=common_pb2.LABEL_STATUS_OK, uncertainty=common_pb2.Uncertainty(force_std=[1.0]))
    with pytest.raises(ValueError, match="1 force_std values for 2 atoms"):
        labels_from_proto(message, n_atoms=2)


def test_shapes_are_checked_when_built() -> None:
    with pytest.raises(ValueError, match=r"forces must have shape \(N, 3\)"):
        Labels(LabelStatus.OK, forces=np.zeros(6))
    with pytest.raises(ValueError, match="stress must have shape"):
        Labels(LabelStatus.OK, stress=np.zeros((3, 3)))


def test_a_one_model_committee_serializes_as_the_mace_backend_built_it_before() -> None:
    """Zero spreads (one model): the uncertainty sub-message is still sent, holding the per-atom zeros, exactly
    as when the mace backend filled the message itself (the stored bytes must not change)."""
    labels = Labels(
        LabelStatus.OK,
        energy=-1.0,
        forces=np.ones((2, 3)),
        uncertainty=Uncertainty(energy_std=0.0, force_std=np.zeros(2), max_force_std=0.0),
        level_of_theory="mace:one",
        attempts=1,
    )
    before = common_pb2.Labels(
        status=common_pb2.LABEL_STATUS_OK, level_of_theory="mace:one", energy=-1.0, forces=[1.0] * 6, attempts=1
    )
    before.uncertainty.energy_std = 0.0
    before.uncertainty.force_std.extend([0.0, 0.0])
    before.uncertainty.max_force_std = 0.0
    assert labels_to_proto(labels).SerializeToString() == before.SerializeToString()
