"""What a client remembers about nodes across queries: failures, backoff and latency.

``PeerHealth`` keeps, per peer, its consecutive failures and the last failure's reason. After a
failure the peer is skipped for ``base`` seconds, doubling with each further consecutive failure
up to ``cap`` (the way Petals bans a failing server for a while); a success resets it. A
skipped peer is asked again only when the backoff has run out, or when no other node serves
the shard. It also keeps the latencies of recent answers, from which the hedge delay is derived:
a replica that has not answered after that long is treated as slow, and the hop asks the next
candidate as well (docs/consensus.md).

``describe`` turns any failure into the one-line, non-empty reason stored in
``HopRecord.failures`` and quoted in ``QueryError`` messages (py-libp2p errors span lines).
"""

from __future__ import annotations

import logging
import statistics
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass

import trio

from errors import ProtocolError
from protocols.transport import one_line

BACKOFF_BASE_S = 5.0     # skip a peer this long after its first failure ...
BACKOFF_CAP_S = 300.0    # ... doubling per consecutive failure, up to this
HEDGE_MIN_S = 1.0        # never hedge sooner than this
HEDGE_FACTOR = 4.0       # ... nor sooner than this many times the median latency seen
HEDGE_DEFAULT_S = 2.0    # before any latency has been measured
LATENCY_WINDOW = 64      # recent answers the median is taken over


@dataclass
class _Failures:
    count: int
    until: float  # monotonic time the backoff ends
    reason: str


class PeerHealth:
    """Per-peer failure memory with exponential backoff, and the hedge delay."""

    def __init__(self, base: float = BACKOFF_BASE_S, cap: float = BACKOFF_CAP_S,
                 clock: Callable[[], float] = time.monotonic) -> None:
        if base <= 0 or cap < base:
            raise ValueError("backoff: need 0 < base <= cap")
        self.base, self.cap, self.clock = base, cap, clock
        self._failures: dict[str, _Failures] = {}
        self._latencies: deque[float] = deque(maxlen=LATENCY_WINDOW)

    def failed(self, peer_id: str, reason: str) -> float:
        """Record a failure; returns how long the peer is now skipped (seconds)."""
        previous = self._failures.get(peer_id)
        count = previous.count + 1 if previous else 1
        backoff = min(self.cap, self.base * 2 ** (count - 1))
        self._failures[peer_id] = _Failures(count, self.clock() + backoff, reason)
        return backoff

    def succeeded(self, peer_id: str, latency_ms: float | None = None) -> None:
        """Record an answer: the peer's backoff is reset."""
        self._failures.pop(peer_id, None)
        if latency_ms is not None:
            self._latencies.append(latency_ms)

    def backoff_left(self, peer_id: str) -> float:
        """Seconds until the peer is asked again (0 when it is not backed off)."""
        entry = self._failures.get(peer_id)
        return max(0.0, entry.until - self.clock()) if entry else 0.0

    def failures(self, peer_id: str) -> int:
        """Consecutive failures of the peer (0 after a success)."""
        entry = self._failures.get(peer_id)
        return entry.count if entry else 0

    def skip_note(self, peer_id: str) -> str:
        """Why a backed-off peer was not asked, for error messages."""
        entry = self._failures.get(peer_id)
        if entry is None:
            return "not backed off"
        return (f"skipped for another {self.backoff_left(peer_id):.0f} s after "
                f"{entry.count} consecutive failure(s), the last: {entry.reason}")

    def hedge_delay(self, limit: float) -> float:
        """How long to wait for a replica before asking the next candidate too: a few times
        the median latency of recent answers, at least HEDGE_MIN_S, at most ``limit``."""
        if self._latencies:
            delay = max(HEDGE_MIN_S, HEDGE_FACTOR * statistics.median(self._latencies) / 1e3)
        else:
            delay = HEDGE_DEFAULT_S
        return min(delay, limit)


def describe(exc: BaseException, timeout: float) -> str:
    """A failure as one trimmed, non-empty line."""
    if isinstance(exc, trio.TooSlowError):
        text = f"no answer within {timeout:g} s"
    elif isinstance(exc, ProtocolError):  # the code says it all: "bad_signature: ..."
        text = str(exc)
    else:
        text = f"{type(exc).__name__}: {exc}" if str(exc).strip() else type(exc).__name__
    return one_line(text)



def quiet_libp2p() -> None:
    """py-libp2p logs a multi-line report at ERROR for every stream it fails to open; the
    client reports each failure itself, on one line. Silenced unless the application set a
    level on the 'libp2p' logger itself."""
    logger = logging.getLogger("libp2p")
    if logger.level == logging.NOTSET:
        logger.setLevel(logging.CRITICAL)


__all__ = ["PeerHealth", "describe", "quiet_libp2p"]
