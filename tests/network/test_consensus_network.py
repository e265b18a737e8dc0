"""Consensus checks against real Byzantine nodes: a 5-node testnet, every node shard on 3 nodes,
node 4 started with --byzantine-test-mode (restarted once per mode). The client must catch every
corrupted hop, return only answers equal to the plaintext model's, and the rankings built from
its signed score reports must put the liar last.

Then frozen replicas (SIGSTOP, always SIGCONTed in a finally): verify=full never returns a single
node's answer as verified, a frozen replica costs one hedge delay and is then skipped, a receipt
whose cosignatures are late (a frozen witness) is reported as logged and pending, and the CLI
counts failed nodes, not replicas."""

from __future__ import annotations

import base64
import contextlib
import math
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
import trio

from models import Pipeline
from node.byzantine import MODES as BYZANTINE_MODES

REPO = Path(__file__).resolve().parents[2]
# full-mode queries per Byzantine mode: every node shard is on 3 of the 5 nodes and the client
# asks all 3, so the liar answers (and loses) in every query, for each shard it holds; after
# the first query the rest repeat the same verdicts, and each query's score report adds to the
# rankings, which put the liar last after the first mode's queries already
QUERIES = 8
TEXTS = ["a lying node must lose", "every answer is checked by three nodes"]


@pytest.fixture(scope="module")
def net(tmp_path_factory: pytest.TempPathFactory, deployment_dir: Path,
        minilm_dir: Path) -> Iterator[Any]:
    sys.path.insert(0, str(REPO / "scripts"))
    from localnet import Testnet

    with Testnet(tmp_path_factory.mktemp("byz") / "T", nodes=5, replicas=3,
                 deployment=deployment_dir, model=minilm_dir,
                 node_args=["--threads", "1", "--announce-interval", "2"],
                 byzantine=1, byzantine_mode="noise", log=lambda _: None) as testnet:
        yield testnet


@pytest.fixture(scope="module")
def plaintext(minilm_dir: Path) -> Pipeline:
    return Pipeline(minilm_dir)


def texts_for(query: int) -> list[str]:
    """Different inputs every query (a stale answer to an identical input would be right)."""
    return [f"query {query}: a lying node must lose", f"{query} answers, each checked thrice"]


def liar(net: Any, mode: str) -> Any:
    """Node 4, running in byzantine ``mode`` (restarted when it runs another mode)."""
    node = net.nodes[4]
    if node.byzantine != mode:
        net.stop_node(4)
        node.byzantine = mode
        net.start_node(4)
    return node


@pytest.mark.parametrize("mode", BYZANTINE_MODES)
def test_full_mode_catches_every_corrupted_hop(net: Any, plaintext: Pipeline,
                                               mode: str) -> None:
    from client import AsyncClient, Client

    byz = liar(net, mode)
    served_by_liar = {cid for cid, where in net.placement.items() if 4 in where}
    assert served_by_liar, "the Byzantine node serves no shard: the test would prove nothing"
    caught = 0
    with Client([net.bootstrap], net.deployment, verify="full", replicas=3, ledger=True,
                seed=7) as client:
        for query in range(QUERIES):
            texts = texts_for(query)
            result = client.embed(texts)
            # never a wrong answer
            assert np.abs(result.embeddings - plaintext.embed(texts)).max() <= 1e-4
            for hop in result.hops:
                assert hop.peer_id != byz.peer_id or hop.shard_cid not in served_by_liar
                verdict = hop.verdict
                assert verdict is not None and verdict["decided"]
                if byz.peer_id in verdict["nodes"]:  # the liar answered: it must have lost
                    assert byz.peer_id in verdict["losers"], verdict
                    assert byz.peer_id not in verdict["winners"]
                    caught += 1
                else:
                    assert verdict["losers"] == []
    assert caught >= 1, "the Byzantine node was never asked"

    # the rankings (from the clients' signed score reports in node 0's ledger) put it last
    deadline = time.monotonic() + 30
    while True:
        rows = httpx.get(f"{net.nodes[1].http}/v1/rankings", timeout=5).json()
        if len(rows) == 5 and rows[-1]["did"] == byz.did:
            break
        assert time.monotonic() < deadline, f"the liar {byz.did} is not last: {rows}"
        time.sleep(0.5)
    assert all(row["score"] > rows[-1]["score"] for row in rows[:-1])

    # a new client, which has seen nothing itself, plans by the network's ranking
    async def scores() -> tuple[float, list[float]]:
        async with AsyncClient([net.bootstrap], net.deployment, ledger=True) as fresh:
            assert fresh.router.rankings, "the client fetched no ranking snapshot"
            return (fresh.router.score(byz.peer_id),
                    [fresh.router.score(n.peer_id) for n in net.nodes if n is not byz])

    liar_score, honest_scores = trio.run(scores)
    assert liar_score < min(honest_scores)


