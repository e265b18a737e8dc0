"""Equivariant-encryption (EE) overhead for all-MiniLM-L6-v2, measured in one run on one machine.

Prints exactly one JSON object on stdout; progress goes to stderr.

Setup (in a temporary directory, removed at exit): ``import_minilm(node_shards=2)`` and
``encrypt_model_dir`` with a fresh CSPRNG key, plus the unsplit plaintext model from
``build_minilm()`` in one onnxruntime session. Inputs are real English text tokenized with the
model's tokenizer and cut to exact shapes (1 x 16 and 32 x 128 tokens).

Headline measurements, each comparing two variants interleaved A B B A ...:

1. node shards: plaintext node shards vs encrypted node shards (raw onnxruntime sessions with
   ``models.runtime.session_options()``), each fed what its own client head produced; per query
   the sum of the two node-shard ``session.run`` times. Target ratio <= 1.02.
2. pipeline: the plaintext unsplit model (one session) vs the encrypted split deployment through
   the public ``models.Pipeline(deploy).run(feeds)`` (head + 2 node shards + tail, with input
   checks). Target ratio <= 1.05.

EXTRA measurements (``extra`` in the JSON, skipped with ``--no-extras``) attribute the pipeline
overhead to its parts and never replace the headline figures:

- ``breakdown``: raw session chains with per-shard times, the plaintext split pipeline,
  ``check_inputs``, the EE Gathers in the client head/tail, onnxruntime's SkipLayerNorm fusion;
- ``back_to_back``: the headline pipeline pair run in blocks of consecutive queries (how a client
  issues queries) instead of strict alternation;
- ``shared_thread_pool``: in a child process (onnxruntime's global thread pool is process-wide),
  the same comparison with every session on one shared intra-op pool -- a prototype of a fix.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort
from harness import (
    OUTPUT,
    Shard,
    chain_feeds,
    chain_variant,
    check_inputs_cost,
    compare,
    log,
    max_abs_diff,
    measure,
    median_ms,
    node_variant,
    run_chain,
    session,
    shard_label,
    timed,
)

import models
from models.runtime import session_options

MODEL = "all-MiniLM-L6-v2"
NODE_TARGET = 1.02
PIPELINE_TARGET = 1.05
NO_SLN = ["SkipLayerNormFusion"]  # onnxruntime graph optimizer, disabled only in one EXTRA variant

# Real English prose to tokenize; rows are cut from it at different offsets.
CORPUS = [
    "Veilnet runs transformer inference on machines that its users do not trust.",
    "A model is cut into a client head, a few node shards and a client tail.",
    "The head and the tail stay on the user's computer, while node shards run on peers.",
    "Every shard is stored as an ONNX file named by the hash of its bytes.",
    "Equivariant encryption permutes and mixes the hidden features with a secret key.",
    "The weights of each node shard are transformed so that it computes on encrypted activations.",
    "A node never sees the plaintext embeddings, only vectors in a secret basis.",
    "The client folds the key into its head to encrypt and into its tail to decrypt.",
    "Because the transformation is exact, the final sentence embedding does not change.",
    "Benchmarks should compare like with like on the same machine in the same run.",
    "Interleaving the variants cancels slow drift caused by other programs on the host.",
    "Medians are robust to the occasional long pause of the operating system scheduler.",
    "The quick brown fox jumps over the lazy dog while the cat sleeps on the warm mat.",
    "A man is eating a piece of bread in the kitchen before going to work.",
    "The girl is carrying a baby across the busy street near the old railway station.",
    "Scientists observed that the glacier had retreated several kilometres in a decade.",
    "The committee postponed its decision until the financial report was published.",
    "Heavy rain flooded the lower town, and volunteers filled sandbags through the night.",
    "She plays the violin in an orchestra that tours small villages every summer.",
    "The new library offers free courses on programming, photography and cooking.",
    "Our train was delayed because a tree had fallen across the tracks near the bridge.",
    "He repaired the bicycle with a borrowed wrench and a handful of spare bolts.",
    "The museum reopened after renovation with an exhibition of medieval manuscripts.",
    "Farmers in the valley grow apples, pears and walnuts on terraced hillsides.",
    "The startup raised funding to build cheaper batteries for electric scooters.",
    "A thick fog covered the harbour, and the ferries waited for it to lift.",
    "The students built a small weather station from recycled parts and sensors.",
    "After the concert the crowd walked slowly back to the parking lot in the rain.",
    "Researchers trained a compact language model to answer questions about chemistry.",
    "The recipe calls for two eggs, a cup of flour and a pinch of salt.",
    "Mountain guides warned hikers about the risk of avalanches after the storm.",
    "The city council approved a plan to plant ten thousand trees along its avenues.",
    "An old lighthouse keeper wrote letters describing every ship that passed.",
    "The software update fixed a bug that made the application crash on startup.",
    "Children gathered around the fountain to watch the ducks and feed them bread.",
    "The detective noticed a faint scratch on the window frame of the locked room.",
    "Solar panels on the roof now supply most of the electricity the school needs.",
    "The marathon route passes the cathedral, the river and the central market.",
    "A sudden power cut left the whole neighbourhood in darkness for an hour.",
    "The translator worked late to finish the contract before the morning meeting.",
]

@dataclass(frozen=True)
class Reps:
    """Repetitions. ``warmup`` runs per session before any timing; headline ``node`` and
    ``pipeline`` reps run each compared variant once; ``breakdown`` reps run each of its variants
    once; ``back_to_back`` = ``blocks`` blocks of ``block_len`` timed consecutive runs."""

    warmup: int
    node: int
    pipeline: int
    breakdown: int
    blocks: int
    block_len: int


@dataclass(frozen=True)
class Case:
    batch: int
    seq: int
    reps: Reps


FULL_CASES = (
    Case(1, 16, Reps(warmup=20, node=400, pipeline=400, breakdown=200, blocks=8, block_len=25)),
    Case(32, 128, Reps(warmup=3, node=24, pipeline=24, breakdown=8, blocks=4, block_len=2)),
)
QUICK_CASES = (
    Case(1, 16, Reps(warmup=3, node=30, pipeline=30, breakdown=20, blocks=2, block_len=5)),
    Case(32, 128, Reps(warmup=1, node=2, pipeline=2, breakdown=2, blocks=2, block_len=1)),
)


# --- inputs ----------------------------------------------------------------------------------


def _row_text(start: int) -> str:
    """Consecutive corpus sentences from ``start`` (cycling): far more than 256 tokens."""
    return " ".join(CORPUS[(start + i) % len(CORPUS)] for i in range(16))


def exact_inputs(tokenizer: models.TextTokenizer, batch: int, seq: int
                 ) -> dict[str, np.ndarray]:
    """``batch`` rows of exactly ``seq`` real tokens: [CLS] + the first seq-2 WordPieces of a
    long text + [SEP]; attention_mask all ones (no padding), token_type_ids zeros."""
    enc = tokenizer([_row_text(3 * r) for r in range(batch)])
    ids = np.empty((batch, seq), dtype=np.int64)
    for r in range(batch):
        real = enc["input_ids"][r][enc["attention_mask"][r] == 1]
        if len(real) < seq:
            raise RuntimeError(f"row {r} has only {len(real)} tokens, need {seq}")
        ids[r, : seq - 1] = real[: seq - 1]
        ids[r, seq - 1] = real[-1]  # [SEP]: the tokenizer truncates but keeps its end token
    return {"input_ids": ids, "attention_mask": np.ones((batch, seq), dtype=np.int64),
            "token_type_ids": np.zeros((batch, seq), dtype=np.int64)}


def padded_inputs(tokenizer: models.TextTokenizer, batch: int, seq: int
                  ) -> tuple[dict[str, np.ndarray], list[int]]:
    """A padded batch of the same shape, for the correctness check only: row r has
    L_r = seq/2 + round(r * (seq/2) / (batch-1)) real tokens ([CLS] ... [SEP]) then [PAD]
    (id 0, attention_mask 0), so lengths spread from seq/2 to seq (1 row: seq/2)."""
    feeds = exact_inputs(tokenizer, batch, seq)
    half = seq // 2
    lengths = [half + round(r * (seq - half) / max(batch - 1, 1)) if batch > 1 else half
               for r in range(batch)]
    for r, n in enumerate(lengths):
        sep = feeds["input_ids"][r, seq - 1]
        feeds["input_ids"][r, n - 1] = sep
        feeds["input_ids"][r, n:] = 0
        feeds["attention_mask"][r, n:] = 0
    return feeds, lengths


# --- the benchmark ---------------------------------------------------------------------------


@dataclass
class Setup:
    tokenizer: models.TextTokenizer
    unsplit: ort.InferenceSession  # plaintext build_minilm(), one session
    plain_shards: list[Shard]  # plaintext model dir: head, node, node, tail (raw sessions)
    enc_shards: list[Shard]  # encrypted deployment: head, node, node, tail (raw sessions)
    enc_shards_no_sln: list[Shard]  # EXTRA: same files, nodes without SkipLayerNormFusion
    enc_pipe: models.Pipeline  # models.Pipeline(deploy)
    plain_pipe: models.Pipeline  # models.Pipeline(model), plaintext split


def run_case(case: Case, st: Setup, extras: bool) -> dict[str, Any]:
    b, s, reps = case.batch, case.seq, case.reps
    feeds = exact_inputs(st.tokenizer, b, s)
    result: dict[str, Any] = {
        "batch": b, "seq": s,
        "inputs": ("real English text tokenized with the model's tokenizer.json; each row is "
                   f"[CLS] + the first {s - 2} WordPieces + [SEP] = exactly {s} tokens; "
                   "attention_mask all ones (no padding); token_type_ids zeros"),
        "reps": {"warmup_per_session": reps.warmup, "node_shards": reps.node,
                 "pipeline": reps.pipeline},
    }
    log(f"{b}x{s}: warming up every session ({reps.warmup} runs each)")
    warm: list[Callable[[], object]] = [
        lambda: st.unsplit.run([OUTPUT], feeds), lambda: st.enc_pipe.run(feeds),
        lambda: st.plain_pipe.run(feeds), lambda: run_chain(st.plain_shards, feeds),
        lambda: run_chain(st.enc_shards, feeds)]
    if extras:
        warm.append(lambda: run_chain(st.enc_shards_no_sln, feeds))
    for fn in warm:
        for _ in range(reps.warmup):
            fn()

    # correctness, in the same run
    ref = st.unsplit.run([OUTPUT], feeds)[0]
    padded, lengths = padded_inputs(st.tokenizer, b, s)
    result["correctness"] = {
        "max_abs_diff_encrypted_split_vs_plain_unsplit": max_abs_diff(
            st.enc_pipe.run(feeds)[OUTPUT], ref),
        "max_abs_diff_encrypted_split_vs_plain_unsplit_padded_batch": max_abs_diff(
            st.enc_pipe.run(padded)[OUTPUT], st.unsplit.run([OUTPUT], padded)[0]),
        "max_abs_diff_plain_split_vs_plain_unsplit": max_abs_diff(
            st.plain_pipe.run(feeds)[OUTPUT], ref),
        "padded_batch_real_tokens_per_row": {"min": min(lengths), "max": max(lengths)},
        "output": f"{OUTPUT} [{b}, 384], L2-normalised",
    }

    # 1. node shards: plaintext vs encrypted, each fed its own head's output
    plain_in = chain_feeds(st.plain_shards, feeds)
    enc_in = chain_feeds(st.enc_shards, feeds)
    nodes = [i for i, sh in enumerate(st.plain_shards) if sh.spec.role == "node"]
    log(f"{b}x{s}: node shards, {reps.node} interleaved reps")
    runs, load = measure({
        "plain": node_variant([st.plain_shards[i] for i in nodes], [plain_in[i] for i in nodes]),
        "encrypted": node_variant([st.enc_shards[i] for i in nodes], [enc_in[i] for i in nodes]),
    }, reps.node)
    node = compare(runs, "plain", "encrypted", NODE_TARGET, load)
    node["per_shard_median_ms"] = {
        v: {shard_label(st.plain_shards[i].spec): median_ms(
            runs[v], shard_label(st.plain_shards[i].spec)) for i in nodes}
        for v in ("plain", "encrypted")}
    node["what"] = ("sum over the 2 node shards of raw onnxruntime session.run time per query; "
                    "plaintext shards fed the plaintext head's outputs, encrypted shards the "
                    "encrypted head's")
    result["node_shards_ms"] = node
    log(f"{b}x{s}: node shards ratio {node['ratio']}")

    # 2. whole pipeline: plaintext unsplit (1 session) vs encrypted split via models.Pipeline
    log(f"{b}x{s}: pipeline, {reps.pipeline} interleaved reps")
    runs, load = measure({
        "plain_unsplit": timed(lambda: st.unsplit.run([OUTPUT], feeds)),
        "encrypted_split": timed(lambda: st.enc_pipe.run(feeds)),
    }, reps.pipeline)
    pipe = compare(runs, "plain_unsplit", "encrypted_split", PIPELINE_TARGET, load)
    pipe["what"] = ("plain_unsplit: one onnxruntime session of build_minilm(), session.run; "
                    "encrypted_split: models.Pipeline(deploy).run(feeds) = head + 2 encrypted "
                    "node shards + tail, with check_inputs on every shard")
    result["pipeline_ms"] = pipe
    log(f"{b}x{s}: pipeline ratio {pipe['ratio']}")

    if extras:
        result["extra"] = {"breakdown": run_breakdown(case, feeds, st, enc_in),
                           "back_to_back": run_back_to_back(case, feeds, st)}
    return result


def run_breakdown(case: Case, feeds: dict[str, np.ndarray], st: Setup,
                  enc_in: list[dict[str, np.ndarray]]) -> dict[str, Any]:
    """EXTRA measurement (not a headline figure): where the split pipeline's time goes."""
    b, s, reps = case.batch, case.seq, case.reps
    variants = {
        "plain_unsplit": timed(lambda: st.unsplit.run([OUTPUT], feeds)),
        "encrypted_pipeline": timed(lambda: st.enc_pipe.run(feeds)),
        "plain_split_pipeline": timed(lambda: st.plain_pipe.run(feeds)),
        "encrypted_chain_raw": chain_variant(st.enc_shards, feeds),
        "plain_chain_raw": chain_variant(st.plain_shards, feeds),
        "encrypted_chain_raw_no_skiplayernorm_fusion": chain_variant(st.enc_shards_no_sln, feeds),
    }
    log(f"{b}x{s}: extra breakdown, {reps.breakdown} interleaved reps of {len(variants)} "
        "variants")
    runs, load = measure(variants, reps.breakdown)
    med = {name: median_ms(r) for name, r in runs.items()}
    segments = {
        name: {shard_label(sh.spec): median_ms(runs[name], shard_label(sh.spec))
               for sh in shards}
        for name, shards in (("encrypted_chain_raw", st.enc_shards),
                             ("plain_chain_raw", st.plain_shards))}
    base = med["plain_unsplit"]
    enc_seg, plain_seg = segments["encrypted_chain_raw"], segments["plain_chain_raw"]
    return {
        "note": ("EXTRA, for attribution only; the headline figures use models.Pipeline. "
                 "*_chain_raw = the same shard files on raw onnxruntime sessions chained in a "
                 "minimal loop without check_inputs (a leaner Pipeline.run); "
                 "*_no_skiplayernorm_fusion = that, with the node-shard sessions created with "
                 "disabled_optimizers=['SkipLayerNormFusion'] (onnxruntime fuses Add + "
                 "LayerNormalization into SkipLayerNormalization in the node shards, not in the "
                 "unsplit graph). All 6 variants interleaved, order reversed every other rep."),
        "reps": reps.breakdown,
        "other_process_load_cores": load,
        "median_ms": med,
        "ratio_vs_plain_unsplit": {k: round(v / base, 4) for k, v in med.items()},
        "chain_segment_median_ms": segments,
        "check_inputs_us_per_query": check_inputs_cost(st.enc_shards, enc_in,
                                                       2000 if b * s <= 4096 else 200),
        "derived_ms": {
            "pipeline_python_overhead": round(
                med["encrypted_pipeline"] - med["encrypted_chain_raw"], 4),
            "split_cost_plain_chain_minus_unsplit": round(med["plain_chain_raw"] - base, 4),
            "ee_cost_encrypted_chain_minus_plain_chain": round(
                med["encrypted_chain_raw"] - med["plain_chain_raw"], 4),
            "ee_head_gather": round(enc_seg["head"] - plain_seg["head"], 4),
            "ee_tail_gather": round(enc_seg["tail"] - plain_seg["tail"], 4),
            "skiplayernorm_fusion_cost_in_node_shards": round(
                med["encrypted_chain_raw"]
                - med["encrypted_chain_raw_no_skiplayernorm_fusion"], 4),
        },
    }


