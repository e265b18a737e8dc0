"""Integration tests against real ``veilnet node start`` processes.

Each node is a subprocess started as a user would start it; the test side is a real libp2p host
(TCP, Noise, yamux). Expected results are computed independently in-process with onnxruntime
(``ShardSession``) from the same deployment. One node (``node1``, holding both node shards) serves
most tests; ``node2`` starts empty and bootstraps from node1; ``small`` has a tiny frame limit and
request timeout. Every node is stopped (SIGTERM, then SIGKILL) by its fixture's finalizer.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import signal
import stat
import subprocess
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import cbor2
import httpx
import numpy as np
import pytest
import trio
from libp2p.abc import IHost
from node_helpers import (
    ClientThread,
    NodeProcess,
    client_host,
    exchange,
    metric_value,
    run_trio,
    spawn_node,
    start_node,
    stop_process,
)

from crypto.identity import Identity, did_from_peer_id, public_from_did, public_from_peer_id, verify
from models import Manifest, Pipeline, ShardSession, ShardSpec, cid_of_bytes, cid_of_file
from node.p2p import INFER, PEERS, SHARD, close_quietly, connect, peer_info
from node.store import ShardStore
from node.wire import (
    DEFAULT_FRAME_LIMIT,
    WIRE_VERSION,
    decode_tensors,
    encode_frame,
    encode_tensors,
    encode_varint,
    read_frame,
    receipt_payload,
    tensors_digest,
)

TEXTS = ["A man is eating food.", "Encrypted inference keeps activations private, 24/7."]
INFER_P = str(INFER)


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


def _node_fixture(request: pytest.FixtureRequest, node: NodeProcess) -> NodeProcess:
    request.addfinalizer(node.stop)
    return node


@pytest.fixture(scope="module")
def node1(request: pytest.FixtureRequest, deployment_dir: Path,
          tmp_path_factory: pytest.TempPathFactory) -> NodeProcess:
    data_dir = tmp_path_factory.mktemp("node1") / "D"
    ShardStore(data_dir).add_deployment(deployment_dir)
    return _node_fixture(request, start_node(data_dir, "--request-timeout", "20"))


@pytest.fixture(scope="module")
def node2(request: pytest.FixtureRequest, node1: NodeProcess,
          tmp_path_factory: pytest.TempPathFactory) -> NodeProcess:
    data_dir = tmp_path_factory.mktemp("node2") / "D"
    return _node_fixture(request, start_node(data_dir, "--bootstrap", node1.addr,
                                             "--announce-interval", "1"))


@pytest.fixture(scope="module")
def small(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory,
          ) -> NodeProcess:
    data_dir = tmp_path_factory.mktemp("small") / "D"
    return _node_fixture(request, start_node(data_dir, "--frame-limit", "2048",
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


def get_json(url: str) -> Any:
    r = httpx.get(url, timeout=10)
    assert r.status_code == 200, r.text
    return r.json()


def metrics_text(node: NodeProcess) -> str:
    r = httpx.get(node.http + "/metrics", timeout=10)
    assert r.status_code == 200
    return r.text


def wait_for(predicate: Callable[[], Any], timeout: float, what: str) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(0.1)


# -- valid inference ------------------------------------------------------------------------------

def test_valid_request_matches_in_process_run_and_is_signed(node1: NodeProcess, hop: Hop) -> None:
    async def main() -> tuple[dict[str, Any], dict[str, Any] | None]:
        async with client_host() as host:
            message = hop.request("req-" + secrets.token_hex(8))
            return message, await exchange(host, node1.addr, INFER, encode_frame(message))

    message, response = run_trio(main)
    check_valid_response(response, message, hop, node1)


def test_full_pipeline_through_the_node_equals_local(node1: NodeProcess, hop: Hop,
                                                     deployment_dir: Path,
                                                     client: ClientThread) -> None:
    """Both node shards over the network, client head and tail in-process."""
    hops: list[str] = []

    def network_runner(shard: ShardSpec, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        message = {"v": 1, "id": secrets.token_hex(16), "shard": shard.cid,
                   "inputs": encode_tensors(feeds)}
        response = client.run(exchange, node1.addr, INFER, encode_frame(message))
        assert response is not None and "error" not in response, response
        outputs = decode_tensors(response["outputs"], "'outputs'")
        assert verify(public_from_peer_id(node1.peer_id), response["signature"],
                      receipt_payload(message["id"], shard.cid, tensors_digest(feeds),
                                      tensors_digest(outputs)))
        hops.append(shard.cid)
        return outputs

    remote = Pipeline(deployment_dir, node_runner=network_runner).embed(TEXTS)
    local = Pipeline(deployment_dir).embed(TEXTS)
    assert hops == [s.cid for s in hop.manifest.node_shards]
    assert remote.shape == (len(TEXTS), 384)
    np.testing.assert_allclose(remote, local, rtol=1e-5, atol=1e-5)


# -- malformed requests ---------------------------------------------------------------------------

def _frame(obj: Any) -> bytes:
    body = cbor2.dumps(obj)
    return encode_varint(len(body)) + body


def _with_input(hop: Hop, name: str, tensor: dict[str, Any]) -> dict[str, Any]:
    inputs = encode_tensors(hop.feeds)
    inputs[name] = tensor
    return hop.request("rid-1", inputs=inputs)


def _hidden(hop: Hop) -> np.ndarray:
    return hop.feeds[hop.shard.inputs[0].name]


def _case_wrong_names(hop: Hop) -> bytes:
    inputs = encode_tensors(hop.feeds)
    first = hop.shard.inputs[0].name
    inputs["not_" + first] = inputs.pop(first)
    return encode_frame(hop.request("rid-1", inputs=inputs))


def _case_missing_input(hop: Hop) -> bytes:
    inputs = encode_tensors(hop.feeds)
    inputs.pop(hop.shard.inputs[1].name)
    return encode_frame(hop.request("rid-1", inputs=inputs))


def _case_extra_input(hop: Hop) -> bytes:
    inputs = encode_tensors({**hop.feeds, "extra": np.zeros(3, np.float32)})
    return encode_frame(hop.request("rid-1", inputs=inputs))


def _case_float64(hop: Hop) -> bytes:
    name = hop.shard.inputs[0].name
    return encode_frame(_with_input(hop, name, encode_tensors(
        {name: _hidden(hop).astype(np.float64)})[name]))


def _case_rank(hop: Hop) -> bytes:
    name = hop.shard.inputs[0].name
    flat = _hidden(hop).reshape(-1, _hidden(hop).shape[-1])
    return encode_frame(_with_input(hop, name, encode_tensors({name: flat})[name]))


def _case_hidden_383(hop: Hop) -> bytes:
    name = hop.shard.inputs[0].name
    return encode_frame(_with_input(hop, name, encode_tensors(
        {name: np.ascontiguousarray(_hidden(hop)[..., :383])})[name]))


def _case_byte_count(hop: Hop) -> bytes:
    name = hop.shard.inputs[0].name
    tensor = encode_tensors({name: _hidden(hop)})[name]
    tensor["data"] = tensor["data"][:-4]
    return encode_frame(_with_input(hop, name, tensor))


def _case_bad_dtype(hop: Hop) -> bytes:
    name = hop.shard.inputs[0].name
    tensor = encode_tensors({name: _hidden(hop)})[name]
    tensor["dtype"] = "complex64"
    return encode_frame(_with_input(hop, name, tensor))


def _case_overflowing_shape(hop: Hop) -> bytes:
    name = hop.shard.inputs[0].name
    return encode_frame(_with_input(hop, name, {"dtype": "float32", "shape": [65536] * 4,
                                                "data": b""}))


def _case_inconsistent_dims(hop: Hop) -> bytes:
    """Names, dtypes, ranks and fixed dims all right, but seq differs between the inputs."""
    name = hop.shard.inputs[1].name  # attention_bias [batch, 1, 1, seq]
    bias = hop.feeds[name]
    longer = np.concatenate([bias, bias[..., :1]], axis=-1)
    return encode_frame(_with_input(hop, name, encode_tensors({name: longer})[name]))


def _case_tagged_version(hop: Hop) -> bytes:
    """A whole valid request except that "v" is CBOR tag 2 (bignum 1): tags are refused."""
    return _frame({**hop.request("rid-1"), "v": cbor2.CBORTag(2, b"\x01")})


# name -> (payload builder, half-close after sending, expected code, expected echoed id)
MALFORMED: dict[str, tuple[Callable[[Hop], bytes], bool, str, str | None]] = {
    "garbage bytes": (lambda h: b"\x05\xff\xfe\xfd\xfc\xfb", False, "bad_frame", None),
    "endless header": (lambda h: b"\xff" * 16, False, "bad_frame", None),
    "non-minimal header": (lambda h: b"\x80\x00", False, "bad_frame", None),
    "cbor array": (lambda h: _frame([1, 2, 3]), False, "bad_frame", None),
    "cbor text": (lambda h: _frame("hello"), False, "bad_frame", None),
    "cbor unknown tag": (lambda h: _frame({"v": cbor2.CBORTag(65536, 1)}), False,
                         "bad_frame", None),
    "cbor bignum tag": (_case_tagged_version, False, "bad_frame", None),
    "duplicate keys": (lambda h: encode_varint(7) + b"\xa2\x61v\x01\x61v\x01", False,
                       "bad_frame", None),
    "oversize prefix": (lambda h: encode_varint(DEFAULT_FRAME_LIMIT + 1), False,
                        "frame_too_large", None),
    "unknown shard cid": (lambda h: encode_frame(h.request(
        "rid-1", shard=cid_of_bytes(b"no such shard"))), False, "unknown_shard", "rid-1"),
    "client head cid": (lambda h: encode_frame(h.request("rid-1", shard=h.head_cid)), False,
                        "unknown_shard", "rid-1"),
    "non-cid shard": (lambda h: encode_frame(h.request("rid-1", shard="not-a-cid")), False,
                      "bad_request", "rid-1"),
    "shard not a string": (lambda h: encode_frame(h.request("rid-1", shard=42)), False,
                           "bad_request", "rid-1"),
    "missing shard": (lambda h: encode_frame({k: v for k, v in h.request("rid-1").items()
                                              if k != "shard"}), False, "bad_request", "rid-1"),
    "inputs not a map": (lambda h: encode_frame(h.request("rid-1", inputs=[1, 2])), False,
                         "bad_request", "rid-1"),
    "wrong input names": (_case_wrong_names, False, "bad_inputs", "rid-1"),
    "missing input": (_case_missing_input, False, "bad_inputs", "rid-1"),
    "extra input": (_case_extra_input, False, "bad_inputs", "rid-1"),
    "float64": (_case_float64, False, "bad_inputs", "rid-1"),
    "wrong rank": (_case_rank, False, "bad_inputs", "rid-1"),
    "hidden size 383": (_case_hidden_383, False, "bad_inputs", "rid-1"),
    "inconsistent seq dims": (_case_inconsistent_dims, False, "run_failed", "rid-1"),
    "byte count mismatch": (_case_byte_count, False, "bad_tensor", "rid-1"),
    "unsupported dtype": (_case_bad_dtype, False, "bad_tensor", "rid-1"),
    "shape overflowing int64": (_case_overflowing_shape, False, "bad_tensor", "rid-1"),
    "wire version 2": (lambda h: encode_frame(h.request("rid-1", v=2)), False,
                       "unsupported_version", "rid-1"),
    "no version": (lambda h: encode_frame({k: v for k, v in h.request("rid-1").items()
                                           if k != "v"}), False, "unsupported_version", "rid-1"),
    "missing id": (lambda h: encode_frame({k: v for k, v in h.request().items() if k != "id"}),
                   False, "bad_request", None),
    "id not a string": (lambda h: encode_frame(h.request(request_id=None, id=7)), False,
                        "bad_request", None),
    "id too long": (lambda h: encode_frame(h.request("x" * 129)), False, "bad_request", None),
    "nothing, then close": (lambda h: b"", True, "bad_request", None),
    "half a header, then close": (lambda h: b"\x80", True, "truncated", None),
    "half a frame, then close": (lambda h: encode_frame(h.request("rid-1"))[:200], True,
                                 "truncated", None),
}


@pytest.mark.parametrize("case", list(MALFORMED), ids=list(MALFORMED))
def test_malformed_request_gets_a_structured_error_and_node_keeps_serving(
        node1: NodeProcess, hop: Hop, client: ClientThread, case: str) -> None:
    build, close_write, code, request_id = MALFORMED[case]
    payload = build(hop)

    async def main(host: IHost) -> tuple[dict[str, Any] | None, dict[str, Any],
                                         dict[str, Any] | None]:
        error = await exchange(host, node1.addr, INFER, payload, close_write=close_write)
        message = hop.request()
        ok = await exchange(host, node1.addr, INFER, encode_frame(message))
        return error, message, ok

    error, message, ok = client.run(main)
    try:
        check_error(error, code, request_id)
    finally:  # whatever the error frame looked like, the node must still serve
        check_valid_response(ok, message, hop, node1)
        assert node1.proc.poll() is None, node1.log()


def test_one_stream_carries_several_requests(node1: NodeProcess, hop: Hop,
                                            client: ClientThread) -> None:
    """An infer stream stays open after an answer (and after an error that leaves the framing
    intact) for the next request; after a framing error the node closes it."""
    async def main(host: IHost) -> list[Any]:
        info = peer_info(node1.addr)
        await connect(host, info, 10)
        seen: list[Any] = []
        with trio.fail_after(30):
            stream = await host.new_stream(info.peer_id, [INFER])
            try:
                for message in (hop.request(), hop.request(shard=hop.head_cid), hop.request()):
                    await stream.write(encode_frame(message))
                    seen.append((message, await read_frame(stream)))
                # an oversize header breaks the framing: error frame, then end of stream
                await stream.write(encode_varint(1 << 40))
                seen.append(await read_frame(stream))
                seen.append(await read_frame(stream))
            finally:
                await close_quietly(stream)
        return seen

    (m1, r1), (m2, r2), (m3, r3), oversize, after = client.run(main)
    check_valid_response(r1, m1, hop, node1)
    check_error(r2, "unknown_shard", m2["id"])
    check_valid_response(r3, m3, hop, node1)
    assert r1["signature"] != r3["signature"]  # separate requests, separately signed
    check_error(oversize, "frame_too_large", None)
    assert after is None  # the node closed the stream


def test_raw_tcp_junk_to_the_libp2p_port(node1: NodeProcess, hop: Hop,
                                         client: ClientThread) -> None:
    port = int(node1.addr.split("/tcp/")[1].split("/")[0])
    junk = [
        b"",                                                   # connect and hang up
        b"GET / HTTP/1.1\r\nHost: x\r\n\r\n",
        os.urandom(64 * 1024),
        b"\x13/multistream/1.0.0\n" + os.urandom(300),        # past the first handshake line
        b"\x13/multistream/1.0.0\n\x07/noise\n" + b"\x00\x20" + os.urandom(32),
    ]

    async def main(host: IHost) -> None:
        for data in junk:
            stream = await trio.open_tcp_stream("127.0.0.1", port)
            try:
                with trio.move_on_after(0.3), contextlib.suppress(
                        trio.BrokenResourceError, trio.ClosedResourceError, OSError):
                    if data:
                        await stream.send_all(data)
                    while await stream.receive_some(65536):
                        pass
            finally:
                await stream.aclose()
        await valid_request(host, node1, hop)

    client.run(main)
    assert node1.proc.poll() is None, node1.log()


def test_silent_stream_times_out_with_an_error_frame(small: NodeProcess,
                                                    client: ClientThread) -> None:
    async def main(host: IHost) -> tuple[dict[str, Any] | None, float, dict[str, Any] | None]:
        await exchange(host, small.addr, PEERS, encode_frame({"v": 1, "id": "c", "node": None}))
        started = time.monotonic()  # connected: from here on only the node's timeout counts
        error = await exchange(host, small.addr, INFER, b"", timeout=10)
        elapsed = time.monotonic() - started
        ok = await exchange(host, small.addr, PEERS,
                            encode_frame({"v": 1, "id": "p", "node": None}))
        return error, elapsed, ok

    error, elapsed, ok = client.run(main)
    check_error(error, "timeout", None)
    assert 0.8 < elapsed < 8
    assert ok is not None and ok["node"]["peer_id"] == small.peer_id


def test_configured_frame_limit(small: NodeProcess, client: ClientThread) -> None:
    big = {"v": 1, "id": "big", "node": None, "pad": b"\x00" * 3000}

    async def main(host: IHost) -> tuple[dict[str, Any] | None, dict[str, Any] | None]:
        error = await exchange(host, small.addr, PEERS, encode_frame(big))
        ok = await exchange(host, small.addr, PEERS,
                            encode_frame({"v": 1, "id": "small", "node": None,
                                          "pad": b"\x00" * 1500}))
        return error, ok

    error, ok = client.run(main)
    check_error(error, "frame_too_large", None)
    assert "2048" in error["error"]["message"]  # type: ignore[index]
    assert ok is not None and "error" not in ok and ok["id"] == "small"


# -- HTTP API and metrics -------------------------------------------------------------------------

def test_metrics_count_requests_errors_and_latency(node1: NodeProcess, hop: Hop,
                                                   client: ClientThread) -> None:
    before = metrics_text(node1)
    sends = [(b"\x05\xff\xfe\xfd\xfc\xfb", "bad_frame"), (_frame([1]), "bad_frame"),
             (encode_frame(hop.request("m1", shard=cid_of_bytes(b"nope"))), "unknown_shard"),
             (_case_float64(hop), "bad_inputs"), (_case_byte_count(hop), "bad_tensor"),
             (encode_frame(hop.request("m2", v=9)), "unsupported_version")]

    async def main(host: IHost) -> None:
        for payload, code in sends:
            response = await exchange(host, node1.addr, INFER, payload)
            assert response is not None and response["error"]["code"] == code
        await valid_request(host, node1, hop)
        await valid_request(host, node1, hop)

    client.run(main)

    def delta(text: str, sample: str, **labels: str) -> float:
        return metric_value(text, sample, **labels) - metric_value(before, sample, **labels)

    def observed() -> str | None:
        text = metrics_text(node1)
        return text if delta(text, "veilnet_infer_latency_seconds_count") >= 2 else None

    after = wait_for(observed, 5, "the latency observations")
    assert delta(after, "veilnet_requests_total", protocol=INFER_P) == len(sends) + 2
    for code, count in [("bad_frame", 2), ("unknown_shard", 1), ("bad_inputs", 1),
                        ("bad_tensor", 1), ("unsupported_version", 1)]:
        assert delta(after, "veilnet_errors_total", protocol=INFER_P, code=code) == count, code
    assert delta(after, "veilnet_infer_latency_seconds_count") == 2
    assert delta(after, "veilnet_infer_latency_seconds_sum") > 0
    assert metric_value(after, "veilnet_shards_served") == 2
    assert metric_value(after, "veilnet_shards_loaded") == 2


def test_healthz_and_node_info(node1: NodeProcess, hop: Hop) -> None:
    health = get_json(node1.http + "/healthz")
    assert health["status"] == "ok" and health["peer_id"] == node1.peer_id
    assert health["uptime_s"] >= 0

    info = get_json(node1.http + "/v1/node")
    assert info["peer_id"] == node1.peer_id
    assert info["did"] == node1.info["did"] == did_from_peer_id(node1.peer_id)
    assert info["multiaddrs"] == node1.info["multiaddrs"]
    assert all(a.endswith("/p2p/" + node1.peer_id) for a in info["multiaddrs"])
    assert info["http"] == node1.http
    want = sorted((s.cid, s.index) for s in hop.manifest.node_shards)
    assert sorted((s["cid"], s["index"]) for s in info["shards"]) == want
    for s in info["shards"]:
        assert s["deployment"] == hop.manifest_cid
        assert s["model"] == hop.manifest.name
        assert s["loaded"] is True  # sessions are loaded before the node says it is ready
    assert sorted(node1.info["shards"]) == sorted(c for c, _ in want)
    assert hop.head_cid not in str(info) and hop.tail_cid not in str(info)


def test_peers_are_exchanged(node1: NodeProcess, node2: NodeProcess,
                             client: ClientThread) -> None:
    def node1_knows_node2() -> list[dict[str, Any]]:
        return [r for r in get_json(node1.http + "/v1/peers") if r["peer_id"] == node2.peer_id]

    (record,) = wait_for(node1_knows_node2, 15, "node2's hello to reach node1")
    assert record["did"] == node2.info["did"]
    assert node2.addr in record["addrs"]
    assert record["http"] == node2.http

    def node2_knows_node1() -> list[dict[str, Any]]:
        return [r for r in get_json(node2.http + "/v1/peers") if r["peer_id"] == node1.peer_id]

    (back,) = wait_for(node2_knows_node1, 15, "node1's record at node2")
    assert back["did"] == node1.info["did"]
    assert sorted(back["shards"]) == sorted(node1.info["shards"])

    response = client.run(exchange, node1.addr, PEERS,
                          encode_frame({"v": 1, "id": "who", "node": None}))
    assert response is not None and response["id"] == "who"
    assert response["node"]["peer_id"] == node1.peer_id
    assert sorted(response["node"]["shards"]) == sorted(node1.info["shards"])
    assert node2.peer_id in [r["peer_id"] for r in response["peers"]]


def test_peers_record_for_another_peer_id_is_refused(node1: NodeProcess,
                                                     client: ClientThread) -> None:
    impostor = Identity.generate()
    record = {"peer_id": impostor.peer_id, "did": impostor.did, "addrs": [], "shards": []}

    assert client.identity.peer_id != impostor.peer_id
    response = client.run(exchange, node1.addr, PEERS,
                          encode_frame({"v": 1, "id": "imp", "node": record}))
    check_error(response, "bad_request", "imp")
    peers = get_json(node1.http + "/v1/peers")
    assert impostor.peer_id not in [r["peer_id"] for r in peers]


# -- shard fetch ----------------------------------------------------------------------------------

def test_shard_protocol_never_serves_client_material(node1: NodeProcess, hop: Hop,
                                                     deployment_dir: Path,
                                                     client: ClientThread) -> None:
    tokenizer_cid = hop.manifest.extra["tokenizer"]["cid"]
    key_cid = cid_of_file(deployment_dir / "client" / "key.json")

    async def main(host: IHost) -> list[dict[str, Any] | None]:
        out = []
        for cid in (hop.head_cid, hop.tail_cid, tokenizer_cid, key_cid):
            out.append(await exchange(host, node1.addr, SHARD,
                                      encode_frame({"v": 1, "id": f"get-{cid}", "cid": cid})))
        out.append(await exchange(host, node1.addr, SHARD,
                                  encode_frame({"v": 1, "id": "bad", "cid": "nope"})))
        return out

    *answers, bad = client.run(main)
    for cid, response in zip((hop.head_cid, hop.tail_cid, tokenizer_cid, key_cid), answers,
                             strict=True):
        check_error(response, "not_found", f"get-{cid}")
    check_error(bad, "bad_request", "bad")


def test_shard_protocol_serves_the_manifest(node1: NodeProcess, hop: Hop, deployment_dir: Path,
                                            client: ClientThread) -> None:
    async def main(host: IHost) -> tuple[dict[str, Any] | None, bytes]:
        info = peer_info(node1.addr)
        await host.connect(info)
        with trio.fail_after(10):
            stream = await host.new_stream(info.peer_id, [SHARD])
            try:
                await stream.write(encode_frame({"v": 1, "id": "m", "cid": hop.manifest_cid}))
                header = await read_frame(stream)
                data = b""
                while header and len(data) < header.get("size", 0):
                    chunk = await read_frame(stream)
                    assert chunk is not None
                    data += chunk["data"]
            finally:
                await close_quietly(stream)
        return header, data

    header, data = client.run(main)
    assert header is not None and header["cid"] == hop.manifest_cid and header["id"] == "m"
    assert header["size"] == len(data)
    assert data == (deployment_dir / "manifest.json").read_bytes()


def test_fetch_shards_from_a_peer(node1: NodeProcess, node2: NodeProcess, hop: Hop,
                                  client: ClientThread) -> None:
    node_cids = [s.cid for s in hop.manifest.node_shards]
    r = httpx.post(node2.http + "/v1/shards/fetch",
                   json={"deployment": hop.manifest_cid, "peer": node1.addr}, timeout=120)
    assert r.status_code == 200, r.text
    assert r.json() == {"deployment": hop.manifest_cid, "shards": node_cids}

    info = get_json(node2.http + "/v1/node")
    assert sorted(s["cid"] for s in info["shards"]) == sorted(node_cids)
    assert all(s["deployment"] == hop.manifest_cid for s in info["shards"])
    files = sorted(p for p in node2.data_dir.rglob("*") if p.is_file())
    for cid in node_cids:
        path = node2.data_dir / "shards" / f"{cid}.onnx"
        assert cid_of_file(path) == cid
    assert cid_of_file(node2.data_dir / "deployments" / f"{hop.manifest_cid}.json") == \
        hop.manifest_cid
    names = {p.name for p in files}
    assert not any(c in n for n in names for c in (hop.head_cid, hop.tail_cid))
    assert not any(n.startswith(".incoming") for n in names)

    # node2 now serves the fetched shard, with its own signature
    client.run(valid_request, node2, hop)


def test_fetching_client_material_fails(node1: NodeProcess, node2: NodeProcess,
                                        hop: Hop) -> None:
    for body, status in (
            # client shards named as shards of the deployment: refused outright
            ({"deployment": hop.manifest_cid, "shards": [hop.head_cid], "peer": node1.addr}, 400),
            ({"deployment": hop.manifest_cid, "shards": [hop.tail_cid], "peer": node1.addr}, 400),
            # the head shard asked for as if it were a manifest: node1 does not serve it
            ({"deployment": hop.head_cid, "peer": node1.addr}, 502)):
        r = httpx.post(node2.http + "/v1/shards/fetch", json=body, timeout=60)
        assert r.status_code == status, (body, r.status_code, r.text)
    for cid in (hop.head_cid, hop.tail_cid):
        assert not (node2.data_dir / "shards" / f"{cid}.onnx").exists()
        assert not (node2.data_dir / "deployments" / f"{cid}.json").exists()
    r = httpx.post(node2.http + "/v1/shards/fetch",
                   json={"deployment": "not-a-cid", "peer": node1.addr}, timeout=30)
    assert r.status_code == 400


# -- lifecycle ------------------------------------------------------------------------------------

def test_sigterm_stops_cleanly_and_identity_is_reused(tmp_path: Path) -> None:
    data_dir = tmp_path / "D"
    first = start_node(data_dir)
    try:
        key = data_dir / "identity.key"
        assert stat.S_IMODE(key.stat().st_mode) == 0o600
        assert first.info["identity_created"] is True
        key_bytes = key.read_bytes()
        started = time.monotonic()
        first.proc.send_signal(signal.SIGTERM)
        code = first.proc.wait(10)
        elapsed = time.monotonic() - started
    finally:
        stop_process(first.proc)
    assert code == 0, first.log()
    assert elapsed < 5, f"took {elapsed:.1f} s to stop"
    assert not (data_dir / "node.json").exists()
    assert "node stopped" in first.log()

    second = start_node(data_dir)
    try:
        assert second.peer_id == first.peer_id
        assert second.info["did"] == first.info["did"]
        assert second.info["identity_created"] is False
        assert key.read_bytes() == key_bytes
        assert stat.S_IMODE(key.stat().st_mode) == 0o600
        assert second.stop() == 0
    finally:
        stop_process(second.proc)
    assert not (data_dir / "node.json").exists()


def test_node_refuses_a_readable_identity_key(tmp_path: Path) -> None:
    data_dir = tmp_path / "D"
    data_dir.mkdir()
    Identity.generate().save(data_dir / "identity.key")
    os.chmod(data_dir / "identity.key", 0o644)
    proc, log_path = spawn_node(data_dir)
    try:
        code = proc.wait(30)
    except subprocess.TimeoutExpired:
        stop_process(proc)
        raise
    log = log_path.read_text()
    assert code == 2, log
    assert "chmod 600" in log
    assert not (data_dir / "node.json").exists()
