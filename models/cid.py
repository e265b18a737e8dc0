"""Content identifiers: CIDv1, raw codec, sha2-256 multihash, base32 (``bafk...``)."""

from __future__ import annotations

import hashlib
import re
from pathlib import Path

import multiformats_cid
import multihash

# Every veilnet CID has the same 36 bytes (0x01 version, 0x55 raw codec, 0x12 sha2-256, 0x20
# digest length, 32 digest bytes) and so the same base32 form: "b" (multibase), then 58 base32
# characters (290 bits, the last 2 zero) of which the first six, "afkrei", are fixed by the
# 4-byte prefix. is_valid_cid checks type, length and alphabet with this pattern before any
# decoding: the multiformats decoders are super-linear on long input (base58: 10k characters
# ~1.5 s, 30k ~26 s).
CID_LENGTH = 59
CID_PREFIX = "bafkrei"
_CID_SHAPE = re.compile(CID_PREFIX + "[a-z2-7]{52}")


def cid_of_bytes(data: bytes) -> str:
    """The CIDv1 (raw, sha2-256) of ``data`` in its base32 string form."""
    return cid_of_digest(hashlib.sha256(data).digest())


def cid_of_digest(sha256_digest: bytes) -> str:
    """The CIDv1 (raw) of content whose SHA-256 is ``sha256_digest`` (for streamed content)."""
    return _base32(multiformats_cid.make_cid(1, "raw", multihash.encode(sha256_digest, "sha2-256")))


def _base32(cid: multiformats_cid.CIDv1) -> str:
    encoded = cid.encode("base32")
    return encoded.decode() if isinstance(encoded, bytes) else str(encoded)


def cid_of_file(path: Path) -> str:
    """The CID of a file's bytes, hashed in blocks (a shard may be larger than memory allows)."""
    with open(path, "rb") as f:
        return cid_of_digest(hashlib.file_digest(f, "sha256").digest())


def is_valid_cid(text: str) -> bool:
    """True for a well-formed CIDv1 string with the raw codec and a sha2-256 multihash.

    Constant time in the length of ``text``: anything but a 59-character ``bafkrei...`` base32
    string is refused before it is decoded."""
    if not isinstance(text, str) or len(text) != CID_LENGTH or not _CID_SHAPE.fullmatch(text):
        return False
    try:
        cid = multiformats_cid.from_string(text)
        decoded = multihash.decode(cid.multihash)
    except Exception:  # the library raises a mix of ValueError/KeyError/TypeError
        return False
    if cid.version != 1 or cid.codec != "raw" or decoded.name != "sha2-256":
        return False
    return _base32(cid) == text  # rejects trailing characters the decoder would silently drop
