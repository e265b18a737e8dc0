"""The SQLite log, its audit and the witness, in process (real SQLite; the crash-safety and CLI
subprocess tests are in tests/network/test_ledger_log_network.py)."""

from __future__ import annotations

import random
import shutil
import sqlite3
from pathlib import Path

import pytest

from crypto.identity import Identity
from ledger.checkpoint import parse_checkpoint
from ledger.cosign import verify_cosignature
from ledger.entries import EntryError, make_entry, parse_entry
from ledger.log import LedgerError, Log
from ledger.merkle import (
    inclusion_proof,
    leaf_hash,
    root_of,
    verify_consistency,
    verify_inclusion,
)
from ledger.note import parse_note, parse_verifier_key, verify_note
from ledger.store import StoreError
from ledger.tlog_proof import verify_proof
from ledger.witness import Witness, WitnessRefused


def new_log(tmp_path: Path, name: str = "L", origin: str = "example.org/test-log") -> Log:
    return Log.init(tmp_path / name, origin)


def checkpoint_of(note: str, log: Log) -> tuple[int, bytes]:
    parsed, _ = verify_note(note, [log.verifier])
    cp = parse_checkpoint(parsed.text)
    return cp.size, cp.root


def test_store_hashes_match_an_independent_tree(tmp_path: Path) -> None:
    """Random batch sizes up to 70 entries: every root and inclusion proof read from the store
    equals the one computed from the entry list alone."""
    rng = random.Random(7)
    log = new_log(tmp_path)
    entries: list[bytes] = []
    while len(entries) < 70:
        batch = [rng.randbytes(rng.randrange(0, 40)) for _ in range(rng.randrange(1, 9))]
        results, note = log.append(batch)
        assert [i for i, _ in results] == list(range(len(entries), len(entries) + len(batch)))
        entries += batch
        assert [leaf for _, leaf in results] == [leaf_hash(e) for e in batch]
        assert checkpoint_of(note, log) == (len(entries), root_of([leaf_hash(e)
                                                                   for e in entries]))
    leaves = [leaf_hash(e) for e in entries]

    def reference(start: int, size: int) -> bytes:
        return root_of(leaves[start:start + size])

    for size in range(1, len(entries) + 1):
        assert log.root(size) == root_of(leaves[:size])
        for index in range(size):
            proof = log.inclusion(index, size)
            assert proof == inclusion_proof(index, size, reference)
            verify_inclusion(leaves[index], index, size, proof, root_of(leaves[:size]))
    for old in range(0, len(entries) + 1, 7):
        verify_consistency(old, len(entries), root_of(leaves[:old]), root_of(leaves),
                           log.consistency(old))
    assert log.verify().ok


def test_receipts_verify_offline(tmp_path: Path) -> None:
    log = new_log(tmp_path)
    author = Identity.generate()
    entries = [make_entry(author, "node-join/1", {"node": author.did, "n": i}) for i in range(5)]
    log.append(entries[:3])
    log.append(entries[3:])
    key = parse_verifier_key(log.verifier_key)
    for index, entry in enumerate(entries):
        text = log.proof(index)
        assert verify_proof(text, entry, key).size == 5
        with pytest.raises(ValueError):
            verify_proof(text, entries[(index + 1) % 5], key)
        assert parse_entry(entry).author == author.did
    with pytest.raises(ValueError):  # another log's key
        verify_proof(log.proof(0), entries[0], parse_verifier_key(
            new_log(tmp_path, "other").verifier_key))


def test_entries_are_canonical_and_signed() -> None:
    author = Identity.generate()
    data = make_entry(author, "infer-receipt/1", {"query": "q1", "hops": [{"digest": b"\x01"}]},
                      when=1_800_000_000)
    entry = parse_entry(data)
    assert (entry.type, entry.author, entry.time) == ("infer-receipt/1", author.did,
                                                      1_800_000_000)
    tampered = data.replace(b"q1", b"q2")
    with pytest.raises(EntryError, match="does not verify"):
        parse_entry(tampered)
    import cbor2

    doc = cbor2.loads(data)
    with pytest.raises(EntryError, match="deterministic"):  # same map, other key order
        parse_entry(cbor2.dumps(dict(reversed(list(doc.items())))))
    with pytest.raises(EntryError, match="unknown entry type"):
        make_entry(author, "gossip/1", {})


@pytest.mark.parametrize("tamper", [
    "UPDATE entries SET data = x'00' WHERE idx = 5",
    "UPDATE entries SET leaf = zeroblob(32) WHERE idx = 11",
    "UPDATE subtrees SET hash = zeroblob(32) WHERE level = 2 AND idx = 1",
    "DELETE FROM subtrees WHERE level = 1 AND idx = 3",
    "INSERT INTO subtrees VALUES (9, 0, zeroblob(32))",
    "UPDATE checkpoints SET root = zeroblob(32) WHERE size = 8",
    "DELETE FROM entries WHERE idx = 16",
])
def test_verify_catches_tampering(tmp_path: Path, tamper: str) -> None:
    log = new_log(tmp_path)
    for start in range(0, 20, 4):
        log.append([f"entry {i}".encode() for i in range(start, start + 4)])
    assert log.verify().ok
    log.close()
    db = sqlite3.connect(tmp_path / "L" / "log.sqlite")
    db.execute(tamper)
    db.commit()
    db.close()
    report = Log.open(tmp_path / "L").verify()
    assert not report.ok and report.problems


