"""``veilnet query``: one encrypted query through the network (registered as a veilnet command)."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any


def _cmd_query(args: argparse.Namespace) -> int:
    from client.async_client import QueryError
    from client.sync_client import Client
    from node.p2p import quiet_libraries

    quiet_libraries()
    options = {"timeout": args.timeout, "hop_timeout": args.hop_timeout,
               "ledger": args.ledger, "witness_quorum": args.quorum}
    try:
        with Client(args.bootstrap, args.deployment, **options) as client:
            result = client.embed(args.texts)
    except QueryError as exc:
        print(f"veilnet: error: {exc}", file=sys.stderr)
        return 1
    if args.json:
        doc: dict[str, Any] = {"embeddings": result.embeddings.tolist(),
                               "hops": [h.to_json() for h in result.hops]}
        if args.ledger:
            doc["receipt"] = result.receipt.to_json() if result.receipt else None
            doc["receipt_error"] = result.receipt_error
        print(json.dumps(doc))
        return 0
    for text, row in zip(args.texts, result.embeddings, strict=True):
        head = ", ".join(f"{v:+.4f}" for v in row[:4])
        print(f"{text[:48]!r:52} [{head}, ...] ({row.shape[0]} dims)")
    print("hops:")
    for hop in result.hops:
        retried = f", after {hop.attempts - 1} failed node(s)" if hop.attempts > 1 else ""
        print(f"  shard {hop.shard_index} {hop.shard_cid[:16]}... on {hop.peer_id} "
              f"({hop.latency_ms:.1f} ms, signature verified{retried})")
    receipt = result.receipt
    if receipt is not None:
        print(f"receipt: entry {receipt.index} in the ledger, proof cosigned by "
              f"{receipt.quorum} witness(es); verifies offline with {receipt.log_key}")
    elif args.ledger:
        print(f"receipt: not logged ({result.receipt_error})")
    return 0


def register(sub: Any) -> None:
    query = sub.add_parser(
        "query", help="embed texts through the network (encrypted)",
        description="Run an encrypted query: the client head and tail run here with the key in "
                    "DEPLOY/client/; each node shard runs on a node found through the bootstrap "
                    "node. Prints the embeddings and, per hop, the node that served it.")
    query.add_argument("texts", nargs="+", metavar="TEXT")
    query.add_argument("--bootstrap", action="append", required=True, metavar="MULTIADDR",
                       help="a node's multiaddr ending in /p2p/<PeerID> (repeatable)")
    query.add_argument("--deployment", required=True, type=Path, metavar="DEPLOY",
                       help="encrypted deployment directory (with client/ and the key)")
    query.add_argument("--json", action="store_true",
                       help='print one JSON object {"embeddings": [...], "hops": [...]}')
    query.add_argument("--timeout", type=float, default=120.0, metavar="SECONDS",
                       help="limit for the whole query (default 120)")
    query.add_argument("--hop-timeout", type=float, default=30.0, metavar="SECONDS",
                       help="limit for one node's answer before trying another (default 30)")
    query.add_argument("--ledger", action="store_true",
                       help="log a signed receipt of the query at a ledger node and print it "
                            "with its tlog-proof")
    query.add_argument("--quorum", type=int, default=1, metavar="N",
                       help="witness cosignatures the receipt's checkpoint needs (default 1)")
    query.set_defaults(func=_cmd_query)

