"""A chaos soak: a local testnet under load while a seeded schedule breaks it, and one JSON object
that says whether anything was lost or wrong.

    chaos.py --minutes M --seed S [--nodes 6] [--clients 3] [--netem ARGS] [--dir T] [--json]
             [--model minilm|smollm2 [--max-tokens 8] | --deployment DIR --model DIR]

The testnet: N >= 6 MiniLM nodes (``--threads 1``; SmolLM2 ones: see below), every node shard
on 3 of them (full verification needs two agreeing answers, so a hop survives one disturbed
holder), node 0 keeps the ledger and every node witnesses it. ``--clients`` SDK clients
(``AsyncClient``: full verification, ledger receipts on) each send one query after another, a
sentence drawn from a fixed list, and every answer is compared with the in-process plaintext
model.

With ``--model smollm2`` the nodes serve encrypted SmolLM2-135M-Instruct (ee-decoder/1, the KV
cache in sessions on the nodes) and the clients generate instead: greedy, ``--max-tokens``
tokens, a prompt drawn from a fixed list (scripts/chaos_generate.py), each generation compared
token for token with ``models.decoding.LocalDecoder`` on the unencrypted import (computed once
per prompt in this process). Both models are imported and encrypted once into testnet-data/
(SmolLM2 into testnet-data/smollm2/) and reused; ``--deployment DIR --model DIR`` uses an
existing deployment and its plaintext model instead, and generates when it is a decoder.

The schedule (``plan``, a pure function of the seed and the placement) starts a disturbance
every few seconds, each on one node for a while, overlapping: ``kill`` (SIGKILL, restart later),
``freeze`` (SIGSTOP for longer than the clients' hop timeout, then SIGCONT), ``ledger`` (node 0,
the ledger, stopped and restarted), ``corrupt`` (bytes of one of its shard files overwritten and
the node restarted, so it finds the damage when it loads the shard; the file is restored at the
end of the window) and ``byzantine`` (restarted with ``--byzantine-test-mode noise``, then
restarted honest). Every kind happens at least once when the run is long enough. It never
disturbs two holders of one shard at once (the plan spaces the events, and since restarts
make them drift, the runner also holds an event back while another on a node sharing a shard
is under way or ended less than ``SETTLE_S`` ago), so every hop always has two honest holders
up; a query that fails anyway is counted in ``failed_while_covered``.

At the end, after the clients stop: the witness refusals and RSS of every node, then the testnet
stops, and the ledger is checked offline: ``veilnet ledger verify`` on node 0's log, and every
receipt a client was given (a proof, or a pending index) must be in the log at its index.
Finally processes and namespaces left behind are counted. ``--json`` prints only the object;
without it a short report goes to stderr as well. Generating, the object has ``generations``
(the same counts, plus tokens compared, sessions replayed, verdicts lost, and the wrong ones
listed) in place of ``queries``; ``receipts`` then counts the generations' receipts. Exit code
0 when every target is met (0 wrong answers, 0 acknowledged entries lost, the ledger verifies,
no failed query or generation while covered, nothing left behind), else 1.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import trio

sys.path.insert(0, str(Path(__file__).resolve().parent))
import chaos_generate
from localnet import (
    DEFAULT_DIR,
    MODELS,
    REPO,
    Testnet,
    TestnetError,
    metric_samples,
    prepare_model,
    processes_mentioning,
    rss_mb,
    stderr_log,
)

KINDS = ("kill", "freeze", "ledger", "corrupt", "byzantine")
HOP_TIMEOUT = 5.0  # the clients' hop timeout; a freeze lasts longer
RESTART_SLACK = 6.0  # a restart takes a few seconds beyond its planned end
SETTLE_S = 5.0  # after an event ends, before another on a node sharing a shard with it starts
TEXTS = [f"Sentence {i}: {s}" for i, s in enumerate([
    "A man is eating food.", "The girl is carrying a baby.", "A woman is playing violin.",
    "Two men pushed carts through the woods.", "A cheetah is running behind its prey.",
    "Encrypted inference keeps activations private.", "The ledger never forgets an entry.",
    "Nodes come and go; the answers stay right.", "Der schnelle braune Fuchs springt.",
    "naïve café résumé — ünïcödé & punctuation!?"])]
MAX_LISTED = 20  # failed queries listed in full in the report
WRONG = 1e-3  # max abs difference from the plaintext embedding that counts as a wrong answer


@dataclass
class Event:
    kind: str
    node: int
    start: float  # seconds after the soak began
    end: float
    began: float | None = None  # when it actually took effect, and ended (monotonic)
    ended: float | None = None
    note: str = ""


def shards_held(placement: dict[str, list[int]], nodes: int) -> dict[int, set[str]]:
    """The shard CIDs each node holds."""
    return {i: {cid for cid, where in placement.items() if i in where} for i in range(nodes)}


def share_a_shard(held: dict[int, set[str]], a: int, b: int) -> bool:
    """Whether disturbing nodes ``a`` and ``b`` at once could leave a shard short of holders."""
    return a == b or bool(held[a] & held[b])


def plan(seed: int, seconds: float, placement: dict[str, list[int]], nodes: int) -> list[Event]:
    """The seeded schedule: a disturbance every 2-6 s from t=5 s until 10 s before the end."""
    rng = random.Random(seed)
    holders = shards_held(placement, nodes)
    kinds = list(KINDS)
    rng.shuffle(kinds)
    events: list[Event] = []
    t = 5.0
    while t < seconds - 10:
        kind = kinds.pop() if kinds else rng.choice(KINDS)
        length = {"kill": rng.uniform(3, 8), "freeze": HOP_TIMEOUT + rng.uniform(2, 4),
                  "ledger": rng.uniform(2, 4), "corrupt": rng.uniform(8, 14),
                  "byzantine": rng.uniform(8, 14)}[kind]
        end = min(t + length, seconds - 2)
        def clashes(node: int, t: float = t, end: float = end) -> bool:
            return any(e.start < end + RESTART_SLACK and t < e.end + RESTART_SLACK
                       and share_a_shard(holders, e.node, node) for e in events)

        candidates = [0] if kind == "ledger" else list(range(1, nodes))
        if kind == "corrupt":
            candidates = [i for i in candidates if holders[i]]
        free = [i for i in candidates if not clashes(i)]
        if free:
            events.append(Event(kind, rng.choice(free), t, end))
        elif kind not in [e.kind for e in events]:
            kinds.append(kind)  # try this kind again at the next slot
        t += rng.uniform(2, 6)
    return events


@dataclass
class Query:
    client: int
    start: float
    end: float
    text: int
    ok: bool
    error: str = ""
    wrong: bool = False
    diff: float = 0.0
    receipt: tuple[int, bytes] | None = None  # (index, entry) the ledger acknowledged
    receipt_error: str = ""
    tokens: int = 0  # a generation: tokens generated, sessions replayed, verdicts lost
    replays: int = 0
    verdicts_lost: int = 0
    detail: str = ""  # a wrong generation: how it differs


@dataclass
class Soak:
    net: Testnet
    seconds: float
    clients: int
    seed: int
    reference: Any  # embeddings of TEXTS; or, generating, greedy tokens per prompt
    max_tokens: int = 0  # > 0: the clients generate (chaos_generate) instead of embedding
    queries: list[Query] = field(default_factory=list)
    events: list[Event] = field(default_factory=list)
    stop: threading.Event = field(default_factory=threading.Event)
    lock: threading.Lock = field(default_factory=threading.Lock)
    saved: dict[int, tuple[Path, bytes]] = field(default_factory=dict)  # corrupt: originals

    # -- clients ---------------------------------------------------------------------------------

    def client_thread(self, k: int, bootstrap: list[str], netns: str | None) -> None:
        if netns is not None:
            enter_namespace(netns)
        trio.run(self._client, k, bootstrap)

    async def _client(self, k: int, bootstrap: list[str]) -> None:
        from client import AsyncClient

        rng = random.Random(self.seed * 1000 + k)
        async with AsyncClient(bootstrap, self.net.deployment, verify="full", replicas=3,
                               hop_timeout=HOP_TIMEOUT, timeout=60.0, seed=rng.randrange(1 << 30),
                               receipt_timeout=10.0) as client:
            while not self.stop.is_set():
                i = rng.randrange(len(self.reference))
                started = time.monotonic()
                try:
                    if self.max_tokens:
                        result = await chaos_generate.generate(client, i, self.max_tokens)
                    else:
                        result = await client.embed([TEXTS[i]])
                except Exception as exc:  # QueryError, and anything else: count it, go on
                    q = Query(k, started, time.monotonic(), i, False,
                              f"{type(exc).__name__}: {' / '.join(str(exc).splitlines())[:2000]}")
                    await trio.sleep(0.5)
                else:
                    q = Query(k, started, time.monotonic(), i, True)
                    if self.max_tokens:
                        differ, q.detail = chaos_generate.compare(result, self.reference[i])
                        q.diff, q.wrong, q.tokens = float(differ), differ > 0, len(result.token_ids)
                        q.replays, q.verdicts_lost = chaos_generate.hop_counts(result)
                    else:
                        q.diff = float(np.abs(result.embeddings[0] - self.reference[i]).max())
                        q.wrong = q.diff > WRONG
                    got = result.receipt or result.receipt_pending
                    if got is not None:
                        q.receipt = (got.index, got.entry)
                    else:
                        q.receipt_error = (result.receipt_error or "none")[:200]
                with self.lock:
                    self.queries.append(q)

    # -- the schedule ----------------------------------------------------------------------------

    def run_schedule(self, t0: float) -> None:
        """Carry out the plan in time. A restart takes seconds, so events drift from their
        planned times; the invariant is therefore kept here, not only in ``plan``: an event
        waits while another event on a node sharing a shard with it is under way or ended less
        than ``SETTLE_S`` ago (its node back, clients reconnecting), and keeps its length."""
        pending = sorted(self.events, key=lambda e: e.start)
        active: list[tuple[Event, float]] = []  # (event, when it is due to end)
        held = shards_held(self.net.placement, len(self.net.nodes))
        while (pending or active) and time.monotonic() < t0 + self.seconds - 2:
            now = time.monotonic()
            for event, due in list(active):
                if now >= due:
                    active.remove((event, due))
                    self._step(event, ending=True)
            if pending and now >= t0 + pending[0].start:
                event = pending[0]
                if not any(share_a_shard(held, event.node, other.node) for other in self.events
                           if other.began is not None
                           and (other.ended is None or now - other.ended < SETTLE_S)):
                    pending.pop(0)
                    self._step(event, ending=False)
                    active.append((event, time.monotonic() + event.end - event.start))
            time.sleep(0.05)
        for event, _ in active:  # out of time: leave no node frozen, corrupt or lying
            self._step(event, ending=True)
        for event in pending:
            event.note = "not started: out of time"

    def _step(self, event: Event, ending: bool) -> None:
        """Start or end ``event``. It began when its node was first disturbed (before a
        restart: a SmolLM2 node takes 10 s or more to come back) and ended when the node is
        back (after one)."""
        if not ending:
            event.began = time.monotonic()
        try:
            (self._undo if ending else self._do)(event)
        except TestnetError as exc:
            event.note += f" {'end' if ending else 'start'} failed: {exc}".splitlines()[0]
        if ending:
            event.ended = time.monotonic()

    def _do(self, e: Event) -> None:
        net, node = self.net, self.net.nodes[e.node]
        if e.kind == "kill":
            net.stop_node(e.node, kill=True)
        elif e.kind == "freeze":
            assert node.pid is not None
            os.kill(node.pid, signal.SIGSTOP)
        elif e.kind == "ledger":
            net.stop_node(e.node)
        elif e.kind == "corrupt":
            cid = sorted(c for c, where in net.placement.items() if e.node in where)[0]
            path = node.data_dir / "shards" / f"{cid}.onnx"
            original = path.read_bytes()
            self.saved[e.node] = (path, original)
            damaged = bytearray(original)
            middle = len(damaged) // 2
            damaged[middle:middle + 64] = bytes(64)  # zeros over 64 bytes of the weights
            path.write_bytes(bytes(damaged))
            e.note = f"shard {cid[:16]}..."
            net.stop_node(e.node, kill=True)
            net.start_node(e.node, wait_peers=False)
        elif e.kind == "byzantine":
            node.byzantine = "noise"
            net.stop_node(e.node)
            net.start_node(e.node, wait_peers=False)

    def _undo(self, e: Event) -> None:
        net, node = self.net, self.net.nodes[e.node]
        if e.kind in ("kill", "ledger"):
            net.start_node(e.node, wait_peers=False)
        elif e.kind == "freeze":
            assert node.pid is not None
            os.kill(node.pid, signal.SIGCONT)
        elif e.kind == "corrupt":
            path, original = self.saved.pop(e.node)
            path.write_bytes(original)  # a new file: the node hashes it again before serving
        elif e.kind == "byzantine":
            node.byzantine = None
            net.stop_node(e.node)
            net.start_node(e.node, wait_peers=False)

    # -- the report ------------------------------------------------------------------------------

    def covered(self, q: Query) -> bool:
        """Whether every shard had two undisturbed holders throughout the query."""
        for where in self.net.placement.values():
            down = {e.node for e in self.events if e.node in where and e.began is not None
                    and e.began < q.end and q.start < (e.ended or float("inf")) + 5.0}
            if len(where) - len(down) < 2:
                return False
        return True


def enter_namespace(name: str) -> None:
    """Move the calling thread (only it: setns(2) is per thread) into network namespace
    ``name``, so the sockets its trio loop opens live there. Python 3.11 has no os.setns."""
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)
    with open(f"/var/run/netns/{name}") as ns:
        if libc.setns(ns.fileno(), 0x40000000) != 0:  # CLONE_NEWNET
            raise OSError(ctypes.get_errno(), f"setns into {name} failed")


def metric_sums(net: Testnet, name: str, label: str) -> dict[str, float]:
    """Sum over the running nodes of the samples of counter ``name`` by ``label``."""
    totals: Counter[str] = Counter()
    for node in net.nodes:
        if node.alive and node.http:
            for labels, value in metric_samples(node, name):
                totals[labels.get(label, "")] += value
    return dict(totals)


def check_ledger(ledger_dir: Path, receipts: list[tuple[int, bytes]]) -> tuple[dict[str, Any], int]:
    """(``veilnet ledger verify`` output, acknowledged entries not in the log at their index)."""
    done = subprocess.run([sys.executable, "-m", "node", "ledger", "verify", str(ledger_dir)],
                          capture_output=True, text=True, timeout=120,
                          env=dict(os.environ, PYTHONPATH=str(REPO)))
    try:
        verify = json.loads(done.stdout)
    except json.JSONDecodeError:
        verify = {"ok": False, "problems": [done.stderr.strip()[-500:]]}
    from ledger.log import Log

    log = Log.open(ledger_dir)
    try:
        missing = sum(1 for index, entry in receipts
                      if index >= log.size or log.store.entry(index) != entry)
    finally:
        log.close()
    return verify, missing


def tally(state: Soak, items: list[Query]) -> dict[str, Any]:
    """The counts of the report's ``queries`` (or ``generations``) object."""
    failed = [q for q in items if not q.ok]
    return {"issued": len(items), "succeeded": len(items) - len(failed), "failed": len(failed),
            "failed_while_covered": sum(1 for q in failed if state.covered(q)),
            "failure_reasons": dict(Counter(q.error.split(" / ")[0][:200]
                                            for q in failed).most_common(10)),
            "wrong_answers": sum(1 for q in items if q.wrong)}


