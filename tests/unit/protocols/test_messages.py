"""The typed messages of protocols/cards.py, peers.py, ledger.py, witness.py and shard.py: each
encodes to the documented CBOR map, decodes back, and the server's parser refuses what
docs/protocol.md refuses, with the same error code. No network: maps go through cbor2 the way
a frame's body does."""

from __future__ import annotations

import time
from typing import Any

import cbor2
import pytest

from crypto.identity import Identity
from ledger.entries import EntryError, make_entry
from protocols.cards import CardLookup, lookup_answer, parse_lookup
from protocols.ledger import LedgerRequest, entry_from_peer, parse_request
from protocols.peers import PeerRecord, hello_answer, parse_hello, parse_record
from protocols.shard import parse_request as parse_shard_request
from protocols.wire import WireError, decode_body
from protocols.witness import Offer, cosigned, parse_answer, parse_offer, refused

CID = "bafkrei" + "a" * 52


def wire(message: dict[str, Any]) -> dict[str, Any]:
    return decode_body(cbor2.dumps(message))


def refused_with(code: str, parse: Any, message: dict[str, Any]) -> str:
    with pytest.raises(WireError) as info:
        parse(message)
    assert info.value.code == code, info.value
    return info.value.message


# -- /veilnet/cards/1 ---------------------------------------------------------------------------

def test_card_lookup_round_trip() -> None:
    lookup = CardLookup(deployment=CID, model="all-MiniLM-L6-v2")
    message = wire(lookup.to_message("q1"))
    assert message == {"v": 1, "id": "q1", "deployment": CID, "model": "all-MiniLM-L6-v2"}
    assert parse_lookup(message) == lookup
    assert parse_lookup({"v": 1, "id": "q"}) == CardLookup()


@pytest.mark.parametrize("bad", [{"deployment": "nope"}, {"shard": CID + "a"}, {"model": ""},
                                 {"model": "x" * 201}, {"shard": 7}])
def test_card_lookup_refusals(bad: dict[str, Any]) -> None:
    refused_with("bad_request", parse_lookup, {"v": 1, "id": "q", **bad})


def test_lookup_answer_is_bounded_json_text() -> None:
    answer = wire(lookup_answer("q", [{"n": i} for i in range(300)]))
    assert answer["id"] == "q" and len(answer["cards"]) == 256
    assert answer["cards"][0] == '{"n":0}'


# -- /veilnet/peers/1 ---------------------------------------------------------------------------

def test_hello_round_trip_and_authenticated_sender() -> None:
    me, other = Identity.generate(), Identity.generate()
    record = PeerRecord(me.peer_id, me.did, ["/ip4/127.0.0.1/tcp/1"], [CID], "http://h")
    hello = wire({"v": 1, "id": "h", "node": record.to_json()})
    parsed = parse_hello(hello, me.peer_id)
    assert parsed is not None
    assert (parsed.peer_id, parsed.did, parsed.addrs, parsed.shards, parsed.http) == (
        me.peer_id, me.did, record.addrs, [CID], "http://h")
    assert parse_hello({"v": 1, "id": "h", "node": None}, me.peer_id) is None
    text = refused_with("bad_request", lambda m: parse_hello(m, other.peer_id), hello)
    assert "came from" in text  # a record must name the PeerID of its stream
    answer = wire(hello_answer("h", record, [parsed]))
    assert parse_record(answer["node"]).peer_id == me.peer_id and len(answer["peers"]) == 1


# -- /veilnet/ledger/1 --------------------------------------------------------------------------

def test_ledger_requests_round_trip() -> None:
    entry = make_entry(Identity.generate(), "score-report/1", {"scores": {}})
    for request in (LedgerRequest("append", entry=entry), LedgerRequest("checkpoint"),
                    LedgerRequest("checkpoint", size=3), LedgerRequest("proof", index=2),
                    LedgerRequest("proof", index=2, size=5),
                    LedgerRequest("consistency", old=1, new=4), LedgerRequest("rankings")):
        assert parse_request(wire(request.to_message("l"))) == request


@pytest.mark.parametrize(("bad", "text"), [
    ({"op": "erase"}, "unknown op"),
    ({"op": "append", "entry": "text"}, "'entry' must be bytes"),
    ({"op": "append", "entry": b"\xa0"}, "not a veilnet ledger entry"),
    ({"op": "proof"}, "'index' is required"),
    ({"op": "proof", "index": -1}, "'index' must be an integer >= 0"),
    ({"op": "consistency", "old": True}, "'old' must be an integer >= 0"),
    ({"op": "checkpoint", "size": "3"}, "'size' must be an integer >= 0"),
])
def test_ledger_request_refusals(bad: dict[str, Any], text: str) -> None:
    assert text in refused_with("bad_request", parse_request, {"v": 1, "id": "l", **bad})


def test_an_entry_bomb_from_a_peer_is_refused_before_decoding() -> None:
    # 1 MiB of CBOR: a map whose one value is an array of a million empty arrays. cbor2 would
    # build a million lists (tens of MB); the item walk stops at 65537 items.
    count = (1 << 20) - 8  # the header below is 8 bytes: map(1), "a", array(count)
    bomb = b"\xa1\x61a\x9a" + count.to_bytes(4, "big") + b"\x80" * count
    started = time.perf_counter()
    with pytest.raises(EntryError, match="more than 65536"):
        entry_from_peer(bomb)
    assert time.perf_counter() - started < 1.0
    with pytest.raises(EntryError, match="1 to 1048576 bytes"):
        entry_from_peer(b"\xa0" * ((1 << 20) + 1))
    good = make_entry(Identity.generate(), "score-report/1", {"scores": {}})
    assert entry_from_peer(good).type == "score-report/1"


# -- /veilnet/witness/1 -------------------------------------------------------------------------

def test_witness_offer_and_answers_round_trip() -> None:
    offer = Offer("note text\n", 3, [b"\x01" * 32, b"\x02" * 32])
    assert parse_offer(wire(offer.to_message("w"))) == offer
    assert parse_answer(wire(cosigned("w", "— line"))).cosignature == "— line"
    answer = parse_answer(wire(refused("w", "conflict", "I saw 7", 7)))
    assert (answer.cosignature, answer.reason, answer.size) == (None, "conflict", 7)
    odd = parse_answer({"v": 1, "id": "w"})
    assert odd.cosignature is None and odd.reason is None


@pytest.mark.parametrize("bad", [
    {"note": 1, "old": 0, "proof": []},
    {"note": "n" * 65537, "old": 0, "proof": []},
    {"note": "n", "old": -1, "proof": []},
    {"note": "n", "old": 0, "proof": [b"h"] * 129},
    {"note": "n", "old": 0, "proof": ["h"]},
    {"note": "n", "old": True, "proof": []},  # found by tests/unit/fuzz: CBOR true is no size
])
def test_witness_offer_refusals(bad: dict[str, Any]) -> None:
    refused_with("bad_request", parse_offer, {"v": 1, "id": "w", **bad})


# -- /veilnet/shard/1 ---------------------------------------------------------------------------

def test_shard_request() -> None:
    assert parse_shard_request({"v": 1, "id": "s", "cid": CID}) == CID
    for bad in ("", CID[:-1], "Qm" + "a" * 44, 5):
        refused_with("bad_request", parse_shard_request, {"v": 1, "id": "s", "cid": bad})
