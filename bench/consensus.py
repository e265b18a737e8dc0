"""Consensus benchmark: what cross-checking nodes costs and what it catches, on one local testnet
of 5 node processes (MiniLM, 3 node shards, every node shard on 3 nodes, ``--threads 1``).

Measured, in this order, and printed as one JSON object (progress goes to stderr):

- **latency**: the same 4 sentences through three long-lived ``Client``s (start-up not timed),
  ``verify="none"`` (one node per hop: the baseline), ``verify="full", replicas=3`` and
  ``verify="spot", spot_rate=0.1``, interleaved round by round (the order rotates, 50 ms
  apart, 3 untimed rounds first) so load drift hits every mode alike; all nodes honest. p50 and
  p95 per mode, the p50 ratios full/none and spot/none against the targets (full <= 1.3x,
  spot <= 1.1x), any honest node that lost a verdict (a false alarm), and the summed latency of
  the nodes whose outputs were used (``answering_hops_ms``; in full mode the two fingerprint
  replicas of a hop are asked once that node has answered, so their time comes on top);
- **fingerprint size**: the real hop outputs of that query (the encrypted deployment run
  in-process): ``fingerprint_bytes`` and the CBOR size of the fingerprint vs the CBOR size of
  the full output tensors as they go on the wire;
- **detection, full mode**: node 4 restarted in each Byzantine test mode (noise, zeros, stale,
  wrong-shard, random); per mode a fresh full-mode client runs ``--detect-queries`` queries with
  different texts each (a stale answer to an identical input would be right) and counts the
  hops node 4 answered, the hops it lost, and the returned embeddings that differ from the
  plaintext model's by more than 1e-4 (must be 0);
- **detection, spot mode** (p = 0.2, node 4 adding noise to every answer): for each of
  ``--spot-seeds`` seeds, the index of the first query in which node 4 lost a verdict and how
  many of its wrong answers were returned before that, next to the prediction of
  docs/consensus.md.

    .venv/bin/python bench/consensus.py [--queries 60] [--detect-queries 20] [--spot-seeds 5]
        [--dir DIR] [--quick]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import cbor2
import numpy as np
import onnxruntime as ort

REPO = Path(__file__).resolve().parent.parent
# bench/ledger.py would shadow the ledger package the client imports: take bench/ off the path
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != REPO / "bench"]
sys.path.insert(0, str(REPO / "scripts"))

from localnet import Testnet  # noqa: E402

from client import Client, QueryError  # noqa: E402
from consensus.fingerprint import fingerprint, fingerprint_bytes  # noqa: E402
from consensus.verdict import detection_probability, expected_queries_until_detection  # noqa: E402
from models import Pipeline  # noqa: E402
from node.byzantine import MODES as BYZANTINE_MODES  # noqa: E402
from protocols.wire import encode_tensors  # noqa: E402

NODES, REPLICAS, NODE_SHARDS = 5, 3, 3
LIAR = NODES - 1
TARGETS = {"full": 1.3, "spot": 1.1}  # max p50 ratio to verify="none"
SPOT_RATE = 0.1
SPOT_DETECT_RATE = 0.2
SPOT_MAX_QUERIES = 60
WARMUP = 3
PAUSE_S = 0.05
ATOL = 1e-4
TEXTS = [
    "Encrypted activations travel between untrusted nodes.",
    "Three replicas answer every hop and the majority wins.",
    "A node that lies is caught by the others.",
    "The client returns only an answer that won.",
]


def log(message: str) -> None:
    print(f"consensus: {message}", file=sys.stderr, flush=True)


def pct(values: list[float]) -> dict[str, Any]:
    a = np.asarray(values)
    return {"p50": round(float(np.percentile(a, 50)), 3),
            "p95": round(float(np.percentile(a, 95)), 3), "n": len(values)}


def texts_for(tag: str, query: int) -> list[str]:
    """Different inputs every query."""
    return [f"{tag} query {query}: a lying node must lose",
            f"{query} answers for {tag}, each one checked by three nodes"]


def latency(net: Testnet, queries: int) -> dict[str, Any]:
    """Interleaved p50/p95 of the three modes on the same inputs, all nodes honest."""
    options = {"none": {"verify": "none"},
               "full": {"verify": "full", "replicas": REPLICAS},
               "spot": {"verify": "spot", "spot_rate": SPOT_RATE}}
    # ledger=False: the cost of checks alone (receipts, on by default, are timed elsewhere)
    clients = {m: Client([net.bootstrap], net.deployment, seed=11, ledger=False, **o)
               for m, o in options.items()}
    times: dict[str, list[float]] = {m: [] for m in options}
    hops_ms: dict[str, list[float]] = {m: [] for m in options}  # answering nodes' hop latency
    checked = {m: 0 for m in options}  # hops answered by more than one node
    false_alarms: list[dict[str, Any]] = []
    modes = list(options)
    try:
        for rnd in range(queries + WARMUP):
            for mode in modes[rnd % 3:] + modes[:rnd % 3]:
                start = time.perf_counter()
                result = clients[mode].embed(TEXTS)
                elapsed = (time.perf_counter() - start) * 1e3
                if rnd >= WARMUP:
                    times[mode].append(elapsed)
                    hops_ms[mode].append(sum(h.latency_ms for h in result.hops))
                for hop in result.hops:
                    if hop.verdict is not None:
                        checked[mode] += 1
                        if hop.verdict["losers"] or not hop.verdict["decided"]:
                            false_alarms.append({"mode": mode, "shard": hop.shard_index,
                                                 "reason": hop.verdict["reason"]})
                time.sleep(PAUSE_S)
            if (rnd + 1) % 10 == 0:
                log(f"latency: round {rnd + 1}/{queries + WARMUP}")
    finally:
        for c in clients.values():
            c.close()
    stats = {m: pct(t) for m, t in times.items()}
    ratios = {f"{m}_over_none_p50": round(stats[m]["p50"] / stats["none"]["p50"], 3)
              for m in ("full", "spot")}
    targets = {m: {"max_ratio_p50": limit, "ratio_p50": ratios[f"{m}_over_none_p50"],
                   "met": ratios[f"{m}_over_none_p50"] <= limit}
               for m, limit in TARGETS.items()}
    return {"latency_ms": stats, "answering_hops_ms": {m: pct(t) for m, t in hops_ms.items()},
            "ratios": ratios, "targets": targets,
            "cross_checked_hops": checked, "honest_false_alarms": false_alarms}


def fingerprint_sizes(net: Testnet) -> dict[str, Any]:
    """Fingerprint vs full-tensor bytes of the real hop outputs of the latency query."""
    assert net.deployment is not None
    pipe = Pipeline(net.deployment, threads=1, spin=False)  # encrypted, every shard in-process
    assert pipe.tokenizer is not None
    env: dict[str, np.ndarray] = dict(pipe.tokenizer(TEXTS))
    hops = []
    for shard in pipe.manifest.shards:
        outputs = pipe.run_local(shard, {t.name: env[t.name] for t in shard.inputs})
        env.update(outputs)
        if shard.role != "node":
            continue
        fp = fingerprint(outputs)
        hops.append({"shard": shard.index,
                     "outputs": {n: [list(a.shape), a.dtype.name] for n, a in outputs.items()},
                     "tensor_cbor_bytes": len(cbor2.dumps(encode_tensors(outputs))),
                     "fingerprint_bytes": fingerprint_bytes(fp),
                     "fingerprint_cbor_bytes": len(cbor2.dumps(fp))})
    tensor = sum(h["tensor_cbor_bytes"] for h in hops)
    fpb = sum(h["fingerprint_bytes"] for h in hops)
    fpc = sum(h["fingerprint_cbor_bytes"] for h in hops)
    return {"k": 8, "hops": hops, "tensor_cbor_bytes": tensor, "fingerprint_bytes": fpb,
            "fingerprint_cbor_bytes": fpc, "ratio": round(tensor / fpb, 2),
            "ratio_cbor": round(tensor / fpc, 2)}


def make_liar(net: Testnet, mode: str) -> Any:
    """Node 4, restarted in Byzantine test mode ``mode`` (if it runs another one)."""
    node = net.nodes[LIAR]
    if node.byzantine != mode:
        net.stop_node(LIAR)
        node.byzantine = mode
        net.start_node(LIAR)
    return node


def detect_full(net: Testnet, plaintext: Pipeline, mode: str, queries: int) -> dict[str, Any]:
    liar = make_liar(net, mode)
    answered = lost = wrong = failed = served_outputs = 0
    honest_losers = 0
    max_diff = 0.0
    with Client([net.bootstrap], net.deployment, verify="full", replicas=REPLICAS,
                seed=7, ledger=False) as client:
        for query in range(queries):
            texts = texts_for(mode, query)
            try:
                result = client.embed(texts)
            except QueryError as exc:
                failed += 1
                log(f"{mode}: query {query} failed: {exc}")
                continue
            diff = float(np.abs(result.embeddings - plaintext.embed(texts)).max())
            max_diff = max(max_diff, diff)
            wrong += diff > ATOL
            for hop in result.hops:
                served_outputs += hop.peer_id == liar.peer_id
                verdict = hop.verdict or {"nodes": [], "losers": []}
                if liar.peer_id in verdict["nodes"]:
                    answered += 1
                    lost += liar.peer_id in verdict["losers"]
                honest_losers += sum(p != liar.peer_id for p in verdict["losers"])
    return {"queries": queries, "hops_node4_answered": answered, "hops_node4_lost": lost,
            "detection_rate": round(lost / answered, 4) if answered else None,
            "wrong_answers_returned": wrong, "failed_queries": failed,
            "node4_outputs_returned": served_outputs, "honest_nodes_lost": honest_losers,
            "max_abs_diff_vs_plaintext": max_diff}


def detect_spot(net: Testnet, seeds: int) -> dict[str, Any]:
    liar = make_liar(net, "noise")
    hops_served = sum(LIAR in where for where in net.placement.values())
    runs = []
    for seed in range(seeds):
        first, unchecked = None, 0
        # ledger=False: spot checks alone, not steered by the network's rankings
        with Client([net.bootstrap], net.deployment, verify="spot",
                    spot_rate=SPOT_DETECT_RATE, seed=seed, ledger=False) as client:
            for query in range(1, SPOT_MAX_QUERIES + 1):
                result = client.embed(texts_for(f"spot{seed}", query))
                if any(h.verdict and liar.peer_id in h.verdict["losers"] for h in result.hops):
                    first = query
                    break
                # node 4's (noisy) outputs used without a check: a wrong answer returned
                unchecked += any(h.peer_id == liar.peer_id for h in result.hops)
        runs.append({"seed": seed, "first_detection_query": first,
                     "wrong_answers_before_detection": unchecked})
        log(f"spot p={SPOT_DETECT_RATE}, seed {seed}: node 4 caught at query {first} "
            f"({unchecked} unchecked wrong answers before)")
    found = [r["first_detection_query"] for r in runs if r["first_detection_query"]]
    # node 4 is one of the 3 nodes of its shard; the client picks the answering node about
    # uniformly (reputation plus exploration), and the checking node among the other two
    pick = 1 / REPLICAS
    q_adjusted = 1 - (1 - SPOT_DETECT_RATE * (pick + (1 - pick) / (REPLICAS - 1))) ** hops_served
    return {
        "spot_rate": SPOT_DETECT_RATE, "byzantine_mode": "noise", "max_queries": SPOT_MAX_QUERIES,
        "runs": runs, "first_detection_mean": round(statistics.mean(found), 2) if found else None,
        "first_detection_median": statistics.median(found) if found else None,
        "never_detected": len(runs) - len(found),
        "prediction": {
            "docs_formula": "mean 1 / (1 - (1 - p)^h), h = hops of the query node 4 serves",
            "h": hops_served,
            "per_query": round(detection_probability(SPOT_DETECT_RATE, hops_served), 4),
            "mean_queries": round(expected_queries_until_detection(SPOT_DETECT_RATE,
                                                                   hops_served), 2),
            "per_query_if_node4_is_1_of_3_picked_uniformly": round(q_adjusted, 4),
            "mean_queries_if_node4_is_1_of_3_picked_uniformly": round(1 / q_adjusted, 2),
        },
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--queries", type=int, default=60,
                        help="timed queries per mode for the latency part (default 60)")
    parser.add_argument("--detect-queries", type=int, default=20,
                        help="full-mode queries per Byzantine mode (default 20)")
    parser.add_argument("--spot-seeds", type=int, default=5,
                        help="spot-mode detection runs, one per seed (default 5)")
    parser.add_argument("--dir", type=Path, default=None,
                        help="testnet directory (default: a temporary one; MiniLM is imported "
                        "there once)")
    parser.add_argument("--quick", action="store_true",
                        help="10 latency queries, 5 per Byzantine mode, 2 spot seeds (smoke)")
    args = parser.parse_args(argv)
    queries, detect, seeds = ((10, 5, 2) if args.quick
                              else (args.queries, args.detect_queries, args.spot_seeds))
    if queries < 1 or detect < 1 or seeds < 1:
        parser.error("--queries, --detect-queries and --spot-seeds must be at least 1")
    began = time.monotonic()
    load_start = os.getloadavg()[0]
    with tempfile.TemporaryDirectory(prefix="veilnet-consensus-") as tmp:
        root = args.dir or Path(tmp)
        with Testnet(root, nodes=NODES, replicas=REPLICAS, node_shards=NODE_SHARDS,
                     node_args=["--threads", "1"], log=log) as net:
            assert net.deployment is not None and net.model is not None
            placement = {net.shard_index[c]: w for c, w in net.placement.items()}
            log(f"latency: {queries} timed queries per mode (none, full r=3, spot p=0.1), "
                "interleaved")
            lat = latency(net, queries)
            log("latency p50 ms: " + ", ".join(f"{m} {s['p50']}"
                                                for m, s in lat["latency_ms"].items()))
            log("fingerprint sizes of the hop outputs")
            sizes = fingerprint_sizes(net)
            plaintext = Pipeline(net.model, threads=1, spin=False)
            detection = {}
            for mode in BYZANTINE_MODES:
                log(f"full mode vs node 4 in byzantine mode {mode}: {detect} queries")
                detection[mode] = detect_full(net, plaintext, mode, detect)
                d = detection[mode]
                log(f"{mode}: node 4 answered {d['hops_node4_answered']} hops, lost "
                    f"{d['hops_node4_lost']}, wrong answers returned "
                    f"{d['wrong_answers_returned']}")
            log(f"spot mode p={SPOT_DETECT_RATE} vs node 4 always cheating: {seeds} seeds")
            spot = detect_spot(net, seeds)
    print(json.dumps({
        "benchmark": "consensus",
        "setup": {"nodes": NODES, "node_shards": NODE_SHARDS, "replicas": REPLICAS,
                  "node_args": ["--threads", "1"], "placement": placement,
                  "byzantine_node": LIAR, "texts_per_latency_query": len(TEXTS),
                  "latency_queries_per_mode": queries, "warmup_rounds": WARMUP,
                  "detect_queries_per_mode": detect, "spot_seeds": seeds,
                  "cpus": os.cpu_count(), "onnxruntime": ort.__version__,
                  "loadavg_1min_start": round(load_start, 2),
                  "loadavg_1min_end": round(os.getloadavg()[0], 2),
                  "wall_s": round(time.monotonic() - began, 1)},
        **lat,
        "fingerprint": sizes,
        "detection_full": detection,
        "all_detected": all(d["hops_node4_lost"] == d["hops_node4_answered"] > 0
                            for d in detection.values()),
        "wrong_answers_returned_full": sum(d["wrong_answers_returned"]
                                           for d in detection.values()),
        "detection_spot": spot,
    }, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
