"""ledger/note.py, checkpoint.py, cosign.py, tlog_proof.py: the C2SP text formats.

Checked against independent sources:

- golang.org/x/mod/sumdb/note (note.go doc comment and note_test.go): the PeterNeumann and
  EnochRoot verifier keys, the PeterNeumann signer key, the signed note, the doubly-signed note,
  the malformed notes and the vkey manglings, reproduced byte for byte;
- the examples in C2SP signed-note.md (note text with an empty line), tlog-checkpoint.md (the
  behind-the-sofa checkpoint), tlog-cosignature.md (the witness.example.com/w1 cosignature line
  and its signed message), tlog-proof.md (the example proof's header, extra and hash lines);
- key IDs recomputed with hashlib, Ed25519 checked with ``cryptography`` directly, and Merkle
  trees and audit paths computed here from the RFC 6962 §2.1 definitions.
"""

from __future__ import annotations

import base64
import hashlib

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from crypto.identity import Identity
from ledger.checkpoint import Checkpoint, CheckpointError, parse_checkpoint
from ledger.cosign import (
    ALG_COSIGNATURE_V1,
    cosign,
    cosignature_key_id,
    cosignature_message,
    cosignature_timestamp,
    cosignature_verifier,
    cosignature_verifier_key,
    verify_cosignature,
)
from ledger.note import (
    ALG_ED25519,
    MAX_SIGNATURES,
    NoteError,
    NoteSignature,
    Verifier,
    add_signatures,
    ed25519_verifier,
    key_id,
    parse_note,
    parse_signature_line,
    parse_verifier_key,
    sign_note,
    signature_line,
    verifier_key,
    verify_note,
)
from ledger.tlog_proof import (
    HEADER,
    TlogProof,
    TlogProofError,
    format_proof,
    parse_proof,
    verify_proof,
)

# -- golang.org/x/mod/sumdb/note vectors ---------------------------------------------------------

PETER_VKEY = "PeterNeumann+c74f20a3+ARpc2QcUPDhMQegwxbzhKqiBfsVkmqq/LDE4izWy10TW"
PETER_SKEY = "PRIVATE+KEY+PeterNeumann+c74f20a3+AYEKFALVFGyNhPJEMzD1QIDr+Y7hfZx09iUvxdXHKDFz"
ENOCH_VKEY = "EnochRoot+af0cfe78+ATtqJ7zOtqQtYqOo0CpvDXNlMhV3HeJDpjrASKGLWdop"
GO_TEXT = ("If you think cryptography is the answer to your problem,\n"
           "then you don't know what your problem is.\n")
PETER_B64 = ("x08go/ZJkuBS9UG/SffcvIAQxVBtiFupLLr8pAcElZInNIuGUgYN1FFYC2pZSNXgKvqfqdngotpRZb6KE6Ry"
             "yBwJnAM=")
ENOCH_B64 = ("rwz+eBzmZa0SO3NbfRGzPCpDckykFXSdeX+MNtCOXm2/5n2tiOHp+vAF1aGrQ5ovTG01oOTGwnWLox33WW"
             "d1RvMc+QQ=")
PETER_SIG = f"— PeterNeumann {PETER_B64}\n"
ENOCH_SIG = f"— EnochRoot {ENOCH_B64}\n"
GO_SIGNED = GO_TEXT + "\n" + PETER_SIG


def peter_identity() -> Identity:
    raw = base64.b64decode(PETER_SKEY.split("+", 4)[4])
    assert raw[0] == 0x01  # algorithm byte, then the 32-byte Ed25519 seed
    return Identity.from_seed(raw[1:])


def splice(line: str, at: int, insert: str) -> str:
    """Insert at a *byte* offset, as the Go tests do (the em dash is 3 bytes of UTF-8)."""
    raw = line.encode()
    return (raw[:at] + insert.encode() + raw[at:]).decode()


def hashlib_key_id(name: str, alg: int, public: bytes) -> bytes:
    return hashlib.sha256(name.encode() + b"\n" + bytes([alg]) + public).digest()[:4]


def ident(n: int) -> Identity:
    return Identity.from_seed(hashlib.sha256(b"veilnet test key %d" % n).digest())


# -- verifier keys -------------------------------------------------------------------------------


@pytest.mark.parametrize(("vkey", "name", "kid"), [
    (PETER_VKEY, "PeterNeumann", "c74f20a3"),
    (ENOCH_VKEY, "EnochRoot", "af0cfe78"),
])
def test_go_verifier_keys(vkey: str, name: str, kid: str) -> None:
    v = parse_verifier_key(vkey)
    public = base64.b64decode(vkey.split("+")[2])[1:]
    assert (v.name, v.key_id.hex(), v.alg, v.public) == (name, kid, ALG_ED25519, public)
    assert hashlib_key_id(name, 0x01, public).hex() == kid
    assert key_id(name, ALG_ED25519, public).hex() == kid
    assert verifier_key(name, public) == vkey
    assert v.vkey() == vkey
    assert ed25519_verifier(name, public) == v


def test_go_signer_key_matches_verifier_key() -> None:
    identity = peter_identity()
    assert verifier_key("PeterNeumann", identity.public) == PETER_VKEY
    assert PETER_SKEY.split("+")[3] == "c74f20a3"


