"""Transport helpers shared by the node daemon and the client SDK (py-libp2p glue).

Hosts use TCP, Noise and yamux. Noise is the only security protocol offered or accepted
(``make_host``): py-libp2p's default list also holds TLS, SECIO and ``/plaintext/2.0.0``, and
plaintext lets a peer claim any PeerID by sending only its public key. ``request`` opens a
fresh stream, sends one frame, reads one response frame and closes the stream; ``exchange`` does
one round trip on a stream the caller keeps. Every step has a timeout. Protocol ids live in
their protocol's module (protocols/infer.py, ...).
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Mapping, Sequence
from typing import Any

import multiaddr
import trio
from libp2p import new_host
from libp2p.abc import IHost, INetStream
from libp2p.crypto.ed25519 import create_new_key_pair
from libp2p.crypto.x25519 import create_new_key_pair as create_x25519_key_pair
from libp2p.custom_types import TProtocol
from libp2p.exceptions import BaseLibp2pError
from libp2p.network.exceptions import SwarmException
from libp2p.network.stream.exceptions import StreamError
from libp2p.peer.id import ID
from libp2p.peer.peerinfo import PeerInfo, info_from_p2p_addr
from libp2p.security.noise.transport import PROTOCOL_ID as NOISE_PROTOCOL_ID
from libp2p.security.noise.transport import Transport as NoiseTransport
from libp2p.stream_muxer.exceptions import MuxedStreamError

from crypto.identity import Identity
from errors import InputError, ProtocolError, UnavailableError, VeilnetError
from protocols.wire import DEFAULT_FRAME_LIMIT, WireError, read_frame, write_frame

# py-libp2p's yamux sends a window update after every read of a stream by default
# (PY_YAMUX_RELEASE_ON_READ, its documented tuning knob, read at call time). With the wide
# per-stream windows below (widen_window) those updates only add frames: turning them off
# halves the time of a 1.5 MB request/response on loopback (45 -> 24 ms, measured). The window
# is still replenished once half of it has been read. An operator's own setting wins.
os.environ.setdefault("PY_YAMUX_RELEASE_ON_READ", "0")

log = logging.getLogger("veilnet.p2p")

# One dial (TCP, Noise, yamux) by default. On loopback it takes milliseconds, but it is about six
# round trips, and a lost handshake packet waits for TCP's 1 s retransmission: through
# scripts/netem.py links with 100 ms delay and 10% loss, dials took 1.84 s at the median and
# 5.45 s at worst (40 measured), so 5 s failed some (docs/reliability.md).
DIAL_TIMEOUT = 10.0

# What a stream the peer has closed or reset raises on use.
STREAM_ERRORS: tuple[type[BaseException], ...] = (StreamError, MuxedStreamError, EOFError)
# What a call to a peer raises when the peer or the network fails, as opposed to a bug of ours:
# our own errors (a bad or error response, an unreachable peer), py-libp2p's (dial, security,
# muxer, stream), the socket's, a timeout, and trio's for a stream broken under us.
PEER_ERRORS: tuple[type[BaseException], ...] = (
    VeilnetError, BaseLibp2pError, OSError, EOFError, trio.TooSlowError,
    trio.BrokenResourceError, trio.ClosedResourceError)


def make_host(identity: Identity) -> IHost:
    """A libp2p host (TCP, yamux) for ``identity`` that offers and accepts Noise only.

    Noise XX proves that the remote holds the private key of its PeerID; a peer offering only
    plaintext, SECIO or TLS fails to negotiate a security protocol and is never connected."""
    key_pair = create_new_key_pair(identity.seed())
    noise = NoiseTransport(key_pair, noise_privkey=create_x25519_key_pair().private_key)
    return new_host(key_pair=key_pair, sec_opt={NOISE_PROTOCOL_ID: noise})


def parse_multiaddr(text: str) -> multiaddr.Multiaddr:
    try:
        return multiaddr.Multiaddr(text)
    except Exception as exc:  # the multiaddr package raises several types
        raise InputError(f"{text!r} is not a multiaddr ({exc})") from None


def peer_info(text: str) -> PeerInfo:
    """PeerInfo from a ``/ip4/.../tcp/.../p2p/<PeerID>`` multiaddr."""
    addr = parse_multiaddr(text)
    try:
        return info_from_p2p_addr(addr)
    except Exception as exc:  # py-libp2p raises several types for a missing or bad /p2p part
        raise InputError(f"{text!r} does not end in /p2p/<PeerID> ({exc})") from None


def full_addrs(host: IHost) -> list[str]:
    """The host's listen multiaddrs, each ending in /p2p/<PeerID>."""
    return [str(a) for a in host.get_addrs()]


