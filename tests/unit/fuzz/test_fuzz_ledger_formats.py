"""Fuzzing the ledger's text and binary formats: C2SP signed notes and verifier keys
(ledger/note.py: NoteError), checkpoints (ledger/checkpoint.py: CheckpointError), cosignatures
(ledger/cosign.py: NoteError), tlog-proofs (ledger/tlog_proof.py: TlogProofError, or the
NoteError/CheckpointError of the checkpoint inside, as ``verify_proof`` documents), signed
entries (ledger/entries.py: EntryError), and a witness offered a checkpoint (ledger/witness.py:
WitnessRefused). Each starts from valid objects made by a real log, witness and signer."""

from __future__ import annotations

import atexit
import shutil
import tempfile
from pathlib import Path
from typing import Any

import cbor2
from fuzzkit import budget, check, mutated_bytes, mutated_text, mutated_tree, values
from hypothesis import given
from hypothesis import strategies as st

from crypto.identity import Identity
from ledger import (
    CheckpointError,
    EntryError,
    Log,
    NoteError,
    TlogProofError,
    Witness,
    WitnessRefused,
    cosign,
    parse_checkpoint,
    parse_entry,
    parse_note,
    parse_proof,
    parse_verifier_key,
    verify_cosignature,
    verify_note,
    verify_proof,
)
from ledger.cosign import cosignature_timestamp, cosignature_verifier
from ledger.entries import make_entry
from ledger.note import add_signatures, parse_signature_line

ORIGIN = "example.org/veilnet-log"
LOG_ID = Identity.from_seed(b"\x01" * 32)
WITNESS_ID = Identity.from_seed(b"\x02" * 32)
AUTHOR = Identity.from_seed(b"\x03" * 32)
WITNESS_NAME = "witness.example.org/w1"
ENTRIES = [make_entry(AUTHOR, "score-report/1", {"scores": {AUTHOR.did: {
    "score": 0.5 + i / 10, "agreement": 1.0, "latency_ms": 12, "availability": 1.0,
    "observations": i + 1}}}, when=1700000000 + i) for i in range(5)]

_DIR = Path(tempfile.mkdtemp(prefix="veilnet-fuzz-ledger-"))
atexit.register(shutil.rmtree, _DIR, True)
_LOG = Log.init(_DIR / "log", ORIGIN, LOG_ID)
_LOG.append(ENTRIES[:2])
_, _NOTE = _LOG.append(ENTRIES[2:])
CHECKPOINT = parse_checkpoint(parse_note(_NOTE).text)
COSIG_LINE = cosign(CHECKPOINT, WITNESS_NAME, WITNESS_ID, 1700000100)
NOTE = add_signatures(_NOTE, [COSIG_LINE])
LOG_VERIFIER = _LOG.verifier
WITNESS_VERIFIER = cosignature_verifier(WITNESS_NAME, WITNESS_ID.public)
VERIFIERS = [LOG_VERIFIER, WITNESS_VERIFIER]
PROOF = _LOG.proof(3).replace(_NOTE, NOTE)
OLD_NOTE = _LOG.checkpoint(2)
CONSISTENCY = _LOG.consistency(2, 5)
_LOG.close()

FORMATS = {"note": NOTE, "proof": PROOF, "vkey": LOG_VERIFIER.vkey(),
           "cosig": COSIG_LINE, "checkpoint": CHECKPOINT.text()}


def test_valid_objects_pass() -> None:
    verify_note(NOTE, VERIFIERS)
    verify_proof(PROOF, ENTRIES[3], LOG_VERIFIER, [WITNESS_VERIFIER], quorum=1)
    assert verify_cosignature(CHECKPOINT, parse_signature_line(COSIG_LINE),
                              WITNESS_VERIFIER) == 1700000100
    assert parse_verifier_key(LOG_VERIFIER.vkey()) == LOG_VERIFIER
    assert all(parse_entry(e) for e in ENTRIES)


def text_or_bytes(valid: str) -> st.SearchStrategy[str | bytes]:
    """Mutated text, or its UTF-8 mutated byte by byte (invalid UTF-8 included)."""
    return st.one_of(mutated_text(valid), mutated_bytes(valid.encode()))


# -- signed notes -------------------------------------------------------------------------------

