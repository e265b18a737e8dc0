"""ANP (Agent Network Protocol) documents of a veilnet node, as pure functions.

Specifications followed (field names checked against these texts):

- did:key Method v0.9, W3C CCG (https://w3c-ccg.github.io/did-key-spec/): Ed25519 did:key
  documents with ``Multikey`` keys.
- In github.com/agent-network-protocol/AgentNetworkProtocol: ANP-03 did:wba Method v1.1 (DID
  syntax, ``%3A`` port escaping, resolution URL, ``AgentDescription`` service), ANP-07 Agent
  Description Protocol v1.1 (plain JSON: ``protocolType``, ``type``, ``url``, ``interfaces``;
  domain extension fields per docs/agent-description-extended-fields-guide.md) and ANP-08 Agent
  Discovery Protocol v1.2 (the JSON-LD ``CollectionPage``).
- W3C Data Integrity EdDSA Cryptosuites v1.0, ``eddsa-jcs-2022`` (the proof profile ANP-03
  mandates, and that ``anp.proof`` verifies).

A node's did:wba DID is ``did:wba:<host>[%3A<port>]:agents:<PeerID>``. The PeerID carries the
Ed25519 key inline, so the DID is self-certifying: ``verify_agent_description`` takes the key from
the DID itself and never fetches a document. ANP-03 v1.1 wants new path DIDs to end in an ``e1_``
key-thumbprint segment instead; ANP-03 lets parsers accept DIDs without it, and anp 1.0.7 does.
"""

from __future__ import annotations

import hashlib
import ipaddress
import re
from collections.abc import Iterable, Mapping
from datetime import UTC, datetime
from typing import Any
from urllib.parse import urlsplit

import base58
import rfc8785

from crypto.identity import (
    Identity,
    IdentityError,
    did_from_public,
    peer_id_from_public,
    public_from_did,
    public_from_peer_id,
    verify,
)
from registry.card import A2A_PROTOCOL_VERSION, CardInfo

DID_CONTEXT = "https://www.w3.org/ns/did/v1"
MULTIKEY_CONTEXT = "https://w3id.org/security/multikey/v1"
DISCOVERY_CONTEXT = {"@vocab": "https://schema.org/", "did": "https://w3id.org/did#",
                     "ad": "https://agent-network-protocol.com/ad#"}
ANP_PROTOCOL_VERSION = "1.0.0"
AGENTS_PATH = "agents"
WBA_KEY_FRAGMENT = "key-1"
PROOF_TYPE = "DataIntegrityProof"
CRYPTOSUITE = "eddsa-jcs-2022"
PROOF_PURPOSE = "assertionMethod"

_DID_KEY = "did:key:"
_DID_WBA = "did:wba:"
_X25519_PUB_MULTICODEC = bytes([0xEC, 0x01])
_P = 2**255 - 19
_LABEL = re.compile(r"[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?")
_SEGMENT = re.compile(r"[A-Za-z0-9._-]+")   # ANP-03 ABNF path-segment
_TIME = "%Y-%m-%dT%H:%M:%SZ"
MAX_PROOF_VALUE_CHARS = 1 + 88  # "z" + base58btc of a 64-byte signature (at most 88 characters)


# -- did:key -------------------------------------------------------------------------------------

def x25519_from_ed25519(public: bytes) -> bytes:
    """The X25519 key of an Ed25519 public key: u = (1 + y) / (1 - y) mod p (RFC 7748 4.1).

    This is the conversion did:key names (Group OSCORE 2.4.2) and libsodium implements as
    ``crypto_sign_ed25519_pk_to_curve25519``.
    """
    if len(public) != 32:
        raise ValueError(f"an Ed25519 public key has 32 bytes, not {len(public)}")
    y = int.from_bytes(public, "little") & ((1 << 255) - 1)
    if y >= _P or y == 1:
        raise ValueError("not an Ed25519 public key with an X25519 equivalent")
    return ((1 + y) * pow(1 - y, -1, _P) % _P).to_bytes(32, "little")


