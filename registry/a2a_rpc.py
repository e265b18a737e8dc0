"""The A2A JSON-RPC endpoint of a veilnet node: a pure async dispatcher for ``POST /a2a``.

``dispatch(body, infer)`` answers one JSON-RPC 2.0 body and never raises (``CancelledError`` and
other ``BaseException``s aside): every failure is a JSON-RPC error object. It uses no event-loop
primitives, so it runs under trio (the node) and asyncio alike.

Bindings. A2A v1.0 (https://a2a-protocol.org/latest/specification/ §9: PascalCase methods,
ProtoJSON params, ``SendMessage`` result ``{"message": Message}``, role ``ROLE_AGENT``, data
parts ``{"data": ..., "mediaType": ...}``) and A2A v0.3 (https://a2a-protocol.org/v0.3.0/specification
§7: ``message/send`` result a bare Message with ``"kind": "message"``, role ``agent``, parts
``{"kind": "data", "data": ...}``). The two method sets do not overlap, so the method name picks
the binding. The ``A2A-Version`` header (spec §3.6) is passed as ``a2a_version``: a value whose
``Major.Minor`` is not 1.0 or 0.3, or that names the other binding than the method, gets
VersionNotSupportedError (-32009). The spec reads an empty header as 0.3 -- pass ``""`` for a
missing header to get exactly that; ``None`` (the default) means "not known" and lets the method
name decide, which is more lenient than the spec for v1.0 clients that omit the header.

Payload. A ``SendMessage``/``message/send`` message must carry exactly one data part whose object
is ``{"veilnet": "infer/1", "shard": <shard CID>, "inputs": {name: tensor}, "id"?: str}``; the
wire request id is that ``id`` when present, else the A2A ``messageId``. Tensors are
``{"dtype": str, "shape": [int], "data": <bytes>}`` where every byte string (tensor data,
digests, signature) is standard base64 (RFC 4648 §4, ``+/`` with ``=`` padding). Shape entries
may arrive as integral floats (ProtoJSON carries ``Struct`` numbers as doubles) and are read as
ints. The reply is a Message whose one data part is ``infer_response_to_part`` of the wire
response. A message with a ``taskId`` gets TaskNotFoundError: this node never creates tasks.

Errors carry ``error.data`` as an object (spec §9.5); veilnet failures add
``"veilnet": {"code": <wire code>, "message": str}`` (docs/protocol.md codes). Batches (JSON-RPC
2.0 §6) of at most ``MAX_BATCH`` calls run one after another; notifications (no ``id``) are
neither answered nor executed, so ``dispatch`` returns None for them (send HTTP 204).

Bounds (docs/protocol.md "Limits"), all checked before the work they protect: the body has at
most ``max_body`` bytes and at most ``MAX_JSON_VALUES`` JSON values (counted on the raw bytes, in
linear time, before ``json.loads`` builds any object: one byte of JSON such as ``[{},{},...]``
otherwise costs about 25 bytes of Python objects); a JSON-RPC ``id`` has at most
``MAX_RPC_ID_CHARS`` characters, the infer ``shard`` at most ``MAX_SHARD_CHARS``; values echoed
in error messages are clipped. A body over ``OFFLOAD_BYTES`` is parsed by ``offload`` (the node
passes ``trio.to_thread.run_sync``) so that the event loop is not held by one request.
"""

from __future__ import annotations

import base64
import binascii
import json
import logging
import uuid
from collections.abc import Awaitable, Callable
from typing import Any

from errors import ProtocolError

log = logging.getLogger(__name__)

DATA_KEY, DATA_KIND = "veilnet", "infer/1"
MEDIA_TYPE = "application/json"
DEFAULT_MAX_BODY = 64 * 1024 * 1024  # base64 inflates by 4/3: about 48 MiB of tensor bytes
MAX_BATCH = 16
MAX_ID_CHARS = 128  # docs/protocol.md: request ids are strings of at most 128 characters
MAX_RPC_ID_CHARS = 256  # a JSON-RPC id (echoed in the reply); clients send UUIDs or numbers
MAX_SHARD_CHARS = 128  # a shard CID has 59 characters
MAX_METHOD_CHARS = 128  # the longest A2A method name has 41
# JSON values in one body, bounded by the count of the bytes that precede every value but the
# first: ',' ':' '[' '{'. Counted on the raw body, so these characters inside strings count too
# (base64 has none). A SendMessage needs a few dozen; at the limit parsing builds ~10 MB.
MAX_JSON_VALUES = 1 << 17
OFFLOAD_BYTES = 1 << 20  # bodies this large are parsed by ``offload``
MAX_ECHO_CHARS = 80  # caller-supplied values quoted in error messages are clipped to this
V1, V03 = "1.0", "0.3"

