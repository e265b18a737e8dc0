"""Queries in CKKS mode: the client encrypts the head's output with its own TenSEAL context
(keeping the secret key), a node evaluates its shard on the ciphertexts, the client decrypts.

Used by ``AsyncClient.run_ckks`` for deployments whose node shard is a square-activation MLP
(``veilnet model import digits``). One node shard only; hops are not replicated (a node's CKKS
outputs are fresh ciphertexts, comparable only after decryption).
"""

from __future__ import annotations

import secrets
import time
from typing import TYPE_CHECKING, Any

import numpy as np
import trio

from client.health import describe
from crypto.ckks import (
    CkksError,
    ciphertexts_digest,
    decrypt_columns,
    encrypt_columns,
    new_context,
    public_context_bytes,
)
from crypto.identity import public_from_peer_id, verify
from node.p2p import ensure_connected
from node.wire import WIRE_VERSION, WireError, receipt_payload

if TYPE_CHECKING:
    from client.async_client import AsyncClient, HopRecord


class CkksSession:
    """One client's CKKS context (secret key inside; only the public part is ever sent)."""

    def __init__(self) -> None:
        self.context = new_context()
        self.public = public_context_bytes(self.context)


async def run_ckks(client: AsyncClient, inputs: dict[str, np.ndarray],
                   ) -> tuple[dict[str, np.ndarray], list[HopRecord]]:
    from client.async_client import HopRecord, QueryError

    pipeline = client._check_open()
    shards = pipeline.manifest.shards
    if [s.role for s in shards] != ["client-head", "node", "client-tail"]:
        raise QueryError("CKKS mode runs deployments with exactly one node shard")
    head, node_shard, tail = shards
    if client._ckks is None:
        client._ckks = await trio.to_thread.run_sync(CkksSession)
    session = client._ckks
    env = dict(inputs)
    env.update(await trio.to_thread.run_sync(
        pipeline.run_local, head, {t.name: env[t.name] for t in head.inputs}))
    (feed,) = [env[t.name] for t in node_shard.inputs]
    n = feed.shape[0]
    ciphertexts = await trio.to_thread.run_sync(encrypt_columns, session.context, feed)
    input_digest = ciphertexts_digest(session.public, ciphertexts)
    if not client.providers(node_shard.cid):
        await client.refresh()
    failures: list[str] = []
    for attempt, record in enumerate(client.plan(node_shard.cid), 1):
        request_id = secrets.token_hex(16)
        started = time.perf_counter()
        try:
            with trio.fail_after(client.hop_timeout):
                peer = await ensure_connected(client._host, record.peer_id, record.addrs,
                                              client.connect_timeout)
                response = await client._infer(peer, {
                    "v": WIRE_VERSION, "id": request_id, "shard": node_shard.cid,
                    "encryption": "ckks", "context": session.public,
                    "ciphertexts": ciphertexts})
            outputs = _check(response, request_id, node_shard.cid, input_digest, session,
                             record.peer_id)
            logits = await trio.to_thread.run_sync(decrypt_columns, session.context, outputs, n)
        except (Exception, trio.TooSlowError) as exc:
            reason = describe(exc, client.hop_timeout)
            failures.append(f"{record.peer_id}: {reason}")
            client.mark_failed(record.peer_id, reason)
            continue
        latency_ms = (time.perf_counter() - started) * 1e3
        client.health.succeeded(record.peer_id, latency_ms)
        (out_name,) = [t.name for t in node_shard.outputs]
        env[out_name] = logits.astype(np.float32)
        env.update(await trio.to_thread.run_sync(
            pipeline.run_local, tail, {t.name: env[t.name] for t in tail.inputs}))
        hop = HopRecord(
            shard_index=node_shard.index, shard_cid=node_shard.cid, node_did=record.did,
            peer_id=record.peer_id, latency_ms=round(latency_ms, 3), request_id=request_id,
            input_digest=input_digest.hex(), output_digest=response["output_digest"].hex(),
            signature=response["signature"].hex(), signature_verified=True, attempts=attempt,
            failures=tuple(failures),
            unverified_reason="CKKS mode: one node per hop, not cross-checked")
        return {t.name: env[t.name] for t in pipeline.manifest.outputs}, [hop]
    raise QueryError(f"hop {node_shard.index} (CKKS): no node answered:"
                     + "".join(f"\n  - {f}" for f in failures)
                     if failures else f"no known node serves shard {node_shard.cid}")


def _check(response: dict[str, Any], request_id: str, shard: str, input_digest: bytes,
           session: CkksSession, peer_id: str) -> list[bytes]:
    if response.get("id") != request_id or response.get("shard") != shard:
        raise WireError("bad_response", "the response is for another request or shard")
    outputs = response.get("ciphertexts")
    if not isinstance(outputs, list) or not all(isinstance(c, bytes) for c in outputs):
        raise WireError("bad_response", "'ciphertexts' must be a list of bytes")
    if response.get("input_digest") != input_digest:
        raise WireError("bad_response", "the node signed a different input digest")
    output_digest = ciphertexts_digest(session.public, outputs)
    if response.get("output_digest") != output_digest:
        raise WireError("bad_response", "the output digest does not match the ciphertexts")
    signature = response.get("signature")
    if not isinstance(signature, bytes) or not verify(
            public_from_peer_id(peer_id), signature,
            receipt_payload(request_id, shard, input_digest, output_digest)):
        raise WireError("bad_signature", "the node's signature does not verify")
    return outputs


__all__ = ["CkksError", "CkksSession", "run_ckks"]
