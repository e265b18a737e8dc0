"""Generation benchmark: SmolLM2-135M-Instruct, a 40-60 token prompt then 64 greedy tokens.

Everything in one run, variants interleaved (one generation of each per round):

- ``plain_unsplit``: the whole decoder as one onnxruntime session in this process (built from
  the GGUF with models.llama_graph; the baseline);
- ``encrypted_split``: the ee-decoder/1 deployment run shard by shard in this process
  (``models.decoding.LocalDecoder``: client head, node shards, re-basing, tail);
- ``network_none_t{T}`` / ``network_full_t{T}``: the client SDK through a 3-node loopback
  testnet (every node shard on 2 nodes, node ``--threads T``), ``verify="none"`` and
  ``verify="full"`` (2 replicas per step);
- ``plain_unsplit_nospin`` and ``encrypted_split_spin``: the in-process variants with
  onnxruntime's thread spinning the other way round; with ``--shared-pool`` every in-process
  session shares one onnxruntime pool (``models.runtime.use_shared_pool``, as nodes do) instead
  of a pool each (the SDK's default). Both feed the thread decision in docs/benchmarks.md.

For each: time to first token (prefill + first token), decode ms/token p50/p95, tokens/s, each
ratio to the baseline of the same run; the tokens of every variant are compared with the
baseline's. Also node RSS (per node, per shard it serves) and the KV-cache bytes per open
session, read from the nodes' /v1/node while a generation is held open. Prints one JSON object;
progress goes to stderr.

    .venv/bin/python bench/generate.py [--rounds 3] [--tokens 64] [--node-threads 1 2] [--dir D]
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort

REPO = Path(__file__).resolve().parent.parent
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != REPO / "bench"]
sys.path.insert(0, str(REPO / "scripts"))
from localnet import Testnet, http_json, rss_mb  # noqa: E402

from client import Client  # noqa: E402
from client.generation import Prompt, load_tokenizer  # noqa: E402
from models import Manifest, encrypt_model_dir, import_smollm2  # noqa: E402
from models.decoding import LocalDecoder  # noqa: E402
from models.gguf_model import read_gguf, smollm2_path  # noqa: E402
from models.llama_graph import build_llama_decoder  # noqa: E402
from models.runtime import session_options, use_shared_pool  # noqa: E402

TARGET_DECODE_RATIO = 1.6  # network encrypted decode p50 / in-process plaintext unsplit p50
TARGET_TTFT_RATIO = 3.0  # network time to first token / in-process plaintext prefill
PROMPT = ("Explain, step by step and in plain words, why the sky is blue during the day and "
          "red at sunset.")


def log(message: str) -> None:
    print(f"generate: {message}", file=sys.stderr, flush=True)


def pct(values: list[float], q: float) -> float:
    return round(float(np.percentile(values, q)), 3) if values else float("nan")


class Unsplit:
    """The whole decoder in one onnxruntime session (the baseline)."""

    def __init__(self, proto: bytes, config: Any, threads: int | None, spin: bool) -> None:
        self.cfg = config
        self.session = ort.InferenceSession(proto, sess_options=session_options(threads, spin),
                                            providers=["CPUExecutionProvider"])
        self.outputs = [o.name for o in self.session.get_outputs()]

    def generate(self, prompt: list[int], n: int) -> dict[str, Any]:
        c = self.cfg
        past = {f"past_{k}_{i}": np.zeros((1, c.n_kv_heads, 0, c.head_dim), np.float32)
                for i in range(c.n_layers) for k in ("key", "value")}
        ids, out, steps = list(prompt), [], []
        t0 = time.perf_counter()
        prefill_ms = None
        while len(out) < n:
            s = time.perf_counter()
            res = dict(zip(self.outputs, self.session.run(
                self.outputs, {"input_ids": np.array([ids], np.int64), **past}), strict=True))
            ms = (time.perf_counter() - s) * 1e3
            if prefill_ms is None:
                prefill_ms, ttft = ms, (time.perf_counter() - t0) * 1e3
            else:
                steps.append(ms)
            past = {f"past_{k}_{i}": res[f"present_{k}_{i}"]
                    for i in range(c.n_layers) for k in ("key", "value")}
            out.append(int(np.argmax(res["logits"][0, -1])))
            ids = out[-1:]
        return {"tokens": out, "prefill_ms": prefill_ms, "ttft_ms": ttft, "decode_ms": steps}


def split_generate(decoder: LocalDecoder, prompt: list[int], n: int) -> dict[str, Any]:
    decoder.reset()
    out, steps = [], []
    t0 = time.perf_counter()
    logits = decoder.forward(prompt)
    ttft = (time.perf_counter() - t0) * 1e3
    out.append(int(np.argmax(logits)))
    while len(out) < n:
        s = time.perf_counter()
        logits = decoder.forward(out[-1:])
        steps.append((time.perf_counter() - s) * 1e3)
        out.append(int(np.argmax(logits)))
    return {"tokens": out, "ttft_ms": ttft, "decode_ms": steps}


def network_generate(client: Client, prompt: str, n: int) -> dict[str, Any]:
    r = client.generate(prompt, max_tokens=n)
    assert r.time_to_first_token_s is not None
    return {"tokens": r.token_ids, "ttft_ms": r.time_to_first_token_s * 1e3,
            "decode_ms": r.decode_ms}


def summary(runs: list[dict[str, Any]], base: dict[str, Any] | None,
            reference: list[int]) -> dict[str, Any]:
    decode = [ms for r in runs for ms in r["decode_ms"]]
    ttft = [r["ttft_ms"] for r in runs]
    doc: dict[str, Any] = {
        "ttft_ms_p50": pct(ttft, 50), "decode_ms_p50": pct(decode, 50),
        "decode_ms_p95": pct(decode, 95),
        "tokens_per_s": round(1000.0 / float(np.mean(decode)), 2) if decode else None,
        "same_tokens_as_baseline": all(r["tokens"] == reference for r in runs)}
    if base is not None:
        doc["decode_ratio"] = round(doc["decode_ms_p50"] / base["decode_ms_p50"], 3)
        doc["ttft_ratio_to_prefill"] = round(doc["ttft_ms_p50"] / base["prefill_ms_p50"], 3)
    return doc


def session_memory(net: Testnet, client: Client, prompt: str) -> dict[str, Any]:
    """Node RSS and cache bytes with no session, then while one generation is held open."""
    idle = {n.index: rss_mb(n.pid) for n in net.nodes}
    with client.stream(prompt, max_tokens=64) as stream:
        for _ in stream:
            pass  # run to the end with the sessions still open (closed on leaving 'with')
        held = {n.index: (rss_mb(n.pid), http_json(f"{n.http}/v1/node")["sessions"])
                for n in net.nodes}
    # the cache holds the prompt and every generated token but the last (never fed back)
    tokens = len(stream.result.prompt_token_ids) + 63 if stream.result else None
    open_ = sum(v[1]["open"] for v in held.values())
    cache = sum(v[1]["cache_bytes"] for v in held.values())
    return {
        "node_rss_mb_idle": idle,
        "node_rss_mb_per_shard": {i: round(idle[i] / len(n.shards), 1) if idle[i] else None
                                  for i, n in ((n.index, n) for n in net.nodes)},
        "node_rss_mb_with_session": {i: v[0] for i, v in held.items()},
        "session_cache_bytes": {i: v[1]["cache_bytes"] for i, v in held.items()},
        "sessions_open": open_, "session_tokens": tokens,
        "cache_bytes_per_session": round(cache / open_) if open_ else None,
        "cache_bytes_per_token_per_session": round(cache / open_ / tokens)
        if open_ and tokens else None,
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--node-threads", type=int, nargs="+", default=[0, 1], metavar="T",
                    help="node --threads (0: the node's default, onnxruntime's choice, a "
                         "thread per core); one testnet per value, the first is the one the "
                         "targets are read from (default 0 1)")
    ap.add_argument("--shared-pool", action="store_true",
                    help="in-process sessions share one onnxruntime pool (as a node's do)")
    ap.add_argument("--dir", type=Path, default=None)
    args = ap.parse_args()
    if args.shared_pool:
        use_shared_pool()
    root = args.dir or Path(tempfile.mkdtemp(prefix="veilnet-bench-gen-"))
    model, deploy = root / "model", root / "deploy"
    if not (model / "manifest.json").exists():
        log(f"importing SmolLM2 into {model}")
        import_smollm2(model)
    if not (deploy / "manifest.json").exists():
        log(f"encrypting into {deploy}")
        encrypt_model_dir(model, deploy)
    manifest = Manifest.load(model)
    tokenizer = load_tokenizer(manifest)
    prompt = Prompt.of(tokenizer, manifest, None, [{"role": "user", "content": PROMPT}])
    assert 40 <= len(prompt.ids) <= 60, len(prompt.ids)
    log(f"prompt: {len(prompt.ids)} tokens; building the unsplit baseline")
    gguf = read_gguf(smollm2_path())
    proto = build_llama_decoder(gguf.config, gguf.tensors()).SerializeToString()
    n = args.tokens
    # in-process: the baseline with onnxruntime's defaults (spinning threads), and each
    # variant with spinning off, to decide the thread settings (docs/benchmarks.md)
    local: dict[str, Callable[[], dict[str, Any]]] = {}
    for name, spin in (("plain_unsplit", True), ("plain_unsplit_nospin", False)):
        model_ = Unsplit(proto, gguf.config, None, spin)
        local[name] = functools.partial(model_.generate, prompt.ids, n)
    for name, spin in (("encrypted_split", False), ("encrypted_split_spin", True)):
        decoder = LocalDecoder(deploy, spin=spin)
        local[name] = functools.partial(split_generate, decoder, prompt.ids, n)
    runs: dict[str, list[dict[str, Any]]] = {k: [] for k in local}
    memory: dict[str, Any] = {}
    for threads in args.node_threads:
        log(f"testnet: 3 nodes, every node shard on 2, node --threads {threads}")
        with Testnet(root / "net", nodes=3, replicas=2, deployment=deploy, model=model,
                     node_args=["--threads", str(threads)], timeout=120) as net, \
                Client([net.bootstrap], deploy, verify="none", ledger=False) as none, \
                Client([net.bootstrap], deploy, verify="full", replicas=2,
                       ledger=False) as full:
            clients = {f"network_none_t{threads}": none, f"network_full_t{threads}": full}
            for c in clients.values():  # warm up: connections, streams, first allocations
                c.generate(prompt.text, max_tokens=4)
            for r in range(args.rounds):
                log(f"round {r + 1}/{args.rounds}")
                for name, fn in local.items():
                    runs[name].append(fn())
                for name, c in clients.items():
                    runs.setdefault(name, []).append(network_generate(c, prompt.text, n))
            if not memory:
                memory = session_memory(net, none, prompt.text)
    reference = runs["plain_unsplit"][0]["tokens"]
    base = summary(runs["plain_unsplit"], None, reference)
    base["prefill_ms_p50"] = pct([r["prefill_ms"] for r in runs["plain_unsplit"]], 50)
    doc: dict[str, Any] = {
        "benchmark": "generate", "model": manifest.name, "prompt_tokens": len(prompt.ids),
        "generated_tokens": n, "rounds": args.rounds, "node_threads": args.node_threads,
        "cores": os.cpu_count(), "baseline": "plain_unsplit", "shared_pool": args.shared_pool,
        "plain_unsplit": base,
        **{k: summary(v, base, reference) for k, v in runs.items() if k != "plain_unsplit"},
        "memory": memory,
        "targets": {"decode_ratio": TARGET_DECODE_RATIO, "ttft_ratio": TARGET_TTFT_RATIO},
    }
    net_none = doc[f"network_none_t{args.node_threads[0]}"]
    doc["targets"]["decode_met"] = net_none["decode_ratio"] <= TARGET_DECODE_RATIO
    doc["targets"]["ttft_met"] = net_none["ttft_ratio_to_prefill"] <= TARGET_TTFT_RATIO
    print(json.dumps(doc))
    return 0


if __name__ == "__main__":
    sys.exit(main())
