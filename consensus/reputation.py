"""A client's view of nodes, built only from its own verdicts and measurements.

Every statistic is an exponential moving average updated once per observation of its own kind,
with alpha = 1 - 0.5**(1/half_life): an observation's weight halves after half_life further
observations. Priors for an unseen node (see docs/consensus.md):

- agreement 0.5: a fresh identity is neither trusted nor distrusted; it must earn a high score,
  so throwing away a caught identity and making a new one does not pay;
- availability 1.0: a new node gets tried;
- latency: none measured; stats() reports PRIOR_LATENCY_MS (latency score 0.5) until the first
  measurement, which then replaces it.

score = 0.7*agreement + 0.2*availability + 0.1*latency_score, latency_score = 1/(1 + ms/100),
and a node caught lying (it lost a decided verdict at least once) scores at most its agreement.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

PRIOR_AGREEMENT = 0.5
PRIOR_AVAILABILITY = 1.0
PRIOR_LATENCY_MS = 100.0
W_AGREEMENT, W_AVAILABILITY, W_LATENCY = 0.7, 0.2, 0.1


@dataclass
class NodeStats:
    agreement: float
    latency_ms: float
    availability: float
    observations: int  # number of verdicts recorded
    caught: bool  # ever lost a decided verdict


@dataclass
class _State:
    agreement: float = PRIOR_AGREEMENT
    latency_ms: float | None = None
    availability: float = PRIOR_AVAILABILITY
    observations: int = 0
    caught: bool = False


def latency_score(ms: float) -> float:
    return 1.0 / (1.0 + ms / 100.0)


class Reputation:
    def __init__(self, half_life: float = 20.0) -> None:
        if not (isinstance(half_life, int | float) and math.isfinite(half_life) and half_life > 0):
            raise ValueError(f"half_life must be a finite number > 0, got {half_life!r}")
        self.half_life = float(half_life)
        self.alpha = 1.0 - 0.5 ** (1.0 / self.half_life)
        self._nodes: dict[str, _State] = {}

    def _state(self, node: str) -> _State:
        return self._nodes.setdefault(node, _State())

    def _ema(self, old: float, new: float) -> float:
        return old + self.alpha * (new - old)

    def record_verdict(self, node: str, agreed: bool) -> None:
        """Record a decided verdict: agreed=True for a winner, False for a loser."""
        s = self._state(node)
        s.agreement = self._ema(s.agreement, 1.0 if agreed else 0.0)
        s.observations += 1
        if not agreed:
            s.caught = True

    def record_latency(self, node: str, ms: float) -> None:
        if not (isinstance(ms, int | float) and math.isfinite(ms) and ms >= 0):
            raise ValueError(f"latency must be a finite number >= 0, got {ms!r}")
        s = self._state(node)
        s.latency_ms = float(ms) if s.latency_ms is None else self._ema(s.latency_ms, float(ms))

    def record_availability(self, node: str, ok: bool) -> None:
        s = self._state(node)
        s.availability = self._ema(s.availability, 1.0 if ok else 0.0)

    def stats(self, node: str) -> NodeStats:
        s = self._nodes.get(node, _State())
        latency = PRIOR_LATENCY_MS if s.latency_ms is None else s.latency_ms
        return NodeStats(s.agreement, latency, s.availability, s.observations, s.caught)

    def score(self, node: str) -> float:
        st = self.stats(node)
        value = (W_AGREEMENT * st.agreement + W_AVAILABILITY * st.availability
                 + W_LATENCY * latency_score(st.latency_ms))
        if st.caught:
            value = min(value, st.agreement)
        return min(1.0, max(0.0, value))

    def nodes(self) -> list[str]:
        return sorted(self._nodes)

    def report(self) -> dict[str, dict[str, Any]]:
        """{node: {"score", "agreement", "latency_ms", "availability", "observations"}}."""
        out: dict[str, dict[str, Any]] = {}
        for node in self.nodes():
            st = self.stats(node)
            out[node] = {"score": self.score(node), "agreement": st.agreement,
                         "latency_ms": st.latency_ms, "availability": st.availability,
                         "observations": st.observations}
        return out

    def to_json(self) -> dict[str, Any]:
        return {"half_life": self.half_life, "nodes": {
            node: {"agreement": s.agreement, "latency_ms": s.latency_ms,
                   "availability": s.availability, "observations": s.observations,
                   "caught": s.caught}
            for node, s in sorted(self._nodes.items())}}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Reputation:
        rep = cls(half_life=data["half_life"])
        for node, s in data["nodes"].items():
            latency = s["latency_ms"]
            rep._nodes[str(node)] = _State(
                agreement=float(s["agreement"]),
                latency_ms=None if latency is None else float(latency),
                availability=float(s["availability"]),
                observations=int(s["observations"]), caught=bool(s["caught"]))
        return rep