def _did_key_document(public: bytes) -> dict[str, Any]:
    did = did_from_public(public)
    sig_id = f"{did}#{did[len(_DID_KEY):]}"
    x_multibase = "z" + base58.b58encode(
        _X25519_PUB_MULTICODEC + x25519_from_ed25519(public)).decode()
    enc_id = f"{did}#{x_multibase}"
    return {
        "@context": [DID_CONTEXT, MULTIKEY_CONTEXT],
        "id": did,
        "verificationMethod": [
            {"id": sig_id, "type": "Multikey", "controller": did,
             "publicKeyMultibase": did[len(_DID_KEY):]},
            {"id": enc_id, "type": "Multikey", "controller": did,
             "publicKeyMultibase": x_multibase},
        ],
        "authentication": [sig_id],
        "assertionMethod": [sig_id],
        "capabilityDelegation": [sig_id],
        "capabilityInvocation": [sig_id],
        "keyAgreement": [enc_id],
    }


# -- did:wba -------------------------------------------------------------------------------------

def _split_domain(domain: Any) -> tuple[str, int | None]:
    """(host, port) of a bare ``HOST[:PORT]``; ValueError saying what is wrong otherwise."""
    if not isinstance(domain, str) or not domain:
        raise ValueError("did:wba needs a domain such as 'example.com' or 'example.com:8443'")
    if any(_is_ip(c) for c in (domain, domain.strip("[]"), domain.rsplit(":", 1)[0].strip("[]"))):
        raise ValueError(f"domain {domain!r} is an IP address; did:wba needs a DNS name "
                         "that the server's TLS certificate matches (ANP-03 2.2)")
    if "://" in domain or any(c in domain for c in "/?#@[] \\"):
        raise ValueError(f"domain {domain!r} must be a bare HOST[:PORT], without scheme, "
                         "user, path, query, brackets or spaces")
    if not domain.isascii():
        raise ValueError(f"domain {domain!r} is not ASCII: give its punycode (xn--) form")
    host, sep, port_s = domain.partition(":")
    port = None
    if sep:
        if not port_s.isdigit() or port_s != str(int(port_s)) or not 1 <= int(port_s) <= 65535:
            raise ValueError(f"domain {domain!r}: the port must be a number from 1 to 65535 "
                             "without leading zeros")
        port = int(port_s)
    host = host.lower()
    labels = host.split(".")
    if (len(host) > 253 or len(labels) < 2 or not all(_LABEL.fullmatch(x) for x in labels)
            or labels[-1].isdigit()):
        raise ValueError(f"domain {domain!r}: {host!r} is not a fully qualified domain name "
                         "(dot-separated labels of letters, digits and inner hyphens)")
    return host, port


def check_domain(domain: str) -> str:
    """``domain`` normalized (lower-case host, optional port); raises ValueError naming what
    is wrong, so a node can refuse a bad ``--domain`` at start instead of at the first request."""
    host, port = _split_domain(domain)
    return host if port is None else f"{host}:{port}"


def _segments(path: str) -> list[str]:
    segments = path.strip("/").split("/") if path.strip("/") else []
    for s in segments:
        if not _SEGMENT.fullmatch(s) or s in (".", ".."):
            raise ValueError(f"path segment {s!r} must be letters, digits, '-', '_' or '.'")
    return segments


def did_wba(domain: str, peer_id: str, *, path: str = AGENTS_PATH) -> str:
    """The did:wba DID of node ``peer_id`` under ``domain`` (``HOST`` or ``HOST:PORT``).

    ``did:wba:example.com%3A8443:agents:12D3KooW...``, which resolves to
    ``https://example.com:8443/agents/12D3KooW.../did.json``. ``path`` is the folder holding the
    per-node folders ('' for none). Raises ValueError on a bad domain, path or PeerID.
    """
    host, port = _split_domain(domain)
    try:
        public_from_peer_id(peer_id)
    except IdentityError as exc:
        raise ValueError(f"{exc}; a node's did:wba DID ends in its Ed25519 PeerID") from None
    authority = host if port is None else f"{host}%3A{port}"
    return ":".join([f"{_DID_WBA}{authority}", *_segments(path), peer_id])


