"""The ledger nodes and witnesses a client knows, and what it logs there after a query.

A client learns ledger nodes (cards naming a ledger key) and witnesses (cards naming a witness
key) from the verified agent cards of its bootstrap nodes (``learn``). With them it logs a
query's signed receipt with a witnessed proof (``log_receipt``), appends its score report
(``publish_scores``) and reads the network's ranking snapshot (``fetch_rankings``). Every
ledger request is ``protocols.ledger``'s; receipts and their proofs are client/receipts.py's.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Sequence
from typing import Any

import trio
from libp2p.abc import IHost

from client.receipts import (
    LedgerReceipt,
    ReceiptError,
    ReceiptPending,
    generation_entry,
    log_entry,
    receipt_entry,
    score_report_entry,
)
from crypto.identity import Identity
from protocols import ledger as ledger_proto
from protocols.transport import PEER_ERRORS, error_text
from registry.card import CardInfo

log = logging.getLogger("veilnet.client")


class Ledgers:
    def __init__(self, identity: Identity, *, witness_quorum: int, receipt_timeout: float,
                 timeout: float) -> None:
        self.identity = identity
        self.witness_quorum = witness_quorum
        self.receipt_timeout = receipt_timeout  # logging one entry and waiting for its proof
        self.timeout = timeout  # one request to a ledger node (rankings)
        self.nodes: dict[str, CardInfo] = {}         # peer id -> card naming a ledger key
        self.witness_keys: dict[str, str] = {}       # peer id -> cosignature verifier key

    @property
    def known(self) -> bool:
        return bool(self.nodes)

    def learn(self, cards: Iterable[CardInfo]) -> None:
        for card in cards:
            if card.ledger_key:
                self.nodes[card.peer_id] = card
            if card.witness_key:
                self.witness_keys[card.peer_id] = card.witness_key

    async def fetch_rankings(self, host: IHost) -> dict[str, float]:
        """{did: score} from the newest ranking snapshot of the first ledger node that has one
        ({} when none has)."""
        for card in self.nodes.values():
            try:
                with trio.fail_after(self.timeout):
                    _, entry = await ledger_proto.fetch_ranking(
                        host, card.peer_id, card.multiaddrs, card.did, self.timeout)
            except PEER_ERRORS as exc:
                log.info("no rankings from %s: %s", card.peer_id, error_text(exc))
                continue
            rows = entry.body.get("rows")
            return {r["did"]: float(r["score"]) for r in rows or []
                    if isinstance(r, dict) and isinstance(r.get("did"), str)
                    and isinstance(r.get("score"), int | float)}
        return {}

    async def log_receipt(self, host: IHost, deployment: str,
                          hops: Sequence[Any]) -> LedgerReceipt:
        """Sign an infer-receipt/1 entry for a query's hops, log it at a ledger node and return
        it with a tlog-proof cosigned by ``witness_quorum`` witnesses; raises ReceiptError,
        or ReceiptPending when the entry was logged but the cosignatures were late."""
        return await self.log(host, receipt_entry(self.identity, deployment, hops))

    async def log_generation(self, host: IHost, deployment: str, hops: Sequence[Any],
                             prompt_tokens: int, tokens: int) -> LedgerReceipt:
        """``log_receipt`` for a generation: one generate-receipt/1 entry (each hop's step
        chain and last signed step)."""
        return await self.log(host, generation_entry(self.identity, deployment, hops,
                                                     prompt_tokens, tokens))

    async def log(self, host: IHost, entry: bytes) -> LedgerReceipt:
        """Log a signed ``entry`` at a ledger node and return it with its cosigned proof."""
        if not self.nodes:
            raise ReceiptError("no ledger node is known (none of the cards names a ledger key)")
        errors = []
        for ledger in self.nodes.values():
            witnesses = [k for p, k in sorted(self.witness_keys.items()) if p != ledger.peer_id]
            try:
                return await log_entry(host, ledger, entry, witnesses, self.witness_quorum,
                                       self.receipt_timeout)
            except ReceiptPending:
                raise  # logged: logging it again elsewhere would make two entries
            except PEER_ERRORS as exc:
                errors.append(f"{ledger.peer_id}: {error_text(exc)}")
        raise ReceiptError("; ".join(errors))

    async def publish_scores(self, host: IHost, report: dict[str, dict[str, Any]]) -> int | None:
        """Append a signed score report (node did -> score and figures) to a ledger node;
        returns the entry's index, or None when there is nothing to report or no ledger node
        took it."""
        if not report or not self.nodes:
            return None
        entry = score_report_entry(self.identity, report)
        for ledger in self.nodes.values():
            try:
                with trio.fail_after(self.receipt_timeout):
                    index, _ = await ledger_proto.append(host, ledger.peer_id, ledger.multiaddrs,
                                                         entry, self.receipt_timeout)
                return index
            except PEER_ERRORS as exc:
                log.warning("score report not logged at %s: %s", ledger.peer_id,
                            error_text(exc))
        return None


__all__ = ["Ledgers"]
