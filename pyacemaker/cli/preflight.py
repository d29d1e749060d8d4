"""What a valid config can still get wrong, found before a run starts instead of hours into it.

`pyacemaker config check` and `pyacemaker run` call `preflight` after the config and its seeds have loaded
(the config's own validation and pyacemaker.seeds already refuse bad keys, values, files and atom indices).
Each problem is one line naming the key and the fix, elements by symbol:

- the teacher: a foundation-model name that is not in mace's cache (the line says which file to put where), a
  model file that is not a MACE model, and seed elements the teacher does not know;
- the DFT level: a PySCF functional or basis name PySCF cannot parse (with the closest known name), a basis
  without functions for an element of the seeds;
- mace's own options (mace_finetune.extra_args): each key and value through the installed mace's argument parser
  (an unknown option, with the closest known one; a value mace's type or choices refuse); where mace is not
  installed, a warning that only the trainer will check them;
- the budget: too small for the isolated-atom energies, the validation's DFT labels and a committee's two DIRECT
  labels, or for the whole DIRECT set besides them (fatal: selected structures would never be labelled; the
  README's old minimal config, 60 DIRECT on 60 calls, was such a case); too small for one active-learning batch
  besides them (a warning: the run works, but learns nothing actively). The sizes left out of a config are
  derived to fit (pyacemaker.config_defaults) before this runs;
- with `installed_extras`: software the config needs that this environment lacks (a nonlinear ACE without
  TensorFlow). `run` leaves this one out: the trainer that fits may live elsewhere, with its own packages.
"""

from __future__ import annotations

import difflib
import importlib.util
import sys
import warnings
from collections.abc import Sequence
from dataclasses import dataclass

from ase import Atoms
from ase.data import chemical_symbols

from pyacemaker.config import MaceOracleConfig, PyscfOracleConfig, RunConfig
from pyacemaker.run_layout import StepName
from pyacemaker.structure_checks import element_names
from pyacemaker.teacher.elements import ModelElementsError, model_elements, seed_elements
from pyacemaker.teacher.resolve import BUNDLED_NAME, TeacherNotFoundError, is_model_name, resolve_teacher

# Where the foundation-model names are listed for users.
FOUNDATION_MODELS_DOC = "docs/configuration.md#teacher-models"


@dataclass(frozen=True)
class Problem:
    """One finding: `key` is the config key to change, `message` what is wrong and how to fix it."""

    key: str
    message: str
    fatal: bool = True

    def line(self, source: str) -> str:
        return f"{source}: {self.key}: {self.message}"


def preflight(config: RunConfig, seeds: Sequence[Atoms], installed_extras: bool = True) -> list[Problem]:
    """Every problem found, fatal ones first (see the module docstring)."""
    problems = [
        *teacher_problems(config, seeds),
        *oracle_model_problems(config),
        *dft_name_problems(config, seeds),
        *mace_option_problems(config),
        *budget_problems(config, seeds),
        *(extras_problems(config) if installed_extras else []),
    ]
    return sorted(problems, key=lambda problem: not problem.fatal)


def preflight_errors(
    config: RunConfig, seeds: Sequence[Atoms], source: str, installed_extras: bool = True
) -> str | None:
    """Run `preflight`, print its warnings to stderr; the fatal problems as one message, a line each (the CLI's
    `fail` prefixes the first with "error: "), or None when there are none."""
    problems = preflight(config, seeds, installed_extras)
    for problem in problems:
        if not problem.fatal:
            print(f"warning: {problem.line(source)}", file=sys.stderr)
    fatal = [problem.line(source) for problem in problems if problem.fatal]
    return "\nerror: ".join(fatal) or None


