"""Discovery by signed agent cards, against real node processes.

- A gossipsub peer living in this process (a real py-libp2p host with py-libp2p's own Pubsub and
  GossipSub) joins ``veilnet/cards/1`` next to a real node and publishes forged cards; the node
  must drop each with its reason (log and /metrics) and index only the honest one.
- ``POST /v1/agents`` applies the same checks; cards expire from the index.
- A real A2A client (a2a-sdk) fetches and verifies the node's card and calls its JSON-RPC
  endpoint with an encrypted shard request; the ANP documents are checked with the ``anp``
  package and our own verifier.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import copy
import json
import sys
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
import trio
from a2a.client import A2ACardResolver, ClientConfig, ClientFactory
from a2a.types import Message, Role, SendMessageRequest
from a2a.utils.signing import create_signature_verifier
from anp.anp_crawler.anp_parser import ANPDocumentParser
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
from google.protobuf.json_format import MessageToDict, ParseDict
from libp2p.abc import IHost
from libp2p.peer.id import ID
from libp2p.pubsub.gossipsub import PROTOCOL_ID, PROTOCOL_ID_V11, GossipSub
from libp2p.pubsub.pubsub import Pubsub
from libp2p.tools.anyio_service import background_trio_service
from node_helpers import (
    ClientThread,
    NodeProcess,
    metric_value,
    serving_node,
    start_node,
    stop_at_teardown,
    wait_for,
)
from protocol_fixtures import Hop

from crypto.identity import Identity, public_from_did, verify
from protocols.cards import CARDS_TOPIC, lookup_cards
from protocols.infer import receipt_payload
from protocols.transport import connect, full_addrs, peer_info
from protocols.wire import tensors_digest
from registry.a2a_rpc import infer_request_from_part, infer_response_from_part
from registry.anp import verify_agent_description
from registry.card import CardRejected, ServedShard, build_card, sign_card, verify_card

pytest_plugins = ["protocol_fixtures"]

WAIT = 15.0


# -- fixtures -------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def node1(request: pytest.FixtureRequest, deployment_dir: Path,
          tmp_path_factory: pytest.TempPathFactory) -> NodeProcess:
    """This module's own node (not protocol_fixtures' session-wide one): its tests post and
    gossip cards to it and watch its card index and topic mesh."""
    return serving_node(request, tmp_path_factory.mktemp("discovery-node1") / "D",
                        deployment_dir, "--request-timeout", "20")


@contextlib.asynccontextmanager
async def card_pubsub(host: IHost) -> AsyncIterator[tuple[Pubsub, GossipSub, Any]]:
    router = GossipSub([PROTOCOL_ID_V11, PROTOCOL_ID], degree=6, degree_low=4, degree_high=12,
                       heartbeat_interval=1)
    pubsub = Pubsub(host, router)
    async with background_trio_service(pubsub), background_trio_service(router):
        await pubsub.wait_until_ready()
        subscription = await pubsub.subscribe(CARDS_TOPIC)
        yield pubsub, router, subscription


@pytest.fixture(scope="module")
def gossip(node1: NodeProcess) -> Iterator[ClientThread]:
    """A gossipsub peer on the card topic, connected to node1, in node1's topic mesh."""
    peer = ClientThread(services=card_pubsub).start()
    try:
        peer.run(lambda host: connect(host, peer_info(node1.addr), 10))
        _, router, _ = peer.extra
        node_id = ID.from_base58(node1.peer_id)
        wait_for(lambda: node_id in router.mesh.get(CARDS_TOPIC, set()), "a mesh with node1")
        yield peer
    finally:
        peer.close()


def publish(peer: ClientThread, data: bytes) -> None:
    pubsub = peer.extra[0]
    peer.run(lambda host: pubsub.publish(CARDS_TOPIC, data))


def metrics(node: NodeProcess) -> str:
    return httpx.get(f"{node.http}/metrics", timeout=5).text


def indexed(node: NodeProcess, **params: str) -> dict[str, dict[str, Any]]:
    cards = httpx.get(f"{node.http}/v1/agents", params=params, timeout=5).json()
    return {verify_card(c).peer_id: c for c in cards}


def card_of(identity: Identity, hop: Hop, *, addrs: list[str] | None = None,
            **kw: Any) -> dict[str, Any]:
    shard = ServedShard(hop.manifest_cid, hop.manifest.name, hop.shard.cid, hop.shard.index)
    return build_card(identity, a2a_url="http://127.0.0.1:9/a2a",
                      multiaddrs=addrs or ["/ip4/127.0.0.1/tcp/9"], shards=[shard], **kw)


