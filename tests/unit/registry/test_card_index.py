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
from registry.index import (
    CHECKING,
    CONFIRMED,
    FAILED,
    UNCONFIRMED,
    CardIndex,
    CardStatus,
    model_matches,
)

NOW = int(time.time())  # put() judges "previous card expired" by the real clock: see fresh_now
DEP_MINI, DEP_BERT = cid_of_bytes(b"deployment minilm"), cid_of_bytes(b"deployment bert")
MINI = [ServedShard(DEP_MINI, "minilm", cid_of_bytes(f"minilm {i}".encode()), i)
        for i in range(3)]
BERT = [ServedShard(DEP_BERT, "bert", cid_of_bytes(f"bert {i}".encode()), i) for i in range(2)]


@pytest.fixture(autouse=True)
def fresh_now() -> None:
    """NOW is the real time when each test starts (a test run may reach this module minutes
    after importing it, and cards issued at import would have expired by then)."""
    global NOW
    NOW = int(time.time())


def info_of(identity: Identity, shards: list[ServedShard], *, issued: int | None = None,
            ttl: float = 300, addrs: list[str] | None = None) -> CardInfo:
    issued = NOW if issued is None else issued
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


# -- confirmation status (issue 12 item 9) -------------------------------------------------------

def test_confirmed_first_failed_left_out(index: CardIndex) -> None:
    """Confirmed cards come first whatever their age; a card whose addresses failed to dial is
    left out until it is confirmed again."""
    real = info_of(Identity.generate(), MINI, issued=NOW)
    sybils = [info_of(Identity.generate(), MINI, issued=NOW + 50) for _ in range(3)]
    assert index.put(real, confirmed=True) == "new"
    for info in sybils:
        index.put(info)  # POSTed over HTTP: unconfirmed
    assert index.status(real.peer_id).state == CONFIRMED
    assert {index.status(i.peer_id).state for i in sybils} == {UNCONFIRMED}
    order = peers(index.query(shard=MINI[0].shard))
    assert order[0] == real.peer_id and set(order[1:]) == {i.peer_id for i in sybils}
    assert [i.peer_id for i in index.infos(deployment=DEP_MINI)] == order
    assert index.unconfirmed(10) and {i.peer_id for i in index.unconfirmed(10)} == set(order[1:])

    # while a check dials a card's addresses, the card is not served
    assert index.mark_checking(sybils[2].peer_id, sybils[2].multiaddrs)
    assert index.status(sybils[2].peer_id).state == CHECKING
    assert sybils[2].peer_id not in peers(index.query())
    assert sybils[2].peer_id not in {i.peer_id for i in index.unconfirmed(10)}
    index.end_check(sybils[2].peer_id)  # a check that learned nothing: unconfirmed again
    assert sybils[2].peer_id in peers(index.query())[1:]
    assert index.mark_checking(sybils[2].peer_id, sybils[2].multiaddrs)

    assert index.mark(sybils[0].peer_id, sybils[0].multiaddrs, reached=False)
    assert index.status(sybils[0].peer_id).state == FAILED
    assert index.status(sybils[0].peer_id).failures == 1
    assert sybils[0].peer_id not in peers(index.query())
    assert sybils[0].peer_id not in [i.peer_id for i in index.infos()]
    assert index.get(sybils[0].peer_id) == sybils[0].card  # still known by PeerID
    # reposting the same card does not lift the demotion
    assert index.put(sybils[0]) == "updated"
    assert index.status(sybils[0].peer_id).state == FAILED
    # a dial result about other addresses than the card's is ignored
    assert not index.mark(sybils[1].peer_id, ["/ip4/10.9.9.9/tcp/1"], reached=True)
    assert index.status(sybils[1].peer_id).state == UNCONFIRMED
    # reaching the peer, or hearing its card from itself, confirms it again
    assert index.mark(sybils[0].peer_id, sybils[0].multiaddrs, reached=True)
    assert peers(index.query())[:2] == [sybils[0].peer_id, real.peer_id]  # newest confirmed
    # a dial that began before the card was last confirmed (a restarted node at the same
    # addresses, heard from itself while a dial of its dead predecessor timed out) is stale
    since = index.status(real.peer_id).since
    assert not index.mark(real.peer_id, real.multiaddrs, reached=False, started=since - 1)
    assert index.status(real.peer_id).state == CONFIRMED
    # a confirmed card that then fails a dial begun later is demoted
    assert index.mark(real.peer_id, real.multiaddrs, reached=False, started=since + 1)
    assert real.peer_id not in peers(index.query())
    heard = info_of(Identity.from_seed(b"\1" * 32), MINI, issued=NOW)
    index.put(heard)
    index.put(heard, confirmed=True)
    assert index.status(heard.peer_id).state == CONFIRMED