def test_go_vkey_manglings_rejected() -> None:
    """note_test.go TestNewVerifier: every proper substring and every byte+1 mangling fails."""
    b = PETER_VKEY
    for i in range(len(b) + 1):
        for j in range(i + 1, len(b) + 1):
            if (i, j) != (0, len(b)):
                with pytest.raises(NoteError):
                    parse_verifier_key(b[i:j])
    for i in range(len(b)):
        with pytest.raises(NoteError):
            parse_verifier_key(b[:i] + chr(ord(b[i]) + 1) + b[i + 1:])


@pytest.mark.parametrize(("vkey", "why"), [
    # note_test.go: wrong length key and unknown algorithm, each with adjusted key hash (the
    # first is also non-canonical base64, which is checked before the length)
    ("PeterNeumann+cc469956+ARpc2QcUPDhMQegwxbzhKqiBfsVkmqq/LDE4izWy10TWBADKEY==", "canonical"),
    ("PeterNeumann+173116ae+ZRpc2QcUPDhMQegwxbzhKqiBfsVkmqq/LDE4izWy10TW", "unknown signature"),
    ("PeterNeumann+c74f20a4+ARpc2QcUPDhMQegwxbzhKqiBfsVkmqq/LDE4izWy10TW", "does not match"),
    ("PeterNeumann+c74f20a+ARpc2QcUPDhMQegwxbzhKqiBfsVkmqq/LDE4izWy10TW", "8 hex"),
    ("PeterNeumann+-74f20a3+ARpc2QcUPDhMQegwxbzhKqiBfsVkmqq/LDE4izWy10TW", "8 hex"),
    ("Peter Neumann+c74f20a3+ARpc2QcUPDhMQegwxbzhKqiBfsVkmqq/LDE4izWy10TW", "space"),
    ("Peter\u00a0Neumann+c74f20a3+ARpc2QcUPDhMQegwxbzhKqiBfsVkmqq/LDE4izWy10TW", "space"),
    ("+c74f20a3+ARpc2QcUPDhMQegwxbzhKqiBfsVkmqq/LDE4izWy10TW", "empty"),
    ("PeterNeumann+c74f20a3+ARpc2QcUPDhMQegwxbzhKqiBfsVkmqq/LDE4izWy10T", "base64"),
    ("PeterNeumann+c74f20a3+ARpc2QcUPDhMQegwxbzhKqiBfsVkmqq/LDE4izWy10TW\n", "base64"),
    ("PeterNeumann+c74f20a3+", "empty"),
    ("PeterNeumann", "<name>+<key ID>+<key>"),
])
def test_bad_verifier_keys_named(vkey: str, why: str) -> None:
    with pytest.raises(NoteError, match=why.replace("+", r"\+")):
        parse_verifier_key(vkey)


def test_wrong_length_key_with_matching_key_id() -> None:
    public = base64.b64decode(PETER_VKEY.split("+")[2])[1:] + b"\x00"
    kid = hashlib_key_id("PeterNeumann", 1, public).hex()
    vkey = f"PeterNeumann+{kid}+" + base64.b64encode(b"\x01" + public).decode()
    with pytest.raises(NoteError, match="not 33"):
        parse_verifier_key(vkey)


def test_verifier_rejects_inconsistent_fields() -> None:
    public = ident(1).public
    with pytest.raises(NoteError, match="key ID"):
        Verifier("a.example", b"\0\0\0\0", ALG_ED25519, public)
    with pytest.raises(NoteError, match="unknown signature type"):
        Verifier("a.example", hashlib_key_id("a.example", 2, public), 2, public)
    with pytest.raises(NoteError, match="32 bytes"):
        verifier_key("a.example", public[:31])
    with pytest.raises(NoteError, match=r"\+"):
        verifier_key("a+b", public)


# -- signed notes ---------------------------------------------------------------------------------


def test_go_sign_known_answer() -> None:
    assert sign_note(GO_TEXT, "PeterNeumann", peter_identity()) == GO_SIGNED


def test_go_signature_line_known_answer() -> None:
    raw = base64.b64decode(PETER_B64)
    assert signature_line("PeterNeumann", raw[:4], raw[4:]) == PETER_SIG
    assert parse_signature_line(PETER_SIG) == NoteSignature("PeterNeumann", raw[:4], raw[4:])
    assert parse_signature_line(PETER_SIG.rstrip("\n")).line() == PETER_SIG


def test_go_open_one_verified_one_unknown() -> None:
    peter, enoch = parse_verifier_key(PETER_VKEY), parse_verifier_key(ENOCH_VKEY)
    msg = GO_TEXT + "\n" + PETER_SIG + ENOCH_SIG
    note, verified = verify_note(msg, [peter])
    assert note.text == GO_TEXT
    assert verified == [peter]
    assert [(s.name, s.key_id.hex()) for s in note.signatures] == [
        ("PeterNeumann", "c74f20a3"), ("EnochRoot", "af0cfe78")]
    note, verified = verify_note(msg.encode(), [enoch, peter, peter])
    assert verified == [peter, enoch]
    with pytest.raises(NoteError, match="no signature by a known key"):
        verify_note(msg, [])


