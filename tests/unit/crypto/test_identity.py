"""crypto/identity.py: Ed25519 keys, their PeerID and did:key encodings, and the key file.

Checked against independent sources: RFC 8032 §7.1 test vectors (via ``cryptography``), the W3C
did:key Ed25519 test vectors (seeds 0x00..00, 0x00..01, 0x00..02 and the spec's example DID), and
py-libp2p's own PeerID computation.
"""

from __future__ import annotations

import base64
import os
import re
import stat
from pathlib import Path

import base58
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519
from hypothesis import given, settings
from hypothesis import strategies as st
from libp2p.crypto.ed25519 import create_new_key_pair
from libp2p.peer.id import ID

from crypto.identity import (
    Identity,
    IdentityError,
    did_from_peer_id,
    did_from_public,
    peer_id_from_did,
    peer_id_from_public,
    public_from_did,
    public_from_peer_id,
    verify,
)

# RFC 8032 §7.1, TEST 1-3: (secret key, public key, message, signature), all hex.
RFC8032 = [
    ("9d61b19deffd5a60ba844af492ec2cc44449c5697b326919703bac031cae7f60",
     "d75a980182b10ab7d54bfed3c964073a0ee172f3daa62325af021a68f707511a",
     "",
     "e5564300c360ac729086e2cc806e828a84877f1eb8e5d974d873e065224901555fb8821590a33bacc61e3970"
     "1cf9b46bd25bf5f0595bbe24655141438e7a100b"),
    ("4ccd089b28ff96da9db6c346ec114e0f5b8a319f35aba624da8cf6ed4fb8a6fb",
     "3d4017c3e843895a92b70aa74d1b7ebc9c982ccf2ec4968cc0cd55f12af4660c",
     "72",
     "92a009a9f0d4cab8720e820b5f642540a2b27b5416503f8fb3762223ebdb69da085ac1e43e15996e458f3613"
     "d0f11d8c387b2eaeb4302aeeb00d291612bb0c00"),
    ("c5aa8df43f9f837bedb7442f31dcb7b166d38535076f094b85ce3a2e0b4458f7",
     "fc51cd8e6218a1a38da47ed00230f0580816ed13ba3303ac5deb911548908025",
     "af82",
     "6291d657deec24024827e69c3abe01a30ce548a284743a445e3680d7db5ac3ac18ff9b538d16f290ae67f760"
     "984dc6594a7c15e9716ed28dc027beceea1ec40a"),
]

# W3C CCG did:key test vectors (ed25519-x25519.json): seed -> Ed25519 public key -> DID.
DID_VECTORS = [
    ("00" * 32,
     "3b6a27bcceb6a42d62a3a8d02a6f0d73653215771de243a63ac048a18b59da29",
     "did:key:z6MkiTBz1ymuepAQ4HEHYSF1H8quG5GLVVQR3djdX3mDooWp"),
    ("00" * 31 + "01",
     "4cb5abf6ad79fbf5abbccafcc269d85cd2651ed4b885b5869f241aedf0a5ba29",
     "did:key:z6MkjchhfUsD6mmvni8mCdXHw216Xrm9bQe2mBH1P5RDjVJG"),
    ("00" * 31 + "02",
     "7422b9887598068e32c4448a949adb290d0f4e35b9e01b0ee5f1a1e600fe2674",
     "did:key:z6MknGc3ocHs3zdPiJbnaaqDi58NGb4pk1Sp9WxWufuXSdxf"),
]
# The did:key spec's example DID document: publicKeyBase58 of the verification method.
SPEC_EXAMPLE = ("did:key:z6MkpTHR8VNsBxYAAWHut2Geadd9jSwuBV8xRoAnwWsdvktH",
                "B12NYF8RrR3h41TDCTJojY59usg3mbtbjnFs7Eud1Y6u")


def libp2p_peer_id(seed: bytes) -> str:
    """What py-libp2p itself computes as the PeerID of the Ed25519 key with this seed."""
    return ID.from_pubkey(create_new_key_pair(seed).public_key).pretty()


# -- RFC 8032 -------------------------------------------------------------------------------------

@pytest.mark.parametrize(("secret", "public", "message", "signature"), RFC8032)
def test_rfc8032_vectors(secret: str, public: str, message: str, signature: str) -> None:
    ident = Identity.from_seed(bytes.fromhex(secret))
    assert ident.seed() == bytes.fromhex(secret)
    assert ident.public == bytes.fromhex(public)
    sig = ident.sign(bytes.fromhex(message))
    assert sig == bytes.fromhex(signature)  # Ed25519 signatures are deterministic
    assert verify(ident.public, sig, bytes.fromhex(message))
    tampered = bytearray(sig)
    tampered[0] ^= 1
    assert not verify(ident.public, bytes(tampered), bytes.fromhex(message))
    assert not verify(ident.public, sig, bytes.fromhex(message) + b"x")


