"""Attack benchmark: what each attack of issue 12 costs a real node now, against a valid encrypted
query measured in the same run.

One ``veilnet node start`` process (``python -m node node start --data-dir D --listen
/ip4/127.0.0.1/tcp/0 --http 127.0.0.1:0``) holds an EE-encrypted MiniLM deployment (imported
with ``--node-shards 1``, so a query is exactly one infer hop). Everything talks to it over real
HTTP and real libp2p (Noise, yamux) on 127.0.0.1.

Baseline, measured first: the median wall time of ``client.Client(..., verify="none").embed`` of
one sentence (one encrypted infer hop; a warm client, after untimed warm-up queries), the node's
CPU per query, the median latency of ``/healthz`` at rest, and a cold query (a new ``Client``,
then one embed) for the Sybil attack's comparison.

Per attack: wall time until the node's answer, the node's CPU seconds (/proc/<pid>/stat utime +
stime, before and after), its RSS before, after and 0.5 s later (VmRSS) and peak (VmHWM, reset
through /proc/<pid>/clear_refs before each run), and the worst ``/healthz`` latency seen by a
poller in a separate process (a probe every 20 ms while the attack runs). Attacks 1-5 run
``--reps`` times each. The attacks (the payloads of tests/network/test_hardening_*.py):

1. ``a2a_fake_cid``: POST /a2a whose data part names a 3 MB fake shard CID;
2. ``infer_fake_shard``: a /veilnet/infer/1 frame whose 'shard' is a 3 MB fake CID;
3. ``cbor_bomb``: a 16 MiB /veilnet/infer/1 frame holding one array of 16M empty arrays;
   ``control_16mib_bytes_frame`` is no attack: a well-formed 16 MiB frame (one byte string, for a
   shard the node does not hold) showing what moving 16 MiB over libp2p costs by itself;
4. ``a2a_70mb_content_length`` / ``a2a_70mb_chunked``: a 70 MB POST /a2a body;
5. ``fetch_huge_shard_with_token``: POST /v1/shards/fetch (the node's D/api-token as bearer)
   naming a deployment the node does not hold, at a hostile libp2p peer that serves the
   deployment's real manifest and then declares its shard as 2**40 bytes and streams chunks;
   ``fetch_without_token``: the same POST without the token;
6. ``sybil_cards``: ten cards (fresh identities, valid signatures, 300 s lifetime, issued 30 s
   ahead so they sort before the node's own, naming the deployment's shards at a TCP port that
   accepts and never answers) POSTed to /v1/agents, then a real cold client query.

Prints one JSON object (figures, and each attack's ratios to the baseline); progress goes to
stderr. The node, the poller and every libp2p host are stopped in a ``finally``. The process,
/proc, poller and hostile-peer machinery is in bench/attack_harness.py.

    .venv/bin/python bench/attacks.py [--reps 5] [--queries 15] [--dir DIR]
"""

from __future__ import annotations

import argparse
import datetime
import importlib.util
import json
import os
import select
import signal
import socket
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import h11
import httpx

REPO = Path(__file__).resolve().parent.parent
# bench/ledger.py would shadow the ledger package the client imports: take bench/ off the path
# and load attack_harness.py by file (registered in sys.modules, so it can be imported by name)
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != REPO / "bench"]
sys.path.insert(0, str(REPO / "tests"))
_spec = importlib.util.spec_from_file_location("attack_harness",
                                               REPO / "bench" / "attack_harness.py")
assert _spec is not None and _spec.loader is not None
_harness = importlib.util.module_from_spec(_spec)
sys.modules["attack_harness"] = _harness
_spec.loader.exec_module(_harness)

from attack_harness import (  # noqa: E402
    ATTACK_TIMEOUT,
    CHUNK,
    DECLARED,
    POLL_INTERVAL_S,
    HostileShards,
    Node,
    Poller,
    cpu_s,
    reset_peak,
    status_mib,
    stop,
    system_busy_s,
)
from libp2p.abc import IHost  # noqa: E402
from node_helpers import ClientThread, exchange  # noqa: E402

