"""A fuzz campaign against `pyacemaker config check`: many clearly invalid configs and seed files (and some
valid ones), each checked in a forked child with a wall-time limit and a 4 GB address-space limit, counted by
outcome: refused with one line naming the key or file (exit 2), accepted though invalid, traceback, hang.

    python benchmarks/config_fuzz_campaign.py --cases 3000 --seed 0            # the code of this checkout
    python benchmarks/config_fuzz_campaign.py --code /path/to/other/checkout    # another checkout's code

The inputs come from tests/fuzz_inputs.py (the same generators the hypothesis tests draw from), so a campaign
with the same seed tries the same inputs against any checkout.
"""

from __future__ import annotations

import argparse
import collections
import importlib.util
import json
import os
import random
import resource
import select
import signal
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]


def _load_inputs(code: Path, generators: Path) -> Any:
    sys.path.insert(0, str(code))
    spec = importlib.util.spec_from_file_location("fuzz_inputs", generators)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules["fuzz_inputs"] = module
    spec.loader.exec_module(module)
    import ase.io
    import ase.io.extxyz

    import pyacemaker.cli.main

    pyacemaker.cli.main.build_parser()  # imports every command module before the first fork
    ase.io.read(str(REPO / "examples" / "sn2" / "seeds" / "reactant_complex.xyz"))  # ASE's lazy imports too
    return module


def _check_in_child(inputs: Any, path: Path, timeout_s: float) -> dict[str, Any]:
    """Fork; the child runs the check and reports through a pipe. Returns {"rc", "err"}, {"exception"} or
    {"hang": True}."""
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child
        os.close(read_end)
        resource.setrlimit(resource.RLIMIT_AS, (4 << 30, 4 << 30))
        try:
            code, err = inputs.run_config_check(path)
            result: dict[str, Any] = {"rc": code, "err": err}
        except BaseException as exc:  # a traceback is exactly what is being counted
            result = {"exception": f"{type(exc).__name__}: {str(exc)[:300]}"}
        os.write(write_end, json.dumps(result).encode())
        os._exit(0)
    os.close(write_end)
    chunks: list[bytes] = []
    deadline = time.monotonic() + timeout_s
    while True:
        ready, _, _ = select.select([read_end], [], [], max(0.0, deadline - time.monotonic()))
        if not ready:
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
            os.close(read_end)
            return {"hang": True}
        chunk = os.read(read_end, 1 << 16)
        if not chunk:
            break
        chunks.append(chunk)
    os.close(read_end)
    _, status = os.waitpid(pid, 0)
    if not chunks:
        return {"exception": f"child died (status {status})"}
    return json.loads(b"".join(chunks))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cases", type=int, default=2000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--valid-fraction", type=float, default=0.2)
    parser.add_argument("--timeout", type=float, default=30.0, help="seconds before a check counts as a hang")
    parser.add_argument("--code", type=Path, default=REPO, help="checkout whose pyacemaker is tested")
    parser.add_argument("--examples", type=int, default=3, help="examples printed per bad outcome")
    parser.add_argument(
        "--inputs", type=Path, default=REPO / "tests" / "fuzz_inputs.py", help="the generators (another version's)"
    )
    args = parser.parse_args()
    inputs = _load_inputs(args.code.resolve(), args.inputs.resolve())
    rng = random.Random(args.seed)
    counts: collections.Counter[str] = collections.Counter()
    examples: dict[str, list[str]] = collections.defaultdict(list)
    started = time.monotonic()
    for _ in range(args.cases):
        valid = rng.random() < args.valid_fraction
        case = inputs.valid_case(rng.choice) if valid else inputs.invalid_case(rng.choice)
        with tempfile.TemporaryDirectory() as directory:
            result = _check_in_child(inputs, case.write(Path(directory)), args.timeout)
        lines = result.get("err", "").strip().splitlines()
        if result.get("hang"):
            outcome = "hang"
        elif "exception" in result or result["rc"] not in (0, 2):
            outcome = "traceback"
        elif not case.invalid:
            outcome = "valid accepted" if result["rc"] == 0 else "valid rejected"
        elif result["rc"] == 0:
            outcome = "invalid accepted"
        elif len(lines) == 1 and case.expect in lines[0]:
            outcome = "refused, one line naming the key"
        else:
            outcome = "refused, other message"
        counts["valid tried" if valid else "invalid tried"] += 1
        counts[outcome] += 1
        shown = outcome not in ("refused, one line naming the key", "valid accepted")
        if shown and len(examples[outcome]) < args.examples:
            detail = result.get("exception") or " | ".join(lines)[:200]
            examples[outcome].append(f"{case.what} -> {detail}")
    print(json.dumps({"code": str(args.code), "seconds": round(time.monotonic() - started, 1), **counts}, indent=1))
    for outcome, listed in examples.items():
        print(f"{outcome}:")
        for line in listed:
            print(f"  {line}")


if __name__ == "__main__":
    main()
