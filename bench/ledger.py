"""Transparency-log benchmark: append throughput and proof cost of ``ledger.log.Log``.

Everything is the real log: SQLite in WAL mode with synchronous=FULL (every commit is fsynced),
one Ed25519-signed C2SP checkpoint per committed batch, entries of 256 random bytes. It measures

- single appends: ``Log.append([entry])``, one entry per call (each a transaction, an fsync and
  a signed checkpoint) on a fresh log: ``single_appends_per_s``, the baseline;
- batched appends: a second fresh log grown with batches of ``--batch`` entries (default 1,000);
  the rate over its first ``--batched`` entries (default 100,000) is ``appends_per_s``, compared
  with the target of 10,000 appends/s and with the single-append baseline of the same run;
- at log sizes 1e3, 1e5 and 1e6 (the same log, grown on the way, up to ``--max-size``): median
  time to generate (``Log.inclusion``, ``Log.consistency``, ``Log.proof``) and verify
  (``ledger.merkle.verify_inclusion``, ``verify_consistency``, ``ledger.tlog_proof.verify_proof``
  which includes the Ed25519 signature check) proofs for random indexes and old sizes, after a
  warm-up; proof sizes in hashes and bytes; the SQLite file size per entry (after a WAL
  checkpoint). Target: inclusion verification under 100 us.

Timings use time.perf_counter; append timings cover only the ``append`` calls (random entries
are made outside them). Progress goes to stderr, one JSON object to stdout.

    .venv/bin/python bench/ledger.py [--max-size 1000000] [--single 2000] [--samples 500]
        [--batch 1000] [--dir DIR]
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import random
import sqlite3
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

# Run as a script, this file's directory comes first on sys.path and this module would shadow
# the ``ledger`` package it measures: put the repository there instead.
HERE = Path(__file__).resolve().parent
sys.path[:] = [str(HERE.parent)] + [p for p in sys.path if Path(p or ".").resolve() != HERE]

from ledger.log import DB_FILE, MAX_BATCH, Log  # noqa: E402
from ledger.merkle import (  # noqa: E402
    HASH_SIZE,
    leaf_hash,
    verify_consistency,
    verify_inclusion,
)
from ledger.tlog_proof import verify_proof  # noqa: E402

ENTRY_BYTES = 256
TARGET_APPENDS_PER_S = 10_000
TARGET_VERIFY_US = 100.0
SIZES = (1_000, 100_000, 1_000_000)
ORIGIN = "bench.veilnet.invalid/ledger"
WARMUP = 50


def log(message: str) -> None:
    print(f"ledger: {message}", file=sys.stderr, flush=True)


def random_entries(n: int) -> list[bytes]:
    blob = os.urandom(n * ENTRY_BYTES)
    return [blob[i * ENTRY_BYTES:(i + 1) * ENTRY_BYTES] for i in range(n)]


def quantiles(values: list[float], scale: float = 1.0, digits: int = 2) -> dict[str, float]:
    """p50, p95 and max of ``values`` times ``scale``."""
    ordered = sorted(values)
    p95 = ordered[min(len(ordered) - 1, int(0.95 * len(ordered)))]
    return {"p50": round(statistics.median(ordered) * scale, digits),
            "p95": round(p95 * scale, digits), "max": round(ordered[-1] * scale, digits)}


def timed(fn: Callable[[Any], Any], args: list[Any]) -> tuple[list[float], list[Any]]:
    """Run ``fn`` on every argument after a warm-up on the first ones; per-call seconds and
    results."""
    for a in args[:WARMUP]:
        fn(a)
    gc.collect()
    times, results = [], []
    clock = time.perf_counter
    for a in args:
        t0 = clock()
        r = fn(a)
        times.append(clock() - t0)
        results.append(r)
    return times, results


def db_bytes(directory: Path, lg: Log) -> tuple[int, int]:
    """(main file, WAL file) sizes after moving the WAL into the main file."""
    lg.store.db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    main = (directory / DB_FILE).stat().st_size
    wal = directory / (DB_FILE + "-wal")
    return main, wal.stat().st_size if wal.exists() else 0


def bench_single(directory: Path, count: int, budget_s: float) -> dict[str, Any]:
    lg = Log.init(directory, ORIGIN)
    try:
        entries = random_entries(count + 20)
        for e in entries[:20]:  # warm-up: page cache, statement cache
            lg.append([e])
        times: list[float] = []
        clock = time.perf_counter
        start = clock()
        for e in entries[20:]:
            t0 = clock()
            lg.append([e])
            times.append(clock() - t0)
            if t0 + times[-1] - start > budget_s:
                break
    finally:
        lg.close()
    total = sum(times)
    return {"appends": len(times), "seconds": round(total, 3),
            "single_appends_per_s": round(len(times) / total, 1),
            "latency_ms": quantiles(times, 1e3, 3)}


def measure_size(lg: Log, directory: Path, size: int, samples: int,
                 rng: random.Random) -> dict[str, Any]:
    """Proof generation and verification figures against the checkpoint at ``size``."""
    root = lg.root(size)
    store = lg.store
    # inclusion proofs for random indexes
    indexes = [rng.randrange(size) for _ in range(samples)]
    t_gen, proofs = timed(lambda i: lg.inclusion(i, size), indexes)
    leaves = [leaf_hash(store.entry(i)) for i in indexes]
    cases = list(zip(leaves, indexes, proofs, strict=True))
    t_ver, _ = timed(lambda c: verify_inclusion(c[0], c[1], size, c[2], root), cases)
    inc_len = [len(p) for p in proofs]
    # consistency proofs from random old sizes (any size, not only checkpointed ones)
    olds = [rng.randrange(1, size) for _ in range(samples)]
    t_cgen, cproofs = timed(lambda m: lg.consistency(m, size), olds)
    ccases = [(m, lg.root(m), p) for m, p in zip(olds, cproofs, strict=True)]
    t_cver, _ = timed(lambda c: verify_consistency(c[0], size, c[1], root, c[2]), ccases)
    con_len = [len(p) for p in cproofs]
    # C2SP tlog-proof texts: inclusion proof plus the signed checkpoint at this size
    t_tgen, texts = timed(lambda i: lg.proof(i, size), indexes)
    entries = [store.entry(i) for i in indexes]
    tcases = list(zip(texts, entries, strict=True))
    t_tver, checked = timed(lambda c: verify_proof(c[0], c[1], lg.verifier), tcases)
    assert all(cp.size == size and cp.root == root for cp in checked)
    text_bytes = [len(t.encode()) for t in texts]
    main, wal = db_bytes(directory, lg)
    us = 1e6
    return {
        "size": size, "samples": samples,
        "inclusion_gen_us": quantiles(t_gen, us), "inclusion_verify_us": quantiles(t_ver, us),
        "inclusion_hashes": {"p50": statistics.median_low(inc_len), "max": max(inc_len)},
        "inclusion_bytes_p50": statistics.median_low(inc_len) * HASH_SIZE,
        "consistency_gen_us": quantiles(t_cgen, us),
        "consistency_verify_us": quantiles(t_cver, us),
        "consistency_hashes": {"p50": statistics.median_low(con_len), "max": max(con_len)},
        "consistency_bytes_p50": statistics.median_low(con_len) * HASH_SIZE,
        "tlog_proof_gen_us": quantiles(t_tgen, us),
        "tlog_proof_verify_us": quantiles(t_tver, us),
        "tlog_proof_bytes": {"p50": statistics.median_low(text_bytes), "max": max(text_bytes)},
        "db_bytes": main, "wal_bytes_after_checkpoint": wal,
        "db_bytes_per_entry": round(main / size, 1),
    }


def summary(m: dict[str, Any]) -> str:
    return (f"size {m['size']}: inclusion gen {m['inclusion_gen_us']['p50']} us, verify "
            f"{m['inclusion_verify_us']['p50']} us ({m['inclusion_hashes']['p50']} hashes); "
            f"consistency gen {m['consistency_gen_us']['p50']} us, verify "
            f"{m['consistency_verify_us']['p50']} us; tlog-proof "
            f"{m['tlog_proof_bytes']['p50']} B, verify {m['tlog_proof_verify_us']['p50']} us; "
            f"{m['db_bytes_per_entry']} B/entry on disk")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--max-size", type=int, default=SIZES[-1],
                        help="grow the batched log to this size (default 1000000); figures are "
                        "taken at each of 1e3, 1e5, 1e6 up to it, and at this size")
    parser.add_argument("--batched", type=int, default=100_000,
                        help="entries over which the batched rate is measured (default 100000)")
    parser.add_argument("--batch", type=int, default=1_000,
                        help=f"entries per append call (default 1000, at most {MAX_BATCH})")
    parser.add_argument("--single", type=int, default=2_000,
                        help="single appends to time (default 2000)")
    parser.add_argument("--single-seconds", type=float, default=60.0,
                        help="stop the single appends after this long (default 60)")
    parser.add_argument("--samples", type=int, default=500,
                        help="samples per proof figure (default 500, at least 200)")
    parser.add_argument("--seed", type=int, default=1, help="seed for the random indexes")
    parser.add_argument("--dir", type=Path,
                        help="directory for the two logs, 'single' and 'batched', which must "
                        "not exist yet (default: a temporary one)")
    args = parser.parse_args(argv)
    if not 1 <= args.batch <= MAX_BATCH:
        parser.error(f"--batch must be between 1 and {MAX_BATCH}")
    if args.max_size < 2 or args.single < 1 or args.samples < 200:
        parser.error("--max-size must be at least 2, --single at least 1, --samples at least 200")
    sizes = sorted({s for s in SIZES if s <= args.max_size} | {args.max_size})
    batched_n = min(args.batched, args.max_size)
    rng = random.Random(args.seed)
    started = time.perf_counter()
    load_start = os.getloadavg()

    with tempfile.TemporaryDirectory(prefix="veilnet-bench-ledger-") as tmp:
        root = args.dir or Path(tmp)
        log(f"single appends: up to {args.single} x append([{ENTRY_BYTES} B]) in {root}")
        single = bench_single(root / "single", args.single, args.single_seconds)
        single_rate = single["single_appends_per_s"]
        log(f"single appends: {single['appends']} in {single['seconds']} s = "
            f"{single_rate}/s (p50 {single['latency_ms']['p50']} ms)")

        directory = root / "batched"
        lg = Log.init(directory, ORIGIN)
        batch_times: list[float] = []
        batched_s: float | None = None
        per_size: dict[str, dict[str, Any]] = {}
        clock = time.perf_counter
        try:
            for target in sizes:
                while lg.size < target:
                    n = min(args.batch, target - lg.size)
                    entries = random_entries(n)
                    t0 = clock()
                    lg.append(entries)
                    batch_times.append(clock() - t0)
                    if batched_s is None and lg.size >= batched_n:
                        batched_s = sum(batch_times)
                        log(f"batched appends: {lg.size} in {batched_s:.2f} s = "
                            f"{lg.size / batched_s:,.0f}/s")
                    if lg.size % 100_000 == 0:
                        log(f"grown to {lg.size:,} entries ({sum(batch_times):.1f} s of appends)")
                log(f"measuring proofs at size {target:,}")
                per_size[str(target)] = measure_size(lg, directory, target, args.samples, rng)
                log(summary(per_size[str(target)]))
        finally:
            lg.close()
    assert batched_s is not None
    build_s = sum(batch_times)
    rate = round(batched_n / batched_s, 1)
    verify_p50 = max(m["inclusion_verify_us"]["p50"] for m in per_size.values())
    out = {
        "machine": {"cores": os.cpu_count(), "python": platform.python_version(),
                    "sqlite": sqlite3.sqlite_version, "loadavg_1m_start": load_start[0],
                    "loadavg_1m_end": os.getloadavg()[0]},
        "entry_bytes": ENTRY_BYTES,
        "sqlite": "WAL, synchronous=FULL; one Ed25519-signed checkpoint per append call",
        "single": single,
        "single_appends_per_s": single_rate,
        "batch_size": args.batch,
        "batched_entries": batched_n,
        "batched_seconds": round(batched_s, 3),
        "appends_per_s": rate,
        "batched_appends_per_s": rate,
        "batched_over_single": round(rate / single_rate, 1),
        "target_appends_per_s": TARGET_APPENDS_PER_S,
        "target_met": rate >= TARGET_APPENDS_PER_S,
        "build": {"size": args.max_size, "append_calls": len(batch_times),
                  "append_seconds": round(build_s, 2),
                  "build_appends_per_s": round(args.max_size / build_s, 1),
                  "batch_latency_ms": quantiles(batch_times, 1e3, 2)},
        "sizes": per_size,
        "inclusion_verify_target_us": TARGET_VERIFY_US,
        "inclusion_verify_p50_worst_us": verify_p50,
        "inclusion_verify_target_met": verify_p50 < TARGET_VERIFY_US,
        "total_seconds": round(time.perf_counter() - started, 1),
    }
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