from client import Client  # noqa: E402
from crypto.identity import Identity  # noqa: E402
from models import Manifest, cid_of_bytes, cid_of_file, encrypt_model_dir, import_minilm  # noqa: E402
from node.store import ShardStore  # noqa: E402
from protocols import INFER  # noqa: E402
from protocols.transport import connect, full_addrs, peer_info  # noqa: E402
from protocols.wire import encode_frame, encode_varint  # noqa: E402
from registry.card import MAX_TTL_S, ServedShard, build_card  # noqa: E402

SENTENCE = "Encrypted activations travel between untrusted nodes."
FAKE_CID = "z" + "2" * 3_000_000        # 3 MB of base58btc: the old CID check was quadratic
BOMB_ITEMS = 16 * 1024 * 1024 - 16      # empty CBOR arrays in a 16 MiB frame
BIG_BODY = 70_000_000                   # bytes of the oversized /a2a body
SYBILS = 10
SYBIL_AHEAD_S = 30.0                    # issued in the future (within the 60 s clock skew)
REST_S = 2.0                            # /healthz polled at rest for the baseline
SETTLE_S = 0.5                          # pause after each attack (node CPU also read then)
WARMUP = 3
COLD_QUERIES = 2


def log(message: str) -> None:
    print(f"attacks: {message}", file=sys.stderr, flush=True)



async def _exchange(host: IHost, addr: str, payload: bytes) -> dict[str, Any] | None:
    return await exchange(host, addr, INFER, payload, timeout=ATTACK_TIMEOUT)


async def _connect(host: IHost, addr: str) -> None:
    await connect(host, peer_info(addr), 10)


async def _addrs(host: IHost) -> list[str]:
    return full_addrs(host)


# -- attack payloads and senders --------------------------------------------------------------

def a2a_body(shard: str) -> bytes:
    data = {"veilnet": "infer/1", "shard": shard, "inputs": {}}
    return json.dumps({"jsonrpc": "2.0", "id": 1, "method": "message/send", "params": {
        "message": {"role": "user", "messageId": "m1",
                    "parts": [{"kind": "data", "data": data}]}}}).encode()


def cbor_bomb() -> bytes:
    body = b"\xa1\x61a\x9a" + BOMB_ITEMS.to_bytes(4, "big") + b"\x80" * BOMB_ITEMS  # {"a": [[]..]}
    return encode_varint(len(body)) + body


def control_frame(size: int) -> bytes:
    """Not an attack: a well-formed frame of about ``size`` bytes (one byte string, for a shard
    the node does not hold), to show what moving that many bytes over libp2p costs."""
    unknown = cid_of_bytes(b"a shard no node holds")
    probe = len(encode_frame({"v": 1, "id": "control", "shard": unknown, "inputs": {"x": {
        "dtype": "uint8", "shape": [0], "data": b""}}}))
    n = size - probe - 8
    return encode_frame({"v": 1, "id": "control", "shard": unknown, "inputs": {"x": {
        "dtype": "uint8", "shape": [n], "data": bytes(n)}}})


def frame_answer(answer: dict[str, Any] | None) -> str:
    if answer is None:
        return "stream closed without an answer"
    error = answer.get("error") or {}
    return f"error frame {error.get('code')}: {str(error.get('message'))[:120]}"


def post_a2a(http: str, body: bytes) -> str:
    r = httpx.post(http + "/a2a", content=body, timeout=ATTACK_TIMEOUT,
                   headers={"Content-Type": "application/json"})
    error = r.json().get("error") or {}
    code = ((error.get("data") or {}).get("veilnet") or {}).get("code")
    return (f"HTTP {r.status_code}, JSON-RPC error {error.get('code')} ({code}): "
            f"{str(error.get('message'))[:100]}; {len(r.content)} bytes")


