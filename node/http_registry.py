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
from protocols.wire import WIRE_VERSION, WireError
from registry.a2a_rpc import InferFailed, dispatch
from registry.anp import agent_description, collection_page, did_document, did_wba
from registry.card import MAX_CARD_BYTES, CardRejected, parse_card_json, verify_card

log = logging.getLogger("veilnet.registry")
MAX_RPC_BODY = A2A_BODY_LIMIT  # 64 MiB, also the BodyLimit middleware's limit for /a2a


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

    @router.get("/v1/agents")
    async def agents(model: str | None = Query(None, description="model name or deployment CID"),
                     shard: str | None = Query(None, description="shard CID"),
                     deployment: str | None = Query(None, description="deployment CID"),
                     ) -> list[dict[str, Any]]:
        return discovery.index.query(model=model, shard=shard, deployment=deployment)

    @router.post("/v1/agents", status_code=201)
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

    @router.post("/a2a")
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
