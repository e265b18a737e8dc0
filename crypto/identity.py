"""A node's Ed25519 identity: one key that is at once its libp2p PeerID and its did:key.

The key file is PKCS#8 PEM (readable by OpenSSL), created with mode 0600 and never overwritten.
PeerID and did:key are two encodings of the same 32-byte public key:

- PeerID (libp2p peer-ids spec): base58btc of the identity multihash (0x00, length 36) of the
  protobuf ``PublicKey{Type: Ed25519 (1), Data: <32 bytes>}`` — ``12D3KooW...``.
- did:key (W3C did:key): ``did:key:z`` + base58btc of the multicodec ``ed25519-pub`` (varint
  0xed 0x01) followed by the 32 bytes — ``did:key:z6Mk...``.

Both framings are fixed byte prefixes, written out here rather than pulled from protobuf and
multicodec libraries; base58 comes from the ``base58`` package.
"""

from __future__ import annotations

import os
from pathlib import Path

import base58
from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from errors import InputError

# identity multihash (code 0x00, length 0x24 = 36) of protobuf PublicKey{Type=1 (Ed25519),
# Data=<32 bytes>}: field 1 varint (0x08 0x01), field 2 bytes of length 32 (0x12 0x20).
_PEER_ID_PREFIX = bytes([0x00, 0x24, 0x08, 0x01, 0x12, 0x20])
_ED25519_PUB_MULTICODEC = bytes([0xED, 0x01])
DID_KEY_PREFIX = "did:key:z"
# Longest base58btc text of a 38-byte PeerID or a 34-byte did:key (52 and 47 characters), with
# room to spare. base58 decoding is quadratic in the length, and these strings come from
# strangers: anything longer is refused before it is decoded (a 60,000-character PeerID took
# 3.6 s to reject).
MAX_BASE58_CHARS = 64


class IdentityError(InputError):
    """A key file, PeerID or did:key that cannot be used."""


def peer_id_from_public(public: bytes) -> str:
    _check_public(public)
    return base58.b58encode(_PEER_ID_PREFIX + public).decode()


def did_from_public(public: bytes) -> str:
    _check_public(public)
    return DID_KEY_PREFIX + base58.b58encode(_ED25519_PUB_MULTICODEC + public).decode()


def public_from_peer_id(peer_id: str) -> bytes:
    """The Ed25519 public key inside an Ed25519 PeerID (``12D3KooW...``)."""
    if not isinstance(peer_id, str) or len(peer_id) > MAX_BASE58_CHARS:
        raise IdentityError(f"PeerID {_clip(peer_id)} is not an Ed25519 PeerID (too long)")
    try:
        raw = base58.b58decode(peer_id)
    except ValueError as exc:
        raise IdentityError(f"PeerID {_clip(peer_id)} is not base58btc") from exc
    if len(raw) != 38 or not raw.startswith(_PEER_ID_PREFIX):
        raise IdentityError(f"PeerID {_clip(peer_id)} is not an inline Ed25519 public key")
    return raw[len(_PEER_ID_PREFIX):]


def public_from_did(did: str) -> bytes:
    """The Ed25519 public key of a ``did:key:z6Mk...`` DID (a DID URL fragment is ignored)."""
    if not isinstance(did, str):
        raise IdentityError(f"{_clip(did)} is not a did:key string")
    base = did.split("#", 1)[0]
    if len(base) > len(DID_KEY_PREFIX) + MAX_BASE58_CHARS:
        raise IdentityError(f"{_clip(did)} is not an Ed25519 did:key (too long)")
    if not base.startswith(DID_KEY_PREFIX):
        raise IdentityError(f"{_clip(did)} is not a base58btc did:key")
    try:
        raw = base58.b58decode(base[len(DID_KEY_PREFIX):])
    except ValueError as exc:
        raise IdentityError(f"{_clip(did)}: the key is not base58btc") from exc
    if len(raw) != 34 or not raw.startswith(_ED25519_PUB_MULTICODEC):
        raise IdentityError(f"{_clip(did)} is not an Ed25519 did:key")
    return raw[2:]


