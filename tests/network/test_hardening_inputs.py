"""Issue 12 items 1, 2, 3 and 5: input bounds on the wire and over HTTP, against a real node.

Every attack here runs against a real ``veilnet node start`` process over real libp2p (Noise,
yamux) or real HTTP on 127.0.0.1, and checks that the node answers it with a structured error,
promptly, while it keeps answering ``/healthz``:

1. a long fake CID (the multiformats decoders were super-linear: 15 KB froze a node 4 s) in
   ``POST /a2a``, in ``/veilnet/infer/1`` 'shard' and in a ``/veilnet/peers/1`` record;
   lists of 100k entries in a frame and in an A2A body;
2. peers offering only ``/plaintext/2.0.0``, including one that claims another node's PeerID
   with nothing but its public key, cannot connect at all;
3. a 16 MiB frame of empty CBOR arrays (the node's RSS grew by 525 MB) gets ``bad_frame`` and
   leaves the node's memory alone;
5. request bodies over the limit, with and without Content-Length, get a 413 JSON answer without
   the node reading them (a 70 MB /a2a body took 21 s of CPU to refuse).

Unit tests of the bounds that need no node (the A2A dispatcher, the peer table) are in
tests/unit/node/test_input_bounds.py.
"""

from __future__ import annotations

import json
import select
import socket
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import urlsplit

import h11
import httpx
import multiaddr
import pytest
import trio
from libp2p import new_host
from libp2p.abc import IHost
from libp2p.crypto.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from libp2p.crypto.keys import KeyPair, PublicKey
from libp2p.crypto.x25519 import create_new_key_pair as create_x25519_key_pair
from libp2p.security.insecure.transport import PLAINTEXT_PROTOCOL_ID, InsecureTransport
from libp2p.security.noise.transport import PROTOCOL_ID as NOISE_PROTOCOL_ID
from libp2p.security.noise.transport import Transport as NoiseTransport
from node_helpers import ClientThread, NodeProcess, exchange, start_node, stop_at_teardown

from crypto.identity import Identity, public_from_peer_id
from node.http_limits import DEFAULT_BODY_LIMIT
from protocols import INFER, PEERS
from protocols.transport import PEER_ERRORS, connect, peer_info, request
from protocols.wire import MAX_FRAME_ITEMS, encode_frame, encode_varint, read_frame
from registry.a2a_rpc import (
    DEFAULT_MAX_BODY,
    INVALID_PARAMS,
    INVALID_REQUEST,
    MAX_JSON_VALUES,
)

T = TypeVar("T")
FAKE_CID = "z" + "2" * 3_000_000  # base58btc: the old check was quadratic in this
ATTACK_S = 30.0  # generous: each attack is answered in well under a second now
HEALTHZ_S = 5.0  # /healthz must answer within this while an attack is under way


# -- fixtures and helpers -------------------------------------------------------------------------

@pytest.fixture(scope="module")
def node(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory,
         ) -> NodeProcess:
    return stop_at_teardown(request, start_node(tmp_path_factory.mktemp("hard") / "D"))


@pytest.fixture(scope="module")
def client() -> Iterator[ClientThread]:
    thread = ClientThread().start()
    yield thread
    thread.close()


def while_probing(node: NodeProcess, attack: Callable[[], T]) -> T:
    """Run ``attack`` in a thread; until it returns, /healthz must keep answering (each probe
    within HEALTHZ_S), and the attack must end within ATTACK_S."""
    outcome: dict[str, Any] = {}

    def run() -> None:
        try:
            outcome["value"] = attack()
        except BaseException as exc:  # re-raised in the test's thread
            outcome["error"] = exc

    thread = threading.Thread(target=run, daemon=True)
    deadline = time.monotonic() + ATTACK_S
    thread.start()
    probes = 0
    with httpx.Client(timeout=HEALTHZ_S) as http:
        while thread.is_alive() or probes == 0:
            assert http.get(node.http + "/healthz").json()["status"] == "ok"
            probes += 1
            assert time.monotonic() < deadline, f"the attack took more than {ATTACK_S} s"
            time.sleep(0.05)
    thread.join(1)
    if "error" in outcome:
        raise outcome["error"]
    return outcome["value"]


def a2a_send(shard: Any, inputs: Any = None, **extra: Any) -> bytes:
    data = {"veilnet": "infer/1", "shard": shard, "inputs": inputs or {}, **extra}
    return json.dumps({"jsonrpc": "2.0", "id": 1, "method": "message/send", "params": {
        "message": {"role": "user", "messageId": "m1",
                    "parts": [{"kind": "data", "data": data}]}}}).encode()


