"""Integration tests of the client SDK (``Client``, ``AsyncClient``) and ``veilnet query``
against honest nodes: the honest path, streams closed by an idle node, bad arguments, the CLI,
full verification refusing a single node's answer, and the client shards as the secret (modes
and CIDs).

Nodes are real ``veilnet node start`` subprocesses; nothing of the client or the node is mocked.
``honest`` is the only node serving the shards here, so the honest-path tests use
``verify="none"`` (one node per hop); replicated hops are tested in test_consensus_network.py.
The fixtures (``honest``, ``manifest``, ``expected``) and the checks live in client_fixtures.py;
misbehaving nodes and unreachable bootstraps are tested in test_client_faults.py; the checks that
need no node (bad arguments, readable or tampered client shards, failure memory) are in
tests/unit/client/test_client_offline.py.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

import httpx
import numpy as np
import pytest
import trio
from client_fixtures import (
    TEXTS,
    assert_honest_hops,
    assert_hop_signed,
    assert_matches,
    closed_port_addr,
)
from node_helpers import REPO, NodeProcess, metric_value, start_node, stop_at_teardown

from client import AsyncClient, Client, EmbedResult, QueryError
from crypto.identity import public_from_peer_id, verify
from models import Manifest
from node.store import ShardStore
from protocols.infer import receipt_payload

pytest_plugins = ["client_fixtures"]


# -- 1. honest path -----------------------------------------------------------------------------

def test_client_honest_path(honest: NodeProcess, deployment_dir: Path, manifest: Manifest,
                            expected: np.ndarray) -> None:
    with Client([honest.addr], deployment_dir, verify="none") as client:
        result = client.embed(TEXTS)
        assert_matches(result.embeddings, expected)
        assert_honest_hops(result, honest, manifest)
        again = client.embed(TEXTS[::-1])  # the client stays usable; nothing is cached wrongly
        assert_matches(again.embeddings, expected[::-1])
        assert {h.request_id for h in again.hops}.isdisjoint(h.request_id for h in result.hops)
        json.dumps([h.to_json() for h in result.hops])  # HopRecord is JSON-ready
    with pytest.raises(RuntimeError, match="closed"):
        client.embed(TEXTS)
    with pytest.raises(RuntimeError, match="closed"):
        client.refresh()
    client.close()  # closing twice is harmless


def test_streams_closed_by_an_idle_node_are_replaced(request: pytest.FixtureRequest,
                                                    deployment_dir: Path, tmp_path: Path,
                                                    manifest: Manifest,
                                                    expected: np.ndarray) -> None:
    """The client reuses infer streams; a node closes idle ones (here after 1 s). A query after
    that must open new streams to the same node, not count the node as failed."""
    ShardStore(tmp_path / "D").add_deployment(deployment_dir)
    node = stop_at_teardown(request, start_node(tmp_path / "D", "--idle-timeout", "1"))
    with Client([node.addr], deployment_dir, verify="none") as client:
        first = client.embed(TEXTS)
        time.sleep(2.5)  # every pooled stream is now closed by the node
        second = client.embed(TEXTS)
    for result in (first, second):
        assert_matches(result.embeddings, expected)
        assert_honest_hops(result, node, manifest)
        assert all(h.attempts == 1 and not h.failures for h in result.hops), result.hops
    served = metric_value(httpx.get(f"{node.http}/metrics", timeout=5).text,
                          "veilnet_requests_total", protocol="/veilnet/infer/1")
    assert served == 2 * len(manifest.node_shards)


def test_async_client_honest_path(honest: NodeProcess, deployment_dir: Path, manifest: Manifest,
                                  expected: np.ndarray) -> None:
    async def main() -> EmbedResult:
        with trio.fail_after(60):
            async with AsyncClient([honest.addr], deployment_dir, verify="none") as client:
                peers = {r.peer_id: r for r in await client.refresh()}
                assert peers[honest.peer_id].did == honest.info["did"]
                providers = client.router.providers(manifest.node_shards[0].cid)
                assert [r.peer_id for r in providers] == [honest.peer_id]
                return await client.embed(TEXTS)

    result = trio.run(main)
    assert_matches(result.embeddings, expected)
    assert_honest_hops(result, honest, manifest)


def test_async_client_unusable_outside_its_context(honest: NodeProcess,
                                                   deployment_dir: Path) -> None:
    """Like ``Client`` after close(), an AsyncClient not (or no longer) inside ``async with``
    must refuse calls with a RuntimeError saying so, not reach for a closed libp2p host."""
    async def main() -> None:
        with trio.fail_after(30):
            client = AsyncClient([honest.addr], deployment_dir, verify="none")
            with pytest.raises(RuntimeError, match=r"async with|closed|not open"):
                await client.embed(TEXTS)
            async with client:
                await client.embed(TEXTS)
            with pytest.raises(RuntimeError, match=r"async with|closed|not open") as info:
                await client.embed(TEXTS)
            assert not isinstance(info.value, QueryError), (
                f"a closed client blamed the network: {info.value}")

    trio.run(main)


# -- 2. bad arguments ---------------------------------------------------------------------------

def test_bad_texts(honest: NodeProcess, deployment_dir: Path) -> None:
    with Client([honest.addr], deployment_dir, verify="none") as client:
        with pytest.raises(TypeError):
            client.embed("a string")
        with pytest.raises(ValueError):
            client.embed([])
        assert client.embed(["still usable"]).embeddings.shape[0] == 1


# -- 3. veilnet query ---------------------------------------------------------------------------

def veilnet_query(*args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "node", "query", *args], cwd=REPO,
                          capture_output=True, text=True, timeout=timeout)


def test_cli_query(honest: NodeProcess, deployment_dir: Path, manifest: Manifest,
                   expected: np.ndarray) -> None:
    common = ["--bootstrap", honest.addr, "--deployment", str(deployment_dir), "--verify",
              "none"]
    done = veilnet_query(*TEXTS, *common, "--json")
    assert done.returncode == 0, done.stderr
    lines = done.stdout.strip().splitlines()
    assert len(lines) == 1, done.stdout
    doc = json.loads(lines[0])
    assert set(doc) == {"embeddings", "hops", "receipt", "receipt_error", "receipt_pending"}
    # receipts are on by default; this network has no ledger node, and the answer stands
    assert doc["receipt"] is None and doc["receipt_pending"] is None
    assert "no ledger node is known" in doc["receipt_error"]
    assert_matches(np.asarray(doc["embeddings"], dtype=np.float32), expected)
    assert [h["shard_cid"] for h in doc["hops"]] == [s.cid for s in manifest.node_shards]
    for hop in doc["hops"]:
        assert hop["node_did"] == honest.info["did"]
        assert hop["peer_id"] == honest.peer_id
        assert isinstance(hop["latency_ms"], float) and hop["latency_ms"] > 0
        assert hop["failures"] == []
        assert verify(public_from_peer_id(honest.peer_id), bytes.fromhex(hop["signature"]),
                      receipt_payload(hop["request_id"], hop["shard_cid"],
                                      bytes.fromhex(hop["input_digest"]),
                                      bytes.fromhex(hop["output_digest"])))

    done = veilnet_query(*TEXTS, *common)
    assert done.returncode == 0, done.stderr
    out = done.stdout
    for text in TEXTS:
        assert repr(text[:48]) in out
    assert "hops:" in out
    hop_lines = [line for line in out.splitlines() if line.strip().startswith("shard ")]
    assert len(hop_lines) == len(manifest.node_shards), out
    for line, shard in zip(hop_lines, manifest.node_shards, strict=True):
        assert f"shard {shard.index} {shard.cid[:16]}" in line, line
        assert honest.peer_id in line and "signature verified" in line, line
        assert "failed" not in line, line


def test_cli_query_unreachable_bootstrap(deployment_dir: Path) -> None:
    addr = closed_port_addr()
    started = time.monotonic()
    done = veilnet_query("hello", "--bootstrap", addr, "--deployment", str(deployment_dir),
                         "--json")
    assert time.monotonic() - started < 30
    assert done.returncode == 1, (done.returncode, done.stderr)
    assert done.stdout == ""
    assert "veilnet: error:" in done.stderr and addr in done.stderr, done.stderr
    assert "Traceback" not in done.stderr, done.stderr


# -- 4. verify=full with one node: refused, or returned marked unverified ---------------------

def test_full_mode_refuses_a_single_nodes_answer(honest: NodeProcess, deployment_dir: Path,
                                                 manifest: Manifest,
                                                 expected: np.ndarray) -> None:
    """One node serves every shard: verify=full (the default) has no second answer to compare
    with, so it fails naming the hop and the count, unless unverified answers are allowed."""
    first = manifest.node_shards[0]
    with Client([honest.addr], deployment_dir) as client, pytest.raises(QueryError) as info:
        client.embed(TEXTS)
    message = str(info.value)
    assert f"hop {first.index} (shard {first.cid})" in message, message
    assert "only 1 of the 1 node(s) serving the shard answered" in message, message
    assert "allow_unverified" in message, message

    with Client([honest.addr], deployment_dir, allow_unverified=True) as client:
        result = client.embed(TEXTS)
    assert_matches(result.embeddings, expected)
    assert result.verified is False
    assert [h.shard_index for h in result.hops] == [s.index for s in manifest.node_shards]
    for hop in result.hops:
        assert hop.verified is False and hop.verdict is None, hop
        assert hop.unverified_reason and "only 1 of the 1 node(s)" in hop.unverified_reason
        assert hop.peer_id == honest.peer_id
        assert_hop_signed(hop)
        assert hop.attempts == 1 and hop.failures == ()


def test_cli_full_mode_with_a_single_node(honest: NodeProcess, deployment_dir: Path,
                                          expected: np.ndarray) -> None:
    common = ["--bootstrap", honest.addr, "--deployment", str(deployment_dir), "--json"]
    refused = veilnet_query(*TEXTS, *common)
    assert refused.returncode == 1, (refused.stdout, refused.stderr)
    assert refused.stdout == ""
    assert refused.stderr.startswith("veilnet: error: hop 1 "), refused.stderr
    assert "--allow-unverified" in refused.stderr and "Traceback" not in refused.stderr

    allowed = veilnet_query(*TEXTS, *common, "--allow-unverified")
    assert allowed.returncode == 0, allowed.stderr
    doc = json.loads(allowed.stdout)
    assert_matches(np.asarray(doc["embeddings"], dtype=np.float32), expected)
    assert all(h["verified"] is False and "only 1 of the 1" in h["unverified_reason"]
               for h in doc["hops"]), doc["hops"]
    warnings = [line for line in allowed.stderr.splitlines() if "NOT verified" in line]
    assert len(warnings) == len(doc["hops"]), allowed.stderr
    assert all(line.startswith("veilnet: warning: hop ") for line in warnings), warnings


# -- 5. the client shards are the secret --------------------------------------------------------

@pytest.fixture
def private_copy(deployment_dir: Path, tmp_path: Path) -> Path:
    """A copy of the deployment (modes preserved)."""
    out = tmp_path / "deploy"
    shutil.copytree(deployment_dir, out)
    return out


def test_cli_query_refuses_readable_client_shards(private_copy: Path,
                                                  manifest: Manifest) -> None:
    tail = private_copy / manifest.tail.path
    tail.chmod(0o644)
    done = veilnet_query("hello", "--bootstrap", closed_port_addr(), "--deployment",
                         str(private_copy))
    assert done.returncode == 2, (done.stdout, done.stderr)
    assert f"chmod 600 {tail}" in done.stderr and "Traceback" not in done.stderr, done.stderr
