"""Timing and shard-chaining helpers for bench/ee_overhead.py (interleaved runs, medians,
load probing, raw onnxruntime session chains), and queries through a local testnet with their
frames counted for bench/privacy_modes.py."""

from __future__ import annotations

import gc
import os
import sys
import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort

import models
from models.runtime import check_inputs, session_options

OUTPUT = "sentence_embedding"
Timings = dict[str, int]  # named durations of one repetition, in nanoseconds
Variant = Callable[[], Timings]


def log(message: str) -> None:
    print(f"ee_overhead: {message}", file=sys.stderr, flush=True)


# --- timing ----------------------------------------------------------------------------------


def _system_busy_s() -> float | None:
    """CPU seconds all processes have spent busy since boot (Linux /proc/stat), or None."""
    try:
        fields = Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:9]
    except OSError:
        return None
    ticks = [int(x) for x in fields]
    return (sum(ticks) - ticks[3] - ticks[4]) / os.sysconf("SC_CLK_TCK")  # minus idle, iowait


def _own_cpu_s() -> float:
    t = os.times()
    return t.user + t.system


class LoadProbe:
    """Average number of cores kept busy by *other* processes while the block ran: a direct
    record of how much concurrent load the timings were exposed to (None off Linux)."""

    def __enter__(self) -> LoadProbe:
        self._busy, self._own, self._wall = _system_busy_s(), _own_cpu_s(), time.perf_counter()
        self.other_cores: float | None = None
        return self

    def __exit__(self, *exc: object) -> None:
        busy, wall = _system_busy_s(), time.perf_counter() - self._wall
        if busy is not None and self._busy is not None and wall > 0:
            other = (busy - self._busy) - (_own_cpu_s() - self._own)
            self.other_cores = round(max(other, 0.0) / wall, 2)


def measure(variants: Mapping[str, Variant], reps: int, warmup: int = 1, block: int = 1
            ) -> tuple[dict[str, list[Timings]], float | None]:
    """Run ``variants`` interleaved with the order reversed every other round (A B B A ...), so
    neither always runs first; ``warmup`` untimed runs of each first. With ``block`` > 1 each
    variant runs ``block`` timed times in a row per round, after one untimed lead-in run (the
    back-to-back mode); ``reps`` then counts rounds. GC is off while timing (as ``timeit``).
    Returns the timings and the other-process load (cores) during the timed loop."""
    names = list(variants)
    for name in names:
        for _ in range(warmup):
            variants[name]()
    results: dict[str, list[Timings]] = {n: [] for n in names}
    gc.collect()
    gc.disable()
    try:
        with LoadProbe() as probe:
            for rnd in range(reps):
                for name in names if rnd % 2 == 0 else reversed(names):
                    fn = variants[name]
                    if block > 1:
                        fn()
                    for _ in range(block):
                        results[name].append(fn())
    finally:
        gc.enable()
    return results, probe.other_cores


def timed(fn: Callable[[], object]) -> Variant:
    def run() -> Timings:
        start = time.perf_counter_ns()
        fn()
        return {"total": time.perf_counter_ns() - start}
    return run


def stats(ns: list[int]) -> dict[str, float | int]:
    ms = np.asarray(ns, dtype=np.float64) / 1e6
    p10, med, p90 = np.percentile(ms, [10, 50, 90])
    return {"median": round(float(med), 4), "p10": round(float(p10), 4),
            "p90": round(float(p90), 4), "min": round(float(ms.min()), 4), "n": len(ns)}


def field(runs: list[Timings], key: str = "total") -> list[int]:
    return [r[key] for r in runs]


def median_ms(runs: list[Timings], key: str = "total") -> float:
    return round(float(np.median(field(runs, key))) / 1e6, 4)


