"""``InferCaller``: one node's checked answer for one hop, over a pooled infer stream.

It dials the node unless a connection is open, sends the request on an idle
``/veilnet/infer/1`` stream when there is one (client/streams.py), and checks the response with
``protocols.infer`` (ids, digests, outputs, fingerprint, signatures) before anything uses it. A
failure raises (``WireError``, ``RemoteError``, the transport's errors); the hop runners decide
what a failure means.
"""

from __future__ import annotations

import secrets
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
from libp2p.abc import IHost

from client.results import HopRecord
from client.streams import StreamPool
from models import ShardSpec
from protocols.infer import (
    CkksRequest,
    InferReply,
    InferRequest,
    MaskSeed,
    check_ckks_reply,
    check_reply,
)
from protocols.peers import PeerRecord
from protocols.transport import ensure_connected


@dataclass(frozen=True)
class Reply:
    """One node's checked answer for one hop."""

    node: PeerRecord
    hop: HopRecord
    answer: InferReply

    @property
    def outputs(self) -> dict[str, np.ndarray] | None:
        return self.answer.outputs  # None when the node sent only its fingerprint

    @property
    def fingerprint(self) -> dict[str, Any]:
        return self.answer.fingerprint


class InferCaller:
    """Calls ``/veilnet/infer/1`` on nodes from one libp2p host."""

    def __init__(self, host: IHost, frame_limit: int, connect_timeout: float) -> None:
        self.host = host
        self.connect_timeout = connect_timeout
        self.streams = StreamPool(host, frame_limit)

    async def _exchange(self, node: PeerRecord,
                        message: dict[str, Any]) -> tuple[dict[str, Any], float]:
        """The response to ``message`` and its latency in ms (the dial not included)."""
        peer = await ensure_connected(self.host, node.peer_id, node.addrs, self.connect_timeout)
        started = time.perf_counter()
        response = await self.streams.infer(peer, message)
        return response, (time.perf_counter() - started) * 1e3

    async def call(self, node: PeerRecord, shard: ShardSpec, feeds: Mapping[str, np.ndarray],
                   input_digest: bytes, want: str = "outputs") -> Reply:
        """``node``'s checked answer for ``shard`` on ``feeds`` (whose digest is
        ``input_digest``): the outputs, or with ``want="fingerprint"`` only their signed
        fingerprint. The caller bounds the time."""
        request = InferRequest(secrets.token_hex(16), shard.cid, feeds, want)
        response, latency_ms = await self._exchange(node, request.to_message())
        answer = check_reply(response, request, input_digest, node.peer_id, shard)
        return Reply(node, HopRecord.of(shard, node, answer, latency_ms), answer)

    async def call_seeded(self, node: PeerRecord, shard: ShardSpec,
                          seeds: Mapping[str, MaskSeed], input_digest: bytes) -> Reply:
        """``node``'s checked outputs for ``shard`` run on masks it draws from ``seeds``
        (masked/1); ``input_digest`` is the digest of those masks, which the caller draws too."""
        request = InferRequest(secrets.token_hex(16), shard.cid, {}, "outputs", seeds)
        response, latency_ms = await self._exchange(node, request.to_message())
        answer = check_reply(response, request, input_digest, node.peer_id, shard)
        return Reply(node, HopRecord.of(shard, node, answer, latency_ms), answer)

    async def call_ckks(self, node: PeerRecord, shard: ShardSpec, context: bytes,
                        ciphertexts: list[bytes]) -> tuple[list[bytes], Reply]:
        """``node``'s checked output ciphertexts for ``shard`` on CKKS ``ciphertexts`` under the
        public ``context``."""
        request = CkksRequest(secrets.token_hex(16), shard.cid, context, ciphertexts)
        response, latency_ms = await self._exchange(node, request.to_message())
        outputs, answer = check_ckks_reply(response, request, node.peer_id)
        return outputs, Reply(node, HopRecord.of(shard, node, answer, latency_ms), answer)


__all__ = ["InferCaller", "Reply"]