def remote_peer(stream: INetStream) -> str:
    return str(stream.muxed_conn.peer_id)


STREAM_WINDOW = 16 * 1024 * 1024


async def widen_window(stream: INetStream, size: int = STREAM_WINDOW) -> None:
    """Raise a yamux stream's receive window to ``size`` at once.

    py-libp2p 0.8.1 opens every yamux stream with a 256 KiB window and has no setting for it; it
    grows the window only as a long-lived stream keeps reading. veilnet sends one tensor frame
    per stream, so with the default a 1.5 MB activation needs about a dozen window-update round
    trips each way. go-yamux lets the receiver announce a larger initial window; this does the
    same with the stream's own window-update call. A stream of another muxer is left alone.
    """
    muxed = getattr(stream, "muxed_stream", None)
    if not all(hasattr(muxed, a) for a in ("recv_window", "target_recv_window", "window_lock",
                                              "send_window_update")):
        return
    async with muxed.window_lock:
        increment = size - muxed.recv_window
        if increment <= 0:
            return
        muxed.recv_window += increment
        muxed.target_recv_window = max(muxed.target_recv_window, size)
    await muxed.send_window_update(increment)


async def close_quietly(stream: INetStream, timeout: float = 1.0) -> None:
    """Close a stream even inside a cancelled scope; a peer that already reset it is fine."""
    with trio.move_on_after(timeout) as scope:
        scope.shield = True
        with contextlib.suppress(Exception):
            await stream.close()


async def connect(host: IHost, info: PeerInfo, timeout: float) -> None:
    """Dial ``info``. py-libp2p blocks a peer for a while after one failed dial (its "negative
    cache"); an explicit connect is a new attempt, often at a new address (a restarted node),
    so it lifts that block first. Measured: without this, a node that once dialled a stale
    address from a card could not reach its bootstrap node for minutes. A closed connection
    left in py-libp2p's table would make ``host.connect`` a no-op: it is dropped first
    (``has_live_connection``)."""
    has_live_connection(host, info.peer_id)
    unblock = getattr(host.get_network(), "unblock_peer", None)
    if unblock is not None:
        unblock(info.peer_id)
    # py-libp2p dials at most one address per transport (the first TCP address in its
    # peerstore), so an address learnt earlier (a card from a node's previous run) would be
    # dialled instead of this one: forget the peer's addresses, host.connect adds these.
    # Measured: a testnet restarted in the same directory could not form, every node dialling
    # its bootstrap node's address of the previous run.
    with contextlib.suppress(Exception):
        host.get_peerstore().clear_addrs(info.peer_id)
    with trio.fail_after(timeout):
        await host.connect(info)


def has_live_connection(host: IHost, peer: ID) -> bool:
    """Whether ``host`` has an open connection to ``peer``.

    py-libp2p 0.8 can keep a closed connection in its table: ``host.connect()`` then believes
    the peer connected and every new stream fails with "No valid connections available"
    (seen in the test suite: a client's connection to a ledger node died during a burst of
    proof requests, and the next query could not reach that node at all). Such stale entries
    are dropped here, so the caller dials again."""
    network = host.get_network()
    try:
        conns = list(network.get_connections(peer))
    except Exception:  # py-libp2p internals: fall back to its own notion of connected
        return peer in host.get_connected_peers()
    if any(c is not None and not getattr(c, "is_closed", False) for c in conns):
        return True
    table = getattr(network, "connections", None)
    if conns and isinstance(table, dict):
        table.pop(peer, None)
    return False


class PeerUnreachable(UnavailableError, ConnectionError):
    """No address of a peer could be dialled; the message names each address and why."""