def test_go_add_signature_gives_doubly_signed_note() -> None:
    """note.go's doc comment: re-signing by EnochRoot appends its line after PeterNeumann's."""
    doubly = GO_SIGNED + ENOCH_SIG
    assert add_signatures(GO_SIGNED, [ENOCH_SIG]) == doubly
    assert add_signatures(doubly, [ENOCH_SIG, PETER_SIG.rstrip("\n")]) == doubly
    # a new line by a key that already signed replaces its old line, in place
    other = signature_line("PeterNeumann", bytes.fromhex("c74f20a3"), b"\x01" * 64)
    replaced = add_signatures(doubly, [other])
    assert replaced == GO_TEXT + "\n" + other + ENOCH_SIG
    with pytest.raises(NoteError, match="invalid signature"):
        verify_note(replaced, [parse_verifier_key(PETER_VKEY)])


def test_known_key_bad_signature_rejected_unknown_ignored() -> None:
    peter = parse_verifier_key(PETER_VKEY)
    bad = splice(PETER_SIG, 60, "ABCD")  # note_test.go "Invalid signature"
    with pytest.raises(NoteError, match="invalid signature for key PeterNeumann\\+c74f20a3"):
        verify_note(GO_TEXT + "\n" + bad, [peter])
    # the same bad line under an unknown key (name or key ID differs) is ignored
    renamed = bad.replace("PeterNeumann", "CarmenSandiego")
    note, verified = verify_note(GO_TEXT + "\n" + PETER_SIG + renamed, [peter])
    assert verified == [peter] and len(note.signatures) == 2
    raw = bytearray(base64.b64decode(PETER_B64))
    raw[0] ^= 1  # same name, another key ID
    other_id = signature_line("PeterNeumann", bytes(raw[:4]), bytes(raw[4:]))
    _, verified = verify_note(GO_TEXT + "\n" + other_id + PETER_SIG, [peter])
    assert verified == [peter]
    with pytest.raises(NoteError, match="no signature by a known key"):
        verify_note(GO_TEXT + "\n" + other_id, [peter])
    # a signature over other text
    with pytest.raises(NoteError, match="invalid signature"):
        verify_note(GO_TEXT.upper() + "\n" + PETER_SIG, [peter])


@pytest.mark.parametrize(("msg", "why"), [
    # note_test.go badMsgs
    (GO_TEXT, "no blank line"),
    (GO_TEXT + "\n", "no signature lines"),
    (GO_TEXT + "\n" + PETER_SIG[:-1], "does not end with a newline"),
    ("\x01" + GO_TEXT + "\n" + PETER_SIG, "control character"),
    (b"\xff" + GO_SIGNED.encode(), "UTF-8"),
    (GO_TEXT + "\n— Bad Name " + PETER_B64 + "\n", "base64"),
    (GO_TEXT + "\n" + PETER_SIG + "Unexpected line.\n", "em dash"),
    # more
    (GO_TEXT.replace("\n", "\r\n") + "\r\n" + PETER_SIG, "control character"),
    (GO_TEXT + "\t\n" + PETER_SIG, "control character"),
    ("\ud800" + GO_SIGNED, "UTF-8"),
    (GO_TEXT + "\n- PeterNeumann " + PETER_B64 + "\n", "em dash"),
    (GO_TEXT + "\n—PeterNeumann " + PETER_B64 + "\n", "em dash"),
    (GO_TEXT + "\n— PeterNeumann\n", "no space"),
    (GO_TEXT + "\n— PeterNeumann  " + PETER_B64 + "\n", "base64"),
    (GO_TEXT + "\n— PeterNeumann " + PETER_B64 + " \n", "base64"),
    (GO_TEXT + "\n— PeterNeumann " + PETER_B64.rstrip("=") + "\n", "base64"),
    (GO_TEXT + "\n— PeterNeumann " + PETER_B64.replace("/", "_") + "\n", "base64"),
    (GO_TEXT + "\n" + PETER_SIG.replace("AM=", "AN="), "canonical"),
    (GO_TEXT + "\n— Peter+Neumann " + PETER_B64 + "\n", "'\\+'"),
    (GO_TEXT + "\n—  " + PETER_B64 + "\n", "empty"),
    (GO_TEXT + "\n— PeterNeumann AAAAAA==\n", "fewer than"),
    (GO_TEXT + "\n— PeterNeumann \n", "fewer than"),
    (GO_TEXT + "\n" + PETER_SIG + "\n", "no signature lines"),
])
def test_malformed_notes_rejected(msg: str | bytes, why: str) -> None:
    with pytest.raises(NoteError, match=why):
        parse_note(msg)
    with pytest.raises(NoteError, match=why):
        verify_note(msg, [parse_verifier_key(PETER_VKEY)])


def test_duplicate_signatures_rejected() -> None:
    """Go silently keeps the first of repeated signatures; here a note must not repeat a key."""
    peter = parse_verifier_key(PETER_VKEY)
    for msg in (GO_SIGNED + PETER_SIG,
                GO_TEXT + "\n" + PETER_SIG + ENOCH_SIG + ENOCH_SIG,
                GO_TEXT + "\n" + PETER_SIG + splice(PETER_SIG, 60, "ABCD")):
        with pytest.raises(NoteError, match="two signatures by key"):
            verify_note(msg, [peter])


def _unknown_lines(n: int) -> list[str]:
    return [signature_line(f"w{i}.example", i.to_bytes(4, "big"), b"\xaa" * 64)
            for i in range(n)]