def run_back_to_back(case: Case, feeds: dict[str, np.ndarray], st: Setup) -> dict[str, Any]:
    """EXTRA: the headline pipeline pair, each run ``block_len`` times in a row per block."""
    b, s, reps = case.batch, case.seq, case.reps
    log(f"{b}x{s}: extra back-to-back, {reps.blocks} blocks x {reps.block_len} runs")
    runs, load = measure({
        "plain_unsplit": timed(lambda: st.unsplit.run([OUTPUT], feeds)),
        "encrypted_split": timed(lambda: st.enc_pipe.run(feeds)),
    }, reps.blocks, warmup=0, block=reps.block_len)
    out = compare(runs, "plain_unsplit", "encrypted_split", PIPELINE_TARGET, load)
    del out["ratio_paired_median"]  # runs in a block are not paired
    out["note"] = ("EXTRA: same two variants as pipeline_ms, but each runs block_len queries "
                   "back to back (after one untimed lead-in) before the other takes over, "
                   "blocks alternating A B B A; so the unsplit baseline is not preceded by "
                   "another session's run as it is under strict alternation")
    out["blocks"], out["block_len"] = reps.blocks, reps.block_len
    return out


# --- EXTRA: shared thread pool, in a child process ---------------------------------------------


def shared_pool_child(work: Path, quick: bool) -> dict[str, Any]:
    """Every session on onnxruntime's process-wide intra-op pool (it must be set before the first
    session, and then no session may have its own pool: hence a separate process)."""
    ort.set_global_thread_pool_sizes(0, 0)  # 0 = onnxruntime default sizes
    unsplit = session(work / "unsplit.onnx", shared_pool=True)
    manifest = models.Manifest.load(work / "deploy")
    shards = [Shard.load(manifest, s, shared_pool=True) for s in manifest.shards]
    tokenizer = models.TextTokenizer(work / "model" / "tokenizer.json", 256)
    cases = []
    for case in QUICK_CASES if quick else FULL_CASES:
        b, s, reps = case.batch, case.seq, case.reps
        feeds = exact_inputs(tokenizer, b, s)
        variants = {"plain_unsplit": timed(lambda f=feeds: unsplit.run([OUTPUT], f)),
                    "encrypted_split_checked": chain_variant(shards, feeds, checked=True)}
        log(f"{b}x{s}: extra shared thread pool: {reps.breakdown} interleaved reps, then "
            f"{reps.blocks} blocks x {reps.block_len}")
        runs, load = measure(variants, reps.breakdown, warmup=reps.warmup)
        inter = compare(runs, "plain_unsplit", "encrypted_split_checked", PIPELINE_TARGET, load)
        runs, load = measure(variants, reps.blocks, warmup=0, block=reps.block_len)
        blocks = compare(runs, "plain_unsplit", "encrypted_split_checked", PIPELINE_TARGET, load)
        del blocks["ratio_paired_median"]
        cases.append({
            "batch": b, "seq": s, "interleaved": inter, "back_to_back": blocks,
            "max_abs_diff_vs_plain_unsplit": max_abs_diff(
                run_chain(shards, feeds), unsplit.run([OUTPUT], feeds)[0])})
    return {"note": ("EXTRA prototype, separate process: ort.set_global_thread_pool_sizes(0, 0) "
                     "and SessionOptions.use_per_session_threads = False for every session; "
                     "encrypted_split_checked = the encrypted deployment's 4 shards chained "
                     "with check_inputs per shard, the same work as Pipeline.run (Pipeline "
                     "itself cannot be used: its sessions always get their own pools)"),
            "cases": cases}