def teacher_problems(config: RunConfig, seeds: Sequence[Atoms]) -> list[Problem]:
    """teacher.model must resolve to a MACE file here and know every element of the seeds (a bootstrapped
    teacher is trained on the seeds' elements)."""
    if config.teacher.bootstrap is not None:
        return []
    name = config.teacher.model
    try:
        path = resolve_teacher(name)
        known = model_elements(path)
    except (TeacherNotFoundError, ModelElementsError) as exc:
        return [Problem("teacher.model", str(exc))]
    wanted = seed_elements(seeds)
    missing = sorted(set(wanted) - set(known))
    if not missing:
        return []
    where = next(str(atoms.info.get("source", "a seed")) for atoms in seeds if missing[0] in atoms.numbers)
    teacher = f"the bundled teacher ({path})" if name == BUNDLED_NAME else f"the teacher {path}"
    return [
        Problem(
            "teacher.model",
            f"{teacher} knows {element_names(known)}, but the seeds also contain {element_names(missing)} "
            f"({chemical_symbols[missing[0]]} in {where}); set teacher.model to a MACE model file or a foundation "
            f"model ({FOUNDATION_MODELS_DOC}) that covers {element_names(wanted)}, "
            "or add `teacher: {bootstrap: {}}` to train one from GFN2-xTB in the run",
        )
    ]


def oracle_model_problems(config: RunConfig) -> list[Problem]:
    """oracle.models of the mace backend: each name must be in mace's cache (files are checked on load)."""
    if not isinstance(config.oracle, MaceOracleConfig):
        return []
    problems = []
    for index, entry in enumerate(config.oracle.models):
        if not is_model_name(str(entry)):
            continue
        try:
            resolve_teacher(str(entry))
        except TeacherNotFoundError as exc:
            problems.append(Problem(f"oracle.models.{index}", str(exc)))
    return problems


def dft_name_problems(config: RunConfig, seeds: Sequence[Atoms]) -> list[Problem]:
    """PySCF's functional and basis: the names PySCF parses, and a basis with functions for every element."""
    oracle = config.oracle
    if not isinstance(oracle, PyscfOracleConfig):
        return []
    try:
        from pyscf.dft import libxc
        from pyscf.gto import basis as pyscf_basis
    except ImportError:  # the oracle's host has PySCF; this one does not, so only the oracle can tell
        return []
    problems = []
    try:
        libxc.parse_xc(oracle.functional)
    except Exception as exc:  # PySCF's parser raises KeyError, NotImplementedError, ValueError, ...
        reason = exc.args[0] if exc.args else type(exc).__name__
        known = {*libxc.XC_ALIAS, *(code.split("_XC_", 1)[1] for code in libxc.XC_CODES if "_XC_" in code)}
        problems.append(
            Problem(
                "oracle.functional",
                f"PySCF cannot use the functional {oracle.functional!r} ({reason})"
                + _suggestion(oracle.functional.upper(), known),
            )
        )
    symbols = sorted({atoms.symbols[i] for atoms in seeds for i in range(len(atoms))}, key=chemical_symbols.index)
    lacking, unknown_name = [], False
    with warnings.catch_warnings():  # PySCF suggests installing basis-set-exchange for every name it lacks
        warnings.simplefilter("ignore")
        for symbol in symbols:
            try:
                pyscf_basis.load(oracle.basis, symbol)
            except Exception as exc:  # BasisNotFoundError (a RuntimeError), KeyError, ...
                unknown_name = unknown_name or "not found for" not in str(exc)
                lacking.append(symbol)
    if unknown_name:
        normalised = oracle.basis.lower().replace("-", "").replace("_", "").replace(" ", "")
        problems.append(
            Problem(
                "oracle.basis",
                f"PySCF does not know the basis {oracle.basis!r}" + _suggestion(normalised, pyscf_basis.ALIAS),
            )
        )
    elif lacking:
        problems.append(
            Problem(
                "oracle.basis",
                f"PySCF's {oracle.basis!r} has no functions for {', '.join(lacking)}, which the seeds contain; "
                "choose a basis that covers every element (def2 bases cover H-Rn)",
            )
        )
    return problems


def _suggestion(name: str, known: object) -> str:
    """ "; did you mean 'X'?" with the closest of `known` (an iterable of names), or a hint where none is close."""
    close = difflib.get_close_matches(name, sorted(known), n=1, cutoff=0.6)  # type: ignore[call-overload]
    return f"; did you mean {close[0]!r}?" if close else "; use a name PySCF knows (see PySCF's documentation)"


