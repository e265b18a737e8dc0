"""Card discovery: signed agent cards over gossipsub, the card index, and card lookups.

Every node subscribes to the gossipsub topic ``veilnet/cards/1`` and publishes its own signed
card there: at start, every announce interval, when its shards change, and when a peer it had no
card for appears (so a node that joins late has every card within a second or two instead of
waiting a full interval).

The gossip is bounded per node (docs/reliability.md, "Many nodes"): each node receives every
card once per interval, so with N cards known the interval is ``max(announce_interval,
N / card_rate)`` (at most ``MAX_INTERVAL_S``): every node, seeing about the same N, slows down
alike and a node receives about ``card_rate`` cards a second however large the network. A card
lives three of its node's intervals. A newcomer is greeted by about ``GREETERS`` nodes, not by
all (each greets with probability ``GREETERS / N``); it hears the rest within one interval.

libp2p's strict signing proves which peer originated a message; a card
is indexed only if its own JWS verifies and names that same peer, it has not expired and it is
not oversized. Anything else is dropped, logged with the reason and counted in
``veilnet_cards_dropped_total{reason,source}``.

``/veilnet/cards/1`` (protocols/cards.py) answers lookups from the index, so a client that knows one
bootstrap node finds the nodes of every shard (and checks each card itself: the answering node
is not trusted).

Sybil cards: a signature proves who wrote a card, not that anyone answers at its addresses. A
card heard over gossipsub from its own peer is *confirmed* (registry/index.py); a card POSTed
over HTTP, or loaded from disk at start, is *unconfirmed* until a *check* dials its addresses
(at most ``CHECK_DIALS`` at once, ``MAX_PENDING_CHECKS`` waiting, ``CHECK_TIMEOUT_S`` each):
reaching its PeerID over Noise confirms it, failing demotes it. Lookups leave out cards under
check and demoted cards. Every dial this module makes of a card's addresses records its result
the same way.
"""

from __future__ import annotations

import collections
import contextlib
import functools
import json
import logging
import random
import time
from collections.abc import Callable
from typing import Any

import trio
from libp2p.abc import IHost, INetStream
from libp2p.peer.id import ID
from libp2p.pubsub.gossipsub import PROTOCOL_ID, PROTOCOL_ID_V11, GossipSub
from libp2p.pubsub.pb import rpc_pb2
from libp2p.pubsub.pubsub import Pubsub
from libp2p.tools.anyio_service import background_trio_service

from errors import UnavailableError
from node.metrics import NodeMetrics
from protocols.cards import CARDS_TOPIC, lookup_answer, lookup_cards, parse_lookup
from protocols.transport import DIAL_TIMEOUT, PEER_ERRORS, ensure_connected, error_text
from protocols.wire import write_frame
from registry.card import (
    MAX_CARD_BYTES,
    MAX_TTL_S,
    CardInfo,
    CardRejected,
    card_ttl,
    parse_card_json,
    verify_card,
)
from registry.index import CONFIRMED, FAILED, CardIndex

log = logging.getLogger("veilnet.discovery")

MAX_PEERS = 8            # connections a node opens to peers it learns from cards
NEW_PEER_DELAY = (0.05, 0.5)  # re-announce after a random delay in this range (coalesces)
MESH_POLL_S = 0.25           # how often the announce loop looks for new mesh peers
CHECK_TIMEOUT_S = DIAL_TIMEOUT + 2.0  # one check: every address of one card (one dial)
CHECK_DIALS = 16             # checks dialling at once
MAX_PENDING_CHECKS = 64      # cards queued or dialling; more POSTed cards are refused (busy)
MAX_START_CHECKS = 1024      # cards loaded from disk checked at start (the newest)
RECHECK_AFTER_S = 60.0       # a failed card POSTed again is dialled again only after this
MAX_VALIDATED = 1024         # cards verified by the topic validator, kept for delivery
MAX_GREETED = 20_000         # peers (and addresses) this node answered with its own card
CARD_RATE = 2.0              # cards/s a node aims to receive (node config card_rate)
MAX_INTERVAL_S = MAX_TTL_S / 3  # cards live 3 intervals and at most MAX_TTL_S
GREETERS = 16                # nodes expected to answer a newcomer's card with their own
SILENT_SHARE = 0.5           # a card not heard for this share of its life (1.5 intervals)...
MAX_PULLS = 4                # ...from a connected peer: pulled from it, this many per round