def run_shared_pool_child(work: Path, quick: bool) -> dict[str, Any]:
    cmd = [sys.executable, str(Path(__file__).resolve()), "--shared-pool-child", str(work)]
    if quick:
        cmd.append("--quick")
    proc = subprocess.run(cmd, stdout=subprocess.PIPE, text=True, check=False)
    if proc.returncode != 0:
        return {"error": f"child process exited with {proc.returncode}"}
    result: dict[str, Any] = json.loads(proc.stdout)
    return result


# --- main ------------------------------------------------------------------------------------


def environment(cpus: int | None) -> dict[str, Any]:
    opts = session_options()
    try:
        affinity: int | None = len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        affinity = None
    cpu_model = None
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.is_file():
        for line in cpuinfo.read_text().splitlines():
            if line.startswith("model name"):
                cpu_model = line.split(":", 1)[1].strip()
                break
    return {
        "python": platform.python_version(),
        "platform": platform.platform(),
        "machine": platform.machine(),
        "cpu_model": cpu_model,
        "os_cpu_count": cpus,
        "sched_affinity_cpus": affinity,
        "onnxruntime": ort.__version__,
        "onnxruntime_providers": ["CPUExecutionProvider"],
        "numpy": np.__version__,
        "intra_op_num_threads": (f"{opts.intra_op_num_threads} (0 = onnxruntime default: one "
                                 "thread per physical core)"),
        "inter_op_num_threads": opts.inter_op_num_threads,
        "thread_pools": "one intra-op pool per session (onnxruntime default), spinning allowed",
        "graph_optimization_level": str(opts.graph_optimization_level),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description="Equivariant-encryption overhead for all-MiniLM-L6-v2 (one JSON object on "
                    "stdout, progress on stderr).")
    parser.add_argument("--quick", action="store_true",
                        help="few repetitions: a smoke run, not for reporting")
    parser.add_argument("--no-extras", action="store_true",
                        help="only the headline measurements (skip the EXTRA attribution)")
    parser.add_argument("--shared-pool-child", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.shared_pool_child:
        print(json.dumps(shared_pool_child(args.shared_pool_child, args.quick)))
        return 0
    cases = QUICK_CASES if args.quick else FULL_CASES
    started = time.perf_counter()
    load_start = os.getloadavg() if hasattr(os, "getloadavg") else None

    with tempfile.TemporaryDirectory(prefix="ee_overhead-") as tmp:
        work = Path(tmp)
        t0 = time.perf_counter()
        log("importing all-MiniLM-L6-v2 (node_shards=2)")
        models.import_minilm(work / "model", node_shards=2)
        log("encrypting node shards (fresh CSPRNG key)")
        deployment = models.encrypt_model_dir(work / "model", work / "deploy")
        log("building the unsplit plaintext model")
        unsplit_bytes = models.build_minilm().SerializeToString()
        plain_manifest = models.Manifest.load(work / "model")
        plain_shards = [Shard.load(plain_manifest, s) for s in plain_manifest.shards]
        enc_manifest = models.Manifest.load(work / "deploy")
        enc_shards = [Shard.load(enc_manifest, s) for s in enc_manifest.shards]
        setup = Setup(
            tokenizer=models.TextTokenizer(work / "model" / "tokenizer.json", 256),
            unsplit=session(unsplit_bytes),
            plain_shards=plain_shards,
            enc_shards=enc_shards,
            enc_shards_no_sln=[
                Shard.load(enc_manifest, s, NO_SLN) if s.role == "node" else enc_shards[s.index]
                for s in enc_manifest.shards],
            enc_pipe=models.Pipeline(work / "deploy"),
            plain_pipe=models.Pipeline(work / "model"),
        )
        setup_s = time.perf_counter() - t0

        results = [run_case(c, setup, extras=not args.no_extras) for c in cases]
        if not args.no_extras:
            (work / "unsplit.onnx").write_bytes(unsplit_bytes)
            child = run_shared_pool_child(work, args.quick)
            for res, child_case in zip(results, child.get("cases", []), strict=False):
                res["extra"]["shared_thread_pool"] = {"note": child.get("note"), **child_case}
            if "error" in child:
                for res in results:
                    res["extra"]["shared_thread_pool"] = child

    load_end = os.getloadavg() if hasattr(os, "getloadavg") else None
    report = {
        "benchmark": "ee_overhead",
        "model": MODEL,
        "mode": "quick" if args.quick else "full",
        "timestamp_utc": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "deployment": {"encryption": deployment.encryption,
                       "node_shards": len(deployment.node_shards),
                       "key": "fresh CSPRNG key (encrypt_model_dir, seed=None)"},
        "method": ("every session warmed up first; the compared variants interleaved with the "
                   "order reversed every other rep (A B B A ...); time.perf_counter_ns around "
                   "each run; GC disabled while timing; median, p10, p90 in ms; ratio = "
                   "median(encrypted) / median(plain); ratio_paired_median = median over reps "
                   "of encrypted/plain from the same rep; other_process_load_cores = average "
                   "cores busy with other processes during a timed loop (from /proc/stat)"),
        "cases": results,
        "env": {**environment(os.cpu_count()), "loadavg_start": load_start,
                "loadavg_end": load_end},
        "setup_s": round(setup_s, 2),
        "wall_s": round(time.perf_counter() - started, 1),
    }
    print(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
