"""The card index: verified agent cards in SQLite, queried by model, deployment and shard.

Only cards that passed ``registry.card.verify_card`` go in. A newer card from the same peer
replaces the older one; a card past its ``expiresAt`` is never returned and is deleted by
``purge``. The database lives in the node's data directory (``cards.sqlite``) so a restarted node
answers from what it knew, minus what expired meanwhile.

A valid signature proves who wrote a card, not that its addresses reach anyone: anyone can mint
keys and POST cards (Sybil cards). So each card also has a *status*, about its current
addresses, kept only for the life of this process (a TEMP table: cards loaded from disk at start
are unconfirmed until heard again, so an earlier run's cards do not steer a new one):

- ``confirmed``: heard over gossipsub from its own origin peer, or this node reached that PeerID
  over a Noise connection at one of the card's addresses;
- ``unconfirmed``: only POSTed over HTTP, or loaded from disk, and not checked;
- ``checking``: as unconfirmed, while this node dials the card's addresses (node/discovery.py);
- ``failed``: this node dialled the card's addresses and could not reach the PeerID, and has not
  confirmed the card since.

``query`` and ``infos`` return confirmed cards first, then unconfirmed ones, and leave out cards
being checked or failed (so a flood of fresh Sybil cards is not served while their dials time
out). A new card with other addresses starts over as unconfirmed (unless it arrives confirmed).

``model`` filters match a deployment CID, or a model name as ``model_matches`` says. Lookups by
shard, deployment and model use indexes on ``card_shards``. The index holds at most
``max_cards`` cards (``MAX_CARDS``); a new peer's card past the cap evicts expired cards, then
failed, unconfirmed and confirmed ones, the oldest first.
"""

from __future__ import annotations

