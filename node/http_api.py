"""The node's HTTP API (FastAPI, served by Hypercorn's trio worker in the node's process)."""

from __future__ import annotations

import time

import trio
from fastapi import FastAPI, HTTPException
from fastapi.responses import Response
from prometheus_client import CONTENT_TYPE_LATEST
from pydantic import BaseModel, Field

from models import is_valid_cid
from node.service import NodeService
from node.store import StoreError


class FetchRequest(BaseModel):
    deployment: str = Field(description="CID of the deployment manifest")
    shards: list[str] | None = Field(None, description="node shard CIDs (default: all)")
    peer: str | None = Field(None, description="multiaddr of the peer to fetch from "
                                               "(default: any known peer)")


def create_app(service: NodeService, domain: str | None = None) -> FastAPI:
    app = FastAPI(title="veilnet node", version="1",
                  description="Health, metrics, identity, peers, agent cards and A2A/ANP "
                              "endpoints of one veilnet node.")
    if service.discovery is not None:
        from node.http_registry import registry_router

        app.include_router(registry_router(service, domain))
    if service.ledger is not None and service.ledger.ledger is not None:
        from node.http_ledger import ledger_router

        app.include_router(ledger_router(service.ledger))

    @app.get("/healthz")
    async def healthz() -> dict[str, object]:
        return {"status": "ok", "peer_id": service.identity.peer_id,
                "uptime_s": round(time.time() - service.started, 3)}

    @app.get("/metrics")
    async def metrics() -> Response:
        service.metrics.shards_served.set(len(service.store.shards()))
        service.metrics.shards_loaded.set(len(service.executor.loaded()))
        service.metrics.peers.set(len(service.peers.records()))
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
        }

    @app.get("/v1/peers")
    async def peers() -> list[dict[str, object]]:
        return [r.to_json() for r in service.peers.records()]

    @app.get("/v1/rankings")
    async def rankings() -> list[dict[str, object]]:
        """Node rankings, best first: did, score and the figures behind it (docs/consensus.md)."""
        return service.rankings.rows() if service.rankings is not None else []

    @app.post("/v1/shards/fetch")
    async def fetch(body: FetchRequest) -> dict[str, object]:
        for cid in [body.deployment, *(body.shards or [])]:
            if not is_valid_cid(cid):
                raise HTTPException(400, f"{cid!r} is not a CID")
        try:
            installed = await service.fetch_deployment(body.deployment, body.shards, body.peer)
        except ValueError as exc:  # StoreError and bad multiaddrs
            raise HTTPException(400 if not isinstance(exc, StoreError) else 502,
                                str(exc)) from None
        except (ConnectionError, OSError, trio.TooSlowError) as exc:
            raise HTTPException(502, f"fetch failed: {exc or type(exc).__name__}") from None
        return {"deployment": body.deployment, "shards": installed}

    return app
