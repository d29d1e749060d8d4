"""Settings a config may leave out that follow from its seeds and its budget, filled in once, before a run.

A config of a name, the seeds, the charge, the DFT level and the budget is enough; what it leaves out is derived:

- `md.windows` and `validation.profile`, when absent and the first and the last seed differ in which bond is
  formed: ξ's atoms and range from the seeds as they are (pyacemaker.seed_builder's inference and bounds, the
  same as `pyacemaker seeds` prints; no relaxation). One seed, or seeds with the same bonds: none, plain MD.
- the split of `budget.max_dft_calls` (each key left at 0 is derived; given ones are kept and the rest fits
  around them): see `budget_split`.
- `sampling.pool.rattle_amplitudes`: the thermal amplitudes of `md.temperatures` (`thermal_rattle_amplitudes`).
- `teacher`, when the section is absent and the bundled teacher lacks an element of the seeds: `teacher.bootstrap`
  with its defaults (a small MACE trained in the run on GFN2-xTB labels), so a config for other elements needs no
  teacher of its own. A teacher section that is given is never changed (`config check` then says what it lacks).

`pyacemaker config check` prints each derived value; `pyacemaker run` sends the config with them filled in and
the orchestrator saves that, so a resumed run (`run --resume`) uses the same values. A config that went through
here once (a saved one) has every key set and is not derived again; a config file started again on a run dir
keeps the dir's saved values for the keys that choose structures (see `derive_defaults`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from ase import Atoms

from pyacemaker.config import (
    MdWindowsConfig,
    ReactionPathConfig,
    RunConfig,
    TeacherBootstrapConfig,
    TeacherConfig,
    XtbOracleConfig,
    thermal_rattle_amplitudes,
)
from pyacemaker.structure_checks import element_names

# The budget rule (B = budget.max_dft_calls). Measured on the SN2 flagship at B = 70 (3 elements, B3LYP): 24
# DIRECT, 10 hold-out and 11 profile points, 22 calls left for active learning, scored 7.3 meV/atom and 96.5 meV/Å
# on its hold-out in iteration 1; the old defaults (50 DIRECT, 10 hold-out, no profile: 5 calls left for active
# learning) scored 107 meV/atom and 212 meV/Å on the same budget. A third of the budget for DIRECT leaves the loop
# enough calls to label where the committee is unsure.
DIRECT_SHARE = 0.35
# Hold-out: B / 7 (10 of 70), at least 2 (an RMSE over one structure says nothing), at most 20 (beyond that the
# RMSE's statistical error is below the iteration-to-iteration change it must judge).
HOLDOUT_PER_CALL = 1 / 7
HOLDOUT_MIN, HOLDOUT_MAX = 2, 20
# Profile points along ξ: B / 6, odd (one on the middle of the range), 5 to 11 (11 of 70; 0.3 Å apart on
# the SN2 range of 3 Å, closer than the barrier region's width).
PROFILE_PER_CALL = 1 / 6
PROFILE_MIN, PROFILE_MAX = 5, 11
# The level a derived teacher.bootstrap learns from (TeacherBootstrapConfig's default oracle).
BOOTSTRAP_LEVEL = XtbOracleConfig(backend="xtb").method


@dataclass(frozen=True)
class BudgetSplit:
    """How budget.max_dft_calls is spent: one isolated-atom energy per element, the DIRECT set, the hold-out and
    the profile points (iteration 1), and `active_learning` calls left, at most `batch` per iteration."""

    budget: int
    elements: int
    direct: int
    holdout: int
    profile: int
    batch: int

    @property
    def active_learning(self) -> int:
        return self.budget - self.elements - self.direct - self.holdout - self.profile


def profile_points(max_dft_calls: int) -> int:
    """The number of profile points the budget rule gives: B / 6, odd, between PROFILE_MIN and PROFILE_MAX."""
    count = min(PROFILE_MAX, max(PROFILE_MIN, int(max_dft_calls * PROFILE_PER_CALL)))
    return count if count % 2 else count - 1


def budget_split(
    max_dft_calls: int,
    elements: int,
    max_iterations: int,
    profile: int,
    direct: int = 0,
    holdout: int = 0,
    batch: int = 0,
) -> BudgetSplit:
    """The split of `max_dft_calls` DFT calls: the given sizes (non-zero) are kept, the others follow the rule
    DIRECT = 35 % of the budget (at least 2), hold-out = budget / 7 (2 to 20), and the active-learning batch =
    what is left after the isolated-atom energies (`elements`), DIRECT, the hold-out and the `profile` points,
    divided over `max_iterations`, at least 1. The rule does not check that the given sizes fit (preflight does)."""
    direct = direct or max(2, int(DIRECT_SHARE * max_dft_calls))
    holdout = holdout or min(HOLDOUT_MAX, max(HOLDOUT_MIN, round(max_dft_calls * HOLDOUT_PER_CALL)))
    left = max_dft_calls - elements - direct - holdout - profile
    batch = batch or max(1, left // max_iterations)
    return BudgetSplit(max_dft_calls, elements, direct, holdout, profile, batch)


@dataclass(frozen=True)
class Derived:
    """One derived setting: the config key and what it was set to, and from what."""

    key: str
    text: str

    def line(self) -> str:
        return f"{self.key}: {self.text}"


def _range_text(start: float, stop: float) -> str:
    return f"ξ {start:.1f}..{stop:.1f} Å".replace("-", "−")


def _section_text(section: MdWindowsConfig | ReactionPathConfig | None, seeds: Sequence[Atoms], unit: str) -> str:
    """ "atoms [4, 0, 5] (Cl4–C0 breaks, C0–Cl5 forms), ξ −1.5..1.5 Å, 13 windows", or "none"."""
    from pyacemaker.seed_builder import bond_change_text

    if section is None:
        return "none"
    bonds = f" ({bond_change_text(seeds[0], section.atoms)})" if seeds and max(section.atoms) < len(seeds[0]) else ""
    return f"atoms {list(section.atoms)}{bonds}, {_range_text(section.start, section.stop)}, {section.count} {unit}"


# What a line says of a value taken from the run dir's saved config instead of derived again.
KEPT = "kept from this run dir's saved config"


def derive_defaults(
    config: RunConfig, seeds: Sequence[Atoms], saved: RunConfig | None = None
) -> tuple[RunConfig, list[Derived]]:
    """`config` with the settings it leaves out derived from `seeds` (as load_seeds reads them) and its budget
    (see the module docstring), and one Derived per setting filled in. Keys that are set are never changed.

    `saved`: the config the run dir was last started with. Its values are kept for the keys left out that decide
    which structures are sampled and labelled (md.windows, validation.profile, sampling.direct.n_select,
    validation.holdout_size, sampling.pool.rattle_amplitudes), so a run started again with more budget or
    iterations continues instead of redoing step 1 with another selection; the active-learning batch is derived
    from the new budget."""
    from pyacemaker import seed_builder

    derived: list[Derived] = []
    md, validation = config.md, config.validation
    windows_absent = "windows" not in md.model_fields_set
    profile_absent = "profile" not in validation.model_fields_set
    if saved is not None and not all(
        section is None or max(section.atoms) < min(len(atoms) for atoms in seeds)
        for section in (saved.md.windows, saved.validation.profile)
    ):
        saved = None  # the seeds changed under the run dir: its ξ no longer fits them
    if saved is not None:
        if windows_absent:
            md = md.model_copy(update={"windows": saved.md.windows})
            derived.append(Derived("md.windows", f"{KEPT}: {_section_text(md.windows, seeds, 'windows')}"))
        if profile_absent:
            validation = validation.model_copy(update={"profile": saved.validation.profile})
            derived.append(
                Derived("validation.profile", f"{KEPT}: {_section_text(validation.profile, seeds, 'points')}")
            )
    else:
        reaction = seed_builder.seeds_reaction_coordinate(seeds[0], seeds[-1]) if seeds else None
        if reaction is not None:
            windows, profile = seed_builder.reaction_coordinate_sections(
                *reaction, profile_points(config.budget.max_dft_calls)
            )
            if windows_absent:
                md = md.model_copy(update={"windows": windows})
                derived.append(
                    Derived("md.windows", f"derived from the seeds: {_section_text(windows, seeds, 'windows')}")
                )
            if profile_absent:
                validation = validation.model_copy(update={"profile": profile})
                derived.append(
                    Derived(
                        "validation.profile",
                        f"derived from the seeds: {_section_text(profile, seeds, 'points')} "
                        "(budget.max_dft_calls / 6, odd, 5 to 11)",
                    )
                )

    budget = config.budget.max_dft_calls
    direct, learning = config.sampling.direct, config.active_learning
    if saved is not None:
        if direct.n_select == 0:
            direct = direct.model_copy(update={"n_select": saved.sampling.direct.n_select})
            derived.append(Derived("sampling.direct.n_select", f"{direct.n_select}, {KEPT}"))
        if validation.holdout_size == 0:
            validation = validation.model_copy(update={"holdout_size": saved.validation.holdout_size})
            derived.append(Derived("validation.holdout_size", f"{validation.holdout_size}, {KEPT}"))
    split = budget_split(
        budget,
        elements=len({int(z) for atoms in seeds for z in atoms.numbers}),
        max_iterations=validation.max_iterations,
        profile=validation.profile.count if validation.profile is not None else 0,
        direct=direct.n_select,
        holdout=validation.holdout_size,
        batch=learning.batch_size,
    )
    if direct.n_select == 0:
        direct = direct.model_copy(update={"n_select": split.direct})
        derived.append(
            Derived("sampling.direct.n_select", f"{split.direct}, derived from budget.max_dft_calls {budget} (35 %)")
        )
    if validation.holdout_size == 0:
        validation = validation.model_copy(update={"holdout_size": split.holdout})
        derived.append(
            Derived(
                "validation.holdout_size",
                f"{split.holdout}, derived from budget.max_dft_calls {budget} (/ 7, 2 to 20)",
            )
        )
    if learning.batch_size == 0:
        learning = learning.model_copy(update={"batch_size": split.batch})
        derived.append(
            Derived(
                "active_learning.batch_size",
                f"{split.batch}, derived from budget.max_dft_calls {budget}: {max(split.active_learning, 0)} calls "
                f"left after {split.elements} isolated-atom energies, {split.direct} DIRECT, {split.holdout} hold-out "
                f"and {split.profile} profile points, over validation.max_iterations {validation.max_iterations}",
            )
        )

    pool = config.sampling.pool
    if pool.rattle_amplitudes is None:
        if saved is not None and saved.sampling.pool.rattle_amplitudes is not None:
            amplitudes, why = saved.sampling.pool.rattle_amplitudes, KEPT
        else:
            amplitudes = thermal_rattle_amplitudes(md.temperatures)
            temperatures = ", ".join(f"{t:g}" for t in md.temperatures)
            why = f"the thermal amplitudes of md.temperatures {temperatures} K and 1.25 × the highest"
        pool = pool.model_copy(update={"rattle_amplitudes": amplitudes})
        derived.append(
            Derived("sampling.pool.rattle_amplitudes", f"{', '.join(f'{a:g}' for a in amplitudes)} Å, {why}")
        )

    update = {"md": md, "validation": validation, "active_learning": learning}
    if "teacher" not in config.model_fields_set:
        missing = bundled_teacher_missing(seeds)
        if missing:
            update["teacher"] = TeacherConfig(bootstrap=TeacherBootstrapConfig())
            derived.append(
                Derived(
                    "teacher.bootstrap",
                    f"derived: the bundled teacher does not know {element_names(missing)} of the seeds, so step 0 "
                    f"trains a small MACE teacher on {BOOTSTRAP_LEVEL} labels of structures around "
                    "them (set teacher.model to a MACE file of your own instead)",
                )
            )

    update["sampling"] = config.sampling.model_copy(update={"pool": pool, "direct": direct})
    return config.model_copy(update=update), derived


def bundled_teacher_missing(seeds: Sequence[Atoms]) -> list[int]:
    """The atomic numbers of `seeds` that the bundled teacher does not know (none when it cannot be read: then
    `config check` names the problem with the bundled file itself)."""
    from pyacemaker.teacher.elements import ModelElementsError, missing_elements
    from pyacemaker.teacher.resolve import BUNDLED_MODEL

    try:
        return missing_elements(BUNDLED_MODEL, seeds)
    except ModelElementsError:
        return []
