"""mace's own training options in a run (`mace_finetune.extra_args`): which ones the pipeline controls, how a
config value becomes mace's `--key=value`, and the check of key and value with mace's own argument parser.

Checked twice: by `pyacemaker config check` / `run` (preflight; only where mace is installed, since the client
may not have it) and by the trainer when it accepts a fine-tuning job (always). Both ask the parser of the mace
version installed (`mace.tools.build_default_arg_parser`), so an option is known exactly when that mace
knows it, and a value is good exactly when mace's own type and choices accept it.

Values travel as text (the trainer's job spec is a map of strings): numbers as Python writes them, booleans as
"true"/"false". For one of mace's flags (an option without a value, such as `--ema`), true gives the flag and
false leaves it out; a flag that is on whatever is given (mace's `--amsgrad`) cannot be turned off.
"""

from __future__ import annotations

import argparse
import difflib
import functools
import re
from collections.abc import Mapping

OptionValue = bool | int | float | str
# `key` in extra_args: mace's option name without the leading dashes.
OPTION_NAME = re.compile(r"^[A-Za-z][A-Za-z0-9_]*$")

_FILES = "the trainer names each member and puts its files in the job's directory"
_DATA = "the trainer writes each member's training (bootstrap) and validation sets itself"
_STRESS = "set by mace_finetune.stress_weight (the stress loss is used when the DFT set holds stresses)"
_REPLAY = "set by the trainer's multihead replay option"
# Options the pipeline sets itself, with the reason given when a config tries to set one.
RESERVED: dict[str, str] = {
    "name": _FILES,
    "work_dir": _FILES,
    "log_dir": _FILES,
    "model_dir": _FILES,
    "checkpoints_dir": _FILES,
    "results_dir": _FILES,
    "downloads_dir": _FILES,
    "seed": "each member's seed is derived from mace_finetune.random_seed (step 3) or active_learning.random_seed "
    "(step 2's committee)",
    "device": "set by mace_finetune.device",
    "train_file": _DATA,
    "valid_file": _DATA,
    "valid_fraction": _DATA,
    "test_file": _DATA,
    "test_dir": _DATA,
    "foundation_model": "the run's teacher (teacher.model) is the model fine-tuned",
    "E0s": "the trainer passes the teacher's isolated-atom energies and puts the labels' into the saved model",
    "energy_key": "the trainer writes the labels under its own keys",
    "forces_key": "the trainer writes the labels under its own keys",
    "stress_key": "the trainer writes the labels under its own keys",
    "max_num_epochs": "set by mace_finetune.epochs (step 3) and active_learning.finetune_epochs (step 2)",
    "stress_weight": _STRESS,
    "loss": _STRESS,
    "compute_stress": _STRESS,
    "multiheads_finetuning": _REPLAY,
    "pt_train_file": _REPLAY,
    "pt_valid_file": _REPLAY,
    "num_samples_pt": _REPLAY,
    "restart_latest": "the trainer resumes an interrupted job from its checkpoints itself",
    "save_cpu": "the trainer reads the saved models on the CPU",
    "config": "a mace YAML config would override the options the trainer sets",
    "dry_run": "no model would be trained",
    "distributed": "the trainer runs one training process per committee member",
    "launcher": "the trainer runs one training process per committee member",
    "help": "not a training option",
}

# The fine-tuning's own choices, which extra_args may override (the batch sizes, which depend on the size of the
# training set, are added by the trainer).
FINETUNE_DEFAULTS: dict[str, str] = {
    "lr": "0.01",
    "amsgrad": "true",
    "ema": "true",
    "ema_decay": "0.99",
    "default_dtype": "float64",
    "eval_interval": "1",
}


def option_text(value: OptionValue) -> str:
    """A config value as the text mace's parser gets: true/false for booleans, Python's repr for numbers."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float):
        return repr(value)
    return str(value)


def name_problem(key: str) -> str | None:
    """Why `key` cannot be an extra_args key without asking mace: not an option name, or one the pipeline sets."""
    if not OPTION_NAME.match(key):
        return "not a mace option name (write it without leading dashes, e.g. lr or batch_size)"
    if key in RESERVED:
        return f"not settable here: {RESERVED[key]}"
    return None


@functools.cache
def _parser() -> argparse.ArgumentParser:
    """mace's training argument parser, raising instead of exiting on a bad value."""
    from mace.tools import build_default_arg_parser

    parser = build_default_arg_parser()
    parser.exit_on_error = False
    return parser


def _action(key: str) -> argparse.Action | None:
    return _parser()._option_string_actions.get(f"--{key}")


def _is_flag(action: argparse.Action) -> bool:
    return action.nargs == 0


def value_problem(key: str, text: str) -> str | None:
    """Why mace refuses `--key=text` (unknown option, bad value), or None; imports mace."""
    problem = name_problem(key)
    if problem is not None:
        return problem
    action = _action(key)
    if action is None:
        known = sorted(option.removeprefix("--") for option in _parser()._option_string_actions)
        close = difflib.get_close_matches(key, known, n=1)
        return "mace has no such training option" + (f"; did you mean {close[0]!r}?" if close else "")
    if action.dest in RESERVED:
        return f"not settable here: {RESERVED[action.dest]}"
    if _is_flag(action):
        if text not in ("true", "false"):
            return f"mace's --{key} is a flag: give true (set it) or false (leave it out), got {text!r}"
        if text == "false" and action.default == action.const:
            return f"mace's --{key} is on whatever is given; it cannot be turned off"
        return None
    try:
        _parser().parse_args(["--name=check", f"--{key}={text}"])
    except argparse.ArgumentError as exc:
        return f"mace refuses the value {text!r}: {exc.message}"
    except (Exception, SystemExit) as exc:  # a type function of mace's that raises something else
        return f"mace refuses the value {text!r}: {exc}"
    return None


def option_problems(options: Mapping[str, OptionValue], prefix: str) -> list[tuple[str, str]]:
    """(key path, message) for every option mace's parser refuses, keys named `prefix`.key; imports mace."""
    problems = []
    for key, value in options.items():
        problem = value_problem(key, option_text(value))
        if problem is not None:
            problems.append((f"{prefix}.{key}", problem))
    return problems


def option_arguments(defaults: Mapping[str, str], extra: Mapping[str, str]) -> list[str]:
    """mace's command-line arguments for checked options (text values): `defaults` overridden by `extra`, an
    override matched by mace's destination (`stage_two_lr` replaces `swa_lr`); `--key=value`, or the bare flag
    for a flag set to true (a flag set to false is left out); imports mace."""
    chosen: dict[str, tuple[str, str, argparse.Action]] = {}
    for key, text in [*defaults.items(), *extra.items()]:
        action = _action(key)
        if action is None:
            raise ValueError(f"mace has no training option --{key}")
        chosen.pop(action.dest, None)
        chosen[action.dest] = (key, text, action)
    arguments = []
    for key, text, action in chosen.values():
        if not _is_flag(action):
            arguments.append(f"--{key}={text}")
        elif text == "true":
            arguments.append(f"--{key}")
    return arguments
