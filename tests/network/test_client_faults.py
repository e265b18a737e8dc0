"""Integration tests of the client SDK against misbehaving nodes and an unreachable bootstrap.

Honest nodes are real ``veilnet node start`` subprocesses. Misbehaving nodes are real py-libp2p
hosts (TCP, Noise, yamux) living in this process: each registers its own /veilnet/infer/1
handler and announces itself with a signed agent card POSTed to a real bootstrap node's
/v1/agents, so the client learns of it from that node's card index exactly as it learns of
honest nodes. Only that network edge is faked; nothing of the
client or the node is mocked. Expected embeddings come from the in-process plaintext pipeline.
Clients here use ``verify="none"`` (one node per hop, the next one on failure): these tests are
about rejecting bad answers and failing over; replicated hops are tested in
test_consensus_network.py.

Topology (module scope): ``honest`` holds every node shard; ``directory`` holds none and
bootstraps from ``honest``. Fakes announce to ``directory`` only, so clients bootstrapping from
``honest`` never see them (a card POSTed to a node is indexed there, not gossiped: only a
node's own cards travel on the topic); a fake withdraws its shards (a newer card with none) when
it stops.
``honest``, ``manifest``, ``expected`` and the checks live in client_fixtures.py.
"""

from __future__ import annotations

import contextlib
import os
import re
import threading
import time
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import httpx
import numpy as np
import pytest
import trio
from client_fixtures import TEXTS, assert_hop_signed, assert_matches, closed_port_addr
from libp2p.abc import IHost, INetStream
from node_helpers import ClientThread, NodeProcess, start_node, stop_at_teardown

from client import AsyncClient, Client, EmbedResult, QueryError
from crypto.identity import Identity, public_from_peer_id, verify
from models import Manifest, ShardSpec
from protocols import INFER
from protocols.infer import receipt_payload
from protocols.transport import close_quietly, connect, full_addrs, peer_info, request
from protocols.wire import (
    decode_tensors,
    encode_tensors,
    encode_varint,
    read_frame,
    tensors_digest,
    write_frame,
)
from registry.card import ServedShard, build_card, verify_card

pytest_plugins = ["client_fixtures"]

HOP_TIMEOUT = 2.0
SLACK = 15.0  # seconds on top of the client's own bounds (2 cores, nodes on the same machine)
T = TypeVar("T")
MAX_CLIENTS = 12  # fresh clients tried until a misbehaving node is picked first for some hop


# -- fixtures -----------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def directory(request: pytest.FixtureRequest, honest: NodeProcess, manifest: Manifest,
              tmp_path_factory: pytest.TempPathFactory) -> NodeProcess:
    """A node with no shards that knows ``honest``: the bootstrap node fakes announce to."""
    data_dir = tmp_path_factory.mktemp("directory") / "D"
    node = stop_at_teardown(request, start_node(data_dir, "--bootstrap", honest.addr,
                                                "--announce-interval", "1"))
    wanted = {s.cid for s in manifest.node_shards}
    deadline = time.monotonic() + 20
    while True:
        cards = [verify_card(c) for c in httpx.get(f"{node.http}/v1/agents", timeout=5).json()]
        if any(c.peer_id == honest.peer_id and wanted <= set(c.shard_cids) for c in cards):
            return node
        assert time.monotonic() < deadline, f"directory never indexed honest's card: {cards}"
        time.sleep(0.1)


@pytest.fixture
def lonely(request: pytest.FixtureRequest, tmp_path: Path) -> NodeProcess:
    """A node with no shards that knows no other node."""
    return stop_at_teardown(request, start_node(tmp_path / "lonely"))


# -- misbehaving nodes --------------------------------------------------------------------------

Behaviour = Callable[["FakeNode", INetStream, dict[str, Any]], Awaitable[None]]


