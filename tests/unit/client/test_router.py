"""client/router.py: which nodes a client asks, and what it remembers, from real signed cards.

A failed node is demoted the same way whatever runs the hop (replicated, spot, none, CKKS all
report through ``Router.failed``): skipped while it backs off, then ranked below nodes that
answered, because its availability dropped.
"""

from __future__ import annotations

import random

from client.health import PeerHealth
from client.router import Router
from crypto.identity import Identity
from registry.card import ServedShard, build_card, verify_card

DEPLOY = "bafkrei" + "d" * 52
SHARD_A, SHARD_B = "bafkrei" + "a" * 52, "bafkrei" + "b" * 52


def card(identity: Identity, *shards: str):
    served = [ServedShard(DEPLOY, "m", cid, i + 1, "ee-encoder/1") for i, cid in enumerate(shards)]
    return verify_card(build_card(identity, a2a_url="http://127.0.0.1:1/a2a",
                                  multiaddrs=[f"/ip4/127.0.0.1/tcp/4001/p2p/{identity.peer_id}"],
                                  shards=served))


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def network(n: int = 3) -> tuple[Router, list[Identity], Clock]:
    nodes = [Identity.generate() for _ in range(n)]
    router = Router(random.Random(1))
    clock = Clock()
    router.health = PeerHealth(base=5.0, cap=60.0, clock=clock)
    router.learn([card(nodes[0], SHARD_A, SHARD_B), card(nodes[1], SHARD_A),
                  *(card(x, SHARD_A, SHARD_B) for x in nodes[2:])])
    return router, nodes, clock


def test_learn_and_providers() -> None:
    router, nodes, _ = network()
    assert {r.peer_id for r in router.providers(SHARD_A)} == {x.peer_id for x in nodes}
    assert {r.peer_id for r in router.providers(SHARD_B)} == {nodes[0].peer_id,
                                                              nodes[2].peer_id}
    assert router.providers("bafkrei" + "c" * 52) == []
    assert router.peers[nodes[1].peer_id].did == nodes[1].did


def test_a_failed_node_is_skipped_then_demoted() -> None:
    router, nodes, clock = network()
    bad = nodes[0].peer_id
    for other in nodes[1:]:
        router.answered(other.peer_id, 20.0)
    router.answered(bad, 20.0)
    router.failed(bad, "no answer within 30 s")
    assert bad not in {r.peer_id for r in router.plan(SHARD_A)}  # backing off
    assert router.skipped(SHARD_A, router.plan(SHARD_A)) == [
        f"{bad}: {router.health.skip_note(bad)}"]
    clock.now += 6.0  # the backoff ran out: planned again, with a lower availability score
    assert bad in {r.peer_id for r in router.plan(SHARD_A)}
    assert router.reputation.stats(bad).availability < 1.0
    assert router.score(bad) < min(router.score(x.peer_id) for x in nodes[1:])


def test_every_provider_backed_off_are_tried_soonest_first() -> None:
    router, nodes, _ = network()
    router.failed(nodes[0].peer_id, "x")
    router.failed(nodes[0].peer_id, "x")  # 10 s
    router.failed(nodes[2].peer_id, "x")  # 5 s
    assert [r.peer_id for r in router.plan(SHARD_B)] == [nodes[2].peer_id, nodes[0].peer_id]


def test_backed_off_nodes_are_the_hops_reserve_soonest_back_first() -> None:
    router, nodes, _ = network(4)
    router.failed(nodes[0].peer_id, "x")
    router.failed(nodes[0].peer_id, "x")  # 10 s
    router.failed(nodes[3].peer_id, "x")  # 5 s
    planned = router.plan(SHARD_A)
    assert {r.peer_id for r in planned} == {nodes[1].peer_id, nodes[2].peer_id}
    # run_hop asks these only when the planned nodes cannot give a verdict its two answers
    assert [r.peer_id for r in router.backed_off(SHARD_A, planned)] == [
        nodes[3].peer_id, nodes[0].peer_id]


def test_a_verdict_loser_is_caught_and_planned_last() -> None:
    router, nodes, _ = network()
    liar = nodes[1].peer_id
    router.verdict([nodes[0].peer_id, nodes[2].peer_id], [liar])
    assert liar in router.caught
    for _ in range(20):
        assert router.plan(SHARD_A)[-1].peer_id == liar
    assert router.reputation.stats(liar).agreement < router.reputation.stats(
        nodes[0].peer_id).agreement


def test_network_rankings_order_nodes_the_client_has_not_seen() -> None:
    router, nodes, _ = network()
    router.rankings = {nodes[0].did: 0.05, nodes[1].did: 0.9, nodes[2].did: 0.95}
    for _ in range(20):
        assert router.plan(SHARD_A)[-1].peer_id == nodes[0].peer_id
    router.verdict([nodes[0].peer_id], [])  # its own observation now wins over the ranking
    assert router.score(nodes[0].peer_id) == router.reputation.score(nodes[0].peer_id)


def test_report_is_keyed_by_did_of_known_nodes() -> None:
    router, nodes, _ = network()
    router.answered(nodes[0].peer_id, 12.0)
    router.answered("12D3KooWunknown", 12.0)
    report = router.report()
    assert set(report) == {nodes[0].did}
    assert report[nodes[0].did]["latency_ms"] == 12.0


def test_a_starved_node_is_still_drawn_as_checker() -> None:
    """Two nodes with a record of agreement outrank a node never asked by more than the
    exploration bonus, so the ranking alone never plans it second; the checker draw (uniform
    over the rest) picks it about half the time."""
    router, nodes, _ = network(4)
    starved = nodes[3].peer_id
    for _ in range(40):
        router.verdict([nodes[0].peer_id, nodes[2].peer_id], [])
        router.answered(nodes[0].peer_id, 10.0)
        router.answered(nodes[2].peer_id, 10.0)
    plans = [router.plan(SHARD_B) for _ in range(200)]
    assert all(starved not in {p[0].peer_id, p[1].peer_id} for p in plans)
    drawn = [router.audit_order(p[1:])[0].peer_id for p in plans]
    assert 0.35 < drawn.count(starved) / len(drawn) < 0.65
    router.verdict([nodes[0].peer_id], [starved])  # once caught, never drawn before the others
    assert all(router.audit_order(router.plan(SHARD_B)[1:])[-1].peer_id == starved
               for _ in range(50))
