"""A transparency log in a directory: ``log.key`` (Ed25519, 0600) and ``log.sqlite``.

Every committed batch of entries gets a C2SP tlog-checkpoint (origin, size, root) in a C2SP
signed note signed with the log key; witnesses' cosignature lines are stored beside it.
Receipts are C2SP tlog-proof texts that verify offline with the log's verifier key (and the
witnesses' keys for a quorum).
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from pathlib import Path

from crypto.identity import Identity, IdentityError
from errors import InputError
from ledger.checkpoint import Checkpoint, parse_checkpoint
from ledger.merkle import (
    EMPTY_ROOT,
    consistency_proof,
    inclusion_proof,
    leaf_hash,
    node_hash,
)
from ledger.note import (
    NoteError,
    Verifier,
    add_signatures,
    parse_verifier_key,
    sign_note,
    verifier_key,
    verify_note,
)
from ledger.store import LogStore, StoreError
from ledger.tlog_proof import TlogProof, format_proof

KEY_FILE = "log.key"
DB_FILE = "log.sqlite"
MAX_BATCH = 10_000


class LedgerError(InputError):
    """A bad argument or request (index out of range, size beyond the log, ...)."""


@dataclass
class VerifyReport:
    entries: int = 0
    subtrees: int = 0
    checkpoints: int = 0
    problems: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems


class Log:
    """One log, opened from its directory. Appends are not thread-safe: one writer."""

    def __init__(self, directory: Path, store: LogStore, identity: Identity) -> None:
        self.directory = directory
        self.store = store
        self.identity = identity
        origin = store.meta("origin")
        if not origin:
            raise StoreError(f"{directory}: the store names no origin")
        self.origin = origin
        self.verifier_key = verifier_key(origin, identity.public)
        self.verifier: Verifier = parse_verifier_key(self.verifier_key)

    @classmethod
    def init(cls, directory: Path | str, origin: str,
             identity: Identity | None = None) -> Log:
        """Create a new log in ``directory`` (which must not hold one yet)."""
        directory = Path(directory)
        if (directory / DB_FILE).exists() or (directory / KEY_FILE).exists():
            raise LedgerError(f"{directory}: a ledger is already there")
        _check_origin(origin)
        directory.mkdir(parents=True, exist_ok=True)
        os.chmod(directory, 0o700)
        identity = identity or Identity.generate()
        identity.save(directory / KEY_FILE)
        store = LogStore(directory / DB_FILE, create=True)
        store.set_meta("origin", origin)
        log = cls(directory, store, identity)
        # size 0 has a checkpoint too, so consistency always has a signed starting point
        store.db.execute("INSERT INTO checkpoints VALUES (0, ?, ?, ?)",
                         (EMPTY_ROOT, log._sign(0, EMPTY_ROOT), time.time()))
        return log

    @classmethod
    def open(cls, directory: Path | str) -> Log:
        directory = Path(directory)
        if not (directory / DB_FILE).exists():
            raise StoreError(f"{directory}: no ledger here (create one with "
                             "'veilnet ledger init')")
        try:
            identity = Identity.load(directory / KEY_FILE)
        except (OSError, IdentityError) as exc:
            raise StoreError(f"{directory / KEY_FILE}: {exc}") from None
        return cls(directory, LogStore(directory / DB_FILE), identity)

    @classmethod
    def open_or_init(cls, directory: Path | str, origin: str,
                     identity: Identity | None = None) -> Log:
        directory = Path(directory)
        if (directory / DB_FILE).exists():
            return cls.open(directory)
        return cls.init(directory, origin, identity)

    def close(self) -> None:
        self.store.close()

    @property
    def size(self) -> int:
        return self.store.size

    # -- writing -----------------------------------------------------------------------------------

    def _sign(self, size: int, root: bytes) -> str:
        return sign_note(Checkpoint(self.origin, size, root).text(), self.origin, self.identity)

    def append(self, entries: list[bytes]) -> tuple[list[tuple[int, bytes]], str]:
        """Append a batch; returns ((index, leaf hash) per entry, the new signed checkpoint).
        Returns only after the batch and its checkpoint are committed."""
        if not entries:
            raise LedgerError("an append needs at least one entry")
        if len(entries) > MAX_BATCH:
            raise LedgerError(f"at most {MAX_BATCH} entries per batch, got {len(entries)}")
        first, note = self.store.append(entries, self._sign)
        return [(first + i, leaf_hash(e)) for i, e in enumerate(entries)], note

    # -- reading -----------------------------------------------------------------------------------

    def checkpoint(self, size: int | None = None, *, cosigned: bool = True) -> str:
        """The signed checkpoint note at ``size`` (default: the latest), with the witness
        cosignatures received for it."""
        found = self.store.checkpoint(size)
        if found is None:
            raise LedgerError(f"no checkpoint at size {size} (the log has "
                              f"{self.size} entries; checkpoints exist per committed batch)")
        size, _, note = found
        return add_signatures(note, self.store.cosignatures(size)) if cosigned else note

    def _check_size(self, size: int | None) -> int:
        size = self.size if size is None else size
        if not 0 <= size <= self.size:
            raise LedgerError(f"size {size} is outside the log (0..{self.size})")
        return size

    def inclusion(self, index: int, size: int | None = None) -> list[bytes]:
        size = self._check_size(size)
        if not 0 <= index < size:
            raise LedgerError(f"index {index} is not below size {size}")
        return inclusion_proof(index, size, self.store.perfect)

    def consistency(self, old: int, new: int | None = None) -> list[bytes]:
        new = self._check_size(new)
        if not 0 <= old <= new:
            raise LedgerError(f"old size {old} must be between 0 and the new size {new}")
        return consistency_proof(old, new, self.store.perfect)

    def proof(self, index: int, size: int | None = None) -> str:
        """A C2SP tlog-proof for entry ``index`` against the checkpoint at ``size`` (default:
        the latest checkpoint)."""
        if size is None:
            latest = self.store.checkpoint()
            size = latest[0] if latest else 0
        note = self.checkpoint(size)
        return format_proof(TlogProof(index, tuple(self.inclusion(index, size)), note))

    def root(self, size: int | None = None) -> bytes:
        return self.store.root(self._check_size(size))

    # -- audit -------------------------------------------------------------------------------------

    def verify(self) -> VerifyReport:
        """Recompute every leaf and subtree hash from the entries, and check every stored
        checkpoint: its root, its signature by the log key, and its text."""
        report = VerifyReport()
        checkpoints = {size: (root, note) for size, root, note in self.store.checkpoints()}
        frontier: list[tuple[int, bytes]] = []  # complete subtrees of the tree so far
        stored = {}
        for level, idx, h in self.store.all_subtrees():
            stored[(level, idx)] = h
            report.subtrees += 1
        computed = 0
        self._check_checkpoint(0, EMPTY_ROOT, checkpoints, report)
        for index, data, leaf in self.store.all_leaves():
            if index != report.entries:
                report.problems.append(f"entry {report.entries} is missing")
                break
            report.entries += 1
            h = leaf_hash(data)
            if h != leaf:
                report.problems.append(f"entry {index}: stored leaf hash does not match its data")
            frontier.append((0, h))
            position = index
            while len(frontier) > 1 and frontier[-1][0] == frontier[-2][0]:
                (level, right), (_, left) = frontier.pop(), frontier.pop()
                level, position = level + 1, position >> 1
                merged = node_hash(left, right)
                computed += 1
                if stored.get((level, position)) != merged:
                    report.problems.append(f"subtree (level {level}, index {position}): "
                                           "stored hash does not match its leaves")
                frontier.append((level, merged))
            self._check_checkpoint(report.entries, _fold(frontier), checkpoints, report)
        if computed != report.subtrees:
            report.problems.append(f"{report.subtrees} subtree hashes stored, {computed} "
                                   "expected")
        report.checkpoints = len(checkpoints)
        for size in sorted(checkpoints):
            if size > report.entries:
                report.problems.append(f"checkpoint at size {size} is beyond the "
                                       f"{report.entries} entries")
        return report

    def _check_checkpoint(self, size: int, root: bytes,
                          checkpoints: dict[int, tuple[bytes, str]], report: VerifyReport) -> None:
        if size not in checkpoints:
            return
        stored_root, note = checkpoints[size]
        if stored_root != root:
            report.problems.append(f"checkpoint at size {size}: stored root does not match "
                                   "the entries")
        try:
            parsed, _ = verify_note(note, [self.verifier])
            cp = parse_checkpoint(parsed.text)
        except (NoteError, ValueError) as exc:
            report.problems.append(f"checkpoint at size {size}: {exc}")
            return
        if (cp.origin, cp.size, cp.root) != (self.origin, size, root):
            report.problems.append(f"checkpoint at size {size}: its text names "
                                   f"({cp.origin}, {cp.size}) or another root")


def _fold(frontier: list[tuple[int, bytes]]) -> bytes:
    """The root of a tree from its complete subtrees, left (largest) to right."""
    if not frontier:
        return EMPTY_ROOT
    acc = frontier[-1][1]
    for _, h in reversed(frontier[:-1]):
        acc = node_hash(h, acc)
    return acc


def _check_origin(origin: str) -> None:
    if not origin or not origin.isprintable() or any(c.isspace() for c in origin) \
            or "+" in origin:
        raise LedgerError(f"origin {origin!r}: use a non-empty name without spaces or '+' "
                          "(a schema-less URL such as example.org/log)")
