"""Queries in CKKS mode: the client encrypts the head's output with its own TenSEAL context
(keeping the secret key), a node evaluates its shard on the ciphertexts, the client decrypts.

Used by ``AsyncClient.run_ckks`` for deployments whose node shard is a square-activation MLP
(``veilnet model import digits``). One node shard only; hops are not replicated (a node's CKKS
outputs are fresh ciphertexts, comparable only after decryption), so a hop goes to the best
node the ``Router`` plans and, when it fails, to the next; failures demote a node as in every
mode. TenSEAL is loaded when this module is.
"""

from __future__ import annotations

import numpy as np
import trio

from client.caller import InferCaller
from client.health import describe
from client.results import HopRecord, QueryError
from client.router import Router
from crypto.ckks import (
    CkksError,
    decrypt_columns,
    encrypt_columns,
    new_context,
    public_context_bytes,
)
from models import Pipeline, ShardSpec
from models.pipeline import Tensors
from protocols.transport import PEER_ERRORS


class CkksSession:
    """One client's CKKS context (secret key inside; only the public part is ever sent)."""

    def __init__(self) -> None:
        self.context = new_context()
        self.public = public_context_bytes(self.context)


async def run_ckks(caller: InferCaller, router: Router, pipeline: Pipeline,
                   session: CkksSession, inputs: Tensors, hop_timeout: float,
                   ) -> tuple[Tensors, list[HopRecord]]:
    """Model inputs -> (model outputs, the one HopRecord); raises QueryError."""
    roles = [s.role for s in pipeline.manifest.shards]
    if roles != ["client-head", "node", "client-tail"]:
        raise QueryError("CKKS mode runs deployments with exactly one node shard")
    hops: list[HopRecord] = []

    async def node_hop(shard: ShardSpec, feeds: Tensors) -> Tensors:
        (feed,) = feeds.values()
        ciphertexts = await trio.to_thread.run_sync(encrypt_columns, session.context, feed)
        failures: list[str] = []
        for attempt, node in enumerate(router.plan(shard.cid), 1):
            try:
                with trio.fail_after(hop_timeout):
                    outputs, reply = await caller.call_ckks(node, shard, session.public,
                                                            ciphertexts)
                logits = await trio.to_thread.run_sync(decrypt_columns, session.context,
                                                       outputs, feed.shape[0])
            except PEER_ERRORS as exc:  # CkksError (an output that does not decrypt) included
                reason = describe(exc, hop_timeout)
                failures.append(f"{node.peer_id}: {reason}")
                router.failed(node.peer_id, reason)
                continue
            router.answered(node.peer_id, reply.hop.latency_ms)
            hops.append(HopRecord.of(
                shard, node, reply.answer, reply.hop.latency_ms, attempts=attempt,
                failures=tuple(failures),
                unverified_reason="CKKS mode: one node per hop, not cross-checked"))
            (out_name,) = [t.name for t in shard.outputs]
            return {out_name: logits.astype(np.float32)}
        raise QueryError(f"hop {shard.index} (CKKS): no node answered:"
                         + "".join(f"\n  - {f}" for f in failures)
                         if failures else f"no known node serves shard {shard.cid}")

    async def local(shard: ShardSpec, feeds: Tensors) -> Tensors:
        return await trio.to_thread.run_sync(pipeline.run_local, shard, feeds)

    outputs = await pipeline.run_async(inputs, node_hop, local)
    return outputs, hops


__all__ = ["CkksError", "CkksSession", "run_ckks"]
