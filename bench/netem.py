"""Latency over links that are not loopback: a 3-node testnet (one node shard per node,
EE-encrypted, replicas 1) with every node and the client in its own network namespace, joined
by scripts/netem.py's userspace link emulator, at one-way delays of 0, 20 and 50 ms and losses
of 0, 1 and 5 % on every host's egress (all 9 combinations, the same testnet retuned live).

``--model minilm`` (default, "bench": "netem"): embedding latency of MiniLM. Per condition the
median embedding latency of N queries on a warm client (connections and streams open) and of M
cold ones (the first ``embed`` of a new client: dials, first streams; and its open + embed +
close: card lookup included), the ratio to the 0 ms / 0 % baseline measured in the same run,
the median hop latencies, the round trips that explain the extra time (extra ms / (2 x delay):
per warm query, per cold query, per hop), and the emulator's packet counts per query
(forwarded, dropped, per (sender->receiver) pair).

``--model smollm2`` ("bench": "netem-generate"): greedy generation of T tokens with
SmolLM2-135M-Instruct (ee-decoder/1) on a warm client (one generation after each retune to
settle, then G measured). Per condition: time to first token (the prefill through every hop),
decode ms per token and tokens/s (the first token excluded), each hop's mean latency per step
(the prefill and one per token fed back) with the part its node spent in onnxruntime (from the
node's /metrics) and the rest (off the node: links, libp2p, serialisation), ratios to the
baseline, the round trips that explain the extra time (per generated token, for the first
token, per hop step: all of it, and off the node, which the machine's load hardly moves),
packets per generated token, and whether the tokens equal the baseline's (``tokens_equal``:
greedy decoding is deterministic). The client steps every hop in turn and each node keeps its
KV cache, so a token should cost one round trip per hop. The baseline is measured once more at
the end (``baseline_repeat``): how much the compute drifted on a busy machine.

Receipts are off (no ledger node): this measures the inference path. Nodes run ``--threads
1``. Prints one JSON object; progress goes to stderr. Needs root and iproute2.

    .venv/bin/python bench/netem.py [--queries 10] [--cold 3] [--dir DIR] [--mtu 65000]
    .venv/bin/python bench/netem.py --model smollm2 [--tokens 16] [--generations 4]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
# bench/ledger.py would shadow the ledger package the client imports: bench/ leaves the path
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != REPO / "bench"]
sys.path.insert(0, str(REPO / "scripts"))
sys.path.insert(0, str(REPO))

DELAYS_MS = (0, 20, 50)
LOSSES_PCT = (0, 1, 5)
NODES = 3  # one node shard per node, replicas 1
TEXT = "Encrypted inference keeps activations private, query {}."
PROMPT = ("Explain, step by step and in plain words, why the sky is blue during the day and "
          "red at sunset.")  # a chat message; the answer is longer than --tokens

Ask = Callable[[dict[str, Any]], dict[str, Any]]


def log(message: str) -> None:
    print(f"netem: {message}", file=sys.stderr, flush=True)


# -- the worker: runs in the client's namespace, one JSON job per stdin line ------------------


def worker(bootstrap: str, deployment: str, kind: str) -> None:
    import trio

    from client import AsyncClient
    from protocols.transport import quiet_libraries

    quiet_libraries()

    def new_client() -> AsyncClient:
        return AsyncClient([bootstrap], deployment, verify="none", ledger=False)

    async def embed(client: AsyncClient, i: int) -> dict[str, Any]:
        start = time.perf_counter()
        result = await client.embed([TEXT.format(i)])
        return {"ms": (time.perf_counter() - start) * 1000,
                "hops": [h.latency_ms for h in result.hops],
                "retries": sum(h.attempts - 1 for h in result.hops)}

    async def generate(client: AsyncClient, tokens: int) -> dict[str, Any]:
        result = await client.generate(messages=[{"role": "user", "content": PROMPT}],
                                       max_tokens=tokens, temperature=0)
        return {"ttft_ms": (result.time_to_first_token_s or float("nan")) * 1000,
                "decode_ms": result.decode_ms, "tokens": result.token_ids,
                "finish": result.finish_reason,
                "hops": [{"ms": h.latency_ms, "steps": h.steps, "peer": h.peer_id,
                          "replays": h.replays + h.checks} for h in result.hops]}

    async def main() -> None:
        count = 0
        async with new_client() as warm:
            for line in sys.stdin:
                job = json.loads(line)
                out: dict[str, Any] = {"warm": [], "cold": [], "gen": []}
                if kind == "smollm2":  # after a retune: a job with one generation to settle
                    for _ in range(job["settle"]):
                        await generate(warm, job["tokens"])
                    for _ in range(job["gen"]):
                        out["gen"].append(await generate(warm, job["tokens"]))
                    print(json.dumps(out), flush=True)
                    continue
                await embed(warm, count)  # after a retune: one query to settle
                for _ in range(job["warm"]):
                    count += 1
                    out["warm"].append(await embed(warm, count))
                for _ in range(job["cold"]):
                    count += 1
                    start = time.perf_counter()
                    async with new_client() as cold:
                        one = await embed(cold, count)
                    one["open_ms"] = (time.perf_counter() - start) * 1000  # open+embed+close
                    out["cold"].append(one)
                print(json.dumps(out), flush=True)

    trio.run(main)


# -- the parent ---------------------------------------------------------------------------------


def median(values: list[float]) -> float:
    return round(statistics.median(values), 2) if values else float("nan")


def p90(values: list[float]) -> float:
    return round(sorted(values)[int(0.9 * (len(values) - 1))], 2) if values else float("nan")


def packets(before: dict[str, Any], after: dict[str, Any], count: int,
            unit: str = "query") -> dict[str, Any]:
    """The emulator's packets between two counter dumps, per ``unit`` (``count`` of them)."""
    pairs, client = {}, 0
    for pair, now in after.get("pairs", {}).items():
        was = before.get("pairs", {}).get(pair, {})
        n = now.get("packets", 0) - was.get("packets", 0)
        if n:
            pairs[pair] = round(n / count, 1)
        if "client" in pair:
            client += n
    fwd = after.get("forwarded", 0) - before.get("forwarded", 0)
    drop = after.get("dropped", 0) - before.get("dropped", 0)
    return {"forwarded": fwd, "dropped": drop, f"per_{unit}": round(fwd / count, 1),
            f"dropped_per_{unit}": round(drop / count, 2),
            # the query's own packets (the rest is the nodes' gossip and announcements)
            f"client_per_{unit}": round(client / count, 1), f"per_pair_per_{unit}": pairs}


