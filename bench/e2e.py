"""End-to-end benchmark: plaintext onnxruntime in one process vs an encrypted query through a
local testnet (3 node processes, one node shard each, loopback).

Prints one JSON object: p50/p95 latency of both at batch 1 x 16 tokens and batch 8 x 128 tokens
(interleaved runs on the same inputs, 50 ms apart), their ratios (target: p50 ratio <= 1.5 at
8 x 128), throughput with 8 concurrent clients, where the time of an encrypted query goes
(client head and tail, node compute, serialization and digests, Noise encryption, the rest of
the transport), the max abs difference between the two answers, and what the default receipt
logging adds to ``embed`` (``receipts_b1``). Progress goes to stderr.

    .venv/bin/python bench/e2e.py [--reps 30] [--seconds 10] [--dir DIR] [--quick]
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import re
import sys
import tempfile
import time
import urllib.request
from contextlib import AsyncExitStack
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort
import trio
from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305

REPO = Path(__file__).resolve().parent.parent
# bench/ledger.py (the ledger benchmark) would shadow the ledger package the client imports, so
# bench/ is taken off the path and harness.py is loaded by file.
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != REPO / "bench"]
sys.path.insert(0, str(REPO / "scripts"))
_spec = importlib.util.spec_from_file_location("harness", REPO / "bench" / "harness.py")
assert _spec is not None and _spec.loader is not None
harness = importlib.util.module_from_spec(_spec)
sys.modules["harness"] = harness  # dataclasses look their module up there
_spec.loader.exec_module(harness)
LoadProbe = harness.LoadProbe

from localnet import Testnet  # noqa: E402

from client import AsyncClient  # noqa: E402
from models import Pipeline, build_minilm  # noqa: E402
from models.runtime import session_options  # noqa: E402
from protocols.wire import decode_tensors, encode_frame, encode_tensors, tensors_digest  # noqa: E402

TARGET_P50_RATIO = 1.5
CASES = {"b1x16": (1, 16), "b8x128": (8, 128)}
CONCURRENCY = 8
PAUSE_S = 0.05
NOISE_MESSAGE = 65535 - 16  # Noise transport messages carry at most 65535 bytes incl. the tag


def log(message: str) -> None:
    print(f"e2e: {message}", file=sys.stderr, flush=True)


def inputs(batch: int, seq: int, seed: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    ids = rng.integers(1000, 29000, (batch, seq)).astype(np.int64)
    ids[:, 0], ids[:, -1] = 101, 102  # [CLS] ... [SEP]
    return {"input_ids": ids, "attention_mask": np.ones((batch, seq), np.int64),
            "token_type_ids": np.zeros((batch, seq), np.int64)}


def pct(values: list[float]) -> dict[str, float]:
    a = np.asarray(values)
    return {"p50": round(float(np.percentile(a, 50)), 3),
            "p95": round(float(np.percentile(a, 95)), 3), "n": len(values)}


def node_compute(net: Testnet) -> tuple[float, int]:
    """Sum and count of veilnet_shard_run_seconds (onnxruntime time) over all nodes."""
    total, count = 0.0, 0
    for node in net.nodes:
        text = urllib.request.urlopen(f"{node.http}/metrics", timeout=5).read().decode()
        total += float(re.search(r"^veilnet_shard_run_seconds_sum (\S+)$", text, re.M)[1])
        count += int(float(re.search(r"^veilnet_shard_run_seconds_count (\S+)$", text,
                                     re.M)[1]))
    return total, count


def hop_tensors(plain: Pipeline, feeds: dict[str, np.ndarray],
                ) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """Real inputs and outputs of the first node-shard hop (plaintext split model)."""
    manifest = plain.manifest
    env = dict(feeds)
    env.update(plain.run_local(manifest.head, {t.name: env[t.name] for t in manifest.head.inputs}))
    shard = manifest.node_shards[0]
    hop_in = {t.name: env[t.name] for t in shard.inputs}
    return hop_in, plain.run_local(shard, hop_in)


def serialization_ms(hop_in: dict[str, np.ndarray], hop_out: dict[str, np.ndarray], hops: int,
                     reps: int = 7) -> dict[str, float]:
    """In-process cost per query of what both ends do to the tensors of every hop (encode to a
    frame, decode, digest on both sides), and of ChaCha20-Poly1305 over the same bytes (Noise's
    cipher, encrypt plus decrypt)."""
    def one_hop() -> None:
        for tensors in (hop_in, hop_out):
            encode_frame({"v": 1, "id": "x" * 32, "inputs": encode_tensors(tensors)})
            decode_tensors(encode_tensors(tensors), "t")
            tensors_digest(tensors)
            tensors_digest(tensors)

    times = []
    for _ in range(reps):
        start = time.perf_counter()
        one_hop()
        times.append(time.perf_counter() - start)
    nbytes = sum(len(encode_frame({"inputs": encode_tensors(t)})) for t in (hop_in, hop_out))
    aead = ChaCha20Poly1305(os.urandom(32))
    chunk = os.urandom(NOISE_MESSAGE)
    noise = []
    for _ in range(reps):
        start = time.perf_counter()
        for i in range(0, nbytes, NOISE_MESSAGE):
            ct = aead.encrypt(i.to_bytes(12, "little"), chunk, None)
            aead.decrypt(i.to_bytes(12, "little"), ct, None)
        noise.append(time.perf_counter() - start)
    return {"bytes_per_hop": nbytes,
            "serialize_digest_ms": round(float(np.median(times)) * hops * 1e3, 3),
            "noise_crypto_ms": round(float(np.median(noise)) * hops * 1e3, 3)}


def client_shards_ms(deployment: Pipeline, feeds: dict[str, np.ndarray],
                     hop_out: dict[str, np.ndarray]) -> float:
    """Median time of the encrypted client head plus tail (the tail gets a hidden state of the
    right shape as its input)."""
    manifest = deployment.manifest
    head, tail = manifest.head, manifest.tail
    env = dict(feeds)
    env.update(deployment.run_local(head, {t.name: env[t.name] for t in head.inputs}))
    env[tail.inputs[0].name] = next(iter(hop_out.values()))
    times = []
    for _ in range(7):
        start = time.perf_counter()
        deployment.run_local(head, {t.name: env[t.name] for t in head.inputs})
        deployment.run_local(tail, {t.name: env[t.name] for t in tail.inputs})
        times.append(time.perf_counter() - start)
    return round(float(np.median(times)) * 1e3, 3)


async def latency_case(client: AsyncClient, session: ort.InferenceSession, feeds: dict,
                       reps: int) -> dict[str, Any]:
    plain, net, heads = [], [], []
    diff = 0.0
    for rep in range(reps + 2):
        order = ("plain", "net") if rep % 2 == 0 else ("net", "plain")
        for which in order:
            start = time.perf_counter()
            if which == "plain":
                expected = session.run(["sentence_embedding"], feeds)[0]
                elapsed = time.perf_counter() - start
                if rep >= 2:
                    plain.append(elapsed * 1e3)
            else:
                outputs, hops = await client.run(feeds)
                elapsed = time.perf_counter() - start
                if rep >= 2:
                    net.append(elapsed * 1e3)
                    heads.append(sum(h.latency_ms for h in hops))
                got = outputs["sentence_embedding"]
            # let idle onnxruntime workers of the run before settle, so neither side starts on
            # cores the other one's threads are still spinning on
            await trio.sleep(PAUSE_S)
        diff = max(diff, float(np.abs(got - expected).max()))
    p, n = pct(plain), pct(net)
    return {"plain_ms": p, "encrypted_network_ms": n, "hops_total_ms": pct(heads),
            "ratio_p50": round(n["p50"] / p["p50"], 3),
            "ratio_p95": round(n["p95"] / p["p95"], 3), "max_abs_diff": diff}


async def receipts_case(net: Testnet, reps: int) -> dict[str, Any]:
    """What logging a query's receipt and score report (the default since issue 13) adds to
    ``embed``: interleaved runs of a client with ``ledger=False`` and one with the default, on
    the same texts; node 0 keeps the ledger, the other nodes witness (quorum 1)."""
    assert net.deployment is not None
    off_ms, on_ms = [], []
    logged = 0
    async with AsyncClient([net.bootstrap], net.deployment, verify="none",
                           ledger=False) as off, \
            AsyncClient([net.bootstrap], net.deployment, verify="none") as on:
        for rep in range(reps + 2):
            texts = [f"receipt run {rep}: a man is eating food."]
            order = (off, on) if rep % 2 == 0 else (on, off)
            for client in order:
                start = time.perf_counter()
                result = await client.embed(texts)
                elapsed = (time.perf_counter() - start) * 1e3
                if rep >= 2:
                    (on_ms if client is on else off_ms).append(elapsed)
                    logged += client is on and result.receipt is not None
                await trio.sleep(PAUSE_S)
    a, b = pct(off_ms), pct(on_ms)
    return {"no_ledger_ms": a, "default_receipts_ms": b, "receipts_logged": logged,
            "added_p50_ms": round(b["p50"] - a["p50"], 3),
            "ratio_p50": round(b["p50"] / a["p50"], 3)}


async def throughput(bootstrap: str, deployment: Path, session: ort.InferenceSession,
                     feeds: dict, seconds: float) -> dict[str, Any]:
    async def plain_worker(deadline: float, done: list[int]) -> None:
        while time.perf_counter() < deadline:
            await trio.to_thread.run_sync(session.run, ["sentence_embedding"], feeds)
            done[0] += 1

    async def net_worker(client: AsyncClient, deadline: float, done: list[int]) -> None:
        while time.perf_counter() < deadline:
            await client.run(feeds)
            done[0] += 1

    result: dict[str, Any] = {"clients": CONCURRENCY, "seconds": seconds}
    done = [0]
    start = time.perf_counter()
    async with trio.open_nursery() as nursery:
        for _ in range(CONCURRENCY):
            nursery.start_soon(plain_worker, start + seconds, done)
    result["plain_qps"] = round(done[0] / (time.perf_counter() - start), 2)

    async with AsyncExitStack() as stack:
        clients = [await stack.enter_async_context(
            # transport cost, one node a hop, no receipts
            AsyncClient([bootstrap], deployment, verify="none", ledger=False))
                   for _ in range(CONCURRENCY)]
        done = [0]
        start = time.perf_counter()
        async with trio.open_nursery() as nursery:
            for c in clients:
                nursery.start_soon(net_worker, c, start + seconds, done)
        result["encrypted_network_qps"] = round(done[0] / (time.perf_counter() - start), 2)
    result["ratio"] = round(result["encrypted_network_qps"] / result["plain_qps"], 3)
    return result


async def run(net: Testnet, reps: int, seconds: float) -> dict[str, Any]:
    assert net.deployment is not None and net.model is not None
    session = ort.InferenceSession(build_minilm().SerializeToString(),
                                   sess_options=session_options(),
                                   providers=["CPUExecutionProvider"])
    out: dict[str, Any] = {"cases": {}}
    async with AsyncClient([net.bootstrap], net.deployment, verify="none",
                           ledger=False) as client:
        for name, (batch, seq) in CASES.items():
            feeds = inputs(batch, seq, seed=batch * 1000 + seq)
            log(f"latency {name}: {reps} interleaved runs of each")
            before = node_compute(net)
            with LoadProbe() as probe:
                case = await latency_case(client, session, feeds, reps)
            after = node_compute(net)
            calls = after[1] - before[1]
            case["node_compute_ms_per_query"] = round(
                (after[0] - before[0]) / calls * len(client.manifest.node_shards) * 1e3, 3)
            case["other_process_load_cores"] = probe.other_cores
            out["cases"][name] = case
    feeds = inputs(*CASES["b8x128"], seed=8128)
    deployment = Pipeline(net.deployment, node_runner=lambda shard, feeds: {})
    hop_in, hop_out = hop_tensors(Pipeline(net.model), feeds)
    breakdown = serialization_ms(hop_in, hop_out, len(deployment.manifest.node_shards))
    case = out["cases"]["b8x128"]
    breakdown["client_head_tail_ms"] = client_shards_ms(deployment, feeds, hop_out)
    breakdown["node_compute_ms"] = case["node_compute_ms_per_query"]
    breakdown["total_ms"] = case["encrypted_network_ms"]["p50"]
    breakdown["transport_other_ms"] = round(
        breakdown["total_ms"] - breakdown["client_head_tail_ms"] - breakdown["node_compute_ms"]
        - breakdown["serialize_digest_ms"] - breakdown["noise_crypto_ms"], 3)
    out["breakdown_b8x128_p50"] = breakdown
    log(f"receipts: {reps} interleaved embeds without and with the default receipt logging")
    out["receipts_b1"] = await receipts_case(net, reps)
    log(f"throughput: {CONCURRENCY} concurrent clients, batch 1 x 16, {seconds:g} s each")
    out["throughput_b1x16"] = await throughput(net.bootstrap, net.deployment, session,
                                               inputs(1, 16, seed=116), seconds)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--reps", type=int, default=30, help="timed runs per case (default 30)")
    parser.add_argument("--seconds", type=float, default=10.0,
                        help="duration of each throughput run (default 10)")
    parser.add_argument("--dir", type=Path, default=None,
                        help="testnet directory (default: a temporary directory)")
    parser.add_argument("--quick", action="store_true", help="5 reps, 3 s throughput (smoke)")
    args = parser.parse_args(argv)
    reps, seconds = (5, 3.0) if args.quick else (args.reps, args.seconds)
    with tempfile.TemporaryDirectory(prefix="veilnet-e2e-") as tmp:
        root = args.dir or Path(tmp)
        with Testnet(root, nodes=3, replicas=1, node_shards=3, log=log) as net:
            result = trio.run(run, net, reps, seconds)
    ratio = result["cases"]["b8x128"]["ratio_p50"]
    print(json.dumps({
        "benchmark": "e2e",
        "setup": {"nodes": 3, "node_shards": 3, "replicas": 1, "transport": "libp2p TCP + "
                  "Noise + yamux on 127.0.0.1", "cpus": os.cpu_count(),
                  "onnxruntime": ort.__version__, "reps": reps},
        **result,
        "target": {"b8x128_p50_ratio_max": TARGET_P50_RATIO, "ratio": ratio,
                   "met": ratio <= TARGET_P50_RATIO},
    }, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
