"""The node's table of ``/veilnet/session/1`` sessions: each holds one generation's KV cache.

Pure bookkeeping (no I/O, no onnxruntime; node/session_service.py runs the shards), so the
limits are tested without a network:

- at most ``max_sessions`` sessions at once, and at most half of them (rounded up) held by any
  one peer, so a peer that opens sessions without end cannot lock others out (``busy`` beyond,
  with the reason ``node_sessions`` or ``peer_sessions``);
- a session's cache holds at most ``max_context`` tokens counted over its batch
  (batch x position), and never more positions than the model's ``context_length`` when its
  manifest gives one (``limit`` for a call that would pass either);
- a session unused for ``idle_expiry`` seconds is dropped (``sweep``: lazily on every call and
  from the service's background task); one in the middle of a step never expires;
- a session belongs to the PeerID that opened it: to any other peer it does not exist, and it
  gets exactly the answer for a session that never existed (``unknown_session``);
- one call at a time per session: a step that arrives while another runs gets ``busy``.

So a node's session memory is bounded by ``max_sessions`` x ``max_context`` tokens of cache.
"""

from __future__ import annotations

import secrets
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np

from node.fair import Busy
from protocols.wire import WireError

if TYPE_CHECKING:  # node/config.py imports this module: keep libp2p out of its imports
    from protocols.session import SessionIO

DEFAULT_MAX_SESSIONS = 16
DEFAULT_MAX_CONTEXT = 2048  # tokens of cache per session, over its batch
DEFAULT_IDLE_EXPIRY = 300.0  # seconds


@dataclass(frozen=True)
class SessionLimits:
    max_sessions: int = DEFAULT_MAX_SESSIONS
    max_context: int = DEFAULT_MAX_CONTEXT
    idle_expiry: float = DEFAULT_IDLE_EXPIRY

    @property
    def max_sessions_per_peer(self) -> int:
        return (self.max_sessions + 1) // 2


@dataclass(eq=False)
class Session:
    id: str
    peer: str  # the PeerID that opened it
    shard: str
    io: SessionIO
    batch: int
    context_length: int | None  # the model's, when its manifest gives one
    last_used: float
    position: int = 0  # tokens in the cache (per sequence of the batch)
    cache: dict[str, np.ndarray] = field(default_factory=dict)  # by past input name
    running: bool = True  # a call is using it (a new session runs its prefill first)
    closed: bool = False

    def nbytes(self) -> int:
        return sum(v.nbytes for v in self.cache.values())


class SessionTable:
    """Sessions by id. ``clock`` is injectable (tests); ``on_end(reason)`` is called for every
    session that ends (``closed``, ``expired``, ``failed``: its prefill did not complete)."""

    def __init__(self, limits: SessionLimits | None = None,
                 clock: Callable[[], float] = time.monotonic,
                 on_end: Callable[[str], None] | None = None) -> None:
        self.limits = limits or SessionLimits()
        self.clock = clock
        self.on_end = on_end
        self._sessions: dict[str, Session] = {}

    def __len__(self) -> int:
        return len(self._sessions)

    def sweep(self) -> int:
        """Drop every idle session older than the expiry; returns how many."""
        cutoff = self.clock() - self.limits.idle_expiry
        expired = [s for s in self._sessions.values() if not s.running and s.last_used < cutoff]
        for session in expired:
            self._end(session, "expired")
        return len(expired)

    def check_room(self, batch: int, position: int, tokens: int,
                   context_length: int | None) -> None:
        """``limit`` unless a cache at ``position`` may take ``tokens`` more."""
        total = position + tokens
        if context_length is not None and total > context_length:
            raise WireError("limit", f"{total} positions would pass the model's context length "
                                     f"of {context_length}")
        if batch * total > self.limits.max_context:
            raise WireError("limit", f"{batch} x {total} tokens would pass this node's limit of "
                                     f"{self.limits.max_context} tokens of cache per session")

    def open(self, peer: str, shard: str, io: SessionIO, batch: int,
             context_length: int | None = None) -> Session:
        """A new session for ``peer``, marked running (its prefill is next: ``commit`` or
        ``fail`` it). ``busy`` when the table is full."""
        self.sweep()
        if len(self._sessions) >= self.limits.max_sessions:
            raise Busy("node_sessions", f"this node holds {len(self._sessions)} sessions, its "
                                        "limit; close one, retry later or use another node")
        held = sum(1 for s in self._sessions.values() if s.peer == peer)
        if held >= self.limits.max_sessions_per_peer:
            raise Busy("peer_sessions", f"you hold {held} sessions at this node, its limit per "
                                        "peer; close one or use another node", retry_after=5.0)
        session_id = secrets.token_hex(16)
        while session_id in self._sessions:  # 128 random bits: never, but cheap to rule out
            session_id = secrets.token_hex(16)
        session = Session(session_id, peer, shard, io, batch, context_length, self.clock())
        self._sessions[session_id] = session
        return session

    def get(self, peer: str, session_id: str) -> Session:
        """``peer``'s session ``session_id``; ``unknown_session`` if it never existed, was
        closed, expired or belongs to another peer (one answer for all four)."""
        self.sweep()
        session = self._sessions.get(session_id)
        if session is None or session.peer != peer:
            raise WireError("unknown_session", f"no session {session_id} for this peer (never "
                                               "opened, closed, or expired)")
        return session

    def acquire(self, peer: str, session_id: str) -> Session:
        """``get``, marked running for one call (``busy`` while another call runs); end the call
        with ``commit`` or ``release``."""
        session = self.get(peer, session_id)
        if session.running:
            raise Busy("session_running", f"session {session_id} is in the middle of a call; "
                                          "steps of one session run one at a time")
        session.running = True
        return session

    def commit(self, session: Session, cache: Mapping[str, np.ndarray], position: int) -> None:
        """A call completed: the session now holds ``cache`` of ``position`` tokens."""
        if not session.closed:
            session.cache = dict(cache)
            session.position = position
        self.release(session)

    def release(self, session: Session) -> None:
        """A call ended (completed or not): the session is idle from now on."""
        session.running = False
        session.last_used = self.clock()

    def fail(self, session: Session) -> None:
        """A new session whose prefill did not complete: it never existed."""
        if not session.closed:
            self._end(session, "failed")

    def close(self, peer: str, session_id: str) -> None:
        """End ``peer``'s session (``unknown_session`` as in ``get``). A call still running on
        it completes, but its cache is dropped."""
        self._end(self.get(peer, session_id), "closed")

    def _end(self, session: Session, reason: str) -> None:
        session.closed = True
        session.cache = {}
        if self._sessions.pop(session.id, None) is not None and self.on_end is not None:
            self.on_end(reason)

    def sessions(self) -> list[Session]:
        return list(self._sessions.values())

    def cache_bytes(self) -> int:
        return sum(s.nbytes() for s in self._sessions.values())


__all__ = ["DEFAULT_IDLE_EXPIRY", "DEFAULT_MAX_CONTEXT", "DEFAULT_MAX_SESSIONS", "Session",
           "SessionLimits", "SessionTable"]
