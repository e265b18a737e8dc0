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

import base64
import logging
import secrets
from collections.abc import Callable
from typing import Any, TypeVar

import trio
from libp2p.abc import IHost, INetStream

from ledger.entries import EntryError, parse_entry
from ledger.log import LedgerError, Log
from ledger.note import NoteError, parse_verifier_key
from ledger.witness import Witness, WitnessRefused
from node.discovery import Discovery
from node.metrics import NodeMetrics
from node.p2p import WITNESS, ensure_connected, error_text, remote_peer, request
from node.wire import WIRE_VERSION, WireError, write_frame
from registry.card import CardRejected, verify_card

log = logging.getLogger("veilnet.ledger")
T = TypeVar("T")

MAX_WITNESSES = 8
MAX_ENTRY_BYTES = 1 << 20
MAX_PROOF_HASHES = 128
MAX_NOTE_CHARS = 64 * 1024  # a checkpoint with 100 signature lines is under 16 KiB
WITNESS_TIMEOUT = 10.0


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
        while True:
            await self._push.wait()
            self._push = trio.Event()
            await self.push_checkpoint()

    def witnesses(self) -> list[tuple[str, list[str]]]:
        """(PeerID, multiaddrs) of nodes whose cards name a witness key, this node excluded."""
        return [(info.peer_id, info.multiaddrs) for info in self.discovery.index.infos()
                if info.witness_key and info.peer_id != self.peer_id][:MAX_WITNESSES]

    async def push_checkpoint(self) -> int:
        """Offer the latest checkpoint to every known witness; returns how many cosigned."""
        assert self.ledger is not None and self.host is not None
        ledger = self.ledger
        # the note and its size in one call: an append may commit between two calls
        size, note = await self.on_log(lambda: (ledger.size, ledger.checkpoint(cosigned=False)))
        cosigned = 0

        async def offer(peer_id: str, addrs: list[str]) -> None:
            nonlocal cosigned
            old = min(self._witness_sizes.get(peer_id, 0), size)
            for _ in range(2):  # a "conflict" names the witness's size: one retry from there
                proof = await self.on_log(ledger.consistency, old, size)
                try:
                    with trio.fail_after(WITNESS_TIMEOUT):
                        pid = await ensure_connected(self.host, peer_id, addrs, 5.0)
                        answer = await request(self.host, pid, WITNESS, {
                            "v": WIRE_VERSION, "id": secrets.token_hex(8), "note": note,
                            "old": old, "proof": proof}, WITNESS_TIMEOUT)
                except (Exception, trio.TooSlowError) as exc:
                    log.info("witness %s: %s", peer_id, error_text(exc))
                    return
                line = answer.get("cosignature")
                refused = answer.get("refused")
                if isinstance(line, str):
                    await self.on_log(ledger.store.add_cosignature, size, peer_id, line)
                    self._witness_sizes[peer_id] = size
                    cosigned += 1
                    return
                if isinstance(refused, dict) and refused.get("reason") == "conflict" \
                        and isinstance(refused.get("size"), int):
                    old = refused["size"]
                    continue
                log.warning("witness %s refused checkpoint %d: %s", peer_id, size, refused)
                return

        async with trio.open_nursery() as nursery:
            for peer_id, addrs in self.witnesses():
                nursery.start_soon(offer, peer_id, addrs)
        self.metrics.ledger_cosignatures.set(cosigned)
        return cosigned

    async def handle_ledger(self, stream: INetStream, message: dict[str, Any]) -> None:
        """``/veilnet/ledger/1``: append, checkpoint, proof, consistency."""
        if self.ledger is None:
            raise WireError("no_ledger", "this node keeps no ledger (start it with --ledger)")
        ledger = self.ledger
        op = message.get("op")
        reply: dict[str, Any] = {"v": WIRE_VERSION, "id": message["id"]}
        try:
            if op == "append":
                entry = message.get("entry")
                if not isinstance(entry, bytes):
                    raise WireError("bad_request", "'entry' must be bytes")
                try:  # over the network only signed veilnet entries are logged
                    parse_entry(entry)
                except EntryError as exc:
                    raise WireError("bad_request", f"not a veilnet ledger entry: {exc}") from None
                reply.update(await self.submit(entry))
            elif op == "rankings":
                entry = self.rankings_entry() if self.rankings_entry else None
                if entry is None:
                    raise WireError("not_found", "no ranking snapshot yet")
                reply["entry"] = entry
            elif op == "checkpoint":
                reply["note"] = await self.on_log(ledger.checkpoint, _opt_int(message, "size"))
            elif op == "proof":
                index = _opt_int(message, "index")
                if index is None:
                    raise WireError("bad_request", "'index' is required")
                reply["proof"] = await self.on_log(ledger.proof, index,
                                                   _opt_int(message, "size"))
            elif op == "consistency":
                old = _opt_int(message, "old")
                if old is None:
                    raise WireError("bad_request", "'old' is required")
                reply["hashes"] = await self.on_log(ledger.consistency, old,
                                                    _opt_int(message, "new"))
            else:
                raise WireError("bad_request", f"unknown op {op!r}: append, checkpoint, "
                                               "proof, consistency, rankings")
        except (LedgerError, IndexError) as exc:
            raise WireError("bad_request", str(exc)) from None
        await write_frame(stream, reply)

    # -- witness side ------------------------------------------------------------------------------

    async def handle_witness(self, stream: INetStream, message: dict[str, Any]) -> None:
        """``/veilnet/witness/1``: {note, old, proof} -> {cosignature} or {refused}."""
        note, old, proof = message.get("note"), message.get("old"), message.get("proof")
        if not isinstance(note, str) or len(note) > MAX_NOTE_CHARS \
                or not isinstance(old, int) or old < 0 \
                or not isinstance(proof, list) or len(proof) > MAX_PROOF_HASHES \
                or not all(isinstance(h, bytes) for h in proof):
            raise WireError("bad_request", f"expected note (text of at most {MAX_NOTE_CHARS} "
                                           "characters), old (int >= 0), proof (list of at "
                                           f"most {MAX_PROOF_HASHES} hashes)")
        sender = remote_peer(stream)
        reply: dict[str, Any] = {"v": WIRE_VERSION, "id": message["id"]}
        try:
            await self._trust_sender_log(sender)
            reply["cosignature"] = await self.on_witness(self.witness.add_checkpoint, note, old,
                                                         proof)
            self.metrics.witness_cosigned.inc()
        except WitnessRefused as exc:
            self.metrics.witness_refused.labels(exc.reason).inc()
            level = logging.WARNING if exc.reason in ("fork", "inconsistent") else logging.INFO
            log.log(level, "witness: refused a checkpoint from %s: %s", sender, exc)
            reply["refused"] = {"reason": exc.reason, "message": str(exc),
                                "size": exc.known_size}
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


def _opt_int(message: dict[str, Any], key: str) -> int | None:
    value = message.get(key)
    if value is None:
        return None
    if not isinstance(value, int) or isinstance(value, bool) or value < 0:
        raise WireError("bad_request", f"{key!r} must be an integer >= 0")
    return value


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()
