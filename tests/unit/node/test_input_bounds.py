"""Issue 12: the input bounds that need no node (split from tests/network/test_hardening_inputs.py,
which runs the attacks against a real node): the A2A dispatcher counts JSON values before parsing,
offloads big bodies and clips caller strings; the peer table and peer records are bounded; a
peer's error text is cut before it reaches logs and results."""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from typing import Any

import pytest
import trio

from crypto.identity import Identity
from node.peers import PeerTable
from protocols.peers import MAX_KNOWN_PEERS, PeerRecord, parse_record
from registry.a2a_rpc import (
    INVALID_PARAMS,
    INVALID_REQUEST,
    MAX_JSON_VALUES,
    OFFLOAD_BYTES,
    TASK_NOT_FOUND,
    dispatch,
)


def a2a_send(shard: Any, inputs: Any = None, **extra: Any) -> bytes:
    data = {"veilnet": "infer/1", "shard": shard, "inputs": inputs or {}, **extra}
    return json.dumps({"jsonrpc": "2.0", "id": 1, "method": "message/send", "params": {
        "message": {"role": "user", "messageId": "m1",
                    "parts": [{"kind": "data", "data": data}]}}}).encode()


async def _no_infer(message: dict[str, Any]) -> dict[str, Any]:
    raise AssertionError("infer must not be reached")


def _dispatch(body: bytes, **kwargs: Any) -> Any:
    return trio.run(lambda: dispatch(body, _no_infer, **kwargs))


def test_dispatch_counts_json_values_before_parsing() -> None:
    at_limit = b"[" + b"0," * (MAX_JSON_VALUES - 2) + b"0]"  # '[' and the commas: limit - 1
    reply = _dispatch(at_limit)
    assert "maxValues" not in json.dumps(reply)  # parsed: a batch of non-requests
    over = b"[" + b"0," * (MAX_JSON_VALUES - 1) + b"0]"
    reply = _dispatch(over)
    assert reply["error"]["code"] == INVALID_REQUEST
    assert reply["error"]["data"] == {"maxValues": MAX_JSON_VALUES, "veilnet": {
        "code": "bad_request", "message": f"the request holds more than {MAX_JSON_VALUES} "
                                          "JSON values"}}


def test_dispatch_parses_big_bodies_with_the_offload_function() -> None:
    calls: list[int] = []

    async def offload(fn: Callable[..., Any], *args: Any) -> Any:
        calls.append(len(args[0]))
        return fn(*args)

    small = a2a_send("x")
    _dispatch(small, offload=offload)
    big = a2a_send("x", padding="p" * OFFLOAD_BYTES)
    _dispatch(big, offload=offload)
    assert calls == [len(big)]


@pytest.mark.parametrize(("field", "value", "code"), [
    ("method", "m" * 10_000, INVALID_REQUEST), ("id", "i" * 10_000, INVALID_REQUEST),
    ("contextId", "c" * 10_000, INVALID_PARAMS), ("shard", "z" * 10_000, INVALID_PARAMS),
    ("taskId", "t" * 100_000, TASK_NOT_FOUND), ("role", "r" * 100_000, INVALID_PARAMS)])
def test_dispatch_bounds_and_clips_caller_strings(field: str, value: str, code: int) -> None:
    doc = json.loads(a2a_send("bafkrei"))
    msg = doc["params"]["message"]
    if field in ("method", "id"):
        doc[field] = value
    elif field == "shard":
        msg["parts"][0]["data"]["shard"] = value
    else:
        msg[field] = value
    reply = _dispatch(json.dumps(doc).encode())
    assert reply["error"]["code"] == code, reply["error"]["message"][:200]
    assert len(json.dumps(reply)) < 2000, f"{field} was echoed back"


def test_peer_table_keeps_at_most_capacity_records() -> None:
    table = PeerTable(ttl=3600.0)
    ids = [Identity.generate().peer_id for _ in range(MAX_KNOWN_PEERS + 5)]
    for age, pid in enumerate(ids):  # the first ids are the freshest
        table.upsert(PeerRecord(pid, "", [], []), age=float(age))
    kept = {r.peer_id for r in table.records()}
    assert kept == set(ids[:MAX_KNOWN_PEERS])
    newest = Identity.generate().peer_id
    table.upsert(PeerRecord(newest, "", [], []))
    assert newest in {r.peer_id for r in table.records()}
    assert len(table.records()) == MAX_KNOWN_PEERS


def test_peer_record_refuses_a_long_peer_id_without_decoding_it() -> None:
    started = time.perf_counter()
    with pytest.raises(ValueError, match="at most 64 characters"):
        parse_record({"peer_id": "1" * 1_000_000, "addrs": [], "shards": []})
    assert time.perf_counter() - started < 1.0


def test_a_peers_error_text_is_cut_before_it_reaches_logs_and_results() -> None:
    from protocols.transport import MAX_ERROR_TEXT, RemoteError, error_text

    exc = RemoteError("c" * 10_000, "m" * 1_000_000)
    assert len(exc.code) == len(exc.message) == MAX_ERROR_TEXT
    assert len(str(exc)) <= 2 * MAX_ERROR_TEXT + 2
    assert len(error_text(exc)) <= MAX_ERROR_TEXT
    assert error_text(trio.TooSlowError()) == "TooSlowError"  # never empty
    assert error_text(ConnectionError("cannot reach\n  /ip4/1.2.3.4\n")) == \
        "cannot reach /ip4/1.2.3.4"
