"""registry/index.py: the SQLite card index (real database files in tmp_path).

Cards are built and verified by registry.card, so every CardInfo stored here is a real one; the
database is also read back through a separate raw sqlite3 connection.
"""

from __future__ import annotations

import sqlite3
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from crypto.identity import Identity
from models.cid import cid_of_bytes
from registry.card import CardInfo, ServedShard, build_card, verify_card
from registry.index import CardIndex

NOW = int(time.time())  # put() judges "previous card expired" by the real clock
DEP_MINI, DEP_BERT = cid_of_bytes(b"deployment minilm"), cid_of_bytes(b"deployment bert")
MINI = [ServedShard(DEP_MINI, "minilm", cid_of_bytes(f"minilm {i}".encode()), i)
        for i in range(3)]
BERT = [ServedShard(DEP_BERT, "bert", cid_of_bytes(f"bert {i}".encode()), i) for i in range(2)]


def info_of(identity: Identity, shards: list[ServedShard], *, issued: int = NOW,
            ttl: float = 600, addrs: list[str] | None = None) -> CardInfo:
    card = build_card(identity, a2a_url=f"http://{identity.peer_id[-6:]}.example/a2a",
                      multiaddrs=addrs or [f"/ip4/10.0.0.1/tcp/4001/p2p/{identity.peer_id}"],
                      shards=shards, now=issued, ttl=ttl)
    return verify_card(card, now=issued)


def peers(cards: list[dict]) -> list[str]:
    return [c["capabilities"]["extensions"][0]["params"]["peerId"] for c in cards]


@pytest.fixture
def db_path(tmp_path: Path) -> Path:
    return tmp_path / "cards.sqlite"


@pytest.fixture
def index(db_path: Path) -> Iterator[CardIndex]:
    idx = CardIndex(db_path)
    yield idx
    idx.close()


@pytest.fixture
def three(index: CardIndex) -> dict[str, CardInfo]:
    """a: minilm shards 0,1 (oldest); b: bert; c: minilm shard 2 + bert 0 (newest); e: none."""
    infos = {
        "a": info_of(Identity.generate(), MINI[:2], issued=NOW),
        "b": info_of(Identity.generate(), BERT, issued=NOW + 5),
        "c": info_of(Identity.generate(), [MINI[2], BERT[0]], issued=NOW + 10),
        "e": info_of(Identity.generate(), [], issued=NOW + 7),
    }
    for info in infos.values():
        assert index.put(info) == "new"
    return infos


def test_query_filters(index: CardIndex, three: dict[str, CardInfo]) -> None:
    pid = {k: v.peer_id for k, v in three.items()}
    assert peers(index.query()) == [pid["c"], pid["e"], pid["b"], pid["a"]]  # newest first
    assert peers(index.query(model="minilm")) == [pid["c"], pid["a"]]
    assert peers(index.query(model="bert")) == [pid["c"], pid["b"]]
    assert peers(index.query(model=DEP_BERT)) == [pid["c"], pid["b"]]  # a deployment CID
    assert peers(index.query(deployment=DEP_MINI)) == [pid["c"], pid["a"]]
    assert peers(index.query(shard=MINI[0].shard)) == [pid["a"]]
    assert peers(index.query(shard=BERT[0].shard)) == [pid["c"], pid["b"]]
    assert peers(index.query(shard=BERT[1].shard)) == [pid["b"]]
    assert index.query(model="gpt") == [] and index.query(shard=cid_of_bytes(b"none")) == []
    # combined filters must all match one served shard
    assert peers(index.query(model="bert", shard=BERT[0].shard)) == [pid["c"], pid["b"]]
    assert peers(index.query(deployment=DEP_MINI, shard=MINI[2].shard)) == [pid["c"]]
    assert index.query(model="minilm", shard=BERT[0].shard) == []
    assert index.query(deployment=DEP_BERT, shard=MINI[0].shard) == []
    # the card without shards is only in unfiltered queries
    assert pid["e"] in peers(index.query())
    for kw in ({"model": "minilm"}, {"model": "bert"}, {"deployment": DEP_MINI},
               {"shard": MINI[0].shard}):
        assert pid["e"] not in peers(index.query(**kw))


def test_query_returns_the_stored_cards(index: CardIndex, three: dict[str, CardInfo]) -> None:
    by_peer = dict(zip(peers(index.query()), index.query(), strict=True))
    for info in three.values():
        assert by_peer[info.peer_id] == info.card
        assert index.get(info.peer_id) == info.card
        assert verify_card(by_peer[info.peer_id], now=NOW + 10).shards == info.shards
    assert index.get(Identity.generate().peer_id) is None
    assert index.count() == 4


