"""Integration tests of the client SDK (``Client``, ``AsyncClient``) and ``veilnet query``.

Honest nodes are real ``veilnet node start`` subprocesses. Misbehaving nodes are real py-libp2p
hosts (TCP, Noise, yamux) living in this process: each registers its own /veilnet/infer/1
handler and announces itself over /veilnet/peers/1 to a real bootstrap node, so the client learns
of it exactly as it learns of honest nodes. Only that network edge is faked; nothing of the
client or the node is mocked. Expected embeddings come from the in-process plaintext pipeline.

Topology (module scope): ``honest`` holds every node shard; ``directory`` holds none and
bootstraps from ``honest``. Fakes announce to ``directory`` only, so clients bootstrapping from
``honest`` never see them; a fake withdraws its shards (re-announces with none) when it stops.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import secrets
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import httpx
import numpy as np
import pytest
import trio
from libp2p.abc import IHost, INetStream
from node_helpers import REPO, ClientThread, NodeProcess, metric_value, start_node

from client import AsyncClient, Client, EmbedResult, HopRecord, QueryError
from crypto.identity import Identity, public_from_did, public_from_peer_id, verify
from models import Manifest, Pipeline
from node.p2p import (
    INFER,
    PEERS,
    close_quietly,
    connect,
    full_addrs,
    peer_info,
    request,
)
from node.store import ShardStore
from node.wire import (
    WIRE_VERSION,
    decode_tensors,
    encode_varint,
    read_frame,
    receipt_payload,
    tensors_digest,
    write_frame,
)

TEXTS = ["A man is eating food.", "Encrypted inference keeps activations private, 24/7."]
TOLERANCE = 1e-4
HOP_TIMEOUT = 2.0
SLACK = 15.0  # seconds on top of the client's own bounds (2 cores, nodes on the same machine)
T = TypeVar("T")
MAX_CLIENTS = 12  # fresh clients tried until a misbehaving node is picked first for some hop


# -- fixtures -----------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def expected(minilm_dir: Path) -> np.ndarray:
    """Plaintext embeddings of TEXTS, computed in-process without the network or the key."""
    return Pipeline(minilm_dir).embed(TEXTS)


@pytest.fixture(scope="module")
def manifest(deployment_dir: Path) -> Manifest:
    return Manifest.load(deployment_dir)


def _started(request: pytest.FixtureRequest, node: NodeProcess) -> NodeProcess:
    request.addfinalizer(node.stop)
    return node


@pytest.fixture(scope="module")
def honest(request: pytest.FixtureRequest, deployment_dir: Path,
           tmp_path_factory: pytest.TempPathFactory) -> NodeProcess:
    data_dir = tmp_path_factory.mktemp("honest") / "D"
    ShardStore(data_dir).add_deployment(deployment_dir)
    return _started(request, start_node(data_dir, "--request-timeout", "20"))


@pytest.fixture(scope="module")
def directory(request: pytest.FixtureRequest, honest: NodeProcess, manifest: Manifest,
              tmp_path_factory: pytest.TempPathFactory) -> NodeProcess:
    """A node with no shards that knows ``honest``: the bootstrap node fakes announce to."""
    data_dir = tmp_path_factory.mktemp("directory") / "D"
    node = _started(request, start_node(data_dir, "--bootstrap", honest.addr,
                                        "--announce-interval", "1"))
    wanted = {s.cid for s in manifest.node_shards}
    deadline = time.monotonic() + 20
    while True:
        peers = httpx.get(f"{node.http}/v1/peers", timeout=5).json()
        if any(p["peer_id"] == honest.peer_id and wanted <= set(p["shards"]) for p in peers):
            return node
        assert time.monotonic() < deadline, f"directory never learnt of honest: {peers}"
        time.sleep(0.1)


@pytest.fixture
def lonely(request: pytest.FixtureRequest, tmp_path: Path) -> NodeProcess:
    """A node with no shards that knows no other node."""
    return _started(request, start_node(tmp_path / "lonely"))


def closed_port_addr() -> str:
    """A loopback multiaddr nobody listens on, with a random PeerID."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    return f"/ip4/127.0.0.1/tcp/{port}/p2p/{Identity.generate().peer_id}"


# -- misbehaving nodes --------------------------------------------------------------------------

Behaviour = Callable[["FakeNode", INetStream, dict[str, Any]], Awaitable[None]]


