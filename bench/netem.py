"""Embedding latency over links that are not loopback: a 3-node MiniLM testnet (one node shard
per node, EE-encrypted) with every node and the client in its own network namespace, joined by
scripts/netem.py's userspace link emulator, at one-way delays of 0, 20 and 50 ms and losses of
0, 1 and 5 % on every host's egress (all 9 combinations, the same testnet retuned live).

Prints one JSON object: per condition the median embedding latency of N queries on a warm
client (connections and streams open) and of M cold ones (the first ``embed`` of a new client:
dials, first streams; and its open + embed + close: card lookup included), the ratio to the
0 ms / 0 % baseline measured in the same run, the median hop latencies, the round trips that
explain the extra time (extra ms / (2 x delay): per warm query, per cold query, per hop), and
the emulator's packet counts per query (forwarded, dropped, per (sender->receiver) pair).
Receipts are off (no ledger node): this measures the inference path. Progress goes to stderr.
Needs root and iproute2.

    .venv/bin/python bench/netem.py [--queries 10] [--cold 3] [--dir DIR] [--mtu 65000]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
# bench/ledger.py would shadow the ledger package the client imports: bench/ leaves the path
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != REPO / "bench"]
sys.path.insert(0, str(REPO / "scripts"))
sys.path.insert(0, str(REPO))

DELAYS_MS = (0, 20, 50)
LOSSES_PCT = (0, 1, 5)
TEXT = "Encrypted inference keeps activations private, query {}."


def log(message: str) -> None:
    print(f"netem: {message}", file=sys.stderr, flush=True)


# -- the worker: runs in the client's namespace, one JSON job per stdin line ------------------


def worker(bootstrap: str, deployment: str) -> None:
    import trio

    from client import AsyncClient
    from protocols.transport import quiet_libraries

    quiet_libraries()

    async def embed(client: AsyncClient, i: int) -> dict[str, Any]:
        start = time.perf_counter()
        result = await client.embed([TEXT.format(i)])
        return {"ms": (time.perf_counter() - start) * 1000,
                "hops": [h.latency_ms for h in result.hops],
                "retries": sum(h.attempts - 1 for h in result.hops)}

    async def main() -> None:
        count = 0
        async with AsyncClient([bootstrap], deployment, verify="none", ledger=False) as warm:
            for line in sys.stdin:
                job = json.loads(line)
                out: dict[str, Any] = {"warm": [], "cold": []}
                await embed(warm, count)  # after a retune: one query to settle
                for _ in range(job["warm"]):
                    count += 1
                    out["warm"].append(await embed(warm, count))
                for _ in range(job["cold"]):
                    count += 1
                    start = time.perf_counter()
                    async with AsyncClient([bootstrap], deployment, verify="none",
                                           ledger=False) as cold:
                        one = await embed(cold, count)
                    one["open_ms"] = (time.perf_counter() - start) * 1000  # open+embed+close
                    out["cold"].append(one)
                print(json.dumps(out), flush=True)

    trio.run(main)


# -- the parent ---------------------------------------------------------------------------------


def median(values: list[float]) -> float:
    return round(statistics.median(values), 2) if values else float("nan")


def packets(before: dict[str, Any], after: dict[str, Any], queries: int) -> dict[str, Any]:
    pairs, client = {}, 0
    for pair, now in after.get("pairs", {}).items():
        was = before.get("pairs", {}).get(pair, {})
        n = now.get("packets", 0) - was.get("packets", 0)
        if n:
            pairs[pair] = round(n / queries, 1)
        if "client" in pair:
            client += n
    fwd = after.get("forwarded", 0) - before.get("forwarded", 0)
    drop = after.get("dropped", 0) - before.get("dropped", 0)
    return {"forwarded": fwd, "dropped": drop, "per_query": round(fwd / queries, 1),
            "dropped_per_query": round(drop / queries, 2),
            # the query's own packets (the rest is the nodes' gossip and announcements)
            "client_per_query": round(client / queries, 1), "per_pair_per_query": pairs}


def run(args: argparse.Namespace, root: Path) -> dict[str, Any]:
    from localnet import Testnet, prepare_model
    from netem import Links

    model, deployment = prepare_model(root, 3, log)
    hosts = ["n0", "n1", "n2", "client"]
    results: dict[str, Any] = {}
    with Links(root, hosts, "", seed=args.seed, mtu=args.mtu, log=log) as links, \
            Testnet(root, 3, 1, deployment=deployment, model=model, node_args=["--threads", "1"],
                    ledger_nodes=(), hosts=[links.address(h) for h in hosts[:3]],
                    launcher=lambda node, cmd: links.wrap(f"n{node.index}", cmd), log=log,
                    progress=log) as net:
        cmd = links.wrap("client", [sys.executable, str(Path(__file__).resolve()), "--worker",
                                    net.bootstrap, str(deployment)])
        proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
                                cwd=REPO)
        try:
            assert proc.stdin is not None and proc.stdout is not None
            for n, kind in ((args.queries, "warm"), (2, "cold")):  # warm-up, not measured
                proc.stdin.write(json.dumps({"warm": n if kind == "warm" else 0,
                                             "cold": n if kind == "cold" else 0}) + "\n")
                proc.stdin.flush()
                proc.stdout.readline()
            for delay in DELAYS_MS:
                for loss in LOSSES_PCT:
                    name = f"delay{delay}ms_loss{loss}pct"
                    links.set_netem(f"delay {delay}ms loss {loss}%")
                    for kind, n in (("warm", args.queries), ("cold", args.cold)):
                        before = links.stats()
                        proc.stdin.write(json.dumps({"warm": n if kind == "warm" else 0,
                                                     "cold": n if kind == "cold" else 0}) + "\n")
                        proc.stdin.flush()
                        line = proc.stdout.readline()
                        if not line:
                            raise RuntimeError("the client worker died (see stderr)")
                        runs = json.loads(line)[kind]
                        after = links.stats()
                        results.setdefault(name, {"delay_ms": delay, "loss_pct": loss})[kind] = {
                            "median_ms": median([r["ms"] for r in runs]),
                            **({"open_embed_close_median_ms": median([r["open_ms"] for r in runs])}
                               if kind == "cold" else {}),
                            "p90_ms": round(sorted(r["ms"] for r in runs)[
                                int(0.9 * (len(runs) - 1))], 2),
                            "hop_median_ms": [median([r["hops"][i] for r in runs])
                                              for i in range(len(runs[0]["hops"]))],
                            "retries": sum(r["retries"] for r in runs), "n": len(runs),
                            # packets per query include the one settling query before the warm
                            # runs (warm) or the client set-up and close (cold)
                            "packets": packets(before, after, n + (1 if kind == "warm" else 0))}
                    w, c = results[name]["warm"], results[name]["cold"]
                    log(f"{name}: warm {w['median_ms']} ms, cold {c['median_ms']} ms, "
                        f"{w['packets']['dropped']} + {c['packets']['dropped']} dropped")
        finally:
            if proc.stdin is not None:
                proc.stdin.close()
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        totals = links.stats()
    base = results["delay0ms_loss0pct"]
    for entry in results.values():
        rtt = 2 * entry["delay_ms"]
        for kind in ("warm", "cold"):
            e, b = entry[kind], base[kind]
            e["ratio_to_baseline"] = round(e["median_ms"] / b["median_ms"], 3)
            if rtt and entry["loss_pct"] == 0:
                e["round_trips"] = round((e["median_ms"] - b["median_ms"]) / rtt, 2)
                if kind == "cold":
                    e["open_embed_close_round_trips"] = round(
                        (e["open_embed_close_median_ms"] - b["open_embed_close_median_ms"])
                        / rtt, 2)
                e["hop_round_trips"] = [round((h - hb) / rtt, 2) for h, hb in
                                        zip(e["hop_median_ms"], b["hop_median_ms"], strict=True)]
    return {"bench": "netem", "nodes": 3, "node_shards": 3, "replicas": 1, "mtu": args.mtu,
            "queries_warm": args.queries, "queries_cold": args.cold, "seed": args.seed,
            "emulator": "userspace (scripts/netem.py): netem on every host's egress, so a round "
                        "trip between two hosts is 2 x delay",
            "cpus": os.cpu_count(), "loadavg_end": [round(x, 2) for x in os.getloadavg()],
            "conditions": results,
            "emulator_totals": {k: totals.get(k) for k in ("forwarded", "forwarded_bytes",
                                                            "dropped")}}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--queries", type=int, default=10, help="warm queries per condition")
    parser.add_argument("--cold", type=int, default=3, help="cold-client queries per condition")
    parser.add_argument("--dir", type=Path, help="testnet directory (default: a temporary one)")
    parser.add_argument("--mtu", type=int, default=65000, help="MTU of every link")
    parser.add_argument("--seed", type=int, default=1, help="seed of the emulator's loss")
    parser.add_argument("--worker", nargs=2, metavar=("BOOTSTRAP", "DEPLOYMENT"),
                        help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(*args.worker)
        return 0
    started = time.monotonic()
    root = Path(args.dir or tempfile.mkdtemp(prefix="veilnet-bench-netem-")).absolute()
    try:
        doc = run(args, root)
    finally:
        if args.dir is None:
            shutil.rmtree(root, ignore_errors=True)
    doc["wall_s"] = round(time.monotonic() - started, 1)
    print(json.dumps(doc, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