def announce_interval(base: float, cards: int, card_rate: float = CARD_RATE) -> float:
    """Seconds between announcements with ``cards`` unexpired cards known: ``base``, or longer
    so that every node announcing this often sends a receiver ``card_rate`` cards a second."""
    return min(MAX_INTERVAL_S, max(base, cards / card_rate))


class ChecksBusy(UnavailableError, RuntimeError):
    """Too many POSTed cards are waiting for their check: the card was not indexed."""


class Discovery:
    """One node's card publisher, receiver and index."""

    def __init__(self, peer_id: str, index: CardIndex, metrics: NodeMetrics,
                 make_card: Callable[[float], dict[str, Any]], interval: float,
                 max_peers: int = MAX_PEERS, card_rate: float = CARD_RATE,
                 rng: random.Random | None = None) -> None:
        self.peer_id = peer_id
        self.index = index
        self.metrics = metrics
        self.make_card = make_card  # ttl -> signed card
        self.base_interval = interval
        self.card_rate = card_rate
        self.interval = interval  # the current one (announce_interval)
        self.rng = rng or random.Random()
        self.max_peers = max_peers
        self.card: dict[str, Any] | None = None
        self.pubsub: Pubsub | None = None
        self._host: IHost | None = None
        self._wake = trio.Event()
        self._announce_at: float | None = None  # trio clock time of the next announcement
        self._nursery: trio.Nursery | None = None
        self._pending: set[str] = set()  # PeerIDs whose card is queued for or in a check
        self._validated: collections.OrderedDict[tuple[bytes, bytes], CardInfo] = \
            collections.OrderedDict()  # by (origin, seqno): verified, not yet delivered
        self._greeted: collections.OrderedDict[str, tuple[str, ...]] = collections.OrderedDict()
        self._check_slots = trio.CapacityLimiter(CHECK_DIALS)

    # -- own card ---------------------------------------------------------------------------------

    def refresh_card(self) -> dict[str, Any]:
        """Sign a fresh card (valid for three of the current intervals) and index it
        locally; the interval follows the number of cards known."""
        self.interval = announce_interval(self.base_interval, self.index.count(),
                                          self.card_rate)
        self.card = self.make_card(card_ttl(self.interval))
        self.index.put(verify_card(self.card), confirmed=True)
        return self.card

    def announce_soon(self, delay: float = 0.0) -> None:
        """Publish the card again after ``delay`` seconds (e.g. the served shards changed)."""
        at = trio.current_time() + delay
        if self._announce_at is None or at < self._announce_at:
            self._announce_at = at
        self._wake.set()

    # -- running ----------------------------------------------------------------------------------

    async def run(self, host: IHost, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
                  ) -> None:
        """Join the card topic and publish until cancelled."""
        self._host = host
        router = GossipSub([PROTOCOL_ID_V11, PROTOCOL_ID], degree=6, degree_low=4,
                           degree_high=12, heartbeat_interval=1)
        pubsub = _Pubsub(host, router, max_inbound_rpc_size=4 * MAX_CARD_BYTES)
        # py-libp2p starts message sequence numbers at the Unix time in *seconds* and adds one
        # per message, so a node restarted with its key within seconds reuses seqnos it already
        # sent: peers drop those messages as seen (and as equivocation). go-libp2p-pubsub starts
        # at Unix nanoseconds; so do we. (Measured: a restarted node's card once took 11.6 s
        # instead of about 1.5 s to reach every node.)
        pubsub.counter = time.time_ns()
        async with background_trio_service(pubsub), background_trio_service(router), \
                trio.open_nursery() as nursery:
            await pubsub.wait_until_ready()
            pubsub.set_topic_validator(CARDS_TOPIC, self._validate, False)
            subscription = await pubsub.subscribe(CARDS_TOPIC)
            self.pubsub = pubsub
            self._nursery = nursery
            self.refresh_card()
            # cards from disk (an earlier run) and any POSTed before now: not served until
            # heard again or reached (while checks run, posted cards may get 429 busy)
            for info in self.index.unconfirmed(MAX_START_CHECKS):
                self._check_soon(info)
            nursery.start_soon(self._receive, subscription)
            nursery.start_soon(self._announce_loop, router)
            nursery.start_soon(self._pull_loop)
            task_status.started()

    def _validate(self, forwarder: ID, msg: rpc_pb2.Message) -> bool:
        """The topic validator: only valid cards published by their own node are relayed."""
        try:
            info = self._check(msg)
            self._validated[_msg_key(msg)] = info  # _receive need not verify it again
            while len(self._validated) > MAX_VALIDATED:
                self._validated.popitem(last=False)
            return True
        except CardRejected as exc:
            self.metrics.cards_dropped.labels(exc.reason, "pubsub").inc()
            log.info("dropped card from %s (relayed by %s): %s", _origin(msg), forwarder, exc)
            return False
        except Exception:  # a bug in the checks must neither pass a card nor stop the node
            self.metrics.cards_dropped.labels("malformed", "pubsub").inc()
            log.exception("dropped card from %s: internal error while checking it", _origin(msg))
            return False

    def _check(self, msg: rpc_pb2.Message) -> CardInfo:
        return verify_card(parse_card_json(msg.data), origin_peer=_origin(msg))

    async def _receive(self, subscription: Any) -> None:
        while True:
            msg = await subscription.get()
            try:
                info = self._validated.pop(_msg_key(msg), None) or self._check(msg)
                if info.expires_at <= time.time():  # it may have expired since validation
                    raise CardRejected("expired", "the card expired while it was delivered")
            except CardRejected as exc:
                self.metrics.cards_dropped.labels(exc.reason, "pubsub").inc()
                continue
            except Exception:  # a bug in the checks must not stop receiving cards
                log.exception("internal error while checking a card")
                continue
            self.accept(info)

    def accept(self, info: CardInfo) -> str:
        """Index a card heard over gossipsub from its own peer (so confirmed); a card from a
        peer we had none for triggers our own announcement (so the newcomer learns ours) and
        maybe a direct connection."""
        outcome = self.index.put(info, confirmed=True)
        self.metrics.cards_received.labels(outcome).inc()
        if outcome == "new" and info.peer_id != self.peer_id:
            log.info("discovered %s serving %d shards", info.peer_id, len(info.shard_cids))
            addrs = tuple(sorted(info.multiaddrs))
            if self._greeted.get(info.peer_id) != addrs:  # a newcomer, or a restarted peer
                # (not a card that expired in transit and came back: on an overloaded
                # network answering those with our card fed a storm; seen with 30 nodes)
                self._greeted[info.peer_id] = addrs
                while len(self._greeted) > MAX_GREETED:
                    self._greeted.popitem(last=False)
                if self.rng.random() * self.index.count() < GREETERS:  # ~GREETERS of all
                    self.announce_soon(self.rng.uniform(*NEW_PEER_DELAY))
            self._maybe_connect(info)
        return outcome

    def accept_posted(self, info: CardInfo) -> str:
        """Index a card POSTed over HTTP: unconfirmed, and checked by a dial of its addresses
        unless this node already confirmed those addresses. Raises ChecksBusy (nothing
        indexed) when MAX_PENDING_CHECKS cards already wait for theirs."""
        status = self.index.status(info.peer_id)
        same = status is not None and sorted(status.multiaddrs) == sorted(info.multiaddrs)
        check = info.peer_id != self.peer_id and info.peer_id not in self._pending and not (
            same and status is not None and (status.state == CONFIRMED or (
                status.state == FAILED and time.time() - status.since < RECHECK_AFTER_S)))
        if check and len(self._pending) >= MAX_PENDING_CHECKS:
            raise ChecksBusy(f"{len(self._pending)} posted cards are waiting for a dial check "
                             "of their addresses; try again later")
        outcome = self.index.put(info)
        self.metrics.cards_received.labels(outcome).inc()
        if check and outcome != "stale":
            self._check_soon(info)
        return outcome

    def _check_soon(self, info: CardInfo) -> None:
        """Dial the card's addresses in the background; the result confirms or demotes it.
        Before the node runs (no nursery yet) the card stays unconfirmed; run() checks it."""
        nursery = self._nursery
        if nursery is None or info.peer_id in self._pending or info.peer_id == self.peer_id:
            return
        self._pending.add(info.peer_id)
        self.index.mark_checking(info.peer_id, info.multiaddrs)

        async def check() -> None:
            try:
                async with self._check_slots:
                    await self._dial_card(info, keep=False)
            finally:
                self._pending.discard(info.peer_id)
                self.index.end_check(info.peer_id)  # no result recorded: unconfirmed again

        nursery.start_soon(check)

    async def _dial_card(self, info: CardInfo, *, keep: bool) -> bool:
        """Reach the card's PeerID at one of its addresses (Noise authenticates the PeerID) and
        record the result in the index. A connection this opened is closed again unless
        ``keep`` or the node has fewer than max_peers connections."""
        host = self._host
        if host is None:
            return False
        peer = ID.from_base58(info.peer_id)
        if peer in host.get_connected_peers():
            if not _connected_at(host, peer, info.multiaddrs):
                return False  # connected (inbound), not at the card's addresses: nothing learned
            self.index.mark(info.peer_id, info.multiaddrs, reached=True)
            return True
        started = time.time()
        try:
            with trio.fail_after(CHECK_TIMEOUT_S):
                await ensure_connected(host, info.peer_id, info.multiaddrs, DIAL_TIMEOUT)
        except PEER_ERRORS as exc:
            if self.index.mark(info.peer_id, info.multiaddrs, reached=False, started=started):
                log.info("card of %s demoted: not reachable at its addresses: %s",
                         info.peer_id, error_text(exc))
            return False
        if self.index.mark(info.peer_id, info.multiaddrs, reached=True):
            log.info("card of %s confirmed: reached it at its addresses", info.peer_id)
        if not keep and len(host.get_connected_peers()) > self.max_peers:
            with contextlib.suppress(Exception):
                await host.disconnect(peer)
        return True

    def _maybe_connect(self, info: CardInfo) -> None:
        host, nursery = self._host, self._nursery
        if host is None or nursery is None or not info.multiaddrs:
            return
        connected = host.get_connected_peers()
        if len(connected) >= self.max_peers or ID.from_base58(info.peer_id) in connected:
            return
        nursery.start_soon(functools.partial(self._dial_card, info, keep=True))

    async def _announce_loop(self, router: GossipSub) -> None:
        """Publish every interval, on request, and when the topic mesh gains a peer (gossipsub
        forwards only to mesh peers, so a newcomer is greeted once it is grafted)."""
        self.announce_soon(0.0)
        mesh_before: set[ID] = set()
        while True:
            mesh = set(router.mesh.get(CARDS_TOPIC, ()))
            if mesh - mesh_before:
                self.announce_soon(self.rng.uniform(*NEW_PEER_DELAY))
            mesh_before = mesh
            now = trio.current_time()
            due = self._announce_at if self._announce_at is not None else now + self.interval
            if due > now:
                with trio.move_on_after(min(due - now, MESH_POLL_S)):
                    await self._wake.wait()
                self._wake = trio.Event()
                continue
            self._announce_at = now + self.interval  # as the last publish() set it
            await self.publish()

    async def _pull_loop(self) -> None:
        """Every half interval, ask connected peers whose cards have gone silent for their
        cards directly (``/veilnet/cards/1``). Gossip from a peer can stop while its
        connection works: py-libp2p's pubsub exchanges topic subscriptions when a connection
        opens, so a node restarted with the same PeerID that reconnects before its peers
        reaped the old connection can fall out of the mesh in either direction (seen in
        tests/network/test_generate_network.py after the bootstrap node's restart: cards
        stopped flowing both ways while hellos went on, and expired; rust- and js-libp2p have
        had the same class of bug). A peer's own card, read from its own stream, counts as
        heard from it; the others it holds are indexed as a POST would be (unconfirmed unless
        their addresses are confirmed here already). Bounded: ``MAX_PULLS`` peers a round."""
        while True:
            await trio.sleep(self.interval / 2)
            host = self._host
            if host is None:
                continue
            connected = {p.to_base58() for p in host.get_connected_peers()} - {self.peer_id}
            for info in self.index.silent(SILENT_SHARE, among=connected, limit=MAX_PULLS):
                await self._pull(host, info)

    async def _pull(self, host: IHost, info: CardInfo) -> None:
        if not info.multiaddrs:
            return
        addr = info.multiaddrs[0]  # connected already: the lookup reuses that connection
        if "/p2p/" not in addr:
            addr = f"{addr}/p2p/{info.peer_id}"
        try:
            cards, _ = await lookup_cards(host, addr, timeout=CHECK_TIMEOUT_S)
        except PEER_ERRORS as exc:
            log.info("pulling cards from silent %s failed: %s", info.peer_id, error_text(exc))
            return
        self.metrics.cards_pulled.inc()
        log.info("gossip from %s was silent; pulled %d cards from it", info.peer_id, len(cards))
        for card in cards:
            if card.peer_id == self.peer_id:
                continue
            outcome = self.index.put(card, confirmed=card.peer_id == info.peer_id)
            self.metrics.cards_received.labels(outcome).inc()

    async def publish(self) -> None:
        assert self.pubsub is not None
        self.index.purge()
        card = self.refresh_card()
        try:
            await self.pubsub.publish(CARDS_TOPIC, json.dumps(card, separators=(",", ":"))
                                      .encode())
            self.metrics.cards_published.inc()
        except Exception as exc:  # a pubsub failure must not stop the node
            log.warning("publishing the card failed: %s", error_text(exc))

    # -- /veilnet/cards/1 -------------------------------------------------------------------------

    async def lookup(self, stream: INetStream, message: dict[str, Any]) -> None:
        """Answer a card lookup: ``{deployment?, shard?, model?}`` -> ``{cards: [JSON text]}``."""
        lookup = parse_lookup(message)
        await write_frame(stream, lookup_answer(message["id"],
                                                self.index.query(**lookup.filters())))