def did_wba_url(did: str) -> str:
    """The HTTPS URL of the DID document of ``did`` (ANP-03 2.5.2 resolution rules)."""
    if not isinstance(did, str) or not did.startswith(_DID_WBA):
        raise ValueError(f"{did!r} is not a did:wba DID")
    if any(c in did for c in "#?/"):
        raise ValueError(f"{did!r} is a DID URL; give the DID without path, query or fragment")
    authority, *segments = did[len(_DID_WBA):].split(":")
    decoded = re.sub("%3[Aa]", ":", authority)
    if "%" in decoded:
        raise ValueError(f"{did!r}: only the host/port colon may be percent-encoded (%3A)")
    host, port = _split_domain(decoded)
    _segments("/".join(segments))
    if any(not s for s in segments):
        raise ValueError(f"{did!r} has an empty path segment")
    netloc = host if port is None else f"{host}:{port}"
    tail = "/".join(segments) + "/did.json" if segments else ".well-known/did.json"
    return f"https://{netloc}/{tail}"


def did_document(identity_public: bytes, *, domain: str | None = None, path: str | None = None,
                 service_url: str | None = None) -> dict[str, Any]:
    """The DID document of the node whose Ed25519 public key is ``identity_public``.

    Without ``domain``: the did:key document (did:key v0.9 creation algorithm with
    ``publicKeyFormat`` Multikey and ``enableEncryptionKeyDerivation``), i.e. the Ed25519 key as a
    ``Multikey`` in every verification relationship plus its derived X25519 ``Multikey`` in
    ``keyAgreement``. A did:key document is fixed by the key, so ``path`` and ``service_url``
    are refused.

    With ``domain``: the did:wba document of ``did_wba(domain, peer_id, path=...)``: the same key as
    ``Multikey`` ``#key-1`` (the form anp's ``create_did_wba_document`` writes) in
    ``authentication`` and ``assertionMethod``, ``alsoKnownAs`` the did:key, and an
    ``AgentDescription`` service pointing at ``service_url`` (the ad.json URL) when given. It has
    no ``keyAgreement`` (veilnet does not speak ANP end-to-end encryption) and no ``proof``
    (optional outside ANP-03's ``e1_`` profile).
    """
    did_key = did_from_public(identity_public)
    if domain is None:
        if path is not None or service_url is not None:
            raise ValueError("path and service_url need a domain: a did:key document is "
                             "derived from the key alone")
        return _did_key_document(identity_public)
    did = did_wba(domain, peer_id_from_public(identity_public),
                  path=AGENTS_PATH if path is None else path)
    vm_id = f"{did}#{WBA_KEY_FRAGMENT}"
    doc: dict[str, Any] = {
        "@context": [DID_CONTEXT, MULTIKEY_CONTEXT],
        "id": did,
        "alsoKnownAs": [did_key],
        "verificationMethod": [{"id": vm_id, "type": "Multikey", "controller": did,
                                "publicKeyMultibase": did_key[len(_DID_KEY):]}],
        "authentication": [vm_id],
        "assertionMethod": [vm_id],
    }
    if service_url is not None:
        doc["service"] = [{"id": f"{did}#ad", "type": "AgentDescription",
                           "serviceEndpoint": _check_url(service_url, "service_url")}]
    return doc


# -- agent description ---------------------------------------------------------------------------

def agent_description_url(base_url: str, peer_id: str) -> str:
    """Where a node's description lives: ``{base_url}/agents/{peer_id}/ad.json``."""
    return f"{_check_url(base_url, 'base_url').rstrip('/')}/{AGENTS_PATH}/{peer_id}/ad.json"


