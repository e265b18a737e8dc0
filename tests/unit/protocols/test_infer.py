"""protocols/infer.py, both halves without a network: a request parsed the way a node parses it,
answered with a real Ed25519 signature, and checked the way the client checks it. Every check
the caller makes is shown to fail on the matching tampering.

The expected digests and payloads are computed here independently (hashlib and cbor2 over the
documented encodings), not with the functions under test.
"""

from __future__ import annotations

import hashlib
from typing import Any

import cbor2
import numpy as np
import pytest

from consensus.fingerprint import fingerprint
from crypto.identity import Identity, public_from_peer_id, verify
from models import ShardSpec, TensorSpec
from protocols.infer import (
    CkksRequest,
    InferRequest,
    answer,
    check_ckks_reply,
    check_reply,
    ciphertexts_digest,
    ckks_answer,
    parse_request,
)
from protocols.wire import WireError, decode_body, encode_frame

CID = "bafkrei" + "a" * 52
NODE = Identity.generate()
RNG = np.random.default_rng(13)
FEEDS = {"h": RNG.standard_normal((2, 3, 8)).astype(np.float32),
         "mask": np.ones((2, 3), dtype=np.int64)}
OUTPUTS = {"out": RNG.standard_normal((2, 3, 8)).astype(np.float32)}
SHARD = ShardSpec(1, CID, "node", f"shards/{CID}.onnx",
                  (TensorSpec("h", "float32", ("b", "s", 8)),
                   TensorSpec("mask", "int64", ("b", "s"))),
                  (TensorSpec("out", "float32", ("b", "s", 8)),))


def digest(tensors: dict[str, np.ndarray]) -> bytes:
    """docs/protocol.md: SHA-256(dCBOR([[name, dtype, shape, SHA-256(data)], ...])) by name."""
    entries = [[n, a.dtype.name, list(a.shape), hashlib.sha256(a.astype(a.dtype.newbyteorder("<"))
                                                                .tobytes()).digest()]
               for n, a in sorted(tensors.items())]
    return hashlib.sha256(cbor2.dumps(entries, canonical=True)).digest()


def over_the_wire(message: dict[str, Any]) -> dict[str, Any]:
    """The message as the other end decodes it (a frame's body is the CBOR map)."""
    body = cbor2.dumps(message)
    assert encode_frame(message).endswith(body)
    return decode_body(body)


def served(want: str = "outputs") -> tuple[InferRequest, dict[str, Any]]:
    request = InferRequest("r1", CID, FEEDS, want)
    parsed = parse_request(over_the_wire(request.to_message()), "r1")
    assert isinstance(parsed, InferRequest) and parsed.want == want
    assert set(parsed.inputs) == set(FEEDS)
    for name, value in FEEDS.items():
        assert np.array_equal(parsed.inputs[name], value)
    return request, over_the_wire(answer(NODE, parsed, OUTPUTS))


def test_outputs_reply_round_trip_and_signature() -> None:
    request, response = served()
    reply = check_reply(response, request, digest(FEEDS), NODE.peer_id, SHARD)
    assert reply.input_digest == digest(FEEDS) and reply.output_digest == digest(OUTPUTS)
    assert np.array_equal(reply.outputs["out"], OUTPUTS["out"])
    payload = cbor2.dumps(["veilnet-infer-receipt/1", "r1", CID, digest(FEEDS), digest(OUTPUTS)],
                          canonical=True)
    assert verify(public_from_peer_id(NODE.peer_id), reply.signature, payload)
    assert response["node"] == NODE.did


def test_fingerprint_reply_is_checked_and_signed() -> None:
    request, response = served("fingerprint")
    assert "outputs" not in response
    reply = check_reply(response, request, digest(FEEDS), NODE.peer_id, SHARD)
    assert reply.outputs is None and reply.output_digest == digest(OUTPUTS)
    assert reply.fingerprint == fingerprint(OUTPUTS)
    fp_digest = hashlib.sha256(cbor2.dumps(fingerprint(OUTPUTS), canonical=True)).digest()
    assert verify(public_from_peer_id(NODE.peer_id), reply.fingerprint_signature, cbor2.dumps(
        ["veilnet-fingerprint/1", "r1", CID, digest(OUTPUTS), fp_digest], canonical=True))