def test_put_outcomes(index: CardIndex) -> None:
    ident = Identity.generate()
    first = info_of(ident, MINI, issued=NOW)
    assert index.put(first) == "new"
    later = info_of(ident, MINI[:1], issued=NOW + 10)
    assert index.put(later) == "updated"
    assert index.get(ident.peer_id) == later.card
    assert peers(index.query(shard=MINI[1].shard)) == []  # old shard rows replaced
    older = info_of(ident, BERT, issued=NOW + 5)
    assert index.put(older) == "stale"
    assert index.get(ident.peer_id) == later.card
    assert index.query(model="bert") == []
    moved = info_of(ident, MINI, issued=NOW + 20,
                    addrs=["/ip4/10.0.0.9/tcp/4001", "/ip4/10.0.0.8/tcp/4001"])
    assert index.put(moved) == "new"  # restarted on other addresses
    # the same addresses in another order: still the same running node
    reordered = info_of(ident, MINI, issued=NOW + 30,
                        addrs=["/ip4/10.0.0.8/tcp/4001", "/ip4/10.0.0.9/tcp/4001"])
    assert index.put(reordered) == "updated"
    assert index.count() == 1


def test_put_after_expiry_is_new(index: CardIndex) -> None:
    ident = Identity.generate()
    gone = info_of(ident, MINI, issued=NOW - 1000, ttl=30)  # expired by the real clock
    assert index.put(gone) == "new"
    assert index.get(ident.peer_id) is None
    assert index.put(info_of(ident, MINI, issued=NOW)) == "new"
    assert index.get(ident.peer_id) is not None


def test_expiry_hides_and_purge_deletes(index: CardIndex, db_path: Path) -> None:
    short_id, long_id = Identity.generate(), Identity.generate()
    short = info_of(short_id, MINI, issued=NOW, ttl=30)
    long = info_of(long_id, BERT + MINI[:1], issued=NOW, ttl=300)
    index.put(short)
    index.put(long)
    t = NOW + 30  # short.expires_at
    assert short.expires_at == t
    assert index.count(now=t - 1) == 2 and index.get(short_id.peer_id, now=t - 1) is not None
    assert index.count(now=t) == 1
    assert index.get(short_id.peer_id, now=t) is None
    assert index.get(long_id.peer_id, now=t) == long.card
    assert peers(index.query(now=t)) == [long_id.peer_id]
    assert peers(index.query(shard=MINI[0].shard, now=t)) == [long_id.peer_id]
    assert index.query(shard=MINI[1].shard, now=t) == []
    assert index.purge(now=t - 1) == 0
    assert index.purge(now=t) == 1
    assert index.purge(now=t) == 0
    raw = sqlite3.connect(db_path)
    try:
        assert raw.execute("SELECT count(*) FROM cards WHERE peer_id = ?",
                           (short_id.peer_id,)).fetchone()[0] == 0
        assert raw.execute("SELECT count(*) FROM card_shards WHERE peer_id = ?",
                           (short_id.peer_id,)).fetchone()[0] == 0
        rows = raw.execute("SELECT shard FROM card_shards WHERE peer_id = ?",
                           (long_id.peer_id,)).fetchall()
        assert sorted(r[0] for r in rows) == sorted(s.shard for s in BERT + MINI[:1])
    finally:
        raw.close()
    # a purge past everything empties both tables
    assert index.purge(now=NOW + 301) == 1
    raw = sqlite3.connect(db_path)
    try:
        assert raw.execute("SELECT count(*) FROM card_shards").fetchone()[0] == 0
    finally:
        raw.close()


def test_replacing_a_card_replaces_its_shard_rows(index: CardIndex, db_path: Path) -> None:
    ident = Identity.generate()
    index.put(info_of(ident, MINI, issued=NOW))
    index.put(info_of(ident, BERT, issued=NOW + 1))
    raw = sqlite3.connect(db_path)
    try:
        rows = raw.execute("SELECT deployment, model, shard, shard_index FROM card_shards "
                           "WHERE peer_id = ?", (ident.peer_id,)).fetchall()
    finally:
        raw.close()
    assert sorted(rows) == sorted((s.deployment, s.model, s.shard, s.index) for s in BERT)


def test_persistence(db_path: Path) -> None:
    idx = CardIndex(db_path)
    infos = [info_of(Identity.generate(), MINI, issued=NOW + i) for i in range(3)]
    for info in infos:
        idx.put(info)
    before = idx.query()
    idx.close()
    again = CardIndex(db_path)
    try:
        assert again.query() == before
        assert peers(again.query()) == [i.peer_id for i in reversed(infos)]
        assert [again.get(i.peer_id) for i in infos] == [i.card for i in infos]
        assert peers(again.query(shard=MINI[1].shard)) == [i.peer_id for i in reversed(infos)]
        assert again.count() == 3
        assert again.put(info_of(Identity.generate(), [], issued=NOW)) == "new"
        assert again.put(infos[0]) == "updated"
    finally:
        again.close()
