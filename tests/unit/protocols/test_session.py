"""protocols/session.py without a network: requests parsed the way a node parses them, answered
with a real Ed25519 signature and checked the way a client checks them; every check the caller
makes fails on the matching tampering; the cache/non-cache split of a decoder shard.

Digests and the signed payload are computed here independently (hashlib and cbor2 over the
encodings docs/protocol.md gives), not with the functions under test.
"""

from __future__ import annotations

import hashlib
from typing import Any

import cbor2
import numpy as np
import pytest

from consensus.fingerprint import fingerprint
from crypto.identity import Identity, public_from_peer_id, verify
from errors import InputError
from models import ShardSpec, TensorSpec
from protocols.session import (
    CloseRequest,
    KVCacheError,
    OpenRequest,
    SessionIO,
    StepRequest,
    answer,
    check_close_reply,
    check_reply,
    check_session_inputs,
    close_answer,
    parse_request,
    session_io,
)
from protocols.wire import WireError, decode_body

CID = "bafkrei" + "a" * 52
SID = "0123456789abcdef" * 2
NODE = Identity.generate()
RNG = np.random.default_rng(7)
KV = {"layout": ["batch", "kv_heads", "seq", "head_dim"],
      "past": ["past_key_0", "past_value_0", "past_key_1", "past_value_1"],
      "present": ["present_key_0", "present_value_0", "present_key_1", "present_value_1"]}
CACHE = ("batch", 2, "past_seq", 4)
SHARD = ShardSpec(
    1, CID, "node", f"{CID}.onnx",
    (TensorSpec("hidden_embed", "float32", ("batch", "seq", 8)),
     *(TensorSpec(f"past_{kv}_{i}", "float32", CACHE) for i in (1, 0) for kv in ("value", "key"))),
    (TensorSpec("hidden_1", "float32", ("batch", "seq", 8)),
     *(TensorSpec(f"present_{kv}_{i}", "float32", ("batch", 2, "total", 4))
       for i in (0, 1) for kv in ("key", "value"))))


def io() -> SessionIO:
    return session_io(SHARD, KV)


def digest(tensors: dict[str, np.ndarray]) -> bytes:
    entries = [[n, a.dtype.name, list(a.shape),
                hashlib.sha256(a.astype(a.dtype.newbyteorder("<")).tobytes()).digest()]
               for n, a in sorted(tensors.items())]
    return hashlib.sha256(cbor2.dumps(entries, canonical=True)).digest()


def wire(message: dict[str, Any]) -> dict[str, Any]:
    return decode_body(cbor2.dumps(message))


def hidden(tokens: int, batch: int = 1) -> dict[str, np.ndarray]:
    return {"hidden_embed": RNG.standard_normal((batch, tokens, 8)).astype(np.float32)}


def outputs(tokens: int) -> dict[str, np.ndarray]:
    return {"hidden_1": RNG.standard_normal((1, tokens, 8)).astype(np.float32)}


# -- the cache split ------------------------------------------------------------------------------

def test_session_io_splits_cache_from_activations() -> None:
    split = io()
    assert [t.name for t in split.inputs] == ["hidden_embed"]
    assert [t.name for t in split.outputs] == ["hidden_1"]
    assert split.cache == (("past_key_0", "present_key_0"), ("past_value_0", "present_value_0"),
                           ("past_key_1", "present_key_1"), ("past_value_1", "present_value_1"))
    assert (split.batch_axis, split.seq_axis) == (0, 2)
    empty = split.empty_cache(3)
    assert sorted(empty) == sorted(KV["past"])
    assert all(v.shape == (3, 2, 0, 4) and v.dtype == np.float32 for v in empty.values())
    run = {"hidden_1": np.zeros((3, 5, 8), np.float32),
           **{q: np.ones((3, 2, 5, 4), np.float32) for q in KV["present"]}}
    visible, cache = split.split_outputs(run)
    assert list(visible) == ["hidden_1"] and sorted(cache) == sorted(KV["past"])
    assert split.cache_length(cache) == 5
    cache["past_key_1"] = np.ones((3, 2, 4, 4), np.float32)
    with pytest.raises(WireError, match="disagree"):
        split.cache_length(cache)


