"""A2A v1.0 agent cards for veilnet nodes: building, signing and verifying them.

A card is a plain JSON object in the A2A v1.0 AgentCard shape (specification/a2a.proto, JSON
names). veilnet's own data sits in one ``capabilities.extensions`` entry whose ``uri`` is
``EXTENSION_URI`` (format in docs/agent-card.md). The signature is a detached-payload JWS over the
RFC 8785 canonical form of the card without ``signatures``.

Canonical form: A2A verifiers (a2a-sdk) drop empty strings, lists and objects before
canonicalizing, and read the card through protobuf, which drops ``false`` and other default
values. ``canonical_bytes`` drops the same empty values, and ``build_card`` never writes a default
protobuf value, so the bytes we sign are the bytes any A2A verifier recomputes.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import rfc8785

from crypto.identity import Identity, IdentityError, peer_id_from_did, public_from_did
from crypto.jws import JWSError, protected_header, sign_detached, verify_detached
from errors import InputError

EXTENSION_URI = "urn:veilnet:a2a-extension:node:1"
A2A_PROTOCOL_VERSION = "1.0"
MEDIA_TYPE = "application/json"
MAX_CARD_BYTES = 64 * 1024     # a card naming 256 shards and 8 addresses is about 40 KiB
# Longest validity a card may claim. Nodes announce every interval (default 10 s, longer in a
# large network: node/discovery.py) and sign cards valid for 3 intervals (at least 30 s), so
# 3600 s allows intervals up to 1200 s: a network of 2,400 nodes stays at 2 cards/s per node.
# A card nobody renews (a Sybil card POSTed once, a departed node) drops out of every index
# within the hour; lookups leave out a card whose addresses fail a dial before then.
MAX_TTL_S = 3600
MIN_TTL_S = 30.0               # a card lives at least this long, however short the interval
CLOCK_SKEW_S = 60              # how far in the future issuedAt may be
MAX_ADDRS = 8
MAX_DEPTH = 32                 # nesting of objects and lists (a2a-sdk refuses beyond 128)
MAX_SHARDS = 256
MAX_SCHEME_CHARS = 64
THREAT_MODEL = "docs/threat-model.md"  # in the veilnet source: what a node learns, measured

# What each deployment scheme (a manifest's ``encryption``) lets the serving node see. The
# skill text of a card says exactly this; it must never promise more than docs/threat-model.md
# measures (tests/network/test_hardening_cards.py checks the wording of both schemes).
SCHEME_TEXT = {
    "ee-encoder/1": (
        "Shards encrypted with ee-encoder/1 (equivariant encryption): clients send activations "
        "transformed with their secret key. That hides them only in part (the node still sees "
        "token counts, attention patterns and each token's values up to a permutation) and only "
        "from a node that does not hold the model's plaintext weights; for a model whose "
        "weights are public (such as all-MiniLM-L6-v2) " + THREAT_MODEL + " measures that such "
        "a node recovers the key and reads the input tokens."),
    "ee-decoder/1": (
        "Shards encrypted with ee-decoder/1 (equivariant encryption of a decoder): activations "
        "and the KV cache this node keeps are transformed with the client's secret key. That "
        "hides them only in part (the node still sees token counts, attention patterns, "
        "per-token RMS norms and FFN gate values up to a permutation); for a model whose "
        "weights are public (such as SmolLM2) " + THREAT_MODEL + " measures that a node "
        "recovers the key in seconds and that the first node reads the prompt tokens from "
        "norms even without the key."),
    "masked/1": (
        "Shards of a masked/1 deployment (masked offload): plain linear layers on public "
        "weights, run in float64 on inputs the client masks with fresh Gaussian noise per call, "
        "scaled for at most 1e-4 bits per token per query; the node sees row counts (the "
        "sequence length padded to a bucket) but never the attention mask. The mask's product "
        "comes from a second node of another operator that receives only a seed: if the two "
        "collude they recover the input (" + THREAT_MODEL + "). Every product is checked by "
        "the client (Freivalds)."),
    "none": (
        "Plaintext shards (encryption none): the node sees the activations a client sends, "
        "unless the client uses CKKS mode (request encryption \"ckks\", for low-depth "
        "Gemm-square-Gemm shards such as digits-mlp); then it computes on ciphertexts without "
        "the secret key and learns their sizes and timing (" + THREAT_MODEL + ")."),
}

# Drop reasons, also the values of the ``reason`` label in /metrics.
REASONS = ("oversized", "malformed", "no-signature", "bad-signature", "key-mismatch",
           "origin-mismatch", "expired", "not-yet-valid")


class CardRejected(InputError):
    """A card that must not be indexed; ``reason`` is one of REASONS."""

    def __init__(self, reason: str, message: str) -> None:
        assert reason in REASONS, reason
        super().__init__(f"{reason}: {message}")
        self.reason = reason


@dataclass(frozen=True)
class ServedShard:
    deployment: str   # deployment manifest CID
    model: str
    shard: str        # shard CID
    index: int
    encryption: str = "none"  # the deployment manifest's scheme: "ee-encoder/1", "none"


@dataclass(frozen=True)
class CardInfo:
    """The facts of a verified card, and the card itself."""

    card: dict[str, Any]
    did: str
    peer_id: str
    multiaddrs: list[str]
    http: str | None
    a2a_url: str
    capacity: int
    issued_at: int
    expires_at: int
    shards: list[ServedShard] = field(default_factory=list)
    ledger_key: str | None = None   # C2SP verifier key of the log this node keeps, if any
    witness_key: str | None = None  # C2SP cosignature verifier key of this node's witness

    @property
    def shard_cids(self) -> list[str]:
        return sorted({s.shard for s in self.shards})


# -- canonical form and signature --------------------------------------------------------------


def card_ttl(interval: float) -> float:
    """The validity a node signs its card for when it announces every ``interval`` seconds:
    three intervals (two announcements may be missed), at least MIN_TTL_S, at most MAX_TTL_S."""
    return min(MAX_TTL_S, max(MIN_TTL_S, 3 * interval))

def clean_empty(value: Any) -> Any:
    """``value`` without empty strings, lists and objects, recursively (None when all empty)."""
    if isinstance(value, dict):
        cleaned = {k: c for k, v in value.items() if (c := clean_empty(v)) is not None}
        return cleaned or None
    if isinstance(value, list):
        items = [c for v in value if (c := clean_empty(v)) is not None]
        return items or None
    if isinstance(value, str) and not value:
        return None
    return value


def canonical_bytes(card: Mapping[str, Any]) -> bytes:
    """RFC 8785 form of ``card`` without ``signatures`` and empty values: the signed payload."""
    body = {k: v for k, v in card.items() if k != "signatures"}
    try:
        return rfc8785.dumps(clean_empty(body) or {})
    except (rfc8785.CanonicalizationError, TypeError, ValueError, RecursionError) as exc:
        raise CardRejected("malformed", f"card cannot be canonicalized: {exc}") from None


def sign_card(card: dict[str, Any], identity: Identity) -> dict[str, Any]:
    """``card`` with ``signatures`` set to one EdDSA JWS by ``identity`` (kid: its did:key URL)."""
    protected, signature = sign_detached(identity, canonical_bytes(card), identity.key_id)
    return {**card, "signatures": [{"protected": protected, "signature": signature}]}


# -- building ------------------------------------------------------------------------------------

def build_card(identity: Identity, *, a2a_url: str, multiaddrs: Iterable[str],
               shards: Iterable[ServedShard], http: str | None = None, capacity: int = 1,
               ttl: float = 60.0, version: str = "0.1.0", now: float | None = None,
               ledger_key: str | None = None, witness_key: str | None = None,
               ) -> dict[str, Any]:
    """The signed card of a node serving ``shards``, valid for ``ttl`` seconds from ``now``."""
    issued = int(now if now is not None else time.time())
    served = sorted(set(shards), key=lambda s: (s.model, s.deployment, s.index, s.shard))
    by_deployment: dict[str, list[ServedShard]] = {}
    for s in served:
        by_deployment.setdefault(s.deployment, []).append(s)
    models = sorted({s.model for s in served})
    params: dict[str, Any] = {
        "did": identity.did,
        "peerId": identity.peer_id,
        "multiaddrs": list(multiaddrs)[:MAX_ADDRS],
        "http": http or "",
        "capacity": int(capacity),
        "issuedAt": issued,
        "expiresAt": issued + max(1, math.ceil(ttl)),
        "deployments": [
            {"cid": cid, "model": group[0].model, "encryption": _scheme_of(cid, group),
             "shards": [{"cid": s.shard, "index": s.index} for s in group]}
            for cid, group in sorted(by_deployment.items())
        ],
    }
    if ledger_key:
        params["ledgerKey"] = ledger_key
    if witness_key:
        params["witnessKey"] = witness_key
    skills = []
    for model in models:
        mine = [s for s in served if s.model == model]
        skills.append({
            "id": f"veilnet-infer-{model}",
            "name": f"{model} shard inference",
            "description": skill_description(model, mine),
            "tags": ["veilnet", "inference", f"model:{model}",
                     *sorted({f"encryption:{s.encryption}" for s in mine}),
                     *sorted({f"deployment:{s.deployment}" for s in mine}),
                     *sorted({f"shard:{s.shard}" for s in mine})],
            "inputModes": [MEDIA_TYPE],
            "outputModes": [MEDIA_TYPE],
        })
    if not skills:  # A2A requires at least one skill
        skills.append({
            "id": "veilnet-infer",
            "name": "shard inference (no shards yet)",
            "description": "This node serves no model shards yet; its card will list them.",
            "tags": ["veilnet", "inference"],
        })
    short = identity.peer_id[-8:]
    card = {
        "name": f"veilnet node {short}",
        "description": ("A veilnet inference node: runs model shards for clients. Each "
                        "deployment's encryption scheme is in its skill and in the veilnet "
                        f"extension; what a node can learn under each: {THREAT_MODEL}. Serves: "
                        + (", ".join(models) if models else "no shards yet") + "."),
        "supportedInterfaces": [{"url": a2a_url, "protocolBinding": "JSONRPC",
                                 "protocolVersion": A2A_PROTOCOL_VERSION}],
        "version": version,
        "capabilities": {"extensions": [{
            "uri": EXTENSION_URI,
            "description": "veilnet node: DID, PeerID, multiaddrs, served shards, expiry",
            "params": params,
        }]},
        "defaultInputModes": [MEDIA_TYPE],
        "defaultOutputModes": [MEDIA_TYPE],
        "skills": skills,
    }
    return sign_card(card, identity)


def skill_description(model: str, shards: Iterable[ServedShard]) -> str:
    """The skill text for ``model``: the scheme of each deployment, in the words of
    SCHEME_TEXT (an unknown scheme is named, with no claim about it)."""
    by_scheme: dict[str, set[str]] = {}
    for s in shards:
        by_scheme.setdefault(s.encryption, set()).add(s.deployment)
    parts = [f"Runs node shards of {model}."]
    for scheme, deployments in sorted(by_scheme.items()):
        if len(by_scheme) > 1:
            parts.append(f"Deployment {', '.join(sorted(deployments))}:")
        parts.append(SCHEME_TEXT.get(scheme, f"Shards of encryption scheme {scheme!r}; see "
                                             f"{THREAT_MODEL} for what it hides."))
    parts.append("Send a data part holding a veilnet infer request (docs/agent-card.md).")
    return " ".join(parts)


def _scheme_of(deployment: str, group: list[ServedShard]) -> str:
    schemes = {s.encryption for s in group}
    if len(schemes) != 1:
        raise ValueError(f"deployment {deployment} is given two encryption schemes: "
                         f"{sorted(schemes)}")
    return schemes.pop()


# -- verifying -----------------------------------------------------------------------------------

def parse_card_json(data: bytes | str) -> dict[str, Any]:
    """The JSON object in ``data``; rejects oversized or non-object input."""
    if len(data) > MAX_CARD_BYTES:
        raise CardRejected("oversized", f"card is {len(data)} bytes, limit {MAX_CARD_BYTES}")
    try:
        doc = json.loads(data)
    except (ValueError, RecursionError) as exc:
        raise CardRejected("malformed", f"card is not JSON: {exc}") from None
    if not isinstance(doc, dict):
        raise CardRejected("malformed", "card is not a JSON object")
    return doc


def verify_card(card: Any, *, origin_peer: str | None = None,
                now: float | None = None) -> CardInfo:
    """Check a card and return its facts; raises CardRejected with the first failed check.

    Checks, in order: size, shape, the JWS (EdDSA, kid a did:key URL of the DID the card names),
    the relaying peer when ``origin_peer`` is given, and the validity window.
    """
    if not isinstance(card, dict):
        raise CardRejected("malformed", "card is not a JSON object")
    if _depth(card) > MAX_DEPTH:
        raise CardRejected("malformed", f"card nests deeper than {MAX_DEPTH} levels")
    try:
        size = len(json.dumps(card, separators=(",", ":"), ensure_ascii=False).encode())
    except (ValueError, TypeError) as exc:  # lone surrogates, non-JSON values
        raise CardRejected("malformed", f"card is not encodable JSON: {exc}") from None
    if size > MAX_CARD_BYTES:
        raise CardRejected("oversized", f"card is {size} bytes, limit {MAX_CARD_BYTES}")
    params = extension_params(card)
    did, peer_id = _identity_of(params)
    _check_signature(card, did)
    if origin_peer is not None and origin_peer != peer_id:
        raise CardRejected("origin-mismatch",
                           f"card of {peer_id} was published by {origin_peer}")
    issued, expires = _int(params, "issuedAt"), _int(params, "expiresAt")
    now = time.time() if now is None else now
    if expires <= now:
        raise CardRejected("expired", f"card expired {now - expires:.0f} s ago")
    if issued > now + CLOCK_SKEW_S:
        raise CardRejected("not-yet-valid", f"card is issued {issued - now:.0f} s in the future")
    if expires - issued > MAX_TTL_S:
        raise CardRejected("malformed", f"card claims {expires - issued} s validity, limit "
                                        f"{MAX_TTL_S} s (nodes re-sign theirs every announce "
                                        "interval)")
    return CardInfo(card=card, did=did, peer_id=peer_id, multiaddrs=_addrs(params),
                    http=_opt_str(params, "http"), a2a_url=_a2a_url(card),
                    capacity=_int(params, "capacity", default=1), issued_at=issued,
                    expires_at=expires, shards=_shards(params),
                    ledger_key=_opt_str(params, "ledgerKey"),
                    witness_key=_opt_str(params, "witnessKey"))


def _depth(value: Any) -> int:
    """Nesting depth of lists and objects, without recursion (cards come from strangers)."""
    deepest, stack = 0, [(value, 1)]
    while stack:
        item, level = stack.pop()
        if isinstance(item, dict):
            item = list(item.values())
        if isinstance(item, list):
            deepest = max(deepest, level)
            if deepest > MAX_DEPTH:
                return deepest
            stack.extend((v, level + 1) for v in item)
    return deepest


def extension_params(card: dict[str, Any]) -> dict[str, Any]:
    """The params of the card's veilnet extension; raises CardRejected when the card's shape
    is wrong."""
    for key in ("name", "description", "version"):
        if not isinstance(card.get(key), str) or not card[key]:
            raise CardRejected("malformed", f"card field {key!r} must be a non-empty string")
    for key in ("supportedInterfaces", "defaultInputModes", "defaultOutputModes", "skills"):
        if not isinstance(card.get(key), list):
            raise CardRejected("malformed", f"card field {key!r} must be a list")
    caps = card.get("capabilities")
    exts = caps.get("extensions") if isinstance(caps, dict) else None
    if not isinstance(exts, list):
        raise CardRejected("malformed", "card has no capabilities.extensions list")
    ours = [e for e in exts if isinstance(e, dict) and e.get("uri") == EXTENSION_URI]
    if len(ours) != 1:
        raise CardRejected("malformed", f"card needs exactly one {EXTENSION_URI} extension, "
                                        f"has {len(ours)}")
    params = ours[0].get("params")
    if not isinstance(params, dict):
        raise CardRejected("malformed", "veilnet extension has no params object")
    return params


def _identity_of(params: dict[str, Any]) -> tuple[str, str]:
    did, peer_id = params.get("did"), params.get("peerId")
    if not isinstance(did, str) or not isinstance(peer_id, str):
        raise CardRejected("malformed", "veilnet extension needs string 'did' and 'peerId'")
    try:
        derived = peer_id_from_did(did)
    except IdentityError as exc:
        raise CardRejected("malformed", f"extension did: {exc}") from None
    if derived != peer_id:
        raise CardRejected("key-mismatch", f"did {did} is not the key of peerId {peer_id}")
    return did, peer_id


def _check_signature(card: dict[str, Any], did: str) -> None:
    sigs = card.get("signatures")
    if not isinstance(sigs, list) or not sigs:
        raise CardRejected("no-signature", "card has no signatures")
    payload = canonical_bytes(card)
    errors = []
    for sig in sigs:
        if not isinstance(sig, dict) or not all(
                isinstance(sig.get(k), str) for k in ("protected", "signature")):
            errors.append("signature entry needs string 'protected' and 'signature'")
            continue
        try:
            header = protected_header(sig["protected"])
            kid = header.get("kid")
            if header.get("alg") != "EdDSA":
                errors.append(f"alg {header.get('alg')!r} is not EdDSA")
                continue
            if not isinstance(kid, str) or kid.split("#", 1)[0] != did:
                errors.append(f"kid {kid!r} is not a key of {did}")
                continue
            verify_detached(sig["protected"], sig["signature"], payload, public_from_did(did))
            return
        except JWSError as exc:
            errors.append(str(exc))
    reason = "key-mismatch" if all(e.startswith("kid ") for e in errors) else "bad-signature"
    raise CardRejected(reason, "; ".join(errors))


def _int(params: dict[str, Any], key: str, default: int | None = None) -> int:
    value = params.get(key, default)
    # a2a-sdk reads params through protobuf Struct, where every number is a float
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    if not isinstance(value, int) or isinstance(value, bool) or value < 0:
        raise CardRejected("malformed", f"veilnet extension {key!r} must be an integer >= 0")
    return value


def _opt_str(params: dict[str, Any], key: str) -> str | None:
    value = params.get(key)
    if value is not None and not isinstance(value, str):
        raise CardRejected("malformed", f"veilnet extension {key!r} must be a string")
    return value or None


def _addrs(params: dict[str, Any]) -> list[str]:
    addrs = params.get("multiaddrs", [])
    if (not isinstance(addrs, list) or len(addrs) > MAX_ADDRS
            or not all(isinstance(a, str) and a.startswith("/") and len(a) < 300
                       for a in addrs)):
        raise CardRejected("malformed", f"'multiaddrs' must be at most {MAX_ADDRS} multiaddrs")
    return addrs


def _a2a_url(card: dict[str, Any]) -> str:
    for iface in card["supportedInterfaces"]:
        if isinstance(iface, dict) and iface.get("protocolBinding") == "JSONRPC" \
                and isinstance(iface.get("url"), str):
            return iface["url"]
    raise CardRejected("malformed", "card has no JSONRPC entry in supportedInterfaces")


def _shards(params: dict[str, Any]) -> list[ServedShard]:
    deployments = params.get("deployments", [])
    if not isinstance(deployments, list):
        raise CardRejected("malformed", "'deployments' must be a list")
    out: list[ServedShard] = []
    for dep in deployments:
        if not isinstance(dep, dict) or not isinstance(dep.get("cid"), str) \
                or not isinstance(dep.get("model"), str) \
                or not isinstance(dep.get("shards", []), list):
            raise CardRejected("malformed", "each deployment needs 'cid', 'model', 'shards'")
        # a card that names no scheme promises nothing: read as "none"
        scheme = dep.get("encryption", "none")
        if not isinstance(scheme, str) or not 0 < len(scheme) <= MAX_SCHEME_CHARS:
            raise CardRejected("malformed", f"a deployment's 'encryption' must be a scheme name "
                                            f"of 1 to {MAX_SCHEME_CHARS} characters")
        for s in dep.get("shards", []):
            if not isinstance(s, dict) or not isinstance(s.get("cid"), str):
                raise CardRejected("malformed", "each shard needs a string 'cid'")
            out.append(ServedShard(dep["cid"], dep["model"], s["cid"], _int(s, "index"),
                                   scheme))
    if len(out) > MAX_SHARDS:
        raise CardRejected("oversized", f"card names {len(out)} shards, limit {MAX_SHARDS}")
    return out
