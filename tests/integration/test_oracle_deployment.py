"""Nothing executable or readable comes from a request: each attack a fuzzing pass found on the oracle's Label
RPC, sent to a real oracle on loopback, is refused with INVALID_ARGUMENT naming the option, and leaves no trace
(no marker file written, no directory made, no file content in the answer). What the deployment file sets
(programs, job templates, scratch dirs) is what runs, and model files load only as verified store artifacts."""

from __future__ import annotations

import functools
import os
import pickle
import shlex
import shutil
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
from ase import Atoms
from ase.build import bulk

from pyacemaker.artifacts import ArtifactStore
from pyacemaker.clients.oracle import artifact_option, backend_spec, stream_labels
from pyacemaker.labels import Labels
from pyacemaker.rpc import channel
from pyacemaker.services.oracle.deployment import OracleDeployment
from pyacemaker.services.oracle.server import add_to_server
from tests.conftest import running_service

PASSWD = Path("/etc/passwd")


@pytest.fixture
def deployed(tmp_path: Path) -> Iterator[tuple[grpc.Channel, ArtifactStore, Path]]:
    """An oracle with a store, a work dir and a deployment whose scratch dir for local tasks is `scratch`."""
    store = ArtifactStore(tmp_path / "store")
    deployment = OracleDeployment.model_validate(
        {
            "qe": {"profiles": {"marker": _marker_profile(tmp_path)}},
            "vasp": {"profiles": {"default": {"command": "true"}}},
            "executors": {"local": {"scratch_dir": str(tmp_path / "scratch")}},
        }
    )
    register = functools.partial(add_to_server, work_dir=tmp_path / "work", store=store, deployment=deployment)
    with running_service(register) as address, channel(address) as ch:
        yield ch, store, tmp_path


def _marker_profile(tmp_path: Path) -> dict[str, str]:
    """A qe profile whose 'pw.x' only writes a marker file (it gets pw.x's arguments, which it ignores), with a
    pseudo dir that holds a (fake) Si UPF file."""
    pseudo_dir = tmp_path / "pseudo"
    pseudo_dir.mkdir()
    (pseudo_dir / "Si.UPF").write_text("not a real pseudopotential\n")
    script = f"open({str(tmp_path / 'deployed_command_ran')!r}, 'w').write('ran')"
    return {"command": f"{shlex.quote(sys.executable)} -c {shlex.quote(script)}", "pseudo_dir": str(pseudo_dir)}


def silicon() -> Atoms:
    return bulk("Si", "diamond", a=5.43)


def water() -> Atoms:
    return Atoms("OH2", positions=[[0, 0, 0], [0.96, 0, 0], [-0.24, 0.93, 0]])


def label(ch: grpc.Channel, backend: str, options: dict[str, Any], atoms: Atoms) -> Labels:
    results = list(stream_labels(ch, backend_spec(backend, options), [atoms], timeout=120))
    assert len(results) == 1
    return results[0][1]


def refused(ch: grpc.Channel, backend: str, options: dict[str, Any], atoms: Atoms) -> str:
    """The INVALID_ARGUMENT message the oracle answers a request with."""
    with pytest.raises(grpc.RpcError) as caught:
        label(ch, backend, options, atoms)
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT, caught.value.details()
    return str(caught.value.details())


# -- programs ------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("backend", ["qe", "vasp"])
def test_a_command_in_a_request_is_refused_and_never_runs(deployed, backend: str) -> None:
    ch, _, tmp_path = deployed
    marker = tmp_path / "pwned"
    attack = f"touch {marker}"
    options = {"command": attack, "pseudopotentials": {"Si": "Si.UPF"}} if backend == "qe" else {"command": attack}
    message = refused(ch, backend, options, silicon())
    assert "`command` is a deployment setting" in message and f"{backend}.profiles.<profile>.command" in message
    assert not marker.exists()