def agent_description(info: CardInfo, *, base_url: str, did: str, identity: Identity | None = None,
                      owner: Mapping[str, str] | None = None) -> dict[str, Any]:
    """The ANP-07 v1.1 Agent Description of the node whose verified card is ``info``.

    ``did`` is the node's did:key (``info.did``) or its did:wba DID (which must end in
    ``info.peer_id``). ``interfaces`` lists the A2A JSON-RPC endpoint and the A2A agent card at
    ``{base_url}/.well-known/agent-card.json``; the served models and shards sit in the
    ``veilnetNode`` domain extension. The node requires no caller authentication, so the
    (required) security definition is W3C WoT's ``nosec`` scheme, the vocabulary ANP-07's
    security section follows. With ``identity`` (the card's key) the description carries an
    ``eddsa-jcs-2022`` proof. ``created`` (and the proof's) is the card's issue time, so one card
    always gives the same bytes.
    """
    base = _check_url(base_url, "base_url").rstrip("/")
    if did != info.did and not (did.startswith(_DID_WBA) and did.rsplit(":", 1)[-1]
                                == info.peer_id):
        raise ValueError(f"{did!r} is neither the card's did:key nor a did:wba DID ending in "
                         f"its PeerID {info.peer_id}")
    if did.startswith(_DID_WBA):
        did_wba_url(did)
    created = _iso(info.issued_at)
    models: dict[tuple[str, str, str], list[dict[str, Any]]] = {}
    for s in sorted(info.shards, key=lambda s: (s.model, s.deployment, s.index, s.shard)):
        models.setdefault((s.model, s.deployment, s.encryption), []).append(
            {"cid": s.shard, "index": s.index})
    doc: dict[str, Any] = {
        "protocolType": "ANP", "protocolVersion": ANP_PROTOCOL_VERSION, "type": "AgentDescription",
        "url": agent_description_url(base, info.peer_id),
        "name": info.card["name"],
        "did": did,
        "description": info.card["description"],
        "created": created,
        "securityDefinitions": {"nosec_sc": {
            "scheme": "nosec", "in": "auto",
            "description": "No authentication. What a request reveals to this node depends "
                           "on its deployment's encryption scheme (veilnetNode.models; "
                           "docs/threat-model.md)."}},
        "security": "nosec_sc",
        "interfaces": [
            {"type": "StructuredInterface", "protocol": "A2A", "version": A2A_PROTOCOL_VERSION,
             "url": info.a2a_url,
             "description": "A2A JSON-RPC endpoint (binding JSONRPC): send a message whose data "
                            "part holds a veilnet infer request."},
            {"type": "StructuredInterface", "protocol": "A2A", "version": A2A_PROTOCOL_VERSION,
             "url": f"{base}/.well-known/agent-card.json",
             "description": "The node's signed A2A agent card: skills, served shards and the "
                            "JSON-RPC endpoint."},
        ],
        "veilnetNode": {
            "type": "VeilnetNode", "peerId": info.peer_id, "multiaddrs": list(info.multiaddrs),
            "capacity": info.capacity, "validUntil": _iso(info.expires_at),
            "models": [{"name": m, "deployment": d, "encryption": e, "shards": shards}
                       for (m, d, e), shards in models.items()],
        },
    }
    if owner is not None:
        doc["owner"] = dict(owner)
    if identity is None:
        return doc
    if identity.did != info.did:
        raise ValueError(f"identity {identity.did} did not sign this card ({info.did})")
    vm = identity.key_id if did == info.did else f"{did}#{WBA_KEY_FRAGMENT}"
    proof = {"type": PROOF_TYPE, "cryptosuite": CRYPTOSUITE, "created": created,
             "verificationMethod": vm, "proofPurpose": PROOF_PURPOSE}
    signature = identity.sign(_signing_input(doc, proof))
    return {**doc, "proof": {**proof, "proofValue": "z" + base58.b58encode(signature).decode()}}


def verify_agent_description(doc: Any) -> None:
    """Check the ``eddsa-jcs-2022`` proof of an agent description; ValueError if it fails.

    The key comes from the description's ``did``: a did:key, or a did:wba DID ending in an
    Ed25519 PeerID (as every veilnet node DID does), so nothing is fetched.
    """
    if not isinstance(doc, dict):
        raise ValueError("agent description is not a JSON object")
    proof = doc.get("proof")
    if not isinstance(proof, dict):
        raise ValueError("agent description has no proof")
    for key in ("type", "cryptosuite", "created", "verificationMethod", "proofPurpose",
                "proofValue"):
        if not isinstance(proof.get(key), str) or not proof[key]:
            raise ValueError(f"proof.{key} must be a non-empty string")
    if (proof["type"], proof["cryptosuite"]) != (PROOF_TYPE, CRYPTOSUITE):
        raise ValueError(f"proof is {proof['type']}/{proof['cryptosuite']}, "
                         f"expected {PROOF_TYPE}/{CRYPTOSUITE}")
    if proof["proofPurpose"] != PROOF_PURPOSE:
        raise ValueError(f"proof.proofPurpose is {proof['proofPurpose']!r}, not {PROOF_PURPOSE}")
    did = doc.get("did")
    if not isinstance(did, str):
        raise ValueError("agent description has no 'did'")
    vm_did, _, fragment = proof["verificationMethod"].partition("#")
    if vm_did != did:
        raise ValueError(f"proof key {proof['verificationMethod']!r} is not a key of {did}")
    public, key_fragment = _key_of(did)
    if fragment != key_fragment:
        raise ValueError(f"proof key {proof['verificationMethod']!r} is not {did}#{key_fragment}")
    try:
        datetime.strptime(proof["created"], _TIME)
    except ValueError:
        raise ValueError(f"proof.created {proof['created']!r} is not {_TIME}") from None
    value = proof["proofValue"]
    signature = b""
    # base58 decoding is quadratic in the length (70,000 characters took 5 s): anything longer
    # than a 64-byte signature's encoding is refused undecoded
    if value.startswith("z") and len(value) <= MAX_PROOF_VALUE_CHARS:
        try:
            signature = base58.b58decode(value[1:])
        except ValueError:
            signature = b""
    if len(signature) != 64:
        raise ValueError("proof.proofValue is not a base58btc multibase Ed25519 signature")
    if not verify(public, signature, _signing_input(doc, proof)):
        raise ValueError(f"proof signature does not verify against {did}")


