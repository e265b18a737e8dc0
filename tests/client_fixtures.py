"""Fixtures and checks shared by the client tests (test_client.py, test_client_faults.py).

``honest`` is a real ``veilnet node start`` subprocess holding every node shard; expected
embeddings come from the in-process plaintext pipeline. Test modules load the fixtures with
``pytest_plugins = ["client_fixtures"]`` (module-scoped fixtures are then set up once per test
module, ``honest`` and ``expected`` once per session) and import the plain helpers by name.
"""

from __future__ import annotations

import re
import socket
from pathlib import Path

import numpy as np
import pytest
from node_helpers import NodeProcess, serving_node

from client import EmbedResult, HopRecord
from crypto.identity import Identity, public_from_did, public_from_peer_id, verify
from models import Manifest, Pipeline
from protocols.infer import receipt_payload

TEXTS = ["A man is eating food.", "Encrypted inference keeps activations private, 24/7."]
TOLERANCE = 1e-4


# -- fixtures -----------------------------------------------------------------------------------

@pytest.fixture(scope="session")
def expected(minilm_dir: Path) -> np.ndarray:
    """Plaintext embeddings of TEXTS, computed in-process without the network or the key."""
    embeddings = Pipeline(minilm_dir).embed(TEXTS)
    embeddings.flags.writeable = False  # shared by every module: no test can change it
    return embeddings


@pytest.fixture(scope="module")
def manifest(deployment_dir: Path) -> Manifest:
    return Manifest.load(deployment_dir)


@pytest.fixture(scope="session")
def honest(request: pytest.FixtureRequest, deployment_dir: Path,
           tmp_path_factory: pytest.TempPathFactory) -> NodeProcess:
    """One node process for the session (test_client.py and test_client_faults.py): they only
    send it queries, and what else they start (``directory``, fakes) is stopped with their
    module and never announced to it as serving a shard, so it stays the only node serving the
    deployment that clients bootstrapping from it find."""
    return serving_node(request, tmp_path_factory.mktemp("honest") / "D", deployment_dir,
                        "--request-timeout", "20")


def closed_port_addr() -> str:
    """A loopback multiaddr nobody listens on, with a random PeerID."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    return f"/ip4/127.0.0.1/tcp/{port}/p2p/{Identity.generate().peer_id}"


# -- checks -------------------------------------------------------------------------------------

def assert_matches(embeddings: np.ndarray, expected: np.ndarray) -> None:
    assert embeddings.shape == expected.shape, (embeddings.shape, expected.shape)
    diff = float(np.max(np.abs(embeddings - expected)))
    assert diff <= TOLERANCE, f"max abs diff {diff} from the plaintext embeddings"


def assert_hop_signed(hop: HopRecord | dict) -> None:
    """The hop's receipt signature verifies with the key of the PeerID that served it (the
    client accepts no hop without that; this checks it independently)."""
    doc = hop.to_json() if isinstance(hop, HopRecord) else hop
    payload = receipt_payload(doc["request_id"], doc["shard_cid"],
                              bytes.fromhex(doc["input_digest"]),
                              bytes.fromhex(doc["output_digest"]))
    assert verify(public_from_peer_id(doc["peer_id"]), bytes.fromhex(doc["signature"]), payload)
    assert verify(public_from_did(doc["node_did"]), bytes.fromhex(doc["signature"]), payload)


def assert_honest_hops(result: EmbedResult, node: NodeProcess, manifest: Manifest) -> None:
    """One verified hop per node shard, served by ``node`` (as its node.json says)."""
    shards = manifest.node_shards
    assert [h.shard_index for h in result.hops] == [s.index for s in shards]
    assert [h.shard_cid for h in result.hops] == [s.cid for s in shards]
    ids = set()
    for hop in result.hops:
        assert isinstance(hop, HopRecord)
        assert hop.peer_id == node.info["peer_id"]
        assert hop.node_did == node.info["did"]
        assert hop.attempts == 1 and hop.failures == (), hop
        assert hop.latency_ms > 0
        assert re.fullmatch(r"[0-9a-f]{32}", hop.request_id), hop.request_id
        ids.add(hop.request_id)
        assert re.fullmatch(r"[0-9a-f]{128}", hop.signature), hop.signature
        assert re.fullmatch(r"[0-9a-f]{64}", hop.input_digest)
        assert re.fullmatch(r"[0-9a-f]{64}", hop.output_digest)
        signature = bytes.fromhex(hop.signature)
        payload = receipt_payload(hop.request_id, hop.shard_cid, bytes.fromhex(hop.input_digest),
                                  bytes.fromhex(hop.output_digest))
        assert verify(public_from_peer_id(node.info["peer_id"]), signature, payload)
        assert verify(public_from_did(node.info["did"]), signature, payload)
        # the receipt binds the digests: the same signature over another output digest fails
        forged = receipt_payload(hop.request_id, hop.shard_cid, bytes.fromhex(hop.input_digest),
                                 bytes(32))
        assert not verify(public_from_peer_id(node.info["peer_id"]), signature, forged)
    assert len(ids) == len(result.hops), "request ids must be fresh per hop"
    # consecutive hops chain: a later shard's input is not the earlier shard's input
    assert len({h.input_digest for h in result.hops}) == len(result.hops)
