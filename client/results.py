"""What a query returns: one ``HopRecord`` per node-shard hop, ``EmbedResult`` for ``embed``, and
``QueryError`` when there is no answer to return."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
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


@dataclass(frozen=True)
class SessionHopRecord:
    """How one node shard was served over a whole generation (client/session_hop.py): the
    nodes whose sessions answered, the steps, replays after failures, and the verdicts.
    ``chain`` is SHA-256 over ``veilnet-session-chain/1`` followed by the accepted answers'
    input and output digests in step order, so one value stands for every step;
    ``signature`` is the last accepted step's, by ``peer_id``."""

    shard_index: int
    shard_cid: str
    node_did: str  # the node whose answers were used last
    peer_id: str
    nodes: tuple[str, ...]  # every PeerID that held a session for this hop
    node_dids: tuple[str, ...]  # their did:keys, in the same order
    steps: int  # calls: the prefill and one per generated token
    replays: int  # sessions re-opened on another node with the hop's inputs so far
    checks: int  # sessions opened with the hop's inputs so far to check or settle a step
    latency_ms: float  # summed over the steps
    request_id: str
    input_digest: str
    output_digest: str
    signature: str
    chain: str
    session: str = ""  # the last accepted step's session and cache length before it: with the
    position_before: int = 0  # digests and signature, what the node signed (protocols.session)
    failures: tuple[str, ...] = ()
    verdicts: tuple[dict[str, Any], ...] = ()  # decided verdicts with losers (full/spot)
    verified: bool = False  # every step won a verdict among two or more nodes
    unverified_reason: str | None = None

    def to_json(self) -> dict[str, Any]:
        doc = asdict(self)
        for key in ("nodes", "node_dids", "failures", "verdicts"):
            doc[key] = list(doc[key])
        return doc


@dataclass(frozen=True)
class GenerateResult:
    text: str
    token_ids: list[int]  # generated (an end-of-sequence token included when it ended there)
    prompt_token_ids: list[int]
    finish_reason: str  # "stop" (end of sequence or a stop string), "length", "cancelled"
    hops: list[SessionHopRecord]
    time_to_first_token_s: float | None = None
    decode_ms: list[float] = field(default_factory=list)  # per generated token after the first
    receipt: LedgerReceipt | None = None
    receipt_error: str | None = None
    receipt_pending: PendingReceipt | None = None

    @property
    def verified(self) -> bool:
        return all(h.verified for h in self.hops)

    def to_json(self) -> dict[str, Any]:
        doc: dict[str, Any] = {
            "text": self.text, "token_ids": self.token_ids,
            "prompt_token_ids": self.prompt_token_ids, "finish_reason": self.finish_reason,
            "hops": [h.to_json() for h in self.hops], "verified": self.verified,
            "time_to_first_token_s": self.time_to_first_token_s,
            "decode_ms_p50": float(np.median(self.decode_ms)) if self.decode_ms else None}
        if self.receipt is not None:
            doc["receipt"] = self.receipt.to_json()
        if self.receipt_error:
            doc["receipt_error"] = self.receipt_error
        if self.receipt_pending is not None:
            doc["receipt_pending"] = self.receipt_pending.to_json()
        return doc


__all__ = ["EmbedResult", "GenerateResult", "HopRecord", "QueryError", "SessionHopRecord"]
