"""The node's side of ``/veilnet/session/1``: open, step and close sessions that keep a decoder
shard's KV cache on the node (messages in protocols/session.py, limits in node/sessions.py).

``NodeService`` serves the protocol's streams with its usual plumbing (stream and byte limits,
timeouts, error frames, several requests per stream) and hands each request to
``SessionService.handle``. A session runs its shard through the node's ``ShardExecutor``
(onnxruntime in worker threads behind the capacity limiter); its calls run one at a time. The
cache is stored exactly as the shard produced it: nothing here depends on the weights being
plaintext.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np
import trio
from libp2p.abc import INetStream

from crypto.identity import Identity
from node.byzantine import Byzantine
from node.executor import ShardExecutor
from node.metrics import NodeMetrics
from node.recorder import ReceivedRecorder
from node.sessions import Session, SessionLimits, SessionTable
from protocols.session import (
    SESSION,
    CloseRequest,
    KVCacheError,
    OpenRequest,
    SessionIO,
    StepRequest,
    answer,
    check_session_inputs,
    close_answer,
    parse_request,
    session_io,
)
from protocols.transport import remote_peer
from protocols.wire import WireError, write_frame

log = logging.getLogger("veilnet.node")
MAX_SWEEP_INTERVAL = 10.0  # seconds between background sweeps for expired sessions


class SessionService:
    def __init__(self, identity: Identity, executor: ShardExecutor, metrics: NodeMetrics,
                 limits: SessionLimits | None = None,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.identity = identity
        self.executor = executor
        self.metrics = metrics
        self.table = SessionTable(limits, clock, on_end=self._ended)
        self.byzantine: Byzantine | None = None  # --byzantine-test-mode: lie in answers too
        self.recorder: ReceivedRecorder | None = None  # --record-received: what clients send
        # per (shard CID, deployment CID): the shard split by its manifest's kv_cache, and the
        # model's context length (None when the manifest gives none)
        self._io: dict[tuple[str, str], tuple[SessionIO, int | None]] = {}

    # -- serving --------------------------------------------------------------------------------

    async def handle(self, stream: INetStream, message: dict[str, Any]) -> None:
        """One request of a session stream (envelope checked); raises WireError before it
        writes anything."""
        await write_frame(stream, await self.serve(remote_peer(stream), message))

    async def serve(self, peer: str, message: dict[str, Any]) -> dict[str, Any]:
        """The answer to ``peer``'s request ``message``; raises WireError."""
        request = parse_request(message, message["id"])
        try:
            if isinstance(request, CloseRequest):
                self.table.close(peer, request.session)
                return close_answer(request)
            if isinstance(request, OpenRequest):
                return await self._open(peer, request)
            return await self._step(peer, request)
        finally:
            self._update_gauges()

    async def _open(self, peer: str, request: OpenRequest) -> dict[str, Any]:
        io, context_length = await self._session_io(request.shard)
        batch, tokens = check_session_inputs(io, request.inputs)
        self.table.check_room(batch, 0, tokens, context_length)
        session = self.table.open(peer, request.shard, io, batch, context_length)
        try:
            await self._record(peer, "open", request.id, session, request.inputs)
            outputs, cache = await self._run(session, request.inputs, io.empty_cache(batch),
                                             tokens)
        except BaseException:
            self.table.fail(session)
            raise
        self.table.commit(session, cache, tokens)
        self.metrics.session_steps.labels("open").inc()
        return answer(self.identity, request, shard=session.shard, session=session.id,
                      position_before=0, position=tokens, outputs=outputs)

    async def _step(self, peer: str, request: StepRequest) -> dict[str, Any]:
        session = self.table.acquire(peer, request.session)
        try:
            before = session.position
            if request.position is not None and request.position != before:
                raise WireError("bad_position", f"session {session.id} is at position {before}, "
                                                f"not {request.position}")
            batch, tokens = check_session_inputs(session.io, request.inputs)
            if batch != session.batch:
                raise WireError("bad_inputs", f"batch {batch}; this session was opened with "
                                              f"batch {session.batch}")
            self.table.check_room(batch, before, tokens, session.context_length)
            await self._record(peer, "step", request.id, session, request.inputs)
            outputs, cache = await self._run(session, request.inputs, session.cache, tokens)
            self.table.commit(session, cache, before + tokens)
        finally:
            self.table.release(session)
        self.metrics.session_steps.labels("step").inc()
        return answer(self.identity, request, shard=session.shard, session=session.id,
                      position_before=before, position=before + tokens, outputs=outputs)

    async def _record(self, peer: str, op: str, request_id: str, session: Session,
                      inputs: Mapping[str, np.ndarray]) -> None:
        if self.recorder is not None:
            await self.recorder.record(protocol=str(SESSION), op=op, request_id=request_id,
                                       shard=session.shard, peer=peer, inputs=inputs,
                                       session=session.id)

    async def _run(self, session: Session, inputs: Mapping[str, np.ndarray],
                   past: Mapping[str, np.ndarray], tokens: int,
                   ) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
        """Run the session's shard on ``inputs`` after ``past``: (non-cache outputs, the next
        cache), the cache checked to have grown by ``tokens``."""
        started = time.perf_counter()
        outputs = await self.executor.run(session.shard, {**inputs, **past}, session.peer)
        self.metrics.run_time.observe(time.perf_counter() - started)
        visible, cache = session.io.split_outputs(outputs)
        length = session.io.cache_length(cache)
        if length != session.position + tokens:
            raise WireError("run_failed", f"the shard returned a cache of {length} tokens, "
                                          f"expected {session.position} + {tokens}")
        if self.byzantine is not None:  # test mode: a wrong answer, signed as if right (the
            # cache stays true, so the node keeps lying about correct state)
            visible = await self.byzantine.corrupt(session.shard, inputs, visible, [],
                                                   self.executor.run)
        return visible, cache

    async def _session_io(self, cid: str) -> tuple[SessionIO, int | None]:
        stored = self.executor.lookup(cid)  # unknown_shard, corrupt_shard
        key = (cid, stored.deployment)
        if key not in self._io:
            manifest = await trio.to_thread.run_sync(self.executor.store.load_manifest,
                                                     stored.deployment)
            try:
                io = session_io(stored.spec, manifest.extra.get("kv_cache"))
            except KVCacheError as exc:
                raise WireError("unsupported", str(exc)) from None
            config = manifest.extra.get("config")
            length = config.get("context_length") if isinstance(config, dict) else None
            valid = isinstance(length, int) and not isinstance(length, bool) and length > 0
            self._io[key] = (io, length if valid else None)
        return self._io[key]

    # -- expiry and status ----------------------------------------------------------------------

    async def expire_loop(self) -> None:
        """Drop expired sessions in the background (they are also dropped lazily on every
        request), so an idle node frees their caches."""
        interval = min(max(self.table.limits.idle_expiry / 4, 0.05), MAX_SWEEP_INTERVAL)
        while True:
            await trio.sleep(interval)
            if self.table.sweep():
                self._update_gauges()

    def _ended(self, reason: str) -> None:
        self.metrics.sessions_ended.labels(reason).inc()
        if reason == "expired":
            log.info("a session expired after %g s idle", self.table.limits.idle_expiry)

    def _update_gauges(self) -> None:
        self.metrics.sessions_open.set(len(self.table))
        self.metrics.session_cache_bytes.set(self.table.cache_bytes())

    def status(self) -> dict[str, Any]:
        """Open sessions and the limits, for the HTTP API."""
        limits = self.table.limits
        return {"open": len(self.table), "max_sessions": limits.max_sessions,
                "max_context": limits.max_context, "idle_expiry_s": limits.idle_expiry,
                "cache_bytes": self.table.cache_bytes()}


__all__ = ["SessionService"]
