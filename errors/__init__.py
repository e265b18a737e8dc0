"""veilnet's one error root and the branches a caller can act on.

Every error veilnet raises on purpose derives from ``VeilnetError``, through one of four
branches:

- ``InputError``: bad input or configuration (a malformed file, a bad argument, a flag that
  makes no sense). Also a ``ValueError``, which these errors were before the root existed.
- ``ProtocolError``: a peer broke the wire protocol or answered with an error; ``code`` is the
  stable error code of docs/protocol.md (``bad_frame``, ``unknown_shard``, ...).
- ``IntegrityError``: something failed a check that should have held: a signature, a digest,
  a Merkle proof, a verdict among replicas.
- ``UnavailableError``: nothing wrong with the request, but nobody could serve it now: a
  timeout, no provider, a busy node.

Every package may import this module; it imports nothing of veilnet's. A class keeps its old
built-in base (``ValueError``, ``RuntimeError``) beside its branch so that existing ``except``
clauses keep working.
"""

from __future__ import annotations


class VeilnetError(Exception):
    """The root of every error veilnet raises on purpose."""


class InputError(VeilnetError, ValueError):
    """Bad input or configuration; the message names what is wrong."""


class ProtocolError(VeilnetError):
    """A wire or protocol error with a stable ``code`` (docs/protocol.md)."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message


class IntegrityError(VeilnetError):
    """A check that should have held did not: signature, digest, proof or verdict."""


class UnavailableError(VeilnetError):
    """Nobody could serve the request now: a timeout, no provider, a busy node."""


__all__ = ["InputError", "IntegrityError", "ProtocolError", "UnavailableError", "VeilnetError"]
