"""Cryptographic building blocks: secure randomness and equivariant-encryption key material.

Identity (Ed25519, did:key), signing and CKKS arrive with later issues.
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
