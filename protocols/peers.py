"""``/veilnet/peers/1``: peer hello. A node sends its own record to its bootstrap nodes and
learns the records they know; a client sends none.

``request: {"v": 1, "id", "node": <node record> | null}``;
``response: {"v": 1, "id", "node": <the answering node's record>, "peers": [<node record>]}``
(docs/protocol.md). A record sent as ``node`` must name the PeerID of the stream it came on
(Noise-authenticated); records in ``peers`` are relayed, unauthenticated claims that only steer
routing. Every list is bounded (``MAX_ADDRS``, ``MAX_SHARDS``, ``MAX_KNOWN_PEERS``).
"""

from __future__ import annotations

import logging
import secrets
import time
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass, field
from typing import Any

from libp2p.abc import IHost
from libp2p.custom_types import TProtocol

from crypto.identity import IdentityError, did_from_peer_id
from errors import InputError
from models import is_valid_cid
from protocols.transport import connect, peer_info, request
from protocols.wire import WireError, envelope

log = logging.getLogger("veilnet.peers")

PEERS = TProtocol("/veilnet/peers/1")
MAX_ADDRS = 8
MAX_SHARDS = 256
MAX_ADDR_CHARS = 300  # a multiaddr, and the http URL
MAX_PEER_ID_CHARS = 64  # an Ed25519 PeerID has 52 characters
# Records a node keeps (the oldest goes first) and relays in one response. A response of this
# many records, each at the limits above, stays under the frame's item limit (protocols/wire.py):
# 128 * (8 + 256 + 14) items, about 36k of MAX_FRAME_ITEMS = 65536.
MAX_KNOWN_PEERS = 128


@dataclass
class PeerRecord:
    peer_id: str
    did: str
    addrs: list[str]
    shards: list[str]
    http: str | None = None
    last_seen: float = field(default_factory=time.time)

    def to_json(self) -> dict[str, Any]:
        doc = asdict(self)
        doc["age"] = round(max(0.0, time.time() - doc.pop("last_seen")), 3)
        return doc


def parse_record(doc: Any, authenticated_peer: str | None = None) -> PeerRecord:
    """A PeerRecord from a peers-protocol map; raises InputError naming what is wrong."""
    if not isinstance(doc, dict):
        raise InputError("a node record must be a map")
    peer_id = doc.get("peer_id")
    if not isinstance(peer_id, str) or not 0 < len(peer_id) <= MAX_PEER_ID_CHARS:
        raise InputError(f"node record: 'peer_id' must be a string of at most "
                         f"{MAX_PEER_ID_CHARS} characters")
    if authenticated_peer is not None and peer_id != authenticated_peer:
        raise InputError(f"node record names {peer_id} but came from {authenticated_peer}")
    try:
        did = did_from_peer_id(peer_id)
    except IdentityError as exc:
        raise InputError(f"node record: {exc}") from None
    addrs, shards, http = doc.get("addrs"), doc.get("shards"), doc.get("http")
    if (not isinstance(addrs, list) or len(addrs) > MAX_ADDRS
            or not all(isinstance(a, str) and len(a) < MAX_ADDR_CHARS for a in addrs)):
        raise InputError(f"node record: 'addrs' must be a list of at most {MAX_ADDRS} strings "
                         f"of less than {MAX_ADDR_CHARS} characters")
    if (not isinstance(shards, list) or len(shards) > MAX_SHARDS
            or not all(isinstance(c, str) and is_valid_cid(c) for c in shards)):
        raise InputError(f"node record: 'shards' must be a list of at most {MAX_SHARDS} CIDs")
    if http is not None and not (isinstance(http, str) and len(http) < MAX_ADDR_CHARS):
        raise InputError(f"node record: 'http' must be a URL string of less than "
                         f"{MAX_ADDR_CHARS} characters")
    return PeerRecord(peer_id, did, list(addrs), list(shards), http)


def parse_hello(message: Mapping[str, Any], sender: str) -> PeerRecord | None:
    """The record a hello carries (None for a client's); WireError ``bad_request`` when it is
    malformed or names another PeerID than ``sender``, the stream's."""
    if message.get("node") is None:
        return None
    try:
        return parse_record(message["node"], authenticated_peer=sender)
    except InputError as exc:
        raise WireError("bad_request", str(exc)) from None


def hello_answer(request_id: str, own: PeerRecord,
                 others: Iterable[PeerRecord]) -> dict[str, Any]:
    """The answer to a hello: this node's record and the records it relays."""
    return {**envelope(request_id), "node": own.to_json(),
            "peers": [r.to_json() for r in others]}


async def exchange_peers(host: IHost, addr: str, own: PeerRecord | None, timeout: float,
                         dial_timeout: float | None = None,
                         ) -> tuple[PeerRecord, list[tuple[PeerRecord, float]]]:
    """Say hello to the node at ``addr`` over /veilnet/peers/1 (with ``own`` record, or none
    for a client). Returns its record, checked against the PeerID the stream reached, and the
    records it relays with their age in seconds; a malformed relayed record is logged and
    skipped."""
    info = peer_info(addr)
    await connect(host, info, dial_timeout or timeout)
    response = await request(host, info.peer_id, PEERS, {
        **envelope(secrets.token_hex(8)), "node": own.to_json() if own else None}, timeout)
    try:
        responder = parse_record(response.get("node"), str(info.peer_id))
    except InputError as exc:
        raise WireError("bad_response", str(exc)) from None
    relayed = []
    relayed_docs = response.get("peers")
    for doc in relayed_docs[:MAX_KNOWN_PEERS] if isinstance(relayed_docs, list) else []:
        try:
            relayed.append((parse_record(doc), _age(doc)))
        except InputError as exc:
            log.info("%s relayed a bad node record: %s", addr, exc)
    return responder, relayed


def _age(doc: Any) -> float:
    age = doc.get("age") if isinstance(doc, dict) else None
    return float(age) if isinstance(age, int | float) and 0 <= age < 1e9 else 0.0


__all__ = ["MAX_ADDRS", "MAX_KNOWN_PEERS", "MAX_SHARDS", "PEERS", "PeerRecord", "exchange_peers",
           "hello_answer", "parse_hello", "parse_record"]
