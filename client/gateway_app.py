"""The OpenAI-compatible HTTP API of ``veilnet gateway`` (docs/gateway.md): a FastAPI app over
one long-lived ``AsyncClient`` per deployment, run by client/gateway.py.

Routes: ``GET /v1/models``, ``POST /v1/embeddings`` (encoder deployments), ``POST
/v1/chat/completions`` and ``POST /v1/completions`` (decoder deployments; ``stream: true`` as
server-sent events in OpenAI's chunk format, ending with ``data: [DONE]``). Every answer carries
``veilnet``: the hops with the nodes' DIDs and verdicts, and the ledger receipt or why there is
none. Errors have OpenAI's shape (``{"error": {"message", "type", "param", "code"}}``).

The bodies are checked by hand rather than with pydantic models: OpenAI clients send fields
this gateway does not use (``user``, ``logit_bias``, ...), which must be ignored, while the few
it uses need messages that name the field the way OpenAI's own errors do.
"""

from __future__ import annotations

import base64
import json
import secrets
import time
from collections.abc import AsyncIterator, Callable, Mapping
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import trio
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse

from client.async_client import AsyncClient
from client.gateway_errors import ApiError, api_error_of, check_body
from client.results import EmbedResult, GenerateResult
from models.manifest import Manifest


@dataclass
class GatewayModel:
    """One deployment the gateway serves: its model id, its client and what it can do."""

    id: str
    manifest: Manifest
    client: AsyncClient
    count_tokens: Callable[[str], int]  # the deployment's tokenizer (usage of embeddings)
    created: int = 0
    # one request at a time per deployment: AsyncClient is not shown to be safe under
    # concurrent queries (its router and hop state are shared); requests queue here instead
    lock: trio.Lock = field(default_factory=trio.Lock)

    @property
    def generates(self) -> bool:
        return "kv_cache" in self.manifest.extra

    def describe(self) -> dict[str, Any]:
        return {"id": self.id, "object": "model", "created": self.created,
                "owned_by": "veilnet", "veilnet": {
                    "deployment": self.manifest.cid, "name": self.manifest.name,
                    "encryption": self.manifest.encryption,
                    "endpoints": ["/v1/chat/completions", "/v1/completions"] if self.generates
                    else ["/v1/embeddings"]}}


@asynccontextmanager
async def served(model: GatewayModel) -> AsyncIterator[None]:
    """Hold ``model``'s turn; a failure inside becomes an ``ApiError`` (OpenAI's shape)."""
    async with model.lock:
        try:
            yield
        except ApiError:
            raise
        except Exception as exc:  # mapped (and an unexpected one logged) by api_error_of
            raise api_error_of(exc) from exc


def evidence(result: EmbedResult | GenerateResult) -> dict[str, Any]:
    """The ``veilnet`` field: who computed each hop, the verdicts, and the receipt."""
    doc: dict[str, Any] = {"verified": result.verified,
                           "hops": [h.to_json() for h in result.hops]}
    if result.receipt is not None:
        doc["receipt"] = result.receipt.to_json()
    elif result.receipt_pending is not None:
        doc["receipt_pending"] = result.receipt_pending.to_json()
    else:
        doc["receipt"] = None
        doc["receipt_error"] = result.receipt_error
    return doc


