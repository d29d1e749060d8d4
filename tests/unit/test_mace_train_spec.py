"""The trainer's mace_train job refuses a bad spec at StartJob with a message naming the field."""

from __future__ import annotations

import numpy as np
import pytest
from ase import Atoms

from pyacemaker.artifacts import ArtifactStore
from pyacemaker.rpc import InvalidInputError
from pyacemaker.services.trainer.mace_train import VALIDATION_FRACTION
from pyacemaker.services.trainer.worker import JOB_KINDS, validate_request
from pyacemaker.structures import write_extxyz
from pyacemaker.teacher.recipe import split_frames
from pyacemaker.v1 import trainer_pb2


def _spec(store: ArtifactStore, tmp_path, **fields) -> trainer_pb2.StartJobRequest:
    path = tmp_path / "train.extxyz"
    write_extxyz(path, [Atoms("H2", positions=[[0, 0, 0], [0, 0, 0.74]])])
    spec = trainer_pb2.MaceTrainSpec(
        train_data=[store.put_file(path, "structures")],
        e0s=[trainer_pb2.AtomicEnergy(atomic_number=1, energy=-10.7)],
        max_epochs=3,
    )
    for key, value in fields.items():
        if isinstance(value, list):
            spec.ClearField(key)
            getattr(spec, key).extend(value)
        else:
            setattr(spec, key, value)
    return trainer_pb2.StartJobRequest(mace_train=spec)


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"train_data": []}, "mace_train.train_data is empty"),
        ({"max_epochs": -1}, "mace_train.max_epochs must not be negative"),
        ({"e0s": []}, "mace_train.e0s is empty"),
        ({"device": "tpu"}, "mace_train.device: unknown device 'tpu'"),
        ({"random_seed": -3}, "mace_train.random_seed must not be negative"),
    ],
)
def test_a_bad_mace_train_spec_is_refused_naming_the_field(tmp_path, fields, message) -> None:
    store = ArtifactStore(tmp_path / "store")
    validate_request(_spec(store, tmp_path), store)  # the good spec passes
    with pytest.raises(InvalidInputError, match=message):
        validate_request(_spec(store, tmp_path, **fields), store)


def test_a_request_without_a_spec_names_every_job_kind(tmp_path) -> None:
    with pytest.raises(InvalidInputError) as caught:
        validate_request(trainer_pb2.StartJobRequest(), ArtifactStore(tmp_path / "store"))
    assert str(caught.value) == f"StartJobRequest has no spec; set one of {', '.join(JOB_KINDS)}"
    assert set(JOB_KINDS) == {f.name for f in trainer_pb2.StartJobRequest.DESCRIPTOR.oneofs_by_name["spec"].fields}


def test_a_tenth_is_held_out_and_single_atoms_always_train() -> None:
    frames = [Atoms("H2", positions=[[0, 0, 0], [0, 0, 0.7 + 0.01 * i]]) for i in range(20)] + [Atoms("H")]
    sets = split_frames(frames, np.random.default_rng(0), VALIDATION_FRACTION, min_valid=1)
    train, validation = sets["train"], sets["valid"]
    assert len(validation) == 2 and len(train) == 19 and not sets["test"]
    assert any(len(a) == 1 for a in train) and all(len(a) == 2 for a in validation)
    again = split_frames(frames, np.random.default_rng(0), VALIDATION_FRACTION, min_valid=1)["valid"]
    assert again[0].positions[1, 2] == validation[0].positions[1, 2]  # reproducible
    # Few frames: a tenth rounds to none, but one is held out all the same (mace needs a validation set).
    assert len(split_frames(frames[:4], np.random.default_rng(0), VALIDATION_FRACTION, min_valid=1)["valid"]) == 1
    # The teacher build's three-way split: test and valid disjoint, every frame once.
    three = split_frames(frames, np.random.default_rng(1), 0.1, test_fraction=0.1)
    assert [len(three[k]) for k in ("test", "valid", "train")] == [2, 2, 17]
    assert len({id(a) for part in three.values() for a in part}) == len(frames)
