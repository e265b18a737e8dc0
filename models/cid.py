"""Content identifiers: CIDv1, raw codec, sha2-256 multihash, base32 (``bafk...``)."""

from __future__ import annotations

import hashlib
from pathlib import Path

import multiformats_cid
import multihash


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
    return cid_of_bytes(Path(path).read_bytes())


def is_valid_cid(text: str) -> bool:
    """True for a well-formed CIDv1 string with the raw codec and a sha2-256 multihash."""
    try:
        cid = multiformats_cid.from_string(text)
        decoded = multihash.decode(cid.multihash)
    except Exception:  # the library raises a mix of ValueError/KeyError/TypeError
        return False
    if cid.version != 1 or cid.codec != "raw" or decoded.name != "sha2-256":
        return False
    return _base32(cid) == text  # rejects trailing characters the decoder would silently drop