def create_gateway_app(models: Mapping[str, GatewayModel], api_key: str | None = None,
                       ) -> FastAPI:
    """The gateway's app over ``models`` (by model id). With ``api_key``, every route needs
    ``Authorization: Bearer <api_key>``."""
    app = FastAPI(title="veilnet gateway", version="1", docs_url=None, redoc_url=None)

    @app.exception_handler(ApiError)
    async def on_api_error(_: Request, exc: ApiError) -> JSONResponse:
        return JSONResponse(exc.body(), status_code=exc.status)

    @app.middleware("http")
    async def guard(request: Request, call_next: Callable[..., Any]) -> Response:
        if api_key is not None:
            given = request.headers.get("authorization", "")
            if not secrets.compare_digest(given.encode(), f"Bearer {api_key}".encode()):
                return JSONResponse(ApiError(401, "a valid API key is needed: send "
                                                  "'Authorization: Bearer <key>'",
                                             "invalid_request_error", None,
                                             "invalid_api_key").body(), status_code=401)
        return await call_next(request)

    def known(name: Any) -> GatewayModel:
        if not isinstance(name, str) or name not in models:
            raise ApiError(404, f"the model {name!r} does not exist; this gateway serves: "
                                f"{', '.join(sorted(models))}", "invalid_request_error",
                           "model", "model_not_found")
        return models[name]

    def model_for(body: dict[str, Any], generating: bool) -> GatewayModel:
        name = body.get("model")
        model = known(name)
        if model.generates != generating:
            route = "/v1/chat/completions or /v1/completions" if model.generates \
                else "/v1/embeddings"
            raise ApiError(400, f"the model {name!r} ({model.manifest.name}) is served at "
                                f"{route} only", "invalid_request_error", "model",
                           "wrong_endpoint")
        return model

    async def body_of(request: Request) -> dict[str, Any]:
        try:
            body = json.loads(await request.body())
        except (ValueError, UnicodeDecodeError):
            raise ApiError(400, "the request body is not valid JSON", "invalid_request_error",
                           None, "invalid_json") from None
        if not isinstance(body, dict):
            raise ApiError(400, "the request body must be a JSON object",
                           "invalid_request_error", None, "invalid_json")
        return body

    @app.get("/v1/models")
    async def list_models() -> dict[str, Any]:
        return {"object": "list", "data": [m.describe() for m in models.values()]}

    @app.get("/v1/models/{model_id}")
    async def get_model(model_id: str) -> dict[str, Any]:
        return known(model_id).describe()

    @app.post("/v1/embeddings")
    async def embeddings(request: Request) -> dict[str, Any]:
        body = await body_of(request)
        model = model_for(body, generating=False)
        texts, fmt = check_body.embedding(body)
        async with served(model):
            result = await model.client.embed(texts)
        rows = np.asarray(result.embeddings, np.float32)
        data = [{"object": "embedding", "index": i,
                 "embedding": base64.b64encode(row.astype("<f4").tobytes()).decode()
                 if fmt == "base64" else [float(v) for v in row]} for i, row in enumerate(rows)]
        tokens = sum(model.count_tokens(t) for t in texts)
        return {"object": "list", "data": data, "model": model.id,
                "usage": {"prompt_tokens": tokens, "total_tokens": tokens},
                "veilnet": evidence(result)}

    async def generate(request: Request, chat: bool) -> Any:
        body = await body_of(request)
        model = model_for(body, generating=True)
        args, stream, include_usage = check_body.generation(body, chat)
        kind = "chat.completion" if chat else "text_completion"
        ident = ("chatcmpl-" if chat else "cmpl-") + secrets.token_hex(12)
        created = int(time.time())
        if stream:
            return StreamingResponse(
                _events(model, args, chat, ident, created, include_usage),
                media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
        async with served(model):
            result = await model.client.generate(**args)
        choice: dict[str, Any] = {"index": 0, "finish_reason": finish(result), "logprobs": None}
        if chat:
            choice["message"] = {"role": "assistant", "content": result.text}
        else:
            choice["text"] = result.text
        return {"id": ident, "object": kind, "created": created, "model": model.id,
                "choices": [choice], "usage": usage(result), "veilnet": evidence(result)}

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request) -> Any:
        return await generate(request, chat=True)

    @app.post("/v1/completions")
    async def completions(request: Request) -> Any:
        return await generate(request, chat=False)

    return app


def finish(result: GenerateResult) -> str:
    """OpenAI's finish_reason: ``stop`` or ``length`` (a cancelled generation was cut short)."""
    return "length" if result.finish_reason in ("length", "cancelled") else "stop"


def usage(result: GenerateResult) -> dict[str, int]:
    prompt, done = len(result.prompt_token_ids), len(result.token_ids)
    return {"prompt_tokens": prompt, "completion_tokens": done, "total_tokens": prompt + done}


async def _events(model: GatewayModel, args: dict[str, Any], chat: bool, ident: str,
                  created: int, include_usage: bool) -> AsyncIterator[str]:
    """Server-sent events of one generation: a chunk per token, then the finish reason (with
    ``veilnet``), the usage when asked, and ``[DONE]``; an error mid-stream is sent as an
    ``error`` object (the status line has gone out already)."""
    kind = "chat.completion.chunk" if chat else "text_completion"

    def event(doc: dict[str, Any]) -> str:
        return f"data: {json.dumps(doc, separators=(',', ':'))}\n\n"

    def chunk(choices: list[dict[str, Any]], **extra: Any) -> str:
        return event({"id": ident, "object": kind, "created": created, "model": model.id,
                      "choices": choices, **extra})

    def choice(delta: dict[str, str], reason: str | None = None) -> dict[str, Any]:
        part = {"delta": delta} if chat else {"text": delta.get("content", "")}
        return {"index": 0, **part, "finish_reason": reason, "logprobs": None}

    try:
        async with served(model):
            async with model.client.stream(**args) as generation:
                if chat:
                    yield chunk([choice({"role": "assistant", "content": ""})])
                async for token in generation:
                    if token.text:
                        yield chunk([choice({"content": token.text})])
            result = generation.result
            assert result is not None
            yield chunk([choice({}, finish(result))], veilnet=evidence(result))
            if include_usage:
                yield chunk([], usage=usage(result))
    except ApiError as error:
        yield event(error.body())
    yield "data: [DONE]\n\n"


__all__ = ["GatewayModel", "create_gateway_app", "evidence", "finish", "served", "usage"]
