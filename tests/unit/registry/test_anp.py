"""registry/anp.py: did:key and did:wba documents, ANP agent descriptions, discovery pages.

Checked against independent sources: the W3C did:key v0.9 example document and the did:key
ed25519-x25519 test vectors (w3c-ccg/did-method-key), libsodium's Ed25519-to-X25519 conversion
(PyNaCl) and X25519 keys derived from the private seed, and the ``anp`` package (1.0.7): its
verification-method parsing, DID resolution URLs, RFC 9421 and DIDWba request signatures, W3C
proof and Appendix-B object proof verifiers, and its agent-description crawler parser.
"""

from __future__ import annotations

import copy
import hashlib
import json
import time

import base58
import pytest
from anp.anp_crawler.anp_parser import ANPDocumentParser
from anp.authentication import (
    generate_auth_header,
    generate_http_signature_headers,
    verify_auth_header_signature,
    verify_http_message_signature,
)
from anp.authentication.did_resolver import build_did_resolution_url
from anp.authentication.did_wba import (
    _extract_public_key,
    _select_authentication_method,
    validate_did_document_binding,
)
from anp.authentication.verification_methods import create_verification_method
from anp.proof import verify_object_proof, verify_w3c_proof
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519, x25519

from crypto.identity import Identity, public_from_did
from registry.anp import (
    agent_description,
    collection_page,
    did_document,
    did_wba,
    did_wba_url,
    verify_agent_description,
    x25519_from_ed25519,
)
from registry.card import ServedShard, build_card, verify_card

RAW = (serialization.Encoding.Raw, serialization.PublicFormat.Raw)

# did:key v0.9, appendix "Ed25519 with X25519" (https://w3c-ccg.github.io/did-key-spec/).
SPEC_DID = "did:key:z6MkhaXgBZDvotDkL5257faiztiGiC2QtKLGpbnnEGta2doK"
SPEC_X25519 = "z6LSj72tK8brWgZja8NLRwPigth2T9QRiG1uH9oKZuKjdh9p"
# w3c-ccg/did-method-key test-vectors/ed25519-x25519.json: seed -> (did, Ed25519 publicKeyBase58,
# X25519 publicKeyBase58, keyAgreement fragment).
VECTORS = [
    ("00" * 32, "did:key:z6MkiTBz1ymuepAQ4HEHYSF1H8quG5GLVVQR3djdX3mDooWp",
     "4zvwRjXUKGfvwnParsHAS3HuSVzV5cA4McphgmoCtajS", "7By6kV2t2d188odEM4ExAve1UithKT6dLva4dwsDT3ak",
     "z6LShs9GGnqk85isEBzzshkuVWrVKsRp24GnDuHk8QWkARMW"),
    ("00" * 31 + "01", "did:key:z6MkjchhfUsD6mmvni8mCdXHw216Xrm9bQe2mBH1P5RDjVJG",
     "6ASf5EcmmEHTgDJ4X4ZT5vT6iHVJBXPg5AN5YoTCpGWt", "FcoNC5NqP9CePWbhfz95iHaEsCjGkZUioK9Ck7Qiw286",
     "z6LSrHyXiPBhUbvPUtyUCdf32sniiMGPTAesgHrtEa4FePtr"),
    ("00" * 31 + "02", "did:key:z6MknGc3ocHs3zdPiJbnaaqDi58NGb4pk1Sp9WxWufuXSdxf",
     "8pM1DN3RiT8vbom5u1sNryaNT1nyL8CTTW3b5PwWXRBH", "A5fe37PAxhX5WNKngBpGHhC1KpNE7nwbK9oX2tqwxYxU",
     "z6LSkkqoZRC34AEpbkhZCqLDcHQVAxuLpQ7kC8XCXMVUfvjE"),
]

SHARDS = [ServedShard("bafydeploy1", "minilm", "bafyshard-b", 1),
          ServedShard("bafydeploy1", "minilm", "bafyshard-a", 0),
          ServedShard("bafydeploy2", "bert", "bafyshard-c", 0)]


