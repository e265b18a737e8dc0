"""``veilnet node ...``: run a node daemon and manage the shards in its data directory."""

from __future__ import annotations

import argparse
import contextlib
import json
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from models.progress import QUIET_HELP, Reporter
from node.byzantine import MODES as BYZANTINE_MODES
from node.config import load_config

if TYPE_CHECKING:
    from models.manifest import ShardSpec


def _cmd_start(args: argparse.Namespace) -> int:
    from node.daemon import start

    config = load_config(args.config, {
        "data_dir": args.data_dir, "listen": args.listen, "http": args.http,
        "bootstrap": args.bootstrap, "capacity": args.capacity, "threads": args.threads,
        "frame_limit": args.frame_limit, "shard_size_limit": args.shard_size_limit,
        "request_timeout": args.request_timeout,
        "idle_timeout": args.idle_timeout,
        "announce_interval": args.announce_interval, "card_rate": args.card_rate,
        "domain": args.domain,
        "max_sessions": args.max_sessions, "max_context": args.max_context,
        "session_expiry": args.session_expiry,
        "ledger": True if args.ledger else None,
        "byzantine_test_mode": args.byzantine_test_mode,
        "record_received": args.record_received, "record_max_mb": args.record_max_mb,
        "log_level": args.log_level,
    })
    return start(config)


def _cmd_add_shards(args: argparse.Namespace) -> int:
    from node.daemon import open_data_dir
    from node.store import ShardStore

    identity, _ = open_data_dir(args.data_dir)
    store = ShardStore(args.data_dir)
    report = Reporter(prefix="veilnet: ", quiet=args.quiet)
    with contextlib.ExitStack() as stack:
        def plan(mcid: str, specs: list[ShardSpec]) -> Callable[[ShardSpec], None]:
            sizes = [s.size for s in specs if s.size is not None]
            by_bytes = len(sizes) == len(specs)  # old manifests declare no sizes: count shards
            report(f"installing {len(specs)} node shard(s) of deployment {mcid} into "
                   f"{args.data_dir}")
            bar = stack.enter_context(report.bar(
                "installing shards", sum(sizes) if by_bytes else len(specs),
                "B" if by_bytes else "shards"))
            return lambda spec: bar.advance((spec.size or 0) if by_bytes else 1)

        mcid, installed = store.add_deployment(args.deployment, args.shard, on_plan=plan)
    print(json.dumps({"node": identity.did, "deployment": mcid, "shards": installed}, indent=2))
    return 0


def _cmd_check(args: argparse.Namespace) -> int:
    from node.store import check_data_dir

    report = check_data_dir(args.data_dir)
    if args.json:
        print(json.dumps(report.to_json(), indent=2))
        return 0 if report.ok else 1
    for problem in report.problems:
        print(f"FAIL {problem.message}")
    for note in report.notes:
        print(f"note {note}")
    counted = (f"{report.manifests} manifest file(s) and {report.shards} shard file(s) in "
               f"{args.data_dir}")
    if report.ok:
        print(f"ok: {counted} match their CIDs")
    else:
        print(f"{len(report.problems)} problem(s) in {counted}")
    return 0 if report.ok else 1


def _cmd_id(args: argparse.Namespace) -> int:
    from node.daemon import open_data_dir

    identity, created = open_data_dir(args.data_dir)
    print(json.dumps({"peer_id": identity.peer_id, "did": identity.did,
                      "created": created}, indent=2))
    return 0