def test_verify_is_false_for_malformed_inputs() -> None:
    ident = Identity.generate()
    sig = ident.sign(b"m")
    assert verify(ident.public, sig, b"m")
    assert not verify(ident.public[:31], sig, b"m")  # not a public key: False, not an exception
    assert not verify(ident.public, sig[:63], b"m")
    assert not verify(Identity.generate().public, sig, b"m")


# -- did:key --------------------------------------------------------------------------------------

@pytest.mark.parametrize(("seed", "public", "did"), DID_VECTORS)
def test_did_key_w3c_vectors(seed: str, public: str, did: str) -> None:
    ident = Identity.from_seed(bytes.fromhex(seed))
    assert ident.public == bytes.fromhex(public)
    assert ident.did == did
    assert did_from_public(bytes.fromhex(public)) == did
    assert public_from_did(did) == bytes.fromhex(public)
    fragment = did[len("did:key:"):]
    assert ident.key_id == f"{did}#{fragment}"
    assert public_from_did(ident.key_id) == bytes.fromhex(public)


def test_did_key_spec_example() -> None:
    did, key_b58 = SPEC_EXAMPLE
    public = base58.b58decode(key_b58)
    assert len(public) == 32
    assert did_from_public(public) == did
    assert public_from_did(did) == public


# -- PeerID ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("seed", [bytes(32), bytes(31) + b"\x01", bytes(range(32)),
                                  bytes.fromhex(RFC8032[0][0])])
def test_peer_id_matches_py_libp2p(seed: bytes) -> None:
    ident = Identity.from_seed(seed)
    expected = libp2p_peer_id(seed)
    assert ident.peer_id == expected
    assert peer_id_from_public(ident.public) == expected
    assert expected.startswith("12D3KooW")


@settings(max_examples=40, deadline=None)
@given(st.binary(min_size=32, max_size=32))
def test_peer_id_and_did_round_trip(seed: bytes) -> None:
    ident = Identity.from_seed(seed)
    assert ident.peer_id == libp2p_peer_id(seed)
    assert public_from_peer_id(ident.peer_id) == ident.public
    assert public_from_did(ident.did) == ident.public
    assert did_from_peer_id(ident.peer_id) == ident.did
    assert peer_id_from_did(ident.did) == ident.peer_id
    assert ident.did.startswith("did:key:z6Mk")


def _x25519_did() -> str:
    return "did:key:z" + base58.b58encode(b"\xec\x01" + bytes(32)).decode()


@pytest.mark.parametrize("bad", [
    "",
    "12D3KooW",                                          # too short
    "0OIl" * 13,                                         # not base58btc
    "QmYyQSo1c1Ym7orWxLYvCrM2EmxFTANf8wXmmE7DWjhx5N",   # sha256 multihash PeerID (RSA style)
    base58.b58encode(b"\x00\x24\x08\x02\x12\x20" + bytes(32)).decode(),  # key type 2 (secp256k1)
    base58.b58encode(b"\x00\x24\x08\x01\x12\x20" + bytes(33)).decode(),  # one byte too many
    "12D3KooWé",                                         # non-ASCII
])
def test_malformed_peer_ids_are_refused(bad: str) -> None:
    with pytest.raises(IdentityError):
        public_from_peer_id(bad)
    with pytest.raises(IdentityError):
        did_from_peer_id(bad)


@pytest.mark.parametrize("bad", [
    "",
    "did:key:",
    "did:key:z",
    "did:key:z6Mk",                                      # prefix only, no key
    "did:web:example.org",
    "did:key:f" + (b"\xed\x01" + bytes(32)).hex(),       # multibase base16, not base58btc
    "did:key:z0OIl0OIl",                                 # not base58btc
    "did:key:zé",
    _x25519_did(),                                       # X25519 key, not Ed25519
    "did:key:z" + base58.b58encode(b"\xed\x01" + bytes(31)).decode(),   # 31-byte key
    "did:key:z" + base58.b58encode(b"\xed\x01" + bytes(33)).decode(),   # 33-byte key
    "DID:KEY:z6MkiTBz1ymuepAQ4HEHYSF1H8quG5GLVVQR3djdX3mDooWp",
])
def test_malformed_dids_are_refused(bad: str) -> None:
    with pytest.raises(IdentityError):
        public_from_did(bad)
    with pytest.raises(IdentityError):
        peer_id_from_did(bad)