@contextlib.contextmanager
def testnet(args: argparse.Namespace, root: Path) -> Iterator[tuple[Any, Any, Ask, dict]]:
    """Yields the links, the testnet, ``ask`` (one job to the client worker: its answer) and a
    dict that holds the emulator's final counters on exit."""
    from localnet import Testnet, prepare_model
    from netem import Links

    model, deployment = prepare_model(root, NODES, log, kind=args.model)
    hosts = [*(f"n{i}" for i in range(NODES)), "client"]
    totals: dict[str, Any] = {}
    with Links(root, hosts, "", seed=args.seed, mtu=args.mtu, log=log) as links, \
            Testnet(root, NODES, 1, deployment=deployment, model=model, kind=args.model,
                    node_args=["--threads", "1"], ledger_nodes=(),
                    hosts=[links.address(h) for h in hosts[:NODES]],
                    launcher=lambda node, cmd: links.wrap(f"n{node.index}", cmd),
                    timeout=120 if args.model == "smollm2" else 60, log=log,
                    progress=log) as net:
        cmd = links.wrap("client", [sys.executable, str(Path(__file__).resolve()), "--model",
                                    args.model, "--worker", net.bootstrap, str(deployment)])
        proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
                                cwd=REPO)

        def ask(job: dict[str, Any]) -> dict[str, Any]:
            assert proc.stdin is not None and proc.stdout is not None
            proc.stdin.write(json.dumps(job) + "\n")
            proc.stdin.flush()
            line = proc.stdout.readline()
            if not line:
                raise RuntimeError("the client worker died (see stderr)")
            return json.loads(line)

        try:
            yield links, net, ask, totals
        finally:
            if proc.stdin is not None:
                proc.stdin.close()
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        totals.update(links.stats())


