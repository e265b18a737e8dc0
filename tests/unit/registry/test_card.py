"""registry/card.py: building, signing and verifying A2A v1.0 agent cards.

Checked against independent sources: a2a-sdk's own signer, verifier and canonicalizer (through
the real protobuf AgentCard), the ``rfc8785`` package over an empty-value filter written here,
and raw ``cryptography`` Ed25519 over the JWS signing input assembled here (not PyJWT).
"""

from __future__ import annotations

import base64
import copy
import hashlib
import hmac
import json
import math
import warnings
from typing import Any

import pytest
import rfc8785
from a2a.types import AgentCard
from a2a.utils._jcs import canonicalize as a2a_canonicalize
from a2a.utils.signing import (
    InvalidSignaturesError,
    _canonicalize_agent_card,
    create_agent_card_signer,
    create_signature_verifier,
)
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
from google.protobuf.json_format import MessageToDict, ParseDict
from hypothesis import given, settings
from hypothesis import strategies as st
from jwt import PyJWK

from crypto.identity import Identity, public_from_did
from crypto.jws import sign_detached
from models.cid import cid_of_bytes
from registry.card import (
    EXTENSION_URI,
    MAX_CARD_BYTES,
    MAX_SHARDS,
    MAX_TTL_S,
    CardRejected,
    ServedShard,
    build_card,
    canonical_bytes,
    parse_card_json,
    sign_card,
    verify_card,
)

T0 = 1_795_474_959
IDENT = Identity.from_seed(bytes(range(32)))
OTHER = Identity.from_seed(bytes(range(1, 33)))
DEP_A, DEP_B = cid_of_bytes(b"deployment a"), cid_of_bytes(b"deployment b")
SHARDS = [
    ServedShard(DEP_A, "minilm", cid_of_bytes(b"a0"), 0),
    ServedShard(DEP_A, "minilm", cid_of_bytes(b"a1"), 1),
    ServedShard(DEP_B, "bert", cid_of_bytes(b"b3"), 3),
]
ADDRS = [f"/ip4/10.0.0.1/tcp/4001/p2p/{IDENT.peer_id}", "/ip6/::1/udp/4001/quic-v1"]