def test_long_identifiers_are_refused_before_decoding_with_a_short_message() -> None:
    """base58 decoding is quadratic: a 60,000-character PeerID took 3.6 s to reject. Such
    strings arrive in cards and peer records, so they are refused by length first, and the
    error quotes only the start of them."""
    valid = peer_id_from_public(bytes(32))
    long_peer = valid + "z" * 60_000
    long_did = did_from_public(bytes(32)) + "z" * 60_000
    for call, bad in ((public_from_peer_id, long_peer), (did_from_peer_id, long_peer),
                      (public_from_did, long_did), (peer_id_from_did, long_did)):
        with pytest.raises(IdentityError, match="too long") as caught:
            call(bad)
        assert len(str(caught.value)) < 200
    assert public_from_peer_id(valid) == bytes(32)  # the longest real ones still pass


@pytest.mark.parametrize("length", [0, 31, 33, 64])
def test_public_keys_must_have_32_bytes(length: int) -> None:
    with pytest.raises(IdentityError, match=str(length)):
        peer_id_from_public(bytes(length))
    with pytest.raises(IdentityError):
        did_from_public(bytes(length))


# -- key files ------------------------------------------------------------------------------------

def test_key_file_is_created_0600_even_with_a_permissive_umask(tmp_path: Path) -> None:
    path = tmp_path / "identity.key"
    old = os.umask(0)
    try:
        ident, created = Identity.load_or_create(path)
    finally:
        os.umask(old)
    assert created
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    data = path.read_bytes()
    assert data.startswith(b"-----BEGIN PRIVATE KEY-----")  # PKCS#8 PEM
    key = serialization.load_pem_private_key(data, password=None)
    assert isinstance(key, ed25519.Ed25519PrivateKey)
    assert key.public_key().public_bytes(serialization.Encoding.Raw,
                                         serialization.PublicFormat.Raw) == ident.public


def test_reload_gives_the_same_identity_and_never_overwrites(tmp_path: Path) -> None:
    path = tmp_path / "identity.key"
    first, created = Identity.load_or_create(path)
    before = path.read_bytes()
    again, created_again = Identity.load_or_create(path)
    assert created and not created_again
    assert (again.public, again.peer_id, again.did) == (first.public, first.peer_id, first.did)
    assert Identity.load(path).peer_id == first.peer_id
    with pytest.raises(FileExistsError):
        Identity.generate().save(path)
    assert path.read_bytes() == before
    assert Identity.load(path).sign(b"x") == first.sign(b"x")


@pytest.mark.parametrize("mode", [0o640, 0o604, 0o644, 0o660, 0o666])
def test_group_or_world_readable_key_is_refused(tmp_path: Path, mode: int) -> None:
    path = tmp_path / "identity.key"
    Identity.generate().save(path)
    os.chmod(path, mode)
    before = path.read_bytes()
    with pytest.raises(IdentityError, match="chmod 600"):
        Identity.load_or_create(path)
    assert path.read_bytes() == before  # refused, not replaced


def test_non_ed25519_pem_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "identity.key"
    key = ec.generate_private_key(ec.SECP256R1())
    path.write_bytes(key.private_bytes(serialization.Encoding.PEM,
                                       serialization.PrivateFormat.PKCS8,
                                       serialization.NoEncryption()))
    os.chmod(path, 0o600)
    with pytest.raises(IdentityError, match="Ed25519"):
        Identity.load_or_create(path)
    with pytest.raises(IdentityError, match="Ed25519"):
        Identity.load(path)


@pytest.mark.parametrize("content", [
    b"",
    b"not a key\n",
    b"-----BEGIN PRIVATE KEY-----\nAAAA\n-----END PRIVATE KEY-----\n",
])
def test_garbage_key_file_is_refused(tmp_path: Path, content: bytes) -> None:
    path = tmp_path / "identity.key"
    path.write_bytes(content)
    os.chmod(path, 0o600)
    with pytest.raises(IdentityError, match=re.escape(str(path))):
        Identity.load_or_create(path)


def test_key_file_with_an_unknown_key_algorithm_is_refused(tmp_path: Path) -> None:
    """Found by tests/unit/fuzz: a PKCS#8 key whose algorithm OID is not Ed25519's 1.3.101.112
    (here 0.39.101.112, one flipped bit) raised cryptography's UnsupportedAlgorithm."""
    der = Identity.generate().private_key().private_bytes(
        serialization.Encoding.DER, serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption())
    oid = bytes([0x06, 0x03, 0x2B, 0x65, 0x70])
    assert der.count(oid) == 1
    der = der.replace(oid, bytes([0x06, 0x03, 0x27, 0x65, 0x70]))
    body = base64.encodebytes(der).decode().replace("\n", "")
    path = tmp_path / "identity.key"
    path.write_text(f"-----BEGIN PRIVATE KEY-----\n{body}\n-----END PRIVATE KEY-----\n")
    with pytest.raises(IdentityError, match="not a PEM private key"):
        Identity.load(path)


def test_missing_key_file_load_names_the_path(tmp_path: Path) -> None:
    path = tmp_path / "nope.key"
    with pytest.raises(IdentityError, match=r"nope\.key"):
        Identity.load(path)