def conditions(links: Any) -> Iterator[tuple[str, int, int]]:
    """Every (delay, loss) combination, the links retuned to it before it is yielded."""
    for delay in DELAYS_MS:
        for loss in LOSSES_PCT:
            links.set_netem(f"delay {delay}ms loss {loss}%")
            yield f"delay{delay}ms_loss{loss}pct", delay, loss


def measure_embed(args: argparse.Namespace, links: Any, ask: Ask) -> dict[str, Any]:
    results: dict[str, Any] = {}
    ask({"warm": args.queries, "cold": 0})  # warm-up, not measured
    ask({"warm": 0, "cold": 2})
    for name, delay, loss in conditions(links):
        for kind, n in (("warm", args.queries), ("cold", args.cold)):
            before = links.stats()
            runs = ask({"warm": n if kind == "warm" else 0, "cold": n if kind == "cold" else 0})[
                kind]
            after = links.stats()
            results.setdefault(name, {"delay_ms": delay, "loss_pct": loss})[kind] = {
                "median_ms": median([r["ms"] for r in runs]),
                **({"open_embed_close_median_ms": median([r["open_ms"] for r in runs])}
                   if kind == "cold" else {}),
                "p90_ms": p90([r["ms"] for r in runs]),
                "hop_median_ms": [median([r["hops"][i] for r in runs])
                                  for i in range(len(runs[0]["hops"]))],
                "retries": sum(r["retries"] for r in runs), "n": len(runs),
                # packets per query include the one settling query before the warm runs
                # (warm) or the client set-up and close (cold)
                "packets": packets(before, after, n + (1 if kind == "warm" else 0))}
        w, c = results[name]["warm"], results[name]["cold"]
        log(f"{name}: warm {w['median_ms']} ms, cold {c['median_ms']} ms, "
            f"{w['packets']['dropped']} + {c['packets']['dropped']} dropped")
    base = results["delay0ms_loss0pct"]
    for entry in results.values():
        rtt = 2 * entry["delay_ms"]
        for kind in ("warm", "cold"):
            e, b = entry[kind], base[kind]
            e["ratio_to_baseline"] = round(e["median_ms"] / b["median_ms"], 3)
            if rtt and entry["loss_pct"] == 0:
                e["round_trips"] = round((e["median_ms"] - b["median_ms"]) / rtt, 2)
                if kind == "cold":
                    e["open_embed_close_round_trips"] = round(
                        (e["open_embed_close_median_ms"] - b["open_embed_close_median_ms"])
                        / rtt, 2)
                e["hop_round_trips"] = [round((h - hb) / rtt, 2) for h, hb in
                                        zip(e["hop_median_ms"], b["hop_median_ms"], strict=True)]
    return {"queries_warm": args.queries, "queries_cold": args.cold, "conditions": results}


def node_runs(net: Any) -> dict[str, tuple[float, float]]:
    """Per node PeerID: (seconds, runs) of its shard runs so far (onnxruntime only), read from
    its /metrics through the emulator's root leg (control traffic: not delayed, not counted)."""
    out = {}
    for node in net.nodes:
        with urllib.request.urlopen(f"{node.http}/metrics", timeout=10) as response:
            text = response.read().decode()
        value = {m[1]: float(m[2]) for m in re.finditer(
            r"^veilnet_shard_run_seconds_(sum|count) (\S+)$", text, re.M)}
        out[node.peer_id] = (value.get("sum", 0.0), value.get("count", 0.0))
    return out


