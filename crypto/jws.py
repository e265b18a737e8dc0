"""Detached-payload JWS (RFC 7515 appendix F) with EdDSA over Ed25519, through PyJWT.

Agent cards carry ``{"protected": ..., "signature": ...}``: the JWS compact form with its middle
(payload) part removed, because the payload is the card's own canonical form and is recomputed by
the verifier (A2A v1.0 AgentCardSignature).
"""

from __future__ import annotations

import json
from typing import Any

import jwt
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
from jwt import api_jws
from jwt.utils import base64url_decode, base64url_encode

from crypto.identity import Identity
from errors import IntegrityError

ALGORITHM = "EdDSA"


class JWSError(IntegrityError, ValueError):
    """A JWS that is malformed or whose signature does not verify."""


def sign_detached(identity: Identity, payload: bytes, kid: str) -> tuple[str, str]:
    """``(protected, signature)``, both base64url, for ``payload`` signed by ``identity``.

    The protected header is ``{"alg": "EdDSA", "kid": kid, "typ": "JOSE"}``.
    """
    # Not PyJWT's is_payload_detached: that is RFC 7797 (b64: false), which A2A verifiers reject.
    token = api_jws.encode(payload, identity.private_key(), algorithm=ALGORITHM,
                           headers={"kid": kid, "typ": "JOSE"})
    protected, _, signature = token.split(".")
    return protected, signature


def protected_header(protected: str) -> dict[str, Any]:
    """The decoded protected header; raises JWSError when it is not a base64url JSON object."""
    try:
        header = json.loads(base64url_decode(protected.encode("ascii")))
    except (ValueError, UnicodeError) as exc:
        raise JWSError(f"protected header is not base64url JSON: {exc}") from None
    if not isinstance(header, dict):
        raise JWSError("protected header is not a JSON object")
    return header


def verify_detached(protected: str, signature: str, payload: bytes, public: bytes) -> None:
    """Check an EdDSA signature over ``payload``; raises JWSError naming what failed."""
    try:
        key = Ed25519PublicKey.from_public_bytes(public)
        encoded = base64url_encode(payload).decode("ascii")
        api_jws.decode_complete(f"{protected}.{encoded}.{signature}", key,
                                algorithms=[ALGORITHM])
    except jwt.InvalidSignatureError:
        raise JWSError("signature does not verify") from None
    except (jwt.PyJWTError, ValueError) as exc:
        raise JWSError(f"invalid JWS: {exc}") from None
