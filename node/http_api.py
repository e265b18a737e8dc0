"""The node's HTTP API (FastAPI, served by Hypercorn's trio worker in the node's process).

Reading routes are open. ``POST /v1/shards/fetch`` changes the node's state and makes it dial a
peer, so it needs the operator's token (D/api-token, created 0600 at first start by the daemon):
``Authorization: Bearer <token>``, compared in constant time, checked before the body is read.
"""

from __future__ import annotations

import hmac
import time
from typing import Annotated

import trio
from fastapi import Depends, FastAPI, HTTPException, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import Response
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from prometheus_client import CONTENT_TYPE_LATEST
from pydantic import BaseModel, Field, ValidationError

from models import is_valid_cid
from node.http_limits import ROUTE_BODY_LIMITS, BodyLimit, read_body
from node.service import NodeService
from node.store import StoreError
from protocols.transport import error_text

FETCH_BODY_LIMIT = 256 * 1024  # a fetch naming 1024 shard CIDs is about 64 KiB
MAX_FETCH_SHARDS = 1024
MAX_CID_CHARS = 128  # a CID here has 59
MAX_MULTIADDR_CHARS = 1024


class FetchRequest(BaseModel):
    deployment: str = Field(max_length=MAX_CID_CHARS, description="CID of the deployment manifest")
    shards: list[Annotated[str, Field(max_length=MAX_CID_CHARS)]] | None = Field(
        None, max_length=MAX_FETCH_SHARDS, description="node shard CIDs (default: all)")
    peer: str | None = Field(None, max_length=MAX_MULTIADDR_CHARS,
                             description="multiaddr of the peer to fetch from (default: any "
                                         "known peer)")


async def _fetch_body(request: Request) -> FetchRequest:
    """The body of POST /v1/shards/fetch, read up to FETCH_BODY_LIMIT bytes and validated."""
    data = await read_body(request, FETCH_BODY_LIMIT)  # 413 past the limit
    try:
        return FetchRequest.model_validate_json(data)
    except ValidationError as exc:
        # without the input: a body that is not UTF-8 would be echoed as bytes, which the 422
        # handler cannot encode (UnicodeDecodeError: a 500), and echoes are not needed anyway
        raise RequestValidationError(exc.errors(include_url=False, include_input=False)) \
            from None


_BEARER = HTTPBearer(auto_error=False, scheme_name="api-token",
                     description="the node's operator token: the contents of D/api-token")


class OperatorToken:
    """A FastAPI dependency: 401 unless the request carries ``Authorization: Bearer <token>``
    with the node's API token (compared in constant time). Without a token, always 401."""

    def __init__(self, token: str | None) -> None:
        self._expected = token.encode() if token else None

    def __call__(self, credentials: Annotated[HTTPAuthorizationCredentials | None,
                                              Depends(_BEARER)]) -> None:
        if credentials is None:
            raise HTTPException(401, "this route needs the node's API token: send "
                                     "'Authorization: Bearer <the contents of D/api-token>'",
                                headers={"WWW-Authenticate": "Bearer"})
        if self._expected is None or not hmac.compare_digest(credentials.credentials.encode(),
                                                             self._expected):
            raise HTTPException(401, "wrong API token (see D/api-token in the node's data "
                                     "directory)", headers={"WWW-Authenticate": "Bearer"})


def create_app(service: NodeService, domain: str | None = None,
               api_token: str | None = None) -> FastAPI:
    """The node's FastAPI app. ``api_token`` guards the routes that change the node; without
    one they answer 401 to everyone."""
    app = FastAPI(title="veilnet node", version="1",
                  description="Health, metrics, identity, peers, agent cards and A2A/ANP "
                              "endpoints of one veilnet node.")

    app.add_middleware(BodyLimit, limits=ROUTE_BODY_LIMITS)  # 413 for bodies over the limits
    if service.discovery is not None:
        from node.http_registry import registry_router

        app.include_router(registry_router(service, domain))
    if service.ledger is not None and service.ledger.ledger is not None:
        from node.http_ledger import ledger_router

        app.include_router(ledger_router(service.ledger))
    from node.http_dashboard import dashboard_router  # GET /, /v1/stats (docs/dashboard.md)

    app.include_router(dashboard_router(service))

    @app.get("/healthz")
    async def healthz() -> dict[str, object]:
        return {"status": "ok", "peer_id": service.identity.peer_id,
                "uptime_s": round(time.time() - service.started, 3),
                "sessions": len(service.sessions.table)}

    @app.get("/metrics", response_class=Response, responses={200: {
        "description": "Prometheus text exposition format",
        "content": {CONTENT_TYPE_LATEST: {"schema": {"type": "string"}}}}})
    async def metrics() -> Response:
        service.metrics.shards_served.set(len(service.store.shards()))
        service.metrics.shards_loaded.set(len(service.executor.loaded()))
        service.metrics.peers.set(len(service.peers.records()))
        service.metrics.sessions_open.set(len(service.sessions.table))
        service.metrics.session_cache_bytes.set(service.sessions.table.cache_bytes())
        if service.discovery is not None:
            service.metrics.cards_indexed.set(service.discovery.index.count())
        return Response(service.metrics.render(), media_type=CONTENT_TYPE_LATEST)

    @app.get("/v1/node")
    async def node() -> dict[str, object]:
        loaded = set(service.executor.loaded())
        return {
            "peer_id": service.identity.peer_id,
            "did": service.identity.did,
            "multiaddrs": service.addrs(),
            "http": service.http_url,
            "shards": [{"cid": cid, "model": s.model, "deployment": s.deployment,
                        "index": s.spec.index, "loaded": cid in loaded}
                       for cid, s in sorted(service.store.shards().items())],
            "sessions": service.sessions.status(),
        }

    @app.get("/v1/peers")
    async def peers() -> list[dict[str, object]]:
        return [r.to_json() for r in service.peers.records()]

    @app.get("/v1/rankings")
    async def rankings() -> list[dict[str, object]]:
        """Node rankings, best first: did, score and the figures behind it (docs/consensus.md)."""
        return service.rankings.rows() if service.rankings is not None else []

    @app.post("/v1/shards/fetch", dependencies=[Depends(OperatorToken(api_token))], openapi_extra={
        "requestBody": {"required": True, "content": {
            "application/json": {"schema": FetchRequest.model_json_schema()}}}})
    async def fetch(request: Request) -> dict[str, object]:
        """Fetch a deployment's manifest and node shards from a peer (operator token needed)."""
        body = await _fetch_body(request)
        for cid in [body.deployment, *(body.shards or [])]:
            if not is_valid_cid(cid):
                raise HTTPException(400, f"{cid!r} is not a CID")
        try:
            installed = await service.fetch_deployment(body.deployment, body.shards, body.peer)
        except ValueError as exc:  # StoreError and bad multiaddrs
            raise HTTPException(400 if not isinstance(exc, StoreError) else 502,
                                str(exc)) from None
        except (ConnectionError, OSError, trio.TooSlowError) as exc:
            raise HTTPException(502, f"fetch failed: {error_text(exc)}") from None
        return {"deployment": body.deployment, "shards": installed}

    return app