def soak(args: argparse.Namespace, root: Path) -> dict[str, Any]:
    from models import Manifest, Pipeline
    from protocols.transport import quiet_libraries

    quiet_libraries()
    say = (lambda m: None) if args.json else stderr_log
    if args.deployment:
        model, deploy = Path(args.model), args.deployment
    else:  # imported and encrypted once, then reused (as scripts/testnet.py does)
        model, deploy = prepare_model(REPO / DEFAULT_DIR, None, say, kind=args.model)
    manifest = Manifest.load(deploy)
    generating = (manifest.extra.get("config") or {}).get("family") == "llama-decoder"
    tokens: list[list[int]] = []
    if generating:  # the plaintext reference, before the nodes take the CPU
        say(f"greedy reference of {len(chaos_generate.PROMPTS)} prompts ({model})")
        tokens = chaos_generate.references(model, args.max_tokens)
    links, placed, netns = None, {}, None
    if args.netem:  # every node and the clients in namespaces, netem on every host's egress
        from netem import Links

        links = Links(root, [f"n{i}" for i in range(args.nodes)] + ["client"], args.netem,
                      seed=args.seed, log=say)
        links.start()
        assert links is not None
        placed = {"hosts": [links.address(f"n{i}") for i in range(args.nodes)],
                  "launcher": lambda node, cmd: links.wrap(f"n{node.index}", cmd)}
        netns = links.namespace("client")
    net = Testnet(root, nodes=args.nodes, replicas=3, deployment=deploy, model=model,
                  node_args=["--threads", "1"], ledger_nodes=(0,), timeout=120.0, log=say,
                  progress=say, **placed)
    try:
        net.start()
        reference = tokens if generating else Pipeline(net.model).embed(TEXTS)
        state = Soak(net, args.minutes * 60, args.clients, args.seed, reference,
                     args.max_tokens if generating else 0)
        state.events = plan(args.seed, state.seconds, net.placement, args.nodes)
        rss_start = {n.index: rss_mb(n.pid) for n in net.nodes}
        bootstrap = [n.multiaddr for n in net.nodes]
        threads = [threading.Thread(target=state.client_thread, args=(k, bootstrap, netns),
                                    daemon=True) for k in range(args.clients)]
        t0 = time.monotonic()
        for thread in threads:
            thread.start()
        try:
            state.run_schedule(t0)
            while time.monotonic() < t0 + state.seconds:
                time.sleep(0.2)
        finally:
            state.stop.set()
            for e in state.events:  # a frozen node would not stop
                if e.kind == "freeze" and e.ended is None and net.nodes[e.node].pid:
                    os.kill(net.nodes[e.node].pid or 0, signal.SIGCONT)
            for thread in threads:
                thread.join(90)
        refusals = metric_sums(net, "veilnet_witness_refused_total", "reason")
        rss_end = {n.index: rss_mb(n.pid) for n in net.nodes}
    finally:
        net.stop()
        if links is not None:
            links.stop()
    receipts = [q.receipt for q in state.queries if q.receipt is not None]
    verify, missing = check_ledger(net.nodes[0].data_dir / "ledger", receipts)
    failed = [q for q in state.queries if not q.ok]
    counts = tally(state, state.queries)
    if generating:
        counts = {"max_tokens": args.max_tokens, **counts,
                  **chaos_generate.tally(state.queries, t0)}
    else:
        counts["max_diff"] = max((q.diff for q in state.queries if q.ok), default=None)
    report = {
        "minutes": args.minutes, "seed": args.seed, "nodes": args.nodes,
        "clients": args.clients, "netem": args.netem, "model": manifest.name,
        "generations" if generating else "queries": counts,
        "receipts": {"acknowledged": len(receipts), "missing_from_ledger": missing,
                     "not_logged": dict(Counter(q.receipt_error[:60] for q in state.queries
                                                if q.ok and q.receipt is None))},
        "ledger_verify": verify,
        "witness_refusals": refusals,
        "failures": [{"at_s": round(q.start - t0, 1), "took_s": round(q.end - q.start, 1),
                      "client": q.client, "error": q.error} for q in failed[:MAX_LISTED]],
        "events": [{"kind": e.kind, "node": e.node, "at_s": round(e.start, 1),
                    "for_s": round(e.end - e.start, 1),
                    "began_s": round(e.began - t0, 1) if e.began else None,
                    "ended_s": round(e.ended - t0, 1) if e.ended else None,
                    **({"note": e.note.strip()} if e.note.strip() else {})}
                   for e in state.events],
        "rss_mb": {"start": rss_start, "end": rss_end},
    }
    return report


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog=__doc__.split("\n\n", 2)[2])
    parser.add_argument("--minutes", type=float, default=5.0, help="soak length (5)")
    parser.add_argument("--seed", type=int, default=1, help="schedule and client seed (1)")
    parser.add_argument("--nodes", type=int, default=6, help="nodes, at least 6 (6)")
    parser.add_argument("--clients", type=int, default=3, help="concurrent clients (3)")
    parser.add_argument("--netem", metavar="ARGS", help="tc netem arguments for every link "
                                                        "(nodes in network namespaces)")
    parser.add_argument("--dir", type=Path, help="testnet directory (default: a temporary one)")
    parser.add_argument("--model", metavar="NAME|DIR",
                        help="minilm (default: the clients embed) or smollm2 (they generate): "
                             "imported and encrypted once into testnet-data/ and reused; or, "
                             "with --deployment, the plaintext model directory it was "
                             "encrypted from")
    parser.add_argument("--deployment", type=Path, metavar="DIR",
                        help="an existing encrypted deployment (MiniLM, or a decoder: then the "
                             "clients generate) instead of the imported one")
    parser.add_argument("--max-tokens", type=int, default=chaos_generate.MAX_TOKENS,
                        metavar="N", help="tokens per greedy generation "
                                          f"({chaos_generate.MAX_TOKENS})")
    parser.add_argument("--json", action="store_true", help="print only the JSON object")
    args = parser.parse_args(argv)
    if args.nodes < 6:
        parser.error("--nodes: at least 6")
    if args.minutes <= 0:
        parser.error("--minutes must be positive")
    if args.deployment and args.model is None:
        parser.error("--deployment goes with --model, the plaintext model directory")
    args.model = args.model or "minilm"
    if args.deployment and args.model in MODELS:
        parser.error(f"--model {args.model} imports the model itself; with --deployment give "
                     "--model the plaintext model directory")
    if not args.deployment and args.model not in MODELS:
        parser.error(f"--model {args.model}: a directory goes with --deployment; to import a "
                     f"model give one of {', '.join(MODELS)}")
    if not 1 <= args.max_tokens <= 256:
        parser.error("--max-tokens: between 1 and 256")
    with tempfile.TemporaryDirectory(prefix="veilnet-chaos-") as tmp:
        root = (args.dir or Path(tmp)).absolute()
        report = soak(args, root)
        left = processes_mentioning(str(root))
    report["processes_left"] = len(left)
    report["namespaces_left"] = 0
    if args.netem:
        from netem import PREFIX, namespaces, tag_for

        report["namespaces_left"] = len(namespaces(f"{PREFIX}{tag_for(root)}-"))
    q, r = report.get("queries") or report["generations"], report["receipts"]
    report["targets_met"] = (q["wrong_answers"] == 0 and r["missing_from_ledger"] == 0
                             and bool(report["ledger_verify"].get("ok"))
                             and q["failed_while_covered"] == 0
                             and report["processes_left"] == 0
                             and report["namespaces_left"] == 0)
    print(json.dumps(report, indent=None if args.json else 2))
    return 0 if report["targets_met"] else 1


if __name__ == "__main__":
    raise SystemExit(main())