def compare(runs: dict[str, list[Timings]], plain: str, enc: str, target: float,
            load: float | None) -> dict[str, Any]:
    a, b = field(runs[plain]), field(runs[enc])
    ratio = float(np.median(b) / np.median(a))
    paired = float(np.median(np.asarray(b, dtype=np.float64) / np.asarray(a, dtype=np.float64)))
    return {plain: stats(a), enc: stats(b), "ratio": round(ratio, 4),
            "ratio_paired_median": round(paired, 4), "target": target,
            "meets_target": ratio <= target, "other_process_load_cores": load}


# --- sessions --------------------------------------------------------------------------------


def session(model: Path | bytes, disabled_optimizers: list[str] | None = None,
            shared_pool: bool = False) -> ort.InferenceSession:
    """An onnxruntime CPU session with ``models.runtime.session_options()``; ``shared_pool``
    (EXTRA prototype only) puts it on the process-wide intra-op thread pool."""
    opts = session_options()
    if shared_pool:
        opts.use_per_session_threads = False
    source = model if isinstance(model, bytes) else str(model)
    return ort.InferenceSession(source, sess_options=opts, providers=["CPUExecutionProvider"],
                                disabled_optimizers=disabled_optimizers)


@dataclass
class Shard:
    """A raw onnxruntime session for one shard (no input checks), with its I/O names."""

    spec: models.ShardSpec
    sess: ort.InferenceSession
    inputs: list[str]
    outputs: list[str]

    @classmethod
    def load(cls, manifest: models.Manifest, spec: models.ShardSpec,
             disabled_optimizers: list[str] | None = None, shared_pool: bool = False) -> Shard:
        return cls(spec, session(manifest.shard_path(spec), disabled_optimizers, shared_pool),
                   [t.name for t in spec.inputs], [t.name for t in spec.outputs])


def shard_label(spec: models.ShardSpec) -> str:
    return "head" if spec.role == "client-head" else (
        "tail" if spec.role == "client-tail" else f"node_{spec.index}")


def chain_feeds(shards: list[Shard], feeds: Mapping[str, np.ndarray]
                ) -> list[dict[str, np.ndarray]]:
    """Run the chain once; return each shard's exact input dict."""
    env = dict(feeds)
    per_shard = []
    for shard in shards:
        inputs = {n: env[n] for n in shard.inputs}
        per_shard.append(inputs)
        env.update(zip(shard.outputs, shard.sess.run(shard.outputs, inputs), strict=True))
    return per_shard


def run_chain(shards: list[Shard], feeds: Mapping[str, np.ndarray]) -> np.ndarray:
    env = dict(feeds)
    for shard in shards:
        env.update(zip(shard.outputs, shard.sess.run(shard.outputs, {
            n: env[n] for n in shard.inputs}), strict=True))
    return env[OUTPUT]


def node_variant(nodes: list[Shard], inputs: list[dict[str, np.ndarray]]) -> Variant:
    """Per query: each node shard's ``session.run`` timed alone; total = their sum."""
    def run() -> Timings:
        out: Timings = {}
        for shard, feeds in zip(nodes, inputs, strict=True):
            start = time.perf_counter_ns()
            shard.sess.run(shard.outputs, feeds)
            out[shard_label(shard.spec)] = time.perf_counter_ns() - start
        out["total"] = sum(out.values())
        return out
    return run


def chain_variant(shards: list[Shard], feeds: Mapping[str, np.ndarray],
                  checked: bool = False) -> Variant:
    """EXTRA: head -> nodes -> tail on raw sessions with per-shard times. ``checked`` also runs
    ``check_inputs`` per shard, i.e. the same work as ``Pipeline.run``."""
    def run() -> Timings:
        out: Timings = {}
        begin = time.perf_counter_ns()
        env = dict(feeds)
        for shard in shards:
            start = time.perf_counter_ns()
            inputs = {n: env[n] for n in shard.inputs}
            if checked:
                check_inputs(shard.spec, inputs)
            values = shard.sess.run(shard.outputs, inputs)
            out[shard_label(shard.spec)] = time.perf_counter_ns() - start
            env.update(zip(shard.outputs, values, strict=True))
        out["total"] = time.perf_counter_ns() - begin
        return out
    return run


