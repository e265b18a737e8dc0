"""Many nodes on one machine: a MiniLM testnet of ``--nodes`` processes (``--threads 1``, every
node shard on 3 nodes), measured as it forms, idles and loses nodes.

Prints one JSON object:

- ``discovery_s``: from spawning nodes 1..N-1 until every node had indexed every node's card;
- the announce interval the nodes chose (node/discovery.py: ``max(10 s, cards / card_rate)``,
  read from the validity of their cards, which is three intervals);
- per node and second (measured over ``--intervals`` of those intervals, at least 30 s, while
  idle): cards received (``veilnet_cards_received_total``, every outcome), cards published,
  CPU, and the bytes the process read and wrote (``/proc/<pid>/io`` rchar/wchar: gossip,
  hellos and the card index's SQLite writes together, an upper bound on gossip bytes);
- the card index per node: cards held (``veilnet_cards_indexed``) and the size of
  ``cards.sqlite``; RSS per node (min, median, max);
- one embedding query's latency (median of 5, a warm SDK client);
- after SIGKILLing ``--kill`` nodes: seconds until no running node's index lists any of them;
- the per-node cost model of docs/reliability.md evaluated at 1,000 and 10,000 nodes from
  these figures.

    .venv/bin/python bench/scale.py [--nodes 30] [--kill 5] [--intervals 3] [--card-rate R]
                                    [--dir DIR]

``--card-rate`` (node ``--card-rate``, default 2 cards/s) shows the bound at a size one machine
holds: with 30 nodes and ``--card-rate 0.5`` every node announces every 60 s instead of 10 s,
as each would in a network of 300 nodes at the default rate.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import trio

REPO = Path(__file__).resolve().parent.parent
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != REPO / "bench"]
sys.path.insert(0, str(REPO / "scripts"))
from localnet import (  # noqa: E402
    DEFAULT_DIR,
    NodeInfo,
    Testnet,
    metric_samples,
    prepare_model,
    rss_mb,
)

from client import AsyncClient  # noqa: E402
from node.discovery import CARD_RATE, announce_interval  # noqa: E402
from registry.card import card_ttl  # noqa: E402

TEXTS = ["Thirty nodes on one machine.", "How far does this scale?"]


def log(message: str) -> None:
    print(f"scale: {message}", file=sys.stderr, flush=True)


def metrics(node: NodeInfo) -> dict[str, float]:
    """The node's /metrics samples we use, summed over labels."""
    return {name: sum(v for _, v in metric_samples(node, name))
            for name in ("veilnet_cards_received_total", "veilnet_cards_published_total",
                         "veilnet_cards_indexed")}


def cpu_s(pid: int | None) -> float:
    """User + system CPU seconds of process ``pid`` so far (/proc/<pid>/stat)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def proc_io(pid: int | None) -> tuple[int, int]:
    fields = dict(line.split(": ") for line in Path(f"/proc/{pid}/io").read_text().splitlines())
    return int(fields["rchar"]), int(fields["wchar"])


def spread(values: list[float], digits: int = 1) -> dict[str, float]:
    return {"min": round(min(values), digits), "median": round(statistics.median(values), digits),
            "max": round(max(values), digits)}


def card_interval(node: NodeInfo) -> float:
    """The announce interval ``node`` chose: a third of its own card's validity."""
    from registry.card import extension_params

    with urllib.request.urlopen(f"{node.http}/.well-known/agent-card.json", timeout=5) as r:
        params = extension_params(json.load(r))
    return (params["expiresAt"] - params["issuedAt"]) / 3


def lists(node: NodeInfo, peer_id: str) -> bool:
    """Whether ``node``'s index serves ``peer_id``'s card (its ANP document is found)."""
    try:
        with urllib.request.urlopen(f"{node.http}/agents/{peer_id}/did.json", timeout=5):
            return True
    except urllib.error.HTTPError as exc:
        if exc.code == 404:
            return False
        raise


async def query_latency(net: Testnet, n: int = 5) -> float:
    async with AsyncClient([net.bootstrap], net.deployment, verify="full",
                           ledger=False) as client:
        await client.embed(TEXTS)
        seconds = []
        for _ in range(n):
            started = time.perf_counter()
            await client.embed(TEXTS)
            seconds.append(time.perf_counter() - started)
    return statistics.median(seconds)