def test_forged_checkpoint_note_is_caught(tmp_path: Path) -> None:
    log = new_log(tmp_path)
    log.append([b"a", b"b"])
    other = new_log(tmp_path, "M")
    other.append([b"a", b"b"])
    log.close()
    db = sqlite3.connect(tmp_path / "L" / "log.sqlite")  # a note signed by another key
    db.execute("UPDATE checkpoints SET note = ? WHERE size = 2", (other.checkpoint(2),))
    db.commit()
    db.close()
    problems = Log.open(tmp_path / "L").verify().problems
    assert any("checkpoint at size 2" in p for p in problems)


def test_bad_arguments_are_named(tmp_path: Path) -> None:
    log = new_log(tmp_path)
    log.append([b"x"])
    for call, match in [(lambda: log.inclusion(1, 1), "index 1"),
                        (lambda: log.inclusion(0, 5), "size 5"),
                        (lambda: log.consistency(3), "old size 3"),
                        (lambda: log.checkpoint(7), "no checkpoint at size 7"),
                        (lambda: log.append([]), "at least one"),
                        (lambda: Log.init(tmp_path / "L", "x.org/l"), "already"),
                        (lambda: Log.init(tmp_path / "N", "bad origin"), "origin")]:
        with pytest.raises(LedgerError, match=match):
            call()
    with pytest.raises(StoreError, match="no ledger"):
        Log.open(tmp_path / "missing")
    (tmp_path / "junk").mkdir()
    (tmp_path / "junk" / "log.sqlite").write_bytes(b"not a database at all" * 100)
    with pytest.raises(StoreError):
        Log.open(tmp_path / "junk")
    assert oct((tmp_path / "L" / "log.key").stat().st_mode & 0o777) == "0o600"


# -- witness ----------------------------------------------------------------------------------

def test_witness_cosigns_consistent_and_refuses_forks(tmp_path: Path) -> None:
    log = new_log(tmp_path)
    log.append([b"e0", b"e1", b"e2"])
    log.close()
    shutil.copytree(tmp_path / "L", tmp_path / "F")  # same key and origin: a fork to be
    honest, fork = Log.open(tmp_path / "L"), Log.open(tmp_path / "F")
    honest.append([b"e3", b"e4"])
    fork.append([b"X3", b"X4"])  # same size 5, other root

    identity = Identity.generate()
    witness = Witness(tmp_path / "w.sqlite", identity, "witness.example/w1")
    witness.trust(honest.verifier_key)
    wkey = parse_verifier_key(witness.verifier_key)

    line = witness.add_checkpoint(honest.checkpoint(3), 0, honest.consistency(0, 3))
    line = witness.add_checkpoint(honest.checkpoint(5), 3, honest.consistency(3, 5))
    cp = parse_checkpoint(parse_note(honest.checkpoint(5)).text)
    signature = parse_note(honest.checkpoint(5, cosigned=False).rstrip("\n") + "\n" +
                           line).signatures[-1]
    assert verify_cosignature(cp, signature, wkey) > 0
    assert witness.known(honest.origin) == (5, honest.root(5))

    with pytest.raises(WitnessRefused) as info:  # same size, other root
        witness.add_checkpoint(fork.checkpoint(5), 5, [])
    assert info.value.reason == "fork"
    fork.append([b"X5"])
    with pytest.raises(WitnessRefused) as info:  # the fork grows: not consistent with size 5
        witness.add_checkpoint(fork.checkpoint(6), 5, fork.consistency(5, 6))
    assert info.value.reason == "inconsistent"
    with pytest.raises(WitnessRefused) as info:  # a proof from the wrong size
        witness.add_checkpoint(fork.checkpoint(6), 3, fork.consistency(3, 6))
    assert info.value.reason == "conflict" and info.value.known_size == 5
    assert witness.known(honest.origin) == (5, honest.root(5))  # nothing moved

    stranger = new_log(tmp_path, "S", origin="example.org/stranger")
    stranger.append([b"s"])
    with pytest.raises(WitnessRefused) as info:
        witness.add_checkpoint(stranger.checkpoint(), 0, [])
    assert info.value.reason == "unknown-log"
    for origin in ("example.org/\ud800", "example.org/\x00"):  # SQLite cannot take the first
        with pytest.raises(WitnessRefused) as info:
            witness.add_checkpoint(f"{origin}\n5\nAAAA\n\n— x AAAA\n", 0, [])
        assert info.value.reason == "bad-note"


def test_tlog_proof_with_witness_quorum(tmp_path: Path) -> None:
    log = new_log(tmp_path)
    log.append([b"a", b"b", b"c"])
    witnesses = [Witness(tmp_path / f"w{i}.sqlite", Identity.generate(), f"w.example/{i}")
                 for i in range(3)]
    for w in witnesses[:2]:
        w.trust(log.verifier_key)
        line = w.add_checkpoint(log.checkpoint(cosigned=False), 0, log.consistency(0))
        log.store.add_cosignature(3, w.name, line)
    keys = [parse_verifier_key(w.verifier_key) for w in witnesses]
    text = log.proof(1)
    assert verify_proof(text, b"b", log.verifier, keys, quorum=2).size == 3
    with pytest.raises(ValueError):
        verify_proof(text, b"b", log.verifier, keys, quorum=3)


# -- crash safety -------------------------------------------------------------------------------


