"""The gateway's errors in OpenAI's shape, and the checks of its request bodies
(client/gateway_app.py; docs/gateway.md, "Errors")."""

from __future__ import annotations

import logging
import math
import re
from typing import Any

from client.results import QueryError
from errors import InputError, VeilnetError

log = logging.getLogger("veilnet.gateway")
MAX_INPUTS = 256  # texts per embeddings request


class ApiError(VeilnetError):
    """An HTTP error answered as ``{"error": {"message", "type", "param", "code"}}``."""

    def __init__(self, status: int, message: str, kind: str, param: str | None,
                 code: str | None) -> None:
        super().__init__(message)
        self.status, self.message, self.kind = status, message, kind
        self.param, self.code = param, code

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.kind, "param": self.param,
                          "code": self.code}}


def bad(message: str, param: str | None, code: str = "invalid_value") -> ApiError:
    return ApiError(400, message, "invalid_request_error", param, code)


def api_error_of(exc: BaseException) -> ApiError:
    """What the network's or the model's failure means to an OpenAI client."""
    if isinstance(exc, ApiError):
        return exc
    text = str(exc)
    if isinstance(exc, InputError):
        if text.startswith("context too long"):
            return bad(text, "messages", "context_length_exceeded")
        if text.startswith("max_tokens"):
            return bad(text, "max_tokens")
        return bad(text, None)
    if isinstance(exc, QueryError):
        if "no known node serves" in text or "no node answered" in text \
                or re.search(r"\b0 node\(s\) serve", text):
            return ApiError(503, text, "service_unavailable", None, "no_nodes")
        if "took longer than" in text:
            return ApiError(504, text, "timeout", None, "timeout")
        return ApiError(502, text, "upstream_error", None, "network_error")
    log.exception("gateway: unexpected error")
    return ApiError(500, f"internal error: {type(exc).__name__}: {text}", "server_error", None,
                    "internal_error")


class _Checks:
    """The request-body checks, one method per route kind (``check_body.embedding(body)``)."""

    @staticmethod
    def embedding(body: dict[str, Any]) -> tuple[list[str], str]:
        """``(texts, encoding_format)`` of a /v1/embeddings body."""
        given = body.get("input")
        texts = [given] if isinstance(given, str) else given
        if not isinstance(texts, list) or not texts \
                or not all(isinstance(t, str) for t in texts):
            raise bad("'input' must be a string or a non-empty list of strings (token arrays "
                      "are not accepted: the gateway tokenizes)", "input")
        if len(texts) > MAX_INPUTS:
            raise bad(f"'input' has {len(texts)} texts; at most {MAX_INPUTS} per request",
                      "input")
        if any(not t.strip() for t in texts):
            raise bad("'input' holds an empty string", "input")
        fmt = body.get("encoding_format", "float")
        if fmt not in ("float", "base64"):
            raise bad(f"'encoding_format' must be 'float' or 'base64', not {fmt!r}",
                      "encoding_format")
        if body.get("dimensions") is not None:
            raise bad("'dimensions' is not supported: the model's embeddings have a fixed size",
                      "dimensions")
        return texts, fmt

    @staticmethod
    def generation(body: dict[str, Any], chat: bool) -> tuple[dict[str, Any], bool, bool]:
        """``(AsyncClient.stream/generate keyword arguments, stream, include_usage)`` of a
        /v1/chat/completions (``chat``) or /v1/completions body."""
        args: dict[str, Any] = {}
        if chat:
            args["messages"] = _messages(body.get("messages"))
        else:
            prompt = body.get("prompt")
            if isinstance(prompt, list) and len(prompt) == 1:
                prompt = prompt[0]
            if not isinstance(prompt, str) or not prompt:
                raise bad("'prompt' must be a non-empty string (or a list of one)", "prompt")
            args["prompt"] = prompt
        limit = body.get("max_completion_tokens", body.get("max_tokens", 64))
        name = "max_completion_tokens" if "max_completion_tokens" in body else "max_tokens"
        if limit is None:
            limit = 64
        if not isinstance(limit, int) or isinstance(limit, bool) or limit < 1:
            # the model's context bounds it: the client says "context too long" (400)
            raise bad(f"'{name}' must be a positive integer", name)
        args["max_tokens"] = limit
        args["temperature"] = _number(body, "temperature", 1.0, 0.0, 2.0)
        args["top_p"] = _number(body, "top_p", 1.0, 0.0, 1.0)
        if args["top_p"] == 0.0:
            raise bad("'top_p' must be above 0", "top_p")
        seed = body.get("seed")
        if seed is not None and (not isinstance(seed, int) or isinstance(seed, bool)):
            raise bad("'seed' must be an integer", "seed")
        args["seed"] = seed
        stop = body.get("stop")
        stops = [] if stop is None else [stop] if isinstance(stop, str) else stop
        if not isinstance(stops, list) or len(stops) > 4 \
                or not all(isinstance(s, str) and s for s in stops):
            raise bad("'stop' must be a string or a list of up to 4 non-empty strings", "stop")
        args["stop"] = stops
        n = body.get("n", 1)
        if n != 1:
            raise bad("'n' must be 1: the gateway generates one choice", "n")
        stream = body.get("stream", False)
        if not isinstance(stream, bool):
            raise bad("'stream' must be true or false", "stream")
        options = body.get("stream_options") or {}
        if not isinstance(options, dict):
            raise bad("'stream_options' must be an object", "stream_options")
        return args, stream, bool(options.get("include_usage", False))


check_body = _Checks()


def _number(body: dict[str, Any], name: str, default: float, low: float, high: float) -> float:
    value = body.get(name)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, int | float) \
            or not math.isfinite(value) or not low <= value <= high:
        raise bad(f"'{name}' must be a number from {low:g} to {high:g}", name)
    return float(value)


def _messages(given: Any) -> list[dict[str, str]]:
    """Chat messages as ``{role, content}`` strings (content parts of type text joined)."""
    if not isinstance(given, list) or not given:
        raise bad("'messages' must be a non-empty list", "messages")
    out = []
    for i, message in enumerate(given):
        where = f"messages[{i}]"
        if not isinstance(message, dict):
            raise bad(f"'{where}' must be an object", where)
        role, content = message.get("role"), message.get("content")
        if role not in ("system", "developer", "user", "assistant"):
            raise bad(f"'{where}.role' must be system, developer, user or assistant",
                      f"{where}.role")
        if isinstance(content, list):
            if not all(isinstance(p, dict) and p.get("type") == "text"
                       and isinstance(p.get("text"), str) for p in content):
                raise bad(f"'{where}.content' parts must be text parts (no images or audio)",
                          f"{where}.content")
            content = "".join(p["text"] for p in content)
        if not isinstance(content, str):
            raise bad(f"'{where}.content' must be a string", f"{where}.content")
        out.append({"role": "system" if role == "developer" else role, "content": content})
    return out


__all__ = ["MAX_INPUTS", "ApiError", "api_error_of", "bad", "check_body"]
