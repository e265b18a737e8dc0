"""What a node knows of other nodes: the peer records learnt over /veilnet/peers/1
(protocols/peers.py), kept at most ``ttl`` seconds without news and at most ``capacity`` of them.

The records steer routing and fill ``/v1/peers``; discovery itself uses signed agent cards
(node/discovery.py). A record is what a peer said about itself over a Noise-authenticated
stream, or what a bootstrap node relayed.
"""

from __future__ import annotations

import time

from protocols.peers import MAX_KNOWN_PEERS, PeerRecord


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

    def records(self) -> list[PeerRecord]:
        cutoff = time.time() - self.ttl
        for pid in [p for p, r in self._peers.items() if r.last_seen < cutoff]:
            del self._peers[pid]
        return sorted(self._peers.values(), key=lambda r: r.peer_id)


__all__ = ["PeerTable"]
