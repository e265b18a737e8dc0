"""Fair service: a node's shard runs shared fairly between the peers that ask for them.

A trio ``CapacityLimiter`` is first come, first served: a peer that keeps many requests queued
(one flooding the node at full speed) makes every other peer wait behind all of them. The
``FairLimiter`` orders waiting requests by start-time fair queueing (Goyal, Vin and Cheng,
SIGCOMM 1996) with one unit of cost per request: a request's tag is the later of the tag of the
run that started last and the end of its peer's previous request, and the smallest tag runs
next. A peer that asks now and then is served before the backlog of a peer that floods, so it
waits for about one run in progress, however many requests the flooder keeps queued. Each peer
may keep at most ``per_peer_waiting`` requests queued and the node ``total_waiting`` in all;
beyond that a request is refused at once with a ``busy`` answer naming the limit (``Busy``)
rather than queueing without bound.

trio has no fair (per-key) limiter and no maintained library offers one for trio, hence this
small class.
"""

from __future__ import annotations

import collections
import heapq
import itertools
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import trio

from protocols.wire import WireError

# Why a request was refused busy (the ``reason`` of the error frame and of veilnet_busy_total).
BUSY_REASONS = ("peer_streams", "node_streams", "peer_bytes", "node_bytes", "peer_queue",
                "node_queue", "peer_sessions", "node_sessions", "session_running")


class Busy(WireError):
    """``busy``: a limit that protects other peers' service was reached. The error frame says
    which (``reason``, one of ``BUSY_REASONS``) and when to retry (``retry_after``, seconds)."""

    def __init__(self, reason: str, message: str, retry_after: float = 1.0) -> None:
        if reason not in BUSY_REASONS:
            raise ValueError(f"unknown busy reason {reason!r}")
        super().__init__("busy", message)
        self.reason = reason
        self.retry_after = retry_after

    def to_message(self, request_id: str | None = None) -> dict[str, Any]:
        message = super().to_message(request_id)
        message["error"] |= {"reason": self.reason, "retry_after": self.retry_after}
        return message


class FairLimiter:
    """``total`` run slots shared by start-time fair queueing (see the module docstring)."""

    def __init__(self, total: int, per_peer_waiting: int, total_waiting: int) -> None:
        if total < 1:
            raise ValueError("a limiter needs at least one slot")
        self.total = total
        self.per_peer_waiting = per_peer_waiting
        self.total_waiting = total_waiting
        self._running = 0
        self._heap: list[tuple[int, int, str, trio.Event]] = []  # (tag, arrival, peer, grant)
        self._per_peer: collections.Counter[str] = collections.Counter()  # waiting, by peer
        self._finish: dict[str, int] = {}  # the tag after each peer's last request
        self._now = 0  # the tag of the request that started last (the "virtual time")
        self._arrivals = itertools.count()
        self._admitted: collections.Counter[str] = collections.Counter()  # by peer (admit)
        self._room: dict[str, trio.Event] = {}  # set when a peer's admitted count drops

    @property
    def running(self) -> int:
        return self._running

    @property
    def waiting(self) -> int:
        return len(self._heap)

    async def admit(self, peer: str) -> None:
        """Wait until ``peer`` has fewer than ``per_peer_waiting`` requests admitted, then admit
        one more (``unadmit`` when it is answered). The node admits a request before it reads
        its body: the requests of a peer over its share are not read at all (its streams
        wait, as TCP and yamux flow control make its sender wait) instead of being refused
        ``busy`` as fast as it can send them, which would keep the node's event loop busy
        decoding and refusing its frames."""
        while self._admitted[peer] >= self.per_peer_waiting:
            room = self._room.get(peer)
            if room is None:
                room = self._room[peer] = trio.Event()
            await room.wait()
        self._admitted[peer] += 1

    def unadmit(self, peer: str) -> None:
        self._admitted[peer] -= 1
        if not self._admitted[peer]:
            del self._admitted[peer]
        room = self._room.pop(peer, None)
        if room is not None:
            room.set()  # every waiter looks again; one gets the place

    @asynccontextmanager
    async def slot(self, peer: str) -> AsyncIterator[None]:
        """Hold one run slot for ``peer``'s request; ``Busy`` at once if it may not wait."""
        await self._acquire(peer)
        try:
            yield
        finally:
            self._release()

    def _tag(self, peer: str) -> int:
        tag = max(self._now, self._finish.get(peer, 0))
        self._finish[peer] = tag + 1
        if len(self._finish) > 4 * (self.total_waiting + self.total):  # forget idle peers:
            self._finish = {p: t for p, t in self._finish.items() if t > self._now}
        return tag

    async def _acquire(self, peer: str) -> None:
        if self._running < self.total and not self._heap:
            self._running += 1
            self._now = self._tag(peer)
            await trio.lowlevel.checkpoint()
            return
        if self._per_peer[peer] >= self.per_peer_waiting:
            raise Busy("peer_queue", f"{self.per_peer_waiting} of your requests are already "
                                     "waiting at this node, its limit per peer; retry later or "
                                     "use another node")
        if len(self._heap) >= self.total_waiting:
            raise Busy("node_queue", f"{len(self._heap)} requests are already waiting; retry "
                                     "later or use another node")
        entry = (self._tag(peer), next(self._arrivals), peer, trio.Event())
        heapq.heappush(self._heap, entry)
        self._per_peer[peer] += 1
        try:
            await entry[3].wait()
        except BaseException:
            if entry[3].is_set():  # the slot was handed over as this waiter was cancelled
                self._release()
            else:
                self._heap.remove(entry)
                heapq.heapify(self._heap)
                self._left(peer)
            raise

    def _left(self, peer: str) -> None:
        self._per_peer[peer] -= 1
        if not self._per_peer[peer]:
            del self._per_peer[peer]

    def _release(self) -> None:
        """Free a slot: hand it to the waiting request with the smallest tag, if any."""
        if not self._heap:
            self._running -= 1
            return
        tag, _, peer, granted = heapq.heappop(self._heap)
        self._left(peer)
        self._now = max(self._now, tag)
        granted.set()  # the slot passes on: ``_running`` stays the same