def test_signature_count_limit() -> None:
    peter = parse_verifier_key(PETER_VKEY)
    for n in (16, MAX_SIGNATURES):  # the spec: MUST accept at least 16
        note, verified = verify_note(GO_SIGNED + "".join(_unknown_lines(n - 1)), [peter])
        assert len(note.signatures) == n and verified == [peter]
    with pytest.raises(NoteError, match="more than 100"):
        verify_note(GO_SIGNED + "".join(_unknown_lines(MAX_SIGNATURES)), [peter])
    with pytest.raises(NoteError, match="more than 100"):  # note_test.go: 101 x peterSig
        parse_note(GO_TEXT + "\n" + PETER_SIG * 101)
    with pytest.raises(NoteError, match="more than 100"):
        add_signatures(GO_SIGNED, _unknown_lines(MAX_SIGNATURES))


def test_spec_note_example_text_with_empty_line() -> None:
    """signed-note.md: the text may hold empty lines; the *last* empty line separates."""
    example = ("Ognuno sta solo sul cuor della terra\n"
               "trafitto da un raggio di sole:\n"
               "\n"
               "ed è subito sera.\n"
               "\n"
               "— quasimodo.example/salvatore NnugSzTjtVAewIS+Z/iJhUPeFDkO/5QQ2i5ddnGITLlC+EhfLW9"
               "oJKONrMouFSQU0xMcXxj99ihAQwaqP3ZekRwNtIc=\n")
    note = parse_note(example)
    assert note.text == example[: example.index("\n\n—") + 1]
    assert note.text.count("\n") == 4
    (sig,) = note.signatures
    assert sig.name == "quasimodo.example/salvatore"
    assert sig.key_id == bytes.fromhex("367ba04b") and len(sig.signature) == 64
    identity = ident(7)
    signed = sign_note(note.text, "quasimodo.example/salvatore", identity)
    _, verified = verify_note(signed, [ed25519_verifier("quasimodo.example/salvatore",
                                                        identity.public)])
    assert len(verified) == 1


def test_sign_verify_round_trip_and_bad_inputs() -> None:
    identity = ident(1)
    v = ed25519_verifier("log.example/a", identity.public)
    for text in ("\n", "x\n", "a\n\nb\n", "a\n\n", "ünïcödé — ok\n"):
        signed = sign_note(text, "log.example/a", identity)
        note, verified = verify_note(signed, [v])
        assert note.text == text and verified == [v]
        raw = base64.b64decode(signed.rsplit(" ", 1)[1])
        assert raw[:4] == hashlib_key_id("log.example/a", 1, identity.public)
        Ed25519PublicKey.from_public_bytes(identity.public).verify(raw[4:], text.encode())
    with pytest.raises(NoteError, match="newline"):
        sign_note("no newline", "log.example/a", identity)
    with pytest.raises(NoteError, match="control"):
        sign_note("a\x00b\n", "log.example/a", identity)
    with pytest.raises(NoteError, match="space"):
        sign_note("a\n", "log example", identity)
    with pytest.raises(NoteError, match="empty"):
        sign_note("a\n", "", identity)


# -- checkpoints ---------------------------------------------------------------------------------

SOFA_TEXT = ("example.com/behind-the-sofa\n"
             "20852163\n"
             "CsUYapGGPo4dkMgIAUqom/Xajj7h2fB2MPA3j2jxq2I=\n")
SOFA_LOG_SIG = ("— example.com/behind-the-sofa Az3grlgtzPICa5OS8npVmf1Myq/5IZniMp+ZJurmRDeOoRDe4URY"
                "N7u5/Zhcyv2q1gGzGku9nTo+zyWE+xeMcTOAYQ8=\n")
SOFA_WITNESS_SIG = ("— witness.example.com/w1 jWbPPwAAAABkGFDLEZMHwSRaJNiIDoe9DYn/zXcrtPHeolMI5OWX"
                    "EhZCB9dlrDJsX3b2oyin1nPZqhf5nNo0xUe+mbIUBkBIfZ+qnA==\n")
SOFA_ROOT = base64.b64decode("CsUYapGGPo4dkMgIAUqom/Xajj7h2fB2MPA3j2jxq2I=")


def test_spec_checkpoint_example() -> None:
    note = parse_note(SOFA_TEXT + "\n" + SOFA_LOG_SIG + SOFA_WITNESS_SIG)
    cp = parse_checkpoint(note.text)
    assert cp == Checkpoint("example.com/behind-the-sofa", 20852163, SOFA_ROOT)
    assert cp.text() == SOFA_TEXT
    assert [s.name for s in note.signatures] == ["example.com/behind-the-sofa",
                                                 "witness.example.com/w1"]
    assert len(note.signatures[0].signature) == 64  # Ed25519 log signature


@pytest.mark.parametrize("size", ["0", "1", "20852163", str(2**64 - 1)])
def test_checkpoint_sizes_accepted(size: str) -> None:
    text = f"o\n{size}\n{base64.b64encode(bytes(32)).decode()}\n"
    cp = parse_checkpoint(text)
    assert cp.size == int(size) and cp.text() == text


ROOT64 = base64.b64encode(bytes(range(32))).decode()


