"""The A2A JSON-RPC dispatcher (registry/a2a_rpc.py), checked against the a2a-sdk 1.3 types.

Requests are built with a2a-sdk types where possible (the v1.0 protobuf types serialized with
``MessageToDict``, the v0.3 pydantic types of ``a2a.compat.v0_3``) and replies are parsed back
with them. The fake ``infer`` really decodes the tensors, doubles them and signs a receipt; each
test recomputes the expected outputs, digests and signature on its own.
"""

from __future__ import annotations

import asyncio
import base64
import json
from functools import partial
from typing import Any

import httpx
import numpy as np
import pytest
import trio
from a2a.client import ClientConfig, ClientFactory
from a2a.client.transports.jsonrpc import JsonRpcTransport
from a2a.compat.v0_3 import types as v03
from a2a.compat.v0_3.jsonrpc_transport import CompatJsonRpcTransport
from a2a.types import (
    AgentCard,
    GetTaskRequest,
    ListTasksResponse,
    Message,
    Part,
    Role,
    SendMessageRequest,
    SendMessageResponse,
)
from a2a.utils import errors as sdk_errors
from fastapi import FastAPI, Request, Response
from fastapi.responses import JSONResponse
from google.protobuf.json_format import MessageToDict, ParseDict
from hypothesis import given, settings
from hypothesis import strategies as st

from crypto.identity import Identity, public_from_did, verify
from protocols.infer import receipt_payload
from protocols.wire import WireError, decode_tensors, encode_tensors, tensors_digest
from registry.a2a_rpc import (
    InferFailed,
    dispatch,
    infer_request_from_part,
    infer_response_from_part,
    infer_response_to_part,
)
from registry.card import ServedShard, build_card

SHARD = "bafkreigh2akiscaildcqabsyg3dfr6chu3fgpregiymsck7e7aqa4s52zy"
IDENTITY = Identity.generate()
RNG = np.random.default_rng(7)
INPUTS = {"x": RNG.standard_normal((2, 3)).astype(np.float32),
          "ids": np.array([-3, 0, 5, 1 << 40], dtype=np.int64),
          "empty": np.zeros((0, 4), dtype=np.float16)}
SDK_CODE = {cls.__name__: code for cls, code in sdk_errors.JSON_RPC_ERROR_CODE_MAP.items()}


class FakeNode:
    """A wire-level infer function: outputs = inputs * 2, with real digests and signature."""

    def __init__(self, fail: InferFailed | Exception | None = None) -> None:
        self.calls: list[dict[str, Any]] = []
        self.fail = fail

    async def __call__(self, request: dict[str, Any]) -> dict[str, Any]:
        self.calls.append(request)
        if self.fail is not None:
            raise self.fail
        if request["shard"] != SHARD:
            raise InferFailed("unknown_shard", f"no shard {request['shard']}")
        try:
            inputs = decode_tensors(request["inputs"], "inputs")
        except WireError as exc:
            raise InferFailed(exc.code, exc.message) from None
        outputs = {name: value * 2 for name, value in inputs.items()}
        in_d, out_d = tensors_digest(inputs), tensors_digest(outputs)
        return {"v": 1, "id": request["id"], "shard": request["shard"],
                "outputs": encode_tensors(outputs), "input_digest": in_d, "output_digest": out_d,
                "node": IDENTITY.did,
                "signature": IDENTITY.sign(receipt_payload(request["id"], SHARD, in_d, out_d))}


def veilnet_data(inputs: dict[str, np.ndarray] = INPUTS, **extra: Any) -> dict[str, Any]:
    tensors = {n: {**t, "data": base64.b64encode(t["data"]).decode()}
               for n, t in encode_tensors(inputs).items()}
    return {"veilnet": "infer/1", "shard": SHARD, "inputs": tensors, **extra}


def check_reply(data: dict[str, Any], request_id: str) -> None:
    """``data`` is the reply part of a correct inference of INPUTS under ``request_id``."""
    resp = infer_response_from_part(data)
    expected = {name: value * 2 for name, value in INPUTS.items()}
    outputs = decode_tensors(resp["outputs"], "outputs")
    assert sorted(outputs) == sorted(expected)
    for name, value in expected.items():
        assert outputs[name].dtype == value.dtype
        np.testing.assert_array_equal(outputs[name], value)
    assert resp["id"] == request_id and resp["shard"] == SHARD
    assert resp["input_digest"] == tensors_digest(INPUTS)
    assert resp["output_digest"] == tensors_digest(expected)
    payload = receipt_payload(request_id, SHARD, resp["input_digest"], resp["output_digest"])
    assert verify(public_from_did(resp["node"]), resp["signature"], payload)


