"""Run node shards with onnxruntime in worker threads, behind a capacity limiter.

Sessions are created on first use and cached by CID. A request that would wait behind more than
``queue_limit`` others is refused with ``busy`` instead of queueing without bound.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
import trio

from models import ShardInputError, ShardSession
from models.runtime import check_inputs
from node.store import ShardStore, StoredShard
from node.wire import WireError


class ShardExecutor:
    def __init__(self, store: ShardStore, capacity: int = 1, threads: int | None = None,
                 queue_limit: int = 32, spin: bool = False) -> None:
        self.store = store
        self.spin = spin  # off by default: a node shares its cores with other processes
        self.limiter = trio.CapacityLimiter(capacity)
        self.threads = threads
        self.queue_limit = queue_limit
        self._sessions: dict[str, ShardSession] = {}
        self._loading = trio.Lock()
        self._waiting = 0

    def loaded(self) -> list[str]:
        return sorted(self._sessions)

    def lookup(self, cid: str) -> StoredShard:
        shard = self.store.shards().get(cid)
        if shard is None:
            raise WireError("unknown_shard", f"this node does not serve shard {cid}")
        return shard

    async def session(self, cid: str) -> ShardSession:
        if cid in self._sessions:
            return self._sessions[cid]
        shard = self.lookup(cid)
        async with self._loading:
            if cid not in self._sessions:
                self._sessions[cid] = await trio.to_thread.run_sync(
                    ShardSession, shard.path, shard.spec, self.threads, self.spin)
        return self._sessions[cid]

    async def run(self, cid: str, feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        session = await self.session(cid)
        try:  # before queueing: a request that cannot run must not wait for the limiter
            check_inputs(session.spec, feeds)
        except ShardInputError as exc:
            raise WireError("bad_inputs", str(exc)) from None
        if self._waiting >= self.queue_limit:
            raise WireError("busy", f"{self._waiting} requests are already waiting; retry later "
                                    "or use another node")
        self._waiting += 1
        try:
            return await trio.to_thread.run_sync(self._run_sync, session, dict(feeds),
                                                 limiter=self.limiter)
        finally:
            self._waiting -= 1

    @staticmethod
    def _run_sync(session: ShardSession, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        try:
            return session.run(feeds, check=False)
        except Exception as exc:  # onnxruntime raises its own types for shape mismatches etc.
            first_line = (str(exc).splitlines() or [type(exc).__name__])[0][:300]
            raise WireError("run_failed", f"onnxruntime: {first_line}") from None