@budget(150)
@given(text_or_bytes(NOTE))
def test_parse_and_verify_note(note: str | bytes) -> None:
    check("note.parse_note", parse_note, note, errors=NoteError)
    check("note.verify_note", verify_note, note, VERIFIERS, errors=NoteError)


@budget(75)
@given(st.one_of(st.text(max_size=200), st.binary(max_size=200)))
def test_parse_note_arbitrary(note: str | bytes) -> None:
    check("note.parse_note[arbitrary]", parse_note, note, errors=NoteError)


@budget(100)
@given(st.one_of(mutated_text(LOG_VERIFIER.vkey()),
                 mutated_text(WITNESS_VERIFIER.vkey()), st.text(max_size=100)))
def test_parse_verifier_key(vkey: str) -> None:
    check("note.parse_verifier_key", parse_verifier_key, vkey, errors=NoteError)


@budget(100)
@given(mutated_text(COSIG_LINE))
def test_signature_lines(line: str) -> None:
    sig = check("note.parse_signature_line", parse_signature_line, line, errors=NoteError)
    check("note.add_signatures", add_signatures, NOTE, [line], errors=NoteError)
    if sig:
        check("cosign.cosignature_timestamp", cosignature_timestamp, sig, errors=NoteError)
        check("cosign.verify_cosignature", verify_cosignature, CHECKPOINT, sig,
              WITNESS_VERIFIER, errors=NoteError)


# -- checkpoints --------------------------------------------------------------------------------

@budget(125)
@given(st.one_of(mutated_text(CHECKPOINT.text()), st.text(max_size=120)))
def test_parse_checkpoint(text: str) -> None:
    got = check("checkpoint.parse_checkpoint", parse_checkpoint, text, errors=CheckpointError)
    if got:
        assert got.text() == text


# -- tlog-proofs --------------------------------------------------------------------------------

PROOF_ERRORS = (TlogProofError, NoteError, CheckpointError)


@budget(150)
@given(text_or_bytes(PROOF), st.integers(0, 2))
def test_parse_and_verify_proof(proof: str | bytes, quorum: int) -> None:
    check("tlog_proof.parse_proof", parse_proof, proof, errors=PROOF_ERRORS)
    check("tlog_proof.verify_proof", verify_proof, proof, ENTRIES[3], LOG_VERIFIER,
          [WITNESS_VERIFIER], quorum=min(quorum, 1), errors=PROOF_ERRORS)


# -- entries ------------------------------------------------------------------------------------

@budget(125)
@given(st.one_of(mutated_bytes(ENTRIES[0]), st.binary(max_size=200)))
def test_parse_entry_bytes(data: bytes) -> None:
    got = check("entries.parse_entry[bytes]", parse_entry, data, errors=EntryError)
    if got:
        assert data in ENTRIES  # a changed byte never passes the canonical form and signature


@budget(100)
@given(mutated_tree(cbor2.loads(ENTRIES[1]), cbor_specials=True))
def test_parse_entry_fields(doc: Any) -> None:
    """Entries with a field of another type, dropped, added, huge, NaN, deeply nested..."""
    for canonical in (True, False):
        try:
            data = cbor2.dumps(doc, canonical=canonical)
        except (ValueError, TypeError, RecursionError, OverflowError):
            return
        check("entries.parse_entry[fields]", parse_entry, data, errors=EntryError)


@budget(40)
@given(values(cbor_specials=True))
def test_parse_entry_any_value(value: Any) -> None:
    try:
        data = cbor2.dumps(value, canonical=True)
    except (ValueError, TypeError, RecursionError, OverflowError):
        return
    check("entries.parse_entry[values]", parse_entry, data, errors=EntryError)


# -- a witness offered a checkpoint -------------------------------------------------------------

_WITNESS = Witness(_DIR / "witness.db", WITNESS_ID, WITNESS_NAME)
_WITNESS.trust(LOG_VERIFIER.vkey())


@budget(75)
@given(mutated_text(OLD_NOTE).map(lambda t: t.encode("utf-8", "replace").decode()),
       st.sampled_from([0, 2, 5, 2**63, -1]))
def test_witness_add_checkpoint(note: str, old: int) -> None:
    """Notes as the witness protocol delivers them: valid UTF-8 text (cbor2 refuses lone
    surrogates in a text string, so none reaches the witness)."""
    check("witness.add_checkpoint", _WITNESS.add_checkpoint, note, old, CONSISTENCY,
          now=1700000200, errors=WitnessRefused)
