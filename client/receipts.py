"""Inference receipts in the ledger: what the client logs after a query, and the proof it gets.

After a query the client signs an ``infer-receipt/1`` entry (docs/ledger.md) naming the
deployment, and for each hop the shard, the node, the request id, both digests and the node's
signature (after a generation, one ``generate-receipt/1`` entry with each hop's step chain);
it submits the entry to a ledger node over ``/veilnet/ledger/1`` and waits until the entry's
checkpoint carries the log's signature and ``quorum`` witness cosignatures. The result, a
``LedgerReceipt``, verifies offline with the log's verifier key and the witnesses' keys.

Two failures differ: the entry was never logged (``ReceiptError``), or it was logged at an
index and only the witness cosignatures were late (``ReceiptPending``, carrying a
``PendingReceipt`` with the index, from which the proof can be fetched later). The requests
themselves are ``protocols.ledger``'s.
"""

from __future__ import annotations

import secrets
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import trio
from libp2p.abc import IHost

from crypto.identity import Identity
from errors import UnavailableError
from ledger.checkpoint import Checkpoint
from ledger.entries import make_entry
from ledger.note import NoteError, parse_verifier_key
from ledger.tlog_proof import verify_proof
from protocols import ledger as ledger_proto
from protocols.transport import PEER_ERRORS, error_text
from registry.card import CardInfo

# Waiting for the witnesses' cosignatures: the first proof request usually comes before the
# ledger node's offer to its witnesses is answered (a few ms on loopback), so the client asks
# again soon and then less often. A fixed 100 ms poll made a logged query 144 ms slower at p50
# (bench/e2e.py, receipts_b1).
POLL_FIRST_S = 0.005
POLL_MAX_S = 0.1


class ReceiptError(UnavailableError, RuntimeError):
    """The receipt could not be logged or proven; the message says why."""


@dataclass(frozen=True)
class PendingReceipt:
    """An entry the ledger logged whose checkpoint lacked the witness quorum in time."""

    entry: bytes
    index: int
    leaf_hash: bytes
    log_key: str
    ledger: str                # the ledger node's PeerID
    proof_url: str | None      # where to fetch the tlog-proof later (the node's HTTP API)
    quorum: int
    reason: str                # why no proof was returned (the last check that failed)

    def to_json(self) -> dict[str, Any]:
        return {"index": self.index, "leaf_hash": self.leaf_hash.hex(), "log_key": self.log_key,
                "ledger": self.ledger, "proof_url": self.proof_url, "quorum": self.quorum,
                "reason": self.reason, "entry": self.entry.hex()}


class ReceiptPending(ReceiptError):
    """The entry is logged (``pending.index``); its witness cosignatures are not all in."""

    def __init__(self, pending: PendingReceipt, timeout: float) -> None:
        super().__init__(f"logged at index {pending.index}, witness cosignatures pending: no "
                         f"checkpoint with {pending.quorum} cosignature(s) within {timeout:g} s "
                         f"({pending.reason})")
        self.pending = pending


@dataclass(frozen=True)
class LedgerReceipt:
    entry: bytes               # the signed infer-receipt/1 entry, as logged
    index: int                 # its index in the log
    leaf_hash: bytes
    log_key: str               # the log's C2SP verifier key (from the ledger node's card)
    proof: str                 # C2SP tlog-proof: inclusion proof + cosigned checkpoint
    witness_keys: tuple[str, ...]  # cosignature verifier keys of the witnesses known
    quorum: int                # cosignatures required, and present, when it was returned

    def verify(self) -> Checkpoint:
        """Check the receipt offline: log signature, witness quorum, inclusion of the entry."""
        return verify_proof(self.proof, self.entry, parse_verifier_key(self.log_key),
                            [parse_verifier_key(k) for k in self.witness_keys], self.quorum)

    def to_json(self) -> dict[str, Any]:
        return {"index": self.index, "leaf_hash": self.leaf_hash.hex(), "log_key": self.log_key,
                "proof": self.proof, "witness_keys": list(self.witness_keys),
                "quorum": self.quorum, "entry": self.entry.hex()}


