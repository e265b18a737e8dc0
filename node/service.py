"""The node's libp2p protocols: /veilnet/infer/1, /veilnet/shard/1 and /veilnet/peers/1.

Each handler reads one request frame, answers with one response (or a structured error) and
closes the stream. Nothing a peer sends can stop the node: every failure becomes an error frame,
a log line and a counter in /metrics.
"""

from __future__ import annotations

import contextlib
import importlib.metadata
import logging
import os
import time
from collections.abc import Awaitable, Callable, Sequence
from typing import TYPE_CHECKING, Any

import trio
from libp2p.abc import IHost, INetStream
from libp2p.peer.id import ID

from consensus.fingerprint import fingerprint
from crypto.identity import Identity
from models import is_valid_cid
from node.executor import ShardExecutor
from node.metrics import NodeMetrics
from node.p2p import (
    CARDS,
    INFER,
    LEDGER,
    PEERS,
    SHARD,
    WITNESS,
    RemoteError,
    close_quietly,
    ensure_connected,
    error_text,
    full_addrs,
    open_stream,
    peer_info,
    remote_peer,
    widen_window,
)
from node.peers import PeerRecord, PeerTable, exchange_peers, parse_record
from node.store import ShardStore, StoreError
from node.wire import (
    WIRE_VERSION,
    WireError,
    decode_frame_body,
    decode_tensors,
    encode_tensors,
    fingerprint_payload,
    read_exactly,
    read_frame,
    read_frame_length,
    receipt_payload,
    tensors_digest,
    write_frame,
)
from registry.card import ServedShard, build_card

log = logging.getLogger("veilnet.node")
VERSION = importlib.metadata.version("veilnet")
CHUNK = 1 << 20
CHUNK_OVERHEAD = 64  # CBOR framing of {"data": <bytes>} around a chunk's bytes
HEADER_LIMIT = 64 * 1024  # a /veilnet/shard/1 header or error frame
MAX_ID_LENGTH = 128
# Inbound streams a node serves at once, per peer and in all, and the request bytes it reads
# or handles at once: with the frame limit, these bound the memory requests can take.
MAX_STREAMS_PER_PEER = 16
MAX_STREAMS = 256
IN_FLIGHT_FRAMES = 4  # request bodies being read or handled at once, in frame limits of bytes


class FetchRefused(ValueError):
    """A fetch request that cannot be served whatever the peers hold (HTTP 400)."""


if TYPE_CHECKING:
    from node.byzantine import Byzantine
    from node.discovery import Discovery
    from node.ledger_service import LedgerService
    from node.rankings_service import RankingService

Handler = Callable[[INetStream, dict[str, Any]], Awaitable[None]]