def test_new_addresses_start_unconfirmed(index: CardIndex) -> None:
    ident = Identity.generate()
    index.put(info_of(ident, MINI, issued=NOW), confirmed=True)
    index.put(info_of(ident, MINI, issued=NOW + 1))  # same addresses, POSTed: stays confirmed
    assert index.status(ident.peer_id).state == CONFIRMED
    moved = info_of(ident, MINI, issued=NOW + 2, addrs=["/ip4/10.0.0.7/tcp/1"])
    index.put(moved)
    assert index.status(ident.peer_id) == CardStatus(UNCONFIRMED, moved.multiaddrs,
                                                     index.status(ident.peer_id).since, 0)


def test_cards_from_disk_are_unconfirmed_at_start(db_path: Path) -> None:
    """A node restarted (or a new testnet in the same directory) does not trust what an earlier
    process confirmed: its cards count as unconfirmed until heard again."""
    old = CardIndex(db_path)
    stale = info_of(Identity.generate(), MINI, issued=NOW + 20)
    dead = info_of(Identity.generate(), MINI, issued=NOW + 10)
    old.put(stale, confirmed=True)
    old.put(dead)
    old.mark(dead.peer_id, dead.multiaddrs, reached=False)
    old.close()
    again = CardIndex(db_path)
    try:
        assert again.status(stale.peer_id).state == UNCONFIRMED
        assert again.status(dead.peer_id).state == UNCONFIRMED
        fresh = info_of(Identity.generate(), MINI, issued=NOW)
        again.put(fresh, confirmed=True)
        assert peers(again.query()) == [fresh.peer_id, stale.peer_id, dead.peer_id]
        assert {i.peer_id for i in again.unconfirmed(10)} == {stale.peer_id, dead.peer_id}
        again.purge(now=NOW + 10_000)
        assert again.status(stale.peer_id) is None
    finally:
        again.close()


# -- model names (issue 12 item 13) -------------------------------------------------------------

@pytest.mark.parametrize(("query", "name", "match"), [
    ("all-MiniLM-L6-v2", "all-MiniLM-L6-v2", True),
    ("minilm", "all-MiniLM-L6-v2", True),
    ("MiniLM", "all-MiniLM-L6-v2", True),
    ("MINILM-l6", "all-MiniLM-L6-v2", True),
    ("all_minilm_l6_v2", "all-MiniLM-L6-v2", True),
    ("digits", "digits-mlp", True),
    ("mini", "all-MiniLM-L6-v2", False),      # words, not fragments
    ("l6-all", "all-MiniLM-L6-v2", False),    # in order
    ("minilm", "digits-mlp", False),
    ("--", "all-MiniLM-L6-v2", False),
    ("", "all-MiniLM-L6-v2", False),
    ("minilm " * 100, "all-MiniLM-L6-v2", False),  # longer than any name: no work done
])
def test_model_matches(query: str, name: str, match: bool) -> None:
    assert model_matches(query, name) is match


