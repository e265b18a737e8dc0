"""Discovery benchmark: how long a local testnet takes to learn itself through signed cards.

Each run starts N node processes (default 5) where nodes 1..N-1 are given only node 0's address,
and measures, from the moment nodes 1..N-1 are spawned:

- ``ready_s``: until every node has written node.json and answers /healthz (process start,
  onnxruntime sessions, libp2p host): the baseline, measured in the same run;
- ``discovery_s``: until every node's card index (/v1/agents) holds a current card of every node
  (right shards, this run's addresses).

Then it SIGKILLs one node, restarts it (new ports, same key) and measures ``rejoin_s``: from its
spawn until every node holds its new card and it holds everyone's. Prints one JSON object with
per-run figures, medians, the ratio discovery/ready, and whether the 10 s target was met.
Progress goes to stderr.

    .venv/bin/python bench/discovery.py [--nodes 5] [--runs 5] [--dir DIR]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "scripts"))

from localnet import Testnet  # noqa: E402

TARGET_S = 10.0


def log(message: str) -> None:
    print(f"discovery: {message}", file=sys.stderr, flush=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--nodes", type=int, default=5, help="nodes per testnet (default 5)")
    parser.add_argument("--runs", type=int, default=5, help="testnets to start (default 5)")
    parser.add_argument("--dir", type=Path, help="testnet directory (default: a temporary one; "
                        "MiniLM is imported there once)")
    args = parser.parse_args(argv)
    if args.nodes < 2 or args.runs < 1:
        parser.error("--nodes must be at least 2 and --runs at least 1")
    with tempfile.TemporaryDirectory(prefix="veilnet-bench-") as tmp:
        root = args.dir or Path(tmp)
        ready, discovery, rejoin = [], [], []
        for run in range(args.runs):
            with Testnet(root, nodes=args.nodes, replicas=2, node_args=["--threads", "1"],
                         log=log) as net:
                assert net.ready_s is not None and net.discovery_s is not None
                ready.append(net.ready_s)
                discovery.append(net.discovery_s)
                victim = args.nodes - 1
                net.stop_node(victim, kill=True)
                net.start_node(victim)
                assert net.discovery_s is not None
                rejoin.append(net.discovery_s)
            log(f"run {run + 1}/{args.runs}: ready {ready[-1]:.2f} s, discovery "
                f"{discovery[-1]:.2f} s, rejoin {rejoin[-1]:.2f} s")
    def p50(values: list[float]) -> float:
        return round(statistics.median(values), 3)

    print(json.dumps({
        "nodes": args.nodes, "runs": args.runs, "bootstrap_addresses_per_node": 1,
        "ready_s": ready, "discovery_s": discovery, "rejoin_s": rejoin,
        "ready_p50_s": p50(ready), "discovery_p50_s": p50(discovery),
        "discovery_max_s": max(discovery), "rejoin_p50_s": p50(rejoin),
        "discovery_over_ready_p50": round(p50(discovery) / p50(ready), 3),
        "target_s": TARGET_S, "target_met": max(discovery) < TARGET_S,
    }))
    return 0


if __name__ == "__main__":
    sys.exit(main())
