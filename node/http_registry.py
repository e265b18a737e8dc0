"""HTTP routes of the agent registry: the A2A card, the card index, ANP documents, A2A JSON-RPC.

    GET  /.well-known/agent-card.json   this node's signed A2A v1.0 AgentCard
    GET  /.well-known/agent.json        the same card, for crawlers of the older path
    GET  /v1/agents?model=&shard=&deployment=   verified, unexpired cards from the index
    POST /v1/agents                     index a signed card from outside the mesh (unconfirmed
                                        until the node reaches its PeerID at its addresses)
    GET  /agents/{peer_id}/did.json     DID document (did:wba for this node with --domain)
    GET  /agents/{peer_id}/ad.json      this node's ANP Agent Description
    GET  /.well-known/agent-descriptions   ANP CollectionPage of every agent the node knows
    POST /a2a                           A2A JSON-RPC: SendMessage / message/send
"""

from __future__ import annotations

import logging
from typing import Any

import trio
from fastapi import APIRouter, HTTPException, Query, Request
from fastapi.responses import JSONResponse, Response

from crypto.identity import IdentityError, public_from_peer_id
from node.discovery import ChecksBusy
from node.http_limits import A2A_BODY_LIMIT, read_body
from node.service import NodeService
from protocols.cards import MAX_FILTER_CHARS, parse_lookup
from protocols.wire import WIRE_VERSION, WireError
from registry.a2a_rpc import InferFailed, dispatch
from registry.anp import agent_description, collection_page, did_document, did_wba
from registry.card import MAX_CARD_BYTES, CardRejected, parse_card_json, verify_card

log = logging.getLogger("veilnet.registry")
MAX_RPC_BODY = A2A_BODY_LIMIT  # 64 MiB, also the BodyLimit middleware's limit for /a2a


# OpenAPI declarations of the bodies these routes read themselves (raw bytes, bounded): what
# clients and schema-driven tools (tests/network/test_fuzz_http.py) see in /openapi.json.
_DETAIL = {"type": "object", "properties": {"detail": {
    "type": "object", "properties": {"reason": {"type": "string"},
                                     "message": {"type": "string"}},
    "required": ["reason", "message"]}}, "required": ["detail"]}
_REFUSED = {"content": {"application/json": {"schema": _DETAIL}}}
_CARD_BODY = {"required": True, "content": {"application/json": {"schema": {
    "type": "object", "description": "a signed A2A v1.0 AgentCard (docs/agent-card.md), at most "
                                     f"{MAX_CARD_BYTES} bytes"}}}}
_PART = {"type": "object", "properties": {
    "kind": {"type": "string", "enum": ["data", "text"]},
    "text": {"type": "string"},
    "data": {"type": "object", "description": "a veilnet infer request (docs/agent-card.md)",
             "properties": {"veilnet": {"type": "string", "enum": ["infer/1"]},
                            "v": {"type": "integer"},
                            "id": {"type": "string", "maxLength": 128},
                            "shard": {"type": "string", "pattern": "^bafkrei[a-z2-7]{52}$",
                                      "description": "a shard CID"},
                            "inputs": {"type": "object"}}}}}
_RPC_CALL = {"type": "object", "required": ["jsonrpc", "method"], "properties": {
    "jsonrpc": {"type": "string", "enum": ["2.0"]},
    "id": {"anyOf": [{"type": "string"}, {"type": "integer"}, {"type": "null"}]},
    "method": {"type": "string", "enum": ["message/send", "SendMessage"]},
    "params": {"type": "object", "properties": {"message": {
        "type": "object", "required": ["role", "messageId", "parts"], "properties": {
            "role": {"type": "string", "enum": ["user", "agent", "ROLE_USER"]},
            "messageId": {"type": "string"},
            "parts": {"type": "array", "items": _PART, "maxItems": 8}}}}}}}
_RPC_BODY = {"required": True, "content": {"application/json": {"schema": {"anyOf": [
    _RPC_CALL, {"type": "array", "items": _RPC_CALL, "minItems": 1, "maxItems": 16}]}}}}


