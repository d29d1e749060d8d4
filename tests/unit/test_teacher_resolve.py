"""Teacher resolution: a path, "bundled", and mace foundation names in mace's cache (checked against mace's
own lookup), with errors that say which file to put where."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from pyacemaker.teacher import (
    BUNDLED_MODEL,
    FOUNDATION_MODELS,
    TeacherNotFoundError,
    mace_cache_dir,
    resolve_teacher,
)


@pytest.fixture
def cache_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """An empty XDG cache; mace reads XDG_CACHE_HOME at call time, as resolve_teacher does."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    return tmp_path / "xdg" / "mace"


def test_a_path_resolves_to_that_file_and_a_missing_one_is_named(tmp_path: Path) -> None:
    model = tmp_path / "models" / "custom.model"
    model.parent.mkdir()
    model.write_bytes(b"not loaded here")
    assert resolve_teacher(str(model)) == model.resolve()
    assert resolve_teacher("models/custom.model", base_dir=tmp_path) == model.resolve()
    missing = tmp_path / "models" / "absent.model"
    with pytest.raises(TeacherNotFoundError, match=f"teacher model file not found: {missing}"):
        resolve_teacher(str(missing))


def test_an_unknown_bare_name_lists_the_known_ones(cache_home: Path) -> None:
    with pytest.raises(TeacherNotFoundError) as caught:
        resolve_teacher("mediun")
    assert "bundled" in str(caught.value) and "medium-mpa-0" in str(caught.value)


def test_bundled_is_the_committed_teacher() -> None:
    assert resolve_teacher("bundled") == BUNDLED_MODEL
    assert BUNDLED_MODEL.is_file() and BUNDLED_MODEL.stat().st_size < 1_000_000


@pytest.mark.parametrize("name", ["medium", "small", "medium-mpa-0", "mace-off23-medium", "MACE-OFF23_small"])
def test_an_absent_foundation_model_says_which_file_to_place_where(cache_home: Path, name: str) -> None:
    with pytest.raises(TeacherNotFoundError) as caught:
        resolve_teacher(name)
    message = str(caught.value)
    model = FOUNDATION_MODELS[name.lower().replace("_", "-")]
    assert f"Download {model.url} and save it as {cache_home / model.cache_file_name}" in message
    assert mace_cache_dir() == cache_home


def test_cached_foundation_models_are_found_where_mace_itself_finds_them(cache_home: Path) -> None:
    """Place every named model where resolve_teacher expects it; mace's own loaders must then find the same
    file without downloading (they only download when the cached file is missing)."""
    from mace.calculators import foundations_models as mace_foundations

    cache_home.mkdir(parents=True)
    for model in FOUNDATION_MODELS.values():
        # mace_off and mace_omol load the file they find, so those get a real (small) MACE model.
        shutil.copyfile(BUNDLED_MODEL, cache_home / model.cache_file_name)
        assert resolve_teacher(model.name) == cache_home / model.cache_file_name
    for name, model in FOUNDATION_MODELS.items():
        expected = str(cache_home / model.cache_file_name)
        if model.family == "mace_mp":
            assert mace_foundations.mace_mp_urls[name] == model.url
            assert mace_foundations.download_mace_mp_checkpoint(name) == expected
        elif model.family == "mace_polar":
            assert mace_foundations.polar_model_urls[name] == model.url
            assert mace_foundations.download_mace_polar_checkpoint(name) == expected
        elif model.family == "mace_off":
            size = name.removeprefix("mace-off23-")
            assert mace_foundations.mace_off_urls[size] == model.url
            loaded = mace_foundations.mace_off(size, device="cpu", return_raw_model=True)
            assert [int(z) for z in loaded.atomic_numbers] == [1, 6, 17]  # it loaded our copy
        else:
            assert model.family == "mace_omol"
            loaded = mace_foundations.mace_omol("extra_large", device="cpu", return_raw_model=True)
            assert [int(z) for z in loaded.atomic_numbers] == [1, 6, 17]
    # Every name mace knows is in the table.
    assert set(mace_foundations.mace_mp_urls) | set(mace_foundations.polar_model_urls) <= set(FOUNDATION_MODELS)
    assert {f"mace-off23-{size}" for size in mace_foundations.mace_off_urls} <= set(FOUNDATION_MODELS)