@pytest.mark.parametrize(("text", "why"), [
    (f"o\n01\n{ROOT64}\n", "leading zeroes"),
    (f"o\n00\n{ROOT64}\n", "leading zeroes"),
    (f"o\n-1\n{ROOT64}\n", "decimal"),
    (f"o\n+1\n{ROOT64}\n", "decimal"),
    (f"o\n 1\n{ROOT64}\n", "decimal"),
    (f"o\n1 \n{ROOT64}\n", "decimal"),
    (f"o\n0x10\n{ROOT64}\n", "decimal"),
    (f"o\n1e3\n{ROOT64}\n", "decimal"),
    (f"o\n1_000\n{ROOT64}\n", "decimal"),
    (f"o\n\u0661\n{ROOT64}\n", "decimal"),  # ARABIC-INDIC DIGIT ONE: int() would accept it
    (f"o\n\n{ROOT64}\n", "decimal"),
    (f"o\n{2**64}\n{ROOT64}\n", "exceeds"),
    (f"o\n{'9' * 5000}\n{ROOT64}\n", "decimal"),
    (f"o\n1\n{base64.b64encode(bytes(31)).decode()}\n", "31 bytes"),
    (f"o\n1\n{base64.b64encode(bytes(33)).decode()}\n", "33 bytes"),
    ("o\n1\n\n", "0 bytes"),
    (f"o\n1\n{ROOT64.rstrip('=')}\n", "base64"),
    (f"o\n1\n{ROOT64[:-2]}9=\n", "canonical"),  # "...Hh8=" with nonzero padding bits
    (f"o\n1\n{ROOT64}", "newline"),
    ("o\n1\n", "at least 3"),
    ("", "newline"),
    (f"\n1\n{ROOT64}\n", "origin is empty"),
    (f"o\n1\n{ROOT64}\n\n", "extension line is empty"),
    (f"o\n1\n{ROOT64}\next\n\nmore\n", "extension line is empty"),
    (f"o\x00\n1\n{ROOT64}\n", "control"),
    (f"o\n1\n{ROOT64}\next\r\n", "control"),
])
def test_bad_checkpoints_rejected(text: str, why: str) -> None:
    with pytest.raises(CheckpointError, match=why):
        parse_checkpoint(text)


def test_checkpoint_extensions_and_origin_rules() -> None:
    text = f"log with spaces+plus\n7\n{ROOT64}\nextension one\nx\n"
    cp = parse_checkpoint(text)  # clients MUST NOT assume the origin is a URL
    assert cp.origin == "log with spaces+plus" and cp.extensions == ("extension one", "x")
    assert cp.text() == text
    with pytest.raises(CheckpointError, match="newline"):
        Checkpoint("a\nb", 1, bytes(32))
    with pytest.raises(CheckpointError, match="tree size"):
        Checkpoint("a", -1, bytes(32))
    with pytest.raises(CheckpointError, match="32"):
        Checkpoint("a", 1, bytes(20))
    with pytest.raises(CheckpointError, match="extension"):
        Checkpoint("a", 1, bytes(32), ("",))


# -- cosignatures --------------------------------------------------------------------------------


def test_spec_cosignature_example() -> None:
    """tlog-cosignature.md: the w1 line carries key ID || time 1679315147 || 64-byte sig, and
    the spec's signed message for that time is what cosignature_message builds."""
    sig = parse_signature_line(SOFA_WITNESS_SIG)
    assert sig.name == "witness.example.com/w1" and sig.key_id.hex() == "8d66cf3f"
    assert len(sig.signature) == 72
    assert cosignature_timestamp(sig) == 1679315147
    spec_message = ("cosignature/v1\n"
                    "time 1679315147\n"
                    "example.com/behind-the-sofa\n"
                    "20852163\n"
                    "CsUYapGGPo4dkMgIAUqom/Xajj7h2fB2MPA3j2jxq2I=\n")
    cp = parse_checkpoint(SOFA_TEXT)
    assert cosignature_message(cp.text(), 1679315147) == spec_message.encode()


def test_cosign_round_trip_independent_check() -> None:
    witness = ident(20)
    name = "witness.example/w"
    cp = Checkpoint("log.example/x", 5, bytes(range(32)))
    line = cosign(cp, name, witness, 1_700_000_000)
    sig = parse_signature_line(line)
    kid = hashlib_key_id(name, 0x04, witness.public)
    assert sig.key_id == kid == cosignature_key_id(name, witness.public)
    assert sig.signature[:8] == (1_700_000_000).to_bytes(8, "big")
    message = b"cosignature/v1\ntime 1700000000\n" + cp.text().encode()
    Ed25519PublicKey.from_public_bytes(witness.public).verify(sig.signature[8:], message)
    vkey = cosignature_verifier_key(name, witness.public)
    assert vkey == f"{name}+{kid.hex()}+" + base64.b64encode(b"\x04" + witness.public).decode()
    v = parse_verifier_key(vkey)
    assert v == cosignature_verifier(name, witness.public) and v.alg == ALG_COSIGNATURE_V1
    assert verify_cosignature(cp, sig, v) == 1_700_000_000
    for ts in (0, 2**63 - 1):
        assert verify_cosignature(cp, parse_signature_line(cosign(cp, name, witness, ts)), v) == ts


