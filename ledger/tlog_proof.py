"""C2SP transparency-log proofs (https://c2sp.org/tlog-proof): an offline-verifiable receipt.

::

    c2sp.org/tlog-proof@v1
    [extra <base64 of opaque, unauthenticated extra data>]
    index <zero-based entry index, decimal, no leading zeroes>
    <base64 of one 32-byte inclusion-proof hash per line, leaf's sibling first>
    <empty line>
    <the checkpoint, a signed note with the log's signature and witness cosignatures, verbatim>

The inclusion proof is the RFC 6962 §2.1.1 audit path, checked with the RFC 9162 §2.1.3.2
algorithm (``ledger.merkle.verify_inclusion``) against the checkpoint's size and root. Written
by hand from the C2SP text: there is no maintained Python library for it.

Choices where the spec leaves room: an ``extra`` line must carry at least one byte (no extra
data means no line); index and tree size are capped at 2**64 - 1, so at most 64 proof hashes.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from errors import InputError
from ledger.checkpoint import (
    HASH_SIZE,
    Checkpoint,
    CheckpointError,
    parse_checkpoint,
    parse_decimal,
)
from ledger.merkle import ProofError, leaf_hash, verify_inclusion
from ledger.note import NoteError, Verifier, b64decode, b64encode, parse_note, verify_note

HEADER = "c2sp.org/tlog-proof@v1"
MAX_PROOF_HASHES = 64


class TlogProofError(InputError):
    """A tlog-proof that is malformed, or whose inclusion proof or quorum does not hold."""


@dataclass(frozen=True)
class TlogProof:
    index: int
    hashes: tuple[bytes, ...]
    checkpoint_note: str
    extra: bytes | None = None


def format_proof(p: TlogProof) -> str:
    if isinstance(p.index, bool) or not isinstance(p.index, int) or not 0 <= p.index < 2**64:
        raise TlogProofError(f"index {p.index!r} is not an integer in [0, 2**64)")
    if len(p.hashes) > MAX_PROOF_HASHES:
        raise TlogProofError(f"{len(p.hashes)} proof hashes, more than {MAX_PROOF_HASHES}")
    for i, h in enumerate(p.hashes):
        if len(h) != HASH_SIZE:
            raise TlogProofError(f"proof hash {i} has {len(h)} bytes, not {HASH_SIZE}")
    if p.extra is not None and not p.extra:
        raise TlogProofError("empty extra data: use None, the extra line is then omitted")
    parse_checkpoint(parse_note(p.checkpoint_note).text)
    lines = [HEADER]
    if p.extra is not None:
        lines.append("extra " + b64encode(p.extra))
    lines.append(f"index {p.index}")
    lines.extend(b64encode(h) for h in p.hashes)
    return "".join(line + "\n" for line in lines) + "\n" + p.checkpoint_note


def parse_proof(text: str | bytes) -> TlogProof:
    """Parse a proof; the checkpoint note is checked for syntax, not signatures."""
    if isinstance(text, bytes):
        try:
            text = text.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise TlogProofError("the proof is not valid UTF-8") from exc
    head, sep, checkpoint_note = text.partition("\n\n")
    if not sep:
        raise TlogProofError("the proof has no empty line before the checkpoint")
    lines = head.split("\n")
    if lines[0] != HEADER:
        raise TlogProofError(f"the first line is {lines[0]!r}, not {HEADER!r}")
    pos = 1
    extra = None
    if pos < len(lines) and lines[pos].startswith("extra "):
        try:
            extra = b64decode(lines[pos][len("extra "):], "the extra data")
        except NoteError as exc:
            raise TlogProofError(str(exc)) from exc
        if not extra:
            raise TlogProofError("the extra line is present but empty")
        pos += 1
    if pos >= len(lines) or not lines[pos].startswith("index "):
        raise TlogProofError("missing the 'index <n>' line")
    try:
        index = parse_decimal(lines[pos][len("index "):], "index")
    except CheckpointError as exc:
        raise TlogProofError(str(exc)) from exc
    hash_lines = lines[pos + 1:]
    if len(hash_lines) > MAX_PROOF_HASHES:
        raise TlogProofError(f"{len(hash_lines)} proof hashes, more than {MAX_PROOF_HASHES}")
    hashes = []
    for i, line in enumerate(hash_lines):
        try:
            h = b64decode(line, f"proof line {i}")
        except NoteError as exc:
            raise TlogProofError(str(exc)) from exc
        if len(h) != HASH_SIZE:
            raise TlogProofError(f"proof hash {i} has {len(h)} bytes, not {HASH_SIZE}")
        hashes.append(h)
    parse_checkpoint(parse_note(checkpoint_note).text)
    return TlogProof(index, tuple(hashes), checkpoint_note, extra)


def verify_proof(text: str | bytes, entry: bytes, log_verifier: Verifier,
                 witnesses: Sequence[Verifier] = (), quorum: int = 0) -> Checkpoint:
    """Verify a proof of ``entry`` offline; returns the checkpoint it is included in.

    The checkpoint must carry a valid signature by ``log_verifier`` and valid cosignatures by at
    least ``quorum`` ``witnesses`` with distinct public keys (a known key whose signature fails
    rejects the proof; unknown signatures are ignored); the RFC 6962 leaf hash of ``entry`` must
    be at ``index`` in the tree of the checkpoint's size and root. Raises :class:`NoteError` (bad
    signatures), :class:`CheckpointError` or :class:`TlogProofError` naming what failed.
    """
    if quorum < 0:
        raise TlogProofError(f"quorum {quorum} is negative")
    proof = parse_proof(text)
    witness_set = [w for w in dict.fromkeys(witnesses) if w != log_verifier]
    # Distinct witnesses are distinct public keys: a cosignature/v1 does not sign the cosigner's
    # name, so one key listed under two names must not count twice.
    n_keys = len({w.public for w in witness_set} - {log_verifier.public})
    if quorum > n_keys:
        raise TlogProofError(f"quorum {quorum} exceeds the {n_keys} known witness keys")
    note, verified = verify_note(proof.checkpoint_note, [log_verifier, *witness_set])
    if log_verifier not in verified:
        raise NoteError(f"the checkpoint is not signed by the log key "
                        f"{log_verifier.name}+{log_verifier.key_id.hex()}")
    cosigners = {v.public for v in verified} - {log_verifier.public}
    if len(cosigners) < quorum:
        raise TlogProofError(f"the checkpoint has {len(cosigners)} valid witness cosignatures, "
                             f"the quorum is {quorum}")
    checkpoint = parse_checkpoint(note.text)
    if proof.index >= checkpoint.size:
        raise TlogProofError(f"index {proof.index} is not in a tree of size {checkpoint.size}")
    try:
        verify_inclusion(leaf_hash(entry), proof.index, checkpoint.size, proof.hashes,
                         checkpoint.root)
    except ProofError as exc:
        raise TlogProofError(f"the entry is not proven at index {proof.index} of the "
                             f"checkpointed tree: {exc}") from exc
    return checkpoint
