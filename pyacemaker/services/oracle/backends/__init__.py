"""The registry of oracle backends: names → classes, option validation, and what GetInfo reports."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from pydantic import ValidationError

from pyacemaker.artifacts import ArtifactStore
from pyacemaker.config import ORACLE_OPTION_MODELS, QeOracleConfig, VaspOracleConfig, format_validation_error
from pyacemaker.rpc import InvalidInputError, WrongStateError
from pyacemaker.services.oracle.backends.ace import AceBackend
from pyacemaker.services.oracle.backends.base import OracleBackend
from pyacemaker.services.oracle.backends.lj import LennardJonesBackend
from pyacemaker.services.oracle.backends.mace import MaceBackend
from pyacemaker.services.oracle.backends.pyscf import PyscfBackend
from pyacemaker.services.oracle.backends.qe import QeBackend
from pyacemaker.services.oracle.backends.vasp import VaspBackend
from pyacemaker.services.oracle.backends.xtb import XtbBackend
from pyacemaker.services.oracle.deployment import OracleDeployment, resolve_artifact_options
from pyacemaker.v1 import oracle_pb2

BACKENDS: dict[str, type[OracleBackend]] = {
    cls.name: cls
    for cls in (AceBackend, LennardJonesBackend, MaceBackend, PyscfBackend, QeBackend, VaspBackend, XtbBackend)
}

__all__ = ["BACKENDS", "OracleBackend", "backend_infos", "create_backend", "validate_options"]


def validate_options(name: str, options: Mapping[str, Any]) -> Any:
    """The backend's pydantic config (the run config's `oracle:` section) built from `options`; bad names
    and values raise InvalidInputError naming the backend and the offending option."""
    if name not in BACKENDS or name not in ORACLE_OPTION_MODELS:
        known = ", ".join(sorted(set(BACKENDS) & set(ORACLE_OPTION_MODELS)))
        raise InvalidInputError(f"unknown oracle backend {name!r} (known: {known})")
    options = dict(options)
    if options.pop("backend", name) != name:
        raise InvalidInputError(f"oracle backend {name!r}: option 'backend' contradicts the backend name")
    data = {"backend": name, **options}
    try:
        return ORACLE_OPTION_MODELS[name].model_validate(data)
    except ValidationError as exc:
        raise InvalidInputError(format_validation_error(exc, data, f"oracle backend {name!r} options")) from None


def create_backend(
    name: str,
    options: Mapping[str, Any],
    deployment: OracleDeployment | None = None,
    store: ArtifactStore | None = None,
) -> OracleBackend:
    """A ready backend for a request's options: model files only as verified artifacts of `store` (see
    pyacemaker/services/oracle/deployment.py), programs and directories only from `deployment` (default: the defaults).
    InvalidInputError for an unknown name or bad options, WrongStateError when the backend's code is not
    installed in this process."""
    deployment = deployment if deployment is not None else OracleDeployment()
    config = validate_options(name, resolve_artifact_options(name, options, store))
    cls = BACKENDS[name]
    reason = cls.unavailable_reason()
    if reason is not None:
        raise WrongStateError(f"oracle backend {name!r} is not available here: {reason}")
    # The programs and directories of the profile the options name (InvalidInputError for an unknown one).
    qe_profile = deployment.qe_profile(config.profile) if isinstance(config, QeOracleConfig) else None
    vasp_profile = deployment.vasp_profile(config.profile) if isinstance(config, VaspOracleConfig) else None
    try:
        if qe_profile is not None:
            return QeBackend(config, qe_profile)
        if vasp_profile is not None:
            return VaspBackend(config, vasp_profile)
        return cls(config)  # type: ignore[call-arg]  # each backend takes its own config model
    except InvalidInputError:  # the backend's own message already names it
        raise
    except ValueError as exc:  # options that validate but name an unusable file, say
        raise InvalidInputError(f"oracle backend {name!r}: {exc}") from None


def backend_infos() -> list[oracle_pb2.BackendInfo]:
    infos = []
    for name, cls in sorted(BACKENDS.items()):
        reason = cls.unavailable_reason()
        infos.append(
            oracle_pb2.BackendInfo(
                name=name,
                implemented_properties=list(cls.implemented_properties),
                descriptors=cls.descriptors,
                available=reason is None,
                unavailable_reason=reason or "",
            )
        )
    return infos