def test_cosignature_rejections() -> None:
    witness, other = ident(20), ident(21)
    name = "witness.example/w"
    cp = Checkpoint("log.example/x", 5, bytes(range(32)), ("ext",))
    v = cosignature_verifier(name, witness.public)
    sig = parse_signature_line(cosign(cp, name, witness, 1000))
    assert verify_cosignature(cp, sig, v) == 1000
    moved = NoteSignature(sig.name, sig.key_id, (1001).to_bytes(8, "big") + sig.signature[8:])
    with pytest.raises(NoteError, match="invalid cosignature"):
        verify_cosignature(cp, moved, v)
    for changed in (Checkpoint("log.example/x", 6, cp.root, cp.extensions),
                    Checkpoint("log.example/y", 5, cp.root, cp.extensions),
                    Checkpoint("log.example/x", 5, bytes(32), cp.extensions),
                    Checkpoint("log.example/x", 5, cp.root)):
        with pytest.raises(NoteError, match="invalid cosignature"):
            verify_cosignature(changed, sig, v)
    with pytest.raises(NoteError, match="is not by cosigner"):
        verify_cosignature(cp, sig, cosignature_verifier(name, other.public))
    forged = parse_signature_line(cosign(cp, name, other, 1000))
    with pytest.raises(NoteError, match="is not by cosigner"):
        verify_cosignature(cp, forged, v)
    with pytest.raises(NoteError, match="invalid cosignature"):  # right key ID, wrong key
        verify_cosignature(cp, NoteSignature(name, v.key_id, forged.signature), v)
    with pytest.raises(NoteError, match="not cosignature/v1"):
        verify_cosignature(cp, sig, ed25519_verifier(name, witness.public))
    too_late = NoteSignature(sig.name, sig.key_id, (2**63).to_bytes(8, "big") + sig.signature[8:])
    with pytest.raises(NoteError, match="exceeds"):
        verify_cosignature(cp, too_late, v)
    with pytest.raises(NoteError, match="72 bytes"):
        verify_cosignature(cp, NoteSignature(sig.name, sig.key_id, sig.signature[8:]), v)
    for ts in (-1, 2**63):
        with pytest.raises(NoteError, match="timestamp"):
            cosign(cp, name, witness, ts)


def test_verify_note_checks_log_signature_and_cosignatures() -> None:
    log, witness = ident(1), ident(20)
    cp = Checkpoint("log.example/x", 3, bytes(range(32)))
    log_v = ed25519_verifier("log.example/x", log.public)
    w_v = cosignature_verifier("w.example", witness.public)
    signed = add_signatures(sign_note(cp.text(), "log.example/x", log),
                            [cosign(cp, "w.example", witness, 42)])
    _, verified = verify_note(signed, [log_v, w_v])
    assert verified == [log_v, w_v]
    # a plain Ed25519 verifier for the witness key does not accept its cosignature (other ID)
    with pytest.raises(NoteError, match="no signature by a known key"):
        verify_note(signed, [ed25519_verifier("w.example", witness.public)])


# -- tlog proofs ---------------------------------------------------------------------------------
# Merkle Tree Hash and audit paths straight from RFC 6962 §2.1 and §2.1.1.


def mth(leaves: list[bytes]) -> bytes:
    n = len(leaves)
    if n == 0:
        return hashlib.sha256(b"").digest()
    if n == 1:
        return hashlib.sha256(b"\x00" + leaves[0]).digest()
    k = 1 << ((n - 1).bit_length() - 1)  # largest power of two smaller than n
    return hashlib.sha256(b"\x01" + mth(leaves[:k]) + mth(leaves[k:])).digest()


def path(m: int, leaves: list[bytes]) -> list[bytes]:
    n = len(leaves)
    if n == 1:
        return []
    k = 1 << ((n - 1).bit_length() - 1)
    if m < k:
        return [*path(m, leaves[:k]), mth(leaves[k:])]
    return [*path(m - k, leaves[k:]), mth(leaves[:k])]


LOG = ident(1)
WITNESSES = [ident(20), ident(21), ident(22)]
LOG_NAME = "log.example/veilnet"
LOG_V = ed25519_verifier(LOG_NAME, LOG.public)
WITNESS_VS = [cosignature_verifier(f"w{i}.example", w.public) for i, w in enumerate(WITNESSES)]


def entries(n: int) -> list[bytes]:
    return [b"entry %d" % i for i in range(n)]


def checkpoint_note(leaves: list[bytes], cosigners: int = 2, signer: Identity = LOG) -> str:
    cp = Checkpoint(LOG_NAME, len(leaves), mth(leaves))
    note = sign_note(cp.text(), LOG_NAME, signer)
    return add_signatures(note, [cosign(cp, f"w{i}.example", WITNESSES[i], 1000 + i)
                                 for i in range(cosigners)])


def make_proof(leaves: list[bytes], index: int, **kw: object) -> str:
    return format_proof(TlogProof(index, tuple(path(index, leaves)),
                                  checkpoint_note(leaves, **kw)))  # type: ignore[arg-type]


def test_rfc6962_helpers_sanity() -> None:
    assert mth([]).hex() == "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"
    assert mth([b""]).hex() == "6e340b9cffb37a989ca544e6bb780a2c78901d3fb33738768511a30617afa01d"


def test_proof_text_layout() -> None:
    leaves = entries(5)
    note = checkpoint_note(leaves)
    text = format_proof(TlogProof(3, tuple(path(3, leaves)), note, extra=b"ctx"))
    hashes = "".join(base64.b64encode(h).decode() + "\n" for h in path(3, leaves))
    assert text == f"{HEADER}\nextra {base64.b64encode(b'ctx').decode()}\nindex 3\n{hashes}\n{note}"
    assert parse_proof(text) == TlogProof(3, tuple(path(3, leaves)), note, b"ctx")
    plain = format_proof(TlogProof(3, tuple(path(3, leaves)), note))
    assert plain == f"{HEADER}\nindex 3\n{hashes}\n{note}"
    assert parse_proof(plain.encode()).extra is None


