"""The node dashboard: ``GET /``, a page an operator reads at a glance (docs/dashboard.md).

    GET /                        the page (node/dashboard/index.html)
    GET /dashboard/{file}        its script and style sheet (dashboard.js, dashboard.css)
    GET /v1/stats                JSON: request and error counters, open sessions, peers known,
                                 this node's ledger (size, cosignatures) and witness state

The page is static: its script polls the JSON routes (/v1/node, /v1/peers, /v1/agents,
/v1/rankings, /v1/stats) and fills the page with ``textContent``, never with markup. Everything
is served by the node itself, under a Content-Security-Policy that allows only its own origin.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from importlib import resources
from typing import Any

from fastapi import APIRouter, HTTPException
from fastapi.responses import Response

from ledger.cosign import cosignature_timestamp
from ledger.note import NoteError, parse_note, parse_verifier_key
from node.service import NodeService

log = logging.getLogger("veilnet.dashboard")

FILES = {"dashboard.js": "text/javascript; charset=utf-8",
         "dashboard.css": "text/css; charset=utf-8"}
PAGE = "index.html"
MAX_WITNESSED_LOGS = 32  # logs listed in /v1/stats "witness.logs"
HEADERS = {
    "Content-Security-Policy": "default-src 'none'; script-src 'self'; style-src 'self'; "
                               "img-src 'self' data:; connect-src 'self'; base-uri 'none'; "
                               "form-action 'none'; frame-ancestors 'none'",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-cache",
}


def read_asset(name: str) -> bytes:
    """One file of node/dashboard/ (package data of ``node``)."""
    return resources.files("node").joinpath("dashboard", name).read_bytes()


def counter_totals(service: NodeService, family: str) -> dict[str, float]:
    """``{protocol: value}`` of the counter ``family`` (summed over its other labels)."""
    out: dict[str, float] = {}
    for metric in service.metrics.registry.collect():
        if metric.name != family:
            continue
        for sample in metric.samples:
            if sample.name == family + "_total":
                key = sample.labels.get("protocol", "")
                out[key] = out.get(key, 0.0) + sample.value
    return out


def _count(service: NodeService, family: str) -> int:
    return int(sum(counter_totals(service, family).values()))


def _ledger_state(origin: str, size: int, note: str) -> dict[str, Any]:
    """Size and cosignatures (name, timestamp) of the log's latest checkpoint ``note``."""
    try:
        signatures = parse_note(note).signatures
    except NoteError:
        signatures = ()
    cosigners = []
    for sig in signatures:
        if sig.name == origin:  # the log's own signature
            continue
        try:
            cosigners.append({"name": sig.name, "time": cosignature_timestamp(sig)})
        except NoteError:
            continue
    times = [c["time"] for c in cosigners]
    return {"size": size, "cosignatures": len(cosigners), "cosigners": cosigners,
            "last_cosigned": max(times) if times else None}


async def ledger_state(service: NodeService) -> dict[str, Any] | None:
    """This node's log (``--ledger``): its size and the cosignatures of its latest checkpoint;
    None when the node keeps no log."""
    ledger = service.ledger.ledger if service.ledger is not None else None
    if service.ledger is None or ledger is None:
        return None
    size, note = await service.ledger.on_log(lambda: (ledger.size, ledger.checkpoint()))
    return {"origin": ledger.origin, **_ledger_state(ledger.origin, size, note)}


async def witness_state(service: NodeService) -> dict[str, Any] | None:
    """What this node's witness cosigned: counters, and for each log named by a known card the
    size it last cosigned; None when the node has no witness."""
    ledger = service.ledger
    if ledger is None:
        return None
    origins: set[str] = set()
    if service.discovery is not None:
        for info in service.discovery.index.infos():
            if info.ledger_key:
                try:
                    origins.add(parse_verifier_key(info.ledger_key).name)
                except (NoteError, ValueError):
                    continue
    wanted = sorted(origins)[:MAX_WITNESSED_LOGS]

    def known() -> list[dict[str, Any]]:
        rows = []
        for origin in wanted:
            found = ledger.witness.known(origin)
            if found is not None:
                rows.append({"origin": origin, "size": found[0]})
        return rows

    return {"name": ledger.witness.name, "cosigned": _count(service, "veilnet_witness_cosigned"),
            "refused": _count(service, "veilnet_witness_refused"),
            "logs": await ledger.on_witness(known)}


async def node_stats(service: NodeService) -> dict[str, Any]:
    """The body of ``GET /v1/stats``."""
    requests = counter_totals(service, "veilnet_requests")
    errors = counter_totals(service, "veilnet_errors")
    return {
        "time": round(time.time(), 3),
        "uptime_s": round(time.time() - service.started, 3),
        "requests_total": int(sum(requests.values())),
        "errors_total": int(sum(errors.values())),
        "requests": {k: int(v) for k, v in sorted(requests.items())},
        "errors": {k: int(v) for k, v in sorted(errors.items())},
        "sessions_open": len(service.sessions.table),
        "peers_known": len(service.peers.records()),
        "cards_indexed": (service.discovery.index.count()
                          if service.discovery is not None else None),
        "discovery": service.discovery is not None,
        "ledger": await ledger_state(service),
        "witness": await witness_state(service),
    }


def _asset_route(name: str, media_type: str) -> Callable[[], Response]:
    body = read_asset(name)

    def serve() -> Response:
        return Response(body, media_type=media_type, headers=HEADERS)

    return serve


def dashboard_router(service: NodeService) -> APIRouter:
    """``GET /``, its two static files and ``GET /v1/stats``."""
    router = APIRouter()
    page = read_asset(PAGE)
    assets = {name: _asset_route(name, media) for name, media in FILES.items()}

    @router.get("/", include_in_schema=False)
    async def index() -> Response:
        return Response(page, media_type="text/html; charset=utf-8", headers=HEADERS)

    @router.get("/dashboard/{name}", include_in_schema=False)
    async def asset(name: str) -> Response:
        serve = assets.get(name)  # only the files listed in FILES: no path from the request
        if serve is None:
            raise HTTPException(404, f"no dashboard file {name!r}")
        return serve()

    @router.get("/v1/stats")
    async def stats() -> dict[str, Any]:
        """Request and error counters (by protocol), open sessions, peers known, and this
        node's ledger (size, cosignatures of the latest checkpoint) and witness state
        (checkpoints cosigned and refused, size last cosigned per known log)."""
        return await node_stats(service)

    return router


__all__ = ["counter_totals", "dashboard_router", "node_stats", "read_asset"]
