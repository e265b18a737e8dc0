"""C2SP witness cosignatures, Ed25519 cosignature/v1 (https://c2sp.org/tlog-cosignature).

A cosignature is a signed-note signature line on a checkpoint::

    — <cosigner name> base64(key ID || timestamp (u64, big-endian) || Ed25519 signature)

with key ID ``SHA-256(name || "\\n" || 0x04 || 32-byte public key)[:4]`` and the Ed25519
signature over ``"cosignature/v1\\n" || "time <timestamp>\\n" || checkpoint note text`` (text
including extension lines and its final newline). The timestamp is POSIX seconds, at most
2**63 - 1. The ML-DSA-44 (subtree/v1, type 0x06) cosignatures of the same spec are not
implemented. Written by hand from the C2SP text: there is no maintained Python library for it.
"""

from __future__ import annotations

from crypto.identity import Identity
from ledger.checkpoint import Checkpoint
from ledger.note import (
    ALG_COSIGNATURE_V1,
    MAX_TIMESTAMP,
    NoteError,
    NoteSignature,
    Verifier,
    check_name,
    cosignature_message,
    key_id,
    signature_line,
    verifier_key,
)

__all__ = [
    "ALG_COSIGNATURE_V1",
    "cosign",
    "cosignature_key_id",
    "cosignature_message",
    "cosignature_timestamp",
    "cosignature_verifier",
    "cosignature_verifier_key",
    "verify_cosignature",
]

_COSIG_LEN = 8 + 64


def cosignature_key_id(name: str, public: bytes) -> bytes:
    return key_id(check_name(name), ALG_COSIGNATURE_V1, public)


def cosignature_verifier_key(name: str, public: bytes) -> str:
    """The vkey of a cosigner: ``name+hex(key ID)+base64(0x04 || public)``."""
    return verifier_key(name, public, ALG_COSIGNATURE_V1)


def cosignature_verifier(name: str, public: bytes) -> Verifier:
    return Verifier(name, cosignature_key_id(name, public), ALG_COSIGNATURE_V1, public)


def _check_timestamp(timestamp: int) -> None:
    if isinstance(timestamp, bool) or not isinstance(timestamp, int) \
            or not 0 <= timestamp <= MAX_TIMESTAMP:
        raise NoteError(f"cosignature timestamp {timestamp!r} is not in [0, 2**63 - 1]")


def cosign(checkpoint: Checkpoint, name: str, identity: Identity, timestamp: int) -> str:
    """The cosignature/v1 signature line (with its newline) of ``name`` on ``checkpoint``."""
    _check_timestamp(timestamp)
    sig = identity.sign(cosignature_message(checkpoint.text(), timestamp))
    return signature_line(name, cosignature_key_id(name, identity.public),
                          timestamp.to_bytes(8, "big") + sig)


def cosignature_timestamp(sig: NoteSignature) -> int:
    """The timestamp field of a cosignature/v1 signature (not verified)."""
    if len(sig.signature) != _COSIG_LEN:
        raise NoteError(f"a cosignature/v1 signature has {_COSIG_LEN} bytes after the key ID, "
                        f"not {len(sig.signature)}")
    timestamp = int.from_bytes(sig.signature[:8], "big")
    if timestamp > MAX_TIMESTAMP:
        raise NoteError(f"cosignature timestamp {timestamp} exceeds 2**63 - 1")
    return timestamp


def verify_cosignature(checkpoint: Checkpoint, sig: NoteSignature, verifier: Verifier) -> int:
    """Check ``sig`` is ``verifier``'s cosignature/v1 on ``checkpoint``; return its timestamp."""
    if verifier.alg != ALG_COSIGNATURE_V1:
        raise NoteError(f"verifier {verifier.name!r} has signature type 0x{verifier.alg:02x}, "
                        f"not cosignature/v1 (0x{ALG_COSIGNATURE_V1:02x})")
    if (sig.name, sig.key_id) != (verifier.name, verifier.key_id):
        raise NoteError(f"signature by {sig.name}+{sig.key_id.hex()} is not by cosigner "
                        f"{verifier.name}+{verifier.key_id.hex()}")
    timestamp = cosignature_timestamp(sig)
    if not verifier.verify(checkpoint.text().encode("utf-8"), sig.signature):
        raise NoteError(f"invalid cosignature by {sig.name}+{sig.key_id.hex()} "
                        f"(time {timestamp})")
    return timestamp
