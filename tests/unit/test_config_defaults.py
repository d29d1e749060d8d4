"""Settings a config leaves out, derived from its seeds and its budget (pyacemaker.config_defaults): the restraint
windows and the profile from the shipped SN2 seeds, the budget's split, the thermal rattles, and that nothing
given is ever changed. Expected numbers come from the seed geometry (numpy distances) and from the rule as the
field descriptions state it, worked by hand."""

from __future__ import annotations

import contextlib
import io
import math
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import yaml

from pyacemaker.cli.main import EXIT_OK, main
from pyacemaker.config import config_from_json, config_to_json, load_config
from pyacemaker.config_defaults import budget_split, derive_defaults
from pyacemaker.seeds import load_seeds
from tests.conftest import SN2_DIR

SEEDS = ["seeds/reactant_complex.xyz", "seeds/transition_state.xyz", "seeds/product_complex.xyz"]


def _config_file(tmp_path: Path, seeds: list[str] = SEEDS, **sections: Any) -> Path:
    """The recommended minimal config (name, seeds, charge, DFT level, budget) plus `sections`, beside the
    shipped SN2 seeds."""
    shutil.copytree(SN2_DIR / "seeds", tmp_path / "seeds", dirs_exist_ok=True)
    data: dict[str, Any] = {
        "name": "minimal",
        "system": {"seeds": seeds, "charge": -1},
        "oracle": {"backend": "xtb", "method": "GFN1-xTB"},
        "budget": {"max_dft_calls": 70},
        **sections,
    }
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(data, allow_unicode=True))
    return path


def _derived(path: Path) -> tuple[Any, dict[str, str]]:
    config = load_config(path)
    resolved, derived = derive_defaults(config, load_seeds(config))
    return resolved, {item.key: item.text for item in derived}


def test_windows_and_profile_of_the_shipped_sn2_seeds_bracket_their_xi(tmp_path: Path) -> None:
    config, derived = _derived(_config_file(tmp_path))
    windows, profile = config.md.windows, config.validation.profile
    assert windows is not None and profile is not None
    assert windows.atoms == (4, 0, 5) and profile.atoms == (4, 0, 5)
    # ξ = d(Cl4, C0) − d(C0, Cl5) of the reactant and the product complex, from their coordinates.
    seeds = load_seeds(load_config(tmp_path / "config.yaml"))
    xis = [
        float(np.linalg.norm(s.positions[4] - s.positions[0]) - np.linalg.norm(s.positions[0] - s.positions[5]))
        for s in seeds
    ]
    low, high = min(xis), max(xis)
    assert xis[0] < 0 < xis[-1]
    for section in (windows, profile):
        # 0.3 Å beyond both, rounded outwards to 0.1 Å: the range brackets every seed with a margin.
        assert section.start <= low - 0.3 < section.start + 0.1 and section.stop - 0.1 < high + 0.3 <= section.stop
    assert (windows.start, windows.stop) == (-1.5, 1.5)
    assert windows.count == round((windows.stop - windows.start) / 0.25) + 1 == 13
    assert windows.force_constant == 5.0
    assert profile.count == 11  # budget 70 / 6 → 11
    assert derived["md.windows"] == (
        "derived from the seeds: atoms [4, 0, 5] (Cl4–C0 breaks, C0–Cl5 forms), ξ −1.5..1.5 Å, 13 windows"
    )


@pytest.mark.parametrize(
    "seeds", [["seeds/reactant_complex.xyz"], ["seeds/reactant_complex.xyz", "seeds/reactant_complex.xyz"]]
)
def test_a_non_reactive_system_gets_no_windows_and_no_profile(tmp_path: Path, seeds: list[str]) -> None:
    config, derived = _derived(_config_file(tmp_path, seeds=seeds))
    assert config.md.windows is None and config.validation.profile is None
    assert "md.windows" not in derived and "validation.profile" not in derived
    # No profile points to pay for: the batch gets them (70 − 3 − 24 − 10 = 33 left over 3 iterations).
    assert config.active_learning.batch_size == 11