def model_at(n: int, received_share: float, read_kib_per_card: float, per_card_ms: float,
             card_bytes: float) -> dict[str, float]:
    """Per-node cost with ``n`` nodes at the default card rate. Measured inputs:
    ``received_share``, cards received per other node and announce interval (1.0 when gossip
    delivers each card once); KiB read and CPU ms per card received; bytes per indexed card."""
    interval = announce_interval(10.0, n - 1, CARD_RATE)
    per_s = received_share * (n - 1) / interval
    return {"cards_held": n - 1, "index_mib": round((n - 1) * card_bytes / 2**20, 1),
            "announce_interval_s": round(interval, 1), "card_ttl_s": card_ttl(interval),
            "cards_received_per_s": round(per_s, 2),
            "read_kib_per_s": round(per_s * read_kib_per_card, 1),
            "cpu_share_of_one_core": round(per_s * per_card_ms / 1e3, 3)}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--nodes", type=int, default=30)
    parser.add_argument("--kill", type=int, default=5)
    parser.add_argument("--intervals", type=int, default=3,
                        help="announce intervals to measure idle traffic over (at least 30 s)")
    parser.add_argument("--card-rate", type=float, default=2.0,
                        help="the nodes' --card-rate: cards/s each aims to receive (default 2)")
    parser.add_argument("--dir", type=Path, help="testnet directory (default: temporary)")
    args = parser.parse_args()
    model, deploy = prepare_model(REPO / DEFAULT_DIR, None, log)
    with tempfile.TemporaryDirectory(prefix="veilnet-scale-") as tmp, \
            Testnet(args.dir or Path(tmp), nodes=args.nodes, replicas=3, deployment=deploy,
                    model=model, node_args=["--threads", "1", "--card-rate", str(args.card_rate)],
                    timeout=600.0, log=log) as net:
        log(f"{args.nodes} nodes up; every card everywhere after {net.discovery_s} s")
        time.sleep(10.0)  # past the start-up burst
        time.sleep(max(card_interval(n) for n in net.nodes))  # every node announced since
        intervals = [card_interval(n) for n in net.nodes]
        interval = statistics.median(intervals)
        window = max(30.0, args.intervals * interval)
        log(f"announce interval {interval:g} s; measuring idle traffic for {window:g} s")
        before = {n.index: (metrics(n), proc_io(n.pid), cpu_s(n.pid)) for n in net.nodes}
        started = time.monotonic()
        time.sleep(window)
        elapsed_intervals = (time.monotonic() - started) / interval
        after = {n.index: (metrics(n), proc_io(n.pid), cpu_s(n.pid)) for n in net.nodes}
        received, published, read_kb, written_kb, cpu_ms = [], [], [], [], []
        for n in net.nodes:
            (m0, io0, c0), (m1, io1, c1) = before[n.index], after[n.index]
            cpu_ms.append((c1 - c0) * 1e3 / elapsed_intervals)
            received.append((m1["veilnet_cards_received_total"]
                             - m0["veilnet_cards_received_total"]) / elapsed_intervals)
            published.append((m1.get("veilnet_cards_published_total", 0)
                               - m0.get("veilnet_cards_published_total", 0)) / elapsed_intervals)
            read_kb.append((io1[0] - io0[0]) / 1024 / elapsed_intervals)
            written_kb.append((io1[1] - io0[1]) / 1024 / elapsed_intervals)
        held = [after[n.index][0]["veilnet_cards_indexed"] for n in net.nodes]
        index_kb = [(n.data_dir / "cards.sqlite").stat().st_size / 1024 for n in net.nodes]
        rss = [rss_mb(n.pid) or 0.0 for n in net.nodes]
        log("idle traffic measured; one query")
        latency = trio.run(query_latency, net)
        victims = net.nodes[-args.kill:]
        gone = [v.peer_id for v in victims]
        log(f"killing nodes {[v.index for v in victims]}")
        for v in victims:
            net.stop_node(v.index, kill=True)
        killed_at = time.monotonic()
        survivors = [n for n in net.nodes if n.alive]
        while any(lists(n, p) for n in survivors for p in gone if p):
            if time.monotonic() - killed_at > 300:
                raise SystemExit("scale: killed nodes still listed after 300 s")
            time.sleep(1.0)
        dropped_s = time.monotonic() - killed_at
    card_bytes = 1024 * statistics.median(index_kb) / max(1.0, statistics.median(held))
    per_interval = statistics.median(received)
    per_card_ms = statistics.median(cpu_ms) / max(1.0, per_interval)
    result: dict[str, Any] = {
        "bench": "scale", "nodes": args.nodes, "card_rate": args.card_rate,
        "announce_interval_s": spread(intervals), "card_ttl_s": round(3 * interval, 1),
        "cards_received_per_s": round(per_interval / interval, 2),
        # the baseline: the same cards per announcement round, every 10 s (the nodes' base
        # interval, as every node announced before the gossip was bounded)
        "cards_received_per_s_at_10s_interval": round(per_interval / 10.0, 2),
        "ratio_to_10s_interval": round(10.0 / interval, 3),
        "discovery_s": net.discovery_s, "ready_s": net.ready_s,
        "per_node_per_interval": {"cards_received": spread(received),
                                  "cards_published": spread(published, 2),
                                  "read_kib": spread(read_kb), "written_kib": spread(written_kb),
                                  "cpu_ms": spread(cpu_ms)},
        "cpu_ms_per_card_received": round(statistics.median(cpu_ms) / max(1.0, per_interval), 2),
        "cards_held": spread(held, 0), "cards_sqlite_kib": spread(index_kb),
        "rss_mb": spread(rss), "rss_mb_total": round(sum(rss)),
        "query_latency_s": round(latency, 3),
        "killed": args.kill, "killed_dropped_from_every_index_s": round(dropped_s, 1),
        # the model of docs/reliability.md: each node receives every other node's card once per
        # announce interval (gossipsub delivers each message once), holds every card, and at
        # the default card rate (2/s) announces every max(10 s, N / 2) s, at most 1200 s
        "model": {str(n): model_at(n, per_interval / (args.nodes - 1),
                                   statistics.median(read_kb) / max(1.0, per_interval),
                                   per_card_ms, card_bytes)
                  for n in (1000, 10000)},
    }
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