class FakeNode:
    """A real libp2p host on its own trio loop (thread) with a misbehaving infer handler."""

    def __init__(self, behaviour: Behaviour, honest: NodeProcess | None = None) -> None:
        self.behaviour = behaviour
        self.honest = honest
        self.thread = ClientThread()
        self.requests = 0
        self._announced: list[tuple[NodeProcess, Manifest]] = []

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

    def announce(self, bootstrap: NodeProcess, manifest: Manifest,
                 shards: list[ShardSpec]) -> None:
        """POST a card saying this host serves ``shards`` to ``bootstrap``'s /v1/agents."""
        self.thread.run(self._post_card, bootstrap, manifest, shards)
        self._announced.append((bootstrap, manifest))

    async def _post_card(self, host: IHost, bootstrap: NodeProcess, manifest: Manifest,
                         shards: list[ShardSpec]) -> None:
        served = [ServedShard(manifest.cid, manifest.name, s.cid, s.index) for s in shards]
        card = build_card(self.thread.identity, a2a_url="http://127.0.0.1:9/a2a",
                          multiaddrs=full_addrs(host), shards=served, ttl=300,
                          now=time.time() + len(self._announced))  # a later card replaces
        answer = httpx.post(f"{bootstrap.http}/v1/agents", json=card, timeout=10)
        assert answer.status_code == 201, answer.text

    def close(self) -> None:
        """Withdraw the announced shards (so later clients never pick this host), then stop."""
        try:
            for bootstrap, manifest in list(self._announced):
                self.thread.run(self._post_card, bootstrap, manifest, [])
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


def signed_outputs(fake: FakeNode, response: dict[str, Any],
                   outputs: dict[str, np.ndarray]) -> dict[str, Any]:
    """``response`` carrying ``outputs`` instead, digested and signed by the fake's own key."""
    digest = tensors_digest(outputs)
    response.update(outputs=encode_tensors(outputs), output_digest=digest,
                    node=fake.thread.identity.did,
                    signature=fake.thread.identity.sign(receipt_payload(
                        response["id"], response["shard"], response["input_digest"], digest)))
    return response


async def nan_outputs(fake: FakeNode, stream: INetStream, message: dict[str, Any]) -> None:
    """The honest outputs with one NaN in each, digested and signed by the fake's own key (a
    node running a corrupted shard)."""
    response = await fake.relay(message)
    outputs = {n: v.copy() for n, v in decode_tensors(response["outputs"], "outputs").items()}
    for value in outputs.values():
        value.reshape(-1)[0] = np.nan
    await write_frame(stream, signed_outputs(fake, response, outputs))


def huge_last_outputs(last_shard: str) -> Behaviour:
    """Honest answers signed by the fake's own key, except that the last node shard's outputs
    are all 3e38: finite, so the hop passes, but the client tail overflows to NaN on them."""
    async def behaviour(fake: FakeNode, stream: INetStream, message: dict[str, Any]) -> None:
        response = await fake.relay(message)
        outputs = decode_tensors(response["outputs"], "outputs")
        if message.get("shard") == last_shard:
            outputs = {n: np.full_like(v, 3e38) for n, v in outputs.items()}
        await write_frame(stream, signed_outputs(fake, response, outputs))

    return behaviour


async def garbage_frame(fake: FakeNode, stream: INetStream, message: dict[str, Any]) -> None:
    """A well-framed body that is not CBOR (0xff is a lone 'break')."""
    body = b"\xff" + os.urandom(255)
    await stream.write(encode_varint(len(body)) + body)


async def random_bytes(fake: FakeNode, stream: INetStream, message: dict[str, Any]) -> None:
    await stream.write(os.urandom(300))


# -- checks -------------------------------------------------------------------------------------

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


# -- 1. a hanging node next to an honest one ----------------------------------------------------

