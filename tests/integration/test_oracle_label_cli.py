"""`pyacemaker label` end to end against a real oracle server in this process."""

from __future__ import annotations

import argparse
import functools
import socket

import numpy as np
import pytest
from ase import Atoms
from ase.io import read, write

from pyacemaker.cli import label
from pyacemaker.cli.main import EXIT_BAD_INPUT, EXIT_FAILED, EXIT_OK, EXIT_UNAVAILABLE
from pyacemaker.services.oracle.server import add_to_server
from tests.conftest import running_service, sn2_seeds


@pytest.fixture(scope="module")
def oracle_address():
    with running_service(add_to_server) as address:
        yield address


def run(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="pyacemaker")
    label.register(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    return args.handler(args)


def sn2_frames() -> list[Atoms]:
    base = Atoms(sn2_seeds()[0].numbers, sn2_seeds()[0].positions)  # geometry only: the charge comes from --charge
    frames = []
    for seed in range(3):
        frame = base.copy()
        frame.rattle(0.05, seed=seed)
        frames.append(frame)
    return frames


def test_label_writes_every_frame_with_the_oracle_energy(oracle_address: str, tmp_path, capsys) -> None:
    from tblite.ase import TBLite

    frames = sn2_frames()
    source = tmp_path / "in.xyz"
    write(source, frames, format="xyz")  # plain xyz: no charge in the file, it comes from --charge
    output = tmp_path / "out" / "labelled.xyz"
    code = run(
        [
            *("label", "--backend", "xtb", str(source), "-o", str(output)),
            *("--charge", "-1", "--batch-size", "2", "--option", "accuracy=1", "--oracle", oracle_address),
        ]
    )
    assert code == EXIT_OK, capsys.readouterr().err
    labelled = read(output, index=":")
    assert len(labelled) == 3
    for frame, result in zip(frames, labelled, strict=True):
        np.testing.assert_allclose(result.positions, frame.positions, atol=1e-8)
        reference = frame.copy()
        reference.calc = TBLite(method="GFN2-xTB", charge=-1, multiplicity=1, verbosity=0)
        assert result.get_potential_energy() == pytest.approx(reference.get_potential_energy(), abs=1e-6)
        np.testing.assert_allclose(result.get_forces(), reference.get_forces(), atol=1e-6)
        assert result.info["charge"] == -1
        assert result.info["label_status"] == "ok"
        assert result.info["level_of_theory"] == "xtb:GFN2-xTB"


def test_failures_are_reported_with_index_and_reason(oracle_address: str, tmp_path, capsys) -> None:
    frames = [Atoms("Ar2", positions=[[0, 0, 0], [0, 0, d]]) for d in (3.6, 0.0, 4.0)]
    source = tmp_path / "argon.xyz"
    write(source, frames, format="extxyz")
    output = tmp_path / "argon_labelled.xyz"
    code = run(["label", "--backend", "lj", str(source), "-o", str(output), "--oracle", oracle_address])
    assert code == EXIT_FAILED
    err = capsys.readouterr().err
    assert "1 of 3 structures failed" in err
    assert "structure 1: " in err and "not finite" in err
    labelled = read(output, index=":")
    assert [a.info["label_status"] for a in labelled] == ["ok", "failed", "ok"]
    # u(r) = 4ε[(σ/r)¹² − (σ/r)⁶] − u(r_c) with the defaults ε = 0.0103 eV, σ = 3.4 Å, r_c = 10.2 Å.
    eps, sigma, rc = 0.0103, 3.4, 10.2
    expected = 4 * eps * ((sigma / 4.0) ** 12 - (sigma / 4.0) ** 6) - 4 * eps * ((sigma / rc) ** 12 - (sigma / rc) ** 6)
    assert labelled[2].get_potential_energy() == pytest.approx(expected, rel=1e-12)


def test_malformed_file_is_bad_input_naming_the_file(tmp_path, capsys) -> None:
    source = tmp_path / "broken.xyz"
    source.write_text("3\ncomment\nAr 0 0 0\nAr 0 0\n")
    code = run(["label", "--backend", "lj", str(source), "-o", str(tmp_path / "out.xyz"), "--oracle", "127.0.0.1:1"])
    assert code == EXIT_BAD_INPUT
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1
    assert lines[0].startswith("error: ") and str(source) in lines[0]


def test_bad_option_is_bad_input_naming_it(oracle_address: str, tmp_path, capsys) -> None:
    source = tmp_path / "argon.xyz"
    write(source, [Atoms("Ar2", positions=[[0, 0, 0], [0, 0, 3.7]])], format="extxyz")
    code = run(
        [
            *("label", "--backend", "lj", str(source), "-o", str(tmp_path / "o.xyz")),
            *("--option", "sigma=-2", "--oracle", oracle_address),
        ]
    )
    assert code == EXIT_BAD_INPUT
    err = capsys.readouterr().err
    assert "INVALID_ARGUMENT" in err and "sigma" in err


def test_unreachable_oracle_is_exit_3(tmp_path, capsys) -> None:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        free_port = probe.getsockname()[1]
    source = tmp_path / "argon.xyz"
    write(source, [Atoms("Ar2", positions=[[0, 0, 0], [0, 0, 3.7]])], format="extxyz")
    earlier_output = tmp_path / "o.xyz"
    earlier_output.write_text("an earlier result\n")
    code = run(
        ["label", "--backend", "lj", str(source), "-o", str(earlier_output), "--oracle", f"127.0.0.1:{free_port}"]
    )
    assert code == EXIT_UNAVAILABLE
    assert f"unavailable at 127.0.0.1:{free_port}" in capsys.readouterr().err
    assert earlier_output.read_text() == "an earlier result\n", "no answer must not clobber an earlier output"


def test_option_values_are_yaml_scalars() -> None:
    assert label._parse_option("max_iterations=40") == ("max_iterations", 40)
    assert label._parse_option("accuracy=0.5") == ("accuracy", 0.5)
    assert label._parse_option("method=GFN1-xTB") == ("method", "GFN1-xTB")
    with pytest.raises(argparse.ArgumentTypeError):
        label._parse_option("accuracy")


def test_a_model_file_on_the_command_line_reaches_the_oracle_through_the_store(tmp_path, monkeypatch, capsys) -> None:
    """The oracle loads model files only as store artifacts: the CLI puts the file it names into the local
    deployment's store and sends a reference."""
    pytest.importorskip("mace", reason="the mace backend needs mace-torch (pip install 'pyacemaker[mace]')")
    from pyacemaker.artifacts import ArtifactStore, sha256_of_file
    from pyacemaker.teacher.resolve import BUNDLED_MODEL

    home = tmp_path / "home"
    monkeypatch.setenv("PYACEMAKER_HOME", str(home))
    model = tmp_path / "teacher.model"
    model.write_bytes(BUNDLED_MODEL.read_bytes())
    source = tmp_path / "in.xyz"
    write(source, sn2_frames()[:1], format="xyz")
    output = tmp_path / "out.xyz"
    register = functools.partial(add_to_server, store=ArtifactStore(home / "store"))
    with running_service(register) as address:
        argv = ["label", "--backend", "mace", "--option", f"models=[{model}]", "--charge", "-1", "--oracle", address]
        code = run([*argv, str(source), "-o", str(output)])
    assert code == EXIT_OK, capsys.readouterr().err
    (labelled,) = read(output, index=":")
    assert labelled.info["level_of_theory"] == f"mace:{sha256_of_file(model)[:16]}"
    assert list((home / "store" / "objects").glob(f"*/{sha256_of_file(model)}.model"))
