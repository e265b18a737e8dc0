"""HTTP read side of a node's ledger (``--ledger``), the same answers as ``veilnet ledger``:

    GET /ledger/checkpoint[?size=N]        the signed checkpoint note, with cosignatures
    GET /ledger/key                        the log's verifier key
    GET /ledger/proof?index=I[&size=N]     a C2SP tlog-proof (text)
    GET /ledger/consistency?old=M[&new=N]  base64 hashes, one a line
    GET /ledger/entries?from=I[&to=J]      JSON: [{index, data (base64), entry (decoded)}]

Indexes and sizes are integers from 0 to 2^63 - 1 (SQLite's largest): others get 422.
"""

from __future__ import annotations

import base64
from typing import Any

from fastapi import APIRouter, HTTPException, Query
from fastapi.responses import PlainTextResponse

from ledger.entries import EntryError, parse_entry
from ledger.log import LedgerError
from node.ledger_service import MAX_LOG_INDEX, LedgerService

MAX_ENTRIES_PER_PAGE = 1000
TEXT = "text/plain; charset=utf-8"


def ledger_router(service: LedgerService) -> APIRouter:
    router = APIRouter(prefix="/ledger")
    ledger = service.ledger
    assert ledger is not None

    async def call(fn: Any, *args: Any) -> Any:
        try:
            return await service.on_log(fn, *args)
        except (LedgerError, IndexError) as exc:
            raise HTTPException(400, str(exc)) from None

    @router.get("/checkpoint", response_class=PlainTextResponse)
    async def checkpoint(size: int | None = Query(None, ge=0, le=MAX_LOG_INDEX),
                         ) -> PlainTextResponse:
        return PlainTextResponse(await call(ledger.checkpoint, size), media_type=TEXT)

    @router.get("/key", response_class=PlainTextResponse)
    async def key() -> PlainTextResponse:
        return PlainTextResponse(ledger.verifier_key + "\n", media_type=TEXT)

    @router.get("/proof", response_class=PlainTextResponse)
    async def proof(index: int = Query(..., ge=0, le=MAX_LOG_INDEX),
                    size: int | None = Query(None, ge=0, le=MAX_LOG_INDEX),
                    ) -> PlainTextResponse:
        return PlainTextResponse(await call(ledger.proof, index, size), media_type=TEXT)

    @router.get("/consistency", response_class=PlainTextResponse)
    async def consistency(old: int = Query(..., ge=0, le=MAX_LOG_INDEX),
                          new: int | None = Query(None, ge=0, le=MAX_LOG_INDEX),
                          ) -> PlainTextResponse:
        hashes = await call(ledger.consistency, old, new)
        return PlainTextResponse("".join(base64.b64encode(h).decode() + "\n" for h in hashes),
                                 media_type=TEXT)

    @router.get("/entries")
    async def entries(start: int = Query(0, ge=0, le=MAX_LOG_INDEX, alias="from"),
                      stop: int | None = Query(None, ge=0, le=MAX_LOG_INDEX, alias="to"),
                      ) -> list[dict[str, Any]]:
        last = ledger.size - 1 if stop is None else min(stop, ledger.size - 1)
        last = min(last, start + MAX_ENTRIES_PER_PAGE - 1)
        rows = await call(ledger.store.entries, start, last + 1)
        out = []
        for index, data in rows:
            row: dict[str, Any] = {"index": index, "data": base64.b64encode(data).decode()}
            try:
                row["entry"] = parse_entry(data).to_json()
            except EntryError as exc:
                row["not_an_entry"] = str(exc)
            out.append(row)
        return out

    return router