# -- gossipsub ---------------------------------------------------------------------------------

def test_node_greets_a_new_mesh_peer_with_its_card(gossip: ClientThread,
                                                   node1: NodeProcess) -> None:
    """node1 publishes its card when our peer joins its mesh: we get it without asking."""
    subscription = gossip.extra[2]

    async def next_card(host: IHost) -> dict[str, Any]:
        with trio.fail_after(WAIT):
            while True:
                msg = await subscription.get()
                card = json.loads(msg.data)
                if ID(msg.from_id).to_base58() == node1.peer_id:
                    return card

    info = verify_card(gossip.run(next_card), origin_peer=node1.peer_id)
    assert info.did == node1.info["did"]
    assert set(info.shard_cids) == set(node1.info["shards"])
    assert info.multiaddrs == node1.info["multiaddrs"]


def forgeries(gossip: ClientThread, hop: Hop) -> Iterator[tuple[str, bytes]]:
    """(reason, message data) for cards the node must drop, all published by our peer."""
    other = Identity.generate()
    mine = gossip.identity
    yield "origin-mismatch", json.dumps(card_of(other, hop)).encode()  # a valid card, not ours
    tampered = card_of(mine, hop)
    tampered["capabilities"]["extensions"][0]["params"]["multiaddrs"] = ["/ip4/6.6.6.6/tcp/1"]
    yield "bad-signature", json.dumps(tampered).encode()
    by_other_key = sign_card({k: v for k, v in card_of(mine, hop).items()
                              if k != "signatures"}, other)  # names us, signed by another key
    yield "key-mismatch", json.dumps(by_other_key).encode()
    yield "expired", json.dumps(card_of(mine, hop, now=time.time() - 120, ttl=60)).encode()
    yield "oversized", b'{"pad": "' + b"x" * 70_000 + b'"}'
    yield "malformed", b"not json at all"
    mismatch = card_of(mine, hop)  # the did of another key than the peerId's
    mismatch["capabilities"]["extensions"][0]["params"]["did"] = other.did
    yield "key-mismatch", json.dumps(sign_card(mismatch, other)).encode()


def test_forged_cards_are_dropped_with_reasons(gossip: ClientThread, node1: NodeProcess,
                                               hop: Hop) -> None:
    before = metrics(node1)
    expected: dict[str, int] = {}
    for reason, data in forgeries(gossip, hop):
        publish(gossip, data)
        expected[reason] = expected.get(reason, 0) + 1

    def all_counted() -> bool:
        text = metrics(node1)
        return all(metric_value(text, "veilnet_cards_dropped_total", reason=r, source="pubsub")
                   - metric_value(before, "veilnet_cards_dropped_total", reason=r,
                                  source="pubsub") >= n for r, n in expected.items())

    wait_for(all_counted, "drop counted for every forged card")
    # each drop was logged with its reason, naming our peer as origin
    log = node1.log()
    for reason in expected:
        assert f"dropped card from {gossip.identity.peer_id}" in log
        assert f": {reason}: " in log, reason
    # nothing forged was indexed: no card of ours, none of the other identity
    assert set(indexed(node1)) == {node1.peer_id}

    # an honest card from the same peer is indexed (the checks are not simply rejecting all)
    publish(gossip, json.dumps(card_of(gossip.identity, hop)).encode())
    cards = wait_for(lambda: indexed(node1, shard=hop.shard.cid).get(gossip.identity.peer_id),
                     "our honest card in node1's index")
    assert verify_card(cards).shard_cids == [hop.shard.cid]
    assert httpx.get(f"{node1.http}/healthz", timeout=5).status_code == 200


# -- HTTP ----------------------------------------------------------------------------------------

