"""The streaming extxyz reader: the same frames as ASE's reader (info, labels, cells, VEC lines), from any
start frame, a frame count without parsing, and errors that name the file and the frame or line."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from ase import Atoms
from ase.calculators.singlepoint import SinglePointCalculator
from ase.io import read

from pyacemaker.structures import StructureFileError, count_extxyz_frames, iter_extxyz, write_extxyz


def labelled_frames() -> list[Atoms]:
    rng = np.random.default_rng(0)
    frames = []
    for i in range(7):
        atoms = Atoms("CH3Cl", positions=rng.normal(0.0, 1.0, (5, 3)))
        if i % 3 == 2:  # a periodic frame with stress among molecules
            atoms.cell, atoms.pbc = np.diag([6.0, 7.0, 8.0]), True
        atoms.info.update({"charge": -1, "md_step": i, "temperature_k": 300.0 + i})
        atoms.new_array("force_std", rng.random(5))
        results = {"energy": float(rng.normal()), "forces": rng.normal(size=(5, 3))}
        if atoms.pbc.any():
            results["stress"] = rng.normal(size=6)
        atoms.calc = SinglePointCalculator(atoms, **results)
        frames.append(atoms)
    return frames


def assert_same_frames(got: list[Atoms], expected: list[Atoms]) -> None:
    assert len(got) == len(expected)
    for a, b in zip(got, expected, strict=True):
        assert a.get_chemical_symbols() == b.get_chemical_symbols()
        np.testing.assert_array_equal(a.positions, b.positions)
        np.testing.assert_array_equal(a.cell[:], b.cell[:])
        assert list(a.pbc) == list(b.pbc) and a.info == b.info
        np.testing.assert_array_equal(a.arrays["force_std"], b.arrays["force_std"])
        assert a.calc.results.keys() == b.calc.results.keys()
        for key, value in a.calc.results.items():
            np.testing.assert_array_equal(value, b.calc.results[key])


def test_streamed_frames_equal_ase_reads_from_any_start(tmp_path: Path) -> None:
    path = tmp_path / "frames.extxyz"
    write_extxyz(path, labelled_frames())
    with open(path, "a") as handle:
        handle.write("\n\n")  # trailing blank lines are not frames
    expected = read(path, index=":", format="extxyz")
    assert count_extxyz_frames(path) == 7
    assert_same_frames(list(iter_extxyz(path)), expected)
    assert_same_frames(list(iter_extxyz(path, start=5)), expected[5:])
    assert list(iter_extxyz(path, start=7)) == []


def test_vec_lines_give_the_cell(tmp_path: Path) -> None:
    path = tmp_path / "vec.xyz"
    frame = "2\ncomment\nH 0 0 0\nH 0 0 0.74\nVEC1 5 0 0\nVEC2 0 6 0\nVEC3 0 0 7\n"
    path.write_text(frame + frame.replace("0.74", "0.80"))
    frames = list(iter_extxyz(path))
    assert count_extxyz_frames(path) == 2
    cells = [np.diag(a.cell[:]).tolist() for a in frames]
    assert cells == [[5.0, 6.0, 7.0]] * 2 and frames[1].positions[1, 2] == 0.80


def test_broken_files_name_the_file_and_place(tmp_path: Path) -> None:
    path = tmp_path / "cut.extxyz"
    write_extxyz(path, labelled_frames()[:2])
    lines = path.read_text().splitlines(keepends=True)
    path.write_text("".join(lines[:-2]))  # the second frame loses two atom lines
    with pytest.raises(StructureFileError, match=r"cut\.extxyz: frame 1 .*cut short"):
        count_extxyz_frames(path)
    with pytest.raises(StructureFileError, match="frame 1"):
        list(iter_extxyz(path))
    path.write_text("x\n")
    with pytest.raises(StructureFileError, match=r"line 1: expected the atom count of frame 0"):
        count_extxyz_frames(path)
    bad = tmp_path / "bad.extxyz"
    bad.write_text("1\nProperties=species:S:1:pos:R:3\nH 0 zero 0\n")
    with pytest.raises(StructureFileError, match=r"bad\.extxyz: frame 0 \(line 1\) is not valid extxyz"):
        list(iter_extxyz(bad))
    with pytest.raises(StructureFileError, match="no such file"):
        list(iter_extxyz(tmp_path / "missing.extxyz"))
