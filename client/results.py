"""What a query returns: one ``HopRecord`` per node-shard hop, ``EmbedResult`` for ``embed``, and
``QueryError`` when there is no answer to return."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from client.receipts import LedgerReceipt, PendingReceipt
from errors import UnavailableError
from models import ShardSpec
from protocols.infer import InferReply
from protocols.peers import PeerRecord


class QueryError(UnavailableError, RuntimeError):
    """A query that could not be answered; the message says which hop and why."""


@dataclass(frozen=True)
class HopRecord:
    """How one node-shard hop was served. Every hop's receipt signature was verified with the
    key of the PeerID the client reached before the hop was accepted."""

    shard_index: int
    shard_cid: str
    node_did: str
    peer_id: str
    latency_ms: float
    request_id: str
    input_digest: str
    output_digest: str
    signature: str
    attempts: int  # nodes that answered this hop plus nodes that failed it
    failures: tuple[str, ...] = ()  # "<peer id>: <reason>", one line each, never empty
    verdict: dict[str, Any] | None = None  # replicated hops: who agreed, who lost (consensus)
    verified: bool = False  # the answer won a verdict among two or more nodes
    unverified_reason: str | None = None  # why not, when it did not

    @classmethod
    def of(cls, shard: ShardSpec, node: PeerRecord, reply: InferReply, latency_ms: float,
           **rest: Any) -> HopRecord:
        """The record of ``node``'s checked ``reply`` for ``shard``; ``rest`` sets the other
        fields (attempts defaults to 1)."""
        return cls(shard_index=shard.index, shard_cid=shard.cid, node_did=node.did,
                   peer_id=node.peer_id, latency_ms=round(latency_ms, 3),
                   request_id=reply.request_id, input_digest=reply.input_digest.hex(),
                   output_digest=reply.output_digest.hex(), signature=reply.signature.hex(),
                   **{"attempts": 1, **rest})

    def to_json(self) -> dict[str, Any]:
        doc = asdict(self)
        doc["failures"] = list(self.failures)
        return doc


@dataclass(frozen=True)
class EmbedResult:
    embeddings: np.ndarray
    hops: list[HopRecord]
    receipt: LedgerReceipt | None = None  # the query's logged receipt
    receipt_error: str | None = None      # why there is none (no ledger node, logging failed)
    # logged, but the witness cosignatures were late: the index and where to fetch the proof
    receipt_pending: PendingReceipt | None = None

    @property
    def verified(self) -> bool:
        """Every hop's answer won a verdict among two or more nodes."""
        return all(h.verified for h in self.hops)


__all__ = ["EmbedResult", "HopRecord", "QueryError"]
