"""What a node knows of other nodes: addresses and shards, learnt over /veilnet/peers/1.

Until signed agent cards arrive (discovery issue), entries are what peers said about themselves
over a Noise-authenticated stream (the PeerID is the authenticated one), or what a bootstrap node
relayed. The client never trusts an entry for more than routing: every response it uses is
signed by the PeerID it actually reached.
"""

from __future__ import annotations

import logging
import secrets
import time
from dataclasses import asdict, dataclass, field
from typing import Any

from libp2p.abc import IHost

from crypto.identity import IdentityError, did_from_peer_id
from models import is_valid_cid
from node.p2p import PEERS, connect, peer_info, request
from node.wire import WIRE_VERSION

log = logging.getLogger("veilnet.peers")

MAX_ADDRS = 8
MAX_SHARDS = 256
MAX_ADDR_CHARS = 300  # a multiaddr, and the http URL
MAX_PEER_ID_CHARS = 64  # an Ed25519 PeerID has 52 characters
# Records a node keeps (the oldest goes first) and relays in one response. A response of this
# many records, each at the limits above, stays under the frame's item limit (node/wire.py):
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
    """A PeerRecord from a peers-protocol map; raises ValueError naming what is wrong."""
    if not isinstance(doc, dict):
        raise ValueError("a node record must be a map")
    peer_id = doc.get("peer_id")
    if not isinstance(peer_id, str) or not 0 < len(peer_id) <= MAX_PEER_ID_CHARS:
        raise ValueError(f"node record: 'peer_id' must be a string of at most "
                         f"{MAX_PEER_ID_CHARS} characters")
    if authenticated_peer is not None and peer_id != authenticated_peer:
        raise ValueError(f"node record names {peer_id} but came from {authenticated_peer}")
    try:
        did = did_from_peer_id(peer_id)
    except IdentityError as exc:
        raise ValueError(f"node record: {exc}") from None
    addrs, shards, http = doc.get("addrs"), doc.get("shards"), doc.get("http")
    if (not isinstance(addrs, list) or len(addrs) > MAX_ADDRS
            or not all(isinstance(a, str) and len(a) < MAX_ADDR_CHARS for a in addrs)):
        raise ValueError(f"node record: 'addrs' must be a list of at most {MAX_ADDRS} strings "
                         f"of less than {MAX_ADDR_CHARS} characters")
    if (not isinstance(shards, list) or len(shards) > MAX_SHARDS
            or not all(isinstance(c, str) and is_valid_cid(c) for c in shards)):
        raise ValueError(f"node record: 'shards' must be a list of at most {MAX_SHARDS} CIDs")
    if http is not None and not (isinstance(http, str) and len(http) < MAX_ADDR_CHARS):
        raise ValueError(f"node record: 'http' must be a URL string of less than "
                         f"{MAX_ADDR_CHARS} characters")
    return PeerRecord(peer_id, did, list(addrs), list(shards), http)


class PeerTable:
    def __init__(self, ttl: float = 60.0, capacity: int = MAX_KNOWN_PEERS) -> None:
        self.ttl = ttl
        self.capacity = capacity
        self._peers: dict[str, PeerRecord] = {}

    def upsert(self, record: PeerRecord, age: float = 0.0) -> None:
        """Add or refresh a record; ``age`` is how long ago a relaying peer last heard of it.
        A full table drops its expired records, then its least recently seen one."""
        record.last_seen = time.time() - age
        known = self._peers.get(record.peer_id)
        if known is None and len(self._peers) >= self.capacity:
            self.records()
            if len(self._peers) >= self.capacity:
                oldest = min(self._peers.values(), key=lambda r: r.last_seen)
                if oldest.last_seen > record.last_seen:
                    return  # older news than anything kept
                del self._peers[oldest.peer_id]
        if known is None or known.last_seen <= record.last_seen:
            self._peers[record.peer_id] = record

    def touch(self, peer_id: str) -> None:
        if peer_id in self._peers:
            self._peers[peer_id].last_seen = time.time()

    def remove(self, peer_id: str) -> None:
        self._peers.pop(peer_id, None)

    def records(self) -> list[PeerRecord]:
        cutoff = time.time() - self.ttl
        for pid in [p for p, r in self._peers.items() if r.last_seen < cutoff]:
            del self._peers[pid]
        return sorted(self._peers.values(), key=lambda r: r.peer_id)


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
        "v": WIRE_VERSION, "id": secrets.token_hex(8),
        "node": own.to_json() if own else None}, timeout)
    responder = parse_record(response.get("node"), str(info.peer_id))
    relayed = []
    relayed_docs = response.get("peers")
    for doc in relayed_docs[:MAX_KNOWN_PEERS] if isinstance(relayed_docs, list) else []:
        try:
            relayed.append((parse_record(doc), _age(doc)))
        except ValueError as exc:
            log.info("%s relayed a bad node record: %s", addr, exc)
    return responder, relayed


def _age(doc: Any) -> float:
    age = doc.get("age") if isinstance(doc, dict) else None
    return float(age) if isinstance(age, int | float) and 0 <= age < 1e9 else 0.0
