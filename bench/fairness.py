"""Fair service under a flood: an honest client's embedding latency on a one-node testnet, alone
and while one other peer floods the same node with valid requests at full speed
(scripts/flood.py: 16 streams, each sending its next request as soon as the last is answered).

Prints one JSON object: the honest client's p50/p95 without and with the flood, their ratio
(target: p50 ratio <= 2, node/fair.py), what the flooder got (served, ``busy`` by reason) and
the node's veilnet_busy_total. The node runs with ``--capacity 1 --threads 1``, so every run
is a turn someone has to wait for. Progress goes to stderr.

    .venv/bin/python bench/fairness.py [--asks 30] [--dir DIR]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import trio

REPO = Path(__file__).resolve().parent.parent
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != REPO / "bench"]
sys.path.insert(0, str(REPO / "scripts"))
from flood import flooding  # noqa: E402
from localnet import Testnet, metric_samples  # noqa: E402

from client import AsyncClient  # noqa: E402

TARGET_P50_RATIO = 2.0
TEXTS = ["An honest question, asked now and then.", "It should not wait behind a flood."]


def log(message: str) -> None:
    print(f"fairness: {message}", file=sys.stderr, flush=True)


def pct(values: list[float]) -> dict[str, float]:
    a = np.asarray(values) * 1e3
    return {"p50_ms": round(float(np.percentile(a, 50)), 2),
            "p95_ms": round(float(np.percentile(a, 95)), 2), "n": len(values)}


async def honest(net: Testnet, asks: int) -> list[float]:
    async with AsyncClient([net.bootstrap], net.deployment, verify="none",
                           ledger=False) as client:
        await client.embed(TEXTS)  # warm: connection open, sessions loaded
        seconds = []
        for _ in range(asks):
            started = time.perf_counter()
            await client.embed(TEXTS)
            seconds.append(time.perf_counter() - started)
            await trio.sleep(0.02)
        return seconds


def busy_metric(net: Testnet) -> dict[str, float]:
    return {labels["reason"]: value
            for labels, value in metric_samples(net.nodes[0], "veilnet_busy_total")}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--asks", type=int, default=30, help="honest queries per phase (30)")
    parser.add_argument("--dir", type=Path, help="testnet directory (default: a temporary one)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="veilnet-fair-") as tmp, \
            Testnet(args.dir or Path(tmp), nodes=1, replicas=1,
                    node_args=["--threads", "1", "--capacity", "1"]) as net:
        log("unloaded")
        alone = trio.run(honest, net, args.asks)
        log("flooded")
        assert net.deployment is not None
        with flooding(net.bootstrap, net.deployment, seconds=8 + args.asks * 0.3) as finish:
            flooded = trio.run(honest, net, args.asks)
            try:
                flood = finish()
            except RuntimeError as exc:
                raise SystemExit(f"fairness: {exc}") from None
        busy = busy_metric(net)
    base, loaded = pct(alone), pct(flooded)
    ratio = loaded["p50_ms"] / base["p50_ms"]
    print(json.dumps({
        "bench": "fairness", "node": "--capacity 1 --threads 1, all 3 MiniLM node shards",
        "honest_unloaded": base, "honest_flooded": loaded,
        "p50_ratio": round(ratio, 2), "target_p50_ratio": TARGET_P50_RATIO,
        "meets_target": ratio <= TARGET_P50_RATIO,
        "flooder": flood, "node_busy_total": busy,
        "flooder_served_per_s": round(flood["answers"].get("ok", 0) / flood["seconds"], 1),
    }))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
