"""Cryptographic building blocks: secure randomness and equivariant-encryption key material.

Ed25519 identities (PeerID, did:key) live in crypto.identity and JWS in crypto.jws; CKKS
arrives with a later issue.
"""

from crypto.csprng import SecureRandom
from crypto.ee_key import (
    KEY_FORMAT,
    AttentionSpace,
    EEKey,
    KeyFormatError,
    PermSpace,
    random_invertible,
)

__all__ = [
    "KEY_FORMAT",
    "AttentionSpace",
    "EEKey",
    "KeyFormatError",
    "PermSpace",
    "SecureRandom",
    "random_invertible",
]