def v1_request(parts: list[dict[str, Any]], **message: Any) -> dict[str, Any]:
    msg = Message(message_id=message.pop("message_id", "msg-1"), role=Role.ROLE_USER, **message)
    msg.parts.extend(ParseDict(p, Part()) for p in parts)
    return MessageToDict(SendMessageRequest(message=msg))


def v03_request(parts: list[Any], **message: Any) -> dict[str, Any]:
    msg = v03.Message(message_id=message.pop("message_id", "msg-3"), role=v03.Role.user,
                      parts=[v03.Part(root=p) for p in parts], **message)
    return v03.MessageSendParams(message=msg).model_dump(by_alias=True, exclude_none=True,
                                                         mode="json")


def rpc(method: str, params: Any, rid: Any = 1) -> dict[str, Any]:
    return {"jsonrpc": "2.0", "id": rid, "method": method, "params": params}


SEND = v1_request([{"data": veilnet_data()}])


def call(body: Any, version: str | None = "1.0", infer: Any = None, **kw: Any) -> Any:
    raw = body if isinstance(body, bytes) else json.dumps(body).encode()
    return trio.run(partial(dispatch, raw, infer or FakeNode(), a2a_version=version, **kw))


def error_of(reply: Any, rid: Any = 1) -> dict[str, Any]:
    assert isinstance(reply, dict) and "result" not in reply, reply
    assert reply["jsonrpc"] == "2.0" and reply["id"] == rid
    return reply["error"]


# -- round trips ------------------------------------------------------------------------------

def test_v1_send_message_round_trip_parses_as_sdk_response() -> None:
    node = FakeNode()
    params = v1_request([{"text": "ignored"}, {"data": veilnet_data(),
                                               "mediaType": "application/json"}],
                        context_id="ctx-9")
    reply = call(rpc("SendMessage", params, rid="r1"), infer=node)
    assert reply["id"] == "r1" and "error" not in reply
    parsed = ParseDict(reply["result"], SendMessageResponse())
    assert parsed.HasField("message")
    msg = parsed.message
    assert msg.role == Role.ROLE_AGENT and msg.context_id == "ctx-9"
    assert msg.message_id and msg.message_id != "msg-1" and len(msg.parts) == 1
    check_reply(MessageToDict(msg.parts[0])["data"], "msg-1")
    # the sdk sent shapes as doubles; the node got exact ints
    assert node.calls[0]["inputs"]["x"]["shape"] == [2, 3]


def test_explicit_request_id_and_fresh_context() -> None:
    replies = [call(rpc("SendMessage", v1_request([{"data": veilnet_data(id="hop-7")}])))
               for _ in range(2)]
    contexts = {r["result"]["message"]["contextId"] for r in replies}
    assert len(contexts) == 2  # spec §3.4.1: a new contextId when the message has none
    check_reply(replies[0]["result"]["message"]["parts"][0]["data"], "hop-7")


@pytest.mark.parametrize("version", ["0.3", "", None])
def test_v03_message_send_returns_a_bare_message(version: str | None) -> None:
    params = v03_request([v03.TextPart(text="hi"), v03.DataPart(data=veilnet_data())],
                         context_id="c3")
    reply = call(rpc("message/send", params, rid=5), version=version)
    parsed = v03.SendMessageSuccessResponse.model_validate(reply)
    msg = parsed.result
    assert isinstance(msg, v03.Message) and msg.kind == "message"
    assert msg.role == v03.Role.agent and msg.context_id == "c3" and msg.message_id != "msg-3"
    part = msg.parts[0].root
    assert isinstance(part, v03.DataPart) and part.kind == "data"
    check_reply(part.data, "msg-3")


def test_part_helpers_round_trip() -> None:
    request = infer_request_from_part(veilnet_data(), "m")
    assert request["id"] == "m" and request["v"] == 1
    response = trio.run(FakeNode(), request)
    part = json.loads(json.dumps(infer_response_to_part(response)))  # really JSON
    assert infer_response_from_part(part) == response
    check_reply(part, "m")


def test_list_tasks_is_empty_and_sdk_parsable() -> None:
    result = call(rpc("ListTasks", {"pageSize": 10}))["result"]
    parsed = ParseDict(result, ListTasksResponse())
    assert list(parsed.tasks) == [] and parsed.page_size == 10 and parsed.total_size == 0


