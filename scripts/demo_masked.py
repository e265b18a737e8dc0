"""The masked/1 part of ``make demo`` (scripts/testnet.py demo): MiniLM as a masked deployment
on 3 nodes, one of them lying. Nodes compute only linear layers, each on x + r with a fresh
Gaussian mask r; another node computes r W from a seed; the client checks every product
(Freivalds) and does everything else. The answer is compared with the plaintext model."""

from __future__ import annotations

import time
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
from localnet import Testnet, prepare_model

TEXTS = ["A man is eating food.", "A man is eating a piece of bread.",
         "Masked offload: one node sees only noise."]


def demo_masked(root: Path, timeout: float) -> float:
    """Run the masked demo in ``root`` (T/model holds the plaintext MiniLM); returns the max
    |network - plaintext| over its queries."""
    from client import Client
    from models import Manifest, Pipeline

    print("\nMasked offload (masked/1): the same MiniLM, now with every non-linear step on the "
          "client.\nNodes compute only linear layers in float64 on x + r (r fresh Gaussian noise "
          "per call);\na second node of another operator computes r W from a seed; the client "
          "checks both products.")
    model, deploy = prepare_model(root, None, lambda m: print(f"  {m}"), "minilm", "masked")
    manifest = Manifest.load(deploy)
    net = Testnet(root / "masked", nodes=3, replicas=3, deployment=deploy, model=model,
                  node_args=["--threads", "1"], byzantine=1, timeout=timeout)
    try:
        net.start()
        by_peer = {n.peer_id: n.index for n in net.nodes}
        reference = Pipeline(model).embed(TEXTS)
        sigmas = [float(v["sigma"]) for v in manifest.extra["masked"]["shards"].values()]
        print(f"  {len(manifest.node_shards)} node shards (4 linear layers x 6 encoder layers); "
              f"mask sigma {min(sigmas):.3g} to {max(sigmas):.3g}, for at most "
              f"{manifest.extra['masked']['bits_per_token']:g} bits per token per query "
              f"(docs/threat-model.md).\n  Node 2 runs --byzantine-test-mode noise.")
        worst = 0.0
        with Client([net.bootstrap], deploy, ledger=True) as client:
            for query in range(2):
                started = time.perf_counter()
                result = client.embed(TEXTS)
                elapsed = time.perf_counter() - started
                diff = float(np.abs(result.embeddings - reference).max())
                worst = max(worst, diff)
                roles = Counter((by_peer.get(h.peer_id), h.verdict["role"])  # type: ignore[index]
                                for h in result.hops if h.verdict)
                caught = [f for h in result.hops[::2]  # a pair's failures: on its first record
                          for f in h.failures if "Freivalds" in f]
                print(f"\n  Query {query + 1}: {len(TEXTS)} sentences in {elapsed * 1e3:.0f} ms,"
                      f" {len(result.hops) // 2} calls, max |network - plaintext| = {diff:.2e}")
                print("    calls per node: " + ", ".join(
                    f"node {n} {c}x on x + r" for (n, role), c in sorted(roles.items(),
                                                                        key=str)
                    if role == "masked-input") + "; " + ", ".join(
                    f"node {n} {c}x on a seed" for (n, role), c in sorted(roles.items(),
                                                                         key=str)
                    if role == "mask-seed"))
                for line in caught[:2]:
                    print(f"    caught: node {by_peer.get(line.split(':', 1)[0])} "
                          + line.split("caught by the Freivalds check: ", 1)[-1]
                          + "; the call was made again on another pair")
                _print_receipt(result)
        return worst
    finally:
        net.stop()


def _print_receipt(result: Any) -> None:
    if result.receipt is not None:
        print(f"    receipt: entry {result.receipt.index} in node 0's ledger, "
              f"{len(result.hops)} signed hop records")
    elif result.receipt_error:
        print(f"    no receipt: {result.receipt_error}")