def generation_summary(runs: list[dict[str, Any]], reference: list[int], stats: tuple[Any, Any],
                       node: tuple[Any, Any]) -> dict[str, Any]:
    """One condition's generations (the worker's answer) with the emulator's counters and the
    nodes' shard-run times before and after them."""
    decode = [ms for r in runs for ms in r["decode_ms"]]
    hops = range(len(runs[0]["hops"]))
    steps = [sum(r["hops"][i]["steps"] for r in runs) for i in hops]
    hop_ms = [round(sum(r["hops"][i]["ms"] for r in runs) / steps[i], 2) for i in hops]
    run_ms = []  # per hop: the mean onnxruntime time of its node's runs over the same steps
    for i in hops:
        (s0, n0), (s1, n1) = (node[k][runs[0]["hops"][i]["peer"]] for k in (0, 1))
        run_ms.append(round((s1 - s0) * 1000 / (n1 - n0), 2) if n1 > n0 else float("nan"))
    return {
        "n": len(runs), "tokens": [len(r["tokens"]) for r in runs],
        "finish_reasons": sorted({r["finish"] for r in runs}),
        "ttft_median_ms": median([r["ttft_ms"] for r in runs]),
        "decode_ms_per_token_median": median(decode), "decode_ms_per_token_p90": p90(decode),
        "tokens_per_s": round(1000 / statistics.fmean(decode), 2) if decode else None,
        # means over every step (the prefill and one per token fed back) of the G generations
        "hop_ms_per_step": hop_ms, "hop_node_run_ms_per_step": run_ms,
        "hop_off_node_ms_per_step": [round(h - r, 2) for h, r in zip(hop_ms, run_ms,
                                                                      strict=True)],
        "hop_steps": steps, "replays": sum(h["replays"] for r in runs for h in r["hops"]),
        "tokens_equal": all(r["tokens"] == reference for r in runs),
        "packets": packets(*stats, sum(len(r["tokens"]) for r in runs), "token")}


def measure_generate(args: argparse.Namespace, links: Any, net: Any, ask: Ask) -> dict[str, Any]:
    results: dict[str, Any] = {}
    reference: list[int] = []  # the 0 ms / 0 % run's first generation
    ask({"settle": 2, "gen": 0, "tokens": args.tokens})  # warm-up, not measured

    def one() -> dict[str, Any]:
        ask({"settle": 1, "gen": 0, "tokens": args.tokens})  # after a retune: one to settle
        stats, node = links.stats(), node_runs(net)
        runs = ask({"settle": 0, "gen": args.generations, "tokens": args.tokens})["gen"]
        reference[:] = reference or runs[0]["tokens"]
        return generation_summary(runs, reference, (stats, links.stats()),
                                  (node, node_runs(net)))

    for name, delay, loss in conditions(links):
        results[name] = e = {"delay_ms": delay, "loss_pct": loss, **one()}
        log(f"{name}: first token {e['ttft_median_ms']} ms, {e['decode_ms_per_token_median']} "
            f"ms/token ({e['tokens_per_s']} tokens/s), hops {e['hop_ms_per_step']} ms/step "
            f"({e['hop_node_run_ms_per_step']} on the nodes), {e['packets']['dropped']} "
            f"dropped, tokens equal: {e['tokens_equal']}")
    links.set_netem("delay 0ms loss 0%")  # the baseline again: how much the machine drifted
    repeat = {"delay_ms": 0, "loss_pct": 0, **one()}
    log(f"baseline again: first token {repeat['ttft_median_ms']} ms, "
        f"{repeat['decode_ms_per_token_median']} ms/token")
    base = results["delay0ms_loss0pct"]

    def trips(key: str, e: dict[str, Any], rtt: int) -> list[float]:
        return [round((h - hb) / rtt, 2) for h, hb in zip(e[key], base[key], strict=True)]

    for e in [*results.values(), repeat]:
        e["ratio_to_baseline"] = {
            "ttft": round(e["ttft_median_ms"] / base["ttft_median_ms"], 3),
            "decode_ms_per_token": round(e["decode_ms_per_token_median"]
                                         / base["decode_ms_per_token_median"], 3),
            "tokens_per_s": round(e["tokens_per_s"] / base["tokens_per_s"], 3)}
        rtt = 2 * e["delay_ms"]
        if rtt and e["loss_pct"] == 0:
            per_token = e["decode_ms_per_token_median"] - base["decode_ms_per_token_median"]
            e["round_trips_per_token"] = round(per_token / rtt, 2)
            e["round_trips_per_token_per_hop"] = round(per_token / rtt / NODES, 2)
            e["ttft_round_trips"] = round((e["ttft_median_ms"] - base["ttft_median_ms"]) / rtt,
                                          2)
            e["hop_round_trips_per_step"] = trips("hop_ms_per_step", e, rtt)
            # the nodes' compute taken out: what the links added, whatever the machine's load
            e["hop_off_node_round_trips_per_step"] = trips("hop_off_node_ms_per_step", e, rtt)
    return {"model": "SmolLM2-135M-Instruct (ee-decoder/1)", "prompt": PROMPT,
            "max_tokens": args.tokens, "generations": args.generations,
            "baseline_token_ids": reference,
            "tokens_equal": all(e["tokens_equal"] for e in [*results.values(), repeat]),
            # 0 ms / 0 % once more after the 9 conditions: the drift of a busy machine
            "baseline_repeat": repeat, "conditions": results}