# -- A2A errors -------------------------------------------------------------------------------

A2A_ERRORS = [
    *[(m, "TaskNotFoundError") for m in ("GetTask", "CancelTask", "tasks/get", "tasks/cancel")],
    *[(m, "UnsupportedOperationError") for m in ("SendStreamingMessage", "SubscribeToTask",
                                                 "message/stream", "tasks/resubscribe")],
    *[(m, "PushNotificationNotSupportedError") for m in (
        "CreateTaskPushNotificationConfig", "GetTaskPushNotificationConfig",
        "ListTaskPushNotificationConfig", "ListTaskPushNotificationConfigs",
        "DeleteTaskPushNotificationConfig", "tasks/pushNotificationConfig/set",
        "tasks/pushNotificationConfig/get", "tasks/pushNotificationConfig/list",
        "tasks/pushNotificationConfig/delete")],
    ("GetExtendedAgentCard", "UnsupportedOperationError"),  # spec §3.3.4: not in the card
    ("agent/getAuthenticatedExtendedCard", "ExtendedAgentCardNotConfiguredError"),
]


@pytest.mark.parametrize(("method", "error"), A2A_ERRORS)
def test_unsupported_methods_get_the_spec_errors(method: str, error: str) -> None:
    version = "0.3" if "/" in method else "1.0"
    node = FakeNode()
    err = error_of(call(rpc(method, {"id": "t-1"}, rid=3), version=version, infer=node), 3)
    assert err["code"] == SDK_CODE[error] and not node.calls
    if "/" in method:  # a v0.3 client's own error model accepts it
        v03.JSONRPCErrorResponse.model_validate({"jsonrpc": "2.0", "id": 3, "error": err})


TEXT_ONLY_V1 = v1_request([{"text": "run my shard please"}])
TEXT_ONLY_V03 = v03_request([v03.TextPart(text="run my shard please")])
CONTENT_CASES = [
    ("SendMessage", TEXT_ONLY_V1),
    ("message/send", TEXT_ONLY_V03),
    ("SendMessage", v1_request([{"data": veilnet_data(), "mediaType": "text/csv"}])),
    ("SendMessage", v1_request([{"data": {"veilnet": "infer/9"}}])),
    ("SendMessage", {**SEND, "configuration": {"acceptedOutputModes": ["text/plain"]}}),
]


@pytest.mark.parametrize(("method", "params"), CONTENT_CASES)
def test_content_the_node_does_not_take(method: str, params: dict[str, Any]) -> None:
    node = FakeNode()
    err = error_of(call(rpc(method, params), version=None, infer=node))
    assert err["code"] == SDK_CODE["ContentTypeNotSupportedError"] and not node.calls


@pytest.mark.parametrize(("method", "version", "ok"), [
    ("SendMessage", "1.0", True), ("SendMessage", "1.0.4", True), ("SendMessage", None, True),
    ("SendMessage", "", False), ("SendMessage", "0.3", False), ("SendMessage", "2.0", False),
    ("SendMessage", "1.1", False), ("SendMessage", "latest", False),
    ("message/send", "0.3", True), ("message/send", "", True), ("message/send", "1.0", False),
])
def test_a2a_version_header(method: str, version: str | None, ok: bool) -> None:
    params = SEND if method == "SendMessage" else v03_request([v03.DataPart(data=veilnet_data())])
    reply = call(rpc(method, params), version=version)
    if ok:
        assert "result" in reply
    else:
        assert error_of(reply)["code"] == SDK_CODE["VersionNotSupportedError"]


# Regressions found by tests/unit/fuzz/test_fuzz_cards.py: each was a ValueError or TypeError
# inside dispatch, answered as an internal error (-32603) and logged as a bug.
@pytest.mark.parametrize("version", ["².0", "1.²", "١.٠", "1" * 5000 + ".0"])
def test_a2a_version_header_with_non_ascii_or_huge_digits(version: str) -> None:
    reply = call(rpc("SendMessage", SEND), version=version)
    assert error_of(reply)["code"] == SDK_CODE["VersionNotSupportedError"]


@pytest.mark.parametrize("modes", [5, "application/json", {"a": 1}])
def test_accepted_output_modes_must_be_a_list(modes: Any) -> None:
    params = {**SEND, "configuration": {"acceptedOutputModes": modes}}
    err = error_of(call(rpc("SendMessage", params)))
    assert err["code"] == -32602 and "acceptedOutputModes" in err["message"]