def node_info(identity: Identity, shards=SHARDS):
    card = build_card(identity, a2a_url="https://node.example.com:8443/a2a",
                      multiaddrs=["/ip4/127.0.0.1/tcp/4001"], shards=shards,
                      http="127.0.0.1:8401", capacity=2, ttl=60, now=time.time())
    return verify_card(card)


def raw(public_key) -> bytes:
    return public_key.public_bytes(*RAW)


# -- did:key ---------------------------------------------------------------------------------

def test_did_key_document_is_the_spec_example():
    doc = did_document(public_from_did(SPEC_DID))
    sig_id = f"{SPEC_DID}#{SPEC_DID[len('did:key:'):]}"
    enc = {"id": f"{SPEC_DID}#{SPEC_X25519}", "type": "Multikey", "controller": SPEC_DID,
           "publicKeyMultibase": SPEC_X25519}
    # The spec's example embeds the keyAgreement method; the creation algorithm (which we
    # follow) lists it in verificationMethod and refers to it by id. Same document otherwise.
    assert doc == {
        "@context": ["https://www.w3.org/ns/did/v1", "https://w3id.org/security/multikey/v1"],
        "id": SPEC_DID,
        "verificationMethod": [{"id": sig_id, "type": "Multikey", "controller": SPEC_DID,
                                "publicKeyMultibase": SPEC_DID[len("did:key:"):]}, enc],
        "authentication": [sig_id], "assertionMethod": [sig_id],
        "capabilityDelegation": [sig_id], "capabilityInvocation": [sig_id],
        "keyAgreement": [enc["id"]],
    }


@pytest.mark.parametrize(("seed", "did", "ed_b58", "x_b58", "x_fragment"), VECTORS)
def test_did_key_document_matches_test_vectors(seed, did, ed_b58, x_b58, x_fragment):
    identity = Identity.from_seed(bytes.fromhex(seed))
    assert identity.did == did
    doc = did_document(identity.public)
    sig, enc = doc["verificationMethod"]
    assert base58.b58decode(sig["publicKeyMultibase"][1:])[2:] == base58.b58decode(ed_b58)
    assert enc["id"] == f"{did}#{x_fragment}"
    assert doc["keyAgreement"] == [enc["id"]]
    x_raw = base58.b58decode(enc["publicKeyMultibase"][1:])
    assert x_raw[:2] == bytes([0xEC, 0x01])
    assert x_raw[2:] == base58.b58decode(x_b58)


@pytest.mark.parametrize("n", range(8))
def test_x25519_derivation_matches_private_key_and_libsodium(n):
    identity = Identity.generate()
    derived = x25519_from_ed25519(identity.public)
    # X25519 private scalar of an Ed25519 seed: the first half of SHA-512(seed) (RFC 8032 5.1.5),
    # which X25519 clamps itself.
    scalar = hashlib.sha512(identity.seed()).digest()[:32]
    assert derived == raw(x25519.X25519PrivateKey.from_private_bytes(scalar).public_key())
    bindings = pytest.importorskip("nacl.bindings")
    assert derived == bindings.crypto_sign_ed25519_pk_to_curve25519(identity.public)


@pytest.mark.parametrize("bad", [b"\x01" + bytes(31), bytes(31), b"\xff" * 32])
def test_x25519_derivation_rejects_non_keys(bad):
    with pytest.raises(ValueError):
        x25519_from_ed25519(bad)


def test_did_key_document_refuses_wba_arguments():
    public = Identity.generate().public
    with pytest.raises(ValueError, match="need a domain"):
        did_document(public, service_url="https://example.com/agents/x/ad.json")
    with pytest.raises(ValueError, match="need a domain"):
        did_document(public, path="agents")
    with pytest.raises(ValueError):
        did_document(public[:31])


# -- did:wba ---------------------------------------------------------------------------------

@pytest.mark.parametrize(("domain", "path", "did_prefix", "url_prefix"), [
    ("example.com", "agents", "did:wba:example.com:agents:", "https://example.com/agents/"),
    ("Node1.Example.org:8443", "agents", "did:wba:node1.example.org%3A8443:agents:",
     "https://node1.example.org:8443/agents/"),
    ("example.com:3000", "veilnet/agents/", "did:wba:example.com%3A3000:veilnet:agents:",
     "https://example.com:3000/veilnet/agents/"),
    ("example.com", "", "did:wba:example.com:", "https://example.com/"),
])
def test_did_wba_escapes_port_and_resolves(domain, path, did_prefix, url_prefix):
    peer_id = Identity.generate().peer_id
    did = did_wba(domain, peer_id, path=path)
    assert did == did_prefix + peer_id
    assert did_wba_url(did) == f"{url_prefix}{peer_id}/did.json"
    assert did_wba_url(did) == build_did_resolution_url(did)   # anp's resolver agrees