def b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def b64url_decode(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def make_card(identity: Identity = IDENT, shards=SHARDS, **kw: Any) -> dict[str, Any]:
    kw.setdefault("a2a_url", "http://127.0.0.1:8401/a2a")
    kw.setdefault("multiaddrs", ADDRS)
    kw.setdefault("now", T0)
    kw.setdefault("ttl", 30)
    return build_card(identity, shards=shards, **kw)


def params_of(card: dict[str, Any]) -> dict[str, Any]:
    return card["capabilities"]["extensions"][0]["params"]


def resign(card: dict[str, Any], identity: Identity = IDENT) -> dict[str, Any]:
    """``card`` signed afresh, so a later rejection cannot be the old signature's fault."""
    return sign_card({k: v for k, v in card.items() if k != "signatures"}, identity)


def reject_reason(card: Any, **kw: Any) -> str:
    with pytest.raises(CardRejected) as info:
        verify_card(card, **kw)
    return info.value.reason


def strip_empty(value: Any) -> Any:
    """Independent of registry.card.clean_empty: drop "", [] and {} bottom-up; None if empty."""
    if isinstance(value, dict):
        out = {}
        for key, item in value.items():
            item = strip_empty(item)
            if item is not None:
                out[key] = item
        return out if out else None
    if isinstance(value, list):
        kept = [strip_empty(item) for item in value]
        kept = [item for item in kept if item is not None]
        return kept if kept else None
    return None if value == "" else value


def a2a_key_provider(kid: str | None, jku: str | None) -> Ed25519PublicKey:
    assert kid is not None and jku is None
    return Ed25519PublicKey.from_public_bytes(public_from_did(kid))


A2A_VERIFY = create_signature_verifier(a2a_key_provider, ["EdDSA"])


def to_proto(card: dict[str, Any]) -> AgentCard:
    return ParseDict(card, AgentCard())


# -- build and verify ----------------------------------------------------------------------------

@pytest.mark.parametrize(("now", "ttl"), [(T0, 30), (T0 + 0.9, 30.5), (T0, 0.2), (T0, MAX_TTL_S)])
def test_round_trip_facts(now: float, ttl: float) -> None:
    card = make_card(now=now, ttl=ttl, http="http://127.0.0.1:8401", capacity=3)
    info = verify_card(card, now=now)
    issued = math.floor(now)
    assert info.issued_at == issued
    assert info.expires_at == issued + max(1, math.ceil(ttl))
    assert info.did == IDENT.did and info.peer_id == IDENT.peer_id
    assert info.multiaddrs == ADDRS
    assert info.http == "http://127.0.0.1:8401"
    assert info.a2a_url == "http://127.0.0.1:8401/a2a"
    assert info.capacity == 3
    assert sorted(info.shards, key=repr) == sorted(SHARDS, key=repr)
    assert info.shard_cids == sorted(s.shard for s in SHARDS)
    assert info.card is card


def test_round_trip_no_shards_no_http_and_address_cap() -> None:
    addrs = [f"/ip4/10.0.0.{i}/tcp/4001" for i in range(12)]
    card = make_card(shards=[], multiaddrs=addrs)
    info = verify_card(card, now=T0)
    assert info.shards == [] and info.shard_cids == []
    assert info.http is None
    assert info.multiaddrs == addrs[:8]
    assert card["skills"], "A2A requires at least one skill"


def test_round_trip_through_json_text() -> None:
    card = make_card()
    info = verify_card(parse_card_json(json.dumps(card).encode()), now=T0 + 1)
    assert info.card == card


# -- a2a-sdk interop -----------------------------------------------------------------------------

NON_ASCII = [ServedShard(cid_of_bytes(b"deployment c"), "modèle-東京-🚀", cid_of_bytes(b"x"), 0)]


@pytest.mark.parametrize("kind", ["shards", "no-shards", "non-ascii"])
def test_a2a_sdk_verifies_our_card(kind: str) -> None:
    shards = {"shards": SHARDS, "no-shards": [], "non-ascii": NON_ASCII}[kind]
    card = make_card(shards=shards, http="http://naïve.example:8401")
    verify_card(card, now=T0)
    A2A_VERIFY(to_proto(card))
    # the same verifier is not vacuous: a changed card fails it
    tampered = copy.deepcopy(card)
    tampered["name"] += "!"
    with pytest.raises(InvalidSignaturesError):
        A2A_VERIFY(to_proto(tampered))


def a2a_signed(card: dict[str, Any], identity: Identity) -> dict[str, Any]:
    jwk = PyJWK({"kty": "OKP", "crv": "Ed25519", "d": b64url(identity.seed()),
                 "x": b64url(identity.public)}, algorithm="EdDSA")
    signer = create_agent_card_signer(jwk, {"alg": "EdDSA", "typ": "JOSE",
                                            "kid": identity.key_id})
    unsigned = {k: v for k, v in card.items() if k != "signatures"}
    return MessageToDict(signer(to_proto(unsigned)))


@pytest.mark.parametrize("shards", [SHARDS, [], NON_ASCII], ids=["shards", "none", "non-ascii"])
def test_a2a_sdk_signed_card_passes_our_verify(shards: list[ServedShard]) -> None:
    ours = make_card(shards=shards)
    theirs = a2a_signed(ours, IDENT)
    header = json.loads(b64url_decode(theirs["signatures"][0]["protected"]))
    assert header == {"alg": "EdDSA", "typ": "JOSE", "kid": IDENT.key_id}
    info = verify_card(theirs, now=T0)
    assert info.did == IDENT.did
    assert sorted(info.shards, key=repr) == sorted(shards, key=repr)
    assert isinstance(params_of(theirs)["issuedAt"], float)  # it went through Struct
    # a2a-sdk signing with another identity's key but our kid is caught
    forged = a2a_signed(ours, OTHER)
    forged["signatures"] = [{**forged["signatures"][0],
                             "protected": b64url(json.dumps(
                                 {"alg": "EdDSA", "typ": "JOSE", "kid": IDENT.key_id}).encode())}]
    assert reject_reason(forged, now=T0) == "bad-signature"


def test_protobuf_round_trip_still_verifies() -> None:
    card = make_card(shards=SHARDS + NON_ASCII, capacity=0)
    back = MessageToDict(to_proto(card))
    params = params_of(back)
    assert isinstance(params["issuedAt"], float) and isinstance(params["capacity"], float)
    assert json.dumps(back) != json.dumps(card)  # 1795474959.0, not 1795474959
    info = verify_card(back, now=T0)
    assert info.issued_at == T0 and info.capacity == 0
    assert sorted(info.shards, key=repr) == sorted(SHARDS + NON_ASCII, key=repr)
    assert all(isinstance(s.index, int) for s in info.shards)


# -- canonical form ------------------------------------------------------------------------------

@pytest.mark.parametrize("shards", [SHARDS, [], NON_ASCII], ids=["shards", "none", "non-ascii"])
def test_canonical_bytes_independent(shards: list[ServedShard]) -> None:
    card = make_card(shards=shards)  # no http: params.http is "" and must vanish
    assert params_of(card)["http"] == ""
    body = {k: v for k, v in card.items() if k != "signatures"}
    expected = rfc8785.dumps(strip_empty(body))
    assert canonical_bytes(card) == expected
    assert b'"http"' not in expected
    assert canonical_bytes(card) == a2a_canonicalize(strip_empty(body)).encode()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert canonical_bytes(card) == _canonicalize_agent_card(to_proto(card)).encode()


def test_canonical_bytes_utf16_key_order_and_empty_values() -> None:
    doc = {"\ue000": 4, "😀": 3, "é": 2, "a": 1, "z": "", "e": {"x": [""], "y": {}},
           "n": 0, "f": False, "signatures": [{"protected": "p", "signature": "s"}]}
    # UTF-16 code units: a 0061 < é 00E9 < 😀 D83D DE00 < \ue000 E000 (code points put \ue000
    # before 😀); signatures and the empty members are gone; 0 and false stay.
    expected = '{"a":1,"f":false,"n":0,"é":2,"😀":3,"\ue000":4}'.encode()
    assert canonical_bytes(doc) == expected
    assert sorted(["\ue000", "😀"]) == ["\ue000", "😀"]  # code-point order differs
    assert a2a_canonicalize(strip_empty({k: v for k, v in doc.items()
                                         if k != "signatures"})).encode() == expected


# -- JWS -----------------------------------------------------------------------------------------

def test_jws_header_and_raw_ed25519_signature() -> None:
    card = make_card()
    [sig] = card["signatures"]
    header = json.loads(b64url_decode(sig["protected"]))
    assert header == {"alg": "EdDSA", "kid": IDENT.key_id, "typ": "JOSE"}
    assert "b64" not in header and "crit" not in header
    assert IDENT.key_id == f"{IDENT.did}#{IDENT.did.removeprefix('did:key:')}"
    signing_input = (sig["protected"] + "." + b64url(canonical_bytes(card))).encode("ascii")
    key = Ed25519PublicKey.from_public_bytes(public_from_did(IDENT.did))
    key.verify(b64url_decode(sig["signature"]), signing_input)
    with pytest.raises(InvalidSignature):
        key.verify(b64url_decode(sig["signature"]), signing_input + b"x")


# -- rejections ----------------------------------------------------------------------------------

def test_resigned_by_another_identity_is_key_mismatch() -> None:
    # sign_card puts the signer's own kid, which names a DID other than the card's
    assert reject_reason(resign(make_card(), OTHER), now=T0) == "key-mismatch"


def test_other_key_under_our_kid_is_bad_signature() -> None:
    card = make_card()
    protected, signature = sign_detached(OTHER, canonical_bytes(card), IDENT.key_id)
    card["signatures"] = [{"protected": protected, "signature": signature}]
    assert reject_reason(card, now=T0) == "bad-signature"


@pytest.mark.parametrize("where", ["shard", "deployment", "multiaddr", "name", "expiresAt"])
def test_tampered_card_is_bad_signature(where: str) -> None:
    card = make_card()
    verify_card(card, now=T0)
    params = params_of(card)
    if where == "shard":
        params["deployments"][0]["shards"][0]["cid"] = cid_of_bytes(b"evil")
    elif where == "deployment":
        params["deployments"][0]["cid"] = cid_of_bytes(b"evil")
    elif where == "multiaddr":
        params["multiaddrs"][0] = "/ip4/6.6.6.6/tcp/4001"
    elif where == "name":
        card["name"] = "veilnet node evil"
    else:
        params["expiresAt"] += 3600
    assert reject_reason(card, now=T0) == "bad-signature"


def test_extension_did_not_matching_peer_id_is_key_mismatch() -> None:
    card = make_card()
    params_of(card)["did"] = OTHER.did
    assert reject_reason(card, now=T0) == "key-mismatch"
    # and signed by the DID it names: still the peerId is someone else's
    assert reject_reason(resign(card, OTHER), now=T0) == "key-mismatch"


def test_kid_of_another_did_is_key_mismatch() -> None:
    card = make_card()
    [sig] = card["signatures"]
    header = {"alg": "EdDSA", "kid": OTHER.key_id, "typ": "JOSE"}
    card["signatures"] = [{**sig, "protected": b64url(json.dumps(header).encode())}]
    assert reject_reason(card, now=T0) == "key-mismatch"


def test_alg_none_and_hs256_are_bad_signature() -> None:
    card = make_card()
    payload = b64url(canonical_bytes(card))
    none = b64url(json.dumps({"alg": "none", "kid": IDENT.key_id, "typ": "JOSE"}).encode())
    card["signatures"] = [{"protected": none, "signature": ""}]
    assert reject_reason(card, now=T0) == "bad-signature"
    # HS256 keyed with the public key: the classic algorithm confusion
    hs = b64url(json.dumps({"alg": "HS256", "kid": IDENT.key_id, "typ": "JOSE"}).encode())
    mac = hmac.new(IDENT.public, f"{hs}.{payload}".encode(), hashlib.sha256).digest()
    card["signatures"] = [{"protected": hs, "signature": b64url(mac)}]
    assert reject_reason(card, now=T0) == "bad-signature"


def test_one_good_signature_among_bad_ones_is_enough() -> None:
    card = make_card()
    good = card["signatures"][0]
    card["signatures"] = [{"protected": "!!", "signature": "x"}, {"protected": 5}, good]
    assert verify_card(card, now=T0).did == IDENT.did
    card["signatures"] = [{"protected": "!!", "signature": "x"}, {"protected": 5}]
    assert reject_reason(card, now=T0) == "bad-signature"


@pytest.mark.parametrize("sigs", ["absent", [], None, "x", {}])
def test_no_signature(sigs: Any) -> None:
    card = make_card()
    if sigs == "absent":
        del card["signatures"]
    else:
        card["signatures"] = sigs
    assert reject_reason(card, now=T0) == "no-signature"


def test_validity_window() -> None:
    card = make_card(now=T0, ttl=30)
    assert verify_card(card, now=T0 + 29.9).expires_at == T0 + 30
    assert reject_reason(card, now=T0 + 30) == "expired"
    assert reject_reason(card, now=T0 + 10_000) == "expired"
    assert verify_card(card, now=T0 - 60).issued_at == T0  # within the clock skew
    assert reject_reason(card, now=T0 - 61) == "not-yet-valid"
    assert reject_reason(make_card(now=T0 + 86_400), now=T0) == "not-yet-valid"


def test_validity_beyond_max_ttl_is_malformed() -> None:
    assert verify_card(make_card(ttl=MAX_TTL_S), now=T0).expires_at == T0 + MAX_TTL_S
    assert reject_reason(make_card(ttl=MAX_TTL_S + 1), now=T0) == "malformed"
    # issue 12 item 9: a self-signed card valid for a day is refused, not kept for 24 h
    assert reject_reason(make_card(ttl=24 * 3600), now=T0) == "malformed"


# -- what a card claims about privacy (issue 12 item 8) -----------------------------------------

EE = [ServedShard(DEP_A, "all-MiniLM-L6-v2", cid_of_bytes(b"e1"), 1, "ee-encoder/1")]
PLAIN = [ServedShard(DEP_B, "digits-mlp", cid_of_bytes(b"d1"), 1, "none")]


def skill_of(card: dict[str, Any], model: str) -> dict[str, Any]:
    (skill,) = [s for s in card["skills"] if f"model:{model}" in s["tags"]]
    return skill


def test_ee_card_states_its_scheme_and_what_it_does_not_hide() -> None:
    card = make_card(shards=EE)
    deployment = params_of(card)["deployments"][0]
    assert deployment["encryption"] == "ee-encoder/1"
    skill = skill_of(card, "all-MiniLM-L6-v2")
    text = skill["description"]
    assert "ee-encoder/1" in text and "docs/threat-model.md" in text
    assert "recovers the key and reads the input tokens" in text
    assert "encryption:ee-encoder/1" in skill["tags"]
    assert "docs/threat-model.md" in card["description"]
    assert [s.encryption for s in verify_card(card, now=T0).shards] == ["ee-encoder/1"]


def test_plaintext_card_says_the_node_sees_activations() -> None:
    card = make_card(shards=PLAIN)
    assert params_of(card)["deployments"][0]["encryption"] == "none"
    skill = skill_of(card, "digits-mlp")
    text = skill["description"]
    assert "Plaintext shards (encryption none)" in text
    assert "the node sees the activations a client sends" in text
    assert "CKKS" in text and "docs/threat-model.md" in text
    assert "encrypted" not in skill["name"] and "encryption:none" in skill["tags"]
    assert [s.encryption for s in verify_card(card, now=T0).shards] == ["none"]


def test_one_model_in_two_schemes_names_each_deployment() -> None:
    twin = [ServedShard(DEP_B, "all-MiniLM-L6-v2", cid_of_bytes(b"p1"), 1, "none")]
    card = make_card(shards=EE + twin)
    text = skill_of(card, "all-MiniLM-L6-v2")["description"]
    assert f"Deployment {DEP_A}: Shards encrypted with ee-encoder/1" in text
    assert f"Deployment {DEP_B}: Plaintext shards" in text
    with pytest.raises(ValueError, match="two encryption schemes"):
        make_card(shards=[EE[0], ServedShard(DEP_A, "all-MiniLM-L6-v2", cid_of_bytes(b"x"), 2,
                                             "none")])


@pytest.mark.parametrize("shards", [SHARDS, EE, PLAIN, EE + PLAIN, []])
def test_no_card_says_never(shards: list[ServedShard]) -> None:
    assert "never" not in json.dumps(make_card(shards=shards)).lower()


def test_scheme_field_checked_and_defaults_to_none() -> None:
    card = make_card(shards=EE)
    missing = copy.deepcopy(card)
    del params_of(missing)["deployments"][0]["encryption"]
    assert [s.encryption for s in verify_card(resign(missing), now=T0).shards] == ["none"]
    for bad in (7, "", "x" * 65, None):
        wrong = copy.deepcopy(card)
        params_of(wrong)["deployments"][0]["encryption"] = bad
        assert reject_reason(resign(wrong), now=T0) == "malformed", bad


def test_oversized_json_bytes() -> None:
    text = json.dumps(make_card()).encode()
    assert len(text) < MAX_CARD_BYTES
    at_limit = text + b" " * (MAX_CARD_BYTES - len(text))
    assert verify_card(parse_card_json(at_limit), now=T0).did == IDENT.did
    with pytest.raises(CardRejected) as info:
        parse_card_json(at_limit + b" ")
    assert info.value.reason == "oversized"


def test_oversized_dict_counts_utf8_bytes() -> None:
    card = make_card()
    card["description"] = "é" * (MAX_CARD_BYTES // 2 + 10)  # fewer chars than the limit
    assert len(json.dumps(card, ensure_ascii=False)) < MAX_CARD_BYTES + 2_000
    assert reject_reason(card, now=T0) == "oversized"
    assert reject_reason(resign(card), now=T0) == "oversized"


def many_shards(n: int) -> list[ServedShard]:
    return [ServedShard(DEP_A, "minilm", cid_of_bytes(f"s{i}".encode()), i) for i in range(n)]


def test_shard_count_limit() -> None:
    full = make_card(shards=many_shards(MAX_SHARDS), multiaddrs=ADDRS * 4)
    assert len(json.dumps(full).encode()) <= MAX_CARD_BYTES
    assert len(verify_card(full, now=T0).shards) == MAX_SHARDS
    assert reject_reason(make_card(shards=many_shards(MAX_SHARDS + 1)), now=T0) == "oversized"


def test_origin_peer() -> None:
    card = make_card()
    assert verify_card(card, origin_peer=IDENT.peer_id, now=T0).peer_id == IDENT.peer_id
    assert reject_reason(card, origin_peer=OTHER.peer_id, now=T0) == "origin-mismatch"


def _set(path: tuple[Any, ...], value: Any):
    def mutate(card: dict[str, Any]) -> None:
        target = card
        for key in path[:-1]:
            target = target[key]
        target[path[-1]] = value
    return mutate


P = ("capabilities", "extensions", 0, "params")
SHAPE = {  # checked before the signature: the original signature is kept
    "no capabilities": lambda c: c.pop("capabilities"),
    "no extensions": _set(("capabilities", "extensions"), []),
    "extensions not a list": _set(("capabilities", "extensions"), {"uri": EXTENSION_URI}),
    "two extensions": lambda c: c["capabilities"]["extensions"].append(
        copy.deepcopy(c["capabilities"]["extensions"][0])),
    "name not a string": _set(("name",), 5),
    "empty version": _set(("version",), ""),
    "skills not a list": _set(("skills",), "veilnet"),
    "params not an object": _set((*P[:-1], "params"), ["did"]),
    "did not a string": _set((*P, "did"), 5),
    "did not did:key": _set((*P, "did"), "did:web:example.com"),
    "peerId missing": lambda c: params_of(c).pop("peerId"),
}
TYPES = {  # checked after the signature: the card is re-signed after the change
    "issuedAt a string": _set((*P, "issuedAt"), str(T0)),
    "issuedAt a bool": _set((*P, "issuedAt"), True),
    "issuedAt fractional": _set((*P, "issuedAt"), T0 + 0.5),
    "expiresAt negative": _set((*P, "expiresAt"), -1),
    "capacity a string": _set((*P, "capacity"), "1"),
    "multiaddrs a string": _set((*P, "multiaddrs"), ADDRS[0]),
    "multiaddr not a path": _set((*P, "multiaddrs"), ["ip4/1.2.3.4"]),
    "nine multiaddrs": _set((*P, "multiaddrs"), ADDRS * 4 + ["/ip4/1.1.1.1"]),
    "http a number": _set((*P, "http"), 8401),
    "deployments an object": _set((*P, "deployments"), {"cid": DEP_A}),
    "shard index a string": _set((*P, "deployments", 0, "shards", 0, "index"), "0"),
    "shard cid missing": lambda c: params_of(c)["deployments"][0]["shards"][0].pop("cid"),
    "no JSONRPC interface": _set(("supportedInterfaces", 0, "protocolBinding"), "GRPC"),
}


@pytest.mark.parametrize("change", list(SHAPE), ids=list(SHAPE))
def test_malformed_shape(change: str) -> None:
    card = make_card()
    SHAPE[change](card)
    assert reject_reason(card, now=T0) == "malformed"


@pytest.mark.parametrize("change", list(TYPES), ids=list(TYPES))
def test_malformed_types(change: str) -> None:
    card = make_card()
    TYPES[change](card)
    assert reject_reason(resign(card), now=T0) == "malformed"


@pytest.mark.parametrize("data", [b"", b"not json", b"{", b"[1, 2]", b'"card"', b"null", b"7",
                                  "\u00e9t\u00e9", b"\xff\xfe{"])
def test_parse_card_json_malformed(data: bytes | str) -> None:
    with pytest.raises(CardRejected) as info:
        parse_card_json(data)
    assert info.value.reason == "malformed"


@pytest.mark.parametrize("card", [None, [], "card", 5])
def test_verify_card_non_object(card: Any) -> None:
    assert reject_reason(card, now=T0) == "malformed"


def test_deep_params_via_json_text_is_malformed() -> None:
    text = json.dumps(make_card())
    deep = "[" * 10_000 + "]" * 10_000
    text = text.replace('"capacity": 1', f'"capacity": 1, "deep": {deep}')
    assert len(text) < MAX_CARD_BYTES
    with pytest.raises(CardRejected) as info:
        verify_card(parse_card_json(text), now=T0)
    assert info.value.reason == "malformed"


def test_deep_params_via_dict_is_malformed() -> None:
    # BUG (registry/card.py verify_card): the size check json.dumps(card) raises RecursionError
    # on a 10000-deep list instead of the card being rejected as malformed.
    card = make_card()
    deep: list[Any] = []
    for _ in range(10_000):
        deep = [deep]
    params_of(card)["deep"] = deep
    assert reject_reason(card, now=T0) == "malformed"


def test_lone_surrogate_from_json_is_rejected_not_a_crash() -> None:
    # BUG (registry/card.py verify_card): json.loads turns the escape "\ud800" into a lone
    # surrogate; the size check's .encode() then raises UnicodeEncodeError (not CardRejected),
    # so one such gossip message, POST /v1/agents body or lookup entry escapes the handlers.
    text = json.dumps(make_card()).replace('"veilnet node ', '"\\ud800veilnet node ', 1)
    card = parse_card_json(text)
    assert card["name"].startswith("\ud800")
    assert reject_reason(card, now=T0) == "malformed"


# -- property: any change to a signed string is caught ------------------------------------------

BASE = make_card(http="http://127.0.0.1:8401")


def string_paths(value: Any, path: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    if isinstance(value, dict):
        return [p for k, v in value.items() if not (path == () and k == "signatures")
                for p in string_paths(v, (*path, k))]
    if isinstance(value, list):
        return [p for i, v in enumerate(value) for p in string_paths(v, (*path, i))]
    return [path] if isinstance(value, str) else []


PATHS = string_paths(BASE)


def test_string_paths_cover_the_card() -> None:
    assert len(PATHS) > 20
    assert (*P, "did") in PATHS and ("name",) in PATHS
    assert not any(p[0] == "signatures" for p in PATHS)


@settings(max_examples=300, deadline=None)
@given(path=st.sampled_from(PATHS), new=st.text(max_size=80), data=st.data())
def test_mutating_any_string_is_rejected(path: tuple[Any, ...], new: str,
                                         data: st.DataObject) -> None:
    card = copy.deepcopy(BASE)
    target = card
    for key in path[:-1]:
        target = target[key]
    old = target[path[-1]]
    if new == old:
        new = data.draw(st.sampled_from([old + "x", old[:-1], old.upper() + "!"]))
    if new == old:
        new = old + "x"
    target[path[-1]] = new
    with pytest.raises(CardRejected):
        verify_card(card, now=T0)