def test_query_by_short_model_name(index: CardIndex) -> None:
    mini = [ServedShard(DEP_MINI, "all-MiniLM-L6-v2", s.shard, s.index) for s in MINI]
    info = info_of(Identity.generate(), mini)
    index.put(info)
    index.put(info_of(Identity.generate(), BERT))
    for query in ("minilm", "MiniLM", "all-MiniLM-L6-v2", DEP_MINI):
        assert peers(index.query(model=query)) == [info.peer_id], query
    assert index.query(model="mini") == [] and index.query(model="gpt") == []


def test_the_index_is_capped_and_evicts_the_least_useful_first(db_path: Path) -> None:
    index = CardIndex(db_path, max_cards=3)
    try:
        ids = [Identity.generate() for _ in range(6)]
        expired = info_of(ids[0], MINI[:1], issued=NOW - 100, ttl=30)
        failed = info_of(ids[1], MINI[:1], issued=NOW + 1)
        confirmed = info_of(ids[2], MINI[1:2], issued=NOW)
        for info, sure in ((expired, False), (failed, False), (confirmed, True)):
            index.put(info, confirmed=sure)
        assert index.mark(failed.peer_id, failed.multiaddrs, reached=False)
        # at the cap: the expired card goes, then the one whose dial failed
        unconfirmed = info_of(ids[3], MINI[2:3], issued=NOW + 2)
        index.put(unconfirmed)
        assert index.get(expired.peer_id, now=NOW - 90) is None
        index.put(info_of(ids[4], BERT, issued=NOW + 3), confirmed=True)
        assert index.status(failed.peer_id) is None and index.get(failed.peer_id) is None
        with sqlite3.connect(db_path) as db:  # expired cards too: what the file holds
            held = {r[0] for r in db.execute("SELECT peer_id FROM cards")}
        assert held == {confirmed.peer_id, unconfirmed.peer_id, ids[4].peer_id}
        # a new unconfirmed card (a Sybil flood) never pushes out confirmed ones: it evicts the
        # older unconfirmed card, and the next one itself once only confirmed cards are left
        newer = info_of(ids[5], MINI[:1], issued=NOW + 4)
        index.put(newer)
        assert index.get(unconfirmed.peer_id) is None and index.get(newer.peer_id) is not None
        assert index.mark(newer.peer_id, newer.multiaddrs, reached=True)  # all 3 confirmed
        sybil = info_of(Identity.generate(), MINI[:1], issued=NOW + 5)
        index.put(sybil)
        assert index.get(sybil.peer_id) is None and index.count() == 3
        assert peers(index.query(shard=MINI[1].shard)) == [confirmed.peer_id]
    finally:
        index.close()


def test_silent_cards_are_those_not_heard_for_half_their_life(index: CardIndex) -> None:
    """``silent(share)``: unexpired cards last received more than ``share`` of their validity
    ago (node/discovery.py pulls them from their peer), the longest silent first."""
    a, b, c = (info_of(Identity.from_seed(bytes([i]) * 32), MINI, ttl=30) for i in (7, 8, 9))
    for info in (a, b, c):
        index.put(info)
    now = time.time()
    assert index.silent(0.5, now=now) == []  # just heard
    assert [i.peer_id for i in index.silent(0.5, now=now + 16)] == [a.peer_id, b.peer_id,
                                                                   c.peer_id]
    assert index.silent(0.5, now=NOW + 31) == []  # expired cards are not silent: gone
    # only the peers asked about, at most ``limit`` of them, the longest silent first
    assert [i.peer_id for i in index.silent(0.5, among={c.peer_id, a.peer_id},
                                            now=now + 16)] == [a.peer_id, c.peer_id]
    assert [i.peer_id for i in index.silent(0.5, limit=1, now=now + 16)] == [a.peer_id]
    long = info_of(Identity.from_seed(bytes([10]) * 32), MINI, ttl=300)
    index.put(long)
    assert long.peer_id not in {i.peer_id for i in index.silent(0.5, now=now + 16)}
