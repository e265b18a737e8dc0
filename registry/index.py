"""The card index: verified agent cards in SQLite, queried by model, deployment and shard.

Only cards that passed ``registry.card.verify_card`` go in. A newer card from the same peer
replaces the older one; a card past its ``expiresAt`` is never returned and is deleted by
``purge``. The database lives in the node's data directory (``cards.sqlite``) so a restarted node
answers from what it knew, minus what expired meanwhile.
"""

from __future__ import annotations

import json
import sqlite3
import time
from pathlib import Path
from typing import Any

from registry.card import CardInfo, CardRejected, extension_params, verify_card

SCHEMA = """
CREATE TABLE IF NOT EXISTS cards (
    peer_id     TEXT PRIMARY KEY,
    did         TEXT NOT NULL,
    issued_at   INTEGER NOT NULL,
    expires_at  INTEGER NOT NULL,
    received_at REAL NOT NULL,
    card        TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS card_shards (
    peer_id     TEXT NOT NULL REFERENCES cards(peer_id) ON DELETE CASCADE,
    deployment  TEXT NOT NULL,
    model       TEXT NOT NULL,
    shard       TEXT NOT NULL,
    shard_index INTEGER NOT NULL
);
CREATE INDEX IF NOT EXISTS card_shards_shard ON card_shards(shard);
CREATE INDEX IF NOT EXISTS card_shards_deployment ON card_shards(deployment);
CREATE INDEX IF NOT EXISTS card_shards_model ON card_shards(model);
"""


class CardIndex:
    """Verified cards by peer. One connection, used from the node's trio thread only."""

    def __init__(self, path: Path | str) -> None:
        self.path = path
        self._db = sqlite3.connect(str(path), isolation_level=None)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA foreign_keys=ON")
        self._db.executescript(SCHEMA)

    def close(self) -> None:
        self._db.close()

    def put(self, info: CardInfo) -> str:
        """Store a verified card: "new" (first card of this peer, its previous one had expired,
        or its addresses changed: a restarted node), "updated", or "stale" (we hold a card
        issued later; nothing changes)."""
        now = time.time()
        row = self._db.execute("SELECT issued_at, expires_at, card FROM cards WHERE peer_id = ?",
                               (info.peer_id,)).fetchone()
        if row is not None and row[0] > info.issued_at:
            return "stale"
        with self._db:
            self._db.execute("BEGIN")
            self._db.execute("DELETE FROM cards WHERE peer_id = ?", (info.peer_id,))
            self._db.execute(
                "INSERT INTO cards VALUES (?, ?, ?, ?, ?, ?)",
                (info.peer_id, info.did, info.issued_at, info.expires_at, now,
                 json.dumps(info.card, separators=(",", ":"), ensure_ascii=False)))
            self._db.executemany(
                "INSERT INTO card_shards VALUES (?, ?, ?, ?, ?)",
                [(info.peer_id, s.deployment, s.model, s.shard, s.index) for s in info.shards])
        if row is None or row[1] <= now:
            return "new"
        before = extension_params(json.loads(row[2])).get("multiaddrs", [])
        return "updated" if sorted(before) == sorted(info.multiaddrs) else "new"

    def query(self, *, model: str | None = None, shard: str | None = None,
              deployment: str | None = None, now: float | None = None) -> list[dict[str, Any]]:
        """Unexpired cards, newest first. ``model`` matches a model name or a deployment CID;
        every given filter must match one served shard of the card."""
        now = time.time() if now is None else now
        where, args = ["c.expires_at > ?"], [now]
        if model is not None or shard is not None or deployment is not None:
            sub, sub_args = ["s.peer_id = c.peer_id"], []
            if model is not None:
                sub.append("(s.model = ? OR s.deployment = ?)")
                sub_args += [model, model]
            if deployment is not None:
                sub.append("s.deployment = ?")
                sub_args.append(deployment)
            if shard is not None:
                sub.append("s.shard = ?")
                sub_args.append(shard)
            where.append(f"EXISTS (SELECT 1 FROM card_shards s WHERE {' AND '.join(sub)})")
            args += sub_args
        rows = self._db.execute(
            f"SELECT card FROM cards c WHERE {' AND '.join(where)} "
            "ORDER BY c.issued_at DESC, c.peer_id", args).fetchall()
        return [json.loads(r[0]) for r in rows]

    def infos(self, **filters: str | None) -> list[CardInfo]:
        """``query(**filters)`` as CardInfo, newest first; a card that expired between the
        query and the check is left out."""
        found = []
        for card in self.query(**filters):
            try:
                found.append(verify_card(card))
            except CardRejected:
                continue
        return found

    def get(self, peer_id: str, now: float | None = None) -> dict[str, Any] | None:
        now = time.time() if now is None else now
        row = self._db.execute("SELECT card FROM cards WHERE peer_id = ? AND expires_at > ?",
                               (peer_id, now)).fetchone()
        return json.loads(row[0]) if row else None

    def count(self, now: float | None = None) -> int:
        now = time.time() if now is None else now
        return self._db.execute("SELECT count(*) FROM cards WHERE expires_at > ?",
                                (now,)).fetchone()[0]

    def purge(self, now: float | None = None) -> int:
        """Delete expired cards; returns how many went."""
        now = time.time() if now is None else now
        with self._db:
            self._db.execute("BEGIN")
            cur = self._db.execute("DELETE FROM cards WHERE expires_at <= ?", (now,))
        return cur.rowcount
