"""PyAceMaker: distil a MACE teacher into a fast, DFT-corrected ACE potential.

This package is the small core every service shares: the generated gRPC contracts (`pyacemaker.v1`),
structure conversion, the artifact store, the run configuration, gRPC plumbing and the CLI.
"""

__version__ = "0.1.0"
