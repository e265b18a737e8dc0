"""``/veilnet/shard/1``: fetch a node shard or a deployment manifest by CID from a peer.

``request: {"v": 1, "id", "cid"}``; the answer is a header ``{"v": 1, "id", "cid", "size"}`` and
then ``{"data": bytes}`` frames of ``CHUNK`` bytes (the last one shorter) totalling ``size``
(docs/protocol.md). The serving side streams a file from disk (``send_file``); the fetching side
(``fetch``) refuses a header whose size passes its cap before reading any chunk, refuses a chunk
that would pass ``size``, and hands each chunk to a sink that hashes it to a temporary file and
stores it only if it matches the CID (node/store.py ``IncomingBlob``).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from contextlib import AbstractContextManager
from pathlib import Path
from typing import Any, Protocol

import trio
from libp2p.abc import IHost, INetStream
from libp2p.custom_types import TProtocol
from libp2p.peer.id import ID

from models import is_valid_cid
from protocols.transport import RemoteError, close_quietly, open_stream
from protocols.wire import WireError, envelope, read_frame, write_frame

SHARD = TProtocol("/veilnet/shard/1")
CHUNK = 1 << 20
CHUNK_OVERHEAD = 64  # CBOR framing of {"data": <bytes>} around a chunk's bytes
HEADER_LIMIT = 64 * 1024  # a header or error frame


class Sink(Protocol):
    """Where fetched chunks go (node/store.py ``IncomingBlob``)."""

    received: int

    def write(self, data: bytes) -> None: ...
    def commit(self) -> None: ...


def parse_request(message: Mapping[str, Any]) -> str:
    """The CID a request asks for; WireError ``bad_request`` if it is not a CID."""
    cid = message.get("cid")
    if not isinstance(cid, str) or not is_valid_cid(cid):
        raise WireError("bad_request", "'cid' must be a CID")
    return cid


async def send_file(stream: INetStream, request_id: str, cid: str, path: Path | None) -> None:
    """Answer a request for ``cid`` with the file at ``path``, streamed in ``CHUNK`` frames (a
    1 GB shard never sits in memory); WireError ``not_found`` when there is no such file."""
    try:
        if path is None:
            raise FileNotFoundError
        blob = await trio.open_file(path, "rb")
    except OSError:
        raise WireError("not_found", f"this node holds no shard or manifest {cid}") from None
    async with blob:
        size = os.fstat(blob.fileno()).st_size
        await write_frame(stream, {**envelope(request_id), "cid": cid, "size": size})
        sent = 0
        while sent < size:
            data = await blob.read(min(CHUNK, size - sent))
            if not data:  # the file shrank under us: the peer's hash check will fail
                break
            await write_frame(stream, {"data": data})
            sent += len(data)


async def fetch(host: IHost, peer: ID, cid: str, timeout: float, *, limit: int, why: str,
                what: str, size: int | None, frame_limit: int,
                open_sink: Callable[[], AbstractContextManager[Sink]]) -> int:
    """Download ``cid`` (a ``what``: "shard" or "manifest") from ``peer`` into a sink opened
    by ``open_sink`` once the header is accepted.

    A header announcing more than ``limit`` bytes (``why`` names the cap in the message), or
    other than the ``size`` the manifest declares, is refused before any chunk is read; so is a
    chunk that would pass the announced size. Returns the bytes stored; raises WireError,
    RemoteError, trio.TooSlowError after ``timeout`` seconds, or the sink's error."""
    with trio.fail_after(timeout):
        stream = await open_stream(host, peer, SHARD)
        try:
            await write_frame(stream, {**envelope(f"fetch-{cid}"), "cid": cid})
            header = await read_frame(stream, HEADER_LIMIT)
            if header is None or "error" in header:
                err = (header or {}).get("error") or {}
                err = err if isinstance(err, dict) else {}
                raise RemoteError(str(err.get("code", "truncated"))[:64],
                                  str(err.get("message", "no answer"))[:500])
            declared = header.get("size")
            if not isinstance(declared, int) or isinstance(declared, bool) or declared < 0:
                raise WireError("bad_frame", f"the {what} header has no valid 'size'")
            if declared > limit or (size is not None and declared != size):
                raise WireError("too_large" if declared > limit else "bad_frame",
                                f"the peer offers {what} {cid} as {declared} bytes; "
                                f"{why} is {limit} bytes")
            with open_sink() as incoming:
                while incoming.received < declared:
                    left = declared - incoming.received
                    chunk = await read_frame(stream, min(frame_limit, left + CHUNK_OVERHEAD))
                    data = chunk.get("data") if chunk else None
                    if not isinstance(data, bytes) or not data or len(data) > left:
                        raise WireError("bad_frame", f"bad chunk after {incoming.received} "
                                                     f"of {declared} bytes")
                    await trio.to_thread.run_sync(incoming.write, data)
                await trio.to_thread.run_sync(incoming.commit)
        finally:
            await close_quietly(stream)
    return declared


__all__ = ["CHUNK", "CHUNK_OVERHEAD", "HEADER_LIMIT", "SHARD", "Sink", "fetch", "parse_request",
           "send_file"]