def _clip(value: object, limit: int = 80) -> str:
    """``repr(value)`` cut to ``limit`` characters, for error messages about untrusted input."""
    text = repr(value)
    return text if len(text) <= limit else text[:limit] + f"... ({len(text)} characters)"


def did_from_peer_id(peer_id: str) -> str:
    return did_from_public(public_from_peer_id(peer_id))


def peer_id_from_did(did: str) -> str:
    return peer_id_from_public(public_from_did(did))


def verify(public: bytes, signature: bytes, message: bytes) -> bool:
    """True when ``signature`` is a valid Ed25519 signature of ``message`` by ``public``."""
    try:
        Ed25519PublicKey.from_public_bytes(public).verify(signature, message)
    except (InvalidSignature, ValueError):
        return False
    return True


def _check_public(public: bytes) -> None:
    if len(public) != 32:
        raise IdentityError(f"an Ed25519 public key has 32 bytes, not {len(public)}")


class Identity:
    """An Ed25519 private key with its PeerID and did:key."""

    def __init__(self, private: Ed25519PrivateKey) -> None:
        self._private = private
        self.public = private.public_key().public_bytes(
            serialization.Encoding.Raw, serialization.PublicFormat.Raw)
        self.peer_id = peer_id_from_public(self.public)
        self.did = did_from_public(self.public)

    @classmethod
    def generate(cls) -> Identity:
        return cls(Ed25519PrivateKey.generate())

    @classmethod
    def from_seed(cls, seed: bytes) -> Identity:
        return cls(Ed25519PrivateKey.from_private_bytes(seed))

    def seed(self) -> bytes:
        """The 32-byte RFC 8032 private key, for handing to the libp2p host in-process only."""
        return self._private.private_bytes(
            serialization.Encoding.Raw, serialization.PrivateFormat.Raw,
            serialization.NoEncryption())

    def sign(self, message: bytes) -> bytes:
        return self._private.sign(message)

    def private_key(self) -> Ed25519PrivateKey:
        """The key object, for signing libraries (PyJWT) in this process only."""
        return self._private

    @property
    def key_id(self) -> str:
        """The did:key URL of the verification method (``did:key:z6Mk...#z6Mk...``)."""
        return f"{self.did}#{self.did[len('did:key:'):]}"

    # -- files ----------------------------------------------------------------------------------

    def save(self, path: Path) -> None:
        """Write the key as PKCS#8 PEM with mode 0600; refuses to overwrite an existing file."""
        pem = self._private.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption())
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "wb") as f:
            f.write(pem)
            f.flush()
            os.fsync(f.fileno())

    @classmethod
    def load(cls, path: Path) -> Identity:
        try:
            data = Path(path).read_bytes()
        except OSError as exc:
            raise IdentityError(f"{path}: cannot read the identity key: {exc.strerror}") from exc
        try:
            key = serialization.load_pem_private_key(data, password=None)
        except (ValueError, TypeError, UnsupportedAlgorithm) as exc:  # e.g. an unknown key OID
            raise IdentityError(f"{path}: not a PEM private key ({exc})") from exc
        if not isinstance(key, Ed25519PrivateKey):
            raise IdentityError(f"{path}: the key is {type(key).__name__}, expected Ed25519")
        return cls(key)

    @classmethod
    def load_or_create(cls, path: Path) -> tuple[Identity, bool]:
        """Load ``path``, or create it (0600) if missing. Returns (identity, created)."""
        path = Path(path)
        if path.exists():
            mode = path.stat().st_mode & 0o777
            if mode & 0o077:
                raise IdentityError(f"{path}: mode {mode:o} lets others read the private key; "
                                    "run chmod 600 on it")
            return cls.load(path), False
        identity = cls.generate()
        identity.save(path)
        return identity, True
