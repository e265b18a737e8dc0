"""Fuzzing what discovery takes from strangers: signed A2A agent cards (registry/card.py:
CardRejected), ANP agent descriptions and did:wba DIDs (registry/anp.py: ValueError, as
documented), the JWS of a card (crypto/jws.py: JWSError) and the A2A JSON-RPC endpoint
(registry/a2a_rpc.py: ``dispatch`` never raises and answers every bad body with a JSON-RPC
error, never with the "internal error" that marks a bug; its part parsers raise InferFailed).
Each starts from a valid object signed by a real identity."""

from __future__ import annotations

import base64
import json
from typing import Any

from fuzzkit import (
    budget,
    check,
    leaves,
    mutated_bytes,
    mutated_text,
    mutated_tree,
    run_now,
    values,
)
from hypothesis import given
from hypothesis import strategies as st

from crypto.identity import Identity, IdentityError, public_from_did, public_from_peer_id
from crypto.jws import JWSError, protected_header, verify_detached
from protocols.wire import encode_tensors
from registry.a2a_rpc import (
    INTERNAL_ERROR,
    InferFailed,
    dispatch,
    infer_request_from_part,
    infer_response_from_part,
)
from registry.anp import agent_description, did_wba, did_wba_url, verify_agent_description
from registry.card import (
    CardRejected,
    ServedShard,
    build_card,
    canonical_bytes,
    parse_card_json,
    verify_card,
)

NODE = Identity.from_seed(b"\x05" * 32)
NOW = 1_700_000_000
SHARD = "bafkreigh2akiscaildcqabsyg3dfr6chu3fgpregiymsck7e7aqa4s52zy"
DEPLOYMENT = "bafkreihdwdcefgh4dqkjv67uzcmw7ojee6xedzdetojuzjevtenxquvyku"
CARD = build_card(NODE, a2a_url="http://127.0.0.1:8401/a2a",
                  multiaddrs=["/ip4/127.0.0.1/tcp/4001"], http="http://127.0.0.1:8401",
                  shards=[ServedShard(DEPLOYMENT, "all-MiniLM-L6-v2", SHARD, 1, "ee-encoder/1")],
                  capacity=2, ttl=60, now=NOW, ledger_key="example.org/log+01234567+AQ==")
CARD_TEXT = json.dumps(CARD)
INFO = verify_card(CARD, now=NOW + 1)
WBA = did_wba("node.example.org:8443", NODE.peer_id)
DESCRIPTIONS = [agent_description(INFO, base_url="https://node.example.org:8443", did=did,
                                  identity=NODE) for did in (NODE.did, WBA)]


def test_valid_objects_pass() -> None:
    assert verify_card(parse_card_json(CARD_TEXT), origin_peer=NODE.peer_id, now=NOW + 1)
    for doc in DESCRIPTIONS:
        verify_agent_description(doc)
    assert did_wba_url(WBA).startswith("https://node.example.org:8443/")
    sig = CARD["signatures"][0]
    verify_detached(sig["protected"], sig["signature"], canonical_bytes(CARD), NODE.public)


# -- agent cards --------------------------------------------------------------------------------

@budget(150)
@given(mutated_tree(CARD, surrogates=True))
def test_verify_card_mutated(card: Any) -> None:
    check("card.verify_card", verify_card, card, origin_peer=NODE.peer_id, now=NOW + 1,
          errors=CardRejected)


@budget(100)
@given(st.one_of(mutated_text(CARD_TEXT), mutated_bytes(CARD_TEXT.encode()),
                 st.text(max_size=100)))
def test_parse_card_json(data: str | bytes) -> None:
    doc = check("card.parse_card_json", parse_card_json, data, errors=CardRejected)
    if doc:
        check("card.verify_card[json]", verify_card, doc, now=NOW + 1, errors=CardRejected)


@budget(75)
@given(mutated_tree(CARD["signatures"][0], surrogates=True), st.sampled_from([
    NODE.public, b"\x00" * 32, b"\xff" * 32]))
def test_jws(sig: Any, public: bytes) -> None:
    if not isinstance(sig, dict):
        return
    protected, signature = sig.get("protected"), sig.get("signature")
    if isinstance(protected, str):
        check("jws.protected_header", protected_header, protected, errors=JWSError)
    if isinstance(protected, str) and isinstance(signature, str):
        check("jws.verify_detached", verify_detached, protected, signature,
              canonical_bytes(CARD), public, errors=JWSError)


# -- ANP ----------------------------------------------------------------------------------------

@budget(75)
@given(st.data())
def test_verify_agent_description(data: st.DataObject) -> None:
    doc = data.draw(mutated_tree(data.draw(st.sampled_from(DESCRIPTIONS)), surrogates=True))
    check("anp.verify_agent_description", verify_agent_description, doc, errors=ValueError)


@budget(100)
@given(st.one_of(mutated_text(WBA), st.text(max_size=80), leaves()))
def test_did_wba_url(did: Any) -> None:
    check("anp.did_wba_url", did_wba_url, did, errors=ValueError)


# -- A2A JSON-RPC -------------------------------------------------------------------------------

def b64_tensors() -> dict[str, Any]:
    import numpy as np

    tensors = encode_tensors({"x": np.arange(6, dtype=np.float32).reshape(2, 3)})
    return {n: {**t, "data": base64.b64encode(t["data"]).decode()} for n, t in tensors.items()}