def run(args: argparse.Namespace, root: Path) -> dict[str, Any]:
    generate = args.model == "smollm2"
    with testnet(args, root) as (links, net, ask, totals):
        measured = (measure_generate(args, links, net, ask) if generate
                    else measure_embed(args, links, ask))
    results = measured.pop("conditions")
    return {"bench": "netem-generate" if generate else "netem", "nodes": NODES,
            "node_shards": NODES, "replicas": 1, "mtu": args.mtu, **measured, "seed": args.seed,
            "emulator": "userspace (scripts/netem.py): netem on every host's egress, so a round "
                        "trip between two hosts is 2 x delay",
            "cpus": os.cpu_count(), "loadavg_end": [round(x, 2) for x in os.getloadavg()],
            "conditions": results,
            "emulator_totals": {k: totals.get(k) for k in ("forwarded", "forwarded_bytes",
                                                            "dropped")}}


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        epilog="minilm: embedding latency (--queries, --cold); smollm2: generation tokens/s "
               "(--tokens, --generations) with the per-hop round trips that explain them. "
               "Needs root and iproute2.")
    parser.add_argument("--model", choices=("minilm", "smollm2"), default="minilm",
                        help="minilm: embedding latency (default); smollm2: generation")
    parser.add_argument("--queries", type=int, default=10, help="minilm: warm queries per "
                        "condition")
    parser.add_argument("--cold", type=int, default=3, help="minilm: cold-client queries per "
                        "condition")
    parser.add_argument("--tokens", type=int, default=16, help="smollm2: tokens per generation "
                        "(greedy; default 16)")
    parser.add_argument("--generations", type=int, default=4, help="smollm2: measured "
                        "generations per condition, after one to settle (default 4)")
    parser.add_argument("--dir", type=Path, help="testnet directory (default: a temporary one)")
    parser.add_argument("--mtu", type=int, default=65000, help="MTU of every link")
    parser.add_argument("--seed", type=int, default=1, help="seed of the emulator's loss")
    parser.add_argument("--worker", nargs=2, metavar=("BOOTSTRAP", "DEPLOYMENT"),
                        help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(*args.worker, args.model)
        return 0
    if args.tokens < 2 or args.generations < 1:
        parser.error("--tokens must be at least 2 and --generations at least 1")
    started = time.monotonic()
    root = Path(args.dir or tempfile.mkdtemp(prefix="veilnet-bench-netem-")).absolute()
    try:
        doc = run(args, root)
    finally:
        if args.dir is None:
            shutil.rmtree(root, ignore_errors=True)
    doc["wall_s"] = round(time.monotonic() - started, 1)
    print(json.dumps(doc, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
