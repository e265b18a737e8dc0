"""Gateway benchmark: what ``veilnet gateway`` adds to an embedding query. A local testnet
(3 node processes, MiniLM, one node shard each, loopback) answers the same texts through the
SDK in this process (``Client.embed``, the baseline) and through a gateway process with the
official ``openai`` package, interleaved, 50 ms apart; both with ``--verify none`` and no
ledger so the figures hold the gateway's cost alone.

Prints one JSON object: p50/p95 latency of both at 1 and 8 texts, their ratio, and the largest
difference between the two answers. Progress goes to stderr.

    .venv/bin/python bench/gateway.py [--reps 30] [--dir DIR]
"""

from __future__ import annotations

import argparse
import json
import re
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import openai

REPO = Path(__file__).resolve().parent.parent
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != REPO / "bench"]
sys.path.insert(0, str(REPO / "scripts"))
from localnet import Testnet  # noqa: E402

from client import Client  # noqa: E402

TEXTS = ["A man is eating food.", "The gateway holds the key on this machine.",
         "Nodes compute on transformed activations.", "A cat sits on the mat.",
         "Rain is expected tomorrow afternoon.", "The ledger keeps signed receipts.",
         "Two nodes check each other's answers.", "Privacy needs measured claims."]
CASES = {"texts1": 1, "texts8": 8}


def log(message: str) -> None:
    print(f"gateway-bench: {message}", file=sys.stderr, flush=True)


def pct(values: list[float]) -> dict[str, float]:
    a = np.asarray(values)
    return {"p50": round(float(np.percentile(a, 50)), 2),
            "p95": round(float(np.percentile(a, 95)), 2), "n": len(values)}


def start_gateway(bootstrap: str, deployment: Path) -> tuple[subprocess.Popen[str], str]:
    proc = subprocess.Popen(
        [sys.executable, "-m", "node", "gateway", "--bootstrap", bootstrap, "--deployment",
         f"minilm={deployment}", "--listen", "127.0.0.1:0", "--verify", "none", "--no-ledger"],
        cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    assert proc.stdout is not None
    for line in proc.stdout:
        if match := re.search(r"serving (http://\S+)/v1", line):
            return proc, match.group(1)
    proc.wait()
    raise SystemExit("the gateway did not start")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--reps", type=int, default=30)
    parser.add_argument("--dir", type=Path, default=None)
    args = parser.parse_args()
    root = args.dir or Path(tempfile.mkdtemp(prefix="veilnet-gw-bench-"))
    with Testnet(root / "net", nodes=3, replicas=1, node_args=["--threads", "1"],
                 ledger_nodes=(), log=log) as net:
        proc, url = start_gateway(net.bootstrap, net.deployment)
        try:
            api = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0)
            out: dict[str, object] = {"reps": args.reps}
            worst = 0.0
            with Client([net.bootstrap], net.deployment, verify="none", ledger=False) as sdk:
                for case, n in CASES.items():
                    texts = TEXTS[:n]
                    sdk.embed(texts)  # warm both paths
                    api.embeddings.create(model="minilm", input=texts)
                    direct, gateway = [], []
                    for _ in range(args.reps):
                        t0 = time.perf_counter()
                        a = sdk.embed(texts).embeddings
                        direct.append((time.perf_counter() - t0) * 1e3)
                        time.sleep(0.05)
                        t0 = time.perf_counter()
                        got = api.embeddings.create(model="minilm", input=texts)
                        gateway.append((time.perf_counter() - t0) * 1e3)
                        b = np.array([d.embedding for d in got.data])
                        worst = max(worst, float(np.abs(a - b).max()))
                        time.sleep(0.05)
                    d, g = pct(direct), pct(gateway)
                    out[case] = {"sdk_ms": d, "gateway_ms": g,
                                 "p50_ratio": round(g["p50"] / d["p50"], 3),
                                 "p50_added_ms": round(g["p50"] - d["p50"], 2)}
                    log(f"{case}: sdk p50 {d['p50']} ms, gateway p50 {g['p50']} ms")
            out["max_abs_diff"] = worst
            print(json.dumps(out))
        finally:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(15)
            except subprocess.TimeoutExpired:
                proc.kill()


if __name__ == "__main__":
    main()
