"""The log's SQLite store: entries, their leaf hashes and every complete subtree hash.

A tree of n leaves is the binary decomposition of n into complete subtrees; every proof and root
that RFC 6962 defines is made of complete-subtree hashes (``ledger.merkle``). Storing each
complete subtree when it is completed (on average one extra hash per leaf) makes an append cost
O(1) amortized and a proof O(log n) indexed lookups, never a pass over the entries.

Tables (WAL, synchronous=FULL: a commit that returned survives a crash of the process and of the
machine):

    entries(idx, data, leaf)            one row per entry; leaf = SHA-256(0x00 || data)
    subtrees(level, idx, hash)          complete subtree of 2**level leaves starting at idx << level
    checkpoints(size, root, note, created)   every signed checkpoint, one per committed batch
    cosignatures(size, witness, line)   witness cosignature lines received for a checkpoint
    meta(key, value)                    format version, origin
"""

from __future__ import annotations

import sqlite3
import time
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path

from errors import UnavailableError
from ledger.merkle import leaf_hash, node_hash, tree_root

FORMAT = "veilnet-ledger/1"
SignFn = Callable[[int, bytes], str]  # sign(size, root) -> the signed checkpoint note

SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS entries (
    idx  INTEGER PRIMARY KEY,
    data BLOB NOT NULL,
    leaf BLOB NOT NULL
);
CREATE TABLE IF NOT EXISTS subtrees (
    level INTEGER NOT NULL,
    idx   INTEGER NOT NULL,
    hash  BLOB NOT NULL,
    PRIMARY KEY (level, idx)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS checkpoints (
    size    INTEGER PRIMARY KEY,
    root    BLOB NOT NULL,
    note    TEXT NOT NULL,
    created REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS cosignatures (
    size    INTEGER NOT NULL,
    witness TEXT NOT NULL,
    line    TEXT NOT NULL,
    PRIMARY KEY (size, witness)
) WITHOUT ROWID;
"""


class StoreError(UnavailableError, RuntimeError):
    """The ledger's SQLite log store (``LogStore``, ledger/store.py) is missing, of another
    format, or inconsistent: the ledger cannot be served from it. Not ``node.store.StoreError``
    (a node's shard store)."""


class LogStore:
    """Entries and hashes of one log. Not thread-safe: one owner at a time."""

    def __init__(self, path: Path | str, *, create: bool = False) -> None:
        path = Path(path)
        if not create and not path.exists():
            raise StoreError(f"{path}: no ledger store here (run 'veilnet ledger init')")
        try:
            self.db = sqlite3.connect(str(path), isolation_level=None, check_same_thread=False)
            self.db.execute("PRAGMA journal_mode=WAL")
            self.db.execute("PRAGMA synchronous=FULL")
            self.db.executescript(SCHEMA)
            if create:
                self.db.execute("INSERT OR IGNORE INTO meta VALUES ('format', ?)", (FORMAT,))
            fmt = self.meta("format")
        except sqlite3.DatabaseError as exc:
            raise StoreError(f"{path}: not a ledger store ({exc})") from None
        if fmt != FORMAT:
            raise StoreError(f"{path}: format {fmt!r}, expected {FORMAT!r}")
        self.path = path
        self._size = self.db.execute("SELECT count(*) FROM entries").fetchone()[0]

    def close(self) -> None:
        self.db.close()

    def meta(self, key: str) -> str | None:
        row = self.db.execute("SELECT value FROM meta WHERE key = ?", (key,)).fetchone()
        return row[0] if row else None

    def set_meta(self, key: str, value: str) -> None:
        self.db.execute("INSERT OR REPLACE INTO meta VALUES (?, ?)", (key, value))

    @property
    def size(self) -> int:
        return self._size

    # -- reading ----------------------------------------------------------------------------------

    def perfect(self, start: int, size: int) -> bytes:
        """Hash of the complete subtree of ``size`` (a power of two) leaves at ``start``."""
        level = size.bit_length() - 1
        if level == 0:
            row = self.db.execute("SELECT leaf FROM entries WHERE idx = ?", (start,)).fetchone()
        else:
            row = self.db.execute("SELECT hash FROM subtrees WHERE level = ? AND idx = ?",
                                  (level, start >> level)).fetchone()
        if row is None:
            raise StoreError(f"missing subtree hash ({start}, {size}) in {self.path}")
        return bytes(row[0])

    def root(self, size: int | None = None) -> bytes:
        return tree_root(self._size if size is None else size, self.perfect)

    def entry(self, index: int) -> bytes:
        row = self.db.execute("SELECT data FROM entries WHERE idx = ?", (index,)).fetchone()
        if row is None:
            raise IndexError(f"no entry {index} (size {self._size})")
        return bytes(row[0])

    def entries(self, start: int, stop: int) -> list[tuple[int, bytes]]:
        rows = self.db.execute("SELECT idx, data FROM entries WHERE idx >= ? AND idx < ? "
                               "ORDER BY idx", (start, stop))
        return [(i, bytes(d)) for i, d in rows]

    # -- appending --------------------------------------------------------------------------------

    def append(self, entries: Sequence[bytes], sign: SignFn) -> tuple[int, str]:
        """Append ``entries`` and the checkpoint ``sign(size, root)`` in one transaction.

        Returns (first index, checkpoint note). Nothing is visible, and nothing is acknowledged,
        unless the whole batch and its checkpoint committed.
        """
        first = self._size
        leaves = [leaf_hash(e) for e in entries]
        pending: dict[tuple[int, int], bytes] = {}
        rows: list[tuple[int, int, bytes]] = []
        for offset, leaf in enumerate(leaves):
            index, level, h = first + offset, 0, leaf
            pending[(0, index)] = h
            while index & 1:  # this leaf completes a subtree: hash it with its left sibling
                left = pending.get((level, index - 1))
                if left is None:
                    left = self.perfect((index - 1) << level, 1 << level)
                h = node_hash(left, h)
                level, index = level + 1, index >> 1
                pending[(level, index)] = h
                rows.append((level, index, h))
        new_size = first + len(entries)

        def perfect(start: int, size: int) -> bytes:
            level = size.bit_length() - 1
            return pending.get((level, start >> level)) or self.perfect(start, size)

        root = tree_root(new_size, perfect)
        note = sign(new_size, root)
        try:
            self.db.execute("BEGIN IMMEDIATE")
            self.db.executemany("INSERT INTO entries VALUES (?, ?, ?)",
                                ((first + i, e, leaves[i]) for i, e in enumerate(entries)))
            self.db.executemany("INSERT INTO subtrees VALUES (?, ?, ?)", rows)
            self.db.execute("INSERT INTO checkpoints VALUES (?, ?, ?, ?)",
                            (new_size, root, note, time.time()))
            self.db.execute("COMMIT")
        except BaseException:
            if self.db.in_transaction:
                self.db.execute("ROLLBACK")
            raise
        self._size = new_size
        return first, note

    # -- checkpoints and cosignatures -------------------------------------------------------------

    def checkpoint(self, size: int | None = None) -> tuple[int, bytes, str] | None:
        """(size, root, note) of the checkpoint at ``size``, or of the latest one."""
        if size is None:
            row = self.db.execute("SELECT size, root, note FROM checkpoints "
                                  "ORDER BY size DESC LIMIT 1").fetchone()
        else:
            row = self.db.execute("SELECT size, root, note FROM checkpoints WHERE size = ?",
                                  (size,)).fetchone()
        return (row[0], bytes(row[1]), row[2]) if row else None

    def checkpoints(self) -> Iterable[tuple[int, bytes, str]]:
        for size, root, note in self.db.execute(
                "SELECT size, root, note FROM checkpoints ORDER BY size"):
            yield size, bytes(root), note

    def add_cosignature(self, size: int, witness: str, line: str) -> None:
        self.db.execute("INSERT OR REPLACE INTO cosignatures VALUES (?, ?, ?)",
                        (size, witness, line))

    def cosignatures(self, size: int) -> list[str]:
        return [r[0] for r in self.db.execute(
            "SELECT line FROM cosignatures WHERE size = ? ORDER BY witness", (size,))]

    # -- audit -------------------------------------------------------------------------------------

    def all_leaves(self) -> Iterable[tuple[int, bytes, bytes]]:
        for idx, data, leaf in self.db.execute("SELECT idx, data, leaf FROM entries ORDER BY idx"):
            yield idx, bytes(data), bytes(leaf)

    def all_subtrees(self) -> Iterable[tuple[int, int, bytes]]:
        for level, idx, h in self.db.execute(
                "SELECT level, idx, hash FROM subtrees ORDER BY level, idx"):
            yield level, idx, bytes(h)