class FakeNode:
    """A real libp2p host on its own trio loop (thread) with a misbehaving infer handler."""

    def __init__(self, behaviour: Behaviour, honest: NodeProcess | None = None) -> None:
        self.behaviour = behaviour
        self.honest = honest
        self.thread = ClientThread()
        self.requests = 0
        self._announced: list[str] = []

    @property
    def peer_id(self) -> str:
        return self.thread.identity.peer_id

    def start(self) -> FakeNode:
        self.thread.start()

        async def attach(host: IHost) -> None:
            host.set_stream_handler(INFER, self._handle)

        self.thread.run(attach)
        return self

    async def _handle(self, stream: INetStream) -> None:
        try:
            message = await read_frame(stream)
            if message is None:
                return
            self.requests += 1
            await self.behaviour(self, stream, message)
        finally:
            await close_quietly(stream)

    def announce(self, bootstrap: str, shards: list[str]) -> None:
        """Tell ``bootstrap`` over /veilnet/peers/1 that this host serves ``shards``."""
        self.thread.run(self._hello, bootstrap, shards)
        self._announced.append(bootstrap)

    async def _hello(self, host: IHost, bootstrap: str, shards: list[str]) -> None:
        info = peer_info(bootstrap)
        await connect(host, info, 10)
        answer = await request(host, info.peer_id, PEERS, {
            "v": WIRE_VERSION, "id": secrets.token_hex(8),
            "node": {"peer_id": self.peer_id, "did": self.thread.identity.did,
                     "addrs": full_addrs(host), "shards": shards, "http": None}}, 10)
        assert (answer.get("node") or {}).get("peer_id") == str(info.peer_id), answer

    def close(self) -> None:
        """Withdraw the announced shards (so later clients never pick this host), then stop."""
        try:
            for bootstrap in self._announced:
                self.thread.run(self._hello, bootstrap, [])
        finally:
            self.thread.close()
            assert not self.thread._thread.is_alive(), "the fake node's loop did not stop"

    async def relay(self, message: dict[str, Any]) -> dict[str, Any]:
        """The honest node's answer to the same request (its id, its signature)."""
        assert self.honest is not None
        host = self.thread.host
        info = peer_info(self.honest.addr)
        await connect(host, info, 10)
        return await request(host, info.peer_id, INFER, message, 20)


async def hang(fake: FakeNode, stream: INetStream, message: dict[str, Any]) -> None:
    await trio.sleep_forever()


async def relay_honest_signature(fake: FakeNode, stream: INetStream,
                                 message: dict[str, Any]) -> None:
    """Correct outputs and digests, signed by the honest node's key (not the fake's)."""
    await write_frame(stream, await fake.relay(message))


async def sign_with_other_key(fake: FakeNode, stream: INetStream,
                              message: dict[str, Any]) -> None:
    """Correct outputs and digests, signed by a fresh key."""
    response = await fake.relay(message)
    response["signature"] = Identity.generate().sign(receipt_payload(
        response["id"], response["shard"], response["input_digest"], response["output_digest"]))
    response["node"] = fake.thread.identity.did
    await write_frame(stream, response)


async def rename_outputs(fake: FakeNode, stream: INetStream, message: dict[str, Any]) -> None:
    """Real tensors under wrong names, digested and signed correctly by the fake's own key."""
    response = await fake.relay(message)
    outputs = {f"bogus_{name}": t for name, t in response["outputs"].items()}
    digest = tensors_digest(decode_tensors(outputs, "outputs"))
    response.update(outputs=outputs, output_digest=digest, node=fake.thread.identity.did,
                    signature=fake.thread.identity.sign(receipt_payload(
                        response["id"], response["shard"], response["input_digest"], digest)))
    await write_frame(stream, response)


async def garbage_frame(fake: FakeNode, stream: INetStream, message: dict[str, Any]) -> None:
    """A well-framed body that is not CBOR (0xff is a lone 'break')."""
    body = b"\xff" + os.urandom(255)
    await stream.write(encode_varint(len(body)) + body)


async def random_bytes(fake: FakeNode, stream: INetStream, message: dict[str, Any]) -> None:
    await stream.write(os.urandom(300))


# -- checks -------------------------------------------------------------------------------------

def assert_matches(embeddings: np.ndarray, expected: np.ndarray) -> None:
    assert embeddings.shape == expected.shape, (embeddings.shape, expected.shape)
    diff = float(np.max(np.abs(embeddings - expected)))
    assert diff <= TOLERANCE, f"max abs diff {diff} from the plaintext embeddings"


