"""Integration tests of the client SDK (``Client``, ``AsyncClient``) and ``veilnet query``
against honest nodes: the honest path, streams closed by an idle node, bad arguments and the CLI.

Nodes are real ``veilnet node start`` subprocesses; nothing of the client or the node is mocked.
The fixtures (``honest``, ``manifest``, ``expected``) and the checks live in client_fixtures.py;
misbehaving nodes and unreachable bootstraps are tested in test_client_faults.py.
"""

from __future__ import annotations

import json
import re
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
    assert_matches,
    closed_port_addr,
)
from node_helpers import REPO, NodeProcess, metric_value, start_node, stop_at_teardown

from client import AsyncClient, Client, EmbedResult, QueryError
from crypto.identity import public_from_peer_id, verify
from models import Manifest
from node.store import ShardStore
from node.wire import receipt_payload

pytest_plugins = ["client_fixtures"]


# -- 1. honest path -----------------------------------------------------------------------------

def test_client_honest_path(honest: NodeProcess, deployment_dir: Path, manifest: Manifest,
                            expected: np.ndarray) -> None:
    with Client([honest.addr], deployment_dir) as client:
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
    with Client([node.addr], deployment_dir) as client:
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
            async with AsyncClient([honest.addr], deployment_dir) as client:
                peers = {r.peer_id: r for r in await client.refresh()}
                assert peers[honest.peer_id].did == honest.info["did"]
                assert [r.peer_id for r in client.providers(manifest.node_shards[0].cid)] == [
                    honest.peer_id]
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
            client = AsyncClient([honest.addr], deployment_dir)
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

@pytest.mark.parametrize("bootstrap", [
    "not a multiaddr", "/ip4/127.0.0.1/tcp/4001", "/ip4/127.0.0.1/tcp/4001/p2p/notapeerid"])
def test_malformed_bootstrap(bootstrap: str, deployment_dir: Path) -> None:
    with pytest.raises(ValueError, match=re.escape(repr(bootstrap))):
        Client([bootstrap], deployment_dir)


def test_no_bootstrap(deployment_dir: Path) -> None:
    with pytest.raises(ValueError):
        Client([], deployment_dir)


def test_bad_texts(honest: NodeProcess, deployment_dir: Path) -> None:
    with Client([honest.addr], deployment_dir) as client:
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
    common = ["--bootstrap", honest.addr, "--deployment", str(deployment_dir)]
    done = veilnet_query(*TEXTS, *common, "--json")
    assert done.returncode == 0, done.stderr
    lines = done.stdout.strip().splitlines()
    assert len(lines) == 1, done.stdout
    doc = json.loads(lines[0])
    assert set(doc) == {"embeddings", "hops"}
    assert_matches(np.asarray(doc["embeddings"], dtype=np.float32), expected)
    assert [h["shard_cid"] for h in doc["hops"]] == [s.cid for s in manifest.node_shards]
    for hop in doc["hops"]:
        assert hop["node_did"] == honest.info["did"]
        assert hop["peer_id"] == honest.peer_id
        assert isinstance(hop["latency_ms"], float) and hop["latency_ms"] > 0
        assert hop["signature_verified"] is True and hop["failures"] == []
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