def test_spot_mode_detects_an_always_cheating_node(net: Any) -> None:
    """p = 0.2: the cheater is caught. docs/consensus.md bounds the chance per hop it serves
    (the shard on n nodes, the checker drawn uniformly from the other n - 1) from below by
    p / (n - 1), however the ranking treats it. The seed fixes the client's draws, but the
    nodes' PeerIDs (and so the plans) differ per run, so the run is random: it may take up to
    the number of queries by which detection is 99.99% sure under that bound."""
    from client import Client

    byz = liar(net, "noise")
    served = [where for where in net.placement.values() if 4 in where]
    per_hop = 0.2 / (min(len(where) for where in served) - 1)
    per_query = 1 - (1 - per_hop) ** len(served)
    queries = math.ceil(math.log(1e-4) / math.log(1 - per_query))
    detected_at = None
    # ledger=False: no network rankings either (earlier tests ranked the liar last, and a client
    # that uses the rankings rightly avoids it): this measures spot checks alone
    with Client([net.bootstrap], net.deployment, verify="spot", spot_rate=0.2,
                seed=2026, ledger=False) as client:
        for query in range(1, queries + 1):
            result = client.embed(texts_for(query))
            if any(h.verdict and byz.peer_id in h.verdict["losers"] for h in result.hops):
                detected_at = query
                break
    assert detected_at is not None, \
        f"spot checks never caught the cheating node in {queries} queries"


def test_no_majority_fails_instead_of_answering(net: Any, tmp_path: Path) -> None:
    """Two answers that disagree and no third node: the query fails with a clear error."""
    from client import Client, QueryError

    liar(net, "zeros")
    shard_of_liar = next(cid for cid, where in net.placement.items() if 4 in where)
    stopped = next(i for i in net.placement[shard_of_liar] if i not in (0, 4))
    net.stop_node(stopped)
    try:
        with Client([net.bootstrap], net.deployment, verify="full", replicas=3,
                    hop_timeout=5, seed=1) as client, \
                pytest.raises(QueryError, match="no majority"):
            client.embed(TEXTS)
    finally:
        net.start_node(stopped)


# -- frozen replicas ------------------------------------------------------------------------------

@contextlib.contextmanager
def frozen(net: Any, *indices: int) -> Iterator[list[Any]]:
    """Nodes ``indices`` stopped with SIGSTOP (alive, connected, silent) until the block ends."""
    nodes = [net.nodes[i] for i in indices]
    stopped = []
    try:
        for node in nodes:
            os.kill(node.proc.pid, signal.SIGSTOP)
            stopped.append(node)
        yield nodes
    finally:
        for node in stopped:
            os.kill(node.proc.pid, signal.SIGCONT)


def first_shard_replicas(net: Any) -> tuple[str, list[int]]:
    """The first node shard's CID and its holders other than node 0 and the liar (node 4);
    freezing them leaves every other shard with a strict honest majority."""
    from models import Manifest

    shard = Manifest.load(net.deployment).node_shards[0].cid
    others = [i for i in net.placement[shard] if i not in (0, 4)]
    assert len(others) == 2 and not any(set(others) & set(where) for cid, where
                                        in net.placement.items() if cid != shard), net.placement
    return shard, others


def timed_queries_with_a_frozen_node(net: Any, victim: int, first: int, queries: int,
                                     ledger: bool) -> list[tuple[Any, float]]:
    """A warm full-mode client (failed nodes backed off for 120 s, so never probed again in a
    test): ``queries`` embeds of ``texts_for(first + 1 ..)`` while node ``victim`` is
    SIGSTOPped, each with its wall time."""
    from client import AsyncClient
    from client.health import PeerHealth

    async def main() -> list[tuple[Any, float]]:
        async with AsyncClient([net.bootstrap], net.deployment, verify="full",
                               replicas=3, ledger=ledger) as client:
            client.router.health = PeerHealth(base=120.0)
            await client.embed(texts_for(first))  # warm: connections open, latencies known
            out = []
            with frozen(net, victim):
                for q in range(queries):
                    started = time.monotonic()
                    result = await client.embed(texts_for(first + 1 + q))
                    out.append((result, time.monotonic() - started))
            return out

    return trio.run(main)