def test_did_wba_url_of_bare_domain_uses_well_known():
    assert did_wba_url("did:wba:example.com%3a8800") == "https://example.com:8800/.well-known/did.json"
    assert did_wba_url("did:wba:example.com") == build_did_resolution_url("did:wba:example.com")


@pytest.mark.parametrize("domain", [
    "", "https://example.com", "example.com/agents", "user@example.com", "exa mple.com",
    "1.2.3.4", "1.2.3.4:8443", "::1", "[::1]:8443", "[2001:db8::1]", "localhost", "example.com.",
    "example..com", "-example.com", "example-.com", "exämple.com", "example.123",
    "example.com:", "example.com:0", "example.com:65536", "example.com:08443", "example.com:84a",
    "example.com:80:80", "a" * 64 + ".com",
])
def test_did_wba_rejects_bad_domains(domain):
    peer_id = Identity.generate().peer_id
    with pytest.raises(ValueError, match=r"domain|did:wba needs"):
        did_wba(domain, peer_id)


def test_did_wba_rejects_bad_peer_ids_and_paths():
    peer_id = Identity.generate().peer_id
    with pytest.raises(ValueError, match="PeerID"):
        did_wba("example.com", "alice")
    with pytest.raises(ValueError, match="PeerID"):
        did_wba("example.com", Identity.generate().did)
    for path in ("a b", "..", "agents/../x", "a%2Fb", "a:b"):
        with pytest.raises(ValueError, match="path segment"):
            did_wba("example.com", peer_id, path=path)


@pytest.mark.parametrize("did", [
    "did:web:example.com", "did:wba:", "did:wba:1.2.3.4:agents:x", "did:wba:example.com%2Fx",
    "did:wba:example.com:agents:x#key-1", "did:wba:example.com:agents:..",
    "did:wba:example.com:agents:", "did:wba:example.com::x", "did:wba:example.com%3A:x",
])
def test_did_wba_url_rejects_bad_dids(did):
    with pytest.raises(ValueError):
        did_wba_url(did)


def test_did_wba_document_carries_our_key_for_anp():
    identity = Identity.generate()
    ad_url = f"https://example.com:8443/agents/{identity.peer_id}/ad.json"
    doc = did_document(identity.public, domain="example.com:8443", service_url=ad_url)
    did = did_wba("example.com:8443", identity.peer_id)
    assert doc["id"] == did
    assert doc["alsoKnownAs"] == [identity.did]
    assert doc["service"] == [{"id": f"{did}#ad", "type": "AgentDescription",
                               "serviceEndpoint": ad_url}]
    method, fragment = _select_authentication_method(doc)   # anp's choice of signing key
    assert fragment == "key-1"
    assert raw(_extract_public_key(method)) == identity.public
    assert raw(create_verification_method(method).public_key) == identity.public
    assert validate_did_document_binding(doc, verify_proof=True)   # no e1_ segment to check
    other = Identity.generate()
    assert raw(_extract_public_key(_select_authentication_method(
        did_document(other.public, domain="example.com:8443"))[0])) != identity.public


def test_anp_verifies_requests_signed_with_our_identity():
    identity, stranger = Identity.generate(), Identity.generate()
    doc = did_document(identity.public, domain="example.com")
    url, body = "https://api.example.org/orders", b'{"order": 1}'

    def signed_by(signer):
        return generate_http_signature_headers(doc, url, "POST", lambda base, _: signer.sign(base),
                                               body=body)
    ok, message, meta = verify_http_message_signature(doc, "POST", url, signed_by(identity), body)
    assert ok, message
    assert meta["keyid"] == f"{doc['id']}#key-1"
    assert not verify_http_message_signature(doc, "POST", url, signed_by(stranger), body)[0]
    assert not verify_http_message_signature(doc, "POST", url, signed_by(identity), b"{}")[0]

    header = generate_auth_header(doc, "api.example.org", lambda h, _: identity.sign(h))
    assert verify_auth_header_signature(header, doc, "api.example.org")[0]
    forged = generate_auth_header(doc, "api.example.org", lambda h, _: stranger.sign(h))
    assert not verify_auth_header_signature(forged, doc, "api.example.org")[0]