def assert_honest_hops(result: EmbedResult, node: NodeProcess, manifest: Manifest) -> None:
    """One verified hop per node shard, served by ``node`` (as its node.json says)."""
    shards = manifest.node_shards
    assert [h.shard_index for h in result.hops] == [s.index for s in shards]
    assert [h.shard_cid for h in result.hops] == [s.cid for s in shards]
    ids = set()
    for hop in result.hops:
        assert isinstance(hop, HopRecord)
        assert hop.peer_id == node.info["peer_id"]
        assert hop.node_did == node.info["did"]
        assert hop.signature_verified is True
        assert hop.attempts == 1 and hop.failures == (), hop
        assert hop.latency_ms > 0
        assert re.fullmatch(r"[0-9a-f]{32}", hop.request_id), hop.request_id
        ids.add(hop.request_id)
        assert re.fullmatch(r"[0-9a-f]{128}", hop.signature), hop.signature
        assert re.fullmatch(r"[0-9a-f]{64}", hop.input_digest)
        assert re.fullmatch(r"[0-9a-f]{64}", hop.output_digest)
        signature = bytes.fromhex(hop.signature)
        payload = receipt_payload(hop.request_id, hop.shard_cid, bytes.fromhex(hop.input_digest),
                                  bytes.fromhex(hop.output_digest))
        assert verify(public_from_peer_id(node.info["peer_id"]), signature, payload)
        assert verify(public_from_did(node.info["did"]), signature, payload)
        # the receipt binds the digests: the same signature over another output digest fails
        forged = receipt_payload(hop.request_id, hop.shard_cid, bytes.fromhex(hop.input_digest),
                                 bytes(32))
        assert not verify(public_from_peer_id(node.info["peer_id"]), signature, forged)
    assert len(ids) == len(result.hops), "request ids must be fresh per hop"
    # consecutive hops chain: a later shard's input is not the earlier shard's input
    assert len({h.input_digest for h in result.hops}) == len(result.hops)


def bounded(fn: Callable[[], T], limit: float) -> T:
    """``fn()`` on a worker thread; fails (instead of hanging the run) after ``limit`` s."""
    box: dict[str, Any] = {}

    def target() -> None:
        try:
            box["result"] = fn()
        except BaseException as exc:  # re-raised in the test's thread
            box["error"] = exc

    worker = threading.Thread(target=target, name="bounded-call", daemon=True)
    worker.start()
    worker.join(limit)
    if worker.is_alive():
        raise AssertionError(f"still running after {limit:g} s: a hang")
    if "error" in box:
        raise box["error"]
    return box["result"]


def timed_embed(client: Client, limit: float) -> tuple[EmbedResult, float]:
    started = time.monotonic()
    result = bounded(lambda: client.embed(TEXTS), limit)
    elapsed = time.monotonic() - started
    assert elapsed < limit, f"the query took {elapsed:.1f} s, the bound is {limit:g} s"
    return result, elapsed


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
    node = _started(request, start_node(tmp_path / "D", "--idle-timeout", "1"))
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


# -- 2. a hanging node next to an honest one ----------------------------------------------------

@pytest.fixture
def fake_factory(manifest: Manifest) -> Iterator[Callable[..., FakeNode]]:
    fakes: list[FakeNode] = []

    def make(behaviour: Behaviour, bootstrap: NodeProcess,
             honest: NodeProcess | None = None) -> FakeNode:
        fake = FakeNode(behaviour, honest).start()
        fakes.append(fake)
        fake.announce(bootstrap.addr, [s.cid for s in manifest.node_shards])
        return fake

    yield make
    with contextlib.ExitStack() as stack:  # every fake is closed even if one close fails
        for fake in fakes:
            stack.callback(fake.close)


def test_hanging_node_is_skipped_after_hop_timeout(
        honest: NodeProcess, directory: NodeProcess, deployment_dir: Path, manifest: Manifest,
        expected: np.ndarray, fake_factory: Callable[..., FakeNode]) -> None:
    hanging = fake_factory(hang, directory)
    seen = []
    for _ in range(MAX_CLIENTS):
        with Client([directory.addr], deployment_dir, hop_timeout=HOP_TIMEOUT) as client:
            result, _ = timed_embed(client, HOP_TIMEOUT + SLACK)
        assert_matches(result.embeddings, expected)
        assert [h.peer_id for h in result.hops] == [honest.peer_id] * len(manifest.node_shards)
        for hop in result.hops:
            assert hop.signature_verified
            assert hop.attempts == 1 + len(hop.failures)
            for failure in hop.failures:
                assert failure == f"{hanging.peer_id}: no answer within {HOP_TIMEOUT:g} s"
        seen = [h for h in result.hops if h.attempts == 2]
        if seen:
            break
    assert seen, f"{MAX_CLIENTS} clients never tried the hanging node first"
    assert hanging.requests >= 1
    assert any(hanging.peer_id in f and "no answer within" in f for f in seen[0].failures)


