"""``veilnet query``: one encrypted query through the network (registered as a veilnet command).

Results go to stdout; errors, and warnings about answers that are not verified or receipts
whose cosignatures are pending, go to stderr, one line per problem. When the network has a
ledger node, the query's receipt and this client's score report are logged there unless
``--no-ledger``.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path
from typing import Any

from consensus.verdict import VERIFY_MODES


def _cmd_query(args: argparse.Namespace) -> int:
    # the SDK (libp2p, onnxruntime) is loaded only when a query runs, not for every command
    from client.results import QueryError
    from client.sync_client import Client
    from protocols.transport import quiet_libraries

    quiet_libraries()
    # the SDK's warnings (unverified hops, receipts) are printed below, once, in our words
    logging.getLogger("veilnet.client").setLevel(logging.ERROR)
    try:
        with Client(args.bootstrap, args.deployment, timeout=args.timeout,
                    hop_timeout=args.hop_timeout, ledger=args.ledger,
                    witness_quorum=args.quorum, verify=args.verify, replicas=args.replicas,
                    spot_rate=args.spot_rate, allow_unverified=args.allow_unverified) as client:
            result = client.embed(args.texts)
    except QueryError as exc:  # no answer (exit 1); bad input is veilnet's exit 2 (node/cli.py)
        print(f"veilnet: error: {exc}", file=sys.stderr)
        return 1
    if args.verify == "full":
        for hop in result.hops:
            if not hop.verified:
                print(f"veilnet: warning: hop {hop.shard_index} (shard {hop.shard_cid}) is NOT "
                      f"verified: {hop.unverified_reason}", file=sys.stderr)
    pending = result.receipt_pending
    if pending is not None:
        print(f"veilnet: warning: receipt logged at index {pending.index}, witness cosignatures "
              f"pending ({pending.reason})"
              + (f"; the proof later: {pending.proof_url}" if pending.proof_url else ""),
              file=sys.stderr)
    if args.json:
        doc: dict[str, Any] = {"embeddings": result.embeddings.tolist(),
                               "hops": [h.to_json() for h in result.hops]}
        if args.ledger:
            doc["receipt"] = result.receipt.to_json() if result.receipt else None
            doc["receipt_error"] = result.receipt_error
            doc["receipt_pending"] = pending.to_json() if pending else None
        print(json.dumps(doc))
        return 0
    for text, row in zip(args.texts, result.embeddings, strict=True):
        head = ", ".join(f"{v:+.4f}" for v in row[:4])
        print(f"{text[:48]!r:52} [{head}, ...] ({row.shape[0]} dims)")
    print("hops:")
    for hop in result.hops:
        failed = len(hop.failures)
        print(f"  shard {hop.shard_index} {hop.shard_cid[:16]}... on {hop.peer_id} "
              f"({hop.latency_ms:.1f} ms, signature verified"
              + (f"; {failed} other node(s) failed" if failed else "") + ")")
        if hop.verdict:
            v = hop.verdict
            print(f"    verdict: {len(v['winners'])} of {len(v['nodes'])} agree"
                  + (f"; lost: {', '.join(v['losers'])}" if v["losers"] else ""))
        elif args.verify == "full":
            print("    verdict: NOT VERIFIED (see the warning)")
        for failure in hop.failures:
            print(f"    failed: {failure}")
    receipt = result.receipt
    if receipt is not None:
        print(f"receipt: entry {receipt.index} in the ledger, proof cosigned by "
              f"{receipt.quorum} witness(es); verifies offline with {receipt.log_key}")
    elif pending is not None:
        print(f"receipt: logged at index {pending.index}, witness cosignatures pending")
    elif args.ledger:
        print(f"receipt: not logged ({result.receipt_error})")
    else:
        print("receipt: not logged (--no-ledger)")
    return 0


def _cmd_rankings(args: argparse.Namespace) -> int:
    import urllib.error
    import urllib.request

    url = args.http.rstrip("/") + "/v1/rankings"
    try:
        with urllib.request.urlopen(url, timeout=args.timeout) as response:
            rows = json.loads(response.read())
    except (urllib.error.URLError, OSError, ValueError) as exc:
        print(f"veilnet: error: {url}: {exc}", file=sys.stderr)
        return 1
    if args.json:
        print(json.dumps(rows))
        return 0
    if not rows:
        print("no rankings yet (they come from clients' score reports in a ledger)")
        return 0
    print(f"{'rank':<5}{'score':>7}{'agree':>8}{'avail':>8}{'lat ms':>9}{'reporters':>10}  did")
    for i, row in enumerate(rows, 1):
        cells = [_num(row, "score", ".3f"), _num(row, "agreement", ".3f"),
                 _num(row, "availability", ".3f"), _num(row, "latency_ms", ".1f")]
        print(f"{i:<5}{cells[0]:>7}{cells[1]:>8}{cells[2]:>8}{cells[3]:>9}"
              f"{row.get('reporters', '-'):>10}  {row.get('did')}")
    return 0


def _num(row: dict[str, Any], key: str, fmt: str) -> str:
    value = row.get(key)
    return format(value, fmt) if isinstance(value, int | float) else "-"


def register(sub: Any) -> None:
    ranks = sub.add_parser(
        "rankings", help="print the node rankings a node serves",
        description="GET /v1/rankings from a node: nodes best first, each with its did, its "
                    "score and the figures behind it (agreement, availability, latency, "
                    "reporters). See docs/consensus.md.")
    ranks.add_argument("--http", required=True, metavar="URL",
                       help="a node's HTTP API, e.g. http://127.0.0.1:8401")
    ranks.add_argument("--json", action="store_true", help="print the rows as one JSON list")
    ranks.add_argument("--timeout", type=float, default=10.0, metavar="SECONDS")
    ranks.set_defaults(func=_cmd_rankings)

    query = sub.add_parser(
        "query", help="embed texts through the network (encrypted)",
        description="Run an encrypted query: the client head and tail run here; each node "
                    "shard runs on a node found through the bootstrap node. Prints the "
                    "embeddings and, per hop, the node that served it and the verdict. "
                    "DEPLOY/client/ is the secret: the EE key is folded into its client shards "
                    "(*.onnx), which must be private to you (mode 0600; the query refuses "
                    "them otherwise) and are checked against their CIDs; key.json is not read "
                    "by queries, it is kept for `veilnet model verify` and audits. Never copy "
                    "client/ to a node.")
    query.add_argument("texts", nargs="+", metavar="TEXT")
    query.add_argument("--bootstrap", action="append", required=True, metavar="MULTIADDR",
                       help="a node's multiaddr ending in /p2p/<PeerID> (repeatable)")
    query.add_argument("--deployment", required=True, type=Path, metavar="DEPLOY",
                       help="encrypted deployment directory; its client/ holds the secret "
                            "client shards")
    query.add_argument("--json", action="store_true",
                       help='print one JSON object {"embeddings": [...], "hops": [...]}')
    query.add_argument("--timeout", type=float, default=120.0, metavar="SECONDS",
                       help="limit for the whole query (default 120)")
    query.add_argument("--hop-timeout", type=float, default=30.0, metavar="SECONDS",
                       help="limit for one node's answer before trying another (default 30)")
    query.add_argument("--verify", choices=VERIFY_MODES, default="full",
                       help="consensus checks: full (each hop on --replicas nodes, majority "
                            "wins), spot (a second node checks with probability --spot-rate), "
                            "none (default full; docs/consensus.md)")
    query.add_argument("--replicas", type=int, default=3, metavar="R",
                       help="nodes per hop in full mode (default 3, at least 2)")
    query.add_argument("--allow-unverified", action="store_true",
                       help="in full mode, when fewer than two nodes answer a hop, return the "
                            "single answer marked unverified (a warning on stderr) instead of "
                            "failing")
    query.add_argument("--spot-rate", type=float, default=0.1, metavar="P",
                       help="probability of a check per hop in spot mode (default 0.1)")
    query.add_argument("--ledger", action=argparse.BooleanOptionalAction, default=True,
                       help="log a signed receipt of the query and this client's score report "
                            "at a ledger node, when the network has one, and print the receipt "
                            "with its tlog-proof (default; --no-ledger turns it off)")
    query.add_argument("--quorum", type=int, default=1, metavar="N",
                       help="witness cosignatures the receipt's checkpoint needs (default 1)")
    query.set_defaults(func=_cmd_query)

