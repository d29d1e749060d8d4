"""Where `teacher.model` points: the bundled teacher, a mace foundation model in mace's cache, or a file.

The table of foundation models mirrors `mace.calculators.foundations_models` (mace-torch 0.3.16): the same
names, download URLs, and the file names mace gives them in its cache directory ($XDG_CACHE_HOME/mace, else
~/.cache/mace), so a model mace has downloaded once is found here, and a model placed by hand where the error
message says is found by both. This module never downloads anything and does not import mace (the
orchestrator resolves names without torch); tests check the table against mace's own lookup.

Security: a MACE model file is a pickle, and loading it runs code. Resolution only names files; whoever loads
them (the mace oracle) must load only files that come from the config or this resolution.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

BUNDLED_NAME = "bundled"
BUNDLED_DIR = Path(__file__).resolve().parent / "bundled"
BUNDLED_MODEL = BUNDLED_DIR / "sn2_teacher.model"
BUNDLED_METRICS = BUNDLED_DIR / "sn2_teacher_metrics.json"

_MP = "https://github.com/ACEsuit/mace-mp/releases/download"
_FOUNDATIONS = "https://github.com/ACEsuit/mace-foundations/releases/download"
_OFF = "https://raw.githubusercontent.com/ACEsuit/mace-off/main/mace_off23"


class TeacherNotFoundError(FileNotFoundError):
    """The teacher cannot be found; the message says which file to place where."""


@dataclass(frozen=True)
class FoundationModel:
    name: str
    family: str  # which mace loader serves it: "mace_mp", "mace_off", "mace_omol" or "mace_polar"
    url: str

    @property
    def cache_file_name(self) -> str:
        """The name mace saves the download under in its cache directory. mace_mp and mace_polar keep only
        letters, digits and underscores of the URL's last part; mace_off and mace_omol keep it as is."""
        base = os.path.basename(self.url)
        if self.family in ("mace_mp", "mace_polar"):
            return "".join(c for c in base if c.isalnum() or c == "_")
        return base.split("?")[0]


def _table() -> dict[str, FoundationModel]:
    mp = {
        "small": f"{_MP}/mace_mp_0/2023-12-10-mace-128-L0_energy_epoch-249.model",
        "medium": f"{_MP}/mace_mp_0/2023-12-03-mace-128-L1_epoch-199.model",
        "large": f"{_MP}/mace_mp_0/MACE_MPtrj_2022.9.model",
        "small-0b": f"{_MP}/mace_mp_0b/mace_agnesi_small.model",
        "medium-0b": f"{_MP}/mace_mp_0b/mace_agnesi_medium.model",
        "small-0b2": f"{_MP}/mace_mp_0b2/mace-small-density-agnesi-stress.model",
        "medium-0b2": f"{_MP}/mace_mp_0b2/mace-medium-density-agnesi-stress.model",
        "large-0b2": f"{_MP}/mace_mp_0b2/mace-large-density-agnesi-stress.model",
        "medium-0b3": f"{_MP}/mace_mp_0b3/mace-mp-0b3-medium.model",
        "medium-mpa-0": f"{_MP}/mace_mpa_0/mace-mpa-0-medium.model",
        "small-omat-0": f"{_MP}/mace_omat_0/mace-omat-0-small.model",
        "medium-omat-0": f"{_MP}/mace_omat_0/mace-omat-0-medium.model",
        "mace-matpes-pbe-0": f"{_FOUNDATIONS}/mace_matpes_0/MACE-matpes-pbe-omat-ft.model",
        "mace-matpes-r2scan-0": f"{_FOUNDATIONS}/mace_matpes_0/MACE-matpes-r2scan-omat-ft.model",
        "mh-0": f"{_FOUNDATIONS}/mace_mh_1/mace-mh-0.model",
        "mh-1": f"{_FOUNDATIONS}/mace_mh_1/mace-mh-1.model",
    }
    off = {size: f"{_OFF}/MACE-OFF23_{size}.model" for size in ("small", "medium", "large")}
    polar = {f"polar-1-{s}": f"{_FOUNDATIONS}/mace_polar_1/MACE-POLAR-1-{s.upper()}.model" for s in "sml"}
    table = {name: FoundationModel(name, "mace_mp", url) for name, url in mp.items()}
    # mace names the MACE-OFF sizes "small"/"medium"/"large" too (in mace_off); here they carry the family.
    table.update(
        {f"mace-off23-{size}": FoundationModel(f"mace-off23-{size}", "mace_off", u) for size, u in off.items()}
    )
    table.update({name: FoundationModel(name, "mace_polar", url) for name, url in polar.items()})
    omol = f"{_FOUNDATIONS}/mace_omol_0/MACE-omol-0-extra-large-1024.model"
    table["mace-omol-0-extra-large"] = FoundationModel("mace-omol-0-extra-large", "mace_omol", omol)
    return table