def test_frozen_replica_is_hedged_then_skipped(net: Any, plaintext: Pipeline) -> None:
    """A warm client, one replica SIGSTOPped: the first query ends after the hedge delay
    (default hop timeout 30 s: it used to wait for it), the next ones skip the frozen node."""
    liar(net, "zeros")
    shard, (victim, _) = first_shard_replicas(net)
    frozen_peer = net.nodes[victim].peer_id
    # ledger=False: this times the hops alone (receipts: the stalled-witness test below)
    runs = timed_queries_with_a_frozen_node(net, victim, 100, 3, ledger=False)
    for q, (result, elapsed) in enumerate(runs):
        assert elapsed < 12.0, f"query {q} took {elapsed:.1f} s with one replica frozen"
        assert np.abs(result.embeddings - plaintext.embed(texts_for(101 + q))).max() <= 1e-4
        assert result.verified
        for hop in result.hops:
            assert hop.verdict is not None and hop.verdict["decided"]
            assert frozen_peer not in hop.verdict["nodes"]
            assert all("\n" not in f and f for f in hop.failures), hop.failures
            assert hop.attempts == len(hop.verdict["nodes"]) + len(hop.failures)
            if q or hop.shard_cid != shard:
                assert not any(f.startswith(frozen_peer) for f in hop.failures), hop.failures
    first = next(h for h in runs[0][0].hops if h.shard_cid == shard)
    assert [f for f in first.failures if f.startswith(frozen_peer)] == [
        f for f in first.failures if re.fullmatch(
            rf"{frozen_peer}: no answer within [0-9.]+ s \(the hop was decided without it\)", f)]
    assert any(f.startswith(frozen_peer) for f in first.failures), first.failures


def test_slow_replica_is_hedged_to_the_next_candidate(net: Any, plaintext: Pipeline) -> None:
    """Two replicas wanted, the preferred one frozen: after the hedge delay the third node is
    asked too, and the two answers that agree decide the hop."""
    from client import AsyncClient

    liar(net, "zeros")
    shard, (victim, _) = first_shard_replicas(net)
    frozen_peer = net.nodes[victim].peer_id

    async def main() -> tuple[Any, float]:
        async with AsyncClient([net.bootstrap], net.deployment, verify="full",
                               replicas=3) as client:
            await client.embed(texts_for(199))  # warm: a connection to every replica is open
            client.policy.replicas = 2
            for _ in range(100):  # a node that served well so far: planned first
                client.router.reputation.record_verdict(frozen_peer, True)
            assert client.router.plan(shard)[0].peer_id == frozen_peer
            with frozen(net, victim):
                started = time.monotonic()
                result = await client.embed(texts_for(200))
                return result, time.monotonic() - started

    result, elapsed = trio.run(main)
    assert elapsed < 12.0, f"the query took {elapsed:.1f} s (hop timeout 30 s)"
    assert np.abs(result.embeddings - plaintext.embed(texts_for(200))).max() <= 1e-4
    hop = next(h for h in result.hops if h.shard_cid == shard)
    assert hop.verified and hop.verdict is not None
    assert sorted(hop.verdict["nodes"]) == sorted(hop.verdict["winners"])
    assert len(hop.verdict["nodes"]) == 2 and frozen_peer not in hop.verdict["nodes"]
    assert hop.attempts == 3 and len(hop.failures) == 1, hop
    assert hop.failures[0].startswith(f"{frozen_peer}: no answer within"), hop.failures


def test_full_mode_fails_when_one_replica_answers(net: Any, plaintext: Pipeline) -> None:
    """Both other replicas of a shard frozen: the one answer is not a verdict. The query fails
    naming the hop, the count and each frozen node's reason; allowed explicitly, the answer
    comes back marked unverified (the frozen nodes, backed off, are asked again as the hop's
    reserve, since without them no verdict is possible, and time out again)."""
    from client import AsyncClient, QueryError
    from client.health import PeerHealth
    from models import Manifest

    liar(net, "zeros")
    shard, others = first_shard_replicas(net)
    index = next(s.index for s in Manifest.load(net.deployment).node_shards if s.cid == shard)
    peers = [net.nodes[i].peer_id for i in others]

    async def main() -> tuple[str, Any]:
        async with AsyncClient([net.bootstrap], net.deployment, verify="full", replicas=3,
                               hop_timeout=3) as client:
            client.router.health = PeerHealth(base=120.0)  # still backed off for the second query
            with frozen(net, *others):
                with pytest.raises(QueryError) as info:
                    await client.embed(texts_for(300))
                client.policy.allow_unverified = True
                return str(info.value), await client.embed(texts_for(301))

    message, result = trio.run(main)
    lines = message.splitlines()
    assert lines[0].startswith(f"hop {index} (shard {shard}): verify=full needs two agreeing "
                               "answers, but only 1 of the 3 node(s) serving the shard "
                               "answered"), message
    assert "allow_unverified" in lines[0]
    for peer in peers:
        assert f"  - {peer}: no answer within 3 s" in lines, message
    assert np.abs(result.embeddings - plaintext.embed(texts_for(301))).max() <= 1e-4
    assert not result.verified
    for hop in result.hops:
        if hop.shard_cid != shard:
            assert hop.verified and hop.unverified_reason is None
            continue
        assert hop.verified is False and hop.verdict is None and hop.peer_id == net.nodes[0].peer_id
        reason = hop.unverified_reason or ""
        assert "only 1 of the 3 node(s) serving the shard answered" in reason, reason
        assert all(f"{peer}: no answer within 3 s" in reason for peer in peers), reason