def receipt_entry(identity: Identity, deployment: str, hops: Sequence[Any],
                  verdict: str | None = None) -> bytes:
    """The signed ``infer-receipt/1`` entry of a query whose node hops are ``hops``
    (``HopRecord`` objects). The verdict defaults to "accepted" when every hop's answer won a
    consensus verdict and "unverified" when the caller accepted a hop no second node checked
    (``allow_unverified``): a receipt never claims more checking than happened."""
    if verdict is None:
        verdict = "accepted" if all(getattr(h, "verified", True) for h in hops) else "unverified"
    return make_entry(identity, "infer-receipt/1", {
        "query": secrets.token_hex(16), "deployment": deployment, "verdict": verdict,
        "hops": [{"index": h.shard_index, "shard": h.shard_cid, "node": h.node_did,
                  "id": h.request_id, "input_digest": bytes.fromhex(h.input_digest),
                  "output_digest": bytes.fromhex(h.output_digest),
                  "signature": bytes.fromhex(h.signature),
                  **({"verdict": h.verdict} if h.verdict else {})} for h in hops],
    })


def generation_entry(identity: Identity, deployment: str, hops: Sequence[Any],
                     prompt_tokens: int, tokens: int) -> bytes:
    """The signed ``generate-receipt/1`` entry of a generation whose node hops are ``hops``
    (``SessionHopRecord``): per hop the nodes that held its session, the step count, the chain
    digest over every accepted step and the last step as the node signed it (docs/ledger.md).
    The entry's size does not grow with the number of tokens."""
    verdict = "accepted" if all(h.verified for h in hops) else "unverified"
    return make_entry(identity, "generate-receipt/1", {
        "generation": secrets.token_hex(16), "deployment": deployment, "verdict": verdict,
        "prompt_tokens": prompt_tokens, "tokens": tokens,
        "hops": [{"index": h.shard_index, "shard": h.shard_cid, "node": h.node_did,
                  "nodes": list(h.node_dids), "steps": h.steps, "replays": h.replays,
                  "chain": bytes.fromhex(h.chain),
                  "last": {"id": h.request_id, "session": h.session,
                           "position": h.position_before,
                           "input_digest": bytes.fromhex(h.input_digest),
                           "output_digest": bytes.fromhex(h.output_digest),
                           "signature": bytes.fromhex(h.signature)}} for h in hops],
    })


def score_report_entry(identity: Identity, report: dict[str, dict[str, Any]]) -> bytes:
    """The signed ``score-report/1`` entry of this client's reputation view (node did ->
    score, agreement, latency_ms, availability, observations)."""
    return make_entry(identity, "score-report/1", {"scores": report})


async def log_entry(host: IHost, ledger: CardInfo, entry: bytes, witness_keys: Sequence[str],
                    quorum: int, timeout: float) -> LedgerReceipt:
    """Append ``entry`` at the ledger node ``ledger`` and wait for a proof with ``quorum``
    witness cosignatures. Raises ReceiptPending when the entry was logged but no such proof
    came within ``timeout``, and ReceiptError (or the transport's error) when it was not
    logged."""
    if not ledger.ledger_key:
        raise ReceiptError(f"{ledger.peer_id} keeps no ledger")
    if quorum > len(witness_keys):
        raise ReceiptError(f"a quorum of {quorum} needs that many witnesses; "
                           f"{len(witness_keys)} known")
    log_key = ledger.ledger_key
    last_error = "the ledger node did not answer"
    appended: tuple[int, bytes] | None = None
    where = (ledger.peer_id, ledger.multiaddrs)
    poll = POLL_FIRST_S
    with trio.move_on_after(timeout):
        index, leaf = appended = await ledger_proto.append(host, *where, entry, timeout)
        last_error = "the ledger node returned no proof yet"
        while True:
            try:
                proof = await ledger_proto.fetch_proof(host, *where, index, timeout)
            except PEER_ERRORS as exc:  # logged already: keep asking until the time is up
                last_error = f"{type(exc).__name__}: {error_text(exc)}"
                proof = None
            if proof is not None:
                receipt = LedgerReceipt(entry, index, leaf, log_key, proof, tuple(witness_keys),
                                        quorum)
                try:
                    receipt.verify()
                    return receipt
                except (NoteError, ValueError) as exc:
                    last_error = str(exc)
            await trio.sleep(poll)
            poll = min(2 * poll, POLL_MAX_S)
    if appended is not None:
        url = f"{ledger.http.rstrip('/')}/ledger/proof?index={appended[0]}" if ledger.http \
            else None
        raise ReceiptPending(PendingReceipt(entry, appended[0], appended[1], log_key,
                                            ledger.peer_id, url, quorum, last_error), timeout)
    raise ReceiptError(f"not logged: the ledger node {ledger.peer_id} did not confirm the "
                       f"entry within {timeout:g} s ({last_error})")