@pytest.mark.parametrize("n", [1, 2, 3, 4, 5, 7, 8, 9])
def test_proofs_verify_for_every_index(n: int) -> None:
    leaves = entries(n)
    for index in range(n):
        text = make_proof(leaves, index)
        cp = verify_proof(text, leaves[index], LOG_V, WITNESS_VS, quorum=2)
        assert (cp.origin, cp.size, cp.root) == (LOG_NAME, n, mth(leaves))
        assert len(parse_proof(text).hashes) == len(path(index, leaves))


def test_proof_quorum() -> None:
    leaves = entries(6)
    text = make_proof(leaves, 4, cosigners=2)
    verify_proof(text, leaves[4], LOG_V)  # no witnesses required
    verify_proof(text, leaves[4], LOG_V, WITNESS_VS, quorum=2)
    with pytest.raises(TlogProofError, match="2 valid witness cosignatures, the quorum is 3"):
        verify_proof(text, leaves[4], LOG_V, WITNESS_VS, quorum=3)
    with pytest.raises(TlogProofError, match="exceeds"):
        verify_proof(text, leaves[4], LOG_V, WITNESS_VS[:1], quorum=2)
    # one witness listed twice, or its key under a second name, counts once
    alias = cosignature_verifier("alias.example", WITNESSES[0].public)
    with pytest.raises(TlogProofError, match="exceeds"):
        verify_proof(text, leaves[4], LOG_V, [WITNESS_VS[0], WITNESS_VS[0], alias], quorum=2)
    cp = parse_checkpoint(parse_note(text.split("\n\n", 1)[1]).text)
    aliased = add_signatures(text, [cosign(cp, "alias.example", WITNESSES[0], 5)])
    with pytest.raises(TlogProofError, match="1 valid witness cosignatures, the quorum is 2"):
        verify_proof(aliased, leaves[4], LOG_V, [WITNESS_VS[0], alias, WITNESS_VS[2]], quorum=2)
    # a bad cosignature by a known witness rejects the proof
    bad = text.replace(WITNESS_VS[1].name + " ", WITNESS_VS[1].name + " X", 1)
    assert bad != text
    with pytest.raises(NoteError):
        verify_proof(bad, leaves[4], LOG_V, WITNESS_VS, quorum=1)


def test_proof_rejections() -> None:
    leaves = entries(7)
    good = make_proof(leaves, 5)
    verify_proof(good, leaves[5], LOG_V, WITNESS_VS, quorum=2)
    with pytest.raises(TlogProofError, match="does not lead to the root"):
        verify_proof(good, leaves[4], LOG_V, WITNESS_VS, quorum=2)
    with pytest.raises(TlogProofError, match="does not lead to the root"):
        verify_proof(good, b"entry 5 ", LOG_V)
    wrong_index = format_proof(TlogProof(4, tuple(path(5, leaves)), checkpoint_note(leaves)))
    with pytest.raises(TlogProofError, match="does not lead to the root"):
        verify_proof(wrong_index, leaves[5], LOG_V)
    out_of_range = format_proof(TlogProof(7, tuple(path(5, leaves)), checkpoint_note(leaves)))
    with pytest.raises(TlogProofError, match="not in a tree of size 7"):
        verify_proof(out_of_range, leaves[5], LOG_V)
    hashes = list(path(5, leaves))
    for i in range(len(hashes)):
        tampered = list(hashes)
        tampered[i] = bytes([tampered[i][0] ^ 1]) + tampered[i][1:]
        text = format_proof(TlogProof(5, tuple(tampered), checkpoint_note(leaves)))
        with pytest.raises(TlogProofError, match="does not lead to the root"):
            verify_proof(text, leaves[5], LOG_V)
    for wrong, why in ((hashes[:-1], "too short"), ([*hashes, hashes[0]], "too long")):
        text = format_proof(TlogProof(5, tuple(wrong), checkpoint_note(leaves)))
        with pytest.raises(TlogProofError, match=why):
            verify_proof(text, leaves[5], LOG_V)
    # checkpoint signed by another key under the log's name: not a known signature
    other = make_proof(leaves, 5, signer=ident(99))
    with pytest.raises(NoteError, match="no signature by a known key"):
        verify_proof(other, leaves[5], LOG_V)
    # ... even though the witnesses cosigned it: the log's own signature is required
    for quorum in (0, 2):
        with pytest.raises(NoteError, match="not signed by the log key"):
            verify_proof(other, leaves[5], LOG_V, WITNESS_VS, quorum=quorum)
    # a checkpoint whose text was changed after signing
    forged_root = base64.b64encode(bytes(32)).decode()
    real_root = base64.b64encode(mth(leaves)).decode()
    with pytest.raises(NoteError, match="invalid signature"):
        verify_proof(good.replace(real_root, forged_root), leaves[5], LOG_V)


def test_proof_too_short_for_tree_size_rejected() -> None:
    """A root equal to the leaf hash, claimed for a tree of 2 leaves, with an empty proof: the
    RFC 9162 check must also end at the top of the tree (sn == 0), not only match the root."""
    entry = b"entry 0"
    cp = Checkpoint(LOG_NAME, 2, hashlib.sha256(b"\x00" + entry).digest())
    text = format_proof(TlogProof(0, (), sign_note(cp.text(), LOG_NAME, LOG)))
    with pytest.raises(TlogProofError, match="too short"):
        verify_proof(text, entry, LOG_V)
    cp1 = Checkpoint(LOG_NAME, 1, cp.root)
    assert verify_proof(format_proof(TlogProof(0, (), sign_note(cp1.text(), LOG_NAME, LOG))),
                        entry, LOG_V) == cp1