import itertools
import json
import re
import sqlite3
import time
from collections.abc import Container, Iterable
from dataclasses import dataclass
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
CREATE INDEX IF NOT EXISTS card_shards_peer ON card_shards(peer_id);
CREATE INDEX IF NOT EXISTS card_shards_shard ON card_shards(shard);
CREATE INDEX IF NOT EXISTS card_shards_deployment ON card_shards(deployment);
CREATE INDEX IF NOT EXISTS card_shards_model ON card_shards(model);
"""
# Per process, never on disk. ``state`` is also the sort key: confirmed cards first.
STATUS_SCHEMA = """
CREATE TEMP TABLE IF NOT EXISTS card_status (
    peer_id  TEXT PRIMARY KEY,
    state    INTEGER NOT NULL,
    addrs    TEXT NOT NULL,
    since    REAL NOT NULL,
    failures INTEGER NOT NULL
);
"""
CONFIRMED, UNCONFIRMED, FAILED, CHECKING = "confirmed", "unconfirmed", "failed", "checking"
_STATES = (CONFIRMED, UNCONFIRMED, FAILED, CHECKING)  # index = the ``state`` column
_LISTED = 2  # states below this are returned by query()
MAX_MODEL_QUERY = 256
# Cards one index holds at most (about 3 KB each: ~60 MB of SQLite at the cap). Past it the
# least useful go first (``CardIndex._evict``); docs/reliability.md has the scaling model.
MAX_CARDS = 20_000
_WORD = re.compile(r"[^\W_]+")


def model_matches(query: str, name: str) -> bool:
    """Whether ``query`` names the model ``name``: equal ignoring case, or its words (runs of
    letters and digits, ignoring case) are consecutive words of the name. So ``minilm``,
    ``MiniLM-L6`` and ``all_minilm_l6_v2`` name ``all-MiniLM-L6-v2``; ``mini`` and ``l6-all``
    do not."""
    if len(query) > MAX_MODEL_QUERY:
        return False
    if query.casefold() == name.casefold():
        return True
    want = _WORD.findall(query.casefold())
    have = _WORD.findall(name.casefold())
    return bool(want) and any(have[i:i + len(want)] == want
                              for i in range(len(have) - len(want) + 1))


@dataclass(frozen=True)
class CardStatus:
    state: str            # CONFIRMED, UNCONFIRMED, CHECKING or FAILED
    multiaddrs: list[str]  # the addresses the state is about (the current card's)
    since: float          # Unix time the state was set
    failures: int         # failed dials of these addresses since they were last confirmed


def _addrs_key(addrs: Iterable[str]) -> str:
    return json.dumps(sorted(addrs))


class CardIndex:
    """Verified cards by peer. One connection, used from the node's trio thread only."""

    def __init__(self, path: Path | str, max_cards: int = MAX_CARDS) -> None:
        self.path = path
        self.max_cards = max_cards
        self._db = sqlite3.connect(str(path), isolation_level=None)
        self._db.execute("PRAGMA journal_mode=WAL")
        # A cache of what peers announce every few seconds: no fsync per card (in WAL mode a
        # crash keeps the index consistent and loses at most the last cards, which come again)
        self._db.execute("PRAGMA synchronous=NORMAL")
        self._db.execute("PRAGMA foreign_keys=ON")
        self._db.executescript(SCHEMA)
        self._db.executescript(STATUS_SCHEMA)
        # whatever an earlier run knew about these cards' addresses counts for nothing now
        rows = self._db.execute("SELECT peer_id, card FROM cards").fetchall()
        now = time.time()
        with self._db:
            self._db.execute("BEGIN")
            for peer_id, text in rows:
                try:
                    addrs = extension_params(json.loads(text)).get("multiaddrs", [])
                except (ValueError, CardRejected):
                    addrs = []
                self._set_status(peer_id, UNCONFIRMED, addrs if isinstance(addrs, list) else [],
                                 now, 0)

    def close(self) -> None:
        self._db.close()

    def put(self, info: CardInfo, *, confirmed: bool = False) -> str:
        """Store a verified card: "new" (first card of this peer, its previous one had expired,
        or its addresses changed: a restarted node), "updated", or "stale" (we hold a card
        issued later; nothing changes).

        ``confirmed``: the card was heard from its own peer (gossipsub origin) or is our own. A
        card that is not keeps the status of the previous card of the peer when both name the
        same addresses, and is unconfirmed otherwise."""
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
            status = self.status(info.peer_id)
            if confirmed:
                self._set_status(info.peer_id, CONFIRMED, info.multiaddrs, now, 0)
            elif status is None or _addrs_key(status.multiaddrs) != _addrs_key(info.multiaddrs):
                self._set_status(info.peer_id, UNCONFIRMED, info.multiaddrs, now, 0)
            if row is None:
                self._evict(now)
        if row is None or row[1] <= now:
            return "new"
        before = extension_params(json.loads(row[2])).get("multiaddrs", [])
        return "updated" if sorted(before) == sorted(info.multiaddrs) else "new"

    def _evict(self, now: float) -> None:
        """Keep at most ``max_cards`` cards: past the cap, expired cards go first, then cards
        whose addresses failed a dial, then unconfirmed ones, then confirmed ones, the
        oldest issued first within each: a flood of new unconfirmed cards (anyone can mint
        keys and POST cards) evicts itself, never a confirmed card. Inside put's
        transaction."""
        excess = self._db.execute("SELECT count(*) FROM cards").fetchone()[0] - self.max_cards
        if excess <= 0:
            return
        self._db.execute(
            "DELETE FROM cards WHERE peer_id IN (SELECT c.peer_id FROM cards c "
            "LEFT JOIN temp.card_status st ON st.peer_id = c.peer_id "
            "ORDER BY c.expires_at > ?, CASE COALESCE(st.state, ?) WHEN ? THEN 0 WHEN ? THEN 1 "
            "WHEN ? THEN 2 ELSE 3 END, c.issued_at LIMIT ?)",
            (now, _STATES.index(UNCONFIRMED), _STATES.index(FAILED), _STATES.index(UNCONFIRMED),
             _STATES.index(CHECKING), excess))
        self._db.execute("DELETE FROM temp.card_status WHERE peer_id NOT IN "
                         "(SELECT peer_id FROM cards)")

    def _set_status(self, peer_id: str, state: str, addrs: Iterable[str], since: float,
                    failures: int) -> None:
        self._db.execute("INSERT OR REPLACE INTO temp.card_status VALUES (?, ?, ?, ?, ?)",
                         (peer_id, _STATES.index(state), _addrs_key(addrs), since, failures))

    def status(self, peer_id: str) -> CardStatus | None:
        """What this process knows about the addresses of ``peer_id``'s card (None: no card)."""
        row = self._db.execute("SELECT state, addrs, since, failures FROM temp.card_status "
                               "WHERE peer_id = ?", (peer_id,)).fetchone()
        return None if row is None else CardStatus(_STATES[row[0]], json.loads(row[1]), row[2],
                                                   row[3])

    def mark(self, peer_id: str, multiaddrs: Iterable[str], *, reached: bool,
             started: float | None = None) -> bool:
        """Record a dial of ``multiaddrs`` for ``peer_id``'s card: reached (confirmed) or not
        (failed: left out of lookups until confirmed again). Applies only while the stored card
        still names those addresses; returns whether it applied. A failed dial that began
        (``started``, time.time()) before the card was last confirmed does not apply: a node
        restarted at the same addresses is not demoted by a dial of its dead predecessor."""
        status = self.status(peer_id)
        if status is None or _addrs_key(status.multiaddrs) != _addrs_key(multiaddrs):
            return False
        if not reached and started is not None and status.state == CONFIRMED \
                and status.since >= started:
            return False
        failures = 0 if reached else status.failures + 1
        with self._db:
            self._db.execute("BEGIN")
            self._set_status(peer_id, CONFIRMED if reached else FAILED, status.multiaddrs,
                             time.time(), failures)
        return True

    def mark_checking(self, peer_id: str, multiaddrs: Iterable[str]) -> bool:
        """An unconfirmed card's addresses are being dialled: left out of lookups until
        ``mark`` records the result. Returns whether the card was unconfirmed (and now is
        checking)."""
        status = self.status(peer_id)
        if status is None or status.state != UNCONFIRMED \
                or _addrs_key(status.multiaddrs) != _addrs_key(multiaddrs):
            return False
        with self._db:
            self._db.execute("BEGIN")
            self._set_status(peer_id, CHECKING, status.multiaddrs, time.time(), status.failures)
        return True

    def end_check(self, peer_id: str) -> None:
        """A check that recorded no result (``mark`` did not apply): unconfirmed again."""
        with self._db:
            self._db.execute("BEGIN")
            self._db.execute("UPDATE temp.card_status SET state = ? WHERE peer_id = ? AND "
                             "state = ?", (_STATES.index(UNCONFIRMED), peer_id,
                                           _STATES.index(CHECKING)))

    def unconfirmed(self, limit: int, now: float | None = None) -> list[CardInfo]:
        """Up to ``limit`` unexpired unconfirmed cards (to be checked), newest first."""
        now = time.time() if now is None else now
        rows = self._db.execute(
            "SELECT c.card FROM cards c JOIN temp.card_status st ON st.peer_id = c.peer_id "
            "WHERE c.expires_at > ? AND st.state = ? ORDER BY c.issued_at DESC LIMIT ?",
            (now, _STATES.index(UNCONFIRMED), limit)).fetchall()
        return self._verified(json.loads(r[0]) for r in rows)

    def silent(self, share: float, among: Container[str] | None = None, limit: int | None = None,
               now: float | None = None) -> list[CardInfo]:
        """Up to ``limit`` unexpired cards of the peers ``among`` (default: any) last received
        more than ``share`` of their validity ago (a node re-announces every third of it), the
        longest silent first. Only those are parsed and verified."""
        now = time.time() if now is None else now
        rows = self._db.execute(
            "SELECT peer_id, card FROM cards WHERE expires_at > ? AND "
            "received_at < ? - ? * (expires_at - issued_at) ORDER BY received_at",
            (now, now, share))
        picked = (card for peer_id, card in rows if among is None or peer_id in among)
        return self._verified(json.loads(card) for card in itertools.islice(picked, limit))

    def query(self, *, model: str | None = None, shard: str | None = None,
              deployment: str | None = None, now: float | None = None) -> list[dict[str, Any]]:
        """Unexpired cards, confirmed then unconfirmed, newest first within each; cards being
        checked or whose last dial failed are left out. ``model`` matches a deployment CID or a
        model name (``model_matches``); every given filter must match one served shard of the
        card."""
        now = time.time() if now is None else now
        where, args = ["c.expires_at > ?", "COALESCE(st.state, ?) < ?"], [
            now, _STATES.index(UNCONFIRMED), _LISTED]
        if model is not None or shard is not None or deployment is not None:
            sub, sub_args = ["s.peer_id = c.peer_id"], []
            if model is not None:
                names = [n for (n,) in self._db.execute(
                    "SELECT DISTINCT model FROM card_shards").fetchall()
                    if model_matches(model, n)]
                sub.append(f"(s.deployment = ? OR s.model IN ({', '.join('?' * len(names))}))")
                sub_args += [model, *names]
            if deployment is not None:
                sub.append("s.deployment = ?")
                sub_args.append(deployment)
            if shard is not None:
                sub.append("s.shard = ?")
                sub_args.append(shard)
            where.append(f"EXISTS (SELECT 1 FROM card_shards s WHERE {' AND '.join(sub)})")
            args += sub_args
        rows = self._db.execute(
            "SELECT c.card FROM cards c LEFT JOIN temp.card_status st ON st.peer_id = c.peer_id "
            f"WHERE {' AND '.join(where)} "
            "ORDER BY COALESCE(st.state, 1), c.issued_at DESC, c.peer_id", args).fetchall()
        return [json.loads(r[0]) for r in rows]

    def infos(self, **filters: str | None) -> list[CardInfo]:
        """``query(**filters)`` as CardInfo, in the same order (confirmed first); a card that
        expired between the query and the check is left out."""
        return self._verified(self.query(**filters))

    @staticmethod
    def _verified(cards: Iterable[dict[str, Any]]) -> list[CardInfo]:
        found = []
        for card in cards:
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
            self._db.execute("DELETE FROM temp.card_status WHERE peer_id NOT IN "
                             "(SELECT peer_id FROM cards)")
        return cur.rowcount