def registry_router(service: NodeService, domain: str | None = None) -> APIRouter:
    router = APIRouter()
    discovery = service.discovery
    assert discovery is not None

    def own_card() -> dict[str, Any]:
        return discovery.card if discovery.card is not None else discovery.refresh_card()

    def base_url() -> str:
        return f"https://{domain}" if domain else (service.http_url or "")

    def own_did() -> str:
        return did_wba(domain, service.identity.peer_id) if domain else service.identity.did

    @router.get("/.well-known/agent-card.json")
    @router.get("/.well-known/agent.json")
    async def agent_card() -> JSONResponse:
        return JSONResponse(own_card())

    @router.get("/v1/agents", responses={400: _REFUSED | {
        "description": "a filter that is not a CID (model: not a name of 1 to "
                       f"{MAX_FILTER_CHARS} characters)"}})
    async def agents(model: str | None = Query(None, description="model name or deployment CID"),
                     shard: str | None = Query(None, description="shard CID"),
                     deployment: str | None = Query(None, description="deployment CID"),
                     ) -> list[dict[str, Any]]:
        filters = {"model": model, "shard": shard, "deployment": deployment}
        try:  # the checks of /veilnet/cards/1 (CIDs checked before any decoding); an empty
            # parameter (?model=) is no filter
            lookup = parse_lookup({k: v for k, v in filters.items() if v})
        except WireError as exc:
            raise HTTPException(400, {"reason": "bad_request", "message": exc.message}) \
                from None
        return discovery.index.query(**lookup.filters())

    @router.post("/v1/agents", status_code=201, openapi_extra={"requestBody": _CARD_BODY},
                 responses={400: _REFUSED | {"description": "the card was refused"},
                            413: _REFUSED | {"description": "the card is too large"},
                            429: _REFUSED | {"description": "too many cards being checked"}})
    async def post_agent(request: Request) -> dict[str, Any]:
        body = await read_body(request, MAX_CARD_BYTES, cut=True)  # parse_card_json: oversized
        try:
            info = verify_card(parse_card_json(body))
        except CardRejected as exc:
            service.metrics.cards_dropped.labels(exc.reason, "http").inc()
            log.info("POST /v1/agents: dropped card: %s", exc)
            raise HTTPException(413 if exc.reason == "oversized" else 400,
                                {"reason": exc.reason, "message": str(exc)}) from None
        try:  # unconfirmed until a dial of its addresses reaches its PeerID (node/discovery.py)
            outcome = discovery.accept_posted(info)
        except ChecksBusy as exc:
            service.metrics.cards_dropped.labels("busy", "http").inc()
            raise HTTPException(429, {"reason": "busy", "message": str(exc)},
                                headers={"Retry-After": "10"}) from None
        status = discovery.index.status(info.peer_id)
        return {"peer_id": info.peer_id, "did": info.did, "outcome": outcome,
                "expires_at": info.expires_at,
                "status": status.state if status is not None else "unconfirmed"}

    @router.get("/agents/{peer_id}/did.json")
    async def did_json(peer_id: str) -> JSONResponse:
        if peer_id == service.identity.peer_id:
            ad_url = f"{base_url()}/agents/{peer_id}/ad.json" if domain else None
            return JSONResponse(did_document(service.identity.public, domain=domain,
                                             service_url=ad_url))
        if discovery.index.get(peer_id) is None:
            raise HTTPException(404, f"no agent {peer_id} in this node's index")
        try:  # a did:key document follows from the key alone, so any indexed peer has one
            return JSONResponse(did_document(public_from_peer_id(peer_id)))
        except IdentityError as exc:
            raise HTTPException(404, str(exc)) from None

    @router.get("/agents/{peer_id}/ad.json")
    async def ad_json(peer_id: str) -> JSONResponse:
        if peer_id != service.identity.peer_id:
            raise HTTPException(404, "this node serves only its own Agent Description; "
                                     "see /.well-known/agent-descriptions for the others")
        info = verify_card(own_card())
        return JSONResponse(agent_description(info, base_url=base_url(), did=own_did(),
                                              identity=service.identity))

    @router.get("/.well-known/agent-descriptions")
    async def descriptions() -> JSONResponse:
        entries = []
        for info in discovery.index.infos():
            home = base_url() if info.peer_id == service.identity.peer_id else info.http
            if home:
                entries.append((info.card["name"], f"{home}/agents/{info.peer_id}/ad.json"))
        return JSONResponse(collection_page(
            entries, url=f"{base_url()}/.well-known/agent-descriptions"))

    @router.post("/a2a", openapi_extra={"requestBody": _RPC_BODY},
                 responses={204: {"description": "a JSON-RPC notification: no response"}})
    async def a2a(request: Request) -> Response:
        body = await read_body(request, MAX_RPC_BODY)  # 413 JSON past the limit
        result = await dispatch(body, infer, max_body=MAX_RPC_BODY,
                                a2a_version=request.headers.get("A2A-Version", ""),
                                offload=trio.to_thread.run_sync)
        if result is None:  # a JSON-RPC notification gets no response
            return Response(status_code=204)
        return JSONResponse(result)

    async def infer(message: dict[str, Any]) -> dict[str, Any]:
        service.metrics.requests.labels("a2a").inc()
        try:
            if message.get("v") != WIRE_VERSION or not isinstance(message.get("id"), str):
                raise WireError("bad_request", "infer request needs v=1 and a string id")
            return await service.infer(message)
        except WireError as exc:
            service.metrics.errors.labels("a2a", exc.code).inc()
            raise InferFailed(exc.code, exc.message) from None

    return router
