"""The oracle service: one gRPC contract (`pyacemaker.v1.OracleService`) for every source of labels.

`backends/` holds the science (one ASE-calculator-like class per backend), `server.py` the thin servicer,
`client.py` the streaming client the CLI and the other services use.
"""