def check_inputs_cost(shards: list[Shard], feeds: list[dict[str, np.ndarray]], calls: int
                      ) -> dict[str, float]:
    """Median microseconds of ``models.runtime.check_inputs`` per shard (pure Python)."""
    out = {}
    for shard, f in zip(shards, feeds, strict=True):
        samples = []
        for _ in range(calls):
            start = time.perf_counter_ns()
            check_inputs(shard.spec, f)
            samples.append(time.perf_counter_ns() - start)
        out[shard_label(shard.spec)] = round(float(np.median(samples)) / 1e3, 2)
    out["sum"] = round(sum(out.values()), 2)
    return out


def max_abs_diff(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.max(np.abs(a.astype(np.float64) - b.astype(np.float64))))




# --- queries through a local testnet (bench/privacy_modes.py) ---------------------------------


def random_inputs(batch: int, seq: int, seed: int) -> dict[str, np.ndarray]:
    """``[CLS] random word pieces [SEP]``, every position real (no padding), as bench/e2e.py."""
    rng = np.random.default_rng(seed)
    ids = rng.integers(1000, 29000, (batch, seq)).astype(np.int64)
    ids[:, 0], ids[:, -1] = 101, 102
    return {"input_ids": ids, "attention_mask": np.ones((batch, seq), np.int64),
            "token_type_ids": np.zeros((batch, seq), np.int64)}


@contextmanager
def counting_frames() -> Iterator[dict[str, int]]:
    """Count the client's request/response exchanges and their frame sizes (each frame
    re-encoded with ``protocols.wire.encode_frame``: varint length + CBOR, the bytes the Noise
    channel carries, before Noise and yamux framing) while the block runs."""
    from client.streams import StreamPool
    from protocols.wire import encode_frame

    original = StreamPool.request
    counts = {"requests": 0, "request_bytes": 0, "response_bytes": 0}

    async def request(self: Any, peer: Any, protocol: Any, message: dict[str, Any]
                      ) -> dict[str, Any]:
        response = await original(self, peer, protocol, message)
        counts["requests"] += 1
        counts["request_bytes"] += len(encode_frame(message))
        counts["response_bytes"] += len(encode_frame(response))
        return response

    StreamPool.request = request  # type: ignore[method-assign]
    try:
        yield counts
    finally:
        StreamPool.request = original  # type: ignore[method-assign]


async def network_mode(bootstrap: str, deployment: Path, verify: str, replicas: int,
                       cases: Mapping[str, tuple[int, int]], reps: Mapping[str, int],
                       reference: Callable[[dict[str, np.ndarray]], np.ndarray],
                       pause_s: float = 0.05) -> dict[str, Any]:
    """Per case: latency of ``AsyncClient.run`` (2 untimed runs, then ``reps[case]`` timed,
    ``pause_s`` apart), then one more query with its frames counted; the answer's max abs
    difference from ``reference`` (the plaintext model in process)."""
    import trio

    from client import AsyncClient

    out: dict[str, Any] = {}
    async with AsyncClient([bootstrap], deployment, verify=verify, replicas=replicas,
                           ledger=False, seed=7) as client:
        for name, (batch, seq) in cases.items():
            feeds = random_inputs(batch, seq, seed=batch * 1000 + seq)
            times = []
            with LoadProbe() as probe:
                for rep in range(reps[name] + 2):
                    start = time.perf_counter()
                    outputs, hops = await client.run(feeds)
                    if rep >= 2:
                        times.append((time.perf_counter() - start) * 1e3)
                    await trio.sleep(pause_s)
            with counting_frames() as counts:
                outputs, hops = await client.run(feeds)
            diff = max_abs_diff(outputs["sentence_embedding"], reference(feeds))
            ms = np.asarray(times)
            out[name] = {
                "batch": batch, "seq": seq, "runs": len(times),
                "p50_ms": round(float(np.percentile(ms, 50)), 2),
                "p95_ms": round(float(np.percentile(ms, 95)), 2),
                "bytes_per_query": counts["request_bytes"] + counts["response_bytes"],
                "request_bytes": counts["request_bytes"],
                "response_bytes": counts["response_bytes"],
                "requests_per_query": counts["requests"],
                "sequential_round_trips": len({h.shard_index for h in hops}),
                "max_abs_diff_vs_plaintext": float(f"{diff:.3g}"),
                "other_process_load_cores": probe.other_cores}
    return out


