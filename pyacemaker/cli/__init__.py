"""The `pyacemaker` command: one thin module per command, all science lives in the services."""