PARSE_ERROR, INVALID_REQUEST, METHOD_NOT_FOUND = -32700, -32600, -32601
INVALID_PARAMS, INTERNAL_ERROR = -32602, -32603
TASK_NOT_FOUND, PUSH_NOT_SUPPORTED, UNSUPPORTED_OPERATION = -32001, -32003, -32004
CONTENT_TYPE_NOT_SUPPORTED, EXTENDED_CARD_NOT_CONFIGURED = -32005, -32007
VERSION_NOT_SUPPORTED = -32009

# veilnet wire codes caused by the caller's input (-> -32602); any other code -> -32603.
INPUT_CODES = frozenset({"bad_request", "bad_tensor", "bad_inputs", "unknown_shard", "run_failed",
                         "unsupported_version"})

# method -> (binding version, kind). Push config names: spec §5.3 and a2a-sdk 1.3 spellings.
METHODS: dict[str, tuple[str, str]] = {
    "SendMessage": (V1, "send"), "message/send": (V03, "send"),
    "GetTask": (V1, "task"), "CancelTask": (V1, "task"),
    "tasks/get": (V03, "task"), "tasks/cancel": (V03, "task"),
    "ListTasks": (V1, "list"),
    "SendStreamingMessage": (V1, "stream"), "SubscribeToTask": (V1, "stream"),
    "message/stream": (V03, "stream"), "tasks/resubscribe": (V03, "stream"),
    "GetExtendedAgentCard": (V1, "card"), "agent/getAuthenticatedExtendedCard": (V03, "card"),
    **{f"{verb}TaskPushNotificationConfig{s}": (V1, "push")
       for verb, s in (("Create", ""), ("Set", ""), ("Get", ""), ("List", ""), ("List", "s"),
                       ("Delete", ""))},
    **{f"tasks/pushNotificationConfig/{verb}": (V03, "push")
       for verb in ("set", "get", "list", "delete")},
}