def test_cli_full_mode_fails_cleanly_with_frozen_replicas(net: Any) -> None:
    """The same through `veilnet query`: exit 1, one line per failure on stderr, none of
    py-libp2p's multi-line reports."""
    liar(net, "zeros")
    _, others = first_shard_replicas(net)
    with frozen(net, *others):
        done = subprocess.run(
            [sys.executable, "-m", "node", "query", "frozen replicas", "--bootstrap",
             net.bootstrap, "--deployment", str(net.deployment), "--hop-timeout", "3"],
            cwd=REPO, capture_output=True, text=True, timeout=90)
    assert done.returncode == 1, (done.stdout, done.stderr)
    lines = done.stderr.splitlines()
    assert lines[0].startswith("veilnet: error: hop "), done.stderr
    assert all(line.startswith("  - ") for line in lines[1:]), done.stderr
    failures = [line for line in lines[1:] if "no answer within 3 s" in line]
    assert {line.split(":")[0][4:] for line in failures} == {
        net.nodes[i].peer_id for i in others}, done.stderr


def test_receipt_with_late_cosignatures_is_logged_and_pending(net: Any) -> None:
    """A witness frozen and a quorum of every witness: the entry is logged at an index, only
    its cosignatures are missing, and the result says so (not "not logged")."""
    from client import AsyncClient

    liar(net, "zeros")
    _, (victim, _) = first_shard_replicas(net)

    async def main() -> tuple[Any, Any]:
        async with AsyncClient([net.bootstrap], net.deployment, ledger=True,
                               witness_quorum=4, receipt_timeout=4) as client:
            with frozen(net, victim):
                late = await client.embed(texts_for(400))
            client.ledgers.witness_quorum = 5  # more than the 4 witnesses: refused before logging
            return late, await client.embed(texts_for(401))

    late, refused = trio.run(main)
    pending = late.receipt_pending
    assert late.receipt is None and pending is not None, late.receipt_error
    assert late.receipt_error and late.receipt_error.startswith(
        f"logged at index {pending.index}, witness cosignatures pending"), late.receipt_error
    assert pending.ledger == net.nodes[0].peer_id and pending.quorum == 4
    assert pending.proof_url == f"{net.nodes[0].http}/ledger/proof?index={pending.index}"
    rows = httpx.get(f"{net.nodes[0].http}/ledger/entries",
                     params={"from": pending.index, "to": pending.index}, timeout=5).json()
    assert [base64.b64decode(r["data"]) for r in rows] == [pending.entry]

    assert refused.receipt is None and refused.receipt_pending is None
    assert refused.receipt_error and "logged at index" not in refused.receipt_error


def test_cli_counts_failed_nodes_not_replicas(net: Any) -> None:
    """Replicated hops with no failure print no "failed"; a count of failed nodes matches
    the failures listed under it."""
    liar(net, "zeros")
    done = subprocess.run(
        [sys.executable, "-m", "node", "query", "count the failures", "--bootstrap",
         net.bootstrap, "--deployment", str(net.deployment), "--verify", "full"],
        cwd=REPO, capture_output=True, text=True, timeout=90)
    assert done.returncode == 0, done.stderr
    blocks = re.split(r"\n(?=  shard )", done.stdout.split("hops:\n", 1)[1])
    assert len(blocks) == 2, done.stdout
    for block in blocks:
        head, *rest = block.splitlines()
        listed = [line for line in rest if line.startswith("    failed: ")]
        counted = re.search(r"; (\d+) other node\(s\) failed\)", head)
        assert (int(counted.group(1)) if counted else 0) == len(listed), block
        assert "after" not in head, head
        assert re.search(r"verdict: [23] of 3 agree", block), block


def test_a_stalled_witness_does_not_hold_up_receipts(net: Any, plaintext: Pipeline) -> None:
    """One witness SIGSTOPped: it never answers its offer (the ledger gives up after 10 s),
    but the other witnesses cosign each new checkpoint at once, so receipts (quorum 1, logged
    by default) keep coming back within a few seconds instead of waiting behind it."""
    liar(net, "zeros")
    _, (victim, _) = first_shard_replicas(net)
    runs = timed_queries_with_a_frozen_node(net, victim, 200, 4, ledger=True)
    for q, (result, elapsed) in enumerate(runs):
        assert result.receipt is not None, (q, result.receipt_error)
        result.receipt.verify()
        assert np.abs(result.embeddings - plaintext.embed(texts_for(201 + q))).max() <= 1e-4
        if q:  # the first query also waits for the hedge delay on the frozen replica
            assert elapsed < 6.0, f"query {q} took {elapsed:.1f} s with a stalled witness"
