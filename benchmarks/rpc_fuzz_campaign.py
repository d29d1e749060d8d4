"""A larger fuzz campaign than CI's (tests/fuzz): N drawn requests per RPC against the four real services, with
the counts of each outcome per RPC — OK, each status code, UNKNOWN/INTERNAL (unhandled exceptions), crashes
(the service process died; it is restarted and the campaign goes on), hangs (no answer within 30 s) and Label
streams that did not return one result per structure.

    python benchmarks/rpc_fuzz_campaign.py [--examples 100] [--seed 1] [--code-root DIR] [--rpc NAME ...]

`--code-root` runs the services of another checkout (e.g. an older commit) under the same fuzzer, for
before/after figures; the protos must match.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections import Counter
from pathlib import Path

from hypothesis import HealthCheck, given, seed, settings
from hypothesis import strategies as st

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tests.fuzz.rpc_fuzz import Services, call, kind_of, request_strategies, running_services, violations
from tests.fuzz.test_rpc_fuzz import RPCS


def campaign(services: Services, rpc: str, examples: int, random_seed: int) -> tuple[Counter[str], dict[str, str]]:
    """Counts of each outcome kind over `examples` drawn requests, and one message per bad kind."""
    counts: Counter[str] = Counter()
    samples: dict[str, str] = {}
    strategy = request_strategies(services)[rpc]

    @seed(random_seed)
    @settings(max_examples=examples, database=None, deadline=None, suppress_health_check=list(HealthCheck))
    @given(data=st.data())
    def fuzz(data: st.DataObject) -> None:
        request = data.draw(strategy)
        outcome = call(services, rpc, request)
        kind = kind_of(outcome)
        counts["tried"] += 1
        counts[kind] += 1
        if any("results for indices" in v for v in violations(outcome)):
            counts["wrong_result_count"] += 1
        if kind in ("unknown", "internal", "crash", "hang") and kind not in samples:
            shown = " ".join(str(request).split())
            samples[kind] = f"{outcome.details[:160]} | request: {shown[:4000]}"
        if outcome.crashed:
            services.restart_crashed()

    fuzz()
    return counts, samples


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--examples", type=int, default=100, help="requests drawn per RPC")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--code-root", type=Path, default=Path(__file__).resolve().parents[1])
    parser.add_argument("--rpc", nargs="*", default=RPCS)
    args = parser.parse_args()
    began = time.perf_counter()
    totals: Counter[str] = Counter()
    with running_services(args.code_root.resolve()) as services:
        for rpc in args.rpc:
            start = time.perf_counter()
            counts, samples = campaign(services, rpc, args.examples, args.seed)
            summary = ", ".join(f"{k} {v}" for k, v in sorted(counts.items()) if k != "tried")
            print(f"{rpc}: {counts['tried']} tried in {time.perf_counter() - start:.1f} s: {summary}", flush=True)
            for kind, detail in samples.items():
                print(f"    e.g. {kind}: {detail}", flush=True)
            totals.update(counts)
    bad = {k: totals[k] for k in ("unknown", "internal", "crash", "hang", "wrong_result_count")}
    print(f"total: {totals['tried']} requests in {time.perf_counter() - began:.0f} s; {bad}")


if __name__ == "__main__":
    main()
