"""``NodeService``: the node's side of every libp2p protocol (messages in protocols/).

It owns the request plumbing (``_serve``: stream and in-flight byte limits, timeouts, error
frames), serves ``/veilnet/infer/1``, ``/veilnet/shard/1`` and ``/veilnet/peers/1`` itself and
hands ``/veilnet/session/1`` to ``SessionService``, ``/veilnet/cards/1`` to ``Discovery`` and
``/veilnet/ledger/1`` and ``/veilnet/witness/1`` to ``LedgerService``. It also fetches
deployments from peers and says hello to bootstrap nodes. Nothing a peer sends can stop the
node: every failure becomes an error frame, a log line and a counter in /metrics.
"""

from __future__ import annotations

import contextlib
import importlib.metadata
import logging
import time
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

import trio
from libp2p.abc import IHost, INetStream
from libp2p.peer.id import ID

from crypto.identity import Identity
from errors import InputError
from node.byzantine import Byzantine
from node.discovery import Discovery
from node.executor import ShardExecutor
from node.fair import Busy
from node.ledger_service import LedgerService
from node.metrics import NodeMetrics
from node.peers import PeerTable
from node.rankings_service import RankingService
from node.recorder import ReceivedRecorder
from node.session_service import SessionService
from node.sessions import SessionLimits
from node.store import ShardStore, StoreError
from protocols import shard as shard_proto
from protocols.cards import CARDS
from protocols.infer import INFER, CkksRequest, InferRequest, answer, parse_request
from protocols.ledger import LEDGER
from protocols.peers import PEERS, PeerRecord, exchange_peers, hello_answer, parse_hello
from protocols.session import SESSION
from protocols.shard import SHARD, send_file
from protocols.transport import (
    PEER_ERRORS,
    close_quietly,
    ensure_connected,
    error_text,
    full_addrs,
    peer_info,
    remote_peer,
    widen_window,
)
from protocols.wire import (
    WireError,
    check_envelope,
    decode_frame_body,
    read_exactly,
    read_frame_length,
    request_id_of,
    write_frame,
)
from protocols.witness import WITNESS
from registry.card import ServedShard, build_card

log = logging.getLogger("veilnet.node")
VERSION = importlib.metadata.version("veilnet")
# Inbound streams a node serves at once, per peer and in all, and the request bytes it reads
# or handles at once: with the frame limit, these bound the memory requests can take.
MAX_STREAMS_PER_PEER = 16
MAX_STREAMS = 256
IN_FLIGHT_FRAMES = 4  # request bodies being read or handled at once, in frame limits of bytes


class FetchRefused(InputError):
    """A fetch request that cannot be served whatever the peers hold (HTTP 400)."""

Handler = Callable[[INetStream, dict[str, Any]], Awaitable[None]]