def post_a2a(node: NodeProcess, body: bytes) -> dict[str, Any]:
    r = httpx.post(node.http + "/a2a", content=body, timeout=ATTACK_S,
                   headers={"Content-Type": "application/json"})
    assert r.status_code == 200, r.text[:300]
    return r.json()


def vm_kb(pid: int, key: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1])
    raise AssertionError(f"no {key} in /proc/{pid}/status")


# -- 1. long fake CIDs and long lists -------------------------------------------------------------

def test_long_fake_cid_in_a2a_is_refused_at_once(node: NodeProcess) -> None:
    reply = while_probing(node, lambda: post_a2a(node, a2a_send(FAKE_CID)))
    assert reply["error"]["code"] == INVALID_PARAMS
    assert reply["error"]["data"]["veilnet"]["code"] == "bad_request"
    assert "shard" in reply["error"]["message"]
    assert len(json.dumps(reply)) < 2000  # the fake CID is not echoed back


def test_long_fake_cid_in_an_infer_frame_is_refused_at_once(node: NodeProcess,
                                                              client: ClientThread) -> None:
    frame = encode_frame({"v": 1, "id": "cid", "shard": FAKE_CID, "inputs": {}})
    answer = while_probing(node, lambda: client.run(exchange, node.addr, INFER, frame))
    assert answer is not None and answer["id"] == "cid"
    assert answer["error"]["code"] == "bad_request"
    assert "shard" in answer["error"]["message"]


def test_fake_cids_in_a_peer_record_are_refused_at_once(node: NodeProcess,
                                                         client: ClientThread) -> None:
    """A record naming the sender (so it passes the PeerID check) with 200 fake shard CIDs of
    20,000 characters each: about 1000 s of CID decoding for the old check."""
    assert client.host is not None
    record = {"peer_id": str(client.host.get_id()), "did": "", "addrs": [], "http": None,
              "shards": ["z" + "3" * 20_000] * 200}
    frame = encode_frame({"v": 1, "id": "peers", "node": record})
    answer = while_probing(node, lambda: client.run(exchange, node.addr, PEERS, frame))
    assert answer is not None and answer["error"]["code"] == "bad_request"
    assert "'shards'" in answer["error"]["message"]


def test_a_frame_of_100k_list_entries_is_refused_with_bad_frame(node: NodeProcess,
                                                                  client: ClientThread) -> None:
    frame = encode_frame({"v": 1, "id": "list", "shard": "x", "inputs": {"x": {
        "dtype": "uint8", "shape": [0] * 100_000, "data": b""}}})
    answer = while_probing(node, lambda: client.run(exchange, node.addr, INFER, frame))
    assert answer is not None and answer["error"]["code"] == "bad_frame"
    assert str(MAX_FRAME_ITEMS) in answer["error"]["message"]


def test_an_a2a_body_of_200k_list_entries_is_refused(node: NodeProcess) -> None:
    body = a2a_send("x", {"x": {"dtype": "uint8", "shape": [0] * 200_000, "data": ""}})
    reply = while_probing(node, lambda: post_a2a(node, body))
    assert reply["error"]["code"] == INVALID_REQUEST
    assert reply["error"]["data"]["maxValues"] == MAX_JSON_VALUES