# -- veilnet failures -------------------------------------------------------------------------

@pytest.mark.parametrize(("code", "rpc_code"), [
    ("bad_request", -32602), ("bad_tensor", -32602), ("bad_inputs", -32602),
    ("unknown_shard", -32602), ("busy", -32603), ("timeout", -32603), ("internal", -32603),
])
def test_infer_failures_map_to_rpc_errors(code: str, rpc_code: int) -> None:
    node = FakeNode(InferFailed(code, f"{code} happened"))
    err = error_of(call(rpc("SendMessage", SEND), infer=node))
    assert err["code"] == rpc_code and len(node.calls) == 1
    assert err["data"]["veilnet"] == {"code": code, "message": f"{code} happened"}


BAD_TENSOR = veilnet_data()
BAD_TENSOR["inputs"]["x"]["data"] = base64.b64encode(b"\0" * 5).decode()  # 24 bytes expected


@pytest.mark.parametrize(("data", "code", "reaches_node"), [
    (veilnet_data(shard="bafkreiunknown"), "unknown_shard", True),
    (BAD_TENSOR, "bad_tensor", True),
    ({**veilnet_data(), "inputs": {"x": {"dtype": "float32", "shape": [1], "data": "AA*="}}},
     "bad_tensor", False),
    ({**veilnet_data(), "inputs": {"x": {"dtype": "float32", "shape": [-1], "data": ""}}},
     "bad_tensor", False),
    ({**veilnet_data(), "inputs": {"x": {"dtype": "float32", "shape": [1], "data": "AAAAAA"}}},
     "bad_tensor", False),
    (veilnet_data(id="i" * 129), "bad_request", False),
    (veilnet_data(shard=""), "bad_request", False),
    (veilnet_data(extra=1), "bad_request", False),
])
def test_bad_inference_inputs(data: dict[str, Any], code: str, reaches_node: bool) -> None:
    node = FakeNode()
    err = error_of(call(rpc("SendMessage", v1_request([{"data": data}])), infer=node))
    assert err["code"] == -32602 and err["data"]["veilnet"]["code"] == code
    assert bool(node.calls) == reaches_node


async def malformed(request: dict[str, Any]) -> dict[str, Any]:
    return {"id": request["id"]}


@pytest.mark.parametrize("infer", [FakeNode(RuntimeError("bug")), malformed])
def test_broken_infer_is_an_internal_error(infer: Any) -> None:
    err = error_of(call(rpc("SendMessage", SEND), infer=infer))
    assert err["code"] == -32603 and err["data"]["veilnet"]["code"] == "internal"


# -- JSON-RPC 2.0 -----------------------------------------------------------------------------


@pytest.mark.parametrize(("body", "code", "rid"), [
    (b"{not json", -32700, None),
    (b'{"jsonrpc": "2.0", "id": 1, "method": "SendMessage", "params": NaN}', -32700, None),
    (b"\xff\xfe\x00", -32700, None),
    (b"[" * 100_000, -32700, None),
    (b'"SendMessage"', -32600, None),
    ({"jsonrpc": "1.0", "id": 2, "method": "SendMessage", "params": SEND}, -32600, 2),
    ({"jsonrpc": "2.0", "id": 2, "params": SEND}, -32600, 2),
    ({"jsonrpc": "2.0", "id": True, "method": "SendMessage", "params": SEND}, -32600, None),
    ({"jsonrpc": "2.0", "id": 1.5, "method": "SendMessage", "params": SEND}, -32600, None),
    (rpc("SendMessage", "params"), -32600, 1),
    (rpc("NoSuchMethod", {}), -32601, 1),
    (rpc("message/list", {}), -32601, 1),
    (rpc("SendMessage", [SEND]), -32602, 1),
    (rpc("SendMessage", {}), -32602, 1),
    (rpc("SendMessage", {"message": {**SEND["message"], "role": "ROLE_AGENT"}}), -32602, 1),
    (rpc("SendMessage", {"message": {**SEND["message"], "parts": []}}), -32602, 1),
    (rpc("SendMessage", v1_request([{"data": veilnet_data()}, {"data": veilnet_data()}])),
     -32602, 1),
    (rpc("SendMessage", v1_request([{"data": veilnet_data()}], task_id="t-1")), -32001, 1),
])
def test_json_rpc_errors(body: Any, code: int, rid: Any) -> None:
    assert error_of(call(body, version=None), rid)["code"] == code


