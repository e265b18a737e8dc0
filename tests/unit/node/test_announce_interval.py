"""A node's announce interval: bounded by the card lifetime (issue 12 item 9), and growing with
the number of cards known so the gossip a node receives stays bounded (issue 17 item 5)."""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any

import pytest

from node.discovery import GREETERS, MAX_INTERVAL_S, Discovery, announce_interval
from node.metrics import NodeMetrics
from registry.card import MAX_TTL_S, MIN_TTL_S, build_card, card_ttl, verify_card
from registry.index import CardIndex


def test_announce_interval_is_bounded_by_the_card_lifetime(tmp_path: Path) -> None:
    """A node's own cards must stay within MAX_TTL_S (3 intervals): longer intervals are refused
    at start with a clear error instead of producing cards every peer rejects."""
    from node.config import ConfigError, NodeConfig

    NodeConfig(data_dir=tmp_path, announce_interval=MAX_TTL_S / 3).check()
    with pytest.raises(ConfigError, match="announce_interval 1201: at most 1200 s"):
        NodeConfig(data_dir=tmp_path, announce_interval=1201).check()
    with pytest.raises(ConfigError, match="card_rate must be a positive number"):
        NodeConfig(data_dir=tmp_path, card_rate=0).check()


@pytest.mark.parametrize("cards", [1, 20, 21, 100, 2400, 10_000, 10**6])
def test_the_gossip_a_node_receives_is_bounded(cards: int) -> None:
    """With ``cards`` nodes each announcing once per interval, a node receives cards / interval
    cards a second: at most card_rate until the interval reaches its cap, never more than
    cards / MAX_INTERVAL_S; a card outlives two missed announcements and stays acceptable."""
    base, rate = 10.0, 2.0
    interval = announce_interval(base, cards, rate)
    assert base <= interval <= MAX_INTERVAL_S
    received = cards / interval
    assert received <= max(rate, cards / MAX_INTERVAL_S) + 1e-9
    if cards / rate <= MAX_INTERVAL_S:
        assert received <= rate + 1e-9
        assert interval == max(base, cards / rate)  # no slower than needed
    ttl = card_ttl(interval)
    assert ttl >= min(3 * interval, MAX_TTL_S) and ttl >= MIN_TTL_S and ttl <= MAX_TTL_S


def test_a_node_signs_cards_for_its_current_interval(tmp_path: Path) -> None:
    """Discovery signs its own card for three of the interval the index size calls for, and
    peers accept that card (its validity is within MAX_TTL_S)."""
    from crypto.identity import Identity

    me = Identity.generate()
    index = CardIndex(tmp_path / "cards.sqlite")
    try:
        for _ in range(60):  # 60 other cards known, at 2 cards/s: a 30 s interval
            other = Identity.generate()
            index.put(verify_card(build_card(other, a2a_url="http://127.0.0.1:9/a2a",
                                             multiaddrs=[], shards=[], ttl=300)))
        ttls: list[float] = []

        def make(ttl: float) -> dict[str, Any]:
            ttls.append(ttl)
            return build_card(me, a2a_url="http://127.0.0.1:9/a2a", multiaddrs=[], shards=[],
                              ttl=ttl)

        discovery = Discovery(me.peer_id, index, NodeMetrics(), make, 10.0, card_rate=2.0)
        card = discovery.refresh_card()
        assert discovery.interval == pytest.approx(30.0)  # 60 cards / 2 per s
        assert ttls == [pytest.approx(90.0)]
        info = verify_card(card)
        assert info.expires_at - info.issued_at == 90
        discovery.card_rate = 0.01  # a cap: 61 cards would ask for 6100 s
        info = verify_card(discovery.refresh_card())
        assert discovery.interval == MAX_INTERVAL_S
        assert info.expires_at - info.issued_at == MAX_TTL_S
    finally:
        index.close()


def test_about_greeters_nodes_greet_a_newcomer(tmp_path: Path) -> None:
    """A node answers a newcomer's card with its own with probability GREETERS / cards known
    (Discovery.accept): over many newcomers it greets about GREETERS / N of them, so a join
    costs the network about GREETERS announcements, not one per node."""
    from crypto.identity import Identity

    def card_of(identity: Identity) -> Any:
        return verify_card(build_card(identity, a2a_url="http://127.0.0.1:9/a2a",
                                      multiaddrs=[], shards=[], ttl=300))

    me = Identity.generate()
    index = CardIndex(tmp_path / "cards.sqlite")
    try:
        for _ in range(159):
            index.put(card_of(Identity.generate()))
        discovery = Discovery(me.peer_id, index, NodeMetrics(), lambda ttl: {}, 10.0,
                              rng=random.Random(3))
        newcomers = [card_of(Identity.generate()) for _ in range(400)]

        asked: list[float] = []
        discovery.announce_soon = asked.append  # type: ignore[method-assign]

        for info in newcomers:
            assert discovery.accept(info) == "new"
        greeted = len(asked)
        # 160 to 559 cards known: p = 16/160 .. 16/559, about 40 expected of 400
        expected = sum(GREETERS / (160 + i) for i in range(400))
        assert abs(greeted - expected) < 4 * expected ** 0.5, (greeted, expected)
        assert 0 < greeted < 100  # not every newcomer
    finally:
        index.close()