def test_the_deployments_command_runs_for_the_profile_a_request_names(deployed) -> None:
    ch, _, tmp_path = deployed
    labels = label(ch, "qe", {"profile": "marker", "pseudopotentials": {"Si": "Si.UPF"}}, silicon())
    # The deployed 'pw.x' wrote no output, so the label failed; but it ran, through the local task worker.
    assert not labels.ok
    assert (tmp_path / "deployed_command_ran").read_text() == "ran"
    assert labels.level_of_theory.endswith(";profile=marker")
    assert list((tmp_path / "scratch" / "tasks").iterdir()), "task dirs go to the deployment's scratch dir"


def test_an_unknown_profile_and_a_pseudopotential_path_are_refused(deployed) -> None:
    ch, _, _ = deployed
    message = refused(ch, "qe", {"profile": "nosuch", "pseudopotentials": {"Si": "Si.UPF"}}, silicon())
    assert "no qe profile 'nosuch' (it has: default, marker)" in message
    message = refused(ch, "qe", {"pseudopotentials": {"Si": "../../../etc/passwd"}}, silicon())
    assert "pseudopotentials: Si: '../../../etc/passwd' must be a plain file name" in message
    message = refused(ch, "qe", {"pseudo_dir": "/etc", "pseudopotentials": {"Si": "passwd"}}, silicon())
    assert "`pseudo_dir` is a deployment setting" in message


def test_vasp_takes_incar_tags_only_not_input_writer_keywords(deployed) -> None:
    ch, _, _ = deployed
    for keyword in ("pp", "custom", "txt"):
        message = refused(ch, "vasp", {"incar": {keyword: "/etc"}}, silicon())
        assert f"'incar': {keyword!r} is not an INCAR tag" in message
    assert "`potcar_dir` is a deployment setting" in refused(ch, "vasp", {"potcar_dir": "/etc"}, silicon())


# -- model files ---------------------------------------------------------------------------------------------------


