"""Entry point of the `pyacemaker` console script: parses arguments and dispatches to one command module.

Each command module has `register(subparsers)`, which adds its parser and sets `handler(args) -> exit code`.
Exit codes: 0 success, 1 the work failed, 2 bad input (config, file, arguments), 3 a service is unreachable.
"""

from __future__ import annotations

import argparse
import sys

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_BAD_INPUT = 2
EXIT_UNAVAILABLE = 3


def build_parser() -> argparse.ArgumentParser:
    from pyacemaker import __version__
    from pyacemaker.cli import config_cmd, label, report, run, seeds_cmd, services_cmd, status

    parser = argparse.ArgumentParser(
        prog="pyacemaker", description="Distil a MACE teacher into a fast, DFT-corrected ACE potential."
    )
    parser.add_argument("--version", action="version", version=f"pyacemaker {__version__}")
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for module in (services_cmd, run, status, report, label, config_cmd, seeds_cmd):
        module.register(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    from pyacemaker.rpc import SecurityConfigError

    try:
        return int(args.handler(args))
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except SecurityConfigError as exc:  # PYACEMAKER_TLS_* / PYACEMAKER_TOKEN_FILE, read by every client
        return fail(str(exc), EXIT_BAD_INPUT)


def fail(message: str, code: int) -> int:
    """Print one clear error line and return the exit code."""
    print(f"error: {message}", file=sys.stderr)
    return code


if __name__ == "__main__":
    sys.exit(main())
