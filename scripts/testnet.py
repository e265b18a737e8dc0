"""A local veilnet testnet: N node processes on 127.0.0.1 serving an encrypted MiniLM deployment
(or, with ``--model smollm2``, the encrypted SmolLM2-135M-Instruct decoder for generation; with
``--scheme masked``, MiniLM as a ``masked/1`` deployment: nodes run only linear layers on
noise-masked inputs, in pairs).

Command line (``python scripts/testnet.py --help``)::

    testnet.py up   [--dir T] [--nodes N] [--replicas R] [--node-shards K] ...   run until Ctrl-C
    testnet.py demo [--dir T] [--nodes N] [--replicas R] ...                     `make demo`
    testnet.py up --netem "delay 40ms 10ms loss 1%" [--seed S] ...     links that are not loopback
    testnet.py netem [--dir T] loss 5%             new link parameters while it runs
    testnet.py clean [--dir T] [--all]             leftovers of a crashed --netem run

``up`` imports and encrypts all-MiniLM-L6-v2 into T/model and T/deploy (once; reused while
T/deploy/manifest.json exists), places every node shard on R of the N nodes round robin, starts
node 0 and then the others with ``--bootstrap <node 0>``, waits until every node answers /healthz
and node 0 knows all the others, writes T/testnet.json, and runs until SIGINT or SIGTERM. Then it
stops every node (SIGTERM, SIGKILL after 5 s) and removes T/testnet.json. ``demo`` does the same
in-process, runs encrypted queries through the network, compares them with the plaintext model,
crashes one node to show a hop being retried on another replica, and stops the network.

``up --netem ARGS`` (root and iproute2 needed) runs each node, and gives the client, its own
Linux network namespace ``veilnet-<tag>-n<i>`` / ``veilnet-<tag>-client`` (tag: 6 hex digits of
T's path), joined by a userspace link emulator with ``tc netem`` semantics on every host's egress
(scripts/netem.py: delay with jitter, loss, duplicate, rate, limit; ``--seed`` seeds it). Nodes
listen on 10.77.<k>.<i+1>, the client is 10.77.<k>.<N+1>; run a query from the client namespace
with ``ip netns exec veilnet-<tag>-client .venv/bin/veilnet query ...`` (the summary prints it).
On stop the namespaces are deleted and the link counters (packets forwarded, dropped) printed and
kept in T/netem-stats.json; if the script was killed, ``clean`` removes what is left (``--all``:
every veilnet-* namespace).

Layout of T::

    T/model/              plaintext MiniLM shards (for the plaintext comparison only)
    T/deploy/             encrypted deployment; T/deploy/client/ (key) stays with the client
    T/deploy-masked/      the masked/1 deployment (``--scheme masked``)
    T/smollm2/model/, T/smollm2/deploy/   the same for ``--model smollm2``
    T/nodes/node<i>/      node data dir: identity.key (kept across runs), shards/, node.json,
                          node.log (the node's stdout and stderr)
    T/testnet.json        written when the network is up, removed when it stops:
                          {"nodes": [{"index", "pid", "did", "peer_id", "multiaddrs", "http",
                                      "data_dir", "shards", "log"}],
                           "deployment", "model", "bootstrap", "pid", "placement"}
    T/netem.json          with --netem, while up: {"tag", "pid" (the emulator), "netem",
                          "subnet", "root_address", "hosts": {"n<i>"|"client": {"namespace",
                          "address", "device"}}}
    T/netem-stats.json    the emulator's counters: per link, per (sender->receiver) pair

Start-up progress (import, encrypt, nodes ready, cards seen) goes to stderr: step lines with
elapsed seconds, bars on a terminal, plain lines on a pipe, nothing with ``--quiet``; the summary
goes to stdout.

The process management lives in scripts/localnet.py (``Testnet``), which bench/ and tests use.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from demo_generate import demo_generate
from demo_masked import demo_masked
from localnet import (
    DEFAULT_DIR,
    DEFAULT_NODE_SHARDS,
    LOCK_FILE,
    MODELS,
    SCHEMES,
    STATE_FILE,
    Testnet,
    TestnetError,
    http_json,
    place_shards,
    short,
    stderr_log,
)
from netem import Links, NetemError, clean, namespaces, retune, tag_for

from models.progress import Reporter
from node.byzantine import MODES as BYZANTINE_MODES

__all__ = ["Testnet", "TestnetError", "place_shards"]


class _Stop(BaseException):
    """Raised in the main thread by the first SIGINT/SIGTERM."""


def _install_stop_handlers() -> Callable[[], None]:
    """SIGINT/SIGTERM raise _Stop once; later signals are ignored while we clean up.

    Returns a function that marks cleanup as started (so no signal interrupts it)."""
    state = {"stopping": False}

    def handler(signum: int, frame: object) -> None:
        if not state["stopping"]:
            state["stopping"] = True
            raise _Stop(signal.Signals(signum).name)

    signal.signal(signal.SIGINT, handler)
    signal.signal(signal.SIGTERM, handler)
    return lambda: state.__setitem__("stopping", True)


# -- commands ------------------------------------------------------------------------------------


def _links_from_args(args: argparse.Namespace) -> Links | None:
    """The namespaces and link emulator of ``--netem`` (None without it)."""
    if args.netem is None:
        return None
    hosts = [f"n{i}" for i in range(args.nodes)] + ["client"]
    return Links(args.dir, hosts, args.netem, seed=args.seed, log=stderr_log)


def _net_from_args(args: argparse.Namespace, links: Links | None = None) -> Testnet:
    kind, model = "minilm", None
    if args.model in MODELS:
        kind = args.model
        if args.deployment:
            raise TestnetError(f"--model {kind} imports the model itself; with --deployment "
                               "give --model the plaintext model directory")
    elif args.model:
        if not args.deployment:
            raise TestnetError(f"--model {args.model}: a directory goes with --deployment; to "
                               f"import a model give one of {', '.join(MODELS)}")
        model = Path(args.model)
    node_args: list[str] = []
    if args.threads is not None:
        node_args += ["--threads", str(args.threads)]
    if args.capacity is not None:
        node_args += ["--capacity", str(args.capacity)]
    replicas = args.replicas if args.replicas is not None else min(3, args.nodes)
    if args.scheme == "masked" and replicas < 2:
        raise TestnetError("--scheme masked needs every node shard on at least 2 nodes (one "
                           "computes on the masked input, another on the mask): --replicas 2 "
                           "or more")
    placed: dict[str, Any] = {}
    if links is not None:
        placed = {"hosts": [links.address(f"n{i}") for i in range(args.nodes)],
                  "launcher": lambda node, cmd: links.wrap(f"n{node.index}", cmd)}
    return Testnet(args.dir, args.nodes, replicas, args.node_shards, **placed,
                   deployment=args.deployment, model=model, node_args=node_args,
                   timeout=args.timeout, byzantine=args.byzantine,
                   byzantine_mode=args.byzantine_mode, kind=kind, scheme=args.scheme,
                   progress=Reporter(prefix="testnet: ", quiet=args.quiet))


def cmd_up(args: argparse.Namespace) -> int:
    cleaning = _install_stop_handlers()
    links = _links_from_args(args)
    net: Testnet | None = None
    try:
        if links is not None:
            links.start()
        net = _net_from_args(args, links)
        net.start()
        print(net.summary())
        prefix = ""
        if links is not None:
            client = links.namespace("client")
            print(f"\n  links: netem \"{args.netem}\" on every host's egress (userspace "
                  f"emulator pid {links.proc.pid if links.proc else '-'}); nodes in "
                  f"namespaces {links.namespace('n0')[:-1]}<i>, client in {client} "
                  f"({links.address('client')}); state {links.state_file}")
            prefix = f"ip netns exec {client} "
        print()
        # full verification needs two nodes per hop: with one, say plainly that it is off
        verify = " --verify none" if net.replicas < 2 else ""
        if net.kind == "smollm2":
            print(f"  try:  {prefix}.venv/bin/veilnet generate --chat --bootstrap " + net.bootstrap
                  + f" --deployment {net.deployment}{verify} \"What is the capital of "
                  "France?\"")
        else:
            print(f"  try:  {prefix}.venv/bin/veilnet query --bootstrap " + net.bootstrap
                  + f" --deployment {net.deployment}{verify} \"A man is eating food.\"")
        print(f"  stop: Ctrl-C, or kill {os.getpid()}", flush=True)
        while True:
            for node in net.reap():  # nodes that died while the testnet runs
                net.log(f"node {node.index} (pid {node.pid}) exited with code "
                        f"{node.exit_code}; see {node.log} (testnet.json updated)")
            time.sleep(0.5)
    except _Stop as stop:
        stderr_log(f"{stop}: stopping {args.nodes} node(s)")
    finally:
        cleaning()
        if net is not None:
            net.stop()
        if links is not None:
            stats = links.stop()
            stderr_log(f"links removed; {stats.get('forwarded', 0)} packets forwarded "
                       f"({stats.get('forwarded_bytes', 0)} bytes), {stats.get('dropped', 0)} "
                       f"dropped; counters in {links.stats_file}")
    stderr_log("stopped")
    return 0


def cmd_netem(args: argparse.Namespace) -> int:
    """New netem parameters for the links of the testnet running in T."""
    stats = retune(args.dir, " ".join(args.args))
    print(f"links of {args.dir} now: {' '.join(args.args) or '(no emulation)'}; so far "
          f"{stats.get('forwarded', 0)} packets forwarded, {stats.get('dropped', 0)} dropped")
    return 0


def cmd_clean(args: argparse.Namespace) -> int:
    """Remove the namespaces, emulator and state a killed ``up --netem`` left behind."""
    import fcntl

    lock_path = args.dir / LOCK_FILE
    if lock_path.exists():
        with open(lock_path) as lock:
            try:
                fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                stderr_log(f"error: a testnet is running in {args.dir}: stop it (Ctrl-C or "
                           "SIGTERM) instead")
                return 1
            (args.dir / STATE_FILE).unlink(missing_ok=True)
    if not args.all and not args.dir.exists():
        stderr_log(f"note: {args.dir} does not exist; removing namespaces of its tag "
                   f"{tag_for(args.dir)} only")
    removed = clean(args.dir, everything=args.all)
    for what in removed:
        print(f"removed {what}")
    left = namespaces() if args.all else namespaces(f"veilnet-{tag_for(args.dir)}-")
    print(f"{len(removed)} leftover(s) removed" + (f"; still there: {left}" if left else ""))
    return 1 if left else 0


DEMO_SENTENCES = [
    "A man is eating food.",
    "A man is eating a piece of bread.",
    "The girl is carrying a baby.",
    "Encrypted inference keeps activations private.",
]
DEMO_PAIRS = [(0, 1, "similar"), (0, 2, "different"), (2, 3, "different")]
TOLERANCE = 1e-4


def _print_hops(hops: Sequence[Any], net: Testnet) -> None:
    by_peer = {n.peer_id: n.index for n in net.nodes}
    # every answer shown passed the client's checks, its node's signature included; a hop
    # whose answer did not is retried on another node (its failure is listed)
    print(f"    {'shard':<7}{'node':<6}{'peer id':<20}{'latency':>10}  verdict")
    for h in hops:
        print(f"    {h.shard_index:<7}{by_peer.get(h.peer_id, '?')!s:<6}{short(h.peer_id):<20}"
              f"{h.latency_ms:>8.1f}ms  {_verdict(h.verdict, by_peer)}")
        for failure in h.failures:
            peer, _, reason = failure.partition(": ")
            reason = reason.replace(peer, short(peer)).split(": /")[0]  # drop the address
            print(f"           node {by_peer.get(peer, '?')} failed: {reason[:72]}")


def _verdict(verdict: dict[str, Any] | None, by_peer: dict[str | None, int]) -> str:
    if not verdict:
        return "(one node)"
    text = f"{len(verdict['winners'])} of {len(verdict['nodes'])} nodes agree"
    if verdict["losers"]:
        text += "; LOST: node " + ", ".join(str(by_peer.get(p, "?")) for p in verdict["losers"])
    return text


def _compare(embeddings: Any, reference: Any) -> tuple[float, Any]:
    import numpy as np

    diff = float(np.abs(embeddings - reference).max())
    cos = np.sum(embeddings * reference, axis=1) / (
        np.linalg.norm(embeddings, axis=1) * np.linalg.norm(reference, axis=1))
    return diff, cos


def _demo_query(net: Testnet, texts: Sequence[str], reference: Any, title: str,
                detail: bool = True, quorum: int = 1) -> float:
    from client import Client

    print(f"\n{title}")
    started = time.perf_counter()
    with Client([net.bootstrap], net.deployment,  # type: ignore[arg-type]
                witness_quorum=quorum) as client:
        result = client.embed(texts)
    elapsed = time.perf_counter() - started
    diff, cos = _compare(result.embeddings, reference)
    print(f"  {len(texts)} sentences in {elapsed * 1000:.0f} ms (client start included); "
          f"hops:")
    _print_hops(result.hops, net)
    if not detail:
        if not any(h.failures for h in result.hops):
            print("  (this client happened to pick live nodes first: no hop needed a retry)")
        print(f"  max |network - plaintext| {diff:.2e}, min cosine {cos.min():.7f}")
        _print_receipt(result)
        return diff
    print(f"  {'sentence':<50}{'max |net - plain|':>18}{'cosine':>11}")
    for i, text in enumerate(texts):
        d = float(abs(result.embeddings[i] - reference[i]).max())
        print(f"  s{i} {text[:46]:<47}{d:>18.2e}{cos[i]:>11.7f}")
    sims = result.embeddings @ result.embeddings.T
    plain = reference @ reference.T
    for a, b, kind in DEMO_PAIRS:
        print(f"  similarity s{a}~s{b} ({kind}): network {sims[a, b]:.4f}, "
              f"plaintext {plain[a, b]:.4f}")
    _print_receipt(result)
    return diff


def cmd_demo(args: argparse.Namespace) -> int:
    cleaning = _install_stop_handlers()
    if args.deployment and not args.model:
        stderr_log("error: the demo compares with the plaintext model: give --model too")
        return 2
    net = _net_from_args(args)
    worst, same_tokens = 0.0, False
    try:
        net.start()
        print(net.summary())
        import logging

        from models import Pipeline
        from protocols.transport import quiet_libraries

        quiet_libraries()  # failed dials are shown in the hop table instead
        logging.getLogger("veilnet.client").setLevel(logging.ERROR)

        assert net.model is not None
        reference = Pipeline(net.model).embed(DEMO_SENTENCES)
        print("\nThe client keeps the key (deploy/client/); nodes hold only encrypted node "
              "shards.\nEach answer is compared with the plaintext model run in this process.")
        liars = [n.index for n in net.nodes if n.byzantine]
        if liars:
            print(f"Node(s) {', '.join(map(str, liars))} run --byzantine-test-mode "
                  f"{net.byzantine_mode}: they return wrong answers, signed as if right.\n"
                  "Each hop runs on 3 nodes; the client keeps only an answer a strict majority "
                  "agrees on.")
        worst = max(worst, _demo_query(net, DEMO_SENTENCES, reference,
                                       "Query 1: encrypted embeddings through the network",
                                       quorum=min(2, net.n - 1)))
        worst = max(worst, _reputation_round(net, pipeline=Pipeline(net.model)))
        victim = _crash_candidate(net)
        if victim is not None:
            net.stop_node(victim, kill=True)
            print(f"\nNode {victim} crashed (SIGKILL). Its signed card stays in the other nodes' "
                  "indexes until it\nexpires (3 announce intervals), so a client may try it "
                  "first and retry the hop on another replica.")
            worst = max(worst, _demo_query(net, DEMO_SENTENCES, reference,
                                           f"Query 2: with node {victim} down",
                                           detail=False, quorum=1))
        net.stop()
        if not args.no_masked:
            worst = max(worst, demo_masked(net.root, args.timeout))
        same_tokens = True if args.no_generate else demo_generate(net.root, args.timeout)
    except _Stop as stop:
        net.log(f"{stop}: stopping")
        return 130
    finally:
        cleaning()
        net.stop()
    ok = worst <= TOLERANCE and same_tokens
    print(f"\nmax |network - plaintext| over all queries: {worst:.2e} (tolerance "
          f"{TOLERANCE:g}); generated tokens equal the plaintext model's: "
          f"{'yes' if same_tokens else 'NO'}; {'ok' if ok else 'FAIL'}; all nodes stopped")
    return 0 if ok else 1


def _reputation_round(net: Testnet, pipeline: Any, queries: int = 8) -> float:
    """More queries (each with its own texts), then the rankings the nodes serve."""
    from client import Client

    print(f"\n{queries} more queries, each logging a receipt and the client's signed score "
          "report in node 0's ledger:")
    worst = 0.0
    by_peer = {n.peer_id: n.index for n in net.nodes}
    with Client([net.bootstrap], net.deployment) as client:  # type: ignore[arg-type]
        for q in range(queries):
            texts = [f"query {q}: {s}" for s in DEMO_SENTENCES[:2]]
            result = client.embed(texts)
            diff, _ = _compare(result.embeddings, pipeline.embed(texts))
            worst = max(worst, diff)
            lost = sorted({by_peer.get(p, -1) for h in result.hops if h.verdict
                           for p in h.verdict["losers"]})
            print(f"  query {q + 1}: max |net - plain| {diff:.1e}; "
                  + (f"caught node {', '.join(map(str, lost))}" if lost else "no hop disputed"))
    if not net.ledger_nodes:
        return worst
    rows: list[dict[str, Any]] = []
    for _ in range(50):  # node 0 re-ranks after each committed batch
        rows = http_json(f"{net.nodes[0].http}/v1/rankings", timeout=5) or []
        if len(rows) == len(net.nodes):
            break
        time.sleep(0.2)
    by_did = {n.did: n for n in net.nodes}
    print("\nRankings (GET /v1/rankings; also `veilnet rankings --http URL`), best first:")
    print(f"    {'rank':<6}{'node':<6}{'score':>7}{'agreement':>11}{'avail':>7}{'latency':>9}")
    for i, row in enumerate(rows, 1):
        node = by_did.get(row["did"])
        tag = "  <- byzantine" if node is not None and node.byzantine else ""
        agreement = row.get("agreement")
        print(f"    {i:<6}{node.index if node else '?'!s:<6}{row['score']:>7.3f}"
              f"{agreement if agreement is not None else float('nan'):>11.3f}"
              f"{row.get('availability') or 0:>7.2f}{row.get('latency_ms') or 0:>7.1f}ms{tag}")
    return worst


def _print_receipt(result: Any) -> None:
    receipt = result.receipt
    pending = result.receipt_pending
    if pending is not None:
        print(f"  receipt: entry {pending.index} is in node 0's ledger; its witness "
              f"cosignatures are pending ({pending.reason}); proof later at "
              f"{pending.proof_url}")
        return
    if receipt is None:
        if result.receipt_error:
            print(f"  receipt: not logged ({result.receipt_error})")
        return
    checkpoint = receipt.verify()  # offline: log key, witness keys, the proof text
    print(f"  receipt: entry {receipt.index} of node 0's ledger (tree size {checkpoint.size}); "
          f"its checkpoint is signed\n  by the log and cosigned by >= {receipt.quorum} "
          f"witness(es); verified offline with the log's and witnesses' keys")


def _crash_candidate(net: Testnet) -> int | None:
    """An honest node other than the bootstrap node such that every shard it holds keeps at
    least two live honest replicas (so a majority can still outvote a liar)."""
    honest = {n.index for n in net.nodes if not n.byzantine}
    need = 2 if len(honest) < len(net.nodes) else 1  # with a liar about: an honest majority
    for node in reversed(net.nodes[1:]):
        if node.byzantine or not node.shards:
            continue
        if all(len([j for j in net.placement[c] if j != node.index and j in honest]) >= need
               for c in node.shards):
            return node.index
    return None


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="testnet.py",
        description="Run a local veilnet testnet: node processes on 127.0.0.1 (or, with up "
                    "--netem, each in its own network namespace behind emulated links) serving "
                    "an encrypted all-MiniLM-L6-v2 deployment.",
        epilog="Python: sys.path.insert(0, 'scripts'); from testnet import Testnet "
               "(see the module docstring).")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def common(p: argparse.ArgumentParser, nodes: int, byzantine: int = 0) -> None:
        p.add_argument("--dir", type=Path, default=DEFAULT_DIR, metavar="T",
                       help=f"work directory: model/, deploy/, nodes/node<i>/, {STATE_FILE} "
                            f"(default {DEFAULT_DIR}/)")
        p.add_argument("--nodes", type=int, default=nodes, metavar="N",
                       help=f"number of node processes (default {nodes})")
        p.add_argument("--replicas", type=int, default=None, metavar="R",
                       help="nodes per node shard, placed round robin; at most N (default "
                            "3, or N when fewer: a query's default verify=full needs at least "
                            "2 nodes per hop, and 3 outvote one liar)")
        p.add_argument("--node-shards", type=int, default=None, metavar="K",
                       help=f"node shards when MiniLM is imported (default "
                            f"{DEFAULT_NODE_SHARDS}; an existing T/deploy must match)")
        p.add_argument("--deployment", type=Path, metavar="DEPLOY",
                       help="use this encrypted deployment instead of T/deploy (nothing is "
                            "imported)")
        p.add_argument("--model", metavar="NAME|DIR",
                       help="minilm (default) or smollm2: the model imported and encrypted "
                            "into T; or, with --deployment, the plaintext model directory "
                            "DEPLOY was encrypted from")
        p.add_argument("--scheme", choices=SCHEMES, default="ee",
                       help="how MiniLM is encrypted: ee (equivariant encryption, default) or "
                            "masked (masked/1: nodes compute linear layers on noise-masked "
                            "inputs, the client everything else; into T/deploy-masked)")
        p.add_argument("--threads", type=int, metavar="NUM",
                       help="onnxruntime threads per shard run on each node (node --threads)")
        p.add_argument("--capacity", type=int, metavar="C",
                       help="shard runs at once per node (node --capacity)")
        p.add_argument("--timeout", type=float, default=60.0, metavar="SECONDS",
                       help="limit for all nodes to come up (default 60)")
        p.add_argument("--byzantine", type=int, default=byzantine, metavar="K",
                       help=f"the last K nodes return wrong answers on purpose (node flag "
                            f"--byzantine-test-mode; default {byzantine})")
        p.add_argument("--byzantine-mode", default="noise",
                       choices=BYZANTINE_MODES,
                       help="how the Byzantine nodes lie (default noise)")
        p.add_argument("--quiet", "-q", action="store_true",
                       help="print no start-up progress on stderr (by default: step lines "
                            "with elapsed seconds for import, encrypt, nodes ready and cards "
                            "seen; bars on a terminal, plain lines on a pipe); the summary on "
                            "stdout, node failures and the stop are still reported")

    up = sub.add_parser(
        "up", help="start a testnet and run until Ctrl-C / SIGTERM",
        description="Import and encrypt MiniLM into T (first run only), place each node shard "
                    "on R nodes, start N nodes (node 0 first, the others bootstrapping from "
                    f"it), wait until all are up, write T/{STATE_FILE}, print a summary and run "
                    "until SIGINT or SIGTERM; then stop every node and remove "
                    f"T/{STATE_FILE}. Node logs: T/nodes/node<i>/node.log.")
    common(up, nodes=3)
    up.add_argument("--netem", metavar="ARGS",
                    help="run every node and the client in its own network namespace, joined "
                         "by links with these tc netem arguments on every host's egress, e.g. "
                         "\"delay 40ms 10ms loss 1%%\" (delay TIME [JITTER], loss [random] "
                         "PCT, duplicate PCT, rate RATE, limit N; \"\" for plain links); "
                         "needs root and iproute2")
    up.add_argument("--seed", type=int, default=0,
                    help="seed of the link emulator's random loss and jitter (default 0)")
    up.set_defaults(func=cmd_up)

    demo = sub.add_parser(
        "demo", help="start a testnet, run encrypted queries, stop it (make demo)",
        description="Start a testnet (as 'up'), embed a few sentences through it with the "
                    "client SDK, print each answer beside the plaintext model's and the node "
                    "that served each hop, crash one node and query again, then stop every "
                    "node; then the same MiniLM as a masked/1 deployment on 3 nodes (one "
                    "lying); then start a 3-node testnet serving encrypted SmolLM2 and stream a "
                    "chat answer through it (imported into T/smollm2/ on the first run). Exits "
                    f"1 if any embedding differs from the plaintext one by more than "
                    f"{TOLERANCE:g} or a generated token differs from the plaintext model's.")
    common(demo, nodes=5, byzantine=1)
    demo.add_argument("--no-masked", action="store_true",
                      help="skip the masked/1 part (MiniLM, masked offload, on 3 nodes)")
    demo.add_argument("--no-generate", action="store_true",
                      help="skip the text-generation part (SmolLM2 on a 3-node testnet)")
    demo.set_defaults(func=cmd_demo)

    ne = sub.add_parser(
        "netem", help="change the link parameters of a testnet running with --netem",
        description="Give every host's link of the testnet running in T new tc netem "
                    "parameters (as --netem), at once; open connections stay open.")
    ne.add_argument("--dir", type=Path, default=DEFAULT_DIR, metavar="T",
                    help=f"the testnet's work directory (default {DEFAULT_DIR}/)")
    ne.add_argument("args", nargs=argparse.REMAINDER, metavar="ARGS",
                    help="netem arguments, e.g. delay 50ms loss 1%%")
    ne.set_defaults(func=cmd_netem)

    cl = sub.add_parser(
        "clean", help="remove what a crashed 'up --netem' left (namespaces, emulator, state)",
        description="Stop the processes in and delete the network namespaces of the testnet in "
                    "T (veilnet-<tag>-*, tag from T's path), stop its link emulator if it "
                    f"still runs, and remove T/{STATE_FILE} and T/netem.json. Refuses while a "
                    "testnet runs in T.")
    cl.add_argument("--dir", type=Path, default=DEFAULT_DIR, metavar="T",
                    help=f"the testnet's work directory (default {DEFAULT_DIR}/)")
    cl.add_argument("--all", action="store_true",
                    help="every veilnet-* namespace, whatever testnet made it")
    cl.set_defaults(func=cmd_clean)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from client import QueryError
    from models import ModelSourceError

    try:
        return int(args.func(args))  # every node is stopped before an error gets here
    except (TestnetError, NetemError, ValueError, ModelSourceError, QueryError) as exc:
        stderr_log(f"error: {exc}")
        return 1


if __name__ == "__main__":
    sys.exit(main())
