"""The orchestrator service:
`python -m pyacemaker.services.orchestrator --store DIR --sampler HOST:PORT --oracle HOST:PORT --trainer HOST:PORT
[--port N]
    [--labelling-oracle HOST:PORT ...]`
"""

import sys

from pyacemaker.rpc import run_service_cli
from pyacemaker.services.orchestrator.runner import RunManager
from pyacemaker.services.orchestrator.server import add_to_server


def _arguments(parser):
    parser.add_argument("--sampler", required=True, help="address of the sampler service")
    parser.add_argument("--oracle", required=True, help="address of the oracle service")
    parser.add_argument("--trainer", required=True, help="address of the trainer service")
    parser.add_argument(
        "--labelling-oracle",
        action="append",
        default=[],
        metavar="HOST:PORT",
        help="another oracle instance (sharing the artifact store) that step 5 spreads its surrogate-labelling "
        "shards over, besides --oracle; repeat for several",
    )


def _make_register(args, store):
    runs = RunManager(store, args.sampler, args.oracle, args.trainer, tuple(args.labelling_oracle))
    return lambda server: add_to_server(server, runs)


if __name__ == "__main__":
    sys.exit(run_service_cli("orchestrator", None, _make_register, _arguments))