@pytest.mark.parametrize(
    ("budget", "direct", "holdout", "profile", "batch"),
    [
        # DIRECT int(0.35 B); hold-out round(B / 7) in [2, 20]; profile int(B / 6) in [5, 11], odd;
        # batch (B − 3 elements − DIRECT − hold-out − profile) // 3 iterations, at least 1.
        (30, 10, 4, 5, 2),  # 30 − 3 − 10 − 4 − 5 = 8 → 2
        (70, 24, 10, 11, 7),  # 70 − 3 − 24 − 10 − 11 = 22 → 7
        (200, 70, 20, 11, 32),  # 200 / 7 = 28.6 → 20; 200 / 6 = 33 → 11; 200 − 3 − 70 − 20 − 11 = 96 → 32
    ],
)
def test_the_budget_split(tmp_path: Path, budget: int, direct: int, holdout: int, profile: int, batch: int) -> None:
    config, derived = _derived(_config_file(tmp_path, budget={"max_dft_calls": budget}))
    assert config.sampling.direct.n_select == direct
    assert config.validation.holdout_size == holdout
    assert config.validation.profile is not None and config.validation.profile.count == profile
    assert config.active_learning.batch_size == batch
    # The rule fits the budget: E0s, DIRECT, hold-out, profile and every iteration's batch.
    assert 3 + direct + holdout + profile + 3 * batch <= budget
    assert derived["sampling.direct.n_select"] == f"{direct}, derived from budget.max_dft_calls {budget} (35 %)"
    code, lines, _ = _cli("config", "check", str(tmp_path / "config.yaml"))
    assert code == EXIT_OK and lines == []  # the derived split passes preflight without a warning


def test_explicit_values_are_never_overridden(tmp_path: Path) -> None:
    given = {
        "sampling": {"direct": {"n_select": 5}, "pool": {"rattle_amplitudes": [0.1]}},
        "md": {"windows": None},
        "validation": {"holdout_size": 3, "profile": {"atoms": [5, 0, 4], "start": -1.0, "stop": 1.0}},
    }
    config, derived = _derived(_config_file(tmp_path, **given))
    assert config.sampling.direct.n_select == 5 and config.validation.holdout_size == 3
    assert config.sampling.pool.rattle_amplitudes == [0.1]
    assert config.md.windows is None  # explicitly plain MD, on reactive seeds
    profile = config.validation.profile
    assert profile is not None and (profile.atoms, profile.count) == ((5, 0, 4), 11)
    # Only the batch is derived, around the given sizes: 70 − 3 − 5 − 3 − 11 = 48 → 16 per iteration.
    assert list(derived) == ["active_learning.batch_size"] and config.active_learning.batch_size == 16


@pytest.mark.parametrize("name", ["config.yaml", "config_quick.yaml"])
def test_the_flagship_configs_set_everything_and_get_nothing_derived(name: str) -> None:
    config = load_config(SN2_DIR / name)
    resolved, derived = derive_defaults(config, load_seeds(config))
    assert derived == [] and resolved == config


def test_a_saved_config_is_not_derived_again_and_a_restart_keeps_its_selection(tmp_path: Path) -> None:
    config = load_config(_config_file(tmp_path, budget={"max_dft_calls": 60}))
    seeds = load_seeds(config)
    first, _ = derive_defaults(config, seeds)
    # A resume parses the saved JSON: every key is set, nothing is derived again.
    again, derived = derive_defaults(config_from_json(config_to_json(first)), seeds)
    assert derived == [] and again == first
    # The same file with more budget on the same run dir keeps the DIRECT size, hold-out, ξ sections and
    # rattles of the first start; the batch follows the new budget (100 − 3 − 21 − 9 − 9 = 58 → 19).
    more = config.model_copy(update={"budget": config.budget.model_copy(update={"max_dft_calls": 100})})
    restarted, lines = derive_defaults(more, seeds, saved=first)
    assert restarted.sampling.direct.n_select == first.sampling.direct.n_select == 21
    assert restarted.validation.holdout_size == first.validation.holdout_size == 9
    assert restarted.validation.profile == first.validation.profile and restarted.md.windows == first.md.windows
    assert restarted.sampling.pool == first.sampling.pool
    assert restarted.active_learning.batch_size == 19
    assert "sampling.direct.n_select: 21, kept from this run dir's saved config" in [i.line() for i in lines]