def test_body_limit() -> None:
    body = json.dumps(rpc("SendMessage", SEND)).encode()
    node = FakeNode()
    err = error_of(trio.run(partial(dispatch, body, node, max_body=len(body) - 1)), None)
    assert err["code"] == -32600 and err["data"]["maxBytes"] == len(body) - 1
    assert err["data"]["veilnet"]["code"] == "frame_too_large" and not node.calls
    assert "result" in trio.run(partial(dispatch, body, node, max_body=len(body)))


def test_notifications_and_batches() -> None:
    node = FakeNode()
    note = {"jsonrpc": "2.0", "method": "SendMessage", "params": SEND}  # no id: no reply, no run
    assert call(note, infer=node) is None and call([note, note], infer=node) is None
    replies = call([rpc("SendMessage", SEND, rid="a"), note, rpc("GetTask", {"id": "t"}, rid=7),
                    {"foo": "boo"}], infer=node)
    assert [r["id"] for r in replies] == ["a", 7, None]
    check_reply(replies[0]["result"]["message"]["parts"][0]["data"], "msg-1")
    assert replies[1]["error"]["code"] == -32001 and replies[2]["error"]["code"] == -32600
    assert len(node.calls) == 1
    assert error_of(call([]), None)["code"] == -32600
    assert error_of(call([rpc("ListTasks", {})] * 17), None)["code"] == -32600


JSON = st.recursive(st.none() | st.booleans() | st.integers() | st.text(max_size=8),
                    lambda kids: st.lists(kids, max_size=4)
                    | st.dictionaries(st.text(max_size=8), kids, max_size=4), max_leaves=20)


@settings(max_examples=150, deadline=None)
@given(st.binary(max_size=64) | JSON.map(lambda v: json.dumps(v).encode()),
       st.sampled_from(["SendMessage", "message/send", "GetTask", "x"]), JSON)
def test_dispatch_never_raises(raw: bytes, method: str, params: Any) -> None:
    for body in (raw, json.dumps(rpc(method, params)).encode()):
        reply = trio.run(partial(dispatch, body, FakeNode()))
        replies = reply if isinstance(reply, list) else [reply]
        for r in replies:
            assert r is None or (r["jsonrpc"] == "2.0" and ("error" in r) != ("result" in r))


# -- end to end with the a2a-sdk client -------------------------------------------------------

def make_app(node: FakeNode) -> FastAPI:
    app = FastAPI()

    @app.post("/a2a")
    async def a2a(request: Request) -> Response:
        result = await dispatch(await request.body(), node,
                                a2a_version=request.headers.get("A2A-Version", ""))
        return Response(status_code=204) if result is None else JSONResponse(result)

    return app


def test_sdk_client_against_fastapi_app() -> None:
    node = FakeNode()
    url = "http://node.test/a2a"
    card = ParseDict(build_card(IDENTITY, a2a_url=url, multiaddrs=[],
                                shards=[ServedShard("bafydeploy", "minilm", SHARD, 0)]),
                     AgentCard(), ignore_unknown_fields=True)

    async def main() -> None:
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=make_app(node))) as http:
            client = ClientFactory(ClientConfig(httpx_client=http)).create(card)
            request = SendMessageRequest(message=ParseDict(
                {"messageId": "e2e-1", "role": "ROLE_USER", "parts": [{"data": veilnet_data()}]},
                Message()))
            events = [e async for e in client.send_message(request)]
            assert len(events) == 1 and events[0].HasField("message")
            assert events[0].message.role == Role.ROLE_AGENT
            check_reply(MessageToDict(events[0].message.parts[0])["data"], "e2e-1")
            with pytest.raises(sdk_errors.TaskNotFoundError):
                await client.get_task(GetTaskRequest(id="nope"))

            legacy = CompatJsonRpcTransport(http, card, url)  # sends A2A-Version: 0.3
            response = await legacy.send_message(request)
            check_reply(MessageToDict(response.message.parts[0])["data"], "e2e-1")

        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=make_app(node))) as bare:
            with pytest.raises(sdk_errors.VersionNotSupportedError):  # no header means 0.3
                await JsonRpcTransport(bare, card, url).send_message(request)

    asyncio.run(main())
    assert [c["id"] for c in node.calls] == ["e2e-1", "e2e-1"]
