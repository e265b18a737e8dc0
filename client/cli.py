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
from typing import Any

from client.cli_generate import register as register_generate
from client.cli_options import add_network_options, client_options


def _cmd_query(args: argparse.Namespace) -> int:
    # the SDK (libp2p, onnxruntime) is loaded only when a query runs, not for every command
    from client.results import QueryError
    from client.sync_client import Client
    from protocols.transport import quiet_libraries

    quiet_libraries()
    # the SDK's warnings (unverified hops, receipts) are printed below, once, in our words
    logging.getLogger("veilnet.client").setLevel(logging.ERROR)
    try:
        with Client(args.bootstrap, args.deployment, **client_options(args)) as client:
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
        if hop.verdict and hop.verdict.get("mode") == "masked":  # masked/1: one pair per call
            v = hop.verdict
            what = "x + r" if v["role"] == "masked-input" else "the mask r, drawn from a seed"
            print(f"    masked/1: computed on {what}; {v['reason']} (Freivalds)")
        elif hop.verdict:
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
    query.add_argument("--json", action="store_true",
                       help='print one JSON object {"embeddings": [...], "hops": [...]}')
    add_network_options(query, "query")
    query.set_defaults(func=_cmd_query)

    register_generate(sub)