def test_post_agents_checks_and_expires(node1: NodeProcess, hop: Hop) -> None:
    """A posted card is listed once node1 reached its peer (a real libp2p host here) at its
    addresses, is checked like a gossiped one, and expires."""
    peer = ClientThread().start()
    try:
        outsider = peer.identity
        addrs = peer.run(lambda host: _listen_addrs(host))
        card = card_of(outsider, hop, addrs=addrs, ttl=8)
        answer = httpx.post(f"{node1.http}/v1/agents", json=card, timeout=5)
        assert answer.status_code == 201, answer.text
        assert answer.json()["peer_id"] == outsider.peer_id
        wait_for(lambda: outsider.peer_id in indexed(node1, model=hop.manifest.name,
                                                     shard=hop.shard.cid),
                 "the posted card, confirmed")
        assert outsider.peer_id not in indexed(node1, shard=hop.head_cid)  # no such shard
    finally:
        peer.close()

    tampered = copy.deepcopy(card)
    tampered["name"] = "someone else"
    forged = [(tampered, 400, "bad-signature"),
              (card_of(outsider, hop, now=time.time() - 100, ttl=10), 400, "expired"),
              ({**card, "signatures": []}, 400, "no-signature")]
    before = metrics(node1)
    for doc, status, reason in forged:
        answer = httpx.post(f"{node1.http}/v1/agents", json=doc, timeout=5)
        assert answer.status_code == status, answer.text
        assert answer.json()["detail"]["reason"] == reason
    answer = httpx.post(f"{node1.http}/v1/agents", content=b"[" * 100_000, timeout=5)
    assert answer.status_code == 413 and answer.json()["detail"]["reason"] == "oversized"
    after = metrics(node1)
    for _, _, reason in forged:
        assert (metric_value(after, "veilnet_cards_dropped_total", reason=reason, source="http")
                > metric_value(before, "veilnet_cards_dropped_total", reason=reason,
                               source="http"))
    # the outsider stops announcing: its card expires from the index
    def card_gone() -> bool:
        try:
            return outsider.peer_id not in indexed(node1)
        except CardRejected as exc:  # still listed a moment after it expired: not gone yet
            if exc.reason != "expired":
                raise
            return False

    wait_for(card_gone, "expiry of the posted card", 15)
    assert httpx.get(f"{node1.http}/agents/{outsider.peer_id}/did.json",
                     timeout=5).status_code == 404


async def _listen_addrs(host: IHost) -> list[str]:
    return full_addrs(host)


def test_client_lookup_verifies_every_card(node1: NodeProcess, hop: Hop) -> None:
    """The /veilnet/cards/1 lookup the client SDK uses returns verified cards by deployment."""
    probe = ClientThread().start()
    try:
        found, rejected = probe.run(lambda host: lookup_cards(
            host, node1.addr, deployment=hop.manifest_cid, timeout=10))
    finally:
        probe.close()
    assert rejected == []
    mine = [c for c in found if c.peer_id == node1.peer_id]
    assert len(mine) == 1 and set(mine[0].shard_cids) == set(node1.info["shards"])
    assert all(hop.manifest_cid in {s.deployment for s in c.shards} for c in found)


# -- A2A and ANP clients --------------------------------------------------------------------------

def resolve_key(kid: str | None, jku: str | None) -> Ed25519PublicKey:
    assert kid is not None and kid.startswith("did:key:")
    return Ed25519PublicKey.from_public_bytes(public_from_did(kid.split("#")[0]))


def test_a2a_sdk_fetches_verifies_and_calls_the_node(node1: NodeProcess, hop: Hop) -> None:
    verifier = create_signature_verifier(resolve_key, ["EdDSA"])
    data = {"veilnet": "infer/1", "shard": hop.shard.cid,
            "inputs": {name: {"dtype": str(a.dtype), "shape": list(a.shape),
                              "data": _b64(a.tobytes())} for name, a in hop.feeds.items()}}

    async def main() -> tuple[Any, Any, Any]:
        async with httpx.AsyncClient(timeout=30) as http:
            resolver = A2ACardResolver(http, node1.http)
            card = await resolver.get_agent_card(signature_verifier=verifier)
            legacy = await resolver.get_agent_card(relative_card_path="/.well-known/agent.json",
                                                   signature_verifier=verifier)
            client = ClientFactory(ClientConfig(httpx_client=http)).create(card)
            request = SendMessageRequest(message=ParseDict(
                {"messageId": "a2a-hop-1", "role": "ROLE_USER", "parts": [{"data": data}]},
                Message()))
            events = [e async for e in client.send_message(request)]
            return card, legacy, events

    card, legacy, events = asyncio.run(main())
    assert card.supported_interfaces[0].url == f"{node1.http}/a2a"
    assert card.supported_interfaces[0].protocol_binding == "JSONRPC"
    assert MessageToDict(legacy)["name"] == MessageToDict(card)["name"]
    assert len(events) == 1 and events[0].message.role == Role.ROLE_AGENT
    reply = infer_response_from_part(MessageToDict(events[0].message.parts[0])["data"])
    # what the node computed, checked here: onnxruntime result, digests and signature
    request = infer_request_from_part(data, "a2a-hop-1")
    outputs = {n: np.frombuffer(t["data"], dtype=t["dtype"]).reshape(t["shape"])
               for n, t in reply["outputs"].items()}
    for name, want in hop.expected.items():
        np.testing.assert_allclose(outputs[name], want, atol=1e-4, rtol=1e-4)
    assert reply["input_digest"] == tensors_digest(hop.feeds)
    assert reply["output_digest"] == tensors_digest(outputs)
    assert request["id"] == reply["id"] == "a2a-hop-1"
    assert verify(public_from_did(node1.info["did"]), reply["signature"],
                  receipt_payload("a2a-hop-1", hop.shard.cid, reply["input_digest"],
                                  reply["output_digest"]))


