"""Certificates for the TLS tests, made by the openssl CLI: a CA that signs a server and a client certificate,
and an unrelated CA ("other") with a client certificate of its own ("intruder")."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path


def openssl_available() -> bool:
    return shutil.which("openssl") is not None


def _openssl(*args: str, cwd: Path) -> None:
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True)


def _make_ca(directory: Path, name: str) -> None:
    _openssl(
        "req",
        "-x509",
        "-newkey",
        "ec",
        "-pkeyopt",
        "ec_paramgen_curve:prime256v1",
        "-nodes",
        "-days",
        "1",
        "-subj",
        f"/CN={name}",
        "-keyout",
        f"{name}.key",
        "-out",
        f"{name}.pem",
        cwd=directory,
    )


def _issue(directory: Path, ca: str, name: str, san: str) -> None:
    """A certificate `name`.pem/.key signed by `ca`, valid for the subject alternative names `san`."""
    (directory / f"{name}.ext").write_text(f"subjectAltName={san}\n")
    _openssl(
        "req",
        "-newkey",
        "ec",
        "-pkeyopt",
        "ec_paramgen_curve:prime256v1",
        "-nodes",
        "-subj",
        f"/CN={name}",
        "-keyout",
        f"{name}.key",
        "-out",
        f"{name}.csr",
        cwd=directory,
    )
    _openssl(
        "x509",
        "-req",
        "-in",
        f"{name}.csr",
        "-CA",
        f"{ca}.pem",
        "-CAkey",
        f"{ca}.key",
        "-CAcreateserial",
        "-days",
        "1",
        "-extfile",
        f"{name}.ext",
        "-out",
        f"{name}.pem",
        cwd=directory,
    )


def make_pki(directory: Path, server_names: str) -> Path:
    """ca/other CAs, server.pem/.key valid for `server_names` (an openssl subjectAltName value), client and
    intruder certificates, all PEM files in `directory`."""
    for ca in ("ca", "other"):
        _make_ca(directory, ca)
    _issue(directory, "ca", "server", server_names)
    _issue(directory, "ca", "client", "DNS:client")
    _issue(directory, "other", "intruder", "DNS:client")
    return directory