@pytest.fixture
def fake_factory(manifest: Manifest) -> Iterator[Callable[..., FakeNode]]:
    fakes: list[FakeNode] = []

    def make(behaviour: Behaviour, bootstrap: NodeProcess,
             honest: NodeProcess | None = None) -> FakeNode:
        fake = FakeNode(behaviour, honest).start()
        fakes.append(fake)
        fake.announce(bootstrap, manifest, manifest.node_shards)
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
        with Client([directory.addr], deployment_dir, hop_timeout=HOP_TIMEOUT,
                    verify="none") as client:
            result, _ = timed_embed(client, HOP_TIMEOUT + SLACK)
        assert_matches(result.embeddings, expected)
        assert [h.peer_id for h in result.hops] == [honest.peer_id] * len(manifest.node_shards)
        for hop in result.hops:
            assert_hop_signed(hop)
            assert hop.attempts == 1 + len(hop.failures)
            for failure in hop.failures:  # the hop timeout, or left behind after the hedge delay
                assert re.fullmatch(rf"{hanging.peer_id}: no answer within [0-9.]+ s"
                                    r"( \(the hop was decided without it\))?", failure), failure
        seen = [h for h in result.hops if h.attempts == 2]
        if seen:
            break
    assert seen, f"{MAX_CLIENTS} clients never tried the hanging node first"
    assert hanging.requests >= 1
    assert any(hanging.peer_id in f and "no answer within" in f for f in seen[0].failures)


# -- 2. only a hanging node serves the shards ---------------------------------------------------

def test_only_hanging_node_gives_query_error(
        lonely: NodeProcess, deployment_dir: Path, manifest: Manifest,
        fake_factory: Callable[..., FakeNode]) -> None:
    hanging = fake_factory(hang, lonely)
    shards = len(manifest.node_shards)
    first = manifest.node_shards[0]
    with Client([lonely.addr], deployment_dir, hop_timeout=HOP_TIMEOUT,
                verify="none") as client:
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


# -- 3. lying and garbage-speaking nodes next to an honest one ----------------------------------

@pytest.mark.parametrize(("behaviour", "reasons"), [
    (relay_honest_signature, ("bad_signature",)),
    (sign_with_other_key, ("bad_signature",)),
    (rename_outputs, ("bad_response", "bogus_")),
    (garbage_frame, ("bad_frame",)),
    (random_bytes, None),
    (nan_outputs, ("bad_response", "non-finite outputs", "1 NaN")),
], ids=["honest-nodes-signature", "other-key", "wrong-output-names", "non-cbor-frame",
        "random-bytes", "nan-outputs"])
def test_misbehaving_node_is_rejected(
        behaviour: Behaviour, reasons: tuple[str, ...] | None, honest: NodeProcess,
        directory: NodeProcess, deployment_dir: Path, manifest: Manifest, expected: np.ndarray,
        fake_factory: Callable[..., FakeNode]) -> None:
    liar = fake_factory(behaviour, directory, honest)
    caught: list[str] = []
    for _ in range(MAX_CLIENTS):
        with Client([directory.addr], deployment_dir, hop_timeout=10, verify="none") as client:
            result, _ = timed_embed(client, 10 + SLACK)
        assert_matches(result.embeddings, expected)
        for hop in result.hops:
            assert hop.peer_id == honest.peer_id, f"accepted an answer from {hop.peer_id}"
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


def test_non_finite_final_outputs_are_refused(
        lonely: NodeProcess, honest: NodeProcess, deployment_dir: Path, manifest: Manifest,
        fake_factory: Callable[..., FakeNode]) -> None:
    """Every hop's outputs are finite and signed, but the model's outputs come out NaN: the
    query fails instead of returning them (verify=none: nothing else would notice)."""
    fake = fake_factory(huge_last_outputs(manifest.node_shards[-1].cid), lonely, honest)
    with Client([lonely.addr], deployment_dir, hop_timeout=10, verify="none") as client, \
            pytest.raises(QueryError) as info:
        bounded(lambda: client.embed(TEXTS), 10 + SLACK)
    message = str(info.value)
    assert "outputs are not finite" in message and "NaN" in message, message
    assert fake.peer_id in message, message


# -- 4. an unreachable bootstrap ----------------------------------------------------------------

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