def test_anp_documents_of_a_running_node(node1: NodeProcess) -> None:
    base = node1.http
    ad = httpx.get(f"{base}/agents/{node1.peer_id}/ad.json", timeout=5).json()
    verify_agent_description(ad)
    assert ad["did"] == node1.info["did"]
    parsed = ANPDocumentParser().parse_document(json.dumps(ad), "application/json",
                                                f"{base}/agents/{node1.peer_id}/ad.json")
    urls = {i.get("url") for i in parsed["interfaces"]}
    assert f"{base}/a2a" in urls
    page = httpx.get(f"{base}/.well-known/agent-descriptions", timeout=5).json()
    assert page["@type"] == "CollectionPage"
    assert f"{base}/agents/{node1.peer_id}/ad.json" in {i["@id"] for i in page["items"]}
    did_doc = httpx.get(f"{base}/agents/{node1.peer_id}/did.json", timeout=5).json()
    assert did_doc["id"] == node1.info["did"]
    assert httpx.get(f"{base}/agents/12D3KooWnotanode/ad.json", timeout=5).status_code == 404


def test_node_with_domain_publishes_did_wba(request: pytest.FixtureRequest,
                                            tmp_path: Path) -> None:
    node = stop_at_teardown(request, start_node(tmp_path / "D", "--domain", "veil.example.org"))
    did_doc = httpx.get(f"{node.http}/agents/{node.peer_id}/did.json", timeout=5).json()
    assert did_doc["id"] == f"did:wba:veil.example.org:agents:{node.peer_id}"
    assert node.info["did"] in did_doc["alsoKnownAs"]
    ad = httpx.get(f"{node.http}/agents/{node.peer_id}/ad.json", timeout=5).json()
    assert ad["did"] == did_doc["id"]
    assert ad["url"] == f"https://veil.example.org/agents/{node.peer_id}/ad.json"
    verify_agent_description(ad)


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


# -- a 5-node testnet from one bootstrap address ------------------------------------------------

def test_five_node_testnet_discovers_and_routes_by_cards(tmp_path: Path, deployment_dir: Path,
                                                        minilm_dir: Path) -> None:
    """Nodes 1-4 are given only node 0's address; within 10 s every node holds every node's
    card, a2a-sdk verifies each card, and a client given the same one address routes every hop
    to nodes whose cards name that shard."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "scripts"))
    from localnet import Testnet

    from client import Client
    from models import Pipeline

    with Testnet(tmp_path / "T", nodes=5, replicas=2, deployment=deployment_dir,
                 model=minilm_dir, node_args=["--threads", "1"], log=lambda _: None) as net:
        assert net.discovery_s is not None and net.discovery_s < 10.0, net.discovery_s
        verifier = create_signature_verifier(resolve_key, ["EdDSA"])

        async def fetch_all() -> list[Any]:
            async with httpx.AsyncClient(timeout=10) as http:
                return [await A2ACardResolver(http, n.http).get_agent_card(
                    signature_verifier=verifier) for n in net.nodes]

        cards = asyncio.run(fetch_all())
        assert [c.supported_interfaces[0].url for c in cards] == [f"{n.http}/a2a"
                                                                    for n in net.nodes]
        serving: dict[str, set[str]] = {}  # shard CID -> PeerIDs whose card names it
        for node in net.nodes:
            for info in map(verify_card, httpx.get(f"{node.http}/v1/agents", timeout=5).json()):
                for cid in info.shard_cids:
                    serving.setdefault(cid, set()).add(info.peer_id)
        placed = {cid: {net.nodes[i].peer_id for i in where}
                  for cid, where in net.placement.items()}
        assert serving == placed

        texts = ["discovery by signed cards", "one bootstrap address"]
        with Client([net.bootstrap], net.deployment) as client:
            result = client.embed(texts)
        reference = Pipeline(minilm_dir).embed(texts)
        assert np.abs(result.embeddings - reference).max() <= 1e-4
        for record in result.hops:
            assert record.peer_id in placed[record.shard_cid]
        assert {r.peer_id for r in result.hops} - {net.nodes[0].peer_id}, \
            "every hop went to the bootstrap node: routing did not use discovery"
