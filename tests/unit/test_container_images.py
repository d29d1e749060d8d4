"""The image builder's requirement lists come from pyproject.toml: each image gets the core pins plus its
service's extras and nothing else (no torch where the service does not need it)."""

from __future__ import annotations

import tomllib
from pathlib import Path

import pytest

from pyacemaker.deploy import images, podman
from pyacemaker.deploy.local import SERVICES
from tests.conftest import REPO_ROOT


def _name(requirement: str) -> str:
    return requirement.split("==")[0].split("[")[0].strip().lower()


def test_each_image_gets_the_core_pins_plus_its_extras_only() -> None:
    project = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())["project"]
    core = set(project["dependencies"])
    for name, spec in images.IMAGES.items():
        wanted = images.requirements(spec.extras)
        assert core <= set(wanted), name
        expected = core | {r for extra in spec.extras for r in project["optional-dependencies"][extra]}
        assert set(wanted) == expected, name
        assert all("==" in requirement for requirement in wanted), f"{name}: every requirement is pinned"
        assert ("torch" in {_name(r) for r in wanted}) == spec.needs_torch, name
    assert set(images.LEAN_IMAGES) == {"orchestrator", "sampler", "oracle", "oracle-qe"}


def test_make_images_builds_every_image_up_starts_by_default() -> None:
    assert set(podman.SERVICE_IMAGES) == set(SERVICES)
    assert set(podman.SERVICE_IMAGES.values()) <= set(images.DEFAULT_IMAGES)
    assert images.IMAGES[podman.SERVICE_IMAGES["oracle"]].needs_torch  # the oracle serves mace for a whole run


def test_a_missing_image_is_named_with_the_command_that_builds_it() -> None:
    ours, foreign = podman.image_tag("trainer"), "quay.io/someone/oracle:1"
    assert podman.missing_images_message([ours]) == f"image(s) not built: {ours} (build them with `make images`)"
    both = podman.missing_images_message([foreign, ours])
    assert both.startswith(f"image(s) not built: {ours} (build them with `make images`); ")
    assert f"image(s) not in podman's storage: {foreign} (not built by `make images`" in both


def test_self_referencing_extras_are_expanded(tmp_path: Path) -> None:
    pyproject = tmp_path / "pyproject.toml"
    pyproject.write_text(
        '[project]\nname = "demo"\ndependencies = ["a==1"]\n'
        '[project.optional-dependencies]\nx = ["b==2"]\ny = ["c==3", "demo[x]"]\nall = ["demo[x,y]"]\n'
    )
    assert images.requirements(("all",), pyproject) == ["a==1", "c==3", "b==2"]
    with pytest.raises(KeyError, match="no optional dependency group 'z'"):
        images.requirements(("z",), pyproject)
