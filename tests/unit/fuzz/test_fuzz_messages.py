"""Fuzzing every protocol's message parsers (protocols/{infer,session,shard,peers,cards,ledger,
witness}.py), on both sides: what a node parses from a caller (``parse_request`` and friends)
and what a caller checks in a node's answer (``check_reply``...). Each starts from a valid
message built with the project's own encoders and signers, mutated field by field; the parsers
take what ``decode_body`` yields (maps of CBOR values, including ``undefined``). Each must
return or raise WireError (``peers.parse_record``: InputError, as documented)."""

from __future__ import annotations

from typing import Any

import cbor2
import numpy as np
from fuzzkit import budget, check, mutated_bytes, mutated_text, mutated_tree, values
from hypothesis import given
from hypothesis import strategies as st

from consensus.fingerprint import fingerprint
from crypto.identity import Identity
from errors import InputError
from ledger.entries import make_entry
from models import ShardSpec, TensorSpec, cid_of_bytes
from protocols import cards, infer, ledger, peers, session, shard, witness
from protocols.infer import CkksRequest, InferRequest, MaskSeed
from protocols.session import CloseRequest, OpenRequest, StepRequest
from protocols.transport import peer_info
from protocols.wire import WireError, decode_body, tensors_digest

NODE = Identity.from_seed(bytes(range(32)))
CID = cid_of_bytes(b"fuzz shard")
SESSION_ID = "0123456789abcdef" * 2
FEEDS = {"h": (np.arange(16, dtype=np.float32).reshape(1, 2, 8) - 5) / 3}
OUTPUTS = {"out": np.linspace(-1, 1, 16, dtype=np.float32).reshape(1, 2, 8)}
SPEC = ShardSpec(1, CID, "node", f"shards/{CID}.onnx", (TensorSpec("h", "float32", ("b", "s", 8)),),
                 (TensorSpec("out", "float32", ("b", "s", 8)),))

EE = InferRequest("r1", CID, FEEDS)
FP = InferRequest("r2", CID, FEEDS, want="fingerprint")
SEEDED = InferRequest("r3", CID, seeds={"h": MaskSeed(b"\x07" * 32, (1, 2, 8), 0.5)})
CKKS = CkksRequest("r4", CID, b"context", [b"ct-1", b"ct-2"])
INFER_REQUESTS = [r.to_message() for r in (EE, FP, SEEDED, CKKS)]
INFER_ANSWERS = [(EE, infer.answer(NODE, EE, OUTPUTS)), (FP, infer.answer(NODE, FP, OUTPUTS))]
CKKS_ANSWER = infer.ckks_answer(NODE, CKKS, [b"out-1"])

OPEN = OpenRequest("s1", CID, FEEDS)
OPEN_FP = OpenRequest("s2", CID, FEEDS, want="fingerprint")
STEP = StepRequest("s3", SESSION_ID, {"h": FEEDS["h"][:, :1]}, position=2)
CLOSE = CloseRequest("s4", SESSION_ID)
SESSION_REQUESTS = [r.to_message() for r in (OPEN, OPEN_FP, STEP, CLOSE)]
SESSION_ANSWERS = [
    (OPEN, session.answer(NODE, OPEN, shard=CID, session=SESSION_ID, position_before=0,
                          position=2, outputs=OUTPUTS)),
    (OPEN_FP, session.answer(NODE, OPEN_FP, shard=CID, session=SESSION_ID, position_before=0,
                             position=2, outputs=OUTPUTS)),
    (STEP, session.answer(NODE, STEP, shard=CID, session=SESSION_ID, position_before=2,
                          position=3, outputs={"out": OUTPUTS["out"][:, :1]})),
]

RECORD = peers.PeerRecord(NODE.peer_id, NODE.did, ["/ip4/127.0.0.1/tcp/4001"], [CID],
                          "http://127.0.0.1:8401").to_json()
ENTRY = make_entry(NODE, "node-join/1", {"node": NODE.did, "peer_id": NODE.peer_id,
                                        "multiaddrs": ["/ip4/127.0.0.1/tcp/4001"]}, when=1700000000)
LEDGER_REQUESTS = [ledger.LedgerRequest(*a).to_message("l1") for a in (
    ("append", ENTRY), ("checkpoint", None, None, 5), ("proof", None, 3, 7),
    ("consistency", None, None, None, 2, 9), ("rankings",))]
NOTE = "example.org/log\n3\n" + "A" * 43 + "=\n\n— example.org/log AAAAAQ==\n"
OFFER = witness.Offer(NOTE, 2, [b"\x01" * 32, b"\x02" * 32]).to_message("w1")
WITNESS_ANSWERS = [witness.cosigned("w1", "— w AAAAAQ==\n"),
                   witness.refused("w1", "fork", "a fork", 4)]


def wire(message: dict[str, Any]) -> dict[str, Any]:
    """A message as a node receives it: through CBOR and ``decode_body``."""
    return decode_body(cbor2.dumps(message))


def mutated(valid: dict[str, Any]) -> st.SearchStrategy[Any]:
    return mutated_tree(valid, cbor_specials=True)


def as_map(value: Any) -> dict[str, Any]:
    return value if isinstance(value, dict) else {"v": 1, "id": "x", "node": value}


# -- what a node parses -------------------------------------------------------------------------

@budget(80)
@given(st.data())
def test_infer_parse_request(data: st.DataObject) -> None:
    message = as_map(data.draw(mutated(data.draw(st.sampled_from(INFER_REQUESTS)))))
    got = check("infer.parse_request", infer.parse_request, message, "id-1", errors=WireError)
    if isinstance(got, InferRequest) and got.seeds:  # the seeds digest is what gets signed
        infer.seeds_digest(got.seeds)


