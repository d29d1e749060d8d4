"""The import contract (pyproject.toml, checked by `lint-imports` in `make lint`) names the core's modules one by
one: a new core module must join that list, or the contract would not check it."""

from __future__ import annotations

import subprocess
import tomllib

from tests.conftest import REPO_ROOT

# Not core: the layers above it (the contract's other rule) and the generated protocol modules.
NOT_CORE = {"cli", "clients", "services", "v1"}


def _contracts() -> dict[str, dict]:
    config = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())["tool"]["importlinter"]
    return {contract["id"]: contract for contract in config["contracts"]}


def test_every_core_module_is_in_the_core_contract() -> None:
    package = REPO_ROOT / "pyacemaker"
    modules = {path.stem for path in package.glob("*.py") if path.stem != "__init__"}
    modules |= {path.parent.name for path in package.glob("*/__init__.py")}
    listed = {name.removeprefix("pyacemaker.") for name in _contracts()["core"]["source_modules"]}
    assert listed == modules - NOT_CORE


def test_the_contract_holds_and_would_catch_a_service_imported_by_the_core(tmp_path) -> None:
    lint = [str(REPO_ROOT / ".venv" / "bin" / "lint-imports")]
    kept = subprocess.run(lint, cwd=REPO_ROOT, capture_output=True, text=True, timeout=120)
    assert kept.returncode == 0, kept.stdout
    assert "Contracts: 2 kept, 0 broken." in kept.stdout
    # The same contract over a copy of the config in which the core's one allowed exception is gone.
    config = (REPO_ROOT / "pyproject.toml").read_text()
    exception = 'ignore_imports = ["pyacemaker.teacher.build -> pyacemaker.services.oracle.backends.xtb"]'
    assert exception in config
    strict = tmp_path / "strict.toml"
    strict.write_text(config.replace(exception, ""))
    broken = subprocess.run([*lint, str(strict)], cwd=REPO_ROOT, capture_output=True, text=True, timeout=120)
    assert broken.returncode == 1
    assert "pyacemaker.teacher.build -> pyacemaker.services.oracle.backends.xtb" in broken.stdout