# -- 3. only a hanging node serves the shards ---------------------------------------------------

def test_only_hanging_node_gives_query_error(
        lonely: NodeProcess, deployment_dir: Path, manifest: Manifest,
        fake_factory: Callable[..., FakeNode]) -> None:
    hanging = fake_factory(hang, lonely)
    shards = len(manifest.node_shards)
    first = manifest.node_shards[0]
    with Client([lonely.addr], deployment_dir, hop_timeout=HOP_TIMEOUT) as client:
        limit = HOP_TIMEOUT * shards + SLACK
        started = time.monotonic()
        with pytest.raises(QueryError) as info:
            bounded(lambda: client.embed(TEXTS), limit)
        elapsed = time.monotonic() - started
    assert elapsed < limit, f"the query failed only after {elapsed:.1f} s"
    assert elapsed >= HOP_TIMEOUT * 0.9, f"gave up after {elapsed:.2f} s, before the hop timeout"
    message = str(info.value)
    assert f"hop {first.index}" in message and first.cid in message, message
    assert hanging.peer_id in message, message
    assert f"no answer within {HOP_TIMEOUT:g} s" in message, message
    assert hanging.requests == 1


# -- 4. lying and garbage-speaking nodes next to an honest one ----------------------------------

@pytest.mark.parametrize(("behaviour", "reasons"), [
    (relay_honest_signature, ("bad_signature",)),
    (sign_with_other_key, ("bad_signature",)),
    (rename_outputs, ("bad_response", "bogus_")),
    (garbage_frame, ("bad_frame",)),
    (random_bytes, None),
], ids=["honest-nodes-signature", "other-key", "wrong-output-names", "non-cbor-frame",
        "random-bytes"])
def test_misbehaving_node_is_rejected(
        behaviour: Behaviour, reasons: tuple[str, ...] | None, honest: NodeProcess,
        directory: NodeProcess, deployment_dir: Path, manifest: Manifest, expected: np.ndarray,
        fake_factory: Callable[..., FakeNode]) -> None:
    liar = fake_factory(behaviour, directory, honest)
    caught: list[str] = []
    for _ in range(MAX_CLIENTS):
        with Client([directory.addr], deployment_dir, hop_timeout=10) as client:
            result, _ = timed_embed(client, 10 + SLACK)
        assert_matches(result.embeddings, expected)
        for hop in result.hops:
            assert hop.peer_id == honest.peer_id, f"accepted an answer from {hop.peer_id}"
            assert hop.signature_verified
            assert verify(public_from_peer_id(honest.peer_id), bytes.fromhex(hop.signature),
                          receipt_payload(hop.request_id, hop.shard_cid,
                                          bytes.fromhex(hop.input_digest),
                                          bytes.fromhex(hop.output_digest)))
            assert hop.attempts == 1 + len(hop.failures)
            caught += [f for f in hop.failures if f.startswith(f"{liar.peer_id}: ")]
        if caught:
            break
    assert caught, f"{MAX_CLIENTS} clients never tried the misbehaving node first"
    assert liar.requests >= 1
    for failure in caught:
        if reasons is None:  # random bytes: some wire error, whichever the bytes make
            assert re.search(r"bad_frame|frame_too_large|truncated|bad_response", failure), failure
        else:
            assert all(r in failure for r in reasons), failure


# -- 5. bad bootstrap, bad arguments --------------------------------------------------------------

def test_unreachable_bootstrap(deployment_dir: Path) -> None:
    addr = closed_port_addr()
    started = time.monotonic()
    with pytest.raises(QueryError) as info:
        bounded(lambda: Client([addr], deployment_dir, connect_timeout=5), 45)
    assert time.monotonic() - started < 15
    assert addr in str(info.value)

    async def main() -> None:
        with trio.fail_after(15), pytest.raises(QueryError, match=re.escape(addr)):
            async with AsyncClient([addr], deployment_dir, connect_timeout=5):
                pass

    trio.run(main)


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


# -- 6. veilnet query ---------------------------------------------------------------------------

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