class NodeService:
    def __init__(self, identity: Identity, store: ShardStore, executor: ShardExecutor,
                 *, frame_limit: int, request_timeout: float, peer_ttl: float = 45.0,
                 idle_timeout: float = 30.0, card_ttl: float = 30.0) -> None:
        self.identity = identity
        self.store = store
        self.executor = executor
        self.metrics = NodeMetrics()
        self.peers = PeerTable(peer_ttl)
        self.frame_limit = frame_limit
        self.request_timeout = request_timeout
        self.idle_timeout = idle_timeout  # a reused infer stream is closed after this long idle
        self.card_ttl = card_ttl
        self.discovery: Discovery | None = None  # set by the daemon before attach()
        self.ledger: LedgerService | None = None  # likewise
        self.byzantine: Byzantine | None = None  # --byzantine-test-mode only
        self.rankings: RankingService | None = None  # set by the daemon
        self.host: IHost | None = None
        self.http_url: str | None = None
        self.started = time.time()
        self.in_flight_limit = IN_FLIGHT_FRAMES * frame_limit
        self._in_flight = 0  # bytes of request bodies being read or handled
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
        if self.discovery is not None:
            host.set_stream_handler(CARDS, self.handle_cards)
        if self.ledger is not None:
            self.ledger.host = host
            host.set_stream_handler(LEDGER, self.handle_ledger)
            host.set_stream_handler(WITNESS, self.handle_witness)

    def served_shards(self) -> list[ServedShard]:
        """The shards this node serves, each with its deployment manifest's ``encryption``
        (the card states the scheme, so it never claims more protection than the model has)."""
        schemes = {mcid: manifest.encryption for mcid, manifest in self.store.manifests()}
        return [ServedShard(s.deployment, s.model, cid, s.spec.index,
                            schemes.get(s.deployment, "none"))
                for cid, s in sorted(self.store.shards().items())]

    def build_card(self) -> dict[str, Any]:
        """This node's signed agent card, valid for ``card_ttl`` seconds from now."""
        http = self.http_url or ""
        ledger = self.ledger
        return build_card(self.identity, a2a_url=f"{http}/a2a", http=http,
                          multiaddrs=self.addrs(), shards=self.served_shards(),
                          capacity=int(self.executor.limiter.total_tokens), ttl=self.card_ttl,
                          version=VERSION,
                          ledger_key=ledger.ledger.verifier_key if ledger and ledger.ledger
                          else None,
                          witness_key=ledger.witness.verifier_key if ledger else None)

    # -- request plumbing -----------------------------------------------------------------------

    async def _serve(self, stream: INetStream, protocol: str, handle: Handler,
                     persistent: bool = False) -> None:
        """Answer requests on ``stream``: one, or (``persistent``) one after another until the
        peer closes it, stays idle for ``idle_timeout`` or breaks the framing. A peer with
        ``MAX_STREAMS_PER_PEER`` streams open, or a node with ``MAX_STREAMS``, gets ``busy``."""
        peer = _peer_of(stream)
        try:
            if self._streams.get(peer, 0) >= MAX_STREAMS_PER_PEER \
                    or sum(self._streams.values()) >= MAX_STREAMS:
                self.metrics.requests.labels(protocol).inc()
                await self._send_error(stream, protocol, WireError(
                    "busy", f"too many open streams (at most {MAX_STREAMS_PER_PEER} per peer, "
                            f"{MAX_STREAMS} in all); close idle ones or retry later"), None)
                return
            self._streams[peer] = self._streams.get(peer, 0) + 1
            try:
                await widen_window(stream)
                first = True
                while await self._serve_one(stream, protocol, handle, first) and persistent:
                    first = False
            finally:
                self._streams[peer] -= 1
                if not self._streams[peer]:
                    del self._streams[peer]
        finally:
            await close_quietly(stream, 2.0)

    async def _serve_one(self, stream: INetStream, protocol: str, handle: Handler,
                         first: bool) -> bool:
        """Serve one request; True when the stream can carry another one."""
        request_id: str | None = None
        framing_ok = True
        reserved = 0
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
            with trio.fail_after(self.request_timeout):
                framing_ok = False
                if length > self.frame_limit:
                    raise WireError("frame_too_large", f"the frame has {length} bytes, the "
                                                       f"limit is {self.frame_limit}")
                if self._in_flight + length > self.in_flight_limit:
                    raise WireError("busy", f"{self._in_flight} bytes of requests are being "
                                            "handled; retry later or use another node")
                self._in_flight += length
                reserved = length
                body = await read_exactly(stream, length)
                framing_ok = True
                message = await decode_frame_body(body)
                raw_id = message.get("id")
                if isinstance(raw_id, str) and len(raw_id) <= MAX_ID_LENGTH:
                    request_id = raw_id
                if message.get("v") != WIRE_VERSION:
                    raise WireError("unsupported_version",
                                    f"wire version {message.get('v')!r}; this node speaks "
                                    f"{WIRE_VERSION}")
                if request_id is None:
                    raise WireError("bad_request", f"'id' must be a string of at most "
                                                   f"{MAX_ID_LENGTH} characters")
                await handle(stream, message)  # raises WireError only before it writes
                return True
        except WireError as exc:
            await self._send_error(stream, protocol, exc, request_id)
            return framing_ok
        except trio.TooSlowError:
            await self._send_error(stream, protocol, WireError(
                "timeout", f"no complete request within {self.request_timeout:g} s"), request_id)
        except Exception as exc:  # a bug must not take the node down; report it and keep serving
            log.exception("%s: internal error", protocol)
            await self._send_error(stream, protocol, WireError(
                "internal", f"{type(exc).__name__} while handling the request"), request_id)
        finally:
            self._in_flight -= reserved
        return False

    async def _send_error(self, stream: INetStream, protocol: str, exc: WireError,
                          request_id: str | None) -> None:
        self.metrics.errors.labels(protocol, exc.code).inc()
        log.info("%s from %s: %s", protocol, _peer_of(stream), exc)
        # a peer that is gone cannot be told; nothing else to do
        with trio.move_on_after(5), contextlib.suppress(Exception):
            await write_frame(stream, exc.to_message(request_id))

    # -- /veilnet/infer/1 -----------------------------------------------------------------------

    async def handle_infer(self, stream: INetStream) -> None:
        await self._serve(stream, str(INFER), self._infer, persistent=True)

    async def _infer(self, stream: INetStream, message: dict[str, Any]) -> None:
        started = time.perf_counter()
        await write_frame(stream, await self.infer(message))
        self.metrics.latency.observe(time.perf_counter() - started)

    async def infer(self, message: dict[str, Any]) -> dict[str, Any]:
        """The signed response to an infer request (already checked for ``v`` and ``id``);
        raises WireError. Used by /veilnet/infer/1 and the A2A endpoint."""
        shard = message.get("shard")
        if not isinstance(shard, str) or not is_valid_cid(shard):
            raise WireError("bad_request", "'shard' must be a shard CID")
        encryption = message.get("encryption", "ee")
        if encryption == "ckks":
            from node.ckks_infer import infer_ckks  # TenSEAL is loaded only when used

            return await infer_ckks(self.executor, self.identity, message)
        if encryption != "ee":
            raise WireError("bad_request", f"'encryption' {encryption!r}: \"ee\" (default) or "
                                           "\"ckks\"")
        want = message.get("want", "outputs")
        if want not in ("outputs", "fingerprint"):
            raise WireError("bad_request", "'want' must be \"outputs\" or \"fingerprint\"")
        feeds = decode_tensors(message.get("inputs"), "'inputs'")
        run_started = time.perf_counter()
        outputs = await self.executor.run(shard, feeds)
        self.metrics.run_time.observe(time.perf_counter() - run_started)
        if self.byzantine is not None:  # test mode: a wrong answer, signed as if right
            outputs = await self.byzantine.corrupt(shard, feeds, outputs,
                                                   sorted(self.store.shards()), self.executor.run)
        input_digest = tensors_digest(feeds)
        output_digest = tensors_digest(outputs)
        signature = self.identity.sign(
            receipt_payload(message["id"], shard, input_digest, output_digest))
        response = {
            "v": WIRE_VERSION, "id": message["id"], "shard": shard,
            "input_digest": input_digest, "output_digest": output_digest,
            "node": self.identity.did, "signature": signature,
        }
        if want == "outputs":
            response["outputs"] = encode_tensors(outputs)
        else:  # a replica's check: the fingerprint instead of the tensors (consensus checks)
            fp = fingerprint(outputs)
            response["fingerprint"] = fp
            response["fingerprint_signature"] = self.identity.sign(
                fingerprint_payload(message["id"], shard, output_digest, fp))
        return response

    # -- /veilnet/shard/1 -----------------------------------------------------------------------

    async def handle_shard(self, stream: INetStream) -> None:
        await self._serve(stream, str(SHARD), self._shard)

    async def _shard(self, stream: INetStream, message: dict[str, Any]) -> None:
        cid = message.get("cid")
        if not isinstance(cid, str) or not is_valid_cid(cid):
            raise WireError("bad_request", "'cid' must be a CID")
        path = self.store.blob_path(cid)
        try:
            if path is None:
                raise FileNotFoundError
            blob = await trio.open_file(path, "rb")
        except OSError:
            raise WireError("not_found", f"this node holds no shard or manifest {cid}") from None
        async with blob:  # streamed from the file: a 1 GB shard never sits in memory
            size = os.fstat(blob.fileno()).st_size
            await write_frame(stream, {"v": WIRE_VERSION, "id": message["id"], "cid": cid,
                                       "size": size})
            sent = 0
            while sent < size:
                data = await blob.read(min(CHUNK, size - sent))
                if not data:  # the file shrank under us: the peer's hash check will fail
                    break
                await write_frame(stream, {"data": data})
                sent += len(data)

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
        what = "manifest" if manifest else "shard"
        with trio.fail_after(timeout):
            stream = await open_stream(self.host, peer, SHARD)
            try:
                await write_frame(stream, {"v": WIRE_VERSION, "id": f"fetch-{cid}", "cid": cid})
                header = await read_frame(stream, HEADER_LIMIT)
                if header is None or "error" in header:
                    err = (header or {}).get("error") or {}
                    err = err if isinstance(err, dict) else {}
                    raise RemoteError(str(err.get("code", "truncated"))[:64],
                                      str(err.get("message", "no answer"))[:500])
                declared = header.get("size")
                if not isinstance(declared, int) or isinstance(declared, bool) or declared < 0:
                    raise WireError("bad_frame", f"the {what} header has no valid 'size'")
                if declared > limit or (size is not None and declared != size):
                    raise WireError("too_large" if declared > limit else "bad_frame",
                                    f"the peer offers {what} {cid} as {declared} bytes; "
                                    f"{why} is {limit} bytes")
                with self.store.receive(cid, limit, manifest) as incoming:
                    while incoming.received < declared:
                        left = declared - incoming.received
                        chunk = await read_frame(stream, min(self.frame_limit,
                                                             left + CHUNK_OVERHEAD))
                        data = chunk.get("data") if chunk else None
                        if not isinstance(data, bytes) or not data or len(data) > left:
                            raise WireError("bad_frame", f"bad chunk after {incoming.received} "
                                                         f"of {declared} bytes")
                        await trio.to_thread.run_sync(incoming.write, data)
                    await trio.to_thread.run_sync(incoming.commit)
            finally:
                await close_quietly(stream)
        return declared

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
                for cid in wanted:
                    if not self.store.shard_path(cid).is_file() or self.store.is_corrupt(cid):
                        await self.fetch_blob(peer, cid, timeout, size=specs[cid].size)
                if self.discovery is not None:
                    self.discovery.announce_soon()  # the card now names the new shards
                return wanted
            except FetchRefused:
                raise
            except (Exception, trio.TooSlowError) as exc:
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
        if message.get("node") is not None:
            try:
                self.peers.upsert(parse_record(message["node"], authenticated_peer=sender))
            except ValueError as exc:
                raise WireError("bad_request", str(exc)) from None
        others = [r.to_json() for r in self.peers.records() if r.peer_id != sender]
        await write_frame(stream, {"v": WIRE_VERSION, "id": message["id"],
                                   "node": self.record().to_json(), "peers": others})

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
            except (Exception, trio.TooSlowError) as exc:
                log.warning("bootstrap %s: %s", addr, error_text(exc))

    async def announce_loop(self, bootstrap: Sequence[str], interval: float) -> None:
        while True:
            await self.announce(bootstrap)
            await trio.sleep(interval)


def _peer_of(stream: INetStream) -> str:
    try:
        return remote_peer(stream)
    except Exception:
        return "?"