def _key_of(did: str) -> tuple[bytes, str]:
    try:
        if did.startswith(_DID_KEY):
            return public_from_did(did), did[len(_DID_KEY):]
        if did.startswith(_DID_WBA):
            did_wba_url(did)
            return public_from_peer_id(did.rsplit(":", 1)[-1]), WBA_KEY_FRAGMENT
    except IdentityError as exc:
        raise ValueError(f"cannot take a key from {did}: {exc}") from None
    raise ValueError(f"{did!r} is neither a did:key nor a did:wba DID")


def _signing_input(doc: Mapping[str, Any], proof: Mapping[str, Any]) -> bytes:
    """eddsa-jcs-2022 hashData: SHA-256(JCS(proof config)) || SHA-256(JCS(document)).

    The proof config is the proof without ``proofValue``. A description has no ``@context``, so
    the suite's step copying it into the proof config does not arise.
    """
    config = {k: v for k, v in proof.items() if k != "proofValue"}
    body = {k: v for k, v in doc.items() if k != "proof"}
    try:
        return (hashlib.sha256(rfc8785.dumps(config)).digest()
                + hashlib.sha256(rfc8785.dumps(body)).digest())
    except (rfc8785.CanonicalizationError, TypeError, ValueError, RecursionError) as exc:
        raise ValueError(f"agent description cannot be canonicalized: {exc}") from None


# -- discovery -----------------------------------------------------------------------------------

def collection_page(entries: Iterable[tuple[str, str]], *, url: str,
                    next_url: str | None = None) -> dict[str, Any]:
    """An ANP-08 ``CollectionPage`` for ``/.well-known/agent-descriptions``.

    ``entries`` are (name, ad.json URL) pairs: an item carries ``@type``, ``name`` and ``@id``
    only. ``next`` is written only when ``next_url`` is given (more pages follow).
    """
    items = []
    for entry in entries:
        if not isinstance(entry, tuple) or len(entry) != 2:
            raise ValueError(f"entry {entry!r} is not a (name, ad_url) pair")
        name, ad_url = entry
        if not isinstance(name, str) or not name:
            raise ValueError(f"entry {entry!r} needs a non-empty name")
        items.append({"@type": "ad:AgentDescription", "name": name,
                      "@id": _check_url(ad_url, "ad_url")})
    page: dict[str, Any] = {"@context": dict(DISCOVERY_CONTEXT), "@type": "CollectionPage",
                            "url": _check_url(url, "url"), "items": items}
    if next_url is not None:
        page["next"] = _check_url(next_url, "next_url")
    return page


# -- helpers -------------------------------------------------------------------------------------

def _check_url(url: Any, what: str) -> str:
    if not isinstance(url, str):
        raise ValueError(f"{what} must be a string URL")
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.netloc or parts.fragment:
        raise ValueError(f"{what} {url!r} must be an absolute http(s) URL without a fragment")
    return url


def _is_ip(text: str) -> bool:
    try:
        ipaddress.ip_address(text)
    except ValueError:
        return False
    return True


def _iso(timestamp: int) -> str:
    return datetime.fromtimestamp(timestamp, UTC).strftime(_TIME)
