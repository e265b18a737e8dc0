"""Integration tests of /veilnet/infer/1 against real ``veilnet node start`` processes.

Valid requests (checked against an in-process onnxruntime run), malformed requests, several
requests on one stream, raw TCP junk, the request timeout and the frame limit. The fixtures
(``node1``, ``small``, ``client``, ``hop``) and the shared checks live in protocol_fixtures.py.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import cbor2
import numpy as np
import pytest
import trio
from libp2p.abc import IHost
from node_helpers import ClientThread, NodeProcess, client_host, exchange, run_trio
from protocol_fixtures import (
    TEXTS,
    Hop,
    case_byte_count,
    case_float64,
    check_error,
    check_valid_response,
    frame,
    hidden,
    valid_request,
    with_input,
)

from crypto.identity import public_from_peer_id, verify
from models import Pipeline, ShardSpec, cid_of_bytes
from protocols import INFER, PEERS
from protocols.infer import receipt_payload
from protocols.transport import close_quietly, connect, peer_info
from protocols.wire import (
    DEFAULT_FRAME_LIMIT,
    decode_tensors,
    encode_frame,
    encode_tensors,
    encode_varint,
    read_frame,
    tensors_digest,
)

pytest_plugins = ["protocol_fixtures"]


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


def _case_rank(hop: Hop) -> bytes:
    name = hop.shard.inputs[0].name
    flat = hidden(hop).reshape(-1, hidden(hop).shape[-1])
    return encode_frame(with_input(hop, name, encode_tensors({name: flat})[name]))


def _case_hidden_383(hop: Hop) -> bytes:
    name = hop.shard.inputs[0].name
    return encode_frame(with_input(hop, name, encode_tensors(
        {name: np.ascontiguousarray(hidden(hop)[..., :383])})[name]))


def _case_bad_dtype(hop: Hop) -> bytes:
    name = hop.shard.inputs[0].name
    tensor = encode_tensors({name: hidden(hop)})[name]
    tensor["dtype"] = "complex64"
    return encode_frame(with_input(hop, name, tensor))


def _case_overflowing_shape(hop: Hop) -> bytes:
    name = hop.shard.inputs[0].name
    return encode_frame(with_input(hop, name, {"dtype": "float32", "shape": [65536] * 4,
                                                "data": b""}))


def _case_inconsistent_dims(hop: Hop) -> bytes:
    """Names, dtypes, ranks and fixed dims all right, but seq differs between the inputs."""
    name = hop.shard.inputs[1].name  # attention_bias [batch, 1, 1, seq]
    bias = hop.feeds[name]
    longer = np.concatenate([bias, bias[..., :1]], axis=-1)
    return encode_frame(with_input(hop, name, encode_tensors({name: longer})[name]))


def _case_tagged_version(hop: Hop) -> bytes:
    """A whole valid request except that "v" is CBOR tag 2 (bignum 1): tags are refused."""
    return frame({**hop.request("rid-1"), "v": cbor2.CBORTag(2, b"\x01")})


# name -> (payload builder, half-close after sending, expected code, expected echoed id)
MALFORMED: dict[str, tuple[Callable[[Hop], bytes], bool, str, str | None]] = {
    "garbage bytes": (lambda h: b"\x05\xff\xfe\xfd\xfc\xfb", False, "bad_frame", None),
    "endless header": (lambda h: b"\xff" * 16, False, "bad_frame", None),
    "non-minimal header": (lambda h: b"\x80\x00", False, "bad_frame", None),
    "cbor array": (lambda h: frame([1, 2, 3]), False, "bad_frame", None),
    "cbor text": (lambda h: frame("hello"), False, "bad_frame", None),
    "cbor unknown tag": (lambda h: frame({"v": cbor2.CBORTag(65536, 1)}), False,
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
    "float64": (case_float64, False, "bad_inputs", "rid-1"),
    "wrong rank": (_case_rank, False, "bad_inputs", "rid-1"),
    "hidden size 383": (_case_hidden_383, False, "bad_inputs", "rid-1"),
    "inconsistent seq dims": (_case_inconsistent_dims, False, "run_failed", "rid-1"),
    "byte count mismatch": (case_byte_count, False, "bad_tensor", "rid-1"),
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