def upload(http: str, path: str, total: int, chunked: bool) -> str:
    """POST ``total`` bytes over a raw HTTP/1.1 connection (Content-Length, or chunked), reading
    the answer while sending, as tests/network/test_hardening_inputs.py does; stops sending once the
    node has answered."""
    url = urlsplit(http)
    assert url.hostname is not None and url.port is not None
    conn = h11.Connection(h11.CLIENT)
    headers = [("Host", url.netloc), ("Content-Type", "application/json"),
               ("Transfer-Encoding", "chunked") if chunked else ("Content-Length", str(total))]
    out = conn.send(h11.Request(method="POST", target=path, headers=headers)) or b""
    block = b"x" * CHUNK
    sent, status, body = 0, None, bytearray()
    deadline = time.monotonic() + ATTACK_TIMEOUT
    with socket.create_connection((url.hostname, url.port), timeout=10) as sock:
        sock.setblocking(False)
        sending = True
        while time.monotonic() < deadline:
            if sending and not out and sent < total:
                n = min(CHUNK, total - sent)
                out = conn.send(h11.Data(data=block[:n])) or b""
                sent += n
                if sent == total and chunked:
                    out += conn.send(h11.EndOfMessage()) or b""
            readable, writable, _ = select.select([sock], [sock] if sending and out else [],
                                                  [], 0.5)
            if writable:
                try:
                    out = out[sock.send(out):]
                except OSError:  # the node answered and closed
                    sending = False
            if not readable:
                continue
            try:
                data = sock.recv(1 << 16)
            except ConnectionResetError:
                data = b""
            conn.receive_data(data)
            while (event := conn.next_event()) is not h11.NEED_DATA:
                if isinstance(event, h11.Response):
                    status, sending = event.status_code, False
                elif isinstance(event, h11.Data):
                    body += event.data
                elif isinstance(event, h11.EndOfMessage | h11.ConnectionClosed):
                    detail = json.loads(body).get("detail") if body else None
                    reason = detail.get("reason") if isinstance(detail, dict) else detail
                    return f"HTTP {status} ({reason}) after {sent} of {total} bytes sent"
            if not data:
                return f"connection closed without an answer after {sent} bytes"
    raise RuntimeError(f"no answer within {ATTACK_TIMEOUT} s")


def post_fetch(node: Node, body: dict[str, Any], token: bool) -> str:
    headers = {}
    if token:
        headers["Authorization"] = "Bearer " + (node.data_dir / "api-token").read_text().strip()
    r = httpx.post(node.http + "/v1/shards/fetch", json=body, headers=headers,
                   timeout=ATTACK_TIMEOUT)
    return f"HTTP {r.status_code}: {str(r.json().get('detail'))[:200]}"


# -- measurement ------------------------------------------------------------------------------

def run_once(node: Node, poller: Poller, attack: Callable[[], Any]) -> dict[str, Any]:
    """One attack run: wall time to the answer, node CPU, RSS, worst /healthz latency."""
    pid = node.pid
    peak_reset = reset_peak(pid)
    rss_before, cpu_before = status_mib(pid, "VmRSS"), cpu_s(pid)
    poller.start(node.http)
    started = time.perf_counter()
    error = None
    try:
        answer = attack()
    except Exception as exc:  # recorded, the run goes on: the JSON says what failed
        answer, error = None, f"{type(exc).__name__}: {exc}"[:300]
    wall = time.perf_counter() - started
    cpu_after, rss_after, peak = cpu_s(pid), status_mib(pid, "VmRSS"), status_mib(pid, "VmHWM")
    health = poller.stop()
    time.sleep(SETTLE_S)
    out = {"wall_s": round(wall, 4), "node_cpu_s": round(cpu_after - cpu_before, 3),
           "node_cpu_s_incl_settle": round(cpu_s(pid) - cpu_before, 3),
           "rss_before_mib": rss_before, "rss_after_mib": rss_after, "rss_peak_mib": peak,
           "rss_settled_mib": status_mib(pid, "VmRSS"),
           "peak_reset": peak_reset, "healthz_worst_ms": health["max_ms"],
           "healthz_median_ms": health["median_ms"], "healthz_probes": health["probes"],
           "healthz_failures": health["failures"], "answer": answer, "node_alive": node.alive()}
    if error:
        out["error"] = error
    return out