def test_only_the_cache_pairs_of_this_shard_count() -> None:
    """A manifest's kv_cache lists every layer; a shard of layers 0-1 uses its own pairs."""
    doc = {**KV, "past": [*KV["past"], "past_key_9", "past_value_9"],
           "present": [*KV["present"], "present_key_9", "present_value_9"]}
    assert session_io(SHARD, doc).cache == io().cache


@pytest.mark.parametrize(("change", "words"), [
    (lambda: (SHARD, None), "no kv_cache"),
    (lambda: (ShardSpec(0, CID, "client-head", "x.onnx", SHARD.inputs, SHARD.outputs), KV),
     "node shards only"),
    (lambda: (SHARD, {**KV, "layout": ["batch", "kv_heads", "head_dim"]}), "'seq'"),
    (lambda: (SHARD, {**KV, "present": KV["present"][:-1]}), "same length"),
    (lambda: (SHARD, {**KV, "past": ["nope"] * 4}), "takes no cache tensor"),
    (lambda: (SHARD, {**KV, "present": [*KV["present"][:-1], "gone"]}), "do not pair up"),
    (lambda: (ShardSpec(1, CID, "node", "x.onnx",
                        (*SHARD.inputs[:1], *(TensorSpec(n, "float32", ("batch", "h", "p", 4))
                                              for n in KV["past"])), SHARD.outputs), KV),
     "fixed sizes"),
    (lambda: (ShardSpec(1, CID, "node", "x.onnx", SHARD.inputs[1:], SHARD.outputs), KV),
     "no input besides"),
])
def test_session_io_refusals(change: Any, words: str) -> None:
    shard, doc = change()
    with pytest.raises(KVCacheError, match=words) as info:
        session_io(shard, doc)
    assert isinstance(info.value, InputError)


def test_check_session_inputs() -> None:
    assert check_session_inputs(io(), hidden(5, batch=2)) == (2, 5)
    nan = hidden(3)
    nan["hidden_embed"][0, 1, 2] = np.nan
    for bad in [{"hidden_embed": np.zeros((1, 2, 7), np.float32)},   # hidden size
                {"hidden_embed": np.zeros((1, 8), np.float32)},      # rank
                {"hidden_embed": np.zeros((1, 2, 8), np.float64)},   # dtype
                {"hidden_embed": np.zeros((1, 0, 8), np.float32)},   # no token
                {"hidden_embed": np.zeros((0, 1, 8), np.float32)},   # empty batch
                {**hidden(1), "past_key_0": np.zeros((1, 2, 0, 4), np.float32)},  # a cache input
                {}, nan]:
        with pytest.raises(WireError) as info:
            check_session_inputs(io(), bad)
        assert info.value.code == "bad_inputs", bad


# -- requests -------------------------------------------------------------------------------------

def test_requests_round_trip() -> None:
    feeds = hidden(4)
    opened = parse_request(wire(OpenRequest("r1", CID, feeds).to_message()), "r1")
    assert isinstance(opened, OpenRequest) and opened.shard == CID and opened.want == "outputs"
    assert np.array_equal(opened.inputs["hidden_embed"], feeds["hidden_embed"])
    step = parse_request(wire(StepRequest("r2", SID, feeds, 7, "fingerprint").to_message()), "r2")
    assert isinstance(step, StepRequest)
    assert (step.session, step.position, step.want) == (SID, 7, "fingerprint")
    assert "position" not in StepRequest("r3", SID, feeds).to_message()
    assert parse_request(wire(StepRequest("r3", SID, feeds).to_message()), "r3").position is None
    closed = parse_request(wire(CloseRequest("r4", SID).to_message()), "r4")
    assert closed == CloseRequest("r4", SID)


GOOD_STEP = StepRequest("r", SID, hidden(1)).to_message()