FOUNDATION_MODELS: dict[str, FoundationModel] = _table()


def mace_cache_dir() -> Path:
    """mace's cache directory, as `mace.tools.utils.get_cache_dir` computes it."""
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "mace"


def foundation_model(name: str) -> FoundationModel | None:
    """The foundation model called `name` (case-insensitive; MACE-OFF also by its file stem, e.g.
    "MACE-OFF23_medium"), or None."""
    key = name.strip().lower()
    if key.startswith("mace-off23"):
        key = key.replace("_", "-")
    return FOUNDATION_MODELS.get(key)


def is_model_name(text: str) -> bool:
    """Whether `teacher.model` text names a model ('bundled' or a foundation model) rather than a file: a name
    wins over a same-named file in the working directory, and anything with a path separator is a file."""
    if os.sep in text or "/" in text:
        return False
    return text == BUNDLED_NAME or foundation_model(text) is not None


def closest_model_name(text: str) -> str:
    """ "; did you mean 'medium'?" for a misspelt model name, else where the names are listed (for messages)."""
    import difflib

    names = [BUNDLED_NAME, *FOUNDATION_MODELS]
    close = difflib.get_close_matches(text.strip().lower(), names, n=1, cutoff=0.75)
    if close and os.sep not in text and "/" not in text:
        return f"; did you mean {close[0]!r}?"
    return "; the model names are listed in docs/configuration.md#teacher-models"


def resolve_teacher(name_or_path: str | os.PathLike[str], base_dir: Path | None = None) -> Path:
    """The MACE model file `teacher.model` means.

    "bundled" is the project's C/H/Cl teacher; a foundation-model name (see FOUNDATION_MODELS) is looked up in
    mace's cache; anything else is a path (relative to `base_dir`, e.g. the config file's directory). A name
    wins over a same-named file in the working directory; write "./small" for the file. Raises
    TeacherNotFoundError with a message that says which file to put where."""
    text = os.fspath(name_or_path)
    if text == BUNDLED_NAME:
        if not BUNDLED_MODEL.is_file():
            raise TeacherNotFoundError(
                f"the bundled teacher {BUNDLED_MODEL} is missing; rebuild it with `make teacher`"
            )
        return BUNDLED_MODEL
    model = foundation_model(text) if is_model_name(text) else None
    if model is not None:
        return _cached_foundation_model(model)
    path = Path(text).expanduser()
    if not path.is_absolute() and base_dir is not None:
        path = base_dir / path
    if path.is_file():
        return path.resolve()
    hint = ""
    if os.sep not in text and "/" not in text:
        hint = f" It is not a known model name either: use 'bundled' or one of {', '.join(sorted(FOUNDATION_MODELS))}."
    raise TeacherNotFoundError(f"teacher model file not found: {path}.{hint}")


def _cached_foundation_model(model: FoundationModel) -> Path:
    cache_dir = mace_cache_dir()
    candidates = [cache_dir / model.cache_file_name]
    if model.name == "medium-mpa-0":
        # mace_mp looks for this one inside the mace package first.
        package_copy = _mace_package_dir()
        if package_copy is not None:
            candidates.insert(0, package_copy / "calculators" / "foundations_models" / "mace-mpa-0-medium.model")
    for candidate in candidates:
        if candidate.is_file():
            return candidate
    raise TeacherNotFoundError(
        f"mace foundation model {model.name!r} is not in mace's cache and PyAceMaker does not download models. "
        f"Download {model.url} and save it as {candidates[-1]} (mace's cache: $XDG_CACHE_HOME/mace, else "
        f"~/.cache/mace), or set teacher.model to the path of the downloaded file."
    )


def _mace_package_dir() -> Path | None:
    import importlib.util

    spec = importlib.util.find_spec("mace")
    if spec is None or spec.origin is None:
        return None
    return Path(spec.origin).parent
