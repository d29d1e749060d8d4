"""The oracle's deployment settings: which programs it runs and which directories it reads and writes.

Requests (and run configs) choose physics and, by name, a profile; everything that names a program, a file or a
directory on the oracle's host comes from here: the file given when the service starts (`python -m
pyacemaker.services.oracle --deployment FILE`, or $PYACEMAKER_ORACLE_DEPLOYMENT), validated at start-up, with safe
defaults
when absent (pw.x on PATH; pseudopotentials where pw.x itself looks, $ESPRESSO_PSEUDO or $HOME/espresso/pseudo,
else Debian's dir; the bundled job templates; scratch under the oracle's --work-dir).
See docs/deployment.md for the file's format and an example.

Model and potential files reach the oracle only as artifact references into the shared store (digest verified,
confined to the store root) or as the name "bundled" (the teacher shipped inside the package):
`resolve_artifact_options` turns them into local paths before a backend is built.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from pydantic import Field, field_validator

from pyacemaker.artifacts import ArtifactError, ArtifactStore
from pyacemaker.clients.oracle import ARTIFACT_OPTIONS
from pyacemaker.executors.deployment import (
    AbsolutePath,
    ExecutorsDeployment,
    ProfileName,
    StrictSettings,
    read_settings_file,
)
from pyacemaker.rpc import InvalidInputError
from pyacemaker.teacher.resolve import BUNDLED_MODEL, BUNDLED_NAME
from pyacemaker.v1 import common_pb2

DEPLOYMENT_ENV = "PYACEMAKER_ORACLE_DEPLOYMENT"
DEBIAN_PSEUDO_DIR = Path("/usr/share/espresso/pseudo")
# pw.x's own default below $HOME when $ESPRESSO_PSEUDO is unset.
QE_HOME_PSEUDO_DIR = Path("espresso/pseudo")


def default_pseudo_dir() -> Path:
    """Where pw.x itself looks when its input names no pseudo_dir, in the oracle's environment: $ESPRESSO_PSEUDO,
    else $HOME/espresso/pseudo when that directory exists; else Debian's quantum-espresso-data directory."""
    if os.environ.get("ESPRESSO_PSEUDO"):
        return Path(os.environ["ESPRESSO_PSEUDO"])
    home = os.environ.get("HOME")
    if home and (Path(home) / QE_HOME_PSEUDO_DIR).is_dir():
        return Path(home) / QE_HOME_PSEUDO_DIR
    return DEBIAN_PSEUDO_DIR


class QeProfile(StrictSettings):
    """How pw.x runs and where its UPF files are."""

    command: str = Field("pw.x", min_length=1, description="How to run pw.x, e.g. 'mpirun -np 4 pw.x'.")
    pseudo_dir: AbsolutePath = Field(default_factory=default_pseudo_dir, description="Directory of the UPF files.")


class VaspProfile(StrictSettings):
    """How VASP runs and where its POTCARs are."""

    command: str = Field(min_length=1, description="How to run VASP (a shell command line), e.g. 'srun vasp_std'.")
    potcar_dir: AbsolutePath | None = Field(
        None, description="VASP_PP_PATH layout (potpaw_PBE/<element>/POTCAR); default: the oracle's $VASP_PP_PATH."
    )


class QeDeployment(StrictSettings):
    profiles: dict[ProfileName, QeProfile] = Field(
        default_factory=dict,
        validate_default=True,  # the default profile is there without a file too
        description="Named profiles; 'default' (pw.x on PATH) is there unless set here.",
    )

    @field_validator("profiles")
    @classmethod
    def _with_default(cls, profiles: dict[str, QeProfile]) -> dict[str, QeProfile]:
        return {"default": QeProfile(), **profiles}


class VaspDeployment(StrictSettings):
    profiles: dict[ProfileName, VaspProfile] = Field(default_factory=dict)


class OracleDeployment(StrictSettings):
    """The oracle's deployment file."""

    qe: QeDeployment = Field(default_factory=QeDeployment)
    vasp: VaspDeployment = Field(default_factory=VaspDeployment)
    executors: ExecutorsDeployment = Field(default_factory=ExecutorsDeployment)

    def qe_profile(self, name: str) -> QeProfile:
        return _profile(self.qe.profiles, "qe", name)

    def vasp_profile(self, name: str) -> VaspProfile:
        return _profile(self.vasp.profiles, "vasp", name)


def _profile(profiles: Mapping[str, Any], backend: str, name: str) -> Any:
    if name not in profiles:
        known = ", ".join(sorted(profiles)) or "none"
        raise InvalidInputError(
            f"oracle backend {backend!r}: option 'profile': this oracle's deployment has no {backend} profile "
            f"{name!r} (it has: {known}); profiles are set in the oracle's deployment file ({backend}.profiles, "
            "see docs/deployment.md)"
        )
    return profiles[name]


def load_deployment(path: str | Path | None) -> OracleDeployment:
    """The deployment file at `path` (YAML), or the defaults for None; DeploymentError names the file and key."""
    return read_settings_file(path, OracleDeployment, "oracle deployment file")


# -- model and potential files: store artifacts only ------------------------------------------------------------


def resolve_artifact_options(name: str, options: Mapping[str, Any], store: ArtifactStore | None) -> dict[str, Any]:
    """`options` with the model files of mace (`models`) and ace (`potential`, `active_set`) resolved to verified
    paths in the store; "bundled" (mace) is the teacher shipped inside the package. Anything else (a path, a name,
    a ref that leaves the store or whose digest differs) raises InvalidInputError naming the option."""
    options = dict(options)
    for key, is_list in ARTIFACT_OPTIONS.get(name, ()):
        if key not in options:
            continue
        value = options[key]
        if is_list:
            if not isinstance(value, list):
                raise InvalidInputError(
                    f"oracle backend {name!r}: option '{key}' must be a list of artifact references"
                )
            options[key] = [str(_artifact_path(name, f"{key}.{i}", entry, store)) for i, entry in enumerate(value)]
        else:
            options[key] = str(_artifact_path(name, key, value, store))
    return options


def _artifact_path(backend: str, key: str, value: Any, store: ArtifactStore | None) -> Path:
    where = f"oracle backend {backend!r}: option '{key}'"
    if backend == "mace" and value == BUNDLED_NAME:
        return BUNDLED_MODEL
    if not isinstance(value, dict):
        allowed = "an artifact reference {uri, sha256, size, kind} from the store"
        if backend == "mace":
            allowed += " or 'bundled'"
        raise InvalidInputError(
            f"{where}: got {value!r}; model files reach the oracle only as {allowed} (the orchestrator and "
            "`pyacemaker label` put files into the store and send references)"
        )
    unknown = sorted(set(value) - {"uri", "sha256", "size", "kind"})
    if unknown or not isinstance(value.get("uri"), str) or not isinstance(value.get("sha256"), str):
        raise InvalidInputError(f"{where}: an artifact reference needs string uri and sha256 (and only size, kind)")
    if store is None:
        raise InvalidInputError(f"{where}: this oracle has no artifact store (start it with --store)")
    size = value.get("size", 0)
    if isinstance(size, bool) or not isinstance(size, int | float) or not 0 <= size < 2**63 or size != int(size):
        raise InvalidInputError(f"{where}: size must be a whole number of bytes")
    ref = common_pb2.ArtifactRef(
        uri=value["uri"], sha256=value["sha256"], size=int(size), kind=str(value.get("kind", ""))
    )
    try:
        return store.path(ref)
    except ArtifactError as exc:
        raise InvalidInputError(f"{where}: {exc}") from None