@pytest.mark.parametrize(("bad", "code"), [
    ({k: v for k, v in GOOD_STEP.items() if k != "op"}, "bad_request"),
    ({**GOOD_STEP, "op": "rewind"}, "bad_request"),
    ({**GOOD_STEP, "op": 3}, "bad_request"),
    ({**GOOD_STEP, "session": "not-hex"}, "bad_request"),
    ({**GOOD_STEP, "session": SID.upper()}, "bad_request"),
    ({**GOOD_STEP, "session": SID + "0"}, "bad_request"),
    ({**GOOD_STEP, "position": -1}, "bad_request"),
    ({**GOOD_STEP, "position": True}, "bad_request"),
    ({**GOOD_STEP, "position": "3"}, "bad_request"),
    ({**GOOD_STEP, "want": "everything"}, "bad_request"),
    ({**GOOD_STEP, "inputs": [1, 2]}, "bad_request"),
    ({**GOOD_STEP, "inputs": {"hidden_embed": {"dtype": "float32", "shape": [1, 1, 8],
                                               "data": b"\0" * 4}}}, "bad_tensor"),
    ({**OpenRequest("r", CID, hidden(1)).to_message(), "shard": "Qm" + "x" * 44},
     "bad_request"),
    ({"v": 1, "id": "r", "op": "close"}, "bad_request"),
])
def test_parse_refusals(bad: dict[str, Any], code: str) -> None:
    with pytest.raises(WireError) as info:
        parse_request(wire(bad), "r")
    assert info.value.code == code


# -- answers and the caller's checks --------------------------------------------------------------

def payload(request_id: str, session: str, before: int, din: bytes, dout: bytes) -> bytes:
    return cbor2.dumps(["veilnet-session-step/1", request_id, CID, session, before, din, dout],
                       canonical=True)


def served(request: OpenRequest | StepRequest, before: int,
           outs: dict[str, np.ndarray]) -> dict[str, Any]:
    parsed = parse_request(wire(request.to_message()), request.id)
    assert isinstance(parsed, type(request))
    tokens = next(iter(request.inputs.values())).shape[1]
    return wire(answer(NODE, parsed, shard=CID, session=SID, position_before=before,
                       position=before + tokens, outputs=outs))


def test_open_and_step_answers_are_signed_and_checked() -> None:
    feeds, outs = hidden(6), outputs(6)
    request = OpenRequest("o1", CID, feeds)
    response = served(request, 0, outs)
    assert response["op"] == "open" and response["position"] == 6
    reply = check_reply(response, request, digest(feeds), NODE.peer_id, SHARD, io().outputs)
    assert (reply.session, reply.position_before, reply.position) == (SID, 0, 6)
    assert np.array_equal(reply.outputs["hidden_1"], outs["hidden_1"])
    assert reply.output_digest == digest(outs) and response["node"] == NODE.did
    expected = payload("o1", SID, 0, digest(feeds), digest(outs))
    assert reply.payload() == expected
    assert verify(public_from_peer_id(NODE.peer_id), reply.signature, expected)

    feeds, outs = hidden(1), outputs(1)
    for position in (6, None):
        step = StepRequest("s1", SID, feeds, position)
        response = served(step, 6, outs)
        reply = check_reply(response, step, digest(feeds), NODE.peer_id, SHARD, io().outputs)
        assert (reply.position_before, reply.position, reply.op) == (6, 7, "step")
        assert verify(public_from_peer_id(NODE.peer_id), reply.signature,
                      payload("s1", SID, 6, digest(feeds), digest(outs)))
    # the caller's own count of the position wins over the node's claim
    with pytest.raises(WireError) as info:
        check_reply(response, step, digest(feeds), NODE.peer_id, SHARD, io().outputs,
                    position_before=5)
    assert info.value.code == "bad_response"
    with pytest.raises(WireError) as info:
        check_reply(response, StepRequest("s1", SID, feeds, 5), digest(feeds), NODE.peer_id,
                    SHARD, io().outputs)
    assert info.value.code == "bad_response"


def test_fingerprint_answers() -> None:
    feeds, outs = hidden(2), outputs(2)
    request = StepRequest("f1", SID, feeds, 3, want="fingerprint")
    response = served(request, 3, outs)
    assert "outputs" not in response
    reply = check_reply(response, request, digest(feeds), NODE.peer_id, SHARD, io().outputs)
    assert reply.outputs is None and reply.fingerprint == fingerprint(outs)
    assert reply.output_digest == digest(outs)
    response["fingerprint_signature"] = bytes(64)
    with pytest.raises(WireError) as info:
        check_reply(response, request, digest(feeds), NODE.peer_id, SHARD, io().outputs)
    assert info.value.code == "bad_signature"