async def ensure_connected(host: IHost, peer_id: str, addrs: Sequence[str],
                           timeout: float) -> ID:
    """Connect to ``peer_id`` at one of ``addrs`` unless a connection is already open."""
    pid = ID.from_base58(peer_id)
    if has_live_connection(host, pid):
        return pid
    errors = []
    for text in addrs:
        try:
            info = peer_info(text if "/p2p/" in text else f"{text}/p2p/{peer_id}")
            await connect(host, info, timeout)
            return pid
        except PEER_ERRORS as exc:
            errors.append(f"{text}: {error_text(exc)}")
    raise PeerUnreachable(f"cannot reach {peer_id}: " + "; ".join(errors or ["no addresses"]))


async def open_stream(host: IHost, peer_id: ID, protocol: TProtocol) -> INetStream:
    """A new stream to ``peer_id`` speaking ``protocol``, with a wide receive window.

    A connection that closed since the caller checked it (the peer restarted, and a reused
    stream just failed on it) makes py-libp2p refuse with "No valid connections available"
    rather than dial: the stale entry is then dropped and the swarm dials the peer's known
    addresses, once (the chaos soak, scripts/chaos.py, failed hops on restarted nodes so)."""
    try:
        stream = await host.new_stream(peer_id, [protocol])
    except SwarmException:
        if has_live_connection(host, peer_id):  # drops the stale entry when there is one
            raise
        stream = await host.new_stream(peer_id, [protocol])
    try:
        await widen_window(stream)
    except BaseException:
        await close_quietly(stream)
        raise
    return stream


async def exchange(stream: INetStream, message: Mapping[str, Any],
                   limit: int = DEFAULT_FRAME_LIMIT) -> dict[str, Any]:
    """Write one request frame and read the response frame (the caller bounds the time).

    Raises WireError on a malformed or missing response and RemoteError on an error frame."""
    await write_frame(stream, message)
    response = await read_frame(stream, limit)
    if response is None:
        raise WireError("truncated", "the peer closed the stream without answering")
    error = response.get("error")
    if error is not None:
        if not isinstance(error, dict):
            raise WireError("bad_frame", "malformed error frame")
        raise RemoteError(str(error.get("code")), str(error.get("message")))
    return response


async def request(host: IHost, peer_id: ID, protocol: TProtocol, message: Mapping[str, Any],
                  timeout: float, limit: int = DEFAULT_FRAME_LIMIT) -> dict[str, Any]:
    """Send one request frame on a new stream, return the response frame, close the stream.

    Raises trio.TooSlowError after ``timeout`` seconds, WireError on a malformed response and
    RemoteError when the peer answers with an error frame.
    """
    with trio.fail_after(timeout):
        stream = await open_stream(host, peer_id, protocol)
        try:
            return await exchange(stream, message, limit)
        finally:
            await close_quietly(stream)


MAX_ERROR_TEXT = 300  # characters of one failure reason in a log line or a message


def one_line(text: str, limit: int = MAX_ERROR_TEXT) -> str:
    """``text`` on one line (whitespace runs collapsed), at most ``limit`` characters, never
    empty."""
    flat = " ".join(text.split()) or "unknown failure"
    return flat if len(flat) <= limit else flat[:limit - 3] + "..."


def error_text(exc: BaseException) -> str:
    """A failure as one short, non-empty line. py-libp2p's dial and stream errors span several
    lines, and some exceptions (trio.TooSlowError) have no message at all."""
    return one_line(str(exc) or type(exc).__name__)


class RemoteError(ProtocolError):
    """The peer answered with a structured error frame (its code and message are cut to
    ``MAX_ERROR_TEXT`` characters: they come from the peer and end up in logs and results)."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(code[:MAX_ERROR_TEXT], message[:MAX_ERROR_TEXT])


def quiet_libraries(debug: bool = False) -> None:
    """py-libp2p logs every failed dial at ERROR; veilnet reports those itself, once."""
    if debug:
        return
    logging.getLogger("libp2p").setLevel(logging.CRITICAL)
    for name in ("multiaddr", "async_service"):
        logging.getLogger(name).setLevel(logging.WARNING)
    hyper = logging.getLogger("hypercorn.error")
    hyper.setLevel(logging.WARNING)  # its "Running on" line repeats what the banner says