PART = {"veilnet": "infer/1", "shard": SHARD, "id": "req-1", "inputs": b64_tensors()}
SEND_V1 = {"jsonrpc": "2.0", "id": 1, "method": "SendMessage", "params": {
    "message": {"messageId": "m1", "role": "ROLE_USER", "contextId": "c1",
                "parts": [{"data": PART, "mediaType": "application/json"}]},
    "configuration": {"acceptedOutputModes": ["application/json"]}}}
SEND_V03 = {"jsonrpc": "2.0", "id": "x", "method": "message/send", "params": {
    "message": {"kind": "message", "messageId": "m3", "role": "user",
                "parts": [{"kind": "data", "data": PART}]}}}
OTHER = [{"jsonrpc": "2.0", "id": 2, "method": m, "params": {"id": "t", "pageSize": 5}}
         for m in ("GetTask", "ListTasks", "tasks/get", "SendStreamingMessage",
                   "GetExtendedAgentCard", "tasks/pushNotificationConfig/set")]
RESPONSE_PART = {"veilnet": "infer/1", "id": "req-1", "shard": SHARD,
                 "outputs": b64_tensors(), "input_digest": "AAAA", "output_digest": "AAAA",
                 "node": NODE.did, "signature": base64.b64encode(b"\x01" * 64).decode()}


async def fake_infer(request: dict[str, Any]) -> dict[str, Any]:
    """A node answering every request with a well-formed (unsigned) response."""
    return {"v": 1, "id": request["id"], "shard": request["shard"], "outputs": {},
            "input_digest": b"\x00" * 32, "output_digest": b"\x00" * 32, "node": NODE.did,
            "signature": b"\x00" * 64}


def no_internal_error(body: bytes, version: str | None) -> None:
    reply = run_now(dispatch(body, fake_infer, a2a_version=version), "dispatch")
    for r in reply if isinstance(reply, list) else [reply]:
        if r is None:
            continue
        assert r["jsonrpc"] == "2.0" and ("error" in r) != ("result" in r), r
        assert "error" not in r or r["error"]["code"] != INTERNAL_ERROR, \
            f"a bad request reached dispatch's catch-all (a bug): {r['error']}"


VERSIONS = st.one_of(st.sampled_from([None, "", "1.0", "0.3", "1.0.2", "0.3.0", "2.0", "1",
                                      "1.0.0.0", " 1.0 ", "².0", "1.²", "١.٠", "1.0\x00"]),
                     st.text(max_size=8))


@budget(100)
@given(st.data(), VERSIONS)
def test_dispatch_mutated_requests(data: st.DataObject, version: str | None) -> None:
    request = data.draw(mutated_tree(data.draw(st.sampled_from([SEND_V1, SEND_V03, *OTHER])),
                                     binary=False))
    batch = data.draw(st.booleans())
    try:
        body = json.dumps([request, SEND_V1] if batch else request).encode()
    except (ValueError, TypeError, RecursionError):
        return
    check("a2a_rpc.dispatch[mutated]", no_internal_error, body, version, errors=())


@budget(100)
@given(st.one_of(mutated_bytes(json.dumps(SEND_V1).encode()), st.binary(max_size=100)),
       VERSIONS)
def test_dispatch_mutated_bytes(body: bytes, version: str | None) -> None:
    check("a2a_rpc.dispatch[bytes]", no_internal_error, body, version, errors=())


@budget(60)
@given(mutated_tree(PART, binary=False), mutated_tree(RESPONSE_PART, binary=False))
def test_part_parsers(request_part: Any, response_part: Any) -> None:
    check("a2a_rpc.infer_request_from_part", infer_request_from_part, request_part, "m1",
          errors=InferFailed)
    check("a2a_rpc.infer_response_from_part", infer_response_from_part, response_part,
          errors=InferFailed)


@budget(30)
@given(values(binary=False))
def test_dispatch_any_json(value: Any) -> None:
    try:
        body = json.dumps(value).encode()
    except (ValueError, TypeError, RecursionError):
        return
    check("a2a_rpc.dispatch[values]", no_internal_error, body, None, errors=())


# -- very long fields ---------------------------------------------------------------------------

LONG = "z" + "1" * 70_000  # base58 decoding is quadratic: such a field must be refused undecoded


def with_field(doc: dict[str, Any], path: tuple[str, ...], value: Any) -> dict[str, Any]:
    out = json.loads(json.dumps(doc))
    node = out
    for key in path[:-1]:
        node = node[key]
    node[path[-1]] = value
    return out


def test_long_fields_are_refused_fast() -> None:
    """Fields that go through base58 (keys, signatures, PeerIDs), 70,000 characters long."""
    for path in (("proof", "proofValue"), ("did",), ("proof", "verificationMethod")):
        for doc in DESCRIPTIONS:
            check("anp.verify_agent_description[long]", verify_agent_description,
                  with_field(doc, path, LONG), errors=ValueError)
    params = ("capabilities", "extensions", 0, "params")
    for key in ("did", "peerId"):
        card = with_field(CARD, (*params, key), LONG)  # type: ignore[arg-type]
        check("card.verify_card[long]", verify_card, card, now=NOW + 1, errors=CardRejected)
    check("anp.did_wba_url[long]", did_wba_url, "did:wba:node.example.org:" + LONG,
          errors=ValueError)


# -- did:key and PeerID text --------------------------------------------------------------------

@budget(100)
@given(st.one_of(mutated_text(NODE.did), mutated_text(NODE.peer_id), mutated_text(NODE.key_id),
                 leaves()))
def test_did_and_peer_id(text: Any) -> None:
    check("identity.public_from_did", public_from_did, text, errors=IdentityError)
    check("identity.public_from_peer_id", public_from_peer_id, text, errors=IdentityError)