def mace_option_problems(config: RunConfig) -> list[Problem]:
    """mace_finetune.extra_args through mace's own parser (the config refused the option names the pipeline sets
    already); imports mace only when there are some."""
    extra = config.mace_finetune.extra_args
    if not extra:
        return []
    if importlib.util.find_spec("mace") is None:
        return [
            Problem(
                "mace_finetune.extra_args",
                "not checked here (mace is not installed in this environment); the trainer checks them when the "
                "fine-tuning starts",
                fatal=False,
            )
        ]
    from pyacemaker.mace_options import option_problems

    return [Problem(key, message) for key, message in option_problems(extra, "mace_finetune.extra_args")]


def budget_problems(config: RunConfig, seeds: Sequence[Atoms]) -> list[Problem]:
    """The DFT budget against what the run charges to it before active learning can pick anything: one
    isolated-atom energy per element, the DIRECT set (step 1's selection, labelled in step 2) and the
    validation's labels (kept free from iteration 1 on)."""
    if config.stop_after == StepName.DIRECT_SAMPLING:  # no DFT at all
        return []
    budget = config.budget.max_dft_calls
    n_elements = len({int(z) for atoms in seeds for z in atoms.numbers})
    validation = config.validation.dft_labels()
    n_select = config.sampling.direct.n_select
    left = budget - n_elements - validation
    spent_on = (
        f"{n_elements} isolated-atom energies and {validation} validation labels (validation.holdout_size"
        f"{' + validation.profile.count' if config.validation.profile is not None else ''})"
    )
    if left < 2:
        return [
            Problem(
                "budget.max_dft_calls",
                f"{budget} DFT calls leave {max(left, 0)} for the DIRECT set after {spent_on}, and the committee "
                f"needs 2: raise it to at least {n_elements + validation + 2} "
                f"({n_elements + validation + n_select} labels the whole DIRECT set of sampling.direct.n_select)",
            )
        ]
    if n_select > left:
        profile = config.validation.profile
        parts = [
            f"{n_select} DIRECT structures",
            f"{n_elements} isolated-atom energies",
            f"{config.validation.holdout_size} hold-out (validation.holdout_size)",
            *([f"{profile.count} profile points (validation.profile.count)"] if profile is not None else []),
        ]
        total = n_elements + validation + n_select
        batch = config.active_learning.batch_size
        return [
            Problem(
                "sampling.direct.n_select",
                f"{' + '.join(parts)} = {total} DFT calls, more than budget.max_dft_calls {budget}: lower "
                f"sampling.direct.n_select to at most {left} ({max(2, left - batch)} leaves one active-learning "
                f"batch of {batch}) or raise budget.max_dft_calls to at least {total}",
            )
        ]
    batch = config.active_learning.batch_size
    if left - n_select < batch:
        return [
            Problem(
                "budget.max_dft_calls",
                f"{budget} DFT calls leave {left - n_select} for active learning after {spent_on} and the "
                f"{n_select} DIRECT labels, less than one batch (active_learning.batch_size {batch}); raise it to "
                f"at least {n_elements + validation + n_select + batch}",
                fatal=False,
            )
        ]
    return []


def extras_problems(config: RunConfig) -> list[Problem]:
    """Packages the config needs that this environment does not have."""
    if config.ace.model_kind != "nonlinear":
        return []
    from pyacemaker.services.trainer.pacemaker_nonlinear import TENSORFLOW_EXTRA_INSTALL, tensorflow_missing

    missing = tensorflow_missing()
    if missing is None:
        return []
    return [
        Problem(
            "ace.model_kind",
            f"'nonlinear' fits with pacemaker, which needs TensorFlow, and this environment lacks {missing}; use "
            f"'linear' (the default, no TensorFlow) or install them into the trainer's environment: "
            f"{TENSORFLOW_EXTRA_INSTALL}",
        )
    ]