def test_thermal_rattles_follow_the_md_temperatures(tmp_path: Path) -> None:
    config, derived = _derived(_config_file(tmp_path, md={"temperatures": [300, 600]}))
    # σ = sqrt(k_B T / 10 eV/Å²) at 300, 600 and 1.25 × 600 K; k_B = 8.617333e-5 eV/K.
    expected = [round(math.sqrt(8.617333e-5 * t / 10.0), 4) for t in (300, 600, 750)]
    assert config.sampling.pool.rattle_amplitudes == pytest.approx(expected, abs=1e-4)
    assert derived["sampling.pool.rattle_amplitudes"].endswith("md.temperatures 300, 600 K and 1.25 × the highest")


def test_budget_split_keeps_given_sizes_and_never_gives_a_batch_below_one() -> None:
    split = budget_split(20, elements=3, max_iterations=3, profile=5, direct=15)
    assert (split.direct, split.holdout, split.batch, split.active_learning) == (15, 3, 1, -6)


def _cli(*args: str) -> tuple[int, list[str], str]:
    err, out = io.StringIO(), io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(out):
        code = main(list(args))
    return code, err.getvalue().strip().splitlines(), out.getvalue()


def test_config_check_prints_each_derived_value(tmp_path: Path) -> None:
    path = _config_file(tmp_path)
    code, errors, out = _cli("config", "check", str(path))
    assert code == EXIT_OK and errors == []
    lines = out.splitlines()
    assert lines[:5] == [
        "md.windows: derived from the seeds: atoms [4, 0, 5] (Cl4–C0 breaks, C0–Cl5 forms), ξ −1.5..1.5 Å, 13 windows",
        "validation.profile: derived from the seeds: atoms [4, 0, 5] (Cl4–C0 breaks, C0–Cl5 forms), ξ −1.5..1.5 Å, "
        "11 points (budget.max_dft_calls / 6, odd, 5 to 11)",
        "sampling.direct.n_select: 24, derived from budget.max_dft_calls 70 (35 %)",
        "validation.holdout_size: 10, derived from budget.max_dft_calls 70 (/ 7, 2 to 20)",
        "active_learning.batch_size: 7, derived from budget.max_dft_calls 70: 22 calls left after 3 isolated-atom "
        "energies, 24 DIRECT, 10 hold-out and 11 profile points, over validation.max_iterations 3",
    ]
    assert lines[5].startswith("sampling.pool.rattle_amplitudes: 0.0508, 0.0719, 0.0928, 0.1038 Å")
    assert lines[6].startswith(f"{path}: OK")


def test_the_readme_minimal_config_prints_what_the_readme_shows(tmp_path: Path) -> None:
    """README.md's recommended start: its YAML, beside the SN2 seeds, passes `config check`, which prints exactly
    the derived lines the README shows."""
    readme = (SN2_DIR.parents[1] / "README.md").read_text(encoding="utf-8")
    section = readme.split("## A minimal config", 1)[1]
    config_text = section.split("```yaml\n", 1)[1].split("```", 1)[0]
    shown = section.split("```text\n", 1)[1].split("```", 1)[0].splitlines()
    assert 5 <= len(config_text.splitlines()) <= 7
    shutil.copytree(SN2_DIR / "seeds", tmp_path / "seeds")
    path = tmp_path / "config.yaml"
    path.write_text(config_text, encoding="utf-8")
    code, errors, out = _cli("config", "check", str(path))
    assert code == EXIT_OK and errors == []
    assert out.splitlines()[:-1] == shown
