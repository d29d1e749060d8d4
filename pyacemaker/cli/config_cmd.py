"""`pyacemaker config schema` and `pyacemaker config check FILE`."""

from __future__ import annotations

import argparse
import json

from pyacemaker.cli.main import EXIT_BAD_INPUT, EXIT_OK, fail
from pyacemaker.cli.preflight import preflight_errors
from pyacemaker.cli.run import saved_run_config
from pyacemaker.config import ConfigError, json_schema, load_config
from pyacemaker.config_defaults import derive_defaults
from pyacemaker.seeds import load_seeds
from pyacemaker.structures import StructureFileError


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("config", help="print the config schema or check a config file")
    actions = parser.add_subparsers(dest="action", required=True, metavar="ACTION")
    schema = actions.add_parser("schema", help="print the JSON schema of the run config")
    schema.set_defaults(handler=run_schema)
    check = actions.add_parser(
        "check",
        help="validate a config file and its seeds, and find what would fail at run time",
        description="Validate a config file and read its seed structures, then check what a valid config can still "
        "get wrong, on this machine: the teacher (present, and knowing every seed element), the PySCF functional "
        "and basis names, the DFT budget against the DIRECT set and the hold-out, and the packages the config needs "
        "(TensorFlow for a nonlinear ACE). Prints each setting the config leaves out that is derived from the seeds "
        "or the budget (md.windows, validation.profile, the budget's split, the pool's rattles), one line each. "
        "Exit 2 with one line per problem, naming the key and the fix; warnings are printed and do not change the "
        "exit code.",
    )
    check.add_argument("file", help="YAML config")
    check.set_defaults(handler=run_check)


def run_schema(args: argparse.Namespace) -> int:
    print(json.dumps(json_schema(), indent=2))
    return EXIT_OK


def run_check(args: argparse.Namespace) -> int:
    try:
        config = load_config(args.file)
    except (ConfigError, StructureFileError) as exc:
        return fail(str(exc), EXIT_BAD_INPUT)
    try:
        seeds = load_seeds(config)
    except ConfigError as exc:  # a key of this file that the seeds contradict
        return fail(f"{args.file}: {exc}", EXIT_BAD_INPUT)
    except StructureFileError as exc:  # names the seed file
        return fail(str(exc), EXIT_BAD_INPUT)
    config, derived = derive_defaults(config, seeds, saved_run_config(config.run_dir))
    for setting in derived:
        print(setting.line())
    refused = preflight_errors(config, seeds, args.file)
    if refused:
        return fail(refused, EXIT_BAD_INPUT)
    print(
        f"{args.file}: OK — run {config.name!r}, {len(seeds)} seed structures, charge {config.system.charge}, "
        f"oracle {config.oracle.backend}, outputs in {config.run_dir}"
    )
    return EXIT_OK
