"""A witness: cosigns a log's checkpoints only if they extend what it cosigned before.

For each log (origin) the witness keeps the size and root it last cosigned in its own SQLite
database. A new checkpoint is accepted only with a valid consistency proof from that size, and
the check and the update happen in one ``BEGIN IMMEDIATE`` transaction, so two concurrent
requests cannot both advance from the same state (C2SP tlog-witness semantics). Two checkpoints
of one size with different roots, or a checkpoint that does not extend the last one, is refused
and reported (``WitnessRefused.reason`` is "fork" or "inconsistent").
"""

from __future__ import annotations

import sqlite3
import time
from collections.abc import Sequence
from pathlib import Path

from crypto.identity import Identity
from errors import IntegrityError
from ledger.checkpoint import Checkpoint, parse_checkpoint
from ledger.cosign import cosign, cosignature_verifier_key
from ledger.merkle import EMPTY_ROOT, ProofError, verify_consistency
from ledger.note import NoteError, Verifier, parse_verifier_key, verify_note

SCHEMA = """
CREATE TABLE IF NOT EXISTS logs (origin TEXT PRIMARY KEY, verifier TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS witnessed (
    origin  TEXT PRIMARY KEY,
    size    INTEGER NOT NULL,
    root    BLOB NOT NULL,
    updated REAL NOT NULL
);
"""

REASONS = ("unknown-log", "bad-note", "fork", "inconsistent", "conflict")


class WitnessRefused(IntegrityError, ValueError):
    """The witness will not cosign; ``reason`` is one of REASONS."""

    def __init__(self, reason: str, message: str, known_size: int | None = None) -> None:
        super().__init__(f"{reason}: {message}")
        self.reason = reason
        self.known_size = known_size  # for "conflict": the size the witness has cosigned


class Witness:
    def __init__(self, path: Path | str, identity: Identity, name: str) -> None:
        self.identity = identity
        self.name = name
        self.verifier_key = cosignature_verifier_key(name, identity.public)
        self._db = sqlite3.connect(str(path), isolation_level=None, timeout=10,
                                   check_same_thread=False)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=FULL")
        self._db.executescript(SCHEMA)

    def close(self) -> None:
        self._db.close()

    def trust(self, log_verifier_key: str) -> Verifier:
        """Witness the log with this verifier key (its name is the log's origin)."""
        verifier = parse_verifier_key(log_verifier_key)
        self._db.execute("INSERT OR REPLACE INTO logs VALUES (?, ?)",
                         (verifier.name, log_verifier_key))
        return verifier

    def known(self, origin: str) -> tuple[int, bytes] | None:
        row = self._db.execute("SELECT size, root FROM witnessed WHERE origin = ?",
                               (origin,)).fetchone()
        return (row[0], bytes(row[1])) if row else None

    def add_checkpoint(self, note: str, old_size: int, proof: Sequence[bytes],
                       now: int | None = None) -> str:
        """Check ``note`` against what this witness cosigned for its log and, if it extends it,
        record it and return a cosignature line; raises WitnessRefused."""
        checkpoint = self._read(note)
        with _immediate(self._db):
            row = self._db.execute("SELECT size, root FROM witnessed WHERE origin = ?",
                                   (checkpoint.origin,)).fetchone()
            size, root = (row[0], bytes(row[1])) if row else (0, EMPTY_ROOT)
            if checkpoint.size == size and checkpoint.root != root:
                raise WitnessRefused("fork", f"{checkpoint.origin}: a checkpoint of size {size} "
                                     "with another root than the one cosigned", size)
            if old_size != size:
                raise WitnessRefused("conflict", f"{checkpoint.origin}: the proof starts at "
                                     f"{old_size}, this witness is at {size}", size)
            if checkpoint.size < size:
                raise WitnessRefused("inconsistent", f"{checkpoint.origin}: size "
                                     f"{checkpoint.size} is older than {size}", size)
            try:
                verify_consistency(size, checkpoint.size, root, checkpoint.root, proof)
            except ProofError as exc:
                raise WitnessRefused("inconsistent", f"{checkpoint.origin}: size "
                                     f"{checkpoint.size} does not extend size {size}: {exc}",
                                     size) from None
            self._db.execute("INSERT OR REPLACE INTO witnessed VALUES (?, ?, ?, ?)",
                             (checkpoint.origin, checkpoint.size, checkpoint.root, time.time()))
        return cosign(checkpoint, self.name, self.identity,
                      int(time.time()) if now is None else now)

    def _read(self, note: str) -> Checkpoint:
        try:
            text_end = note.index("\n\n")
            origin = note[:note.index("\n")]
        except ValueError:
            raise WitnessRefused("bad-note", "not a signed checkpoint note") from None
        if not origin.isprintable():  # control characters, or a lone surrogate, which
            # cannot even go to SQLite (UnicodeEncodeError): no log is named so
            raise WitnessRefused("bad-note", "the note's origin line is not printable UTF-8")
        row = self._db.execute("SELECT verifier FROM logs WHERE origin = ?",
                               (origin,)).fetchone()
        if row is None:
            raise WitnessRefused("unknown-log", f"this witness does not know log {origin!r}")
        try:
            parsed, _ = verify_note(note, [parse_verifier_key(row[0])])
            checkpoint = parse_checkpoint(parsed.text)
        except (NoteError, ValueError) as exc:
            raise WitnessRefused("bad-note", str(exc)) from None
        if checkpoint.origin != origin or text_end < 0:
            raise WitnessRefused("bad-note", "the checkpoint names another origin")
        return checkpoint


class _immediate:
    """``BEGIN IMMEDIATE`` ... ``COMMIT`` (``ROLLBACK`` on any exception)."""

    def __init__(self, db: sqlite3.Connection) -> None:
        self.db = db

    def __enter__(self) -> None:
        self.db.execute("BEGIN IMMEDIATE")

    def __exit__(self, exc_type: object, *_: object) -> None:
        self.db.execute("ROLLBACK" if exc_type is not None else "COMMIT")
