"""A node's ledger (``--ledger``) and witness: ``/veilnet/ledger/1``, ``/veilnet/witness/1``.

Log side: submitted entries are queued and committed in batches (one SQLite transaction and one
signed checkpoint per batch); a submitter gets its index only after the commit. After each
commit the node offers the new checkpoint to the witnesses it knows from their agent cards (up
to ``MAX_WITNESSES``), C2SP tlog-witness style: the checkpoint note, the size the log believes
the witness last cosigned, and a consistency proof from it. A witness that answers "conflict"
names its size, and the log retries once from there. Cosignature lines are stored with the
checkpoint and served with it.

Witness side (every node): a checkpoint is considered only if the requesting peer's verified
agent card names the log key that signed it; ``ledger.witness.Witness`` does the atomic
check-and-set and refuses forks and inconsistent checkpoints (logged, counted in /metrics).

All SQLite work runs in worker threads, one call at a time per database.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any, TypeVar

import trio
from libp2p.abc import IHost, INetStream

from ledger.log import LedgerError, Log
from ledger.note import NoteError, parse_verifier_key
from ledger.witness import Witness, WitnessRefused
from node.discovery import Discovery
from node.metrics import NodeMetrics
from protocols import ledger as ledger_proto
from protocols import witness as witness_proto
from protocols.ledger import MAX_ENTRY_BYTES
from protocols.transport import PEER_ERRORS, error_text, remote_peer
from protocols.wire import WireError, envelope, write_frame
from registry.card import CardRejected, verify_card

log = logging.getLogger("veilnet.ledger")
T = TypeVar("T")

MAX_WITNESSES = 8
WITNESS_TIMEOUT = 10.0
MAX_LOG_INDEX = (1 << 63) - 1  # SQLite's largest INTEGER: no log index or size is larger


def check_log_numbers(request: ledger_proto.LedgerRequest) -> None:
    """WireError ``bad_request`` for an index or size no log can have (past SQLite's 64-bit
    integers, which the store cannot even look up: an OverflowError, once an ``internal``)."""
    for name in ("index", "size", "old", "new"):
        value = getattr(request, name)
        if value is not None and value > MAX_LOG_INDEX:
            raise WireError("bad_request", f"{name!r} must be at most {MAX_LOG_INDEX}")


class LedgerService:
    def __init__(self, identity_peer: str, witness: Witness, metrics: NodeMetrics,
                 discovery: Discovery, ledger: Log | None = None) -> None:
        self.peer_id = identity_peer
        self.witness = witness
        self.ledger = ledger
        self.metrics = metrics
        self.discovery = discovery
        self._log_lock = trio.Lock()
        self._witness_lock = trio.Lock()
        self._queue: list[tuple[bytes, dict[str, Any], trio.Event]] = []
        self._work = trio.Event()
        self._push = trio.Event()
        self._witness_sizes: dict[str, int] = {}  # witness peer -> size it last cosigned
        self._offering: set[str] = set()  # witnesses answering an offer right now
        self.host: IHost | None = None
        self.on_commit: Callable[[], None] | None = None  # called after each committed batch
        self.rankings_entry: Callable[[], bytes | None] | None = None  # newest ranking/1 entry

    # -- threads -----------------------------------------------------------------------------------

    async def on_log(self, fn: Callable[..., T], *args: Any) -> T:
        async with self._log_lock:
            return await trio.to_thread.run_sync(fn, *args)

    async def on_witness(self, fn: Callable[..., T], *args: Any) -> T:
        async with self._witness_lock:
            return await trio.to_thread.run_sync(fn, *args)

    # -- log side ----------------------------------------------------------------------------------

    async def submit(self, entry: bytes) -> dict[str, Any]:
        """Queue ``entry``; returns ``{index, leaf_hash, size}`` once its batch is committed."""
        if self.ledger is None:
            raise WireError("no_ledger", "this node keeps no ledger (start it with --ledger)")
        if not entry or len(entry) > MAX_ENTRY_BYTES:
            raise WireError("bad_request", f"an entry has 1 to {MAX_ENTRY_BYTES} bytes")
        result: dict[str, Any] = {}
        done = trio.Event()
        self._queue.append((entry, result, done))
        self._work.set()
        await done.wait()
        if "error" in result:
            raise WireError("internal", result["error"])
        return result

    async def run(self, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        async with trio.open_nursery() as nursery:
            if self.ledger is not None:
                nursery.start_soon(self._batch_loop)
                nursery.start_soon(self._push_loop)
            task_status.started()

    async def _batch_loop(self) -> None:
        assert self.ledger is not None
        while True:
            await self._work.wait()
            self._work = trio.Event()
            batch, self._queue = self._queue[:10_000], self._queue[10_000:]
            if self._queue:
                self._work.set()
            if not batch:
                continue
            try:
                results, _ = await self.on_log(self.ledger.append, [e for e, _, _ in batch])
                size = self.ledger.size
                for (index, leaf), (_, result, _) in zip(results, batch, strict=True):
                    result.update(index=index, leaf_hash=leaf, size=size)
                self.metrics.ledger_entries.inc(len(batch))
                self.metrics.ledger_size.set(size)
                self._push.set()
                if self.on_commit is not None:
                    self.on_commit()
            except Exception as exc:  # the batch is not committed: tell every submitter
                log.exception("ledger append failed")
                for _, result, _ in batch:
                    result["error"] = f"append failed: {type(exc).__name__}"
            finally:
                for _, _, done in batch:
                    done.set()

    async def _push_loop(self) -> None:
        async with trio.open_nursery() as offers:
            while True:
                await self._push.wait()
                self._push = trio.Event()
                await self.push_checkpoint(offers)

    def witnesses(self) -> list[tuple[str, list[str]]]:
        """(PeerID, multiaddrs) of nodes whose cards name a witness key, this node excluded."""
        return [(info.peer_id, info.multiaddrs) for info in self.discovery.index.infos()
                if info.witness_key and info.peer_id != self.peer_id][:MAX_WITNESSES]

    async def push_checkpoint(self, offers: trio.Nursery) -> int:
        """Offer the latest checkpoint to every known witness not still answering an earlier
        offer, each in its own task in ``offers``; returns how many offers it started.

        A slow or stalled witness (up to ``WITNESS_TIMEOUT``) delays only its own cosignature:
        the next commit is offered at once to the others, so receipts, which wait for a quorum,
        are not held up behind it. When its offer ends and the log has grown meanwhile, the
        newest checkpoint is offered again."""
        assert self.ledger is not None and self.host is not None
        ledger = self.ledger
        # the note and its size in one call: an append may commit between two calls
        size, note = await self.on_log(lambda: (ledger.size, ledger.checkpoint(cosigned=False)))
        started = 0
        for peer_id, addrs in self.witnesses():
            if peer_id in self._offering:
                continue
            self._offering.add(peer_id)
            offers.start_soon(self._offer, peer_id, addrs, size, note)
            started += 1
        return started

    async def _offer(self, peer_id: str, addrs: list[str], size: int, note: str) -> None:
        assert self.ledger is not None and self.host is not None
        ledger = self.ledger
        try:
            old = min(self._witness_sizes.get(peer_id, 0), size)
            for _ in range(2):  # a "conflict" names the witness's size: one retry from there
                proof = await self.on_log(ledger.consistency, old, size)
                try:
                    with trio.fail_after(WITNESS_TIMEOUT):
                        answer = await witness_proto.offer(
                            self.host, peer_id, addrs, witness_proto.Offer(note, old, proof),
                            WITNESS_TIMEOUT)
                except PEER_ERRORS as exc:
                    log.info("witness %s: %s", peer_id, error_text(exc))
                    return
                if answer.cosignature is not None:
                    await self.on_log(ledger.store.add_cosignature, size, peer_id,
                                      answer.cosignature)
                    self._witness_sizes[peer_id] = size
                    self.metrics.ledger_cosignatures.set(
                        sum(s == ledger.size for s in self._witness_sizes.values()))
                    return
                if answer.reason == "conflict" and answer.size is not None:
                    old = answer.size
                    continue
                log.warning("witness %s refused checkpoint %d: %s %s", peer_id, size,
                            answer.reason, answer.message)
                return
        finally:
            self._offering.discard(peer_id)
            if ledger.size > size:  # the log grew while this witness was busy
                self._push.set()

    async def handle_ledger(self, stream: INetStream, message: dict[str, Any]) -> None:
        """``/veilnet/ledger/1``: append, checkpoint, proof, consistency, rankings."""
        if self.ledger is None:
            raise WireError("no_ledger", "this node keeps no ledger (start it with --ledger)")
        ledger = self.ledger
        request = ledger_proto.parse_request(message)
        check_log_numbers(request)
        reply: dict[str, Any] = envelope(message["id"])
        try:
            if request.op == "append":
                assert request.entry is not None
                reply.update(await self.submit(request.entry))
            elif request.op == "rankings":
                entry = self.rankings_entry() if self.rankings_entry else None
                if entry is None:
                    raise WireError("not_found", "no ranking snapshot yet")
                reply["entry"] = entry
            elif request.op == "checkpoint":
                reply["note"] = await self.on_log(ledger.checkpoint, request.size)
            elif request.op == "proof":
                reply["proof"] = await self.on_log(ledger.proof, request.index, request.size)
            else:  # consistency
                reply["hashes"] = await self.on_log(ledger.consistency, request.old,
                                                    request.new)
        except (LedgerError, IndexError) as exc:
            raise WireError("bad_request", str(exc)) from None
        await write_frame(stream, reply)

    # -- witness side ------------------------------------------------------------------------------

    async def handle_witness(self, stream: INetStream, message: dict[str, Any]) -> None:
        """``/veilnet/witness/1``: {note, old, proof} -> {cosignature} or {refused}."""
        offer = witness_proto.parse_offer(message)
        sender = remote_peer(stream)
        try:
            await self._trust_sender_log(sender)
            line = await self.on_witness(self.witness.add_checkpoint, offer.note, offer.old,
                                         offer.proof)
            self.metrics.witness_cosigned.inc()
            reply = witness_proto.cosigned(message["id"], line)
        except WitnessRefused as exc:
            self.metrics.witness_refused.labels(exc.reason).inc()
            level = logging.WARNING if exc.reason in ("fork", "inconsistent") else logging.INFO
            log.log(level, "witness: refused a checkpoint from %s: %s", sender, exc)
            reply = witness_proto.refused(message["id"], exc.reason, str(exc), exc.known_size)
        await write_frame(stream, reply)

    async def _trust_sender_log(self, sender: str) -> None:
        card = self.discovery.index.get(sender)
        try:
            key = verify_card(card).ledger_key if card else None
        except CardRejected:  # expired between the lookup and the check: no card
            key = None
        if not key:
            raise WitnessRefused("unknown-log", f"{sender} has no card naming a ledger key")
        try:
            parse_verifier_key(key)
        except NoteError as exc:
            raise WitnessRefused("unknown-log", f"{sender}'s card: bad ledger key: {exc}") \
                from None
        await self.on_witness(self.witness.trust, key)
