"""The per-element energy alignment that keeps a level-of-theory offset out of a MACE fine-tuning's loss."""

from __future__ import annotations

import numpy as np
import pytest
from ase import Atoms
from ase.calculators.singlepoint import SinglePointCalculator

from pyacemaker.services.trainer.mace_finetune import aligned_reference_energies

TEACHER_E0 = {1: -10.7, 6: -48.8, 17: -122.0}


def labelled(numbers: list[int], energy: float) -> Atoms:
    atoms = Atoms(numbers=numbers, positions=np.arange(3 * len(numbers), dtype=float).reshape(-1, 3))
    atoms.calc = SinglePointCalculator(atoms, energy=energy, forces=np.zeros((len(numbers), 3)))
    return atoms


def test_per_element_offsets_are_recovered_when_compositions_differ() -> None:
    shift = {1: -2.0, 6: -30.0, 17: 5.0}  # what the other level adds per atom, eV
    compositions = [[6, 1, 1, 1, 17], [6, 1, 1, 1, 17, 17], [1, 17], [6, 1, 1, 1, 1]]
    rng = np.random.default_rng(0)
    teacher = rng.normal(-300.0, 5.0, len(compositions))
    frames = [
        labelled(numbers, e + sum(shift[z] for z in numbers)) for numbers, e in zip(compositions, teacher, strict=True)
    ]
    e0 = aligned_reference_energies(teacher, frames, TEACHER_E0)
    assert e0 == pytest.approx({z: TEACHER_E0[z] + shift[z] for z in TEACHER_E0}, abs=1e-9)


def test_one_stoichiometry_gets_one_constant_per_structure() -> None:
    numbers = [6, 1, 1, 1, 17, 17]
    teacher = np.array([-350.0, -349.2, -351.1])
    offsets = np.array([-6.0, -6.1, -5.9])  # the other level, a nearly constant −6 eV per structure
    frames = [labelled(numbers, e + d) for e, d in zip(teacher, offsets, strict=True)]
    e0 = aligned_reference_energies(teacher, frames, TEACHER_E0)
    total_shift = sum(e0[z] - TEACHER_E0[z] for z in numbers)
    assert total_shift == pytest.approx(offsets.mean(), abs=1e-9)  # the least-squares constant