# -- agent description -----------------------------------------------------------------------

def test_agent_description_lists_a2a_interfaces_for_anp_crawler():
    identity = Identity.generate()
    info = node_info(identity)
    base = "https://example.com:8443"
    did = did_wba("example.com:8443", identity.peer_id)
    ad = agent_description(info, base_url=base + "/", did=did, identity=identity,
                           owner={"type": "Organization", "name": "Example"})
    assert ad["protocolType"] == "ANP" and ad["type"] == "AgentDescription"
    assert ad["url"] == f"{base}/agents/{identity.peer_id}/ad.json"
    assert ad["did"] == did
    assert (ad["name"], ad["description"]) == (info.card["name"], info.card["description"])
    assert ad["security"] in ad["securityDefinitions"]
    assert ad["owner"]["name"] == "Example"
    parsed = ANPDocumentParser().parse_document(json.dumps(ad), "application/json", ad["url"])
    by_url = {i["url"]: i for i in parsed["interfaces"]}
    assert set(by_url) == {info.a2a_url, f"{base}/.well-known/agent-card.json"}
    assert by_url[info.a2a_url]["protocol"] == "A2A"
    assert by_url[info.a2a_url]["type"] == "StructuredInterface"
    node = ad["veilnetNode"]
    assert node["peerId"] == identity.peer_id and node["capacity"] == 2
    served = {(m["name"], m["deployment"], s["cid"], s["index"])
              for m in node["models"] for s in m["shards"]}
    assert served == {(s.model, s.deployment, s.shard, s.index) for s in info.shards}
    assert [s["index"] for m in node["models"] if m["name"] == "minilm" for s in m["shards"]] \
        == [0, 1]
    # each deployment's scheme, as the card states it; no promise the threat model refutes
    assert {m["deployment"]: m["encryption"] for m in node["models"]} == {
        s.deployment: s.encryption for s in info.shards}
    assert "never" not in json.dumps(ad).lower()


def test_agent_description_is_deterministic_per_card():
    identity = Identity.generate()
    info = node_info(identity)
    did = did_wba("example.com", identity.peer_id)
    first = agent_description(info, base_url="https://example.com", did=did, identity=identity)
    again = agent_description(info, base_url="https://example.com", did=did, identity=identity)
    assert json.dumps(first, sort_keys=True) == json.dumps(again, sort_keys=True)


@pytest.mark.parametrize("with_domain", [True, False])
def test_agent_description_proof_verifies_here_and_in_anp(with_domain):
    identity = Identity.generate()
    info = node_info(identity)
    if with_domain:
        did = did_wba("example.com", identity.peer_id)
        did_doc = did_document(identity.public, domain="example.com")
    else:
        did, did_doc = identity.did, did_document(identity.public)
    ad = agent_description(info, base_url="https://example.com", did=did, identity=identity)
    assert ad["proof"]["verificationMethod"] == (f"{did}#key-1" if with_domain
                                                 else identity.key_id)
    verify_agent_description(ad)
    public = ed25519.Ed25519PublicKey.from_public_bytes(identity.public)
    assert verify_w3c_proof(ad, public, expected_purpose="assertionMethod")
    result = verify_object_proof(ad, issuer_did=did, issuer_did_document=did_doc)
    assert raw(create_verification_method(result.verification_method).public_key) \
        == identity.public

    tampered = copy.deepcopy(ad)
    tampered["interfaces"][0]["url"] = "https://evil.example/a2a"
    assert not verify_w3c_proof(tampered, public)
    with pytest.raises(ValueError, match="does not verify"):
        verify_agent_description(tampered)