@pytest.mark.parametrize(("tamper", "code"), [
    (lambda r: r.update(id="other"), "bad_response"),
    (lambda r: r.update(shard="bafkrei" + "b" * 52), "bad_response"),
    (lambda r: r.update(input_digest=bytes(32)), "bad_response"),
    (lambda r: r.update(output_digest=bytes(32)), "bad_response"),
    (lambda r: r["outputs"]["out"].update(data=bytes(len(r["outputs"]["out"]["data"]))),
     "bad_response"),  # other outputs: their digest no longer matches
    (lambda r: r.update(signature=bytes(64)), "bad_signature"),
    (lambda r: r.pop("signature"), "bad_signature"),
    (lambda r: r.update(outputs={}), "bad_response"),
])
def test_every_check_of_an_outputs_reply_can_fail(tamper: Any, code: str) -> None:
    request, response = served()
    tamper(response)
    with pytest.raises(WireError) as info:
        check_reply(response, request, digest(FEEDS), NODE.peer_id, SHARD)
    assert info.value.code == code


def test_a_reply_signed_by_another_node_is_refused() -> None:
    request, response = served()
    with pytest.raises(WireError) as info:
        check_reply(response, request, digest(FEEDS), Identity.generate().peer_id, SHARD)
    assert info.value.code == "bad_signature"


def test_non_finite_outputs_are_refused_even_when_signed() -> None:
    request = InferRequest("r1", CID, FEEDS)
    bad = {"out": OUTPUTS["out"].copy()}
    bad["out"][0, 0, 0] = np.nan
    response = over_the_wire(answer(NODE, request, bad))
    with pytest.raises(WireError, match="non-finite"):
        check_reply(response, request, digest(FEEDS), NODE.peer_id, SHARD)


@pytest.mark.parametrize(("message", "code", "text"), [
    ({"shard": "x"}, "bad_request", "'shard'"),
    ({"shard": CID, "encryption": "rot13"}, "bad_request", "'encryption'"),
    ({"shard": CID, "want": "everything"}, "bad_request", "'want'"),
    ({"shard": CID, "inputs": [1]}, "bad_request", "'inputs'"),
    ({"shard": CID, "inputs": {"h": {"dtype": "float32", "shape": [2], "data": b"x"}}},
     "bad_tensor", "needs 8 bytes"),
    ({"shard": CID, "encryption": "ckks", "context": b"c", "ciphertexts": []},
     "bad_request", "'ciphertexts'"),
    ({"shard": CID, "encryption": "ckks", "context": "c", "ciphertexts": [b"x"]},
     "bad_request", "'context'"),
])
def test_parse_request_refuses_what_the_spec_refuses(message: dict[str, Any], code: str,
                                                     text: str) -> None:
    with pytest.raises(WireError, match=text) as info:
        parse_request({"v": 1, "id": "r", **message}, "r")
    assert info.value.code == code


def test_ckks_reply_round_trip_and_tampering() -> None:
    request = CkksRequest("c1", CID, b"public context", [b"ct-a", b"ct-b"])
    parsed = parse_request(over_the_wire(request.to_message()), "c1")
    assert parsed == request
    outputs = [b"out-1", b"out-2", b"out-3"]
    response = over_the_wire(ckks_answer(NODE, request, outputs))
    got, reply = check_ckks_reply(response, request, NODE.peer_id)
    assert got == outputs
    expected_in = hashlib.sha256(cbor2.dumps(
        [hashlib.sha256(b"public context").digest(),
         [hashlib.sha256(c).digest() for c in request.ciphertexts]], canonical=True)).digest()
    assert reply.input_digest == expected_in == ciphertexts_digest(b"public context",
                                                                   request.ciphertexts)
    response["ciphertexts"] = [b"out-1", b"out-2", b"forged"]
    with pytest.raises(WireError) as info:
        check_ckks_reply(response, request, NODE.peer_id)
    assert info.value.code == "bad_response"