@budget(100)
@given(st.data())
def test_session_parse_request(data: st.DataObject) -> None:
    message = as_map(data.draw(mutated(data.draw(st.sampled_from(SESSION_REQUESTS)))))
    check("session.parse_request", session.parse_request, message, "id-1", errors=WireError)


@budget(50)
@given(st.one_of(mutated({"v": 1, "id": "f", "cid": CID}), values(cbor_specials=True)))
def test_shard_parse_request(message: Any) -> None:
    check("shard.parse_request", shard.parse_request, as_map(message), errors=WireError)


@budget(50)
@given(st.one_of(mutated({"v": 1, "id": "c", "deployment": CID, "shard": CID, "model": "m"}),
                 values(cbor_specials=True)))
def test_cards_parse_lookup(message: Any) -> None:
    check("cards.parse_lookup", cards.parse_lookup, as_map(message), errors=WireError)


@budget(100)
@given(mutated({"v": 1, "id": "p", "node": RECORD}))
def test_peers_parse_hello(message: Any) -> None:
    check("peers.parse_hello", peers.parse_hello, as_map(message), NODE.peer_id,
          errors=WireError)


@budget(75)
@given(mutated(RECORD))
def test_peers_parse_record(record: Any) -> None:
    check("peers.parse_record", peers.parse_record, record, errors=InputError)


@budget(100)
@given(st.data())
def test_ledger_parse_request(data: st.DataObject) -> None:
    message = as_map(data.draw(mutated(data.draw(st.sampled_from(LEDGER_REQUESTS)))))
    check("ledger.parse_request", ledger.parse_request, message, errors=WireError)


@budget(100)
@given(mutated_bytes(ENTRY))
def test_ledger_append_mutated_entry(entry: bytes) -> None:
    got = check("ledger.parse_request[entry]", ledger.parse_request,
                {"v": 1, "id": "a", "op": "append", "entry": entry}, errors=WireError)
    if entry == ENTRY:
        assert got


@budget(75)
@given(mutated(OFFER))
def test_witness_parse_offer(message: Any) -> None:
    got = check("witness.parse_offer", witness.parse_offer, as_map(message), errors=WireError)
    if got:
        assert type(got.old) is int and got.old >= 0


# -- what a caller checks -----------------------------------------------------------------------

@budget(60)
@given(st.data())
def test_witness_parse_answer(data: st.DataObject) -> None:
    answer = as_map(data.draw(mutated(data.draw(st.sampled_from(WITNESS_ANSWERS)))))
    got = check("witness.parse_answer", witness.parse_answer, answer, errors=())
    assert isinstance(got, witness.Answer)


@budget(125)
@given(st.data())
def test_infer_check_reply(data: st.DataObject) -> None:
    request, valid = data.draw(st.sampled_from(INFER_ANSWERS))
    response = as_map(data.draw(mutated(wire(valid))))
    check("infer.check_reply", infer.check_reply, response, request, tensors_digest(FEEDS),
          NODE.peer_id, SPEC, errors=WireError)


@budget(50)
@given(mutated(CKKS_ANSWER))
def test_infer_check_ckks_reply(response: Any) -> None:
    check("infer.check_ckks_reply", infer.check_ckks_reply, as_map(response), CKKS,
          NODE.peer_id, errors=WireError)


@budget(125)
@given(st.data())
def test_session_check_reply(data: st.DataObject) -> None:
    request, valid = data.draw(st.sampled_from(SESSION_ANSWERS))
    response = as_map(data.draw(mutated(wire(valid))))
    check("session.check_reply", session.check_reply, response, request,
          tensors_digest(request.inputs), NODE.peer_id, SPEC, SPEC.outputs, errors=WireError)


@budget(40)
@given(mutated(session.close_answer(CLOSE)))
def test_session_check_close_reply(response: Any) -> None:
    check("session.check_close_reply", session.check_close_reply, as_map(response), CLOSE,
          errors=WireError)


def test_valid_messages_pass() -> None:
    """The unmutated inputs of the targets above are accepted (the fuzzing starts from valid
    objects, not from something already refused)."""
    for message in INFER_REQUESTS:
        infer.parse_request(wire(message), message["id"])
    for message in SESSION_REQUESTS:
        session.parse_request(wire(message), message["id"])
    for message in LEDGER_REQUESTS:
        ledger.parse_request(wire(message))
    assert peers.parse_hello(wire({"v": 1, "id": "p", "node": RECORD}), NODE.peer_id)
    assert witness.parse_offer(wire(OFFER)).old == 2
    for request, response in INFER_ANSWERS:
        infer.check_reply(wire(response), request, tensors_digest(FEEDS), NODE.peer_id, SPEC)
    infer.check_ckks_reply(wire(CKKS_ANSWER), CKKS, NODE.peer_id)
    for request, response in SESSION_ANSWERS:
        session.check_reply(wire(response), request, tensors_digest(request.inputs),
                            NODE.peer_id, SPEC, SPEC.outputs)
    assert fingerprint(OUTPUTS)


# -- addresses a peer relays --------------------------------------------------------------------

ADDR = f"/ip4/127.0.0.1/tcp/4001/p2p/{NODE.peer_id}"


@budget(75)
@given(st.one_of(mutated_text(ADDR), mutated_text(f"/dns4/node.example.org/tcp/443/p2p/"
                                                  f"{NODE.peer_id}"), st.text(max_size=60)))
def test_peer_info(text: str) -> None:
    check("transport.peer_info", peer_info, text, errors=InputError)
