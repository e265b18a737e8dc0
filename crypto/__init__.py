"""Cryptographic building blocks: secure randomness and equivariant-encryption key material.

Ed25519 identities (PeerID, did:key) live in crypto.identity and JWS in crypto.jws; their error
classes are exported here too. CKKS lives in crypto.ckks (with ``CkksError``), imported on its
own: it loads TenSEAL, which only CKKS queries need.
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
from crypto.identity import IdentityError
from crypto.jws import JWSError

__all__ = [
    "KEY_FORMAT",
    "AttentionSpace",
    "EEKey",
    "IdentityError",
    "JWSError",
    "KeyFormatError",
    "PermSpace",
    "SecureRandom",
    "random_invertible",
]
