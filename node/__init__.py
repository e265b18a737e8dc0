"""The veilnet daemon and command line. The libp2p node arrives with the node-daemon issue; for
now this package holds the ``veilnet`` CLI."""

from node.cli import build_parser, main

__all__ = ["build_parser", "main"]
