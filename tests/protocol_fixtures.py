"""Fixtures and checks shared by the node protocol tests (test_node_infer.py, test_node_service.py).

Each node is a subprocess started as a user would start it; the test side is a real libp2p host
(TCP, Noise, yamux). Expected results are computed independently in-process with onnxruntime
(``ShardSession``) from the same deployment. One node (``node1``, holding both node shards) serves
most tests; ``node2`` starts empty and bootstraps from node1; ``small`` has a tiny frame limit and
request timeout. Every node is stopped (SIGTERM, then SIGKILL) by its fixture's finalizer.

Test modules load the fixtures with ``pytest_plugins = ["protocol_fixtures"]`` (module-scoped
fixtures are then set up once per test module) and import the plain helpers by name.
"""

from __future__ import annotations

import secrets
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import cbor2
import numpy as np
import pytest
from libp2p.abc import IHost
from node_helpers import (
    ClientThread,
    NodeProcess,
    exchange,
    serving_node,
    start_node,
    stop_at_teardown,
)

from crypto.identity import did_from_peer_id, public_from_did, public_from_peer_id, verify
from models import Manifest, Pipeline, ShardSession, ShardSpec, cid_of_file
from protocols import INFER
from protocols.infer import receipt_payload
from protocols.wire import (
    WIRE_VERSION,
    decode_tensors,
    encode_frame,
    encode_tensors,
    encode_varint,
    tensors_digest,
)

TEXTS = ["A man is eating food.", "Encrypted inference keeps activations private, 24/7."]


@dataclass
class Hop:
    """Real inputs for node shard 1 (from the client head) and the in-process expected outputs."""

    manifest: Manifest
    manifest_cid: str
    shard: ShardSpec
    feeds: dict[str, np.ndarray]
    expected: dict[str, np.ndarray]
    head_cid: str
    tail_cid: str

    def request(self, request_id: str | None = None, **changes: Any) -> dict[str, Any]:
        message: dict[str, Any] = {"v": WIRE_VERSION, "id": request_id or secrets.token_hex(16),
                                   "shard": self.shard.cid, "inputs": encode_tensors(self.feeds)}
        message.update(changes)
        return message


@pytest.fixture(scope="module")
def hop(deployment_dir: Path) -> Hop:
    pipeline = Pipeline(deployment_dir)
    manifest = pipeline.manifest
    assert pipeline.tokenizer is not None
    tokens = pipeline.tokenizer(TEXTS)
    head = manifest.head
    head_out = pipeline.run_local(head, {t.name: tokens[t.name] for t in head.inputs})
    shard = manifest.node_shards[0]
    feeds = {t.name: head_out[t.name] for t in shard.inputs}
    expected = ShardSession(deployment_dir / shard.path, shard).run(feeds)
    return Hop(manifest, cid_of_file(deployment_dir / "manifest.json"), shard, feeds, expected,
               head.cid, manifest.tail.cid)


@pytest.fixture(scope="session")
def node1(request: pytest.FixtureRequest, deployment_dir: Path,
          tmp_path_factory: pytest.TempPathFactory) -> NodeProcess:
    """One node process for the session, shared by test_node_infer.py and test_node_service.py:
    they send it requests (metrics are compared before and after) and never change what it
    serves. test_discovery.py posts and gossips cards to its node: it has its own ``node1``."""
    return serving_node(request, tmp_path_factory.mktemp("node1") / "D", deployment_dir,
                        "--request-timeout", "20")


@pytest.fixture(scope="module")
def node2(request: pytest.FixtureRequest, node1: NodeProcess,
          tmp_path_factory: pytest.TempPathFactory) -> NodeProcess:
    data_dir = tmp_path_factory.mktemp("node2") / "D"
    return stop_at_teardown(request, start_node(data_dir, "--bootstrap", node1.addr,
                                             "--announce-interval", "1"))


@pytest.fixture(scope="module")
def small(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory,
          ) -> NodeProcess:
    data_dir = tmp_path_factory.mktemp("small") / "D"
    return stop_at_teardown(request, start_node(data_dir, "--frame-limit", "2048",
                                             "--request-timeout", "1"))


@pytest.fixture(scope="module")
def client() -> Iterator[ClientThread]:
    """The test side's libp2p host, shared by this module's tests (see ClientThread)."""
    thread = ClientThread().start()
    yield thread
    thread.close()


# -- helpers --------------------------------------------------------------------------------------

def check_valid_response(response: dict[str, Any] | None, message: dict[str, Any], hop: Hop,
                         node: NodeProcess) -> dict[str, np.ndarray]:
    assert response is not None, "no response frame"
    assert "error" not in response, response.get("error")
    assert response["v"] == WIRE_VERSION
    assert response["id"] == message["id"]
    assert response["shard"] == hop.shard.cid
    outputs = decode_tensors(response["outputs"], "'outputs'")
    assert sorted(outputs) == sorted(t.name for t in hop.shard.outputs)
    for name, want in hop.expected.items():
        assert outputs[name].dtype == want.dtype and outputs[name].shape == want.shape
        np.testing.assert_allclose(outputs[name], want, rtol=1e-5, atol=1e-5)
    feeds = decode_tensors(message["inputs"], "'inputs'")
    assert response["input_digest"] == tensors_digest(feeds) == tensors_digest(hop.feeds)
    assert response["output_digest"] == tensors_digest(outputs)
    assert response["node"] == node.info["did"] == did_from_peer_id(node.peer_id)
    payload = receipt_payload(message["id"], hop.shard.cid, response["input_digest"],
                              response["output_digest"])
    public = public_from_peer_id(node.peer_id)
    assert public_from_did(response["node"]) == public
    assert verify(public, response["signature"], payload)
    assert not verify(public, response["signature"],
                      receipt_payload(message["id"] + "x", hop.shard.cid,
                                      response["input_digest"], response["output_digest"]))
    return outputs


async def valid_request(host: IHost, node: NodeProcess, hop: Hop) -> None:
    message = hop.request()
    response = await exchange(host, node.addr, INFER, encode_frame(message))
    check_valid_response(response, message, hop, node)


def check_error(response: dict[str, Any] | None, code: str, request_id: str | None) -> None:
    assert response is not None, "the node closed the stream without an error frame"
    assert "error" in response, f"expected error {code!r}, got a frame with {sorted(response)}"
    error = response["error"]
    assert isinstance(error, dict) and set(error) == {"code", "message"}, error
    assert error["code"] == code, error
    assert isinstance(error["message"], str) and error["message"]
    assert response["v"] == WIRE_VERSION
    assert response["id"] == request_id


# -- request payloads -----------------------------------------------------------------------------

def frame(obj: Any) -> bytes:
    body = cbor2.dumps(obj)
    return encode_varint(len(body)) + body


def with_input(hop: Hop, name: str, tensor: dict[str, Any]) -> dict[str, Any]:
    inputs = encode_tensors(hop.feeds)
    inputs[name] = tensor
    return hop.request("rid-1", inputs=inputs)


def hidden(hop: Hop) -> np.ndarray:
    return hop.feeds[hop.shard.inputs[0].name]


def case_float64(hop: Hop) -> bytes:
    name = hop.shard.inputs[0].name
    return encode_frame(with_input(hop, name, encode_tensors(
        {name: hidden(hop).astype(np.float64)})[name]))


def case_byte_count(hop: Hop) -> bytes:
    name = hop.shard.inputs[0].name
    tensor = encode_tensors({name: hidden(hop)})[name]
    tensor["data"] = tensor["data"][:-4]
    return encode_frame(with_input(hop, name, tensor))
