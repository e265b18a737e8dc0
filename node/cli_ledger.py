"""``veilnet ledger ...``: create, append to, prove and audit a transparency log directory."""

from __future__ import annotations

import argparse
import base64
import contextlib
import json
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

MAX_APPEND_BYTES = 1 << 20


def _fail(message: str) -> int:
    print(f"veilnet: error: {message}", file=sys.stderr)
    return 2


@contextlib.contextmanager
def _open(directory: Path) -> Iterator[Any]:
    from ledger.log import Log

    log = Log.open(directory)
    try:
        yield log
    finally:
        log.close()


def _cmd_init(args: argparse.Namespace) -> int:
    from ledger.log import Log

    log = Log.init(args.dir, args.origin)
    print(json.dumps({"dir": str(args.dir), "origin": log.origin, "key": log.verifier_key}))
    log.close()
    return 0


def _cmd_append(args: argparse.Namespace) -> int:
    if args.file in (None, "-"):
        data = sys.stdin.buffer.read(MAX_APPEND_BYTES + 1)
    else:
        path = Path(args.file)
        try:
            with path.open("rb") as fh:
                data = fh.read(MAX_APPEND_BYTES + 1)
        except OSError as exc:
            return _fail(f"{path}: {exc.strerror}")
    if len(data) > MAX_APPEND_BYTES:
        return _fail(f"an entry is at most {MAX_APPEND_BYTES} bytes")
    with _open(args.dir) as log:
        [(index, leaf)], _ = log.append([data])
        print(json.dumps({"index": index, "leaf_hash": base64.b64encode(leaf).decode(),
                          "size": log.size}))
    return 0


def _cmd_checkpoint(args: argparse.Namespace) -> int:
    with _open(args.dir) as log:
        sys.stdout.write(log.checkpoint(args.size))
    return 0


def _cmd_key(args: argparse.Namespace) -> int:
    with _open(args.dir) as log:
        print(log.verifier_key)
    return 0


def _cmd_proof(args: argparse.Namespace) -> int:
    with _open(args.dir) as log:
        sys.stdout.write(log.proof(args.index, args.size))
    return 0


def _cmd_consistency(args: argparse.Namespace) -> int:
    with _open(args.dir) as log:
        for h in log.consistency(args.old, args.new):
            print(base64.b64encode(h).decode())
    return 0


def _cmd_verify(args: argparse.Namespace) -> int:
    with _open(args.dir) as log:
        report = log.verify()
    print(json.dumps({"ok": report.ok, "entries": report.entries, "subtrees": report.subtrees,
                      "checkpoints": report.checkpoints, "problems": report.problems[:100]}))
    return 0 if report.ok else 1


def _cmd_show(args: argparse.Namespace) -> int:
    from ledger.entries import EntryError, parse_entry

    with _open(args.dir) as log:
        start = args.start or 0
        stop = log.size if args.stop is None else min(args.stop + 1, log.size)
        if start < 0 or start > log.size:
            return _fail(f"--from {start} is outside the log (0..{log.size})")
        for index, data in log.store.entries(start, stop):
            row: dict[str, Any] = {"index": index, "bytes": len(data)}
            try:
                row["entry"] = parse_entry(data).to_json()
            except EntryError as exc:  # raw bytes appended with `ledger append`
                row["raw"] = base64.b64encode(data).decode()
                row["not_an_entry"] = str(exc)
            print(json.dumps(row))
    return 0


def _cmd_check_proof(args: argparse.Namespace) -> int:
    """Verify a receipt or a tlog-proof offline: no log directory and no network needed."""
    from ledger.note import parse_verifier_key
    from ledger.tlog_proof import verify_proof

    if args.receipt is not None:
        try:
            doc = json.loads(_read_bounded(args.receipt))
        except (OSError, ValueError) as exc:
            return _fail(f"{args.receipt}: {exc}")
        receipt = doc.get("receipt", doc) if isinstance(doc, dict) else None
        if not isinstance(receipt, dict):
            return _fail(f"{args.receipt}: no receipt object (the 'receipt' of "
                         "`veilnet query --ledger --json`, or that object alone)")
        try:
            proof, entry = str(receipt["proof"]), bytes.fromhex(str(receipt["entry"]))
            log_key = str(args.log_key or receipt["log_key"])
            witness_keys = args.witness_key or [str(k) for k in receipt.get("witness_keys", [])]
            quorum = args.quorum if args.quorum is not None else int(receipt.get("quorum", 0))
        except (KeyError, ValueError, TypeError) as exc:
            return _fail(f"{args.receipt}: malformed receipt ({type(exc).__name__}: {exc})")
    else:
        if args.proof is None or args.entry is None or args.log_key is None:
            return _fail("give --receipt FILE, or --proof FILE with --entry FILE and --log-key")
        try:
            proof = _read_bounded(args.proof).decode("utf-8")
            entry = _read_bounded(args.entry)
        except (OSError, UnicodeDecodeError) as exc:
            return _fail(str(exc))
        log_key, witness_keys = args.log_key, args.witness_key or []
        quorum = args.quorum or 0
    checkpoint = verify_proof(proof, entry, parse_verifier_key(log_key),
                              [parse_verifier_key(k) for k in witness_keys], quorum)
    print(json.dumps({"ok": True, "origin": checkpoint.origin, "size": checkpoint.size,
                      "root": base64.b64encode(checkpoint.root).decode(), "quorum": quorum}))
    return 0


