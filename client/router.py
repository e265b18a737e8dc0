"""Which nodes a client asks for a hop, and what it remembers about them.

``Router`` holds the nodes the client learnt from verified agent cards (``learn``), and ranks
the providers of a shard (``plan``): by this client's own reputation view once it has seen a
verdict of the node, else by the network's ranking (from a ledger node), else the neutral
prior; with some randomness so new nodes get traffic; nodes caught lying last; nodes in
backoff after a failure (``health``, client/health.py) left out unless every provider is.
A check (a spot check's second node) draws from the rest uniformly instead (``audit_order``).

Every hop runner reports to it the same way, whatever the verify mode or the encryption:
``answered`` (resets the backoff, records availability and latency), ``failed`` (backoff and a
failed availability: the node is demoted in every mode) and ``verdict`` (agreement; a loser is
caught and avoided from then on).
"""

from __future__ import annotations

import logging
import random
from collections.abc import Iterable
from typing import Any

from client.health import PeerHealth
from consensus.reputation import Reputation
from protocols.peers import PeerRecord
from registry.card import CardInfo

log = logging.getLogger("veilnet.client")
EXPLORATION = 0.2  # random score bonus in [0, EXPLORATION) when ranking candidates


class Router:
    def __init__(self, rng: random.Random | None = None) -> None:
        self.rng = rng or random.Random()
        self.peers: dict[str, PeerRecord] = {}  # peer id -> record, from verified cards
        self.health = PeerHealth()  # failures and backoff per peer, latency for hedging
        self.reputation = Reputation()
        self.caught: set[str] = set()  # nodes that lost a decided verdict: avoided from now on
        self.rankings: dict[str, float] = {}  # did -> score in the network's ranking snapshot

    def learn(self, cards: Iterable[CardInfo]) -> None:
        """Route to the nodes these (verified) cards describe."""
        for card in cards:
            self.peers[card.peer_id] = PeerRecord(card.peer_id, card.did, card.multiaddrs,
                                                  card.shard_cids, card.http)

    def providers(self, shard_cid: str) -> list[PeerRecord]:
        """Nodes known to serve ``shard_cid``, by PeerID (``plan`` ranks them)."""
        return sorted((r for r in self.peers.values() if shard_cid in r.shards),
                      key=lambda r: r.peer_id)

    def plan(self, shard_cid: str) -> list[PeerRecord]:
        """Nodes to ask for a hop, best first (see the module docstring)."""
        providers = self.providers(shard_cid)
        ready = [r for r in providers if not self.health.backoff_left(r.peer_id)]
        if not ready:
            return sorted(providers, key=lambda r: self.health.backoff_left(r.peer_id))
        honest = [r for r in ready if r.peer_id not in self.caught]
        liars = [r for r in ready if r.peer_id in self.caught]
        ranked = sorted(honest, key=lambda r: -(self.score(r.peer_id)
                                                 + self.rng.uniform(0, EXPLORATION)))
        return ranked + liars

    def audit_order(self, records: Iterable[PeerRecord]) -> list[PeerRecord]:
        """``records`` for a check: uniformly shuffled, caught nodes last. A check must not
        follow the ranking: a node the ranking starves of traffic (new, or never asked because
        honest nodes built up agreement first) would then never be checked, and a node could
        predict whether it is the checker."""
        pool = list(records)
        self.rng.shuffle(pool)
        return ([r for r in pool if r.peer_id not in self.caught]
                + [r for r in pool if r.peer_id in self.caught])

    def backed_off(self, shard_cid: str, planned: Iterable[PeerRecord]) -> list[PeerRecord]:
        """The providers of the shard left out of ``planned`` (backed off after failures),
        soonest back first: a hop asks them only when the planned nodes cannot decide it."""
        asked = {r.peer_id for r in planned}
        return sorted((r for r in self.providers(shard_cid) if r.peer_id not in asked),
                      key=lambda r: self.health.backoff_left(r.peer_id))

    def skipped(self, shard_cid: str, planned: Iterable[PeerRecord]) -> list[str]:
        """``"<peer id>: why"`` for each provider of the shard left out of ``planned``."""
        asked = {r.peer_id for r in planned}
        return [f"{r.peer_id}: {self.health.skip_note(r.peer_id)}"
                for r in self.providers(shard_cid) if r.peer_id not in asked]

    def score(self, peer_id: str) -> float:
        if self.reputation.stats(peer_id).observations == 0:
            record = self.peers.get(peer_id)
            ranked = self.rankings.get(record.did) if record else None
            if ranked is not None:
                return ranked
        return self.reputation.score(peer_id)

    def answered(self, peer_id: str, latency_ms: float) -> None:
        """``peer_id`` answered a hop in ``latency_ms``."""
        self.reputation.record_availability(peer_id, True)
        self.reputation.record_latency(peer_id, latency_ms)
        self.health.succeeded(peer_id, latency_ms)

    def failed(self, peer_id: str, reason: str) -> None:
        """``peer_id`` failed a hop: it is skipped for a while and its availability drops."""
        self.reputation.record_availability(peer_id, False)
        backoff = self.health.failed(peer_id, reason)
        log.info("%s failed (%s); skipped for %.0f s", peer_id, reason, backoff)

    def verdict(self, winners: Iterable[str], losers: Iterable[str]) -> None:
        """A decided verdict: winners agreed; losers are caught and avoided from now on."""
        for node in winners:
            self.reputation.record_verdict(node, True)
        for node in losers:
            self.reputation.record_verdict(node, False)
            self.caught.add(node)

    def report(self) -> dict[str, dict[str, Any]]:
        """This client's reputation view by node did (a ``score-report/1`` body's scores)."""
        return {self.peers[p].did: row for p, row in self.reputation.report().items()
                if p in self.peers}


__all__ = ["EXPLORATION", "Router"]