def test_json_memory_bomb_in_a2a_is_refused_before_parsing(node: NodeProcess) -> None:
    """32 MB of ``{},`` parse into about 11M dicts (0.9 GB); the node refuses to parse it."""
    body = b'{"jsonrpc":"2.0","id":1,"method":"message/send","params":{"a":[' \
        + b"{}," * ((32 << 20) // 3) + b'{}]}}'
    pid = node.proc.pid
    Path(f"/proc/{pid}/clear_refs").write_text("5")  # reset the peak RSS (VmHWM)
    before = vm_kb(pid, "VmRSS")
    reply = while_probing(node, lambda: post_a2a(node, body))
    assert reply["error"]["code"] == INVALID_REQUEST
    assert reply["error"]["data"]["maxValues"] == MAX_JSON_VALUES
    peak = vm_kb(pid, "VmHWM") - before
    assert peak < 300_000, f"the node's peak RSS grew by {peak // 1024} MB"


# -- 2. Noise only --------------------------------------------------------------------------------

class _ClaimedKey(Ed25519PrivateKey):
    """A private key that presents someone else's public key: all a plaintext handshake asks
    for. Used only to play the attacker."""

    def __init__(self, own: Ed25519PrivateKey, claimed: PublicKey) -> None:
        super().__init__(own.impl)
        self._claimed = claimed

    def get_public_key(self) -> PublicKey:
        return self._claimed


def _insecure_host(key_pair: KeyPair, noise_too: bool = False) -> IHost:
    options: dict[Any, Any] = {PLAINTEXT_PROTOCOL_ID: InsecureTransport(key_pair)}
    if noise_too:  # Noise with the claimed key: the handshake signature cannot match it
        options = {NOISE_PROTOCOL_ID: NoiseTransport(
            key_pair, noise_privkey=create_x25519_key_pair().private_key)}
    return new_host(key_pair=key_pair, sec_opt=options)


async def _attack_as(key_pair: KeyPair, addr: str, record: dict[str, Any] | None,
                     noise: bool = False) -> str:
    """Connect with ``key_pair`` (plaintext, or Noise) and send ``record`` over peers/1;
    returns "refused: ..." when the connection cannot be made, else the answer."""
    host = _insecure_host(key_pair, noise)
    info = peer_info(addr)
    async with host.run(listen_addrs=[multiaddr.Multiaddr("/ip4/127.0.0.1/tcp/0")]):
        try:
            try:
                await connect(host, info, 10)
            except PEER_ERRORS as exc:  # the security handshake failed: never connected
                return f"refused: {type(exc).__name__}"
            answer = await request(host, info.peer_id, PEERS, {"v": 1, "id": "claim",
                                                                "node": record}, 10)
            return f"answered: {answer}"
        finally:
            with trio.move_on_after(3) as scope:
                scope.shield = True
                await host.close()


def test_a_plaintext_only_peer_cannot_connect(node: NodeProcess) -> None:
    own = Ed25519PrivateKey.new()
    outcome = trio.run(_attack_as, KeyPair(own, own.get_public_key()), node.addr, None)
    assert outcome.startswith("refused"), outcome


@pytest.mark.parametrize("security", ["plaintext", "noise"])
def test_a_peer_cannot_claim_another_nodes_peer_id(node: NodeProcess, security: str) -> None:
    """The issue's attack: connect "as" another node (here: a bootstrap node's identity, of
    which the attacker has only the public key) and rewrite that node's peer record."""
    bootstrap = Identity.generate().peer_id
    claimed = Ed25519PublicKey.from_bytes(public_from_peer_id(bootstrap))
    key_pair = KeyPair(_ClaimedKey(Ed25519PrivateKey.new(), claimed), claimed)
    record = {"peer_id": bootstrap, "did": "", "addrs": ["/ip4/192.0.2.66/tcp/4001"],
              "shards": [], "http": "http://attacker.invalid"}
    outcome = trio.run(_attack_as, key_pair, node.addr, record, security == "noise")
    assert outcome.startswith("refused"), outcome
    peers = httpx.get(node.http + "/v1/peers", timeout=10).json()
    assert not [p for p in peers if p["peer_id"] == bootstrap], peers


# -- 3. memory bomb in frames ---------------------------------------------------------------------

def test_cbor_memory_bomb_gets_bad_frame_and_leaves_memory_alone(node: NodeProcess,
                                                                   client: ClientThread) -> None:
    """A 16 MiB infer frame holding one array of 16M empty arrays: it passed the depth limit
    and became 1 GB of Python objects before the "must be a map" check."""
    count = 16 * 1024 * 1024 - 16
    body = b"\xa1\x61a\x9a" + count.to_bytes(4, "big") + b"\x80" * count  # {"a": [[], ...]}
    frame = encode_varint(len(body)) + body
    pid = node.proc.pid
    Path(f"/proc/{pid}/clear_refs").write_text("5")  # reset the peak RSS (VmHWM)
    before = vm_kb(pid, "VmRSS")
    answer = while_probing(node, lambda: client.run(exchange, node.addr, INFER, frame))
    assert answer is not None and answer["error"]["code"] == "bad_frame"
    assert str(MAX_FRAME_ITEMS) in answer["error"]["message"]
    grown, peak = vm_kb(pid, "VmRSS") - before, vm_kb(pid, "VmHWM") - before
    assert grown < 200_000, f"the node's RSS grew by {grown // 1024} MB"
    assert peak < 300_000, f"the node's peak RSS grew by {peak // 1024} MB"


# -- 5. request bodies ----------------------------------------------------------------------------

def upload(base: str, path: str, total: int, *, declared: int | None = None,
           piece: int = 1 << 20) -> tuple[int, Any, int]:
    """POST ``total`` bytes to ``path`` over a raw HTTP/1.1 connection, with Content-Length
    ``declared`` or (None) chunked, reading the answer while sending (a server may answer
    before the body is complete). Returns (status, JSON body, body bytes sent)."""
    url = urlsplit(base)
    assert url.hostname is not None and url.port is not None
    conn = h11.Connection(h11.CLIENT)
    headers = [("Host", url.netloc), ("Content-Type", "application/json")]
    headers.append(("Content-Length", str(declared)) if declared is not None
                   else ("Transfer-Encoding", "chunked"))
    out = conn.send(h11.Request(method="POST", target=path, headers=headers)) or b""
    sent = 0
    status, body = None, bytearray()
    deadline = time.monotonic() + ATTACK_S
    with socket.create_connection((url.hostname, url.port), timeout=10) as sock:
        sock.setblocking(False)
        sending = True
        while True:
            assert time.monotonic() < deadline, f"no answer within {ATTACK_S} s"
            if sending and not out and sent < total:
                n = min(piece, total - sent)
                out = conn.send(h11.Data(data=b"x" * n)) or b""
                sent += n
                if sent == total and declared is None:
                    out += conn.send(h11.EndOfMessage()) or b""
            writing = [sock] if sending and out else []
            readable, writable, _ = select.select([sock], writing, [], 0.5)
            if writable:
                try:
                    out = out[sock.send(out):]
                except OSError:  # the server answered and closed: stop sending
                    sending = False
            if readable:
                try:
                    data = sock.recv(1 << 16)
                except ConnectionResetError:
                    data = b""
                conn.receive_data(data)
                while (event := conn.next_event()) is not h11.NEED_DATA:
                    if isinstance(event, h11.Response):
                        status = event.status_code
                        sending = False  # the answer is there: the rest is not wanted
                    elif isinstance(event, h11.Data):
                        body += event.data
                    elif isinstance(event, h11.EndOfMessage | h11.ConnectionClosed):
                        assert status is not None
                        return status, json.loads(body), sent
                if not data:
                    raise AssertionError(f"the server closed the connection after {sent} "
                                         "bytes without answering")


@pytest.mark.parametrize("declared", [True, False], ids=["content-length", "chunked"])
def test_oversized_a2a_body_gets_413_json_at_once(node: NodeProcess, declared: bool) -> None:
    total = DEFAULT_MAX_BODY + (8 << 20)
    status, doc, sent = while_probing(node, lambda: upload(
        node.http, "/a2a", total, declared=total if declared else None))
    assert status == 413, doc
    assert doc["detail"]["reason"] == "body_too_large"
    assert doc["detail"]["limit"] == DEFAULT_MAX_BODY
    assert str(DEFAULT_MAX_BODY) in doc["detail"]["message"]
    if declared:  # refused on the header: hardly any of the body was read
        assert sent < 8 << 20
    assert sent < total  # the node stopped reading before the end


@pytest.mark.parametrize("path", ["/v1/agents", "/v1/shards/fetch", "/healthz"])
def test_every_route_has_a_body_limit(node: NodeProcess, path: str) -> None:
    """A declared 1 GiB body: 413 on the header, and the node reads hardly any of it."""
    total = 1 << 30
    status, doc, sent = upload(node.http, path, total, declared=total)
    assert status == 413, doc
    assert doc["detail"] == {"reason": "body_too_large", "limit": DEFAULT_BODY_LIMIT,
                             "message": f"the request body ({total} bytes) is larger than the "
                                        f"limit of {DEFAULT_BODY_LIMIT} bytes"}
    assert sent < 64 << 20


def test_oversized_chunked_card_is_cut_at_the_card_limit(node: NodeProcess) -> None:
    status, doc, sent = upload(node.http, "/v1/agents", 4 << 20, piece=1 << 16)
    assert status == 413, doc
    assert doc["detail"]["reason"] == "oversized"
    assert sent < 4 << 20


def test_the_node_still_serves_after_the_attacks(node: NodeProcess) -> None:
    assert httpx.get(node.http + "/healthz", timeout=5).json()["status"] == "ok"
    reply = post_a2a(node, a2a_send("bafkreigh2akiscaildcqabsyg3dfr6chu3fgpregiymsck7e7aqa4s52zy"))
    assert reply["error"]["data"]["veilnet"]["code"] == "unknown_shard"



# -- streams a peer holds open --------------------------------------------------------------------

async def _hold(host: IHost, addr: str, streams: int) -> list[str]:
    """Open ``streams`` infer streams at once and keep them open while each gets a frame that
    breaks the framing; returns the error code the node answered on each."""
    info = peer_info(addr)
    await connect(host, info, 10)
    opened = [await host.new_stream(info.peer_id, [INFER]) for _ in range(streams)]
    codes = []
    try:
        for stream in opened:
            await stream.write(b"\xff" * 10)  # a varint longer than 9 bytes: bad_frame
            answer = await read_frame(stream)
            codes.append(answer["error"]["code"] if answer else "none")
    finally:
        for stream in opened:
            await stream.reset()
    return codes


def test_streams_one_peer_holds_open_are_capped(node: NodeProcess) -> None:
    """One peer opens 24 infer streams at once: the node serves MAX_STREAMS_PER_PEER of them
    and answers the others ``busy`` (each open stream can hold a frame of up to the frame
    limit, so the cap bounds what one peer can make the node read at once)."""
    from node.service import MAX_STREAMS_PER_PEER

    peer = ClientThread().start()
    try:
        codes = while_probing(node, lambda: peer.run(_hold, node.addr, 24))
    finally:
        peer.close()
    assert codes.count("bad_frame") == MAX_STREAMS_PER_PEER, codes
    assert codes.count("busy") == 24 - MAX_STREAMS_PER_PEER, codes
    # the streams are released: the node serves new ones
    again = ClientThread().start()
    try:
        assert again.run(_hold, node.addr, 2) == ["bad_frame", "bad_frame"]
    finally:
        again.close()


async def _declare_big_frame(host: IHost, addr: str, length: int,
                             hold: threading.Event | None) -> dict[str, str]:
    """Open an infer stream announcing a frame of ``length`` bytes and send none of it. With
    ``hold``: keep it so until ``hold`` is set ({} back); else return the node's error at once."""
    info = peer_info(addr)
    await connect(host, info, 10)
    stream = await host.new_stream(info.peer_id, [INFER])
    try:
        await stream.write(encode_varint(length))
        if hold is not None:
            while not hold.is_set():
                await trio.sleep(0.05)
            return {}
        with trio.fail_after(10):
            answer = await read_frame(stream)
        return answer["error"] if answer else {}
    finally:
        await stream.reset()


def test_request_bytes_in_flight_are_capped_per_peer_and_per_node(node: NodeProcess) -> None:
    """Frames a node reads at once are budgeted. A peer may have one frame limit of request
    bytes in flight: its second frame is refused ``busy`` (``peer_bytes``) at once. Four peers
    each announcing a 64 MiB frame (the frame limit) reserve the node's whole budget, and a
    fifth peer is refused (``node_bytes``) instead of the node reading another 64 MiB."""
    from node.service import IN_FLIGHT_FRAMES
    from protocols.wire import DEFAULT_FRAME_LIMIT

    peers = [ClientThread().start() for _ in range(IN_FLIGHT_FRAMES + 1)]
    release = threading.Event()
    holding: list[threading.Thread] = []

    def hold(peer: ClientThread) -> None:
        thread = threading.Thread(target=peer.run, daemon=True, args=(
            _declare_big_frame, node.addr, DEFAULT_FRAME_LIMIT, release))
        thread.start()
        holding.append(thread)
        time.sleep(0.5)  # the node has read the header and reserved the bytes

    def probe() -> tuple[dict[str, str], dict[str, str]]:
        hold(peers[0])  # peer 0 holds a frame limit of bytes: its next frame is over its share
        own = peers[0].run(_declare_big_frame, node.addr, 1024, None)
        for peer in peers[1:IN_FLIGHT_FRAMES]:  # three more peers fill the node's budget
            hold(peer)
        return own, peers[-1].run(_declare_big_frame, node.addr, 1024, None)

    try:
        own, last = while_probing(node, probe)
    finally:
        release.set()
        for thread in holding:
            thread.join(15)
        for peer in peers:
            peer.close()
    assert (own.get("code"), own.get("reason")) == ("busy", "peer_bytes"), own
    assert (last.get("code"), last.get("reason")) == ("busy", "node_bytes"), last
