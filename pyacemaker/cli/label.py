"""`pyacemaker label`: label a structure file with an oracle backend, streaming, with a progress bar.

Each labelled frame is appended to the output as soon as it (and every frame before it) has arrived, so a run
that dies half way keeps what it finished. Failed structures are written too, marked `label_status=failed`
with their `label_reason`, so the output lines up frame by frame with the input.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

import grpc
from ase import Atoms
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

from pyacemaker.cli.main import EXIT_BAD_INPUT, EXIT_FAILED, EXIT_OK, EXIT_UNAVAILABLE, fail
from pyacemaker.labels import Labels
from pyacemaker.rpc import channel, describe_rpc_error
from pyacemaker.structure_checks import StructureCheckError, check_structure
from pyacemaker.structures import CHARGE_KEY, SPIN_KEY, StructureFileError, attach_labels, read_structures, write_extxyz
from pyacemaker.v1 import oracle_pb2
from pyacemaker.yaml_input import YamlInputError, load_yaml_text

_EXIT_FOR_STATUS = {grpc.StatusCode.UNAVAILABLE: EXIT_UNAVAILABLE, grpc.StatusCode.INVALID_ARGUMENT: EXIT_BAD_INPUT}


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "label",
        help="label structures (energy, forces, stress) with an oracle backend",
        description="Stream the frames of a structure file to the oracle service and write them, labelled, "
        "as extxyz. Energies in eV, forces in eV/Å, stresses in eV/Å³.",
    )
    parser.add_argument("input", type=Path, help="structure file (xyz, extxyz or anything ASE reads)")
    parser.add_argument(
        "-o", "--output", type=Path, required=True, help="extxyz file to write (replaced once the first label arrives)"
    )
    parser.add_argument("--backend", required=True, help="oracle backend, e.g. xtb or lj")
    parser.add_argument(
        "--option",
        action="append",
        default=[],
        type=_parse_option,
        metavar="KEY=VALUE",
        help="backend option (repeatable), e.g. --option method=GFN1-xTB; values are read as YAML scalars",
    )
    parser.add_argument(
        "--executor",
        choices=("local", "slurm", "pbs"),
        help="where each calculation runs: a local process pool, or Slurm / PBS array jobs (sets the backend "
        "option `executor`; DFT backends default to local)",
    )
    parser.add_argument(
        "--executor-option",
        action="append",
        default=[],
        type=_parse_option,
        metavar="KEY=VALUE",
        help="executor setting (repeatable), e.g. --executor-option partition=short --executor-option "
        "array_throttle=16; see `oracle.executor` in docs/configuration.md",
    )
    parser.add_argument("--charge", type=int, help="total charge of every structure (default: from the file, else 0)")
    parser.add_argument(
        "--spin-multiplicity",
        type=int,
        help="2S+1 of every structure (default: from the file, else the lowest the electron count allows)",
    )
    parser.add_argument("--oracle", metavar="HOST:PORT", help="oracle address (default: the local deployment's)")
    parser.add_argument("--batch-size", type=int, default=16, help="structures per request (default: 16)")
    parser.add_argument("--timeout", type=float, help="deadline for the whole stream, s (default: none)")
    parser.set_defaults(handler=run_label)


def _parse_option(text: str) -> tuple[str, Any]:
    key, sep, value = text.partition("=")
    if not sep or not key.strip():
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got {text!r}")
    try:  # as in a config file: 1e-9 is a number
        parsed = load_yaml_text(value, f"--option {key.strip()}") if value.strip() else value
    except YamlInputError:
        parsed = value  # not a YAML scalar: keep the text and let the oracle judge it
    return key.strip(), parsed


class _UnexpectedResultError(RuntimeError):
    """The oracle answered with an index it was never asked about, or twice for one structure."""


class _OrderedWriter:
    """Appends frames to the output in input order, holding back results that arrive early."""

    def __init__(self, path: Path, frames: list[Atoms]) -> None:
        self.path = path
        self.frames = frames
        self.pending: dict[int, Labels] = {}
        self.next_index = 0
        self.seen: set[int] = set()

    def add(self, index: int, labels: Labels) -> None:
        if not 0 <= index < len(self.frames) or index in self.seen:
            raise _UnexpectedResultError(f"oracle returned an unexpected result index {index}")
        self.seen.add(index)
        self.pending[index] = labels
        while self.next_index in self.pending:
            atoms = attach_labels(self.frames[self.next_index], self.pending.pop(self.next_index))
            # The first frame replaces an existing output; an oracle that never answers leaves it alone.
            if self.next_index == 0:
                self.path.parent.mkdir(parents=True, exist_ok=True)
            write_extxyz(self.path, [atoms], append=self.next_index > 0)
            self.next_index += 1


def run_label(args: argparse.Namespace) -> int:
    from pyacemaker.artifacts import ArtifactStore
    from pyacemaker.clients.oracle import backend_spec, model_files_as_artifacts, stream_labels
    from pyacemaker.deploy.local import service_address, store_dir
    from pyacemaker.teacher.resolve import TeacherNotFoundError

    try:
        frames = read_structures(args.input)
    except StructureFileError as exc:
        return fail(str(exc), EXIT_BAD_INPUT)
    if args.output.resolve() == args.input.resolve():
        return fail(f"{args.output}: the output would overwrite the input", EXIT_BAD_INPUT)
    if args.batch_size < 1:
        return fail(f"--batch-size must be at least 1, got {args.batch_size}", EXIT_BAD_INPUT)
    if args.spin_multiplicity is not None and args.spin_multiplicity < 1:
        return fail(f"--spin-multiplicity must be at least 1, got {args.spin_multiplicity}", EXIT_BAD_INPUT)
    for index, atoms in enumerate(frames):
        if args.charge is not None:
            atoms.info[CHARGE_KEY] = args.charge
        if args.spin_multiplicity is not None:
            atoms.info[SPIN_KEY] = args.spin_multiplicity
        try:
            check_structure(atoms)
        except StructureCheckError as exc:
            return fail(f"{args.input}: frame {index}: {exc}", EXIT_BAD_INPUT)
    options = dict(args.option)
    if args.executor_option and args.executor is None:
        return fail("--executor-option needs --executor", EXIT_BAD_INPUT)
    if args.executor is not None:
        options["executor"] = {"kind": args.executor, **dict(args.executor_option)}
    try:
        # The oracle loads model files (mace `models`, ace `potential`) only from the shared store.
        if {"models", "potential"} & options.keys():
            options = model_files_as_artifacts(args.backend, options, ArtifactStore(store_dir()))
    except (TeacherNotFoundError, OSError) as exc:
        return fail(f"backend options: {exc}", EXIT_BAD_INPUT)
    try:
        spec = backend_spec(args.backend, options)
    except ValueError as exc:
        return fail(f"backend options cannot be sent: {exc}", EXIT_BAD_INPUT)

    address = args.oracle or service_address("oracle")
    writer = _OrderedWriter(args.output, frames)
    failures: list[tuple[int, str]] = []
    progress = Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        console=Console(stderr=True),
    )
    try:
        with channel(address) as oracle, progress:
            task = progress.add_task(f"labelling with {args.backend}", total=len(frames))

            def show_submission(submission: oracle_pb2.Submission) -> None:
                verb = "re-attached to" if submission.reattached else "submitted"
                count = len(submission.indices)
                progress.console.print(
                    f"{verb} {submission.scheduler} job {submission.job_id} ({count} structure{'s' * (count != 1)})"
                )

            stream = stream_labels(oracle, spec, frames, args.batch_size, args.timeout, on_submission=show_submission)
            for index, labels in stream:
                if not labels.ok:
                    failures.append((index, labels.reason))
                writer.add(index, labels)
                progress.advance(task)
    except grpc.RpcError as exc:
        return fail(describe_rpc_error(exc, address), _EXIT_FOR_STATUS.get(exc.code(), EXIT_FAILED))
    except (_UnexpectedResultError, ValueError) as exc:  # ValueError: a malformed answer (stream_labels)
        return fail(str(exc), EXIT_FAILED)

    if writer.next_index < len(frames):
        return fail(f"the oracle answered {writer.next_index} of {len(frames)} structures", EXIT_FAILED)
    print(f"labelled {len(frames) - len(failures)} of {len(frames)} structures -> {args.output}", file=sys.stderr)
    if failures:
        lines = [f"  structure {index}: {reason}" for index, reason in sorted(failures)]
        print(f"error: {len(failures)} of {len(frames)} structures failed:", *lines, sep="\n", file=sys.stderr)
        return EXIT_FAILED
    return EXIT_OK
