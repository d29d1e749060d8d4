"""`pyacemaker up` checks the deployment files it is given before it starts anything: a bad one is refused with
exit 2 (a line per bad key), and nothing is started."""

from __future__ import annotations

import contextlib
import io

from pyacemaker.cli.main import EXIT_BAD_INPUT, main


def _up(*args: str) -> tuple[int, str]:
    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        code = main(["up", *args])
    return code, err.getvalue()


def test_a_bad_trainer_deployment_file_is_one_line_before_anything_starts(tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("PYACEMAKER_HOME", str(tmp_path / "home"))
    bad = tmp_path / "trainer.yaml"
    bad.write_text("executors:\n  gpu: {kind: slurm, partition: gpu, walltime: 3}\n")
    code, err = _up("--trainer-deployment", str(bad))
    assert code == EXIT_BAD_INPUT
    assert err.startswith(f"error: trainer deployment file {bad}: executors.gpu")
    assert f"trainer deployment file {bad}: executors.gpu.walltime: unknown key" in err
    assert "Traceback" not in err
    assert not (tmp_path / "home" / "services.json").exists()  # nothing was started


def test_the_trainer_deployment_option_is_for_local_processes(tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("PYACEMAKER_HOME", str(tmp_path / "home"))
    good = tmp_path / "trainer.yaml"
    good.write_text("{}\n")
    code, err = _up("--runtime", "podman", "--trainer-deployment", str(good))
    assert code == EXIT_BAD_INPUT
    assert "--trainer-deployment applies to --runtime local only" in err