class _Pubsub(Pubsub):
    """py-libp2p's Pubsub, except that one peer's malformed RPC ends that peer's stream, not
    the node. 0.8's read loop lets protobuf's DecodeError (and any other error a peer's bytes
    cause) escape, which stops the pubsub service and with it the node: one garbage frame on
    the gossip protocol took a node down (tests/network/test_hardening_cards.py; first seen
    with 30 nodes on one machine, docs/reliability.md)."""

    async def continuously_read_stream(self, stream: INetStream) -> None:
        try:
            await super().continuously_read_stream(stream)
        except Exception as exc:  # any error from one peer's bytes
            peer = stream.muxed_conn.peer_id
            log.warning("gossip: dropped the stream of %s after a malformed RPC: %s", peer,
                        error_text(exc))
            with contextlib.suppress(Exception):
                await stream.reset()
            forget = getattr(self, "_handle_dead_peer", None)  # the library's own cleanup
            if forget is not None:
                forget(peer)


def _msg_key(msg: rpc_pb2.Message) -> tuple[bytes, bytes]:
    return bytes(msg.from_id), bytes(msg.seqno)


def _connected_at(host: IHost, peer: ID, multiaddrs: list[str]) -> bool:
    """Whether one of our connections to ``peer`` goes to one of ``multiaddrs`` (IP and port):
    then the card's addresses reach that PeerID."""
    wanted = set()
    for text in multiaddrs:
        parts = text.split("/")
        if len(parts) >= 5 and parts[1] in ("ip4", "ip6") and parts[3] == "tcp":
            wanted.add((parts[2], parts[4]))
    try:
        conns = host.get_network().get_connections(peer)
        remotes = {conn.muxed_conn.get_remote_address() for conn in conns}  # type: ignore
    except Exception:  # py-libp2p internals of a closing connection: nothing learned
        return False
    return any(r is not None and (str(r[0]), str(r[1])) in wanted for r in remotes)


def _origin(msg: rpc_pb2.Message) -> str:
    try:
        return ID(msg.from_id).to_base58()
    except Exception:  # a malformed sender id: only log lines need it
        return "?"