class InferFailed(ProtocolError):
    """An inference request that failed with a veilnet wire error ``code`` (docs/protocol.md)."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(code, message)  # str(self) is "<code>: <message>"
        self.code = code
        self.message = message


InferFn = Callable[[dict[str, Any]], Awaitable[dict[str, Any]]]
OffloadFn = Callable[..., Awaitable[Any]]  # e.g. trio.to_thread.run_sync(fn, *args)


class RpcError(ProtocolError):
    """A JSON-RPC error object to answer with. Unlike other ProtocolErrors, ``code`` is the
    JSON-RPC error code (an int); a veilnet wire code, if any, is in ``data``."""

    def __init__(self, code: int, message: str, data: dict[str, Any] | None = None) -> None:
        super().__init__(str(code), message)
        self.code = code  # type: ignore[assignment]  # JSON-RPC's int, not a wire code
        self.message, self.data = message, data

    def to_json(self) -> dict[str, Any]:
        err: dict[str, Any] = {"code": self.code, "message": self.message}
        if self.data is not None:
            err["data"] = self.data
        return err


def _veilnet(code: str, message: str) -> dict[str, Any]:
    return {"veilnet": {"code": code, "message": message}}


def _clip(value: Any) -> str:
    """``repr(value)`` cut to MAX_ECHO_CHARS characters, for messages that quote the caller."""
    text = repr(value) if not isinstance(value, str) or len(value) <= MAX_ECHO_CHARS \
        else repr(value[:MAX_ECHO_CHARS])
    return text if len(text) <= MAX_ECHO_CHARS else text[:MAX_ECHO_CHARS] + "..."


def _echo(value: Any) -> Any:
    """``value`` itself when it is a short string or a number, else its clipped repr."""
    short = isinstance(value, int | float) or (isinstance(value, str)
                                                and len(value) <= MAX_RPC_ID_CHARS)
    return value if short else _clip(value)


# -- the data part ------------------------------------------------------------------------------

def _b64(data: Any, what: str, code: str) -> str:
    if not isinstance(data, bytes):
        raise InferFailed(code, f"{what} must be bytes")
    return base64.b64encode(data).decode("ascii")


def _unb64(text: Any, what: str, code: str) -> bytes:
    if not isinstance(text, str):
        raise InferFailed(code, f"{what} must be a base64 string")
    try:
        return base64.b64decode(text.encode("ascii"), validate=True)
    except (binascii.Error, UnicodeEncodeError):
        raise InferFailed(code, f"{what} is not standard padded base64") from None


def _shape(shape: Any, what: str, code: str) -> list[int]:
    if not isinstance(shape, list):
        raise InferFailed(code, f"{what}: shape must be a list of non-negative integers")
    dims = []
    for d in shape:
        if isinstance(d, float) and d.is_integer():
            d = int(d)
        if not isinstance(d, int) or isinstance(d, bool) or d < 0:
            raise InferFailed(code, f"{what}: shape must be a list of non-negative integers")
        dims.append(d)
    return dims


def _tensor_from_json(obj: Any, what: str, code: str) -> dict[str, Any]:
    if not isinstance(obj, dict) or set(obj) != {"dtype", "shape", "data"}:
        raise InferFailed(code, f"{what} must be an object of dtype, shape and data")
    if not isinstance(obj["dtype"], str):
        raise InferFailed(code, f"{what}: dtype must be a string")
    return {"dtype": obj["dtype"], "shape": _shape(obj["shape"], what, code),
            "data": _unb64(obj["data"], f"{what}: data", code)}


def _tensor_to_json(obj: Any, what: str, code: str) -> dict[str, Any]:
    if not isinstance(obj, dict) or not isinstance(obj.get("dtype"), str):
        raise InferFailed(code, f"{what} must be a tensor with a dtype")
    return {"dtype": obj["dtype"], "shape": _shape(obj.get("shape"), what, code),
            "data": _b64(obj.get("data"), f"{what}: data", code)}


def _tensors(obj: Any, what: str, code: str, convert: Callable[..., dict[str, Any]],
             ) -> dict[str, Any]:
    if not isinstance(obj, dict) or not all(isinstance(k, str) for k in obj):
        raise InferFailed(code, f"{what} must be an object from tensor names to tensors")
    return {name: convert(t, f"{what} {_clip(name)}", code) for name, t in obj.items()}


def _str(value: Any, what: str, code: str, limit: int | None = None) -> str:
    if not isinstance(value, str) or not value or (limit is not None and len(value) > limit):
        bound = f" of at most {limit} characters" if limit is not None else ""
        raise InferFailed(code, f"{what} must be a non-empty string{bound}")
    return value


def infer_request_from_part(data: dict[str, Any], message_id: str) -> dict[str, Any]:
    """The wire infer request in a data part; raises InferFailed (bad_request, bad_tensor)."""
    if not isinstance(data, dict) or data.get(DATA_KEY) != DATA_KIND:
        raise InferFailed("bad_request", f'the data part must hold "{DATA_KEY}": "{DATA_KIND}"')
    extra = sorted(set(data) - {DATA_KEY, "id", "shard", "inputs"})
    if extra:
        raise InferFailed("bad_request", f"unknown fields in the infer request: {extra}")
    request_id = _str(data.get("id", message_id), "the request id", "bad_request", MAX_ID_CHARS)
    return {"v": 1, "id": request_id,
            "shard": _str(data.get("shard"), "shard", "bad_request", MAX_SHARD_CHARS),
            "inputs": _tensors(data.get("inputs"), "inputs", "bad_tensor", _tensor_from_json)}


def _response_fields(doc: dict[str, Any], tensor: Callable[..., dict[str, Any]],
                     blob: Callable[[Any, str, str], Any]) -> dict[str, Any]:
    """The fields of an infer response, converted one way (wire to JSON) or the other."""
    code = "bad_response"
    return {"id": _str(doc.get("id"), "id", code),
            "shard": _str(doc.get("shard"), "shard", code),
            "outputs": _tensors(doc.get("outputs"), "outputs", code, tensor),
            "input_digest": blob(doc.get("input_digest"), "input_digest", code),
            "output_digest": blob(doc.get("output_digest"), "output_digest", code),
            "node": _str(doc.get("node"), "node", code),
            "signature": blob(doc.get("signature"), "signature", code)}


def infer_response_to_part(resp: dict[str, Any]) -> dict[str, Any]:
    """The JSON data part of a wire infer response; raises InferFailed(bad_response)."""
    if not isinstance(resp, dict):
        raise InferFailed("bad_response", "the infer response must be a map")
    return {DATA_KEY: DATA_KIND, **_response_fields(resp, _tensor_to_json, _b64)}


def infer_response_from_part(data: dict[str, Any]) -> dict[str, Any]:
    """The wire infer response in a reply's data part; raises InferFailed(bad_response).

    Only the shape is checked: the caller still verifies digests and signature.
    """
    if not isinstance(data, dict) or data.get(DATA_KEY) != DATA_KIND:
        raise InferFailed("bad_response",
                          f'the data part must hold "{DATA_KEY}": "{DATA_KIND}"')
    return {"v": 1, **_response_fields(data, _tensor_from_json, _unb64)}


# -- JSON-RPC -----------------------------------------------------------------------------------

def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


def _reply(request_id: Any, err: RpcError) -> dict[str, Any]:
    return {"jsonrpc": "2.0", "id": request_id, "error": err.to_json()}


def parse_body(body: bytes) -> Any:
    """The JSON document in ``body``; RpcError when it holds more than MAX_JSON_VALUES values
    (checked first, in linear time) or is not JSON. No size check: see ``dispatch``."""
    values = 1 + sum(body.count(c) for c in (b",", b":", b"[", b"{"))
    if values > MAX_JSON_VALUES:
        msg = f"the request holds more than {MAX_JSON_VALUES} JSON values"
        raise RpcError(INVALID_REQUEST, msg, {"maxValues": MAX_JSON_VALUES,
                                              **_veilnet("bad_request", msg)})
    try:
        return json.loads(body, parse_constant=_reject_constant)
    except (ValueError, RecursionError) as exc:
        raise RpcError(PARSE_ERROR, f"invalid JSON: {str(exc)[:200]}") from None


async def dispatch(body: bytes, infer: InferFn, *, max_body: int = DEFAULT_MAX_BODY,
                   a2a_version: str | None = None, offload: OffloadFn | None = None,
                   ) -> dict[str, Any] | list | None:
    """The JSON-RPC response to ``body`` (a dict, a list for a batch, None when nothing is owed).

    ``a2a_version`` is the request's A2A-Version header ("" if absent, None if unknown).
    ``offload(fn, *args)`` runs the parsing of a body over OFFLOAD_BYTES (None: inline).
    """
    try:
        if len(body) > max_body:
            msg = f"request body is {len(body)} bytes, limit {max_body}"
            return _reply(None, RpcError(INVALID_REQUEST, msg, {"maxBytes": max_body,
                                         **_veilnet("frame_too_large", msg)}))
        try:
            if offload is not None and len(body) > OFFLOAD_BYTES:
                doc = await offload(parse_body, body)
            else:
                doc = parse_body(body)
        except RpcError as err:
            return _reply(None, err)
        if not isinstance(doc, list):
            return await _one(doc, infer, a2a_version)
        if not doc or len(doc) > MAX_BATCH:
            msg = f"a batch must hold 1 to {MAX_BATCH} requests, got {len(doc)}"
            return _reply(None, RpcError(INVALID_REQUEST, msg))
        replies = [r for item in doc if (r := await _one(item, infer, a2a_version)) is not None]
        return replies or None
    except Exception:  # a bug here: still answer
        log.exception("A2A dispatch failed")
        return _reply(None, RpcError(INTERNAL_ERROR, "internal error",
                                     _veilnet("internal", "internal error")))


async def _one(req: Any, infer: InferFn, a2a_version: str | None) -> dict[str, Any] | None:
    rid = req.get("id") if isinstance(req, dict) else None
    if isinstance(rid, bool) or not isinstance(rid, str | int | None) or (
            isinstance(rid, str) and len(rid) > MAX_RPC_ID_CHARS):
        rid = None
    try:
        if not isinstance(req, dict) or req.get("jsonrpc") != "2.0":
            raise RpcError(INVALID_REQUEST, 'a request must be an object with "jsonrpc": "2.0"')
        if "id" in req and rid != req["id"]:
            raise RpcError(INVALID_REQUEST, "id must be a string of at most "
                                            f"{MAX_RPC_ID_CHARS} characters, an integer or null")
        method, params = req.get("method"), req.get("params", {})
        if not isinstance(method, str) or not method or len(method) > MAX_METHOD_CHARS:
            raise RpcError(INVALID_REQUEST, "method must be a non-empty string of at most "
                                            f"{MAX_METHOD_CHARS} characters")
        if not isinstance(params, dict | list):
            raise RpcError(INVALID_REQUEST, "params must be an object or an array")
        if "id" not in req:
            return None  # a notification: no reply is owed, and none of our methods has effects
        return {"jsonrpc": "2.0", "id": rid,
                "result": await _call(method, params, infer, a2a_version)}
    except RpcError as err:
        return _reply(rid, err)
    except Exception:  # a bug: answered as a JSON-RPC internal error, the server keeps serving
        log.exception("A2A request %r failed", rid)
        return _reply(rid, RpcError(INTERNAL_ERROR, "internal error",
                                    _veilnet("internal", "internal error")))


def _check_version(method: str, binding: str, header: str | None) -> None:
    if header is None:
        return
    parts = (header.strip() or V03).split(".")
    # ASCII digits only: str.isdigit() also takes "²" and "١", which int() refuses or reads
    # as another digit; and at most 9 of them, below int()'s 4300-digit limit
    requested = (f"{int(parts[0])}.{int(parts[1])}"
                 if len(parts) in (2, 3) and all(p.isascii() and p.isdigit() and len(p) <= 9
                                                 for p in parts) else None)
    data = {"requested": header, "supported": [V1, V03]}
    if requested not in (V1, V03):
        raise RpcError(VERSION_NOT_SUPPORTED, f"A2A version {_clip(header)} is not supported",
                       data)
    if requested != binding:
        raise RpcError(VERSION_NOT_SUPPORTED, f"{method} is an A2A {binding} method, but the "
                                              f"request asks for A2A {requested}", data)


async def _call(method: str, params: Any, infer: InferFn, a2a_version: str | None) -> Any:
    if method not in METHODS:
        raise RpcError(METHOD_NOT_FOUND, f"method {method!r} not found", {"method": method})
    binding, kind = METHODS[method]
    _check_version(method, binding, a2a_version)
    if not isinstance(params, dict):
        raise RpcError(INVALID_PARAMS, "params must be an object")
    if kind == "send":
        return await _send(binding, params, infer)
    if kind == "list":  # we never create tasks, so there are none to list
        size = params.get("pageSize")
        size = size if isinstance(size, int) and not isinstance(size, bool) and size > 0 else 50
        return {"tasks": [], "nextPageToken": "", "pageSize": min(size, 100), "totalSize": 0}
    if kind == "task":
        task_id = params.get("id")
        raise RpcError(TASK_NOT_FOUND, "task not found: this node answers with messages and "
                       "never creates tasks", {"taskId": _echo(task_id)} if task_id else None)
    if kind == "stream":
        raise RpcError(UNSUPPORTED_OPERATION, "streaming is not supported "
                       "(the agent card does not declare capabilities.streaming)")
    if kind == "push":
        raise RpcError(PUSH_NOT_SUPPORTED, "push notifications are not supported")
    if binding == V1:  # §3.3.4: the card does not declare capabilities.extendedAgentCard
        raise RpcError(UNSUPPORTED_OPERATION, "this agent has no extended agent card")
    raise RpcError(EXTENDED_CARD_NOT_CONFIGURED, "authenticated extended card is not configured")


def _field(obj: dict[str, Any], camel: str, snake: str) -> Any:
    """A ProtoJSON field: parsers accept the lowerCamelCase and the proto field name."""
    return obj[camel] if camel in obj else obj.get(snake)


def _is_json_type(media: Any) -> bool:
    base = media.split(";", 1)[0].strip().lower() if isinstance(media, str) else ""
    return base in ("application/json", "application/*", "*/*") or base.endswith("+json")


def _veilnet_data(parts: Any, binding: str) -> dict[str, Any]:
    if not isinstance(parts, list) or not parts or not all(isinstance(p, dict) for p in parts):
        raise RpcError(INVALID_PARAMS, "message.parts must be a non-empty list of parts")
    found, other = [], []
    for part in parts:
        data = part.get("data")
        is_data = part.get("kind", "data") == "data" if binding == V03 else "data" in part
        if not is_data or not isinstance(data, dict) or DATA_KEY not in data:
            continue
        media = _field(part, "mediaType", "media_type")
        if data[DATA_KEY] != DATA_KIND or (media and not _is_json_type(media)):
            other.append(f"{_clip(data[DATA_KEY])} as {_clip(media or MEDIA_TYPE)}")
            continue
        found.append(data)
    if len(found) > 1:
        raise RpcError(INVALID_PARAMS, f"the message holds {len(found)} veilnet data parts, "
                                       "expected one", _veilnet("bad_request", "one request"))
    if not found:
        seen = f" (found {', '.join(other[:3])}{', ...' if len(other) > 3 else ''})" \
            if other else ""
        raise RpcError(CONTENT_TYPE_NOT_SUPPORTED, "this node accepts only a data part holding "
                       f'a veilnet infer request, {{"{DATA_KEY}": "{DATA_KIND}", ...}}{seen}',
                       {"acceptedInputModes": [MEDIA_TYPE], DATA_KEY: DATA_KIND})
    return found[0]


def _infer_error(exc: InferFailed) -> RpcError:
    code = INVALID_PARAMS if exc.code in INPUT_CODES else INTERNAL_ERROR
    return RpcError(code, f"{exc.code}: {exc.message}", _veilnet(exc.code, exc.message))


async def _send(binding: str, params: dict[str, Any], infer: InferFn) -> dict[str, Any]:
    msg = params.get("message")
    if not isinstance(msg, dict):
        raise RpcError(INVALID_PARAMS, "params.message must be a Message object")
    message_id = _field(msg, "messageId", "message_id")
    if not isinstance(message_id, str) or not message_id:
        raise RpcError(INVALID_PARAMS, "message.messageId must be a non-empty string")
    role_ok = msg.get("role") in (("ROLE_USER", 1) if binding == V1 else ("user",))
    if not role_ok:
        user = "ROLE_USER" if binding == V1 else "user"
        raise RpcError(INVALID_PARAMS,
                       f"message.role must be {user!r}, got {_clip(msg.get('role'))}")
    task_id = _field(msg, "taskId", "task_id")
    if task_id:  # spec §3.4.2: a taskId must name an existing task
        raise RpcError(TASK_NOT_FOUND, f"task {_clip(task_id)} not found: this node never "
                       "creates tasks", {"taskId": _echo(task_id)})
    context_id = _field(msg, "contextId", "context_id") or str(uuid.uuid4())  # spec §3.4.1
    if not isinstance(context_id, str) or len(context_id) > MAX_RPC_ID_CHARS:
        raise RpcError(INVALID_PARAMS, "message.contextId must be a string of at most "
                                       f"{MAX_RPC_ID_CHARS} characters")
    config = params.get("configuration") or {}
    accepted = _field(config, "acceptedOutputModes", "accepted_output_modes") \
        if isinstance(config, dict) else None
    if accepted is not None and not isinstance(accepted, list):
        raise RpcError(INVALID_PARAMS, "configuration.acceptedOutputModes must be a list of "
                                       f"media types, got {_clip(accepted)}")
    if accepted and not any(_is_json_type(m) for m in accepted):
        raise RpcError(CONTENT_TYPE_NOT_SUPPORTED, f"the reply is {MEDIA_TYPE}, which "
                       "acceptedOutputModes does not include", {"outputModes": [MEDIA_TYPE]})
    data = _veilnet_data(msg.get("parts"), binding)
    try:
        response = await infer(infer_request_from_part(data, message_id))
    except InferFailed as exc:
        raise _infer_error(exc) from None
    try:
        reply = infer_response_to_part(response)
    except InferFailed as exc:
        log.error("infer returned a malformed response: %s", exc)
        raise RpcError(INTERNAL_ERROR, "internal error: malformed inference response",
                       _veilnet("internal", exc.message)) from None
    out_id = str(uuid.uuid4())
    if binding == V1:
        return {"message": {"messageId": out_id, "contextId": context_id, "role": "ROLE_AGENT",
                            "parts": [{"data": reply, "mediaType": MEDIA_TYPE}]}}
    return {"kind": "message", "messageId": out_id, "contextId": context_id, "role": "agent",
            "parts": [{"kind": "data", "data": reply}]}
