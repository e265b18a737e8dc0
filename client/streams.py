"""Pooled request streams (/veilnet/infer/1, /veilnet/session/1): one exchange per call, on an
idle stream of the same protocol when there is one (saving the stream negotiation), on a new
stream otherwise.

Idle streams are reused for ``STREAM_REUSE_S`` seconds (nodes close them after 30 s,
``idle_timeout``). A reused stream that the node has closed meanwhile is replaced once; a stream
is pooled again only after a clean answer.
"""

from __future__ import annotations

import logging
import time
from typing import Any

from libp2p.abc import IHost
from libp2p.custom_types import TProtocol
from libp2p.peer.id import ID

from protocols.infer import INFER
from protocols.transport import STREAM_ERRORS, close_quietly, exchange, open_stream
from protocols.wire import WireError

log = logging.getLogger("veilnet.client")
STREAM_REUSE_S = 20.0
MAX_IDLE_STREAMS = 4


class StreamPool:
    """Idle streams per peer and protocol, for one libp2p host."""

    def __init__(self, host: IHost, frame_limit: int) -> None:
        self.host, self.frame_limit = host, frame_limit
        self._idle: dict[str, list[tuple[Any, float]]] = {}  # 'peer protocol' -> (stream, since)

    async def infer(self, peer: ID, message: dict[str, Any]) -> dict[str, Any]:
        """One infer request to ``peer`` and its response frame (the caller bounds the time);
        raises WireError, RemoteError or the transport's errors."""
        return await self.request(peer, INFER, message)

    async def request(self, peer: ID, protocol: TProtocol,
                      message: dict[str, Any]) -> dict[str, Any]:
        """One request on ``protocol`` to ``peer`` and its response frame, as ``infer``."""
        idle = self._idle.setdefault(f"{peer} {protocol}", [])
        while idle:
            stream, since = idle.pop()
            if time.monotonic() - since < STREAM_REUSE_S:
                try:
                    response = await exchange(stream, message, self.frame_limit)
                except (WireError, *STREAM_ERRORS) as exc:
                    log.debug("reused stream to %s failed (%s); opening a new one", peer, exc)
                    await close_quietly(stream)
                    continue
                except BaseException:
                    await close_quietly(stream)
                    raise
                idle.append((stream, time.monotonic()))
                return response
            await close_quietly(stream)
        stream = await open_stream(self.host, peer, protocol)
        try:
            response = await exchange(stream, message, self.frame_limit)
        except BaseException:
            await close_quietly(stream)
            raise
        if len(idle) < MAX_IDLE_STREAMS:
            idle.append((stream, time.monotonic()))
        else:
            await close_quietly(stream)
        return response


__all__ = ["MAX_IDLE_STREAMS", "STREAM_REUSE_S", "StreamPool"]