class _Payload:
    """A pickle that, when loaded, creates the file `path`: what a malicious 'model' would do."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def __reduce__(self) -> tuple[Any, ...]:
        return (open, (str(self.path), "w"))


def test_a_pickle_path_in_models_is_refused_and_never_unpickled(deployed) -> None:
    ch, _, tmp_path = deployed
    marker = tmp_path / "unpickled"
    evil = tmp_path / "evil.model"
    evil.write_bytes(pickle.dumps(_Payload(marker)))
    message = refused(ch, "mace", {"models": [str(evil)]}, water())
    assert "option 'models.0'" in message and "artifact reference" in message
    # Not as a foundation-model name or a home-relative path either.
    assert "option 'models.0'" in refused(ch, "mace", {"models": ["small"]}, water())
    assert not marker.exists()


def test_a_model_reference_must_stay_in_the_store_and_match_its_digest(deployed) -> None:
    ch, store, tmp_path = deployed
    marker = tmp_path / "unpickled"
    evil = tmp_path / "evil.model"
    evil.write_bytes(pickle.dumps(_Payload(marker)))
    ref = artifact_option(store.put_bytes(b"a model", kind="model", suffix=".model"))
    outside = {**ref, "uri": os.path.relpath(evil, store.root)}
    assert "points outside the store root" in refused(ch, "mace", {"models": [outside]}, water())
    (store.root / "objects" / "ab").mkdir(parents=True, exist_ok=True)
    (store.root / "objects" / "ab" / "link.model").symlink_to(evil)
    linked = {**ref, "uri": "objects/ab/link.model"}
    assert "points outside the store root" in refused(ch, "mace", {"models": [linked]}, water())
    altered = {**ref, "sha256": "0" * 64}
    assert "expected " + "0" * 64 in refused(ch, "mace", {"models": [altered]}, water())
    assert not marker.exists()


def test_ace_and_mace_options_cannot_read_a_file_outside_the_store(deployed) -> None:
    ch, _, tmp_path = deployed
    link = tmp_path / "passwd.yace"
    link.symlink_to(PASSWD)
    first_line = PASSWD.read_text().splitlines()[0]
    for backend, options in (
        ("ace", {"potential": str(link)}),
        ("ace", {"potential": {"uri": "../../passwd.yace", "sha256": "0" * 64}}),
        ("mace", {"models": [str(PASSWD)]}),
    ):
        message = refused(ch, backend, options, water())
        assert ("'potential'" if backend == "ace" else "'models.0'") in message
        assert first_line not in message


# -- executors -----------------------------------------------------------------------------------------------------


def test_a_scratch_dir_outside_the_deployment_is_refused_and_not_made(deployed) -> None:
    ch, _, tmp_path = deployed
    elsewhere = tmp_path / "elsewhere" / "deep"
    message = refused(ch, "xtb", {"executor": {"kind": "local", "scratch_dir": str(elsewhere)}}, water())
    assert "`scratch_dir` is a deployment setting" in message and "executors.local.scratch_dir" in message
    assert not (tmp_path / "elsewhere").exists()


def test_a_job_template_or_directive_from_a_request_is_refused(deployed, tmp_path: Path) -> None:
    ch, _, _ = deployed
    private = tmp_path / "private.sh"
    private.write_text("#!/bin/bash\n# secret account\n{{ task_command }}\n")
    private.chmod(0o600)
    message = refused(ch, "pyscf", {"executor": {"kind": "slurm", "template": str(private)}}, water())
    assert "`template` is a deployment setting" in message and "executors.slurm.template" in message
    message = refused(ch, "pyscf", {"executor": {"kind": "pbs", "extra_directives": ["-o /etc"]}}, water())
    assert "executors.pbs.extra_directives" in message
    # A newline in a resource value would start a command line in the job script.
    message = refused(ch, "pyscf", {"executor": {"kind": "slurm", "partition": "short\nrm -rf ~"}}, water())
    assert "executor.partition" in message


def test_pyscf_takes_a_basis_name_not_a_basis_file(deployed) -> None:
    ch, _, _ = deployed
    message = refused(ch, "pyscf", {"basis": str(PASSWD)}, water())
    assert "basis" in message and "not a path" in message


def test_bundled_and_store_references_are_what_the_mace_oracle_loads(deployed) -> None:
    pytest.importorskip("mace", reason="the mace backend needs mace-torch (pip install 'pyacemaker[mace]')")
    from pyacemaker.teacher.resolve import BUNDLED_MODEL

    ch, store, _ = deployed
    chloromethane = Atoms(
        "CHHHCl", positions=[[0, 0, 0], [1.09, 0, 0], [-0.36, 1.03, 0], [-0.36, -0.51, 0.89], [-0.6, -0.6, -1.5]]
    )
    ref = artifact_option(store.put_file(BUNDLED_MODEL, kind="model"))
    by_name = label(ch, "mace", {"models": ["bundled"]}, chloromethane)
    by_ref = label(ch, "mace", {"models": [ref]}, chloromethane)
    assert by_name.ok, by_name.reason
    assert by_ref.energy == by_name.energy and by_ref.level_of_theory == by_name.level_of_theory


def test_without_a_deployment_file_qe_runs_pw_x_from_path_with_debians_pseudopotentials(tmp_path: Path) -> None:
    if shutil.which("pw.x") is None or not Path("/usr/share/espresso/pseudo/Si.pz-vbc.UPF").is_file():
        pytest.skip("pw.x or Debian's Si.pz-vbc.UPF is missing: apt-get install quantum-espresso quantum-espresso-data")
    options = {"pseudopotentials": {"Si": "Si.pz-vbc.UPF"}, "ecutwfc_ry": 12.0, "kpoint_spacing": 1.5}
    register = functools.partial(add_to_server, work_dir=tmp_path / "work")
    with running_service(register) as address, channel(address) as ch:
        labels = label(ch, "qe", options, silicon())
    assert labels.ok, labels.reason
    assert labels.level_of_theory == "qe:Si=Si.pz-vbc.UPF;ecutwfc=12.0Ry,ecutrho=48.0Ry,dk=1.5/A"
