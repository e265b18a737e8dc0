"""C2SP signed notes (https://c2sp.org/signed-note): text signed by one or more named keys.

A signed note is a text ending in a newline, a blank line, then one or more signature lines::

    <text, ending in "\\n">
    <blank line>
    — <key name> base64(4-byte key ID || signature)

The whole note is UTF-8 without ASCII control characters other than newline; the text is
separated from the signatures by the *last* empty line; key names are non-empty and contain
neither Unicode spaces nor ``+``. A key ID is ``SHA-256(name || 0x0A || type || public)[:4]``.
Verifier keys (vkeys) are ``<name>+<hex key ID>+<base64(type || public)>``, the encoding of
golang.org/x/mod/sumdb/note.

Two signature types are supported: ``0x01`` (Ed25519 over the note text) and ``0x04``
(c2sp.org/tlog-cosignature cosignature/v1: Ed25519 over ``"cosignature/v1\\ntime <t>\\n" ||
text``, with the 8-byte big-endian timestamp in front of the 64-byte signature), so that
:func:`verify_note` checks log signatures and witness cosignatures alike.

Nobody maintains a Python library for signed notes, so this module is written by hand from the
C2SP text and checked against the test vectors of golang.org/x/mod/sumdb/note.

Choices where the spec leaves room (all stricter than, or equal to, the Go implementation):

- at most :data:`MAX_SIGNATURES` (100, as in Go; the spec requires accepting at least 16)
  signature lines;
- base64 must be canonical (standard alphabet, padding, zero trailing bits), so one signature
  has exactly one spelling;
- two signature lines for the same (key name, key ID) make the note malformed (Go silently keeps
  the first one); :func:`add_signatures` replaces a key's old line instead of duplicating it;
- a signature from a known key that fails to verify rejects the whole note (the spec's SHOULD).
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import re
from collections.abc import Sequence
from dataclasses import dataclass

from crypto.identity import Identity, verify
from errors import InputError

ALG_ED25519 = 0x01
ALG_COSIGNATURE_V1 = 0x04
SUPPORTED_ALGS = {ALG_ED25519: "Ed25519", ALG_COSIGNATURE_V1: "cosignature/v1 (Ed25519)"}

MAX_SIGNATURES = 100
MAX_TIMESTAMP = 2**63 - 1
SIG_PREFIX = "— "  # U+2014 EM DASH, U+0020 SPACE

_ED25519_PUBLIC_LEN = 32
_ED25519_SIG_LEN = 64
_HEX8 = re.compile(r"[0-9a-fA-F]{8}")


class NoteError(InputError):
    """A signed note, signature line or verifier key that is malformed or does not verify."""


# -- encodings ----------------------------------------------------------------------------------


def b64encode(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def b64decode(text: str, what: str) -> bytes:
    """Strict standard base64 (RFC 4648 §4): only the canonical spelling of some bytes."""
    try:
        raw = base64.b64decode(text.encode("ascii"), validate=True)
    except (UnicodeEncodeError, binascii.Error, ValueError) as exc:
        raise NoteError(f"{what} is not valid base64: {text!r}") from exc
    if b64encode(raw) != text:
        raise NoteError(f"{what} is not canonical base64: {text!r}")
    return raw


def check_name(name: str, what: str = "key name") -> str:
    """A key name: non-empty, no Unicode spaces, no ``+`` (and no control characters)."""
    if not name:
        raise NoteError(f"the {what} is empty")
    for ch in name:
        if ch == "+":
            raise NoteError(f"the {what} {name!r} contains '+'")
        if ch.isspace():
            raise NoteError(f"the {what} {name!r} contains a space character {ch!r}")
        if ord(ch) < 0x20:
            raise NoteError(f"the {what} {name!r} contains a control character {ch!r}")
    _check_utf8(name, f"the {what}")
    return name


def _check_utf8(text: str, what: str) -> None:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise NoteError(f"{what} is not valid UTF-8 (lone surrogate)") from exc


def check_note_chars(text: str, what: str = "the note") -> None:
    """Valid UTF-8 with no ASCII control characters other than newline."""
    _check_utf8(text, what)
    for i, ch in enumerate(text):
        if ch < " " and ch != "\n":
            raise NoteError(f"{what} contains the control character {ch!r} at offset {i}")


def _as_text(note: str | bytes, what: str) -> str:
    if isinstance(note, bytes):
        try:
            return note.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise NoteError(f"{what} is not valid UTF-8: {exc.reason} at byte {exc.start}") \
                from exc
    return note


# -- keys ---------------------------------------------------------------------------------------


def key_id(name: str, alg: int, public: bytes) -> bytes:
    """``SHA-256(name || 0x0A || alg || public)[:4]``, the 4-byte (big-endian uint32) key ID."""
    if not 0 <= alg <= 0xFF:
        raise NoteError(f"signature type {alg} is not a byte")
    return hashlib.sha256(name.encode("utf-8") + b"\n" + bytes([alg]) + public).digest()[:4]


def _check_public(alg: int, public: bytes) -> None:
    if alg not in SUPPORTED_ALGS:
        raise NoteError(f"unknown signature type 0x{alg:02x}")
    if len(public) != _ED25519_PUBLIC_LEN:
        raise NoteError(f"a {SUPPORTED_ALGS[alg]} public key has {_ED25519_PUBLIC_LEN} bytes, "
                        f"not {len(public)}")


def cosignature_message(text: str, timestamp: int) -> bytes:
    """The bytes a cosignature/v1 signs: ``cosignature/v1\\ntime <t>\\n`` || note text."""
    return f"cosignature/v1\ntime {timestamp}\n{text}".encode()


@dataclass(frozen=True)
class Verifier:
    """A known public key: the (name, key ID) pair that selects it and how it verifies."""

    name: str
    key_id: bytes
    alg: int
    public: bytes

    def __post_init__(self) -> None:
        check_name(self.name)
        _check_public(self.alg, self.public)
        expected = key_id(self.name, self.alg, self.public)
        if self.key_id != expected:
            raise NoteError(f"key ID {self.key_id.hex()} of {self.name!r} should be "
                            f"{expected.hex()}")

    def verify(self, message: bytes, sig: bytes) -> bool:
        """Whether ``sig`` (the signature bytes after the key ID) signs the note text
        ``message``. For cosignature/v1 ``sig`` is timestamp (8 bytes, big-endian) || Ed25519
        signature and the signed message is :func:`cosignature_message`."""
        if self.alg == ALG_ED25519:
            return len(sig) == _ED25519_SIG_LEN and verify(self.public, sig, message)
        if len(sig) != 8 + _ED25519_SIG_LEN:
            return False
        timestamp = int.from_bytes(sig[:8], "big")
        if timestamp > MAX_TIMESTAMP:
            return False
        try:
            text = message.decode("utf-8")
        except UnicodeDecodeError:
            return False
        return verify(self.public, sig[8:], cosignature_message(text, timestamp))

    def vkey(self) -> str:
        return verifier_key(self.name, self.public, self.alg)


def ed25519_verifier(name: str, public: bytes) -> Verifier:
    """The Ed25519 (type 0x01) verifier for ``name`` and a raw 32-byte public key."""
    return Verifier(name, key_id(check_name(name), ALG_ED25519, public), ALG_ED25519, public)


def verifier_key(name: str, public: bytes, alg: int = ALG_ED25519) -> str:
    """The vkey ``name+hex(key ID)+base64(alg || public)``."""
    check_name(name)
    _check_public(alg, public)
    return f"{name}+{key_id(name, alg, public).hex()}+{b64encode(bytes([alg]) + public)}"


def parse_verifier_key(text: str) -> Verifier:
    """Parse a vkey; :class:`NoteError` says which part is wrong."""
    name, sep1, rest = text.partition("+")
    hash16, sep2, key64 = rest.partition("+")
    if not sep1 or not sep2:
        raise NoteError(f"verifier key {text!r} is not <name>+<key ID>+<key>")
    check_name(name)
    if not _HEX8.fullmatch(hash16):
        raise NoteError(f"verifier key {text!r}: key ID {hash16!r} is not 8 hex digits")
    raw = b64decode(key64, f"verifier key {text!r}: the key")
    if not raw:
        raise NoteError(f"verifier key {text!r}: the key is empty")
    kid = bytes.fromhex(hash16)
    if kid != key_id(name, raw[0], raw[1:]):
        raise NoteError(f"verifier key {text!r}: key ID {hash16} does not match the key")
    alg, public = raw[0], raw[1:]
    if alg not in SUPPORTED_ALGS:
        raise NoteError(f"verifier key {text!r}: unknown signature type 0x{alg:02x}")
    if len(public) != _ED25519_PUBLIC_LEN:
        raise NoteError(f"verifier key {text!r}: a {SUPPORTED_ALGS[alg]} key has "
                        f"{_ED25519_PUBLIC_LEN} bytes, not {len(public)}")
    return Verifier(name, kid, alg, public)


# -- notes --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class NoteSignature:
    """One signature line: key name, 4-byte key ID, and the signature bytes after the key ID."""

    name: str
    key_id: bytes
    signature: bytes

    def line(self) -> str:
        return signature_line(self.name, self.key_id, self.signature)


@dataclass(frozen=True)
class Note:
    """A parsed (not yet verified) note: its text (with final newline) and its signatures."""

    text: str
    signatures: tuple[NoteSignature, ...]


def signature_line(name: str, key_id: bytes, signature: bytes) -> str:
    """``— <name> base64(key ID || signature)`` with its final newline."""
    check_name(name)
    if len(key_id) != 4:
        raise NoteError(f"a key ID has 4 bytes, not {len(key_id)}")
    if not signature:
        raise NoteError("the signature is empty")
    return f"{SIG_PREFIX}{name} {b64encode(key_id + signature)}\n"


def _check_text(text: str) -> None:
    if not text.endswith("\n"):
        raise NoteError("the note text does not end with a newline")
    check_note_chars(text, "the note text")


def sign_note(text: str, name: str, identity: Identity) -> str:
    """The note ``text`` signed with Ed25519 (type 0x01) by ``identity`` under key ``name``."""
    _check_text(text)
    check_name(name)
    kid = key_id(name, ALG_ED25519, identity.public)
    return text + "\n" + signature_line(name, kid, identity.sign(text.encode("utf-8")))


def _parse_signature_line(line: str) -> NoteSignature:
    if not line.startswith(SIG_PREFIX):
        raise NoteError(f"signature line {line!r} does not start with an em dash and a space")
    name, sep, b64 = line[len(SIG_PREFIX):].partition(" ")
    if not sep:
        raise NoteError(f"signature line {line!r} has no space between name and signature")
    check_name(name)
    raw = b64decode(b64, f"the signature of {name!r}")
    if len(raw) < 5:
        raise NoteError(f"the signature of {name!r} has {len(raw)} bytes, fewer than 4+1")
    return NoteSignature(name, raw[:4], raw[4:])


def parse_signature_line(line: str) -> NoteSignature:
    """One signature line, with or without its final newline."""
    return _parse_signature_line(line.removesuffix("\n"))


def parse_note(note: str | bytes) -> Note:
    """Split and check a signed note (syntax only; see :func:`verify_note`)."""
    text_all = _as_text(note, "the note")
    check_note_chars(text_all)
    split = text_all.rfind("\n\n")
    if split < 0:
        raise NoteError("the note has no blank line before its signatures")
    text, sigs = text_all[: split + 1], text_all[split + 2:]
    if not sigs:
        raise NoteError("the note has no signature lines")
    if not sigs.endswith("\n"):
        raise NoteError("the last signature line does not end with a newline")
    lines = sigs[:-1].split("\n")
    if len(lines) > MAX_SIGNATURES:
        raise NoteError(f"the note has {len(lines)} signatures, more than {MAX_SIGNATURES}")
    signatures: list[NoteSignature] = []
    seen: set[tuple[str, bytes]] = set()
    for line in lines:
        sig = _parse_signature_line(line)
        if (sig.name, sig.key_id) in seen:
            raise NoteError(f"two signatures by key {sig.name}+{sig.key_id.hex()}")
        seen.add((sig.name, sig.key_id))
        signatures.append(sig)
    return Note(text, tuple(signatures))


def format_note(note: Note) -> str:
    _check_text(note.text)
    if not note.signatures:
        raise NoteError("a signed note needs at least one signature")
    return note.text + "\n" + "".join(s.line() for s in note.signatures)


def add_signatures(note: str, lines: Sequence[str]) -> str:
    """Append signature lines (each with or without its newline) to a signed note.

    A line identical to one already present is dropped; a line by a key (name, key ID) that
    already signed replaces that key's earlier line, as golang.org/x/mod/sumdb/note ``Sign``
    does. The signatures are not verified here.
    """
    parsed = parse_note(note)
    sigs = {(s.name, s.key_id): s for s in parsed.signatures}
    for line in lines:
        new = parse_signature_line(line)
        sigs[(new.name, new.key_id)] = new  # identical: no change; same key: replaced in place
    if len(sigs) > MAX_SIGNATURES:
        raise NoteError(f"the note would have {len(sigs)} signatures, more than "
                        f"{MAX_SIGNATURES}")
    return format_note(Note(parsed.text, tuple(sigs.values())))


def verify_note(note: str | bytes,
                verifiers: Sequence[Verifier]) -> tuple[Note, list[Verifier]]:
    """Parse ``note`` and check every signature by a known key.

    Signatures whose (name, key ID) match no verifier are ignored. Returns the note and the
    verifiers whose signatures verified, in signature order. :class:`NoteError` when a known
    key's signature does not verify, when two different known keys share a (name, key ID), or
    when no known key signed the note.
    """
    parsed = parse_note(note)
    known: dict[tuple[str, bytes], list[Verifier]] = {}
    for v in verifiers:
        same = known.setdefault((v.name, v.key_id), [])
        if v not in same:
            same.append(v)
    message = parsed.text.encode("utf-8")
    verified: list[Verifier] = []
    for sig in parsed.signatures:
        candidates = known.get((sig.name, sig.key_id))
        if not candidates:
            continue
        if len(candidates) > 1:
            raise NoteError(f"ambiguous key {sig.name}+{sig.key_id.hex()}: "
                            f"{len(candidates)} known keys share it")
        v = candidates[0]
        if not v.verify(message, sig.signature):
            raise NoteError(f"invalid signature for key {sig.name}+{sig.key_id.hex()}")
        verified.append(v)
    if not verified:
        raise NoteError("the note has no signature by a known key")
    return parsed, verified