class NodeService:
    def __init__(self, identity: Identity, store: ShardStore, executor: ShardExecutor,
                 *, frame_limit: int, request_timeout: float, peer_ttl: float = 45.0,
                 idle_timeout: float = 30.0,
                 sessions: SessionLimits | None = None) -> None:
        self.identity = identity
        self.store = store
        self.executor = executor
        self.metrics = NodeMetrics()
        self.peers = PeerTable(peer_ttl)
        self.sessions = SessionService(identity, executor, self.metrics, sessions)
        self.frame_limit = frame_limit
        self.request_timeout = request_timeout
        self.idle_timeout = idle_timeout  # a reused infer stream is closed after this long idle
        self.discovery: Discovery | None = None  # set by the daemon before attach()
        self.ledger: LedgerService | None = None  # likewise
        self.byzantine: Byzantine | None = None  # --byzantine-test-mode only
        self.rankings: RankingService | None = None  # set by the daemon
        self.recorder: ReceivedRecorder | None = None  # --record-received only (set_recorder)
        self.host: IHost | None = None
        self.http_url: str | None = None
        self.started = time.time()
        self.in_flight_limit = IN_FLIGHT_FRAMES * frame_limit
        self._in_flight = 0  # bytes of request bodies being read or handled
        self._in_flight_by_peer: dict[str, int] = {}  # the same, by peer
        self._streams: dict[str, int] = {}  # open inbound streams by peer

    # -- identity ---------------------------------------------------------------------------------

    def addrs(self) -> list[str]:
        return full_addrs(self.host) if self.host else []

    def record(self) -> PeerRecord:
        return PeerRecord(self.identity.peer_id, self.identity.did, self.addrs(),
                          sorted(self.store.shards()), self.http_url)

    def attach(self, host: IHost) -> None:
        self.host = host
        host.set_stream_handler(INFER, self.handle_infer)
        host.set_stream_handler(SHARD, self.handle_shard)
        host.set_stream_handler(PEERS, self.handle_peers)
        host.set_stream_handler(SESSION, self.handle_session)
        if self.discovery is not None:
            host.set_stream_handler(CARDS, self.handle_cards)
        if self.ledger is not None:
            self.ledger.host = host
            host.set_stream_handler(LEDGER, self.handle_ledger)
            host.set_stream_handler(WITNESS, self.handle_witness)

    def set_recorder(self, recorder: ReceivedRecorder | None) -> None:
        """Record what clients send over /veilnet/infer/1 and /veilnet/session/1."""
        self.recorder = recorder
        self.sessions.recorder = recorder

    def served_shards(self) -> list[ServedShard]:
        """The shards this node serves, each with its deployment manifest's ``encryption``
        (the card states the scheme, so it never claims more protection than the model has)."""
        schemes = {mcid: manifest.encryption for mcid, manifest in self.store.manifests()}
        return [ServedShard(s.deployment, s.model, cid, s.spec.index,
                            schemes.get(s.deployment, "none"))
                for cid, s in sorted(self.store.shards().items())]

    def build_card(self, ttl: float) -> dict[str, Any]:
        """This node's signed agent card, valid for ``ttl`` seconds from now (Discovery signs
        it for three of its current announce intervals)."""
        http = self.http_url or ""
        ledger = self.ledger
        return build_card(self.identity, a2a_url=f"{http}/a2a", http=http,
                          multiaddrs=self.addrs(), shards=self.served_shards(),
                          capacity=self.executor.capacity,
                          ttl=ttl,
                          version=VERSION,
                          ledger_key=ledger.ledger.verifier_key if ledger and ledger.ledger
                          else None,
                          witness_key=ledger.witness.verifier_key if ledger else None)

    # -- request plumbing -----------------------------------------------------------------------

    async def _serve(self, stream: INetStream, protocol: str, handle: Handler,
                     persistent: bool = False, admit: bool = False) -> None:
        """Answer requests on ``stream``: one, or (``persistent``) one after another until the
        peer closes it, stays idle for ``idle_timeout`` or breaks the framing. A peer with
        ``MAX_STREAMS_PER_PEER`` streams open, or a node with ``MAX_STREAMS``, gets ``busy``."""
        peer = _peer_of(stream)
        try:
            refusal = None
            if self._streams.get(peer, 0) >= MAX_STREAMS_PER_PEER:
                refusal = Busy("peer_streams", f"you have {MAX_STREAMS_PER_PEER} streams open "
                                               "at this node, its limit per peer; close idle "
                                               "ones or retry later")
            elif sum(self._streams.values()) >= MAX_STREAMS:
                refusal = Busy("node_streams", f"this node serves {MAX_STREAMS} streams, its "
                                               "limit; retry later or use another node")
            if refusal is not None:
                self.metrics.requests.labels(protocol).inc()
                await self._send_error(stream, protocol, refusal, None)
                return
            self._streams[peer] = self._streams.get(peer, 0) + 1
            try:
                await widen_window(stream)
                first = True
                while await self._serve_one(stream, protocol, handle, first, admit) \
                        and persistent:
                    first = False
            finally:
                self._streams[peer] -= 1
                if not self._streams[peer]:
                    del self._streams[peer]
        finally:
            await close_quietly(stream, 2.0)

    async def _serve_one(self, stream: INetStream, protocol: str, handle: Handler,
                         first: bool, admit: bool) -> bool:
        """Serve one request; True when the stream can carry another one."""
        request_id: str | None = None
        framing_ok = True
        reserved = 0
        admitted = False
        peer = _peer_of(stream)
        try:
            with trio.move_on_after(self.request_timeout if first else self.idle_timeout) as wait:
                length = await read_frame_length(stream)
            if wait.cancelled_caught:
                if first:
                    raise trio.TooSlowError
                return False  # idle: close quietly
            if length is None:
                if first:
                    raise WireError("bad_request", "the stream closed before a request frame")
                return False
            self.metrics.requests.labels(protocol).inc()
            if admit:  # a peer with its share of requests in hand is not read until one ends
                with trio.move_on_after(self.request_timeout) as waited:
                    await self.executor.fair.admit(peer)
                if waited.cancelled_caught:
                    framing_ok = False  # the body was not read: the stream closes
                    raise Busy("peer_queue", f"your requests waited {self.request_timeout:g} s "
                                             "for room in this node's queue; retry later or "
                                             "use another node")
                admitted = True
            with trio.fail_after(self.request_timeout):
                framing_ok = False
                if length > self.frame_limit:
                    raise WireError("frame_too_large", f"the frame has {length} bytes, the "
                                                       f"limit is {self.frame_limit}")
                self._reserve(peer, length)
                reserved = length
                body = await read_exactly(stream, length)
                framing_ok = True
                message = await decode_frame_body(body)
                request_id = request_id_of(message)  # echoed in an error, when valid
                check_envelope(message)
                await handle(stream, message)  # raises WireError only before it writes
                return True
        except WireError as exc:
            await self._send_error(stream, protocol, exc, request_id)
            return framing_ok
        except trio.TooSlowError:
            await self._send_error(stream, protocol, WireError(
                "timeout", f"no complete request within {self.request_timeout:g} s"), request_id)
        except Exception as exc:  # a bug must not take the node down: report it, keep serving
            log.exception("%s: internal error", protocol)
            await self._send_error(stream, protocol, WireError(
                "internal", f"{type(exc).__name__} while handling the request"), request_id)
        finally:
            self._unreserve(peer, reserved)
            if admitted:
                self.executor.fair.unadmit(peer)
        return False

    def _reserve(self, peer: str, length: int) -> None:
        """Count ``length`` request bytes as in flight for ``peer``, or ``Busy``: a peer may
        have one frame limit of bytes in flight, the node ``in_flight_limit``."""
        mine = self._in_flight_by_peer.get(peer, 0)
        if mine and mine + length > self.frame_limit:
            raise Busy("peer_bytes", f"{mine} bytes of your requests are being handled, and "
                                     f"with {length} more you would pass this node's limit per "
                                     f"peer ({self.frame_limit}); wait for the answers")
        if self._in_flight + length > self.in_flight_limit:
            raise Busy("node_bytes", f"{self._in_flight} bytes of requests are being handled; "
                                     "retry later or use another node")
        self._in_flight += length
        self._in_flight_by_peer[peer] = mine + length

    def _unreserve(self, peer: str, length: int) -> None:
        if length:
            self._in_flight -= length
            left = self._in_flight_by_peer.pop(peer) - length
            if left:
                self._in_flight_by_peer[peer] = left

    async def _send_error(self, stream: INetStream, protocol: str, exc: WireError,
                          request_id: str | None) -> None:
        self.metrics.errors.labels(protocol, exc.code).inc()
        if isinstance(exc, Busy):
            self.metrics.busy.labels(exc.reason).inc()
        log.info("%s from %s: %s", protocol, _peer_of(stream), exc)
        # a peer that is gone cannot be told; nothing else to do
        with trio.move_on_after(5), contextlib.suppress(Exception):
            await write_frame(stream, exc.to_message(request_id))

    # -- /veilnet/infer/1 -----------------------------------------------------------------------

    async def handle_infer(self, stream: INetStream) -> None:
        await self._serve(stream, str(INFER), self._infer, persistent=True, admit=True)

    async def _infer(self, stream: INetStream, message: dict[str, Any]) -> None:
        started = time.perf_counter()
        await write_frame(stream, await self.infer(message, _peer_of(stream)))
        self.metrics.latency.observe(time.perf_counter() - started)

    async def infer(self, message: dict[str, Any], peer: str | None = None) -> dict[str, Any]:
        """The signed response to an infer request (already checked for ``v`` and ``id``) from
        ``peer`` (None: not known, as over A2A); raises WireError. Used by /veilnet/infer/1
        and the A2A endpoint."""
        request = parse_request(message, message["id"])
        seeded = isinstance(request, InferRequest) and bool(request.seeds)
        if seeded:  # masked/1: draw the masks from their seeds (CPU work, off the event loop)
            assert isinstance(request, InferRequest)
            request = await trio.to_thread.run_sync(request.expanded)
        if self.recorder is not None:  # --record-received: exactly what the client sent
            ckks = request if isinstance(request, CkksRequest) else None
            await self.recorder.record(  # a mask-seed request: the masks its seeds expand to
                protocol=str(INFER), op="infer-mask-seed" if seeded else "infer",
                request_id=request.id, shard=request.shard,
                peer=peer, inputs=request.inputs if isinstance(request, InferRequest) else {},
                context=ckks.context if ckks else None,
                ciphertexts=ckks.ciphertexts if ckks else None)
        if isinstance(request, CkksRequest):
            from node.ckks_infer import infer_ckks  # loads TenSEAL: only when a node needs it

            return await infer_ckks(self.executor, self.identity, request, peer or "")
        run_started = time.perf_counter()
        outputs = await self.executor.run(request.shard, dict(request.inputs), peer or "")
        self.metrics.run_time.observe(time.perf_counter() - run_started)
        if self.byzantine is not None:  # test mode: a wrong answer, signed as if right
            outputs = await self.byzantine.corrupt(request.shard, request.inputs, outputs,
                                                   sorted(self.store.shards()), self.executor.run)
        return answer(self.identity, request, outputs)

    # -- /veilnet/session/1 (node/session_service.py) ---------------------------------------------

    async def handle_session(self, stream: INetStream) -> None:
        await self._serve(stream, str(SESSION), self.sessions.handle, persistent=True,
                          admit=True)

    # -- /veilnet/shard/1 -----------------------------------------------------------------------

    async def handle_shard(self, stream: INetStream) -> None:
        await self._serve(stream, str(SHARD), self._shard)

    async def _shard(self, stream: INetStream, message: dict[str, Any]) -> None:
        cid = shard_proto.parse_request(message)
        await send_file(stream, message["id"], cid, self.store.blob_path(cid))

    async def fetch_blob(self, peer: ID, cid: str, timeout: float, *, manifest: bool = False,
                         size: int | None = None) -> int:
        """Download a manifest (``manifest``) or a node shard from ``peer`` into the store.

        The chunks go to a temporary file, hashed as they are written, and the file is stored
        only if it matches ``cid``. A download is capped (ShardStore.download_limit): at the
        ``size`` the manifest declares for the shard, at 1 MiB for a manifest, else at the node's
        ``shard_size_limit``; a header announcing more is refused before any chunk is read.
        Returns the bytes stored."""
        assert self.host is not None
        limit, why = self.store.download_limit(manifest, size)
        return await shard_proto.fetch(
            self.host, peer, cid, timeout, limit=limit, why=why, size=size,
            what="manifest" if manifest else "shard", frame_limit=self.frame_limit,
            open_sink=lambda: self.store.receive(cid, limit, manifest))

    async def fetch_deployment(self, deployment: str, shards: Sequence[str] | None,
                               source: str | None, timeout: float = 120.0) -> list[str]:
        """Fetch a deployment manifest and its node shards (all, or ``shards``) from a peer:
        the one at ``source``, else each known peer in turn. Everything is checked against its
        CID before it is stored, and each download is capped (see fetch_blob). A stored shard
        known to be corrupt is fetched again."""
        assert self.host is not None
        if source is not None:
            info = peer_info(source)
            providers = [(str(info.peer_id), [source])]
        else:  # nodes whose cards name the deployment first, then every known peer
            infos = self.discovery.index.infos(deployment=deployment) if self.discovery else []
            providers = [(i.peer_id, i.multiaddrs) for i in infos]
            providers += [(r.peer_id, r.addrs) for r in self.peers.records()]
            providers = [p for p in providers if p[0] != self.identity.peer_id]
        if not providers:
            raise FetchRefused("no peer to fetch from: name one with 'peer'")
        errors: list[str] = []
        for peer_id, addrs in providers:
            try:
                peer = await ensure_connected(self.host, peer_id, addrs, 10)
                if not self.store.manifest_path(deployment).is_file():
                    await self.fetch_blob(peer, deployment, timeout, manifest=True)
                manifest = await trio.to_thread.run_sync(self.store.load_manifest, deployment)
                specs = {s.cid: s for s in manifest.node_shards}
                wanted = list(shards) if shards else list(specs)
                bad = [c for c in wanted if c not in specs]
                if bad:
                    raise FetchRefused(f"{bad} are not node shards of deployment {deployment}; "
                                       "a node never takes client material")
                todo = [c for c in wanted
                        if not self.store.shard_path(c).is_file() or self.store.is_corrupt(c)]
                started = time.monotonic()
                sized = all(specs[c].size is not None for c in todo)  # old manifests: no sizes
                total, done = sum(specs[c].size or 0 for c in todo), 0
                for k, cid in enumerate(todo, 1):  # one progress line per shard in the log
                    await self.fetch_blob(peer, cid, timeout, size=specs[cid].size)
                    done += specs[cid].size or 0
                    log.info("fetch %s: shard %d/%d %s from %s, %s in %.1f s", deployment, k,
                             len(todo), cid, peer_id,
                             f"{done / 1e6:.1f} of {total / 1e6:.1f} MB" if sized
                             else "sizes not in the manifest", time.monotonic() - started)
                if self.discovery is not None:
                    self.discovery.announce_soon()  # the card now names the new shards
                return wanted
            except FetchRefused:
                raise
            except PEER_ERRORS as exc:  # this peer could not supply it: try the next
                errors.append(f"{peer_id}: {error_text(exc)}")
        raise StoreError("fetch failed: " + "; ".join(errors))

    # -- /veilnet/cards/1 -----------------------------------------------------------------------

    async def handle_cards(self, stream: INetStream) -> None:
        assert self.discovery is not None
        await self._serve(stream, str(CARDS), self.discovery.lookup)

    # -- /veilnet/ledger/1 and /veilnet/witness/1 -------------------------------------------------

    async def handle_ledger(self, stream: INetStream) -> None:
        assert self.ledger is not None
        await self._serve(stream, str(LEDGER), self.ledger.handle_ledger)

    async def handle_witness(self, stream: INetStream) -> None:
        assert self.ledger is not None
        await self._serve(stream, str(WITNESS), self.ledger.handle_witness)

    # -- /veilnet/peers/1 -----------------------------------------------------------------------

    async def handle_peers(self, stream: INetStream) -> None:
        await self._serve(stream, str(PEERS), self._peers)

    async def _peers(self, stream: INetStream, message: dict[str, Any]) -> None:
        sender = remote_peer(stream)
        record = parse_hello(message, sender)
        if record is not None:
            self.peers.upsert(record)
        await write_frame(stream, hello_answer(
            message["id"], self.record(),
            [r for r in self.peers.records() if r.peer_id != sender]))

    async def announce(self, bootstrap: Sequence[str], timeout: float = 10.0) -> None:
        """Say hello to each bootstrap node and learn the peers it knows."""
        assert self.host is not None
        for addr in bootstrap:
            try:
                if str(peer_info(addr).peer_id) == self.identity.peer_id:
                    continue
                responder, relayed = await exchange_peers(self.host, addr, self.record(),
                                                          timeout)
                self.peers.upsert(responder)
                for record, age in relayed:
                    if record.peer_id != self.identity.peer_id:
                        self.peers.upsert(record, age=age)
            except PEER_ERRORS as exc:
                log.warning("bootstrap %s: %s", addr, error_text(exc))

    async def announce_loop(self, bootstrap: Sequence[str], interval: float) -> None:
        while True:
            await self.announce(bootstrap)
            await trio.sleep(interval)


def _peer_of(stream: INetStream) -> str:
    try:
        return remote_peer(stream)
    except Exception:  # a stream whose connection is gone: only a log line needs the name
        return "?"