def token_recovery(plain_dir: Path, ee_dir: Path, masked_dir: Path, n: int) -> dict[str, Any]:
    """The best token-recovery rate a node gets in each mode on ``n`` held-out sentences
    (models/audit.py) and the constant-guess baseline: plaintext, nearest embedding on the
    ``hidden_0`` the first node receives; EE, the best row of ``veilnet audit`` (no fine-tune
    rows); masked, the best single-node single-query row of the masked audit."""
    from models import audit_attacks as aa
    from models.audit import MAX_TOKENS, audit_deployment, heldout_sentences, most_common_rate
    from models.audit_masked import COLLUSION, Candidates, best_single_node, read_nearest

    plain = models.Manifest.load(plain_dir)
    head = models.ShardSession(plain.shard_path(plain.head), plain.head, threads=1)
    feeds = models.TextTokenizer(plain_dir / "tokenizer.json", MAX_TOKENS)(heldout_sentences(n))
    real = (feeds["attention_mask"] == 1) & (feeds["input_ids"] > 103)  # no [PAD] [CLS] [SEP]
    hidden = head.run(feeds)["hidden_0"][real].astype(np.float64)
    positions = np.nonzero(real)[1]
    emb = aa.EncoderEmbeddings.from_head(onnx.load(str(plain.shard_path(plain.head))))
    read = read_nearest(Candidates(emb, positions), positions, {"h": (hidden, 0.0)})["h"][0]
    truth = feeds["input_ids"][real]
    ee = audit_deployment(ee_dir, plain_dir, sample=n, noise=())
    masked = audit_deployment(masked_dir, plain_dir, sample=n)
    tokens = [row for row in masked.rows if row.target == "input tokens"]
    best, base = best_single_node(masked), tokens[0].baseline

    def r4(x: float) -> float:
        return round(float(x), 4)

    return {
        "sample_sentences": n,
        "plaintext": {"best_attack": r4(np.mean(read == truth)),
                      "baseline": r4(most_common_rate(truth)), "tokens": int(truth.size),
                      "attack": "nearest embedding on the hidden_0 the first node receives"},
        "ee": {"best_attack": r4(max(x.success for x in ee.rows if x.target == "input tokens")),
               "baseline": r4(ee.row("keyless sort", "input tokens").baseline),
               "rows": {f"{x.attack} / {x.target}": r4(x.success) for x in ee.rows}},
        "masked": {"best_attack": r4(best), "baseline": r4(base),
                   "best_minus_baseline_pp": round(100 * (best - base), 2),
                   "tokens": tokens[0].detail["tokens"],
                   "collusion": r4(masked.row(COLLUSION, "input tokens").success),
                   "averaging_queries": {str(x.detail["queries"]): r4(x.success) for x in tokens
                                         if x.attack.startswith("averaging")},
                   "bound": masked.bound,
                   "rows": {f"{x.attack} / {x.target}": r4(x.success) for x in masked.rows}},
        "ckks": {"not_applicable": "CKKS cannot evaluate a MiniLM node shard (see "
                                   "minilm_node_shard.ckks); on the digits MLP a node sees "
                                   "only RLWE ciphertexts (IND-CPA, about 128-bit security): "
                                   "no attack is measured"},
    }