def register(sub: Any) -> None:
    node = sub.add_parser("node", help="run a node and manage its shards",
                          description="Run a veilnet node daemon and manage its data directory.")
    nsub = node.add_subparsers(dest="node_command", required=True, metavar="SUBCOMMAND")

    st = nsub.add_parser(
        "start", help="start the node daemon (runs until SIGINT/SIGTERM)",
        description="Start a node: a libp2p peer (TCP, Noise, yamux) serving the shards in its "
                    "data directory over /veilnet/infer/1 (and, for decoder shards, "
                    "/veilnet/session/1: sessions that keep a generation's KV cache on the "
                    "node, bounded by --max-sessions, --max-context and --session-expiry), "
                    "plus an HTTP API (/healthz, "
                    "/metrics, /v1/node, /v1/peers). On first start it creates "
                    "D/identity.key (Ed25519, mode 0600) and D/api-token (mode 0600): the "
                    "operator's token, which POST /v1/shards/fetch needs as 'Authorization: "
                    "Bearer <token>' (401 without it). Every shard file is checked against its "
                    "CID before it is loaded; a corrupt one is logged at ERROR and not served. "
                    "Flags override the config file.")
    st.add_argument("--data-dir", type=Path, metavar="D", help="node data directory")
    st.add_argument("--listen", action="append", metavar="MULTIADDR",
                    help="libp2p listen address, repeatable (default /ip4/127.0.0.1/tcp/0: a "
                         "free port on loopback)")
    st.add_argument("--http", metavar="HOST:PORT",
                    help="HTTP API address (default 127.0.0.1:0: a free port on loopback)")
    st.add_argument("--bootstrap", action="append", metavar="MULTIADDR",
                    help="a node to announce to and learn peers from "
                         "(/ip4/.../tcp/.../p2p/<PeerID>), repeatable")
    st.add_argument("--config", type=Path, metavar="FILE", help="TOML config file")
    st.add_argument("--capacity", type=int, help="shard runs at once (default 1)")
    st.add_argument("--threads", type=int,
                    help="onnxruntime threads per run (default: onnxruntime's choice)")
    st.add_argument("--frame-limit", type=int, metavar="BYTES",
                    help="largest frame accepted (default 64 MiB)")
    st.add_argument("--shard-size-limit", type=int, metavar="BYTES",
                    help="largest shard fetched from a peer when its manifest declares no size "
                         "(default 1 GiB; a declared size is the limit otherwise, and a "
                         "manifest is limited to 1 MiB)")
    st.add_argument("--request-timeout", type=float, metavar="SECONDS",
                    help="time to receive and answer one request (default 60)")
    st.add_argument("--idle-timeout", type=float, metavar="SECONDS",
                    help="how long an idle infer stream stays open for the client's next "
                         "request (default 30)")
    st.add_argument("--announce-interval", type=float, metavar="SECONDS",
                    help="seconds between hellos to the bootstrap nodes and between card "
                         "announcements; a card stays valid 3 intervals (default 10)")
    st.add_argument("--card-rate", type=float, metavar="PER_S",
                    help="cards per second this node aims to receive over gossip: once it "
                         "knows more than interval x rate cards, it announces its own card "
                         "less often (every cards / rate seconds, up to 1200 s), and so do "
                         "its peers (default 2)")
    st.add_argument("--max-sessions", type=int, metavar="N",
                    help="generation sessions (/veilnet/session/1, each holding a KV cache) "
                         "kept at once; more are refused with 'busy' (default 16)")
    st.add_argument("--max-context", type=int, metavar="TOKENS",
                    help="tokens of KV cache one session may hold, counted over its batch; "
                         "a call past it is refused with 'limit'. Never more positions than "
                         "the model's context_length (default 2048)")
    st.add_argument("--session-expiry", type=float, metavar="SECONDS",
                    help="a session idle this long is dropped and its cache freed (default "
                         "300)")
    st.add_argument("--domain", metavar="HOST[:PORT]",
                    help="a domain whose https://HOST/agents/<PeerID>/did.json serves this "
                         "node's documents: adds a did:wba DID (default: did:key only)")
    st.add_argument("--ledger", action="store_true",
                    help="keep a transparency log in D/ledger that clients submit receipts to "
                         "(its key is published in this node's card; docs/ledger.md)")
    st.add_argument("--byzantine-test-mode", metavar="MODE",
                    choices=BYZANTINE_MODES,
                    help="FOR TESTS ONLY: return wrong (but signed) answers of this kind, to "
                         "exercise the clients' consensus checks ("
                         + ", ".join(BYZANTINE_MODES) + "). Off by default.")
    st.add_argument("--record-received", type=Path, metavar="DIR",
                    help="an audit flag: writes every tensor clients send to this node, which "
                         "is exactly what the node can see; off by default. One .npy file per "
                         "input in DIR/<request id>/ and a line per request in "
                         "DIR/index.jsonl (docs/protocol.md); DIR is made mode 0700, files "
                         "0600. Logged at WARNING on every start")
    st.add_argument("--record-max-mb", type=int, metavar="MB",
                    help="with --record-received: stop recording (loudly; the node keeps "
                         "serving) when DIR would grow past this (default 1024)")
    st.add_argument("--log-level", choices=["debug", "info", "warning", "error"])
    st.set_defaults(func=_cmd_start)

    add = nsub.add_parser(
        "add-shards", help="install a deployment's node shards into a data directory",
        description="Copy the manifest and node shards of DEPLOY into D, checking each "
                    "shard against its CID. Client material (client/: head and tail shards, "
                    "key, tokenizer) is never copied. A shard already in D is kept if it "
                    "matches its CID and replaced if it is corrupt. A running node serves new "
                    "(and repaired) shards at once. Progress (shards installed, in MB) goes "
                    "to stderr; the JSON result to stdout.")
    add.add_argument("data_dir", type=Path, metavar="D")
    add.add_argument("deployment", type=Path, metavar="DEPLOY")
    add.add_argument("--shard", action="append", metavar="CID",
                     help="install only this node shard (repeatable; default: all)")
    add.add_argument("--quiet", "-q", action="store_true", help=QUIET_HELP)
    add.set_defaults(func=_cmd_add_shards)

    chk = nsub.add_parser(
        "check", help="verify every manifest and shard file in a data directory",
        description="Hash every manifest (D/deployments) and shard file (D/shards) of a node's "
                    "data directory and compare it with the CID it is named after; check that "
                    "each manifest parses. Prints one line per problem and a summary; exit code "
                    "0 when everything matches, 1 when anything is wrong, 2 when D is not a "
                    "data directory. Safe while the node runs (it only reads). A running node "
                    "also checks each shard when it loads it and stops serving a corrupt one; "
                    "repair it with 'veilnet node add-shards' or POST /v1/shards/fetch.")
    chk.add_argument("data_dir", type=Path, metavar="D")
    chk.add_argument("--json", action="store_true",
                     help="print one JSON object: data_dir, ok, manifests, shards, problems "
                          "[{path, kind, message, expected, actual}], notes")
    chk.set_defaults(func=_cmd_check)

    ident = nsub.add_parser("id", help="print (creating if needed) the node's PeerID and did",
                            description="Print the PeerID and did:key of the node in D.")
    ident.add_argument("data_dir", type=Path, metavar="D")
    ident.set_defaults(func=_cmd_id)