def tamperings(ad, other):
    def change(path, value):
        doc = copy.deepcopy(ad)
        target = doc
        for key in path[:-1]:
            target = target[key]
        target[path[-1]] = value
        return doc
    yield change(["name"], "not the node"), "does not verify"
    yield change(["veilnetNode", "models"], []), "does not verify"
    yield change(["proof", "created"], "2030-01-01T00:00:00Z"), "does not verify"
    yield change(["proof", "proofValue"], other["proof"]["proofValue"]), "does not verify"
    yield change(["proof", "proofValue"], "z" + base58.b58encode(bytes(63)).decode()), "multibase"
    yield change(["did"], other["did"]), "not a key of"
    yield {**other, "proof": ad["proof"]}, "not a key of"
    yield {k: v for k, v in ad.items() if k != "proof"}, "no proof"
    yield change(["proof", "cryptosuite"], "ecdsa-jcs-2019"), "expected DataIntegrityProof"
    yield change(["proof", "proofPurpose"], "authentication"), "proofPurpose"
    yield change(["proof", "verificationMethod"], ad["did"] + "#key-2"), "is not"


def test_tampered_agent_descriptions_fail():
    identity, stranger = Identity.generate(), Identity.generate()
    ad = agent_description(node_info(identity), base_url="https://example.com",
                           did=did_wba("example.com", identity.peer_id), identity=identity)
    other = agent_description(node_info(stranger), base_url="https://example.com",
                              did=did_wba("example.com", stranger.peer_id), identity=stranger)
    verify_agent_description(ad)
    verify_agent_description(other)
    for doc, message in tamperings(ad, other):
        with pytest.raises(ValueError, match=message):
            verify_agent_description(doc)


def test_a_very_long_proof_value_is_refused_without_decoding_it():
    """Found by tests/unit/fuzz: base58 decoding is quadratic, and a 70,000-character
    proofValue kept verify_agent_description busy for seconds."""
    identity = Identity.generate()
    ad = agent_description(node_info(identity), base_url="https://example.com",
                           did=identity.did, identity=identity)
    ad["proof"]["proofValue"] = "z" + "1" * 70_000
    start = time.monotonic()
    with pytest.raises(ValueError, match="proofValue is not a base58btc"):
        verify_agent_description(ad)
    assert time.monotonic() - start < 0.5


def test_agent_description_refuses_foreign_did_and_identity():
    identity, stranger = Identity.generate(), Identity.generate()
    info = node_info(identity)
    for did in (stranger.did, did_wba("example.com", stranger.peer_id)):
        with pytest.raises(ValueError, match="neither"):
            agent_description(info, base_url="https://example.com", did=did)
    with pytest.raises(ValueError, match="did not sign"):
        agent_description(info, base_url="https://example.com", did=identity.did,
                          identity=stranger)
    with pytest.raises(ValueError, match="base_url"):
        agent_description(info, base_url="example.com", did=identity.did)
    unsigned = agent_description(node_info(identity, shards=[]), base_url="https://example.com",
                                 did=identity.did)
    assert "proof" not in unsigned and unsigned["veilnetNode"]["models"] == []
    with pytest.raises(ValueError, match="no proof"):
        verify_agent_description(unsigned)


# -- discovery -------------------------------------------------------------------------------

def test_collection_page_follows_the_discovery_spec():
    ids = [Identity.generate() for _ in range(2)]
    entries = [(f"veilnet node {i.peer_id[-8:]}",
                f"https://example.com/agents/{i.peer_id}/ad.json") for i in ids]
    url = "https://example.com/.well-known/agent-descriptions"
    page = collection_page(entries, url=url)
    assert page["@type"] == "CollectionPage" and page["url"] == url
    assert page["@context"]["ad"] == "https://agent-network-protocol.com/ad#"
    assert page["items"] == [{"@type": "ad:AgentDescription", "name": n, "@id": u}
                             for n, u in entries]
    assert "next" not in page
    paged = collection_page(entries[:1], url=url, next_url=url + "?page=2")
    assert paged["next"] == url + "?page=2" and len(paged["items"]) == 1
    assert collection_page([], url=url)["items"] == []
    for bad in ([("", entries[0][1])], [(entries[0][0], "ad.json")], [entries[0] + ("did",)]):
        with pytest.raises(ValueError):
            collection_page(bad, url=url)
