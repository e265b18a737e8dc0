"""The transparency log: RFC 6962/9162 Merkle tree on SQLite, C2SP signed-note checkpoints,
witness cosignatures (cosignature/v1) and tlog-proof receipts, and veilnet's signed entry
types. See docs/ledger.md."""

from ledger.checkpoint import Checkpoint, CheckpointError, parse_checkpoint
from ledger.cosign import cosign, cosignature_verifier_key, verify_cosignature
from ledger.entries import Entry, EntryError, make_entry, parse_entry
from ledger.log import LedgerError, Log, VerifyReport
from ledger.merkle import (
    ProofError,
    consistency_proof,
    inclusion_proof,
    leaf_hash,
    node_hash,
    root_of,
    verify_consistency,
    verify_inclusion,
)
from ledger.note import (
    Note,
    NoteError,
    Verifier,
    parse_note,
    parse_verifier_key,
    sign_note,
    verifier_key,
    verify_note,
)
from ledger.store import LogStore, StoreError
from ledger.tlog_proof import TlogProof, TlogProofError, format_proof, parse_proof, verify_proof
from ledger.witness import Witness, WitnessRefused

__all__ = [
    "Checkpoint", "CheckpointError", "Entry", "EntryError", "LedgerError", "Log", "LogStore",
    "Note", "NoteError", "ProofError", "StoreError", "TlogProof", "TlogProofError", "Verifier",
    "VerifyReport", "Witness", "WitnessRefused", "consistency_proof", "cosign",
    "cosignature_verifier_key", "format_proof", "inclusion_proof", "leaf_hash", "make_entry",
    "node_hash", "parse_checkpoint", "parse_entry", "parse_note", "parse_proof",
    "parse_verifier_key", "root_of", "sign_note", "verifier_key", "verify_consistency",
    "verify_cosignature", "verify_inclusion", "verify_note", "verify_proof",
]