def _read_bounded(path: Path) -> bytes:
    with path.open("rb") as fh:
        data = fh.read(MAX_APPEND_BYTES + 1)
    if len(data) > MAX_APPEND_BYTES:
        raise OSError(f"{path}: larger than {MAX_APPEND_BYTES} bytes")
    return data


def run(args: argparse.Namespace) -> int:
    """Run a ledger subcommand; every expected failure is a one-line error and exit 2."""
    from ledger.checkpoint import CheckpointError
    from ledger.log import LedgerError
    from ledger.note import NoteError
    from ledger.store import StoreError
    from ledger.tlog_proof import TlogProofError

    try:
        return int(args.ledger_func(args))
    except (LedgerError, StoreError, NoteError, IndexError) as exc:
        return _fail(str(exc))
    except (TlogProofError, CheckpointError) as exc:  # check-proof: the proof does not hold
        print(json.dumps({"ok": False, "error": str(exc)}))
        return 1


def register(sub: Any) -> None:
    led = sub.add_parser(
        "ledger", help="transparency log: append, checkpoints, proofs, audit",
        description="A Merkle log (RFC 6962/9162) in a directory: DIR/log.key (Ed25519, 0600) "
                    "and DIR/log.sqlite. Each append commits a batch and a C2SP signed "
                    "checkpoint; proofs are C2SP tlog-proof texts. Formats: docs/ledger.md.")
    lsub = led.add_subparsers(dest="ledger_command", required=True, metavar="SUBCOMMAND")

    def cmd(name: str, func: Any, help_: str) -> argparse.ArgumentParser:
        p = lsub.add_parser(name, help=help_, description=help_)
        p.add_argument("dir", type=Path, metavar="DIR", help="ledger directory")
        p.set_defaults(func=run, ledger_func=func)
        return p

    p = cmd("init", _cmd_init, "create a new log in DIR with a fresh key")
    p.add_argument("--origin", default="veilnet.local/ledger",
                   help="the log's name in its checkpoints (a schema-less URL; "
                        "default veilnet.local/ledger)")
    p = cmd("append", _cmd_append, "append one entry (raw bytes from FILE or stdin); prints "
                                   "JSON with index and leaf_hash once it is committed")
    p.add_argument("file", nargs="?", metavar="FILE|-", help="entry bytes (default: stdin)")
    p = cmd("checkpoint", _cmd_checkpoint, "print the latest signed checkpoint note")
    p.add_argument("--size", type=int, help="the checkpoint at this size instead")
    cmd("key", _cmd_key, "print the log's verifier key (name+keyid+base64 key)")
    p = cmd("proof", _cmd_proof, "print a C2SP tlog-proof of entry --index")
    p.add_argument("--index", type=int, required=True, help="entry index")
    p.add_argument("--size", type=int, help="prove against the checkpoint at this size "
                                            "(default: the latest)")
    p = cmd("consistency", _cmd_consistency,
            "print the consistency proof from --old to --new (base64 hashes, one a line)")
    p.add_argument("--old", type=int, required=True, help="old tree size")
    p.add_argument("--new", type=int, help="new tree size (default: the log's size)")
    cmd("verify", _cmd_verify, "recompute every hash and check every stored checkpoint; "
                               "exit 1 if anything is wrong")
    p = cmd("show", _cmd_show, "print entries as JSON lines (decoded when they are veilnet "
                               "entries)")
    p.add_argument("--from", dest="start", type=int, help="first index (default 0)")
    p.add_argument("--to", dest="stop", type=int, help="last index, inclusive (default: last)")
    p = lsub.add_parser(
        "check-proof", help="verify a query receipt or a tlog-proof offline",
        description="Check a C2SP tlog-proof offline, without the log and without a network: "
                    "the checkpoint's signature by the log key, the witness cosignature "
                    "quorum, and the inclusion of the entry. Give --receipt FILE (the JSON of "
                    "`veilnet query --ledger --json`, or its 'receipt' object), or --proof FILE "
                    "--entry FILE --log-key KEY. Prints JSON; exit 0 if it verifies, 1 if not, "
                    "2 on unusable input.")
    p.add_argument("--receipt", type=Path, metavar="FILE", help="receipt JSON")
    p.add_argument("--proof", type=Path, metavar="FILE", help="tlog-proof text")
    p.add_argument("--entry", type=Path, metavar="FILE", help="the logged entry's bytes")
    p.add_argument("--log-key", metavar="KEY",
                   help="the log's verifier key (name+keyid+base64; default: the receipt's)")
    p.add_argument("--witness-key", action="append", metavar="KEY",
                   help="a witness cosignature verifier key (repeatable; default: the "
                        "receipt's)")
    p.add_argument("--quorum", type=int, metavar="N",
                   help="witness cosignatures required (default: the receipt's, else 0)")
    p.set_defaults(func=run, ledger_func=_cmd_check_proof)