@pytest.mark.parametrize(("tamper", "code"), [
    (lambda r: r.update(id="other"), "bad_response"),
    (lambda r: r.update(op="open"), "bad_response"),
    (lambda r: r.update(shard="bafkrei" + "b" * 52), "bad_response"),
    (lambda r: r.update(session="f" * 32), "bad_response"),
    (lambda r: r.pop("session"), "bad_response"),
    (lambda r: r.update(position=9), "bad_response"),
    (lambda r: r.update(position="5"), "bad_response"),
    (lambda r: r.update(input_digest=bytes(32)), "bad_response"),
    (lambda r: r.update(output_digest=bytes(32)), "bad_response"),
    (lambda r: r["outputs"]["hidden_1"].update(data=bytes(len(r["outputs"]["hidden_1"]["data"]))),
     "bad_response"),  # other outputs: the digest no longer matches
    (lambda r: r.update(outputs={}), "bad_response"),
    (lambda r: r.update(signature=bytes(64)), "bad_signature"),
    (lambda r: r.pop("signature"), "bad_signature"),
])
def test_every_check_of_a_step_answer_can_fail(tamper: Any, code: str) -> None:
    feeds = hidden(1)
    request = StepRequest("t1", SID, feeds, 4)
    response = served(request, 4, outputs(1))
    tamper(response)
    with pytest.raises(WireError) as info:
        check_reply(response, request, digest(feeds), NODE.peer_id, SHARD, io().outputs)
    assert info.value.code == code


def test_a_consistent_lie_about_the_position_breaks_the_signature() -> None:
    """A node that signed position_before 4 cannot claim the step started at 8."""
    feeds = hidden(1)
    request = StepRequest("t2", SID, feeds)
    response = served(request, 4, outputs(1))
    response["position"] = 9
    with pytest.raises(WireError) as info:
        check_reply(response, request, digest(feeds), NODE.peer_id, SHARD, io().outputs)
    assert info.value.code == "bad_signature"


def test_answers_of_another_node_and_non_finite_outputs_are_refused() -> None:
    feeds = hidden(2)
    request = OpenRequest("o2", CID, feeds)
    response = served(request, 0, outputs(2))
    with pytest.raises(WireError) as info:
        check_reply(response, request, digest(feeds), Identity.generate().peer_id, SHARD,
                    io().outputs)
    assert info.value.code == "bad_signature"
    bad = outputs(2)
    bad["hidden_1"][0, 0, 0] = np.inf
    with pytest.raises(WireError, match="non-finite") as info:
        check_reply(served(request, 0, bad), request, digest(feeds), NODE.peer_id, SHARD,
                    io().outputs)
    assert info.value.code == "bad_response"


def test_signed_outputs_of_the_wrong_shape_are_refused() -> None:
    """A node that signs outputs for another number of tokens (or hidden size) is caught."""
    feeds = hidden(1)
    request = StepRequest("w1", SID, feeds, 2)
    for wrong in (outputs(2), {"hidden_1": np.zeros((1, 1, 9), np.float32)},
                  {"hidden_1": np.zeros((2, 1, 8), np.float32)}):
        with pytest.raises(WireError, match="shape") as info:
            check_reply(served(request, 2, wrong), request, digest(feeds), NODE.peer_id, SHARD,
                        io().outputs)
        assert info.value.code == "bad_response"
    fp_request = StepRequest("w2", SID, feeds, 2, want="fingerprint")
    with pytest.raises(WireError, match="shape"):
        check_reply(served(fp_request, 2, outputs(3)), fp_request, digest(feeds), NODE.peer_id,
                    SHARD, io().outputs)


def test_close_answer() -> None:
    request = CloseRequest("c1", SID)
    response = wire(close_answer(request))
    assert response == {"v": 1, "id": "c1", "op": "close", "session": SID, "closed": True}
    check_close_reply(response, request)
    for tamper in ({"closed": False}, {"session": "e" * 32}, {"id": "c2"}, {"op": "step"}):
        with pytest.raises(WireError) as info:
            check_close_reply({**response, **tamper}, request)
        assert info.value.code == "bad_response"
