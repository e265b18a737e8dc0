"""Which two nodes may form a masked/1 pair (client/masked_hop.py)."""

from __future__ import annotations

from client.masked_hop import partner, separate_operators
from protocols.peers import PeerRecord


def node(name: str, did: str | None = None, *addrs: str) -> PeerRecord:
    return PeerRecord(f"peer-{name}", did or f"did:key:{name}",
                      list(addrs) or [f"/ip4/127.0.0.1/tcp/{4000 + ord(name[0])}"], ["s"])


def test_loopback_testnet_nodes_pair_up() -> None:
    assert separate_operators(node("a"), node("b"))


def test_same_did_or_address_or_host_is_one_operator() -> None:
    assert not separate_operators(node("a", "did:key:same"), node("b", "did:key:same"))
    shared = "/ip4/127.0.0.1/tcp/4100"
    assert not separate_operators(node("a", None, shared), node("b", None, shared))
    a = node("a", None, "/ip4/203.0.113.5/tcp/4001")
    b = node("b", None, "/ip4/203.0.113.5/tcp/4002")  # same machine, another port
    assert not separate_operators(a, b)
    c = node("c", None, "/ip4/198.51.100.7/tcp/4001")
    assert separate_operators(a, c)
    assert not separate_operators(a, a)


def test_partner_is_the_best_ranked_node_of_another_operator() -> None:
    b = node("b", None, "/ip4/198.51.100.7/tcp/1")
    a = node("a", None, "/ip4/203.0.113.5/tcp/1")
    a2 = node("x", None, "/ip4/203.0.113.5/tcp/2")  # a's operator again
    b2 = node("y", None, "/ip4/198.51.100.7/tcp/2")  # b's operator again
    assert partner([b2, a, a2], b, set()) == a  # b's own operator is skipped
    assert partner([a, a2], b, {a.peer_id}) == a2
    assert partner([b, b2], b, set()) is None
    assert partner([a], b, {a.peer_id}) is None