SPEC_PROOF_HEAD = (
    "c2sp.org/tlog-proof@v1\n"
    "extra YWdlLXYxLjIuMS1kYXJ3aW4tYXJtNjQudGFyLmd6kYXJ3aW4tYXJ\n"
    "index 73894\n"
    "gSKyXoYZUgZ6jduWYrkDOARinOMGJveXjgMkBTcdPlQ=\n"
    "B95lDa8R83lS8n0eG+o0buTxRKQTYFi//1U8anccXmA=\n"
    "EKNzoDWG8LGC0Yp9o+sv3qllpMP9uHQ9B20KNL+Q1zs=\n"
    "RoopEkOdqkYqMB4MJXrbt/hMjOxsVn0IrWjpz1ZMMes=\n"
    "AHCioX9nLjsrse6YhjRRmk1WUEirVOLLRoOQ6vfO5vk=\n"
    "\n"
    "example.com/fancylog\n"
    "109482\n"
    "sFodV/vSp5O8n9a8QpW6PRY97tfOSW5bsc2Xl/EQi08=\n"
)


def test_spec_proof_example_parses() -> None:
    """tlog-proof.md's example, with its elided ("[...]") signature lines replaced by one real
    signature line (the spec's own are not complete)."""
    cp_text = SPEC_PROOF_HEAD.split("\n\n", 1)[1]
    text = SPEC_PROOF_HEAD + "\n" + sign_note(cp_text, "example.com/fancylog", LOG).split(
        "\n\n", 1)[1]
    p = parse_proof(text)
    assert p.index == 73894 and len(p.hashes) == 5
    assert p.extra is not None and p.extra.startswith(b"age-v1.2.1-darwin-arm64.tar.gz")
    assert p.hashes[0] == base64.b64decode("gSKyXoYZUgZ6jduWYrkDOARinOMGJveXjgMkBTcdPlQ=")
    assert parse_checkpoint(parse_note(p.checkpoint_note).text).size == 109482
    assert format_proof(p) == text


@pytest.mark.parametrize(("mangle", "why"), [
    (lambda t: t.replace(HEADER, "c2sp.org/tlog-proof@v2"), "first line"),
    (lambda t: t.replace(HEADER + "\n", ""), "first line"),
    (lambda t: t.replace("index 3\n", ""), "index"),
    (lambda t: t.replace("index 3", "index 03"), "leading zeroes"),
    (lambda t: t.replace("index 3", "index -3"), "decimal"),
    (lambda t: t.replace("index 3", "index  3"), "decimal"),
    (lambda t: t.replace("index 3", "Index 3"), "index"),
    (lambda t: t.replace("index 3", f"index {2**64}"), "exceeds"),
    (lambda t: t.replace(HEADER + "\n", HEADER + "\nextra \n"), "extra line is present"),
    (lambda t: t.replace(HEADER + "\n", HEADER + "\nextra ***\n"), "base64"),
    (lambda t: t.replace("index 3\n", "index 3\nextra YQ==\n"), "base64"),
    (lambda t: t.replace("\n\n", "\n", 1), "base64|empty line"),
    (lambda t: t.split("\n\n", 1)[0], "empty line"),
    (lambda t: t.replace("index 3\n", "index 3\n" + "AAAA\n"), "3 bytes"),
    (lambda t: t.replace("index 3\n", "index 3\n" + base64.b64encode(bytes(32)).decode()
                         .rstrip("=") + "\n"), "base64"),
    (lambda t: t.replace("index 3\n", "index 3\n" + (base64.b64encode(bytes(32)).decode()
                                                     + "\n") * 65), "more than 64"),
    (lambda t: t.replace("index 3\n", "index 3\r\n"), "decimal"),
    (lambda t: t.rstrip("\n"), "newline"),
    (lambda t: t[: t.rindex("\n\n") + 2], "no signature lines"),
])
def test_malformed_proofs_rejected(mangle, why: str) -> None:  # type: ignore[no-untyped-def]
    leaves = entries(5)
    text = make_proof(leaves, 3)
    verify_proof(text, leaves[3], LOG_V)
    bad = mangle(text)
    assert bad != text
    with pytest.raises(ValueError, match=why):
        parse_proof(bad)
    with pytest.raises(ValueError, match=why):
        verify_proof(bad, leaves[3], LOG_V)


def test_format_proof_rejects_bad_fields() -> None:
    leaves = entries(3)
    note = checkpoint_note(leaves)
    with pytest.raises(TlogProofError, match="index"):
        format_proof(TlogProof(-1, (), note))
    with pytest.raises(TlogProofError, match="31 bytes"):
        format_proof(TlogProof(0, (bytes(31),), note))
    with pytest.raises(TlogProofError, match="empty extra"):
        format_proof(TlogProof(0, (), note, b""))
    with pytest.raises(NoteError):
        format_proof(TlogProof(0, (), "not a note\n"))
    with pytest.raises(CheckpointError):
        format_proof(TlogProof(0, (), sign_note("just text\n", LOG_NAME, LOG)))