def summarize(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """Medians over the runs of an attack; memory as first before, last after, highest peak."""
    def med(key: str) -> float:
        return round(statistics.median(r[key] for r in runs), 4)

    out: dict[str, Any] = {
        "runs": len(runs), "wall_s": med("wall_s"), "wall_s_max": max(r["wall_s"] for r in runs),
        "node_cpu_s": med("node_cpu_s"), "node_cpu_s_max": max(r["node_cpu_s"] for r in runs),
        "node_cpu_s_incl_settle": med("node_cpu_s_incl_settle"),
        "rss_before_mib": runs[0]["rss_before_mib"], "rss_after_mib": runs[-1]["rss_after_mib"],
        "rss_settled_mib": runs[-1]["rss_settled_mib"],
        "rss_growth_over_runs_mib": round(runs[-1]["rss_settled_mib"]
                                          - runs[0]["rss_before_mib"], 1),
        "rss_peak_mib": max(r["rss_peak_mib"] for r in runs),
        "rss_peak_growth_mib": round(max(r["rss_peak_mib"] - r["rss_before_mib"]
                                         for r in runs), 1),
        "healthz_worst_ms": max(r["healthz_worst_ms"] for r in runs),
        "healthz_probes": sum(r["healthz_probes"] for r in runs),
        "healthz_failures": sum(r["healthz_failures"] for r in runs),
        "answer": runs[-1]["answer"],
        "same_answer_every_run": len({r["answer"] for r in runs}) == 1,
        "node_alive": all(r["node_alive"] for r in runs),
        "wall_s_runs": [r["wall_s"] for r in runs],
    }
    errors = [r["error"] for r in runs if "error" in r]
    if errors:
        out["errors"] = errors
    return out


def attack(name: str, node: Node, poller: Poller, fn: Callable[[], Any], reps: int,
           ) -> dict[str, Any]:
    runs = []
    for rep in range(reps):
        runs.append(run_once(node, poller, fn))
        r = runs[-1]
        log(f"{name} {rep + 1}/{reps}: {r['wall_s']:.3f} s, node CPU {r['node_cpu_s']:.2f} s, "
            f"RSS {r['rss_before_mib']} -> {r['rss_after_mib']} MiB (peak {r['rss_peak_mib']}), "
            f"worst /healthz {r['healthz_worst_ms']} ms; {r.get('error') or r['answer']}")
    return summarize(runs)


def query_baseline(node: Node, poller: Poller, client: Client, queries: int) -> dict[str, Any]:
    """Warm ``embed`` of one sentence: wall times, client-reported hop latency, node CPU."""
    for _ in range(WARMUP):
        client.embed([SENTENCE])
    walls, hops = [], []
    cpu_before = cpu_s(node.pid)
    for _ in range(queries):
        started = time.perf_counter()
        result = client.embed([SENTENCE])
        walls.append((time.perf_counter() - started) * 1e3)
        hops.append(sum(h.latency_ms for h in result.hops))
        if {h.peer_id for h in result.hops} != {node.peer_id} or len(result.hops) != 1:
            raise RuntimeError(f"expected one hop answered by the node, got {result.hops}")
    cpu = cpu_s(node.pid) - cpu_before
    return {"queries": queries, "median_ms": round(statistics.median(walls), 2),
            "min_ms": round(min(walls), 2), "max_ms": round(max(walls), 2),
            "hop_latency_ms_client_reported": round(statistics.median(hops), 2),
            "node_cpu_ms_per_query": round(cpu / queries * 1e3, 2)}


def cold_query(node: Node, deployment: Path) -> tuple[float, Any]:
    started = time.perf_counter()
    with Client([node.addr], deployment, verify="none", ledger=False) as client:
        result = client.embed([SENTENCE])
    return time.perf_counter() - started, result


def sybil_cards(deployment: Path, port: int) -> list[dict[str, Any]]:
    manifest = Manifest.load(deployment)
    cid = cid_of_file(deployment / "manifest.json")
    shards = [ServedShard(cid, manifest.name, s.cid, s.index, manifest.encryption)
              for s in manifest.node_shards]
    cards = []
    for _ in range(SYBILS):
        identity = Identity.generate()
        cards.append(build_card(identity, a2a_url=f"http://127.0.0.1:{port}/a2a",
                                multiaddrs=[f"/ip4/127.0.0.1/tcp/{port}/p2p/{identity.peer_id}"],
                                shards=shards, now=time.time() + SYBIL_AHEAD_S, ttl=MAX_TTL_S))
    return cards


def sybil_attack(node: Node, poller: Poller, deployment: Path, baseline: Any,
                 ) -> dict[str, Any]:
    """POST the Sybil cards, then a cold client query; the poller runs throughout."""
    with socket.socket() as silent:  # completes TCP handshakes (the backlog), never answers
        silent.bind(("127.0.0.1", 0))
        silent.listen(256)
        cards = sybil_cards(deployment, silent.getsockname()[1])
        facts: dict[str, Any] = {}

        def run() -> str:
            started = time.perf_counter()
            with httpx.Client(timeout=10) as http:
                answers = [http.post(node.http + "/v1/agents", json=c) for c in cards]
            facts["post_s"] = round(time.perf_counter() - started, 4)
            facts["post_answers"] = sorted({f"{a.status_code} {a.json().get('status')}"
                                            for a in answers})
            took, result = cold_query(node, deployment)
            facts["query_s"] = round(took, 4)
            facts["query_answered_by_node"] = [h.peer_id for h in result.hops] == [node.peer_id]
            facts["query_max_abs_diff_vs_baseline"] = float(
                abs(result.embeddings - baseline).max())
            return f"{facts['post_answers']}; query answered in {took:.2f} s"

        out = summarize([run_once(node, poller, run)])
    out.update(facts)
    log(f"sybil_cards: POSTs {facts.get('post_s')} s {facts.get('post_answers')}, query "
        f"{facts.get('query_s')} s, worst /healthz {out['healthz_worst_ms']} ms")
    return out


# -- main -------------------------------------------------------------------------------------

def prepare(root: Path) -> tuple[Path, Path]:
    """MiniLM with one node shard, encrypted twice: T/deploy (the node's) and T/other (a
    deployment the node does not hold, which the hostile peer offers)."""
    model, deploy, other = root / "model", root / "deploy", root / "other"
    log(f"importing all-MiniLM-L6-v2 into {model} (1 node shard)")
    import_minilm(model, node_shards=1)
    log("encrypting it twice (the node's deployment, and one the hostile peer offers)")
    encrypt_model_dir(model, deploy, seed=20261201)
    encrypt_model_dir(model, other, seed=20261202)
    return deploy, other


def _sigterm(signum: int, frame: Any) -> None:
    raise SystemExit(128 + signum)  # runs the finally blocks that stop the node


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--reps", type=int, default=5, help="runs of attacks 1-5 (default 5)")
    parser.add_argument("--queries", type=int, default=15,
                        help="timed baseline queries (default 15)")
    parser.add_argument("--dir", type=Path, help="an empty or new work directory, kept "
                        "afterwards with the node's log (default: a temporary one)")
    args = parser.parse_args(argv)
    if not 1 <= args.reps <= 20 or not 3 <= args.queries <= 200:
        parser.error("--reps must be 1-20 and --queries 3-200")
    if args.dir is not None and args.dir.exists() and any(args.dir.iterdir()):
        parser.error(f"--dir {args.dir} is not empty")
    signal.signal(signal.SIGTERM, _sigterm)
    began, load_start = time.monotonic(), os.getloadavg()[0]
    busy_start, own_start = system_busy_s(), sum(os.times()[:2])
    date = datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
    node: Node | None = None
    poller: Poller | None = None
    threads: list[ClientThread] = []
    client: Client | None = None
    with tempfile.TemporaryDirectory(prefix="veilnet-attacks-") as tmp:
        root = (args.dir or Path(tmp)).absolute()
        root.mkdir(parents=True, exist_ok=True)
        poller_log = open(root / "poller.log", "ab")  # noqa: SIM115 (closed in the finally)
        try:
            poller = Poller(poller_log)  # starts (imports) while MiniLM is imported
            deploy, other = prepare(root)
            data_dir = root / "D"
            deployment, _ = ShardStore(data_dir).add_deployment(deploy)
            node = Node(data_dir)
            node.wait_ready()
            log(f"node pid {node.pid} ready at {node.http}, {node.addr}")

            # -- baseline --
            cpu_before = cpu_s(node.pid)
            poller.start(node.http)
            time.sleep(REST_S)
            rest = poller.stop()
            rest["node_cpu_ms_per_probe"] = round((cpu_s(node.pid) - cpu_before) * 1e3
                                                  / rest["probes"], 2)  # with idle work
            client = Client([node.addr], deploy, verify="none", ledger=False)
            base = query_baseline(node, poller, client, args.queries)
            expected = client.embed([SENTENCE]).embeddings
            colds = [cold_query(node, deploy)[0] for _ in range(COLD_QUERIES)]
            baseline = {"query_one_hop": base, "healthz_at_rest": rest,
                        "cold_query_s": round(statistics.median(colds), 4),
                        "cold_query_s_runs": [round(c, 4) for c in colds],
                        "node_rss_mib": status_mib(node.pid, "VmRSS")}
            log(f"baseline: query {base['median_ms']} ms (one hop), /healthz at rest "
                f"{rest['median_ms']} ms median, cold query {baseline['cold_query_s']} s")

            # -- attacks --
            hostile_server = HostileShards()
            other_manifest = (other / "manifest.json").read_bytes()
            other_cid = cid_of_file(other / "manifest.json")
            hostile_server.manifests[other_cid] = other_manifest
            attacker = ClientThread().start()
            threads.append(attacker)
            hostile = ClientThread(services=hostile_server.serve).start()
            threads.append(hostile)
            attacker.run(_connect, node.addr)  # the dial is not part of the attacks
            hostile_addr = hostile.run(_addrs)[0]
            fetch_body = {"deployment": other_cid,
                          "shards": [Manifest.load(other).node_shards[0].cid],
                          "peer": hostile_addr}
            a2a_cid = a2a_body(FAKE_CID)
            infer_cid = encode_frame({"v": 1, "id": "cid", "shard": FAKE_CID, "inputs": {}})
            bomb = cbor_bomb()
            control = control_frame(len(bomb))
            http, addr = node.http, node.addr
            plan: list[tuple[str, Callable[[], Any]]] = [
                ("a2a_fake_cid", lambda: post_a2a(http, a2a_cid)),
                ("infer_fake_shard",
                 lambda: frame_answer(attacker.run(_exchange, addr, infer_cid))),
                ("cbor_bomb", lambda: frame_answer(attacker.run(_exchange, addr, bomb))),
                ("control_16mib_bytes_frame",
                 lambda: frame_answer(attacker.run(_exchange, addr, control))),
                ("a2a_70mb_content_length", lambda: upload(http, "/a2a", BIG_BODY, False)),
                ("a2a_70mb_chunked", lambda: upload(http, "/a2a", BIG_BODY, True)),
                ("fetch_huge_shard_with_token", lambda: post_fetch(node, fetch_body, True)),
                ("fetch_without_token", lambda: post_fetch(node, fetch_body, False)),
            ]
            attacks: dict[str, Any] = {}
            for name, fn in plan:
                seen = len(hostile_server.requests)
                attacks[name] = attack(name, node, poller, fn, args.reps)
                if name.startswith("fetch"):
                    attacks[name]["hostile_peer_requests"] = len(hostile_server.requests) - seen
            attacks["fetch_huge_shard_with_token"]["hostile_chunks_sent_total"] = \
                hostile_server.chunks_sent
            attacks["sybil_cards"] = sybil_attack(node, poller, deploy, expected)

            # -- after: the warm client again --
            after = query_baseline(node, poller, client, args.queries)
            log(f"after the attacks: query {after['median_ms']} ms")
            final_rss = status_mib(node.pid, "VmRSS")
            node_cpu_total = cpu_s(node.pid)
            healthz_ok = httpx.get(node.http + "/healthz", timeout=10).json()["status"] == "ok"
        finally:
            if client is not None:
                client.close()
            for thread in threads:
                thread.close()
            poller_cpu = cpu_s(poller.proc.pid) if poller and poller.proc.poll() is None else 0.0
            if poller is not None:
                poller.close()
            node_exit = stop(node.proc) if node is not None else None
            poller_log.close()
    wall = time.monotonic() - began
    other_cores = (system_busy_s() - busy_start - (sum(os.times()[:2]) - own_start)
                   - node_cpu_total - poller_cpu) / wall

    hop_s = base["median_ms"] / 1e3
    ratios = {}
    for name, a in attacks.items():
        ratios[name] = {
            "wall_over_query": round(a["wall_s"] / hop_s, 2),
            "node_cpu_over_query_cpu": round(a["node_cpu_s"] * 1e3
                                             / max(base["node_cpu_ms_per_query"], 0.01), 2),
            "healthz_worst_over_rest_median": round(a["healthz_worst_ms"] / rest["median_ms"], 2),
        }
    syb = attacks["sybil_cards"]
    if "query_s" in syb:
        ratios["sybil_cards"]["query_over_query"] = round(syb["query_s"] / hop_s, 2)
        ratios["sybil_cards"]["query_over_cold_query"] = round(syb["query_s"]
                                                               / baseline["cold_query_s"], 2)
    print(json.dumps({
        "benchmark": "attacks",
        "setup": {"date_utc": date, "cpus": os.cpu_count(), "reps": args.reps,
                  "node_command": "python -m node node start --data-dir D --listen "
                                  "/ip4/127.0.0.1/tcp/0 --http 127.0.0.1:0",
                  "model": "all-MiniLM-L6-v2, 1 node shard, ee-encoder/1", "deployment": deployment,
                  "fake_cid_chars": len(FAKE_CID), "bomb_frame_bytes": len(bomb),
                  "big_body_bytes": BIG_BODY, "declared_shard_bytes": DECLARED,
                  "sybil_cards": SYBILS, "sybil_ttl_s": MAX_TTL_S,
                  "healthz_poll_interval_ms": POLL_INTERVAL_S * 1e3,
                  "loadavg_1min_start": round(load_start, 2),
                  "loadavg_1min_end": round(os.getloadavg()[0], 2),
                  "other_process_load_cores": round(max(other_cores, 0.0), 2),
                  "wall_s": round(wall, 1)},
        "baseline": baseline,
        "attacks": attacks,
        "ratios": ratios,
        "after": {"query_one_hop": after,
                  "query_over_baseline": round(after["median_ms"] / base["median_ms"], 3),
                  "healthz_ok": healthz_ok, "node_rss_mib": final_rss,
                  "node_cpu_s_total": round(node_cpu_total, 2), "node_exit_code": node_exit},
    }, indent=2))
    failed = [n for n, a in attacks.items() if a.get("errors") or not a["node_alive"]]
    if failed:
        log(f"attacks that failed or killed the node: {failed}")
    return 1 if failed or not healthz_ok else 0


if __name__ == "__main__":
    sys.exit(main())
