"""The oracle's deployment file (pyacemaker/services/oracle/deployment.py): defaults, profiles, errors that name
the file and
the key, and the artifact references that are the only way model files reach a backend."""

from __future__ import annotations

from pathlib import Path

import pytest

from pyacemaker.artifacts import ArtifactStore
from pyacemaker.clients.oracle import artifact_option
from pyacemaker.executors.deployment import DeploymentError
from pyacemaker.rpc import InvalidInputError
from pyacemaker.services.oracle.deployment import (
    DEBIAN_PSEUDO_DIR,
    OracleDeployment,
    load_deployment,
    resolve_artifact_options,
)
from pyacemaker.teacher.resolve import BUNDLED_MODEL


def test_without_a_file_the_defaults_are_pw_x_debians_pseudos_and_no_vasp(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.delenv("ESPRESSO_PSEUDO", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))  # no ~/espresso/pseudo there
    deployment = load_deployment(None)
    assert deployment == OracleDeployment()
    default = deployment.qe_profile("default")
    assert (default.command, default.pseudo_dir) == ("pw.x", DEBIAN_PSEUDO_DIR)
    assert deployment.executors.slurm.template is None and deployment.executors.local.scratch_dir is None
    with pytest.raises(InvalidInputError, match=r"no vasp profile 'default' \(it has: none\)"):
        deployment.vasp_profile("default")
    monkeypatch.setenv("ESPRESSO_PSEUDO", "/opt/upf")
    assert load_deployment(None).qe_profile("default").pseudo_dir == Path("/opt/upf")


def test_an_unset_pseudo_dir_is_where_pw_x_itself_looks(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """pw.x reads $ESPRESSO_PSEUDO, else $HOME/espresso/pseudo; a profile without pseudo_dir follows it, in the
    oracle's environment, whether the profile is the implicit default or one of the deployment file's."""
    home = tmp_path / "home"
    (home / "espresso" / "pseudo").mkdir(parents=True)
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.delenv("ESPRESSO_PSEUDO", raising=False)
    path = tmp_path / "oracle.yaml"
    path.write_text("qe:\n  profiles:\n    mpi: {command: srun pw.x}\n")
    deployment = load_deployment(path)
    assert deployment.qe_profile("default").pseudo_dir == home / "espresso" / "pseudo"
    assert deployment.qe_profile("mpi").pseudo_dir == home / "espresso" / "pseudo"
    monkeypatch.setenv("ESPRESSO_PSEUDO", "/scratch/sssp")
    deployment = load_deployment(path)
    assert deployment.qe_profile("mpi").pseudo_dir == Path("/scratch/sssp")
    assert deployment.qe_profile("default").pseudo_dir == Path("/scratch/sssp")
    path.write_text("qe:\n  profiles:\n    mpi: {command: srun pw.x, pseudo_dir: /opt/upf}\n")
    assert load_deployment(path).qe_profile("mpi").pseudo_dir == Path("/opt/upf"), "a set pseudo_dir wins"


def test_a_file_adds_profiles_and_keeps_the_default_qe_profile(tmp_path: Path) -> None:
    path = tmp_path / "oracle.yaml"
    path.write_text(
        "qe:\n  profiles:\n    big: {command: mpirun -np 8 pw.x, pseudo_dir: /opt/sssp}\n"
        "vasp:\n  profiles:\n    default: {command: srun vasp_std, potcar_dir: /opt/potpaw}\n"
        "executors:\n  slurm: {template: /opt/job.sh, extra_directives: [--account=chem42]}\n"
    )
    deployment = load_deployment(path)
    assert sorted(deployment.qe.profiles) == ["big", "default"]
    assert deployment.qe_profile("big").command == "mpirun -np 8 pw.x"
    assert deployment.vasp_profile("default").potcar_dir == Path("/opt/potpaw")
    assert deployment.executors.of("slurm").scratch_dir is None
    assert deployment.executors.slurm.extra_directives == ["--account=chem42"]


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (
            "qe: {profiles: {default: {pseudo_dir: pseudos}}}",
            "qe.profiles.default.pseudo_dir: must be an absolute path (got 'pseudos')",
        ),
        ("executors: {slurm: {template: job.sh}}", "executors.slurm.template: must be an absolute path"),
        ('executors: {pbs: {extra_directives: ["-A x\\nrm -rf ~"]}}', "a directive is one line"),
        ("vasp: {profiles: {default: {}}}", "vasp.profiles.default.command: Field required"),
        ("qe: {profiles: {'a/b': {}}}", "qe.profiles.a/b"),
        ("qe: {command: pw.x}", "qe.command: unknown key"),
        ("[1, 2]", "must be a mapping"),
        ("qe: [", "not valid YAML"),
    ],
)
def test_a_bad_file_names_itself_and_the_key(tmp_path: Path, text: str, expected: str) -> None:
    path = tmp_path / "oracle.yaml"
    path.write_text(text)
    with pytest.raises(DeploymentError) as caught:
        load_deployment(path)
    assert str(caught.value).startswith(f"oracle deployment file {path}:") and expected in str(caught.value)
    with pytest.raises(DeploymentError, match="cannot be read"):
        load_deployment(tmp_path / "absent.yaml")


def test_model_files_resolve_only_from_the_store_or_as_bundled(tmp_path: Path) -> None:
    store = ArtifactStore(tmp_path / "store")
    ref = artifact_option(store.put_bytes(b"a potential", kind="potential", suffix=".yace"))
    resolved = resolve_artifact_options("ace", {"potential": ref}, store)
    assert Path(resolved["potential"]).read_bytes() == b"a potential"
    asi = artifact_option(store.put_bytes(b"an active set", kind="active_set", suffix=".asi"))
    with_grades = resolve_artifact_options("ace", {"potential": ref, "active_set": asi}, store)
    assert Path(with_grades["active_set"]).read_bytes() == b"an active set"
    assert resolve_artifact_options("mace", {"models": ["bundled"]}, store)["models"] == [str(BUNDLED_MODEL)]
    assert resolve_artifact_options("xtb", {"method": "GFN1-xTB"}, None) == {"method": "GFN1-xTB"}
    refused = {
        "ace": [
            {"potential": "bundled"},
            {"potential": {**ref, "size": float("nan")}},
            {"potential": {**ref, "x": 1}},
            {"potential": ref, "active_set": "/etc/passwd"},  # the active set (γ) is a model file too
        ],
        "mace": [{"models": ref}, {"models": [str(BUNDLED_MODEL)]}, {"models": [{**ref, "uri": "/etc/passwd"}]}],
    }
    for backend, cases in refused.items():
        for options in cases:
            with pytest.raises(
                InvalidInputError, match=rf"oracle backend '{backend}': option '(potential|models|active_set)"
            ):
                resolve_artifact_options(backend, options, store)
    with pytest.raises(InvalidInputError, match="this oracle has no artifact store"):
        resolve_artifact_options("ace", {"potential": ref}, None)
