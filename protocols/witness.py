"""``/veilnet/witness/1``: a log offers a checkpoint to a witness, which cosigns it or refuses.

``request: {"v": 1, "id", "note": signed checkpoint, "old": size the log believes the witness
last cosigned, "proof": [consistency proof hashes from old]}``; the answer is
``{"cosignature": line}`` (a C2SP tlog-cosignature line) or ``{"refused": {"reason", "message",
"size"}}`` with reason ``unknown-log``, ``bad-note``, ``fork``, ``inconsistent`` or ``conflict``
(then ``size`` is the witness's size, from which the log may retry). docs/ledger.md has the
witness's rules; node/ledger_service.py serves it.
"""

from __future__ import annotations

import secrets
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from libp2p.abc import IHost
from libp2p.custom_types import TProtocol

from protocols.transport import ensure_connected, request
from protocols.wire import WireError, envelope

WITNESS = TProtocol("/veilnet/witness/1")
MAX_PROOF_HASHES = 128
MAX_NOTE_CHARS = 64 * 1024  # a checkpoint with 100 signature lines is under 16 KiB
REFUSALS = ("unknown-log", "bad-note", "fork", "inconsistent", "conflict")


@dataclass(frozen=True)
class Offer:
    """A checkpoint offered for cosigning."""

    note: str
    old: int
    proof: list[bytes]

    def to_message(self, request_id: str) -> dict[str, Any]:
        return {**envelope(request_id), "note": self.note, "old": self.old,
                "proof": list(self.proof)}


@dataclass(frozen=True)
class Answer:
    """A witness's answer: a cosignature line, or a refusal with its reason and size."""

    cosignature: str | None = None
    reason: str | None = None
    message: str = ""
    size: int | None = None


def parse_offer(message: Mapping[str, Any]) -> Offer:
    """The offer in ``message``; WireError ``bad_request`` when a field is missing, mistyped
    or over its limit."""
    note, old, proof = message.get("note"), message.get("old"), message.get("proof")
    if not isinstance(note, str) or len(note) > MAX_NOTE_CHARS \
            or not isinstance(old, int) or isinstance(old, bool) or old < 0 \
            or not isinstance(proof, list) or len(proof) > MAX_PROOF_HASHES \
            or not all(isinstance(h, bytes) for h in proof):
        raise WireError("bad_request", f"expected note (text of at most {MAX_NOTE_CHARS} "
                                       "characters), old (int >= 0), proof (list of at "
                                       f"most {MAX_PROOF_HASHES} hashes)")
    return Offer(note, old, proof)


def cosigned(request_id: str, line: str) -> dict[str, Any]:
    return {**envelope(request_id), "cosignature": line}


def refused(request_id: str, reason: str, message: str, size: int | None) -> dict[str, Any]:
    return {**envelope(request_id), "refused": {"reason": reason, "message": message,
                                                "size": size}}


async def offer(host: IHost, peer_id: str, addrs: Sequence[str], checkpoint: Offer,
                timeout: float, dial_timeout: float = 5.0) -> Answer:
    """Offer ``checkpoint`` to the witness ``peer_id``; its answer (a malformed answer is a
    refusal with reason None)."""
    pid = await ensure_connected(host, peer_id, addrs, dial_timeout)
    answer = await request(host, pid, WITNESS, checkpoint.to_message(secrets.token_hex(8)),
                           timeout)
    return parse_answer(answer)


def parse_answer(answer: Mapping[str, Any]) -> Answer:
    """A witness's answer; a malformed one is a refusal with reason None."""
    line, refusal = answer.get("cosignature"), answer.get("refused")
    if isinstance(line, str):
        return Answer(cosignature=line)
    if isinstance(refusal, dict):
        reason, size = refusal.get("reason"), refusal.get("size")
        return Answer(reason=reason if isinstance(reason, str) else None,
                      message=str(refusal.get("message", ""))[:300],
                      size=size if isinstance(size, int) and not isinstance(size, bool)
                      else None)
    return Answer(message="the witness answered neither a cosignature nor a refusal")


__all__ = ["MAX_NOTE_CHARS", "MAX_PROOF_HASHES", "REFUSALS", "WITNESS", "Answer", "Offer",
           "cosigned", "offer", "parse_answer", "parse_offer", "refused"]
