#!/bin/sh
# Start the service this image was built for (PYACEMAKER_SERVICE) on all interfaces of the container: its
# network is private and the runtime publishes the port on 127.0.0.1 only. Extra arguments go to the service
# (e.g. the orchestrator's --sampler/--oracle/--trainer addresses). TLS and the token come from the
# PYACEMAKER_TLS_* / PYACEMAKER_TOKEN_FILE environment (docs/deployment.md).
set -e
exec python -m "pyacemaker.services.${PYACEMAKER_SERVICE:?PYACEMAKER_SERVICE is not set}" \
  --host "${PYACEMAKER_BIND:-0.0.0.0}" --port "${PYACEMAKER_PORT:-50051}" \
  --store "${PYACEMAKER_STORE:-/data/store}" "$@"
