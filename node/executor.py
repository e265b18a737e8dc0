"""Run node shards with onnxruntime in worker threads, ``capacity`` at a time.

Sessions are created on first use and cached by CID. Runs are shared between the peers that ask
for them by fair queueing (node/fair.py): a peer flooding the node waits behind everyone else,
not the other way round. A peer with ``peer_queue_limit`` requests waiting, or a node with
``queue_limit``, gets ``busy`` instead of queueing without bound.

Before a shard's session is created its file is hashed (in the worker thread) and compared with
its CID: a file that rotted on disk would otherwise make the node sign wrong answers. A mismatch
is refused loudly: an ERROR log line naming the file and both CIDs, ``on_corrupt`` (the daemon
counts it in /metrics and republishes its card), the store stops listing and serving the shard,
and the requester gets ``corrupt_shard``.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from typing import NoReturn

import numpy as np
import trio

from models import ShardInputError, ShardSession, cid_of_file
from models.runtime import check_inputs
from node.fair import FairLimiter
from node.store import ShardStore, StoredShard
from protocols.wire import WireError

log = logging.getLogger("veilnet.node")


class ShardExecutor:
    def __init__(self, store: ShardStore, capacity: int = 1, threads: int | None = None,
                 queue_limit: int = 32, peer_queue_limit: int = 4, spin: bool = False,
                 on_corrupt: Callable[[str], None] | None = None) -> None:
        self.store = store
        self.spin = spin  # off by default: a node shares its cores with other processes
        self.capacity = capacity
        self.fair = FairLimiter(capacity, peer_queue_limit, queue_limit)
        self.threads = threads
        self.on_corrupt = on_corrupt  # called with the CID of a shard found corrupt
        self._sessions: dict[str, ShardSession] = {}
        self._verified: set[str] = set()  # shards whose file was hashed by verified()
        self._loading = trio.Lock()

    def loaded(self) -> list[str]:
        return sorted(self._sessions)

    def lookup(self, cid: str) -> StoredShard:
        shard = self.store.shards().get(cid)
        if shard is None:
            if self.store.is_corrupt(cid):
                raise _corrupt_error(cid)
            raise WireError("unknown_shard", f"this node does not serve shard {cid}")
        return shard

    async def verified(self, cid: str) -> StoredShard:
        """``lookup``, with the file checked against its CID once (for code that reads the
        shard file itself rather than through a session, such as CKKS mode)."""
        shard = self.lookup(cid)
        if cid not in self._verified and cid not in self._sessions:
            actual = await trio.to_thread.run_sync(cid_of_file, shard.path)
            if actual != cid:
                self._refuse(shard, actual)
            self._verified.add(cid)
        return shard

    async def session(self, cid: str) -> ShardSession:
        if cid in self._sessions:
            return self._sessions[cid]
        shard = self.lookup(cid)
        async with self._loading:
            if cid not in self._sessions:
                actual, session = await trio.to_thread.run_sync(self._load, shard)
                if session is None:
                    self._refuse(shard, actual)
                self._sessions[cid] = session
        return self._sessions[cid]

    def _load(self, shard: StoredShard) -> tuple[str, ShardSession | None]:
        """In a worker thread: hash the file, and only if it matches its CID load it."""
        actual = cid_of_file(shard.path)
        if actual != shard.spec.cid:
            return actual, None
        return actual, ShardSession(shard.path, shard.spec, self.threads, self.spin)

    def _refuse(self, shard: StoredShard, actual: str) -> NoReturn:
        cid = shard.spec.cid
        log.error("CORRUPT SHARD %s: expected CID %s, the file hashes to %s; this node no "
                  "longer serves it (reinstall it with `veilnet node add-shards` or "
                  "POST /v1/shards/fetch; `veilnet node check` verifies the data directory)",
                  shard.path, cid, actual)
        self.store.mark_corrupt(cid)
        if self.on_corrupt is not None:
            self.on_corrupt(cid)
        raise _corrupt_error(cid)

    async def run(self, cid: str, feeds: Mapping[str, np.ndarray],
                  peer: str = "") -> dict[str, np.ndarray]:
        """Run shard ``cid`` on ``feeds`` for ``peer`` (its PeerID; fair queueing is by peer)."""
        session = await self.session(cid)
        try:  # before queueing: a request that cannot run must not wait for the limiter
            check_inputs(session.spec, feeds)
        except ShardInputError as exc:
            raise WireError("bad_inputs", str(exc)) from None
        async with self.fair.slot(peer):
            return await trio.to_thread.run_sync(self._run_sync, session, dict(feeds))

    @staticmethod
    def _run_sync(session: ShardSession, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        try:
            return session.run(feeds, check=False)
        except Exception as exc:  # onnxruntime raises its own types for shape mismatches etc.
            first_line = (str(exc).splitlines() or [type(exc).__name__])[0][:300]
            raise WireError("run_failed", f"onnxruntime: {first_line}") from None


def _corrupt_error(cid: str) -> WireError:
    return WireError("corrupt_shard", f"this node's copy of shard {cid} does not match its CID "
                                      "(damaged on disk); it no longer serves it: use another "
                                      "node")
