"""``/veilnet/ledger/1``: append entries to a node's ledger and read its checkpoints, proofs and
ranking snapshots (nodes started with ``--ledger``; others answer ``no_ledger``).

Requests carry an ``op`` (docs/protocol.md, docs/ledger.md):

```
{"op": "append", "entry": bytes}              -> {"index", "leaf_hash": bytes, "size"}
{"op": "checkpoint", "size"?: int}            -> {"note": signed checkpoint, with cosignatures}
{"op": "proof", "index": int, "size"?: int}   -> {"proof": C2SP tlog-proof text}
{"op": "consistency", "old": int, "new"?: int} -> {"hashes": [bytes]}
{"op": "rankings"}                            -> {"entry": the newest signed ranking/1 entry}
```

The serving node parses a request with ``parse_request``; callers use ``call``, ``append``,
``fetch_proof`` and ``fetch_ranking``, which check the shape of each answer (``bad_response``)
and, for a ranking, that the ledger node signed it.
"""

from __future__ import annotations

import secrets
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any

from libp2p.abc import IHost
from libp2p.custom_types import TProtocol

from errors import IntegrityError
from ledger.entries import MAX_ENTRY_BYTES, Entry, EntryError, parse_entry
from protocols.transport import ensure_connected, request
from protocols.wire import WireError, envelope, scan_items

LEDGER = TProtocol("/veilnet/ledger/1")
OPS = ("append", "checkpoint", "proof", "consistency", "rankings")


@dataclass(frozen=True)
class LedgerRequest:
    """One ledger request; the fields an ``op`` does not use stay None."""

    op: str
    entry: bytes | None = None
    index: int | None = None
    size: int | None = None
    old: int | None = None
    new: int | None = None

    def to_message(self, request_id: str) -> dict[str, Any]:
        fields = {k: v for k, v in asdict(self).items() if v is not None}
        return {**envelope(request_id), **fields}


def entry_from_peer(data: bytes) -> Entry:
    """A signed veilnet entry a peer sent (appended, or a ranking snapshot): at most
    ``MAX_ENTRY_BYTES``, and its CBOR item headers walked (``scan_items``: at most 65536 items,
    16 levels, no tags) before cbor2 builds anything, as for a frame. Raises EntryError."""
    if not data or len(data) > MAX_ENTRY_BYTES:
        raise EntryError(f"an entry has 1 to {MAX_ENTRY_BYTES} bytes, not {len(data)}")
    try:
        scan_items(data)
    except WireError as exc:
        raise EntryError(exc.message) from None
    return parse_entry(data)


def opt_uint(message: Mapping[str, Any], key: str) -> int | None:
    """An optional integer >= 0 field; WireError ``bad_request`` when it is anything else."""
    value = message.get(key)
    if value is None:
        return None
    if not isinstance(value, int) or isinstance(value, bool) or value < 0:
        raise WireError("bad_request", f"{key!r} must be an integer >= 0")
    return value


def parse_request(message: Mapping[str, Any]) -> LedgerRequest:
    """The request in ``message``; WireError ``bad_request`` naming what is wrong. Over the
    network only signed veilnet entries are logged, so an entry must parse as one."""
    op = message.get("op")
    if op == "append":
        entry = message.get("entry")
        if not isinstance(entry, bytes):
            raise WireError("bad_request", "'entry' must be bytes")
        try:
            entry_from_peer(entry)
        except EntryError as exc:
            raise WireError("bad_request", f"not a veilnet ledger entry: {exc}") from None
        return LedgerRequest(op, entry=entry)
    if op == "rankings":
        return LedgerRequest(op)
    if op == "checkpoint":
        return LedgerRequest(op, size=opt_uint(message, "size"))
    if op == "proof":
        index = opt_uint(message, "index")
        if index is None:
            raise WireError("bad_request", "'index' is required")
        return LedgerRequest(op, index=index, size=opt_uint(message, "size"))
    if op == "consistency":
        old = opt_uint(message, "old")
        if old is None:
            raise WireError("bad_request", "'old' is required")
        return LedgerRequest(op, old=old, new=opt_uint(message, "new"))
    raise WireError("bad_request", f"unknown op {op!r}: append, checkpoint, proof, "
                                   "consistency, rankings")


async def call(host: IHost, peer_id: str, addrs: Sequence[str], message: LedgerRequest,
               timeout: float) -> dict[str, Any]:
    """One ledger request to ``peer_id`` (dialled at ``addrs`` unless already connected)."""
    peer = await ensure_connected(host, peer_id, addrs, timeout)
    return await request(host, peer, LEDGER, message.to_message(secrets.token_hex(8)), timeout)


async def append(host: IHost, peer_id: str, addrs: Sequence[str], entry: bytes,
                 timeout: float) -> tuple[int, bytes]:
    """Append ``entry``; its (index, leaf hash) once the ledger node committed it."""
    added = await call(host, peer_id, addrs, LedgerRequest("append", entry=entry), timeout)
    index, leaf = added.get("index"), added.get("leaf_hash")
    if not isinstance(index, int) or not isinstance(leaf, bytes):
        raise WireError("bad_response", f"{peer_id}: malformed append answer")
    return index, leaf


async def fetch_proof(host: IHost, peer_id: str, addrs: Sequence[str], index: int,
                      timeout: float) -> str | None:
    """The C2SP tlog-proof of entry ``index`` (unverified: the caller checks it), or None when
    the answer holds none."""
    answer = await call(host, peer_id, addrs, LedgerRequest("proof", index=index), timeout)
    proof = answer.get("proof")
    return proof if isinstance(proof, str) else None


async def fetch_ranking(host: IHost, peer_id: str, addrs: Sequence[str], did: str,
                        timeout: float) -> tuple[bytes, Entry]:
    """The newest ``ranking/1`` entry of the ledger node ``peer_id`` (did:key ``did``), checked
    to be signed by that node: (its bytes, the parsed entry). Raises WireError (no entry,
    ``not_found`` from the node), IntegrityError (signed by another key) or the transport's
    errors."""
    data = (await call(host, peer_id, addrs, LedgerRequest("rankings"), timeout)).get("entry")
    if not isinstance(data, bytes):
        raise WireError("bad_response", f"{peer_id}: no ranking entry in the answer")
    try:
        entry = entry_from_peer(data)
    except EntryError as exc:
        raise WireError("bad_response", f"{peer_id}: bad ranking entry: {exc}") from None
    if entry.type != "ranking/1" or entry.author != did:
        raise IntegrityError(f"{peer_id}: the ranking is not signed by that node")
    return data, entry


__all__ = ["LEDGER", "MAX_ENTRY_BYTES", "OPS", "LedgerRequest", "append", "call",
           "entry_from_peer", "fetch_proof", "fetch_ranking", "opt_uint", "parse_request"]
