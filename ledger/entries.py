"""Ledger entry types and their canonical encoding (``veilnet-entry/1``).

An entry is deterministic CBOR (RFC 8949 §4.2.1 core deterministic encoding, via cbor2's
``canonical=True``) of the map

    {"v": 1, "type": str, "author": did:key, "time": int (Unix seconds), "body": map,
     "sig": Ed25519 signature by the author}

where ``sig`` signs the deterministic CBOR of ``["veilnet-entry/1", type, author, time, body]``.
The bytes in the log are exactly that encoding: ``parse_entry`` refuses any other encoding of the
same map, so one entry has one leaf hash.

Types (``body`` fields):

    infer-receipt/1   {"query": str, "deployment": CID,
                       "verdict": "accepted" | "unverified" | "rejected",
                       "hops": [{"index": int, "shard": CID, "node": did, "id": str,
                                 "input_digest": bytes, "output_digest": bytes,
                                 "signature": bytes}]}
    generate-receipt/1 {"generation": str, "deployment": CID,
                       "verdict": "accepted" | "unverified", "prompt_tokens": int,
                       "tokens": int,
                       "hops": [{"index": int, "shard": CID, "node": did, "nodes": [did],
                                 "steps": int, "replays": int, "chain": bytes,
                                 "last": {"id": str, "session": str, "position": int,
                                          "input_digest": bytes, "output_digest": bytes,
                                          "signature": bytes}}]}
    score-report/1    {"scores": {node did: {"score", "agreement", "latency_ms",
                       "availability", "observations"}}}   (a client's own view of nodes)
    ranking/1         {"rows": [{"did": did, "score": float, ...}], "reporters": int}
    node-join/1, node-leave/1   {"node": did, "peer_id": str, "multiaddrs": [str]}
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

import cbor2

from crypto.identity import Identity, IdentityError, public_from_did, verify
from errors import InputError

ENTRY_DOMAIN = "veilnet-entry/1"
TYPES = frozenset({"infer-receipt/1", "generate-receipt/1", "score-report/1", "ranking/1",
                   "node-join/1", "node-leave/1"})
MAX_ENTRY_BYTES = 1 << 20


class EntryError(InputError):
    """Bytes that are not a valid, signed veilnet ledger entry."""


@dataclass(frozen=True)
class Entry:
    type: str
    author: str
    time: int
    body: dict[str, Any]
    sig: bytes

    def to_json(self) -> dict[str, Any]:
        """A JSON-able view (bytes as hex) for ``veilnet ledger show``."""
        return {"type": self.type, "author": self.author, "time": self.time,
                "body": _hexify(self.body), "sig": self.sig.hex()}


def _signed_part(type_: str, author: str, when: int, body: dict[str, Any]) -> bytes:
    return cbor2.dumps([ENTRY_DOMAIN, type_, author, when, body], canonical=True)


def make_entry(identity: Identity, type_: str, body: dict[str, Any],
               when: int | None = None) -> bytes:
    """The canonical bytes of an entry of ``type_`` signed by ``identity``."""
    if type_ not in TYPES:
        raise EntryError(f"unknown entry type {type_!r}; known: {sorted(TYPES)}")
    when = int(time.time()) if when is None else when
    sig = identity.sign(_signed_part(type_, identity.did, when, body))
    return cbor2.dumps({"v": 1, "type": type_, "author": identity.did, "time": when,
                        "body": body, "sig": sig}, canonical=True)


def parse_entry(data: bytes) -> Entry:
    """Decode and check an entry: canonical encoding, known type, author signature."""
    if len(data) > MAX_ENTRY_BYTES:
        raise EntryError(f"entry is {len(data)} bytes, limit {MAX_ENTRY_BYTES}")
    try:
        doc = cbor2.loads(data)
    except (cbor2.CBORDecodeError, ValueError, RecursionError) as exc:
        raise EntryError(f"not CBOR: {exc}") from None
    if not isinstance(doc, dict) or set(doc) != {"v", "type", "author", "time", "body", "sig"}:
        raise EntryError("an entry is a map with exactly v, type, author, time, body, sig")
    if doc["v"] != 1:
        raise EntryError(f"entry version {doc['v']!r}, expected 1")
    type_, author, when, body, sig = (doc[k] for k in ("type", "author", "time", "body", "sig"))
    if not isinstance(type_, str) or type_ not in TYPES:  # a list or map is unhashable
        raise EntryError(f"unknown entry type {type_!r}")
    if not isinstance(author, str) or not isinstance(when, int) or not isinstance(body, dict) \
            or not isinstance(sig, bytes):
        raise EntryError("entry fields have the wrong types")
    try:
        canonical = cbor2.dumps(doc, canonical=True)
    except (TypeError, ValueError) as exc:
        raise EntryError(f"entry cannot be re-encoded: {exc}") from None
    if canonical != data:
        raise EntryError("entry is not in deterministic CBOR encoding")
    try:
        public = public_from_did(author)
    except IdentityError as exc:
        raise EntryError(f"author: {exc}") from None
    if not verify(public, sig, _signed_part(type_, author, when, body)):
        raise EntryError(f"signature by {author} does not verify")
    return Entry(type_, author, when, body, sig)


def _hexify(value: Any) -> Any:
    if isinstance(value, bytes):
        return value.hex()
    if isinstance(value, dict):
        return {str(k): _hexify(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_hexify(v) for v in value]
    return value
